// Many writers, one group: writer processes (the driver's `writer` scenario) standing for hosts, each host with its
// own lock-dir and its own view of the members' faults (a fault-control directory of faulty.so per host), write
// through p11ha while members fail for one host or for all and the hosts are partitioned; once every member is back,
// every member must hold exactly what the writers were told (ConvergenceAudit, reading SoftHSM directly).
import Foundation
import Testing

/// Every process scrubs and compacts the records every 3 s whenever every member is in service for it, and keeps
/// tombstones 2 s: compactions run beside the other writers' writes and repairs.
let compactingOften = ["scrub-interval = 3s", "record-retention = 2s"]

@Suite("Multi-writer convergence", .serialized)
struct MultiWriter {
    @Test("two hosts write through a member down for both, a member down for one host only and a partition; once every member is back, each member holds exactly what the writers were told")
    func twoHosts() throws {
        let members = try Members()
        _ = try members.throughFaultModule(extraGlobal: fastRecovery + compactingOften)
        let host1 = try WriterHost("host1", members)
        let host2 = try WriterHost("host2", members)
        let outcome = try runWriters(members, [("h1", host1), ("h2", host2)], seconds: 42, recoveryTimeout: 90, schedule: [
            FaultStep(at: 5, "member-b down for both hosts") { try host1.down("member-b"); try host2.down("member-b") },
            FaultStep(at: 12, "member-b back for both hosts") { try host1.up("member-b"); try host2.up("member-b") },
            FaultStep(at: 16, "member-c down for host1 only (host2 keeps writing to it)") { try host1.down("member-c") },
            FaultStep(at: 24, "member-c back for host1") { try host1.up("member-c") },
            FaultStep(at: 28, "partition: host1 sees only member-a, host2 only member-b and member-c") {
                try host1.down("member-b"); try host1.down("member-c"); try host2.down("member-a")
            },
            FaultStep(at: 36, "partition healed") { try host1.up("member-b"); try host1.up("member-c"); try host2.up("member-a") },
        ])
        outcome.expectConverged()
    }

    @Test("one host, two writer processes sharing its lock-dir, a member away 10 s; once it is back, each member holds exactly what the writers were told")
    func oneHostTwoProcesses() throws {
        let members = try Members()
        _ = try members.throughFaultModule(extraGlobal: fastRecovery + compactingOften)
        let host = try WriterHost("host", members)
        let outcome = try runWriters(members, [("p1", host), ("p2", host)], seconds: 25, recoveryTimeout: 60, schedule: [
            FaultStep(at: 5, "member-b down") { try host.down("member-b") },
            FaultStep(at: 15, "member-b back") { try host.up("member-b") },
        ])
        outcome.expectConverged()
    }

    @Test("the audit is right: nothing after one writer alone; then an acknowledged object deleted from one member, a key from another, a destroyed object put back and a duplicate, each counted")
    func auditCatchesTampering() throws {
        let members = try Members()
        let record = members.dir + "/solo.record"
        var environment = scenarioEnvironment(members)
        environment["P11HA_TEST_WRITER_ID"] = "solo"
        environment["P11HA_TEST_WRITER_SECONDS"] = "6"
        environment["P11HA_TEST_WRITER_RECORD"] = record
        let written = try runProcess(Paths.scenarioDriver, ["writer", Paths.debugModule], environment: environment, timeout: 60)
        try #require(written.status == 0, "the writer failed:\n\(shortOutput(written))")
        let history = WriterHistory(records: [try String(contentsOfFile: record, encoding: .utf8)])

        let before = try ConvergenceAudit(history, inventory(members))
        print("audit of one writer alone, no fault: \(before.figures)")
        #expect(before.isClean, "\(before.report)")
        #expect(history.failures.isEmpty, "a writer alone with no fault saw failures: \(history.failures)")

        let live = history.objects.values.filter { $0.presentLabel != nil }.sorted { $0.name < $1.name }
        let data = live.filter { $0.kind == "data" }
        let key = try #require(live.first { $0.kind != "data" }, "no key lived at the end: \(written.stdout)")
        let destroyed = try #require(history.objects.values.sorted { $0.name < $1.name }
            .first { $0.expected == .absent && $0.kind == "data" }, "no data object was destroyed: \(written.stdout)")
        try #require(data.count >= 2, "fewer than two data objects lived at the end: \(written.stdout)")
        let (deleted, doubled) = (data[0], data[1])

        // Directly on SoftHSM, with another program than the audit's own.
        func tool(_ member: String, _ arguments: [String]) throws {
            let result = try PKCS11Tool(module: Paths.softhsmModule, token: member, members: members)(arguments, login: true)
            try #require(result.status == 0, "pkcs11-tool \(arguments) on \(member) failed:\n\(result.output)")
        }
        func value(_ name: String) throws -> String {
            let path = members.dir + "/\(name).value"
            try Data(name.utf8).write(to: URL(fileURLWithPath: path))
            return path
        }
        try tool("member-b", ["--delete-object", "--type", "data", "--label", deleted.presentLabel!])
        try tool("member-c", ["--delete-object", "--type", "secrkey", "--label", key.presentLabel!])
        try tool("member-c", ["--write-object", try value(destroyed.name), "--type", "data", "--private",
                              "--label", lastLabel(destroyed.name, in: record)])
        try tool("member-a", ["--write-object", try value(doubled.name), "--type", "data", "--private", "--label", doubled.presentLabel!])

        let after = try ConvergenceAudit(history, inventory(members))
        print("audit after tampering: \(after.figures)")
        #expect(after.lost.count == 2, "\(after.report)")
        #expect(after.lost.contains { $0.hasPrefix(deleted.name + " ") && $0.hasSuffix("missing on member-b") }, "\(after.report)")
        #expect(after.lost.contains { $0.hasPrefix(key.name + " ") && $0.hasSuffix("missing on member-c") }, "\(after.report)")
        #expect(after.resurrected.count == 1 && after.resurrected.first?.hasPrefix(destroyed.name + " ") == true, "\(after.report)")
        #expect(after.duplicated.count == 1 && after.duplicated.first?.hasPrefix("member-a holds 2 objects") == true, "\(after.report)")
        #expect(after.divergent.count == 3, "the deleted two and the one put back: \(after.report)")
        #expect(after.staleLabels.isEmpty && after.unknown.isEmpty, "\(after.report)")
    }
}

/// One host of the test: its own p11ha.conf whose lock-dir and log are in a directory of its own (hosts share no
/// file), and its own fault-control directory, so that a member can fail for this host alone.
final class WriterHost {
    let name: String
    let dir: String
    let config: String
    let control: String
    let environment: [String: String]

    /// After `members.throughFaultModule`: its p11ha.conf, with this host's lock-dir and log.
    init(_ name: String, _ members: Members) throws {
        self.name = name
        dir = members.dir + "/" + name
        config = dir + "/p11ha.conf"
        control = dir + "/faults"
        guard mkdir(dir, 0o700) == 0, mkdir(control, 0o700) == 0 else { throw SupportError("mkdir \(dir): errno \(errno)") }
        let text = try String(contentsOfFile: members.p11haConf, encoding: .utf8)
        let lockLine = "lock-dir = \(members.dir)\n", logLine = "log = \(members.logPath)\n"
        guard text.contains(lockLine), text.contains(logLine) else {
            throw SupportError("p11ha.conf lacks \(lockLine) or \(logLine):\n\(text)")
        }
        try text.replacingOccurrences(of: lockLine, with: "lock-dir = \(dir)\n")
            .replacingOccurrences(of: logLine, with: "log = \(dir)/p11ha.log\n")
            .write(toFile: config, atomically: true, encoding: .utf8)
        var environment = scenarioEnvironment(members, base: members.faultEnvironment)
        environment["P11HA_CONF"] = config
        environment["FAULTY_CONTROL"] = control
        self.environment = environment
    }

    /// Every call concerning the member answers CKR_DEVICE_ERROR, as a dead HSM's client does, for this host only.
    func down(_ member: String) throws { try inject("fail CKR_DEVICE_ERROR", into: control, member: member) }
    func up(_ member: String) throws { try inject("ok", into: control, member: member) }

    /// How many times each event of p11ha's log (its word after the level) was logged on this host.
    var logEvents: String {
        let log = (try? String(contentsOfFile: dir + "/p11ha.log", encoding: .utf8)) ?? ""
        var counts: [String: Int] = [:]
        for line in log.split(separator: "\n") {
            guard let colon = line.range(of: ": ") else { continue }
            counts[String(line[colon.upperBound...].prefix { $0 != " " }), default: 0] += 1
        }
        return counts.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " ")
    }
}

/// A change of the members' faults at `at` seconds after the writers started.
struct FaultStep {
    let at: Double
    let what: String
    let apply: () throws -> Void

    init(at: Double, _ what: String, _ apply: @escaping () throws -> Void) {
        self.at = at
        self.what = what
        self.apply = apply
    }
}

/// What a multi-writer run came to.
struct MultiWriterOutcome {
    let audit: ConvergenceAudit
    /// Every member back in service for every writer, and p11hactl status saying the members agree, in time.
    let recovered: Bool
    let writerStatuses: [String: Int32?]
    /// The schedule, the writers' member states and counts, each host's log events.
    let story: String

    /// Prints the story and the figures, and fails with the figures unless the members converged: every member
    /// back and agreeing in time, and then holding exactly what the writers were told.
    func expectConverged() {
        print(story)
        print("multi-writer figures: \(audit.figures)")
        #expect(writerStatuses.values.allSatisfy { $0 == 0 }, "a writer failed or hung: \(writerStatuses)")
        #expect(recovered, "the members did not all come back and agree in time; \(audit.figures)")
        #expect(audit.isClean, "\(audit.report)")
    }
}

/// Starts one writer process per entry (its id, the host whose configuration and faults it uses) for `seconds`,
/// applies the fault schedule, waits (up to `recoveryTimeout`) until every writer sees every member in service and
/// p11hactl status says the members agree, stops the writers and audits the members against their records.
/// Writers write as fast as they can: with 5 ms between writes, the one-host case passed 4 runs in 4 on code that
/// loses objects there; without, it failed 2 in 5 (the races need writes close together).
func runWriters(_ members: Members, _ writers: [(id: String, host: WriterHost)], seconds: Double, recoveryTimeout: Double,
                schedule: [FaultStep]) throws -> MultiWriterOutcome {
    let timeline = Timeline()
    let finish = members.dir + "/writers.finish"
    var started: [(id: String, process: Started, record: String)] = []
    defer { for writer in started { writer.process.killTree() } }
    for (id, host) in writers {
        var environment = host.environment
        environment["P11HA_TEST_WRITER_ID"] = id
        environment["P11HA_TEST_WRITER_SECONDS"] = String(seconds)
        environment["P11HA_TEST_WRITER_RECORD"] = members.dir + "/\(id).record"
        environment["P11HA_TEST_WRITER_FINISH"] = finish
        environment["P11HA_TEST_WRITER_PAUSE_MS"] = "0"
        let process = try Started(Paths.scenarioDriver, ["writer", Paths.debugModule], environment: environment,
                                  output: members.dir + "/\(id).out", errors: members.dir + "/\(id).err")
        started.append((id, process, members.dir + "/\(id).record"))
        timeline.note("writer \(id) started on \(host.name)")
    }
    var hosts: [WriterHost] = []
    for (_, host) in writers where !hosts.contains(where: { $0 === host }) { hosts.append(host) }

    for step in schedule {
        // The schedule's clock: each step is due at its time, checked ten times a second.
        while timeline.elapsed < step.at && started.allSatisfy({ $0.process.isRunning }) { usleep(100_000) }
        try step.apply()
        timeline.note(step.what)
    }
    do {
        try waitUntil("every writer has finished writing", timeout: seconds + 30 - timeline.elapsed, interval: 0.2) {
            started.allSatisfy { !$0.process.isRunning || $0.process.output.contains("writer \($0.id): created") }
        }
        timeline.note("writing ended")
    } catch {
        timeline.note("\(error)")
    }
    for host in hosts { for member in members.tokenLabels { try host.up(member) } }

    // Recovery: every writer's process sees every member in service, and the members agree.
    func lastStates(_ output: String) -> String? {
        output.split(separator: "\n").last { $0.hasPrefix("states ") }.map { String($0.dropFirst("states ".count)) }
    }
    let allInService = members.tokenLabels.map { _ in "0" }.joined(separator: ",")
    let pin = try pinFile(members, "user.pin", members.userPIN)
    var recovered = true
    // Two looks, 3 s apart, both agreeing: one look proves nothing while repairs run (two hosts' catch-ups copied
    // objects to a member both at once just after a status that agreed, and the audit found them twice).
    var agreedAt: Double? = nil
    do {
        // p11hactl logs in to every member: once a second is often enough.
        try waitUntil("every member in service for every writer and p11hactl status saying they agree, twice 3 s apart",
                      timeout: recoveryTimeout, interval: 1) {
            let agree = try started.allSatisfy { $0.process.isRunning && lastStates($0.process.output) == allInService }
                && p11hactl(["status", "--pin-source", pin], members, environment: hosts[0].environment).status == 0
            guard agree else {
                agreedAt = nil
                return false
            }
            guard let first = agreedAt else {
                agreedAt = timeline.elapsed
                return false
            }
            return timeline.elapsed - first >= 3
        }
    } catch {
        recovered = false
        timeline.note("\(error)")
    }
    timeline.note("recovery: " + started.map { "\($0.id) sees \(lastStates($0.process.output) ?? "nothing")" }.joined(separator: ", ")
                  + (recovered ? "; the members agree" : ""))
    if !recovered {
        let status = try p11hactl(["status", "--pin-source", pin], members, environment: hosts[0].environment)
        timeline.note("p11hactl status (exit \(status.status)):\n" + status.stdout)
    }

    guard FileManager.default.createFile(atPath: finish, contents: nil) else { throw SupportError("cannot create \(finish)") }
    var statuses: [String: Int32?] = [:]
    for writer in started {
        let result = writer.process.wait(seconds: 15)
        if result == nil { writer.process.killTree() }
        statuses[writer.id] = result?.status
    }
    timeline.note("writers stopped")

    // A writer that could not start has no record: its exit status fails the test.
    let history = WriterHistory(records: started.map { (try? String(contentsOfFile: $0.record, encoding: .utf8)) ?? "" })
    let audit = try ConvergenceAudit(history, inventory(members))
    var story = "timeline (s since the writers started):\n" + timeline.text
    for writer in started {
        // Member states as the writer saw them, when they changed: the first and last few changes.
        let lines = writer.process.output.split(separator: "\n")
        let changes = lines.filter { $0.hasPrefix("t=") }
        let shown = changes.count <= 12 ? changes : changes.prefix(6) + ["... \(changes.count - 12) more ..."] + changes.suffix(6)
        let said = lines.filter { $0.hasPrefix("writer ") || $0.hasPrefix("FAIL") || $0.hasPrefix("FATAL") }
        story += "\n\(writer.id): " + (said + ["member states changed \(changes.count) times:"] + shown).joined(separator: "\n  ")
        let errors = writer.process.errorOutput
        if !errors.isEmpty { story += "\n\(writer.id) stderr: " + errors.split(separator: "\n").suffix(10).joined(separator: "\n  ") }
    }
    for host in hosts { story += "\n\(host.name) log events: \(host.logEvents)" }
    try keepArtifacts(members)
    return MultiWriterOutcome(audit: audit, recovered: recovered, writerStatuses: statuses, story: story)
}

/// With P11HA_TEST_KEEP=DIR, a copy of the members' directory (tokens, each host's configuration and log, the
/// writers' records and output) into DIR, for a look at a failed run by hand.
func keepArtifacts(_ members: Members) throws {
    guard let keep = ProcessInfo.processInfo.environment["P11HA_TEST_KEEP"], !keep.isEmpty else { return }
    try FileManager.default.createDirectory(atPath: keep, withIntermediateDirectories: true)
    let copied = try runProcess("cp", ["-a", members.dir, keep + "/"])
    guard copied.status == 0 else { throw SupportError("cp -a \(members.dir) \(keep) failed:\n\(copied.output)") }
    print("kept \(members.dir) in \(keep)")
}

/// Every member's objects, read directly from SoftHSM by the driver's member-inventory scenario.
func inventory(_ members: Members) throws -> [String: [HeldObject]] {
    let listed = try scenario("member-inventory", members, module: Paths.softhsmModule)
    guard listed.status == 0 else { throw SupportError("member-inventory failed:\n\(shortOutput(listed))") }
    return try readInventory(listed.stdout, members: members.tokenLabels)
}

/// The label `name` had when it was destroyed, from a writer's record.
private func lastLabel(_ name: String, in record: String) throws -> String {
    let text = try String(contentsOfFile: record, encoding: .utf8)
    guard let line = text.split(separator: "\n").last(where: { $0.hasPrefix("ok destroy \(name) ") }) else {
        throw SupportError("\(name) was not destroyed")
    }
    return String(line.split(separator: " ")[3])
}

extension WriterHistory.Object {
    /// The label it must have on every member, if it must be on every member.
    var presentLabel: String? { if case .present(let label) = expected { label } else { nil } }
}
