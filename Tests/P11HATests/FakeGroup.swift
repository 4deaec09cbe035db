// Test support: a group of in-process fake members driven through the core, as the C ABI face drives it.
import CInterop
import Glibc
@testable import P11HA
import P11HAFake

struct TestFailure: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// A group of `count` fake tokens (each a `FakeTokenStore`, reached through one connection of this "process"),
/// started by `Runtime.start` as C_Initialize would, with a replication key on every member.
final class FakeGroup {
    let stores: [FakeTokenStore]
    let runtime: Runtime
    let directory: String
    static let userPIN = "1234"

    /// - operationTimeout: nil runs member calls on the caller's thread (no deadline, no worker threads).
    /// - backgroundRecovery: false leaves recovery to the test (`recover()`): with no deadline either, the run
    ///   is single-threaded and a seed replays exactly.
    /// This process's connection to each store, in member order.
    let connections: [FakeToken]

    /// - sharedModule: the members are tokens of one module instance (as the tokens of one SoftHSM configuration
    ///   are), which restarts as one.
    /// - sharing: the stores of another FakeGroup: this one is then another process (another host: its own lock
    ///   directory) on the same members.
    /// - settings: more lines for the [p11ha] section.
    /// - clock: the replication stamps' clock (the wall clock when nil), for tests that let time pass.
    /// - staleIndexes: the stores keep SoftHSM's per-process indexes (`FakeTokenStore.staleIndexes`).
    init(members count: Int = 3, seed: UInt64 = 1, operationTimeout: String? = nil, backgroundRecovery: Bool = false,
         replicationKey: Bool = true, sharedModule: Bool = false, sharing: [FakeTokenStore]? = nil, settings: [String] = [],
         clock: SimulatedClock? = nil, staleIndexes: Bool = false, prepare: ([FakeTokenStore]) -> Void = { _ in }) throws {
        var template = Array("/tmp/p11ha-unit.XXXXXX".utf8CString)
        guard let made = template.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!) }) else { throw TestFailure("mkdtemp") }
        directory = String(cString: made)
        let stores = sharing ?? (0..<count).map { index in
            FakeTokenStore(label: "member-\(index)", serial: "SERIAL\(index)", seed: seed &* 31 &+ UInt64(index),
                           staleIndexes: staleIndexes)
        }
        self.stores = stores
        if replicationKey && sharing == nil { try Self.setUpReplicationKey(on: stores) }
        prepare(stores)
        let text = """
            [p11ha]
            log = \(directory)/p11ha.log
            lock-dir = \(directory)
            operation-timeout = \(operationTimeout ?? "off")
            recovery-interval = 20ms
            \(settings.joined(separator: "\n"))
            [group fake]
            label = fake
            \(stores.map { "member = pkcs11:token=\($0.label)?module-path=/fake/\($0.label)" }.joined(separator: "\n"))
            """
        let config = try Config.parse(text, path: directory + "/p11ha.conf")
        let timeout = config.operationTimeout
        let module = sharedModule ? FakeModule(name: "one fake module") : nil
        let connections = stores.map { $0.connection(module: module) }
        self.connections = connections
        runtime = try Runtime.start(config, backends: { member, _, _ in
            let token = connections[stores.firstIndex { $0.label == member.uri.tokenLabel }!]
            return timeout.map { DeadlineBackend(token, timeout: $0) } ?? token
        }, backgroundRecovery: backgroundRecovery, replicaClock: clock.map { clock in ReplicaClock(now: { clock.milliseconds }) })
    }

    deinit {
        runtime.shutdown()
        for store in stores { store.faults.clearFaults() }
        _ = system("rm -rf '\(directory)'")
    }

    var group: Group { runtime.groups[0] }
    var members: [Member] { group.members }
    func health(_ index: Int) -> Health { members[index].health }

    /// One recovery pass, as the background worker would make it.
    func recover() { _ = runtime.recovery.recoverMembers() }

    /// A read-write session, logged in as the user.
    func userSession() throws -> SessionHandle {
        let session = try runtime.openSession(0, flags: CK_FLAGS(CKF_SERIAL_SESSION | CKF_RW_SESSION))
        do {
            try runtime.login(session, userType: CK_USER_TYPE(CKU_USER), pin: Secret(Self.userPIN))
        } catch where error.rv == CKR_USER_ALREADY_LOGGED_IN {}
        return session
    }

    /// How many replication records `store` holds.
    func records(on store: Int) -> Int { objects(labelled: ReplicaRecord.label, on: store) }

    /// Every token object of `store` with this label (read from the store itself, not through p11ha).
    func objects(labelled label: String, on store: Int) -> Int {
        stores[store].tokenObjects(matching: [Attribute(CKA_LABEL, Array(label.utf8))]).count
    }

    /// Runs `body` on member `store` as another program would: a connection of its own, a session logged in as the
    /// user.
    func asAnotherProgram<T>(on store: Int, _ body: (FakeToken, MemberSession) throws -> T) throws -> T {
        let token = stores[store].connection()
        try token.connect()
        defer { token.disconnect() }
        let s = try token.openSession(readWrite: true)
        try token.login(s, userType: CK_USER_TYPE(CKU_USER), pin: Secret(Self.userPIN))
        return try body(token, s)
    }

    /// Renames, directly on member `store`, the objects labelled `label`: a change no record describes.
    func relabelBehindP11HA(on store: Int, _ label: String, to newLabel: String) throws {
        try asAnotherProgram(on: store) { token, s in
            for copy in try token.findObjects(s, [Attribute(CKA_LABEL, Array(label.utf8))]) {
                try token.setAttributeValues(s, copy, [Attribute(CKA_LABEL, Array(newLabel.utf8))])
            }
        }
    }

    /// The same AES key, trusted, under p11ha's replication key identity, on every store (what `p11hactl domain
    /// create` leaves behind).
    static func setUpReplicationKey(on stores: [FakeTokenStore]) throws {
        let value = (0..<32).map { UInt8($0 &* 7 &+ 3) }
        for store in stores {
            let token = store.connection()
            try token.connect()
            defer { token.disconnect() }
            let session = try token.openSession(readWrite: true)
            try token.login(session, userType: CK_USER_TYPE(CKU_USER), pin: Secret(userPIN))
            _ = try token.createObject(session, ReplicationKey.searchTemplate + [
                Attribute(CKA_TOKEN, bool: true), Attribute(CKA_PRIVATE, bool: false), Attribute(CKA_TRUSTED, bool: true),
                Attribute(CKA_SENSITIVE, bool: true), Attribute(CKA_EXTRACTABLE, bool: true),
                Attribute(CKA_WRAP_WITH_TRUSTED, bool: true), Attribute(CKA_WRAP, bool: true), Attribute(CKA_UNWRAP, bool: true),
                Attribute(CKA_LABEL, Array(ReplicationKey.label.utf8)), Attribute(CKA_VALUE, value),
            ])
            token.closeSession(session)
        }
    }
}

/// A token data object's template.
func dataObject(_ label: String, value: [UInt8] = [1, 2, 3]) -> [Attribute] {
    [Attribute(CKA_CLASS, ulong: CKO_DATA), Attribute(CKA_TOKEN, bool: true), Attribute(CKA_PRIVATE, bool: true),
     Attribute(CKA_LABEL, Array(label.utf8)), Attribute(CKA_VALUE, value)]
}

/// An HMAC key imported by value (replayed on every member), usable to sign.
func hmacKey(_ label: String) -> [Attribute] {
    [Attribute(CKA_CLASS, ulong: CKO_SECRET_KEY), Attribute(CKA_KEY_TYPE, ulong: CKK_GENERIC_SECRET),
     Attribute(CKA_TOKEN, bool: true), Attribute(CKA_PRIVATE, bool: true), Attribute(CKA_SIGN, bool: true),
     Attribute(CKA_VERIFY, bool: true), Attribute(CKA_LABEL, Array(label.utf8)),
     Attribute(CKA_VALUE, Array("a key of thirty-two bytes, fixed".utf8))]
}

let hmac = Mechanism(CK_MECHANISM_TYPE(CKM_SHA256_HMAC))

/// Polls `condition` every few milliseconds for up to `seconds`; whether it came true.
func eventually(seconds: Double = 5, _ condition: () -> Bool) -> Bool {
    let deadline = monotonicNanos() + UInt64(seconds * 1e9)
    while monotonicNanos() < deadline {
        if condition() { return true }
        usleep(5_000)
    }
    return condition()
}

/// A private directory for one test (mkdtemp, 0700), removed with the value.
final class TemporaryDirectory {
    let path: String

    init(_ prefix: String = "p11ha-hostfiles") throws {
        var template = Array("/tmp/\(prefix).XXXXXX".utf8CString)
        guard let made = template.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!) }) else { throw TestFailure("mkdtemp") }
        path = String(cString: made)
    }

    deinit { _ = system("rm -rf '\(path)'") }

    func file(_ name: String, _ content: String, mode: mode_t = 0o600) throws -> String {
        let full = path + "/" + name
        let fd = open(full, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode)
        guard fd >= 0 else { throw TestFailure("cannot make \(full): \(errnoText())") }
        _ = Array(content.utf8).withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        fchmod(fd, mode)
        close(fd)
        return full
    }
}

/// A group on a simulated clock whose object "kept" member 1 holds renamed "changed" behind p11ha's back, after one
/// catch-up (which saw the value and left it: it may be a write under way).
func labelChangedBehindP11HA() throws -> (SimulatedClock, FakeGroup) {
    let clock = SimulatedClock()
    let fake = try FakeGroup(clock: clock)
    let session = try fake.userSession()
    _ = try fake.runtime.createObject(session, dataObject("kept"))
    try fake.relabelBehindP11HA(on: 1, "kept", to: "changed")
    fake.group.catchUpWanted.store(true, ordering: .releasing)
    fake.recover()
    return (clock, fake)
}
