// Test support for the convergence simulation: hosts (each one p11ha process) sharing fake members, the ledger of
// what the hosts' writes were answered, and the check of the members against it, made on the stores directly.
import CInterop
import Glibc
@testable import P11HA
import P11HAFake

/// One host: one p11ha process (a `Runtime`, no deadline workers, recovery driven by the test), with its own lock
/// directory (hosts share no file) and its own connection to each member: its link to that HSM, which can fail
/// for this host alone.
final class SimulatedHost {
    let number: Int
    private let stores: [FakeTokenStore]
    private let config: Config
    private(set) var runtime: Runtime
    /// This process's connection to each member, by member index.
    private(set) var links: [FakeToken]
    /// The application's one session, logged in as the user; nil until a login succeeds.
    var session: SessionHandle?
    /// The objects this process has a handle for, by ledger number: those it made, and those a search gave it.
    var known: [Int: ObjectHandle] = [:]

    let clock: SimulatedClock

    init(number: Int, stores: [FakeTokenStore], config: Config, clock: SimulatedClock) throws {
        self.number = number
        self.stores = stores
        self.config = config
        self.clock = clock
        (runtime, links) = try Self.start(config, stores, writer: UInt64(number) << 32, clock: clock)
    }

    /// A configuration for a host's process: `directory` is its lock directory, its alone.
    static func config(members stores: [FakeTokenStore], directory: String, log: String, logLevel: LogLevel) throws -> Config {
        // One module path for every member: the runtime then connects them in order on this thread (members of
        // several modules connect side by side, on threads, which would make the run depend on scheduling).
        let text = """
            [p11ha]
            log = \(log)
            log-level = \(logLevel.name)
            lock-dir = \(directory)
            operation-timeout = off
            [group sim]
            label = sim
            \(stores.map { "member = pkcs11:token=\($0.label)?module-path=/fake/simulation" }.joined(separator: "\n"))
            """
        return try Config.parse(text, path: directory + "/p11ha.conf")
    }

    private static func start(_ config: Config, _ stores: [FakeTokenStore], writer: UInt64, clock: SimulatedClock) throws -> (Runtime, [FakeToken]) {
        var links: [FakeToken] = []
        let runtime = try Runtime.start(config, backends: { member, _, _ in
            let link = stores.first { $0.label == member.uri.tokenLabel }!.connection()
            links.append(link)
            return link
        }, backgroundRecovery: false, replicaClock: ReplicaClock(writer: writer, now: { clock.milliseconds }))
        return (runtime, links)
    }

    /// Each process its own writer identity (a restarted one a new one, as a real process draws it at random).
    private var writer: UInt64 { UInt64(number) << 32 | UInt64(restarts) }
    private var restarts = 0

    /// The process ends and a new one starts on the host: new connections, no session, no handle known.
    func restart() throws {
        runtime.shutdown()
        restarts += 1
        (runtime, links) = try Self.start(config, stores, writer: writer, clock: clock)
        session = nil
        known = [:]
    }

    func shutdown() { runtime.shutdown() }

    var members: [Member] { runtime.groups[0].members }
    var membersOutOfService: [Int] { members.filter { !$0.isInService }.map(\.index) }
    /// Each member's health as this host sees it, one letter each: + in service, s stale, f failed, r recovering.
    var healthText: String { "[" + members.map { $0.isInService ? "+" : String($0.health.name.prefix(1)) }.joined() + "]" }

    /// Opens the session and logs in if this process has none yet; the code of the call that failed, or nil.
    func logIn() -> CK_RV? {
        if session != nil { return nil }
        let opened: SessionHandle
        do {
            opened = try runtime.openSession(0, flags: CK_FLAGS(CKF_SERIAL_SESSION | CKF_RW_SESSION))
        } catch {
            return error.rv
        }
        do {
            try runtime.login(opened, userType: CK_USER_TYPE(CKU_USER), pin: Secret(FakeGroup.userPIN))
        } catch where error.rv != CKR_USER_ALREADY_LOGGED_IN {
            try? runtime.closeSession(opened)
            return error.rv
        } catch {}
        session = opened
        return nil
    }
}

/// What every write was answered, in the order the hosts made them: the ground truth the members are held to.
/// An object is named by its ledger number; each label a write used names one object (labels are never reused).
struct Ledger {
    enum Kind: String { case data, hmac, aes, generated }

    /// One label an object was given: at its creation or by a rename.
    struct Naming {
        let label: String
        let host: Int
        /// Its place among every naming of the run (the order the hosts' calls were made in).
        let order: Int
        let step: Int
        /// How many full heals came before it.
        let heal: Int
        let acknowledged: Bool
        let isCreation: Bool
    }

    struct Entry {
        let number: Int
        let kind: Kind
        /// The value the application gave; for a generated key, the one a member held right after CKR_OK.
        var value: [UInt8]?
        /// Whether its creation returned CKR_OK; an object whose creation failed may or may not exist.
        var created: Bool
        var namings: [Naming]
        /// The step at which a destroy of it returned CKR_OK.
        var destroyedAt: Int?
    }

    var entries: [Entry] = []
    /// Every label any write used, to the object it names (failed creations' and refused renames' included).
    var owners: [String: Int] = [:]
    var heals = 0
    private var nextLabel = 0
    private var namings = 0

    mutating func newLabel(_ prefix: String) -> String {
        nextLabel += 1
        return "\(prefix)-\(nextLabel)"
    }

    mutating func created(_ kind: Kind, label: String, value: [UInt8]?, acknowledged: Bool, host: Int, step: Int) -> Int {
        let number = entries.count
        namings += 1
        entries.append(Entry(number: number, kind: kind, value: value, created: acknowledged,
                             namings: [Naming(label: label, host: host, order: namings, step: step, heal: heals,
                                              acknowledged: acknowledged, isCreation: true)]))
        owners[label] = number
        return number
    }

    mutating func renamed(_ number: Int, to label: String, acknowledged: Bool, host: Int, step: Int) {
        namings += 1
        entries[number].namings.append(Naming(label: label, host: host, order: namings, step: step, heal: heals,
                                              acknowledged: acknowledged, isCreation: false))
        owners[label] = number
    }

    /// The labels the object may end with: those of acknowledged namings that no later acknowledged rename
    /// supersedes. A rename supersedes the creation, anything before the last full heal, and its own host's
    /// earlier namings; renames by different hosts with no heal between them are concurrent, and either may win.
    /// A refused rename changed nothing (a member that answers an error did nothing, in this fault model; p11ha
    /// undoes or repairs a partial write), so its label is never acceptable.
    func acceptableLabels(_ entry: Entry) -> [String] {
        let acknowledged = entry.namings.filter(\.acknowledged)
        return acknowledged.filter { naming in
            !acknowledged.contains { later in
                later.order > naming.order && (naming.isCreation || naming.heal < later.heal || naming.host == later.host)
            }
        }.map(\.label)
    }

    /// The newest label a write gave the object, acknowledged or not: what a search for it tries.
    func newestLabel(_ number: Int) -> String { entries[number].namings.last!.label }
}

/// The guarantees, checked on the members themselves (read-only, not through p11ha), p11ha's own objects aside.
enum ConvergenceCheck {
    /// One broken guarantee; `kind` groups them in summaries.
    struct Problem: CustomStringConvertible {
        let kind: String
        let detail: String
        var description: String { "\(kind): \(detail)" }
    }

    /// p11ha's own objects: the replication key and the journals (CKO_DATA labelled "p11ha ..." or of
    /// application "p11ha"), whatever shape replication gives them.
    static func isP11HAs(_ object: [Attribute]) -> Bool {
        let label = object[CK_ATTRIBUTE_TYPE(CKA_LABEL)].map { String(decoding: $0.value, as: UTF8.self) } ?? ""
        if label.hasPrefix("p11ha ") { return true }
        if object[CK_ATTRIBUTE_TYPE(CKA_ID)]?.value == ReplicationKey.id { return true }
        return object[CK_ATTRIBUTE_TYPE(CKA_CLASS)]?.ulongValue == CK_ULONG(CKO_DATA)
            && object[CK_ATTRIBUTE_TYPE(CKA_APPLICATION)]?.value == Array("p11ha".utf8)
    }

    /// Every problem, in a stable order (members, then objects by ledger number).
    static func problems(stores: [FakeTokenStore], ledger: Ledger) -> [Problem] {
        var problems: [Problem] = []
        // copies[object][member]: the labels and values of its copies there.
        var copies: [Int: [[(label: String, value: [UInt8])]]] = [:]
        for (member, store) in stores.enumerated() {
            var labelsHere: [String: Int] = [:]
            for object in store.tokenObjects() where !isP11HAs(object) {
                let label = object[CK_ATTRIBUTE_TYPE(CKA_LABEL)].map { String(decoding: $0.value, as: UTF8.self) } ?? "(no label)"
                let value = object[CK_ATTRIBUTE_TYPE(CKA_VALUE)]?.value ?? []
                labelsHere[label, default: 0] += 1
                guard let number = ledger.owners[label] else {
                    problems.append(Problem(kind: "unknown-object", detail: "member \(member) holds \"\(label)\", a label no write used"))
                    continue
                }
                copies[number, default: Array(repeating: [], count: stores.count)][member].append((label, value))
            }
            for (label, count) in labelsHere.sorted(by: { $0.key < $1.key }) where count > 1 {
                problems.append(Problem(kind: "duplicate-label", detail: "member \(member) holds \(count) objects labelled \"\(label)\""))
            }
        }
        for entry in ledger.entries where entry.created {
            let held = copies[entry.number] ?? Array(repeating: [], count: stores.count)
            let name = "\(entry.kind.rawValue) \"\(entry.namings[0].label)\" (#\(entry.number))"
            if let step = entry.destroyedAt {
                for (member, here) in held.enumerated() where !here.isEmpty {
                    problems.append(Problem(kind: "destroyed-but-present",
                                            detail: "\(name), destroyed with CKR_OK at step \(step), is on member \(member) as \(here.map(\.label))"))
                }
                continue
            }
            for (member, here) in held.enumerated() where here.count != 1 {
                problems.append(here.isEmpty
                    ? Problem(kind: "lost", detail: "\(name), created with CKR_OK and never destroyed, is missing from member \(member)")
                    : Problem(kind: "duplicate-copy", detail: "\(name) is on member \(member) \(here.count) times: \(here.map(\.label))"))
            }
            let all = held.joined()
            let labels = Set(all.map(\.label))
            let acceptable = ledger.acceptableLabels(entry)
            if labels.count > 1 {
                problems.append(Problem(kind: "labels-differ",
                                        detail: "\(name)'s copies are labelled \(held.map { $0.map(\.label) }) by member (acceptable: \(acceptable))"))
            } else if let label = labels.first, !acceptable.contains(label) {
                let refused = entry.namings.contains { $0.label == label && !$0.acknowledged }
                problems.append(Problem(kind: refused ? "refused-label" : "stale-label",
                                        detail: "\(name) is labelled \"\(label)\"\(refused ? " (a rename that was refused)" : "") on every member holding it; acceptable: \(acceptable)"))
            }
            let values = Set(all.map(\.value))
            if values.count > 1 || (entry.value != nil && values.first.map { $0 != entry.value } == true) {
                problems.append(Problem(kind: "value-differs", detail: "\(name)'s copies differ in value from each other or from what was written"))
            }
        }
        return problems
    }
}

/// Removes the files of a lock directory (no subdirectories there), so that the next seed's hosts start clean.
func emptyDirectory(_ path: String) {
    guard let dir = opendir(path) else { return }
    defer { closedir(dir) }
    let fd = dirfd(dir)
    while let entry = readdir(dir) {
        let name = withUnsafeBytes(of: entry.pointee.d_name) { String(cString: $0.bindMemory(to: CChar.self).baseAddress!) }
        if name == "." || name == ".." { continue }
        unlinkat(fd, name, 0)
    }
}

/// The simulation's wall clock: moved by the run, so that records' stamps (and leases' expiry) replay exactly.
final class SimulatedClock: @unchecked Sendable {
    private let lock = Mutex(UInt64(1_000_000))
    var milliseconds: UInt64 { lock.withLock { $0 } }
    func advance(by ms: UInt64) { lock.withLock { $0 += ms } }
}
