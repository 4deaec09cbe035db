// p11hactl: the operator's tool. Reads the same configuration as the module (P11HA_CONF, or --config).
import ArgumentParser
import CInterop
import FoundationEssentials
import Glibc
import P11HA
import P11HAAdmin

@main
struct P11HACtl: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "p11hactl",
        abstract: "Operate p11ha high-availability groups of PKCS#11 tokens.",
        subcommands: [Status.self, Check.self, Domain.self, Sync.self, Bench.self])
}

struct ConfigOption: ParsableArguments {
    @Option(name: .long, help: "The configuration file (default: $P11HA_CONF, else /etc/p11ha/p11ha.conf).")
    var config: String?

    var path: String { config ?? Config.pathFromEnvironment() }

    /// The configuration, or exit 1 with the file:line of what is wrong.
    func load() throws -> Config {
        do {
            return try Config.load(path: path)
        } catch {
            printError("p11hactl: \(error)")
            throw ExitCode(1)
        }
    }
}

struct Check: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Validate the configuration and reach every member.",
        discussion: """
            Exits 0 when the file is valid, every member's module loads and every URI selects exactly one token, \
            and every member with a PIN of its own (pin-source or pin-value) accepts it. Otherwise exits 1 and \
            names the file and line.
            """)

    @OptionGroup var options: ConfigOption

    func run() throws {
        var config = try options.load()
        config.log = .stderr
        config.logLevel = .warning
        let runtime: Runtime
        do {
            runtime = try Runtime.start(config)
        } catch {
            printError("p11hactl: \(error)")
            throw ExitCode(1)
        }
        defer { runtime.shutdown() }
        var failed = false
        print("\(config.path): valid")
        for group in runtime.groups {
            print("group \(group.name): slot \(group.slotID), token label \"\(group.label)\", \(group.members.count) members, \(group.mechanisms.count) common mechanisms")
            let reports = runtime.memberReports(group)
            let common = reports.map(\.mechanisms).reduce(reports.first?.mechanisms ?? []) { $0.intersection($1) }
            for report in reports {
                print("  member \(report.uri) (line \(report.line)): token \"\(report.tokenLabel)\" serial \(report.serial), \(report.manufacturer) \(report.model)")
                let extra = report.mechanisms.subtracting(common).sorted()
                if !extra.isEmpty {
                    print("    mechanisms only some members have (not offered by the group): \(extra.map(mechanismName).joined(separator: ", "))")
                }
                switch report.login {
                case .none: break
                case .success: print("    login with its own PIN: ok")
                case .failure(let error):
                    print("    login with its own PIN: FAILED \(error)")
                    failed = true
                }
            }
        }
        if failed { throw ExitCode(1) }
    }
}

struct Status: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Show each group's members: reachable, objects, agreement, replication key, last failure and recovery.",
        discussion: """
            Members are probed now, from this process. Their last failure and recovery come from the status file \
            the module's processes keep in lock-dir; a status file that is not this user's or root's (or of the \
            directory's group, where it is shared), or a link, is not shown but flagged. Without a user PIN, private \
            objects and records are not compared. Members agree when each holds what the union of their replication \
            records says (no object missing, none left to destroy, no attribute differing) and no object is left \
            that cannot be repaired (named). Exit status: 0 when every member is reachable, holds the replication key and all agree; 1 otherwise (a degraded group, or a status file \
            flagged); 2 for a configuration error.
            """)

    @OptionGroup var options: ConfigOption
    @Option(name: .long, help: "Only this group.")
    var group: String?
    @Flag(name: .long, help: "Print JSON (one object with a 'groups' array).")
    var json = false
    @Option(name: .customLong("pin-source"), help: "Read the user PIN from file:PATH to compare private objects and records too.")
    var pinSource: String?

    struct MemberJSON: Codable {
        let name: String, uri: String, standby: Bool, reachable: Bool
        let problem: String?, replicationKey: Bool, objects: Int?, records: Int?
        /// Against the union of the members' records: objects it lacks, those that cannot be repaired, objects no
        /// record describes.
        let missing: [String], unrepairable: [String], unrecorded: Int, unrecordedDiffer: Bool
        let health: String?, lastFailure: Int64?, lastFailureReason: String?, lastRecovery: Int64?
        /// What each live process using the group sees of this member now (from the status file), when it has
        /// seen it fail: a member out of service in an application's process makes the group degraded, even
        /// when this tool's own probe reaches it.
        let processes: [ProcessJSON]
    }
    struct ProcessJSON: Codable {
        let pid: Int32, health: String, since: Int64?, reason: String?
    }
    /// Where the group's status file is, and why it is not shown when it is not (a file of another user, a link).
    struct StatusFileJSON: Codable {
        let path: String, problem: String?
    }
    struct GroupJSON: Codable {
        let name: String, label: String, slot: UInt, membersAgree: Bool, healthy: Bool, statusFile: StatusFileJSON,
            members: [MemberJSON]
    }
    struct Report: Codable { let groups: [GroupJSON] }

    func run() throws {
        let runtime: Runtime
        do {
            runtime = try startRuntime(options)
        } catch let exit as ExitCode {
            throw exit == .failure ? ExitCode(2) : exit
        }
        defer { runtime.shutdown() }
        let pin = try pinSource.map { try readPIN(source: $0, prompt: "") }
        var groups: [GroupJSON] = []
        for g in runtime.groups where group == nil || g.name == group {
            let surveys = runtime.survey(g, userPIN: pin)
            groups.append(report(g, surveys, agree: runtime.membersAgree(surveys)))
        }
        if group != nil && groups.isEmpty {
            printError("p11hactl: no group '\(printable(group!))' in the configuration")
            throw ExitCode(2)
        }
        if json {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
            print(String(decoding: try encoder.encode(Report(groups: groups)), as: UTF8.self))
        } else {
            for g in groups { printText(g) }
        }
        if !groups.allSatisfy(\.healthy) { throw ExitCode(1) }
    }

    /// One group's report. Every text in it passes through `printable`: the status file is written by other
    /// processes, token labels and error texts by members, and none may reach the terminal as a control sequence.
    func report(_ g: P11HA.Group, _ surveys: [MemberSurvey], agree: Bool) -> GroupJSON {
        let reading = g.statusFile.read()
        let all = reading.records.map { record -> MemberStatusRecord in
            var clean = record
            clean.member = printable(record.member)
            clean.health = printable(record.health)
            clean.reason = record.reason.map(printable)
            return clean
        }
        // History: the latest failure and recovery any process recorded.
        var records: [String: MemberStatusRecord] = [:]
        for record in all {
            var merged = records[record.member] ?? record
            if (record.lastFailure ?? 0) > (merged.lastFailure ?? 0) { (merged.lastFailure, merged.reason) = (record.lastFailure, record.reason) }
            if (record.lastRecovery ?? 0) > (merged.lastRecovery ?? 0) { merged.lastRecovery = record.lastRecovery }
            records[record.member] = merged
        }
        let live = all.filter { $0.pid != getpid() && processIsAlive($0.pid) }
        let inService = Health.inService.name
        let outInAProcess = live.contains { $0.health != inService }
        let healthy = agree && !outInAProcess && reading.problem == nil && surveys.allSatisfy { $0.reachable && $0.replicationKey }
        let members = surveys.map { s -> MemberJSON in
            let name = printable(s.name)
            let r = records[name]
            let processes = live.filter { $0.member == name }.map { (p: MemberStatusRecord) -> ProcessJSON in
                let serving = p.health == inService
                return ProcessJSON(pid: p.pid, health: p.health, since: serving ? p.lastRecovery : p.lastFailure,
                                   reason: serving ? nil : p.reason)
            }
            return MemberJSON(name: name, uri: printable(s.uri), standby: s.standby, reachable: s.reachable,
                              problem: s.problem.map(printable), replicationKey: s.replicationKey, objects: s.objectCount,
                              records: s.records, missing: s.missing.map(printable), unrepairable: s.unrepairable.map(printable),
                              unrecorded: s.unrecorded, unrecordedDiffer: s.unrecordedDiffer, health: r?.health, lastFailure: r?.lastFailure,
                              lastFailureReason: r?.reason, lastRecovery: r?.lastRecovery, processes: processes)
        }
        return GroupJSON(name: printable(g.name), label: printable(g.label), slot: g.slotID, membersAgree: agree, healthy: healthy,
                         statusFile: StatusFileJSON(path: printable(g.statusFile.path), problem: reading.problem.map(printable)),
                         members: members)
    }

    func printText(_ g: GroupJSON) {
        print("group \(g.name) (token \"\(g.label)\", slot \(g.slot)): \(g.healthy ? "healthy" : "DEGRADED"), members \(g.membersAgree ? "agree" : "DISAGREE")")
        if let problem = g.statusFile.problem {
            print("  STATUS FILE NOT SHOWN (not this user's, or not verifiable): \(problem)")
        }
        for m in g.members {
            var line = "  \(m.name)\(m.standby ? " (standby)" : ""): \(m.reachable ? "reachable" : "UNREACHABLE (\(m.problem ?? "?"))")"
            if m.reachable {
                line += ", \(m.objects.map(String.init) ?? "?") objects, replication key \(m.replicationKey ? "present" : "MISSING")"
                if let records = m.records { line += ", \(records) replication records" }
                if m.unrecorded > 0 {
                    line += ", \(m.unrecorded) objects no record describes (made outside p11ha: left alone\(m.unrecordedDiffer ? "; NOT ALIKE ON EVERY MEMBER, p11hactl sync copies them" : ""))"
                }
            }
            print(line)
            for name in m.unrepairable { print("    CANNOT BE REPAIRED: \(name)") }
            for name in m.missing where !m.unrepairable.contains(where: { $0.hasPrefix(name) }) { print("    missing (repaired at its next recovery or catch-up): \(name)") }
            if let failed = m.lastFailure {
                print("    last failed \(timestamp(failed))\(m.lastFailureReason.map { ": \($0)" } ?? "")")
            }
            if let recovered = m.lastRecovery { print("    last recovered \(timestamp(recovered))") }
            for p in m.processes where p.health != Health.inService.name {
                print("    OUT OF SERVICE in process \(p.pid): \(p.health)\(p.since.map { " since \(timestamp($0))" } ?? "")\(p.reason.map { ": \($0)" } ?? "")")
            }
        }
    }

    /// ISO 8601, UTC: 2026-11-30T15:00:00Z.
    func timestamp(_ seconds: Int64) -> String {
        var time = time_t(seconds)
        var parts = tm()
        guard gmtime_r(&time, &parts) != nil else { return "\(seconds)" }
        var buffer = [CChar](repeating: 0, count: 32)
        let n = strftime(&buffer, buffer.count, "%Y-%m-%dT%H:%M:%SZ", &parts)
        return String(decoding: buffer.prefix(n).map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}

struct Domain: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Set up or check a group's replication key.",
        subcommands: [DomainCreate.self, DomainCheck.self])
}

struct GroupOption: ParsableArguments {
    @Option(name: .long, help: "The group's name, as in [group NAME].")
    var group: String

    func find(in runtime: Runtime) throws -> P11HA.Group {
        guard let group = runtime.groups.first(where: { $0.name == self.group }) else {
            printError("p11hactl: no group '\(self.group)' in the configuration")
            throw ExitCode(1)
        }
        return group
    }
}

/// Starts the configured groups for a command, with warnings and errors on stderr.
func startRuntime(_ options: ConfigOption) throws -> Runtime {
    var config = try options.load()
    config.log = .stderr
    config.logLevel = .warning
    do {
        return try Runtime.start(config)
    } catch {
        printError("p11hactl: \(error)")
        throw ExitCode(1)
    }
}

/// A PIN from `--...-pin-source file:PATH`, else from a prompt on the terminal (never from the command line).
func readPIN(source: String?, prompt: String) throws -> Secret {
    if let source {
        do {
            return try Secret.reading(pinSource: source)
        } catch {
            printError("p11hactl: cannot read the PIN from \(Secret.pinSourcePath(source)): \(error)")
            throw ExitCode(1)
        }
    }
    guard let typed = getpass(prompt) else {
        printError("p11hactl: no terminal to ask for the PIN; use a pin-source")
        throw ExitCode(1)
    }
    defer { explicit_bzero(typed, strlen(typed)) }
    return Secret(copying: UnsafeRawBufferPointer(start: typed, count: strlen(typed)))
}

/// `text` with every control character (C0, DEL, C1: what starts a terminal escape sequence) shown as \u{..}.
func printable(_ text: String) -> String {
    var out = ""
    for scalar in text.unicodeScalars {
        if scalar.properties.generalCategory == .control {
            out += "\\u{\(String(scalar.value, radix: 16))}"
        } else {
            out.unicodeScalars.append(scalar)
        }
    }
    return out
}

func hex(_ bytes: some Sequence<UInt8>) -> String {
    let digits = Array("0123456789abcdef".utf8)
    var out: [UInt8] = []
    for byte in bytes { out += [digits[Int(byte >> 4)], digits[Int(byte & 0xF)]] }
    return String(decoding: out, as: UTF8.self)
}

/// `text` left-aligned in `width` columns.
func padded(_ text: String, _ width: Int) -> String { text + String(repeating: " ", count: max(0, width - text.count)) }

/// `text` right-aligned in `width` columns.
func rightAligned(_ text: String, _ width: Int) -> String { String(repeating: " ", count: max(0, width - text.count)) + text }

/// `value` right-aligned in `width` columns with `decimals` decimals (printf's %W.Df, through vsnprintf).
func fixed(_ value: Double, width: Int, decimals: Int) -> String {
    var buffer = [CChar](repeating: 0, count: 64)
    let n = withVaList([value]) { vsnprintf(&buffer, buffer.count, "%\(width).\(decimals)f", $0) }
    return String(decoding: buffer.prefix(Int(max(0, n))).map { UInt8(bitPattern: $0) }, as: UTF8.self)
}

struct DomainCreate: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "create",
        abstract: "Create the group's replication key on every member (or carry it to members that lack it).",
        discussion: """
            Needs the SO PIN of the members (one PIN for all). The key is generated on one member and carried to \
            each other member wrapped under a key the two members agree by ECDH: its value is never in clear \
            outside the members. Exits 0 when every member holds the same key.
            """)

    @OptionGroup var options: ConfigOption
    @OptionGroup var group: GroupOption
    @Option(name: .customLong("so-pin-source"), help: "Read the SO PIN from file:PATH (default: prompt).")
    var soPINSource: String?

    func run() throws {
        let runtime = try startRuntime(options)
        defer { runtime.shutdown() }
        let group = try group.find(in: runtime)
        let pin = try readPIN(source: soPINSource, prompt: "SO PIN for the members of group \(group.name): ")
        do {
            try runtime.domainCreate(group, soPIN: pin) { print($0) }
        } catch {
            printError("p11hactl: domain create: \(error)")
            throw ExitCode(1)
        }
        try DomainCheck.report(runtime, group)
    }
}

struct DomainCheck: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "check",
        abstract: "Prove that every member holds the same replication key; exit 1 when one differs or lacks it.")

    @OptionGroup var options: ConfigOption
    @OptionGroup var group: GroupOption

    func run() throws {
        let runtime = try startRuntime(options)
        defer { runtime.shutdown() }
        try Self.report(runtime, try group.find(in: runtime))
    }

    static func report(_ runtime: Runtime, _ group: P11HA.Group) throws {
        let states = runtime.domainCheck(group)
        let prints = states.compactMap(\.fingerprint)
        let reference = prints.first
        var good = true
        for state in states {
            if let print = state.fingerprint {
                let same = print == reference
                good = good && same
                Swift.print("\(state.member): replication key \(hex(print.prefix(8)))\(same ? "" : "  DIFFERS")")
            } else {
                good = false
                Swift.print("\(state.member): \(state.problem ?? "no replication key")")
            }
        }
        Swift.print(good ? "group \(group.name): every member holds the same replication key"
                         : "group \(group.name): replication key missing or different")
        if !good { throw ExitCode(1) }
    }
}

struct Sync: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Copy to each member the token objects it lacks; report conflicts and what cannot be copied.",
        discussion: """
            First every member is brought to what the replication records say, as a returning member is (under \
            its lease): objects destroyed through p11ha are destroyed, never copied back, renamed ones renamed. \
            Then objects no record describes (made outside p11ha) are copied. \
            Keys travel wrapped under the group's replication key (only extractable ones can); certificates, \
            public keys and data objects by value. Objects with the same class, key type, label and ID but \
            different key material on two members are conflicts: reported, never overwritten. Exits 1 when an \
            object is in conflict or cannot be copied (with --dry-run too), 0 otherwise.
            """)

    @OptionGroup var options: ConfigOption
    @OptionGroup var group: GroupOption
    @Flag(name: .customLong("dry-run"), help: "Only report what would be copied.")
    var dryRun = false
    @Option(name: .customLong("pin-source"), help: "Read the user PIN from file:PATH (default: prompt, unless every member has its own).")
    var pinSource: String?

    func run() throws {
        let runtime = try startRuntime(options)
        defer { runtime.shutdown() }
        let group = try group.find(in: runtime)
        let pin: Secret? = group.members.allSatisfy({ $0.hasOwnPIN }) && pinSource == nil
            ? nil : try readPIN(source: pinSource, prompt: "User PIN for group \(group.name): ")
        let report: SyncReport
        do {
            report = try runtime.synchronize(group, userPIN: pin, dryRun: dryRun) { print($0) }
        } catch {
            printError("p11hactl: sync: \(error)")
            throw ExitCode(1)
        }
        for problem in report.uncopyable { print("cannot copy: \(problem.object): \(problem.detail)") }
        for problem in report.conflicts { print("conflict: \(problem.object): \(problem.detail)") }
        let verb = dryRun ? "would copy" : "copied"
        let pending = report.repairsPending > 0
            ? (dryRun ? ", \(report.repairsPending) changes the replication records call for" : ", \(report.repairsPending) left to the next repair") : ""
        print("group \(group.name): \(report.objectCount) objects, \(verb) \(report.copies.count), \(report.uncopyable.count) cannot be copied, \(report.conflicts.count) conflicts\(pending)")
        if !report.uncopyable.isEmpty || !report.conflicts.isEmpty { throw ExitCode(1) }
    }
}

struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Measure a group against its first member used directly (ops/s, p50/p99, ratio).",
        discussion: """
            Runs the p11bench program (installed beside p11hactl) twice in one run: on the group through \
            libp11ha.so, and on the group's first member through its own module. Keys are session keys made \
            for the run. The PIN goes to p11bench through its environment, never its command line.
            """)

    @OptionGroup var options: ConfigOption
    @Option(name: .long, help: "The group (default: the first).")
    var group: String?
    @Option(name: .long, help: "libp11ha.so (default: the one installed beside p11hactl).")
    var module: String?
    @Option(name: .customLong("pin-source"), help: "Read the user PIN from file:PATH (default: prompt).")
    var pinSource: String?
    @Option(name: .long, help: "Seconds per measurement.")
    var seconds: Double = 3
    @Option(name: .long, help: "The thread count compared with 1 thread (default: the number of CPUs).")
    var threads: Int = Int(sysconf(Int32(_SC_NPROCESSORS_ONLN)))
    @Option(name: .long, help: "Any of ecdsa,rsa,aes-gcm,sha256,random,getattr.")
    var ops = "ecdsa,rsa,aes-gcm,sha256,random,getattr"
    @Option(name: .customLong("p11bench"), help: "The p11bench program (default: installed beside p11hactl).")
    var benchProgram: String?

    func run() throws {
        let config = try options.load()
        guard let groupConfig = config.groups.first(where: { group == nil || $0.name == group }),
              let first = groupConfig.members.first(where: { !$0.standby && $0.via == nil }) else {
            printError("p11hactl: no such group, or no local member to compare with")
            throw ExitCode(1)
        }
        // Beside this program's own file (links resolved), as the Makefile installs them.
        let here = executableDirectory()
        let candidates = [here + "/../libexec/p11ha/p11bench", here + "/p11bench", here + "/../p11bench"]
        guard let bench = benchProgram ?? candidates.first(where: { access($0, X_OK) == 0 }) else {
            printError("p11hactl: p11bench not found (looked in \(candidates.joined(separator: ", ")))")
            throw ExitCode(1)
        }
        let p11ha: String = module ?? [here + "/../lib/p11ha/libp11ha.so", here + "/libp11ha.so"].first { access($0, F_OK) == 0 } ?? "libp11ha.so"
        let pin = try readPIN(source: pinSource, prompt: "User PIN for group \(groupConfig.name): ")
        let token = first.uri.tokenLabel ?? ""
        let runs = [("p11ha", p11ha, groupConfig.label), ("direct", first.uri.modulePath, token)]
        var results: [String: [String: [String: String]]] = [:]
        for (name, path, label) in runs {
            let arguments: [String] = ["--module", path, "--token", label, "--threads", "1,\(threads)", "--seconds", String(seconds), "--ops", ops]
            let pinText = pin.withBytes { String(decoding: $0, as: UTF8.self) }
            guard let output = runCapturingOutput(bench, arguments, adding: ["P11BENCH_PIN=" + pinText]) else {
                printError("p11hactl: p11bench on \(name) (\(path), token \(label)) failed")
                throw ExitCode(1)
            }
            for line in output.split(separator: "\n") where line.hasPrefix("RESULT ") {
                var fields: [String: String] = [:]
                for pair in line.dropFirst(7).split(separator: " ") {
                    let kv = pair.split(separator: "=", maxSplits: 1).map(String.init)
                    if kv.count == 2 { fields[kv[0]] = kv[1] }
                }
                results[name, default: [:]]["\(fields["op"] ?? "?") \(fields["threads"] ?? "?")"] = fields
            }
        }
        print("group \(groupConfig.name) through \(p11ha) vs \(token) through \(first.uri.modulePath)")
        print(padded("op", 24) + "threads   direct ops/s   p11ha ops/s   p11ha/direct   direct p50/p99 us   p11ha p50/p99 us")
        for key in (results["direct"] ?? [:]).keys.sorted() {
            guard let d = results["direct"]?[key], let h = results["p11ha"]?[key],
                  let dOps = Double(d["ops_per_s"] ?? ""), let hOps = Double(h["ops_per_s"] ?? "") else { continue }
            let parts = key.split(separator: " ")
            // p50 right-aligned, p99 left-aligned, 8 columns each (printf's %8s/%-8s).
            let latency = { (r: [String: String]) in rightAligned(r["p50_us"] ?? "?", 8) + "/" + padded(r["p99_us"] ?? "?", 8) }
            let latencies = latency(d) + "  " + latency(h)
            print(padded(String(parts[0]), 24) + padded(String(parts[1]), 10) + fixed(dOps, width: 12, decimals: 1) + "  "
                  + fixed(hOps, width: 12, decimals: 1) + "  " + fixed(hOps / dOps, width: 13, decimals: 2) + "   " + latencies)
        }
    }
}

/// The directory of this program's own file, links resolved (/proc/self/exe).
func executableDirectory() -> String {
    var buffer = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
    let n = readlink("/proc/self/exe", &buffer, buffer.count - 1)
    guard n > 0 else { return "." }
    let path = String(decoding: buffer.prefix(n).map { UInt8(bitPattern: $0) }, as: UTF8.self)
    guard let slash = path.lastIndex(of: "/") else { return "." }
    return String(path[..<slash])
}

/// Runs `program` with `arguments`, this process's environment plus `adding`, and returns what it printed on
/// its standard output; nil when it could not start or did not exit 0.
func runCapturingOutput(_ program: String, _ arguments: [String], adding: [String]) -> String? {
    var pipeEnds: [Int32] = [0, 0]
    guard pipe(&pipeEnds) == 0 else { return nil }
    var actions = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&actions)
    defer { posix_spawn_file_actions_destroy(&actions) }
    posix_spawn_file_actions_adddup2(&actions, pipeEnds[1], 1)
    posix_spawn_file_actions_addclose(&actions, pipeEnds[0])
    var environment: [String] = []
    var entry = environ
    while let pointer = entry.pointee {
        environment.append(String(cString: pointer))
        entry += 1
    }
    environment += adding
    let argv = ([program] + arguments).map { strdup($0) } + [nil]
    let envp = environment.map { strdup($0) } + [nil]
    defer {
        for p in argv { free(p) }
        for p in envp {
            if let p { memset(p, 0, strlen(p)) }  // the PIN is among them
            free(p)
        }
    }
    var child = pid_t()
    let spawned = posix_spawn(&child, program, &actions, nil, argv, envp)
    close(pipeEnds[1])
    defer { close(pipeEnds[0]) }
    guard spawned == 0 else { return nil }
    var output: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 65536)
    while true {
        let n = read(pipeEnds[0], &chunk, chunk.count)
        if n > 0 { output += chunk.prefix(n); continue }
        if n < 0 && errno == EINTR { continue }
        break
    }
    var status: Int32 = 0
    while waitpid(child, &status, 0) < 0 && errno == EINTR {}
    // WIFEXITED and WEXITSTATUS: the low 7 bits are 0 when it exited, its status is in the next 8.
    guard status & 0x7f == 0, (status >> 8) & 0xff == 0 else { return nil }
    return String(decoding: output, as: UTF8.self)
}

func printError(_ text: String) {
    let bytes = Array((text + "\n").utf8)
    var done = 0
    while done < bytes.count {
        let n = bytes[done...].withUnsafeBytes { write(2, $0.baseAddress, $0.count) }
        if n <= 0 { if errno == EINTR { continue }; return }
        done += n
    }
}
