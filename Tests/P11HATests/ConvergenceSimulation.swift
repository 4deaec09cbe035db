// Seeded runs of several hosts, each its own p11ha process, writing to the same members through member and link
// faults, partitions, briefly inconsistent searches and heals: after every full heal, and at the end, the members
// hold exactly what the writes' CKR_OK promised. Each seed runs on one thread (no deadline workers, recovery driven
// by the run), so it replays exactly: SWIFT_DETERMINISTIC_HASHING=1 P11HA_SEED=N swift test --filter
// ConvergenceSimulation, or scripts/simulate --seed N (scripts/simulate also runs many more seeds).
import CInterop
import Dispatch
import Glibc
@testable import P11HA
import P11HAFake
import Synchronization
import Testing

/// The seeds: P11HA_SEED=N runs that one and tells its story with p11ha's log; otherwise P11HA_SEEDS (default
/// 10,000) seeds from P11HA_FIRST_SEED (default 1).
let convergenceSeeds: [UInt64] = {
    if let one = environmentNumber("P11HA_SEED") { return [one] }
    let first = environmentNumber("P11HA_FIRST_SEED") ?? 1
    let count = max(1, environmentNumber("P11HA_SEEDS") ?? 10_000)
    return Array(first..<(first + count))
}()

/// How many seeds run side by side (P11HA_SIM_WORKERS; default the processors online, at most 4). Each seed runs
/// on one thread from start to end, with members and hosts of its own, so this changes no seed's run.
let simulationWorkers: Int = {
    if let workers = environmentNumber("P11HA_SIM_WORKERS") { return max(1, Int(workers)) }
    return max(1, min(4, sysconf(Int32(_SC_NPROCESSORS_ONLN))))
}()

/// P11HA_SIM_HIDINGS=0 leaves out objects missing from searches (the draws stay, so the other steps are the same):
/// to tell failures of replication between writers from those of searches that miss objects.
let simulationHidings = environmentNumber("P11HA_SIM_HIDINGS") != 0

/// P11HA_SIM_STALE_INDEXES=1: every member's store keeps SoftHSM's per-process indexes (`FakeTokenStore.staleIndexes`).
let simulationStaleIndexes = environmentNumber("P11HA_SIM_STALE_INDEXES") == 1

/// Whether this process hashes with a fixed seed: p11ha iterates dictionaries in places (a repair pairs a member's
/// objects fingerprint by fingerprint, in a dictionary's order), and without it that order changes from process
/// to process and from dictionary to dictionary, so that a seed's run may differ.
let deterministicHashing = getenv("SWIFT_DETERMINISTIC_HASHING") != nil

func environmentNumber(_ name: String) -> UInt64? { getenv(name).flatMap { UInt64(String(cString: $0)) } }

@Suite struct ConvergenceSimulation {
    /// One seed's end: its broken guarantees' kinds (none when it held), its story when told, and its fingerprint
    /// when asked for.
    struct SeedOutcome: Sendable {
        let seed: UInt64
        let kinds: [String]
        let report: String?
        let fingerprint: UInt64?
    }

    @Test("hosts that write to the same members through faults and partitions leave them, after every heal, holding each acknowledged object once under its acknowledged label, and no acknowledged destroy")
    func manyHostsConverge() throws {
        let replaying = convergenceSeeds.count == 1
        let workers = replaying ? 1 : min(simulationWorkers, convergenceSeeds.count)
        let outcomes = Synchronization.Mutex<[SeedOutcome]>([])
        let errors = Synchronization.Mutex<[String]>([])
        // One line per seed, to compare two runs (another process, other workers) seed by seed.
        let fingerprints = getenv("P11HA_SIM_FINGERPRINTS").map { String(cString: $0) }
        let start = monotonicNanos()
        DispatchQueue.concurrentPerform(iterations: workers) { worker in
            do {
                let place = try SimulationPlace()
                var told = 0
                for index in stride(from: worker, to: convergenceSeeds.count, by: workers) {
                    let seed = convergenceSeeds[index]
                    let simulation = try Simulation(seed: seed, place: place, logLevel: replaying ? .debug : .error)
                    let problems = simulation.run()
                    // P11HA_SIM_KEEP_LOG=PATH: a replayed seed's log is kept there even when it passes (to see
                    // where a slow seed spends its time).
                    if replaying, let keep = getenv("P11HA_SIM_KEEP_LOG") { _ = try? place.log().write(toFile: String(cString: keep), atomically: false, encoding: .utf8) }
                    // The first few failures of each worker are told in full (the smallest seeds among them are shown);
                    // the rest are counted.
                    var report: String? = nil
                    if !problems.isEmpty && (told < 3 || replaying) {
                        told += 1
                        report = simulation.report(problems) + (replaying ? "\n--- p11ha log (every host) ---\n" + place.log() : "")
                    }
                    let outcome = SeedOutcome(seed: seed, kinds: Set(problems.map(\.kind)).sorted(), report: report,
                                              fingerprint: fingerprints == nil ? nil : simulation.fingerprint)
                    outcomes.withLock { $0.append(outcome) }
                }
            } catch {
                errors.withLock { $0.append("worker \(worker): \(error)") }
            }
        }
        let seconds = Double(monotonicNanos() - start) / 1e9
        #expect(errors.withLock { $0 }.isEmpty, "\(errors.withLock { $0 })")
        let all = outcomes.withLock { $0 }.sorted { $0.seed < $1.seed }
        if let path = fingerprints {
            let text = all.map { "\($0.seed) \(String($0.fingerprint ?? 0, radix: 16)) \($0.kinds.joined(separator: ","))\n" }.joined()
            let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
            if fd >= 0 {
                _ = Array(text.utf8).withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
                close(fd)
            }
        }
        let failed = all.filter { !$0.kinds.isEmpty }
        var kindCounts: [String: Int] = [:]
        for outcome in failed { for kind in outcome.kinds { kindCounts[kind, default: 0] += 1 } }
        let summary = "\(failed.count) of \(all.count) seeds failed; \(String(format: "%.1f", seconds)) s, "
            + "\(String(format: "%.0f", Double(all.count) / seconds)) seeds/s with \(workers) worker\(workers == 1 ? "" : "s")"
            + (failed.isEmpty ? "" : "; seeds failing by kind: " + kindCounts.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", "))
        print("ConvergenceSimulation: " + summary)
        if !failed.isEmpty {
            print("ConvergenceSimulation: failing seeds: " + failed.prefix(200).map { String($0.seed) }.joined(separator: " ")
                  + (failed.count > 200 ? " ..." : ""))
        }
        let detail = "\(summary)\n\(failed.compactMap(\.report).prefix(3).joined(separator: "\n\n"))"
        // Every seed must hold: 0 of seeds 1-40,000 failed before compaction, 0 of 1-10,000 with it.
        #expect(failed.isEmpty, Comment(rawValue: detail))
    }

    /// Only with SWIFT_DETERMINISTIC_HASHING: Swift seeds each dictionary's hashing afresh (per process, and per
    /// dictionary storage within one), and p11ha's order of some member calls follows a dictionary's (a repair's
    /// pairing and copies): then even one process's two runs of a seed can make the same steps with the same
    /// answers, yet leave objects at other object numbers.
    @Test("a seed replays exactly: the same steps, answers and members' contents twice over",
          .enabled(if: deterministicHashing, "SWIFT_DETERMINISTIC_HASHING=1 (scripts/simulate sets it)"))
    func seedsReplay() throws {
        let place = try SimulationPlace()
        for seed: UInt64 in 1...20 {
            let first = try Simulation(seed: seed, place: place, logLevel: .error)
            _ = first.run()
            let second = try Simulation(seed: seed, place: place, logLevel: .error)
            _ = second.run()
            #expect(first.story == second.story, "seed \(seed)")
            #expect(first.contents == second.contents, "seed \(seed)")
        }
    }
}

/// The checker, shown a converged group and then one member changed behind p11ha's back, must say what broke.
@Suite struct ConvergenceCheckCatchesDivergence {
    /// Two hosts, three members, no fault: one creates, the other finds and renames, the first destroys one.
    /// Returns the run with every member in agreement (checked), for a test to break.
    func convergedRun() throws -> (Simulation, keep: Int, gone: Int) {
        let simulation = try Simulation(seed: 7, hosts: 2, members: 3, place: try SimulationPlace(), logLevel: .error)
        let (a, b) = (simulation.hosts[0], simulation.hosts[1])
        let keep = try #require(simulation.create(.data, on: a))
        let gone = try #require(simulation.create(.hmac, on: a))
        _ = try #require(simulation.create(.generated, on: b))
        simulation.find(simulation.ledger.newestLabel(keep), on: b)
        simulation.rename(keep, on: b)
        simulation.destroy(gone, on: a)
        #expect(simulation.ledger.entries[keep].namings.last?.acknowledged == true)
        #expect(simulation.ledger.entries[gone].destroyedAt != nil)
        let problems = simulation.heal()
        #expect(problems.isEmpty, "\(problems)")
        return (simulation, keep, gone)
    }

    @Test("an acknowledged object deleted from one member behind p11ha's back is reported lost")
    func lostObject() throws {
        let (simulation, keep, _) = try convergedRun()
        try simulation.behindTheBack(member: 1) { token, session in
            for object in try token.findObjects(session, simulation.labelTemplate(simulation.ledger.newestLabel(keep))) {
                try token.destroyObject(session, object)
            }
        }
        let problems = simulation.check()
        #expect(problems.map(\.kind) == ["lost"], "\(problems)")
        #expect(problems.first?.detail.contains("member 1") == true)
    }

    @Test("an object destroyed with CKR_OK and put back on one member is reported")
    func resurrectedObject() throws {
        let (simulation, _, gone) = try convergedRun()
        try simulation.behindTheBack(member: 2) { token, session in
            _ = try token.createObject(session, hmacKey(simulation.ledger.newestLabel(gone)))
        }
        #expect(simulation.check().map(\.kind) == ["destroyed-but-present"])
    }

    @Test("a second copy of an object on one member is reported, as a duplicate copy and a duplicate label")
    func duplicatedObject() throws {
        let (simulation, keep, _) = try convergedRun()
        let value = try #require(simulation.ledger.entries[keep].value)
        try simulation.behindTheBack(member: 0) { token, session in
            _ = try token.createObject(session, dataObject(simulation.ledger.newestLabel(keep), value: value))
        }
        #expect(simulation.check().map(\.kind) == ["duplicate-label", "duplicate-copy"])
    }

    @Test("a member left with the label from before an acknowledged rename is reported")
    func staleLabel() throws {
        let (simulation, keep, _) = try convergedRun()
        try simulation.behindTheBack(member: 2) { token, session in
            for object in try token.findObjects(session, simulation.labelTemplate(simulation.ledger.newestLabel(keep))) {
                try token.setAttributeValues(session, object, simulation.labelTemplate(simulation.ledger.entries[keep].namings[0].label))
            }
        }
        #expect(simulation.check().map(\.kind) == ["labels-differ"])
    }

    @Test("every member left with the label from before an acknowledged rename is reported")
    func labelRolledBackEverywhere() throws {
        let (simulation, keep, _) = try convergedRun()
        for member in 0..<3 {
            try simulation.behindTheBack(member: member) { token, session in
                for object in try token.findObjects(session, simulation.labelTemplate(simulation.ledger.newestLabel(keep))) {
                    try token.setAttributeValues(session, object, simulation.labelTemplate(simulation.ledger.entries[keep].namings[0].label))
                }
            }
        }
        #expect(simulation.check().map(\.kind) == ["stale-label"])
    }

    @Test("concurrent renames by two hosts with no heal between them: either label, as long as every member agrees")
    func concurrentRenames() {
        var ledger = Ledger()
        let number = ledger.created(.data, label: "obj-1", value: [1], acknowledged: true, host: 0, step: 1)
        ledger.renamed(number, to: "ren-2", acknowledged: true, host: 0, step: 2)
        ledger.renamed(number, to: "ren-3", acknowledged: true, host: 1, step: 3)
        ledger.renamed(number, to: "ren-4", acknowledged: false, host: 1, step: 4)
        #expect(ledger.acceptableLabels(ledger.entries[number]) == ["ren-2", "ren-3"])
        ledger.renamed(number, to: "ren-5", acknowledged: true, host: 0, step: 5)
        #expect(ledger.acceptableLabels(ledger.entries[number]) == ["ren-3", "ren-5"], "host 0's own later rename supersedes its first")
        ledger.heals += 1
        ledger.renamed(number, to: "ren-6", acknowledged: true, host: 1, step: 6)
        #expect(ledger.acceptableLabels(ledger.entries[number]) == ["ren-6"], "a full heal orders everything before it")
    }
}

/// Where a run's hosts keep their files: one lock directory per host (reused, emptied, from seed to seed: making
/// and removing directories costs more than a short run) and the process-wide log.
final class SimulationPlace {
    static let maxHosts = 5
    let path: String
    var hostDirectories: [String] { (0..<Self.maxHosts).map { "\(path)/host-\($0)" } }
    var logPath: String { path + "/p11ha.log" }
    private var configs: [String: Config] = [:]

    init() throws {
        // In memory where the machine has it: p11ha replaces its status file at every member's failure and return,
        // and a disk file system makes that most of a run's time.
        let parent = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp"
        var template = Array("\(parent)/p11ha-sim.XXXXXX".utf8CString)
        guard let made = template.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!) }) else { throw TestFailure("mkdtemp") }
        path = String(cString: made)
        for directory in hostDirectories where mkdir(directory, 0o700) != 0 { throw TestFailure("mkdir \(directory): \(errnoText())") }
    }

    deinit {
        for directory in hostDirectories {
            emptyDirectory(directory)
            rmdir(directory)
        }
        unlink(logPath)
        rmdir(path)
    }

    /// Host `host`'s configuration for `members`: the same text from seed to seed, so parsed once.
    func config(host: Int, members: [FakeTokenStore], logLevel: LogLevel) throws -> Config {
        let key = "\(host) \(members.map(\.label)) \(logLevel.name)"
        if let config = configs[key] { return config }
        let config = try SimulatedHost.config(members: members, directory: hostDirectories[host], log: logPath, logLevel: logLevel)
        configs[key] = config
        return config
    }

    /// Starts the log afresh (a replayed seed's log holds that seed alone).
    func clearLog() { truncate(logPath, 0) }

    func log() -> String { (try? readWholeFile(logPath)).map { String(decoding: $0, as: UTF8.self) } ?? "" }
}

/// One seeded run: hosts and members drawn from the seed, then steps drawn from it, each on a random host.
final class Simulation {
    let seed: UInt64
    /// The hosts' lock directories and log: kept while the hosts may use them.
    private let place: SimulationPlace
    private var random: SplitMix64
    let stores: [FakeTokenStore]
    private(set) var hosts: [SimulatedHost] = []
    private(set) var ledger = Ledger()
    /// What happened, one line per step: printed when the seed fails.
    private(set) var story: [String] = []
    let hostCount: Int
    private let steps: Int
    /// Whether the hosts scrub and compact every 3 s (else once per heal).
    private let compactsOften: Bool
    private var step = 0
    /// Moves a quarter of a second per step: stamps differ from step to step, and a lease (30 s) left behind by a
    /// failed release expires within a run of 240 steps or so.
    private let clock = SimulatedClock()
    private let tellsP11HALog: Bool

    /// - hosts, members: nil draws them from the seed (2–5 hosts, 2–4 members).
    init(seed: UInt64, hosts hostCount: Int? = nil, members memberCount: Int? = nil, place: SimulationPlace, logLevel: LogLevel) throws {
        self.seed = seed
        self.place = place
        var random = SplitMix64(seed: seed)
        let hostCount = hostCount ?? 2 + random.below(4)
        self.hostCount = hostCount
        let memberCount = memberCount ?? 2 + random.below(3)
        steps = 20 + random.below(41)
        // Tombstones kept 1 s only, so that every compaction (ReplicaKeeper.compact) removes all it may; half the
        // seeds compact (and scrub) every 3 s (12 steps), under the faults of the steps, the others at their heals only.
        compactsOften = random.below(2) == 0
        stores = (0..<memberCount).map { FakeTokenStore(label: "member-\($0)", serial: "SIMULATED\($0)", seed: random.next(),
                                                         staleIndexes: simulationStaleIndexes) }
        self.random = random
        tellsP11HALog = logLevel <= .info
        try FakeGroup.setUpReplicationKey(on: stores)
        if tellsP11HALog { place.clearLog() }
        for (number, directory) in place.hostDirectories.prefix(hostCount).enumerated() {
            emptyDirectory(directory)
            var config = try place.config(host: number, members: stores, logLevel: logLevel)
            config.recordRetention = .seconds(1)
            _ = compactsOften
            hosts.append(try SimulatedHost(number: number, stores: stores, config: config, clock: clock))
        }
        for host in hosts { logIn(host) }
    }

    deinit { finish() }

    /// Runs every step; a full heal after any step may stop the run with the problems it found. Ends with a full
    /// heal, and the hosts' processes end. Returns the problems (none when every guarantee held).
    func run() -> [ConvergenceCheck.Problem] {
        defer { finish() }
        while step < steps {
            step += 1
            clock.advance(by: 250)
            if let problems = randomStep(), !problems.isEmpty { return problems }
        }
        step += 1
        return heal()
    }

    /// The hosts' processes end (C_Finalize); the members stay for the check.
    func finish() {
        for host in hosts { host.shutdown() }
        hosts = []
    }

    /// The failure as a person replaying it wants to read it.
    func report(_ problems: [ConvergenceCheck.Problem]) -> String {
        """
        seed \(seed): \(hostCount) hosts, \(stores.count) members, \(steps) steps, \(compactsOften ? "compacting every 3 s" : "compacting at heals"), fingerprint \(String(fingerprint, radix: 16))
        replay: SWIFT_DETERMINISTIC_HASHING=1 \(simulationHidings ? "" : "P11HA_SIM_HIDINGS=0 ")\(simulationStaleIndexes ? "P11HA_SIM_STALE_INDEXES=1 " : "")P11HA_SEED=\(seed) swift test --skip-build --filter ConvergenceSimulation/manyHostsConverge\(deterministicHashing ? "" : "\n(this run hashed with a random seed: a replay makes the same steps, but p11ha may order some calls differently)")
        \(problems.prefix(12).map { "  ✗ \($0)" }.joined(separator: "\n"))\(problems.count > 12 ? "\n  ... \(problems.count - 12) more" : "")
        story:
        \(story.joined(separator: "\n"))
        """
    }

    /// The run in one word: its story and the members' contents (FNV-1a), to compare two runs of a seed.
    var fingerprint: UInt64 {
        var hash: UInt64 = 0xCBF2_9CE4_8422_2325
        for line in story + contents.joined() {
            for byte in line.utf8 { hash = (hash ^ UInt64(byte)) &* 0x0000_0100_0000_01B3 }
            hash = (hash ^ 0x0A) &* 0x0000_0100_0000_01B3
        }
        return hash
    }

    /// Every member's objects as the check sees them, for comparing two runs of one seed.
    var contents: [[String]] {
        stores.map { store in
            store.tokenObjects().map { object in object.sorted { $0.type < $1.type }.map { "\($0.type)=\($0.value)" }.joined(separator: ",") }
        }
    }

    // MARK: steps

    private func randomStep() -> [ConvergenceCheck.Problem]? {
        let host = hosts[random.below(hosts.count)]
        let member = random.below(stores.count)
        switch random.below(100) {
        case 0..<14: create(.data, on: host)
        case 14..<19: create(.hmac, on: host)
        case 19..<24: create(.aes, on: host)
        case 24..<30: create(.generated, on: host)
        case 30..<39:
            guard let number = host.known.keys.sorted().randomElement(using: &random) else { break }
            destroy(number, on: host)
        case 39..<48:
            guard let number = host.known.keys.sorted().randomElement(using: &random) else { break }
            rename(number, on: host)
        case 48..<52:
            guard !ledger.entries.isEmpty else { break }
            find(ledger.newestLabel(random.below(ledger.entries.count)), on: host)
        case 52..<55: findAll(on: host)
        case 55..<58:
            note("member \(member) crashes (for every host)")
            stores[member].faults.crash()
        case 58..<60:
            note("member \(member) answers CKR_DEVICE_ERROR to every call (for every host)")
            stores[member].faults.inject(.error(CK_RV(CKR_DEVICE_ERROR)))
        case 60..<64:
            let calls: [FakeCall] = [.createObject, .destroyObject, .setAttributeValues, .findObjects, .attributeValues,
                                     .generateKey, .wrapKey, .unwrapKey, .openSession, .login]
            let call = calls[random.below(calls.count)]
            let times = 1 + random.below(3)
            if random.below(2) == 0 {
                note("member \(member) answers CKR_DEVICE_ERROR to its next \(times) \(call) calls (from any host)")
                stores[member].faults.inject(.error(CK_RV(CKR_DEVICE_ERROR)), on: [call], times: times)
            } else {
                note("host \(host.number)'s link to member \(member) answers CKR_DEVICE_ERROR to its next \(times) \(call) calls")
                host.links[member].faults.inject(.error(CK_RV(CKR_DEVICE_ERROR)), on: [call], times: times)
            }
        case 64..<66:
            note("host \(host.number)'s link to member \(member) goes down")
            host.links[member].faults.crash()
        case 66..<68:
            note("host \(host.number)'s link to member \(member) answers CKR_DEVICE_ERROR to every call")
            host.links[member].faults.inject(.error(CK_RV(CKR_DEVICE_ERROR)))
        case 68..<71: partition()
        case 71..<74:
            note("member \(member) comes back (revived, faults and hidings cleared)")
            stores[member].faults.clearFaults()
            stores[member].faults.revive()
            stores[member].clearHiddenObjects()
        case 74..<76:
            note("host \(host.number)'s links come back")
            for link in host.links {
                link.faults.clearFaults()
                link.faults.revive()
            }
        case 76..<80: hide(on: member)
        case 80..<91:
            let before = host.healthText
            _ = host.runtime.recovery.recoverMembers()
            note("host \(host.number) recovery pass: members \(before) -> \(host.healthText)")
        case 91..<93:
            note("host \(host.number) restarts (a new process: no handle known)")
            do {
                try host.restart()
            } catch {
                note("  restart failed: \(error)")
            }
            logIn(host)
        default:
            return heal()
        }
        return nil
    }

    /// The host's session, logging in first if it has none; nil (noted) when it cannot.
    private func session(of host: SimulatedHost) -> SessionHandle? {
        if host.session == nil { logIn(host) }
        return host.session
    }

    private func logIn(_ host: SimulatedHost) {
        guard host.session == nil else { return }
        if let rv = host.logIn() { note("host \(host.number) cannot log in: \(ckrName(rv))") }
    }

    /// A create on `host`, by value or generated; returns the object's ledger number when it answered CKR_OK.
    @discardableResult
    func create(_ kind: Ledger.Kind, on host: SimulatedHost) -> Int? {
        guard let session = session(of: host) else { return nil }
        let prefix = ["obj", "hmac", "aes", "gen"][[Ledger.Kind.data, .hmac, .aes, .generated].firstIndex(of: kind)!]
        let label = ledger.newLabel(prefix)
        var value: [UInt8]? = nil
        let made: Result<ObjectHandle, P11Error>
        switch kind {
        case .data:
            value = randomBytes(8)
            made = Result { () throws(P11Error) in try host.runtime.createObject(session, dataObject(label, value: value!)) }
        case .hmac:
            value = randomBytes(32)
            made = Result { () throws(P11Error) in try host.runtime.createObject(session, secretKey(label, CKK_GENERIC_SECRET, value: value!)) }
        case .aes:
            value = randomBytes(random.below(2) == 0 ? 16 : 32)
            made = Result { () throws(P11Error) in try host.runtime.createObject(session, secretKey(label, CKK_AES, value: value!)) }
        case .generated:
            let aes = random.below(2) == 0
            let mechanism = Mechanism(CK_MECHANISM_TYPE(aes ? CKM_AES_KEY_GEN : CKM_GENERIC_SECRET_KEY_GEN))
            made = Result { () throws(P11Error) in
                try host.runtime.generateKey(session, mechanism, secretKey(label, aes ? CKK_AES : CKK_GENERIC_SECRET, value: nil))
            }
        }
        switch made {
        case .success(let handle):
            if kind == .generated {
                // The application cannot read a sensitive key's value; the test can, on a member holding the key the
                // application's handle names (not any object of that label: a generation that failed over can leave
                // a half-made key of the same label on its first member until that member returns).
                let copies = host.runtime.groups[0].objects.withLock { $0.records[handle]?.copies } ?? []
                value = copies.enumerated().lazy.compactMap { member, copy in
                    copy.flatMap { host.links[member].tokenObject($0)?[CK_ATTRIBUTE_TYPE(CKA_VALUE)]?.value }
                }.first
            }
            let number = ledger.created(kind, label: label, value: value, acknowledged: true, host: host.number, step: step)
            host.known[number] = handle
            note("host \(host.number) creates \(kind.rawValue) \"\(label)\" (#\(number)): CKR_OK \(host.healthText)")
            return number
        case .failure(let error):
            let number = ledger.created(kind, label: label, value: value, acknowledged: false, host: host.number, step: step)
            note("host \(host.number) creates \(kind.rawValue) \"\(label)\" (#\(number)): \(ckrName(error.rv)) \(host.healthText)")
            return nil
        }
    }

    func destroy(_ number: Int, on host: SimulatedHost) {
        guard let session = session(of: host), let handle = host.known[number] else { return }
        do {
            try host.runtime.destroyObject(session, handle)
            host.known[number] = nil
            if ledger.entries[number].destroyedAt == nil { ledger.entries[number].destroyedAt = step }
            note("host \(host.number) destroys #\(number): CKR_OK \(host.healthText)")
        } catch {
            note("host \(host.number) destroys #\(number): \(ckrName(error.rv)) \(host.healthText)")
        }
    }

    func rename(_ number: Int, on host: SimulatedHost) {
        guard let session = session(of: host), let handle = host.known[number] else { return }
        let label = ledger.newLabel("ren")
        do {
            try host.runtime.setAttributeValues(session, handle, labelTemplate(label))
            ledger.renamed(number, to: label, acknowledged: true, host: host.number, step: step)
            note("host \(host.number) renames #\(number) \"\(label)\": CKR_OK \(host.healthText)")
        } catch {
            ledger.renamed(number, to: label, acknowledged: false, host: host.number, step: step)
            note("host \(host.number) renames #\(number) \"\(label)\": \(ckrName(error.rv)) \(host.healthText)")
        }
    }

    /// A search by label: the host learns the handle of what it finds.
    func find(_ label: String, on host: SimulatedHost) {
        guard let session = session(of: host), let number = ledger.owners[label] else { return }
        switch search(labelTemplate(label), on: host, session) {
        case .success(let found):
            if let handle = found.first { host.known[number] = handle }
            note("host \(host.number) searches \"\(label)\" (#\(number)): \(found.count) found")
        case .failure(let error):
            note("host \(host.number) searches \"\(label)\" (#\(number)): \(ckrName(error.rv))")
        }
    }

    /// A search for every token object; the host reads each one's label to tell what it found.
    private func findAll(on host: SimulatedHost) {
        guard let session = session(of: host) else { return }
        switch search([Attribute(CKA_TOKEN, bool: true)], on: host, session) {
        case .success(let found):
            var learnt: [String] = []
            for handle in found {
                guard let answer = try? host.runtime.attributeValues(session, handle, [AttributeQuery(CK_ATTRIBUTE_TYPE(CKA_LABEL), capacity: 256)]),
                      answer.rv == CKR_OK, let bytes = answer.answers.first?.value else { continue }
                let label = String(decoding: bytes, as: UTF8.self)
                guard let number = ledger.owners[label] else { continue }
                host.known[number] = handle
                learnt.append("#\(number)")
            }
            note("host \(host.number) searches every token object: \(found.count) found, labels read of \(learnt)")
        case .failure(let error):
            note("host \(host.number) searches every token object: \(ckrName(error.rv))")
        }
    }

    private func search(_ template: [Attribute], on host: SimulatedHost, _ session: SessionHandle) -> Result<[ObjectHandle], P11Error> {
        Result { () throws(P11Error) in
            try host.runtime.findObjectsInit(session, template)
            defer { try? host.runtime.findObjectsFinal(session) }
            return try host.runtime.findObjects(session, max: 256)
        }
    }

    /// Some hosts lose some members (their links go down, or answer errors) until a heal.
    private func partition() {
        let cut = randomSubset(hosts.count)
        let lost = randomSubset(stores.count)
        let down = random.below(2) == 0
        note("partition: hosts \(cut) lose members \(lost) (\(down ? "links down" : "links answer CKR_DEVICE_ERROR"))")
        for h in cut {
            for m in lost {
                if down { hosts[h].links[m].faults.crash() } else { hosts[h].links[m].faults.inject(.error(CK_RV(CKR_DEVICE_ERROR))) }
            }
        }
    }

    /// Objects briefly missing from a member's search results, for every host, as SoftHSM's file store shows them
    /// while another process rewrites them: one object, all data objects (journals too), all secret keys (the
    /// replication key too), or everything.
    private func hide(on member: Int) {
        let choice = random.below(4)
        let searches = 1 + random.below(3)
        let probability = random.below(2) == 0 ? 1.0 : 0.5
        var template: [Attribute] = []
        var what = "every object"
        switch choice {
        case 0 where !ledger.entries.isEmpty:
            let label = ledger.newestLabel(random.below(ledger.entries.count))
            template = labelTemplate(label)
            what = "\"\(label)\""
        case 1:
            template = [Attribute(CKA_CLASS, ulong: CKO_DATA)]
            what = "data objects"
        case 2:
            template = [Attribute(CKA_CLASS, ulong: CKO_SECRET_KEY)]
            what = "secret keys"
        default: break
        }
        guard simulationHidings else { return }
        note("member \(member) hides \(what) from its next \(searches) searches (each with probability \(probability))")
        stores[member].hideObjects(matching: template, forSearches: searches, probability: probability)
    }

    // MARK: heal and check

    /// Clears every fault, then lets each host run recovery passes until every host has every member in service,
    /// ten rounds at most; then checks the members. (A host that never called a member while it was down still
    /// counts it in service: it has nothing to bring back, and it learns of a restarted link at its next call.)
    func heal() -> [ConvergenceCheck.Problem] {
        for store in stores {
            store.faults.clearFaults()
            store.faults.revive()
            store.clearHiddenObjects()
        }
        for link in hosts.flatMap(\.links) {
            link.faults.clearFaults()
            link.faults.revive()
        }
        var rounds = 0
        var settled = false
        while !settled && rounds < 10 {
            rounds += 1
            // The applications are back too: one that could not log in while members failed logs in now (private
            // objects and records are visible, and so repairable, only to a process logged in).
            for host in hosts { logIn(host) }
            // Time passes as in a real heal: each process looks at the members' records (its watch interval); the
            // first round lasts a scrub interval, so that each process looks at every object of every member too
            // (the guarantees hold once the members have been in service together that long).
            let worker = hosts[0].runtime.recovery.worker
            var pause = UInt64((rounds == 1 ? worker.scrubInterval : worker.watchInterval).milliseconds)
            // A process that waits before it sets back a value (one that may be a write under way: `Group.settles`)
            // has asked for a catch-up at a set time: time passes until then too.
            let now = clock.milliseconds
            if let due = hosts.map({ $0.runtime.groups[0].catchUpAgainAt.load(ordering: .acquiring) }).filter({ $0 > now }).min() {
                pause = max(pause, due - now)
            }
            clock.advance(by: pause)
            for host in hosts {
                // Which host's pass the log lines below come from (a replay's log is every host's).
                if tellsP11HALog { Log.event(.info, "simulation-pass", "host \(host.number), heal round \(rounds)") }
                _ = host.runtime.recovery.recoverMembers()
            }
            settled = hosts.allSatisfy { $0.session != nil && $0.membersOutOfService.isEmpty
                && !$0.runtime.groups[0].catchUpWanted.load(ordering: .acquiring) && !$0.runtime.groups[0].watchWanted.load(ordering: .acquiring)
                && $0.runtime.groups[0].catchUpAgainAt.load(ordering: .acquiring) == 0 }
        }
        ledger.heals += 1
        note("full heal \(ledger.heals): \(rounds) rounds; members by host: \(hosts.map(\.healthText))")
        var problems: [ConvergenceCheck.Problem] = []
        for host in hosts where !host.membersOutOfService.isEmpty {
            problems.append(.init(kind: "not-in-service",
                                  detail: "after 10 recovery rounds host \(host.number) still has members \(host.membersOutOfService) out of service (\(host.healthText))"))
        }
        return problems + check()
    }

    func check() -> [ConvergenceCheck.Problem] { ConvergenceCheck.problems(stores: stores, ledger: ledger) }

    /// Changes a member directly, not through p11ha: for tests of the check itself.
    func behindTheBack(member: Int, _ change: (FakeToken, MemberSession) throws -> Void) throws {
        let token = stores[member].connection()
        try token.connect()
        defer { token.disconnect() }
        let session = try token.openSession(readWrite: true)
        try token.login(session, userType: CK_USER_TYPE(CKU_USER), pin: Secret(FakeGroup.userPIN))
        try change(token, session)
    }

    // MARK: helpers

    private func note(_ line: String) {
        let text = "\(String(repeating: " ", count: max(0, 3 - String(step).count)))\(step) \(line)"
        story.append(text)
        if tellsP11HALog { Log.event(.info, "simulation-step", text) }
    }

    func labelTemplate(_ label: String) -> [Attribute] { [Attribute(CKA_LABEL, Array(label.utf8))] }

    private func randomBytes(_ count: Int) -> [UInt8] {
        (0..<count).map { _ in UInt8(truncatingIfNeeded: random.next()) }
    }

    /// A non-empty subset of 0..<n, sorted.
    private func randomSubset(_ n: Int) -> [Int] {
        let mask = 1 + random.below((1 << n) - 1)
        return (0..<n).filter { mask & (1 << $0) != 0 }
    }
}

/// A private token secret key: by value (`value`), or for C_GenerateKey (nil: its length asked for instead).
func secretKey(_ label: String, _ keyType: UInt, value: [UInt8]?) -> [Attribute] {
    var template = [Attribute(CKA_CLASS, ulong: CKO_SECRET_KEY), Attribute(CKA_KEY_TYPE, ulong: CK_ULONG(keyType)),
                    Attribute(CKA_TOKEN, bool: true), Attribute(CKA_PRIVATE, bool: true), Attribute(CKA_SENSITIVE, bool: true),
                    Attribute(CKA_LABEL, Array(label.utf8))]
    template += keyType == CKK_AES ? [Attribute(CKA_ENCRYPT, bool: true), Attribute(CKA_DECRYPT, bool: true)]
                                   : [Attribute(CKA_SIGN, bool: true), Attribute(CKA_VERIFY, bool: true)]
    // Extractable under a trusted key only, as p11ha asks of keys it must carry: a key that cannot be wrapped can
    // never reach a member that missed its creation (p11ha logs member-resync-incomplete for it).
    template += [Attribute(CKA_EXTRACTABLE, bool: true), Attribute(CKA_WRAP_WITH_TRUSTED, bool: true)]
    template.append(value.map { Attribute(CKA_VALUE, $0) } ?? Attribute(CKA_VALUE_LEN, ulong: 32))
    return template
}

