// Availability through the real C ABI: a process that never logs in, and sessions and logins churned by some
// threads while others sign.
import CInterop
import Glibc
import Synchronization

/// A process that never logs in creates and destroys public objects while a member fails and returns: no member
/// is taken out by the writes themselves, the failed one comes back without a login, the objects reach every
/// member (read directly from SoftHSM), and a login afterwards works.
func noLoginScenario(_ m: Module) {
    let s = initialized(m)
    var session: CK_SESSION_HANDLE = 0
    ok(m.f.C_OpenSession!(s, CK_FLAGS(CKF_SERIAL_SESSION | CKF_RW_SESSION), nil, nil, &session), "C_OpenSession (no login)")
    let publicData = { (label: String) -> Template in
        Template().add(CKA_CLASS, ulong: CK_ULONG(CKO_DATA)).add(CKA_TOKEN, bool: true).add(CKA_PRIVATE, bool: false)
            .add(CKA_LABEL, string: label).add(CKA_VALUE, string: label)
    }
    func create(_ label: String) -> CK_OBJECT_HANDLE {
        var handle: CK_OBJECT_HANDLE = 0
        let t = publicData(label)
        expect(m.f.C_CreateObject!(session, &t.attributes, t.count, &handle), CKR_OK, "create \(label) without a login")
        return handle
    }
    let first = create("nologin-first")
    let doomed = create("nologin-doomed")
    check(memberStates(m, s).allSatisfy { $0 == 0 }, "writes without a login leave every member in service: \(memberStates(m, s))")

    inject("fail 0x30", memberLabels[1])
    _ = create("nologin-while-down")
    expect(m.f.C_DestroyObject!(session, doomed), CKR_OK, "destroy without a login while a member is down")
    check(memberStates(m, s)[1] != 0, "the failing member is out of service")
    inject("ok", memberLabels[1])
    waitInService(m, s)
    expect(m.f.C_DestroyObject!(session, first), CKR_OK, "destroy once it is back")

    let direct = Module(path: env("SOFTHSM_MODULE") ?? "")
    for label in memberLabels {
        guard let memberSlot = slot(labelled: label, in: direct) else { fatal("no member \(label)") }
        var ms: CK_SESSION_HANDLE = 0
        ok(direct.f.C_OpenSession!(memberSlot, CK_FLAGS(CKF_SERIAL_SESSION), nil, nil, &ms), "C_OpenSession on \(label) directly")
        for (name, count) in [("nologin-while-down", 1), ("nologin-doomed", 0), ("nologin-first", 0)] {
            let n = find(direct, ms, Template().add(CKA_LABEL, string: name)).count
            check(n == count, "\(label) holds \(count) object(s) labelled \(name): \(n)")
        }
        _ = direct.f.C_CloseSession!(ms)
    }
    var pin = Array(userPIN.utf8)
    expect(m.f.C_Login!(session, CK_USER_TYPE(CKU_USER), &pin, CK_ULONG(pin.count)), CKR_OK, "C_Login afterwards")
    check(memberStates(m, s).allSatisfy { $0 == 0 }, "every member in service after the login: \(memberStates(m, s))")
    ok(m.f.C_Finalize!(nil), "C_Finalize")
}

/// Threads sign while others close all sessions, log out and in, and close sessions at random, for
/// P11HA_TEST_CHURN_SECONDS (default 60): signers see only the codes a single token gives such races, a session
/// that says it is logged in always finds its private key, and afterwards every member is in service and a login
/// and a signature work.
func churnScenario(_ m: Module) {
    let s = initialized(m)
    let setup = openLoggedIn(m, slot: s, pin: userPIN)
    let label = "churn-\(getpid())"
    let key = ecPair(m, setup, label: label)
    let seconds = Double(env("P11HA_TEST_CHURN_SECONDS") ?? "") ?? 60
    let churn = Churn(m, slot: s, keyLabel: label)
    churn.start(signers: 16, seconds: seconds)
    let (rounds, blind, unexpected) = churn.wait(seconds: seconds + 60)
    check(rounds > 100, "signers made rounds: \(rounds)")
    check(blind.isEmpty, "a session that said it was logged in did not see its private key, \(blind.count) times: \(blind.prefix(3))")
    check(unexpected.isEmpty, "codes a single token does not give these races: \(unexpected.prefix(5))")
    waitInService(m, s)
    let after = openLoggedIn(m, slot: s, pin: userPIN)
    expect(signAndVerify(m, after, key, "after the churn"), CKR_OK, "C_Login and a signature after the churn")
    ok(m.f.C_Finalize!(nil), "C_Finalize")
}

final class Churn: @unchecked Sendable {
    private let m: Module
    private let slot: CK_SLOT_ID
    private let keyLabel: String
    private let stopping = Atomic<Bool>(false)
    private let running = Atomic<Int>(0)
    private let results = Mutex((rounds: 0, blind: [String](), unexpected: [String]()))
    /// Odd while a thread is changing the login state (closing sessions can log out, as closing the last one
    /// does; logging out and in): a search made within one even value saw a login that did not change.
    private let loginEpoch = Atomic<UInt64>(0)

    /// Runs a call that may change the login state, bracketed by the epoch.
    private func changingLogin(_ body: () -> Void) {
        changers.withLock { _ in
            loginEpoch.add(1, ordering: .sequentiallyConsistent)
            body()
            loginEpoch.add(1, ordering: .sequentiallyConsistent)
        }
    }
    /// One changer at a time, so that the epoch's parity means what it says.
    private let changers = Mutex(())
    /// What a token answers a call whose session another thread closed, or whose login another thread ended:
    /// CKR_GENERAL_ERROR is SoftHSM's own answer to a search or signature under a concurrent logout (used directly,
    /// SoftHSM crashes under this churn). CKR_DEVICE_ERROR is not among them: it would mean the group went out.
    static let racing: Set<CK_RV> = [
        CK_RV(CKR_SESSION_HANDLE_INVALID), CK_RV(CKR_SESSION_CLOSED), CK_RV(CKR_USER_NOT_LOGGED_IN),
        CK_RV(CKR_KEY_HANDLE_INVALID), CK_RV(CKR_OBJECT_HANDLE_INVALID), CK_RV(CKR_OPERATION_NOT_INITIALIZED),
        CK_RV(CKR_USER_ALREADY_LOGGED_IN), CK_RV(CKR_GENERAL_ERROR),
    ]

    init(_ m: Module, slot: CK_SLOT_ID, keyLabel: String) {
        self.m = m
        self.slot = slot
        self.keyLabel = keyLabel
    }

    func start(signers: Int, seconds: Double) {
        let end = monotonicSeconds() + seconds
        for _ in 0..<signers { spawn { [self] in sign(until: end) } }
        spawn { [self] in every(0.05, until: end) { changingLogin { _ = m.f.C_CloseAllSessions!(slot) } } }
        spawn { [self] in
            var session: CK_SESSION_HANDLE = 0
            every(0.05, until: end) {
                if session == 0 { _ = m.f.C_OpenSession!(slot, CK_FLAGS(CKF_SERIAL_SESSION), nil, nil, &session) }
                var pin = Array(userPIN.utf8)
                changingLogin {
                    if m.f.C_Logout!(session) == CKR_SESSION_HANDLE_INVALID { session = 0; return }
                    _ = m.f.C_Login!(session, CK_USER_TYPE(CKU_USER), &pin, CK_ULONG(pin.count))
                }
            }
        }
        spawn { [self] in
            var counter: UInt64 = 7
            every(0.05, until: end) {
                // Any handle from the few a process gets: some are others' live sessions.
                counter = counter &* 6364136223846793005 &+ 1442695040888963407
                changingLogin { _ = m.f.C_CloseSession!(CK_SESSION_HANDLE(1 + (counter >> 33) % 64)) }
            }
        }
    }

    func wait(seconds: Double) -> (rounds: Int, blind: [String], unexpected: [String]) {
        _ = pollUntil(seconds: seconds) { running.load(ordering: .relaxed) == 0 }
        stopping.store(true, ordering: .relaxed)
        _ = pollUntil(seconds: 10) { running.load(ordering: .relaxed) == 0 }
        return results.withLock { ($0.rounds, $0.blind, $0.unexpected) }
    }

    private func spawn(_ body: @escaping @Sendable () -> Void) {
        final class Box { let body: @Sendable () -> Void; init(_ b: @escaping @Sendable () -> Void) { body = b } }
        running.add(1, ordering: .relaxed)
        let context = Unmanaged.passRetained(Box { [self] in body(); running.subtract(1, ordering: .relaxed) }).toOpaque()
        var thread = pthread_t()
        let rc = pthread_create(&thread, nil, { raw in
            Unmanaged<Box>.fromOpaque(raw!).takeRetainedValue().body()
            return nil
        }, context)
        if rc != 0 { fatal("pthread_create: \(rc)") }
        pthread_detach(thread)
    }

    private func every(_ interval: Double, until end: Double, _ body: () -> Void) {
        while monotonicSeconds() < end && !stopping.load(ordering: .relaxed) {
            body()
            usleep(UInt32(interval * 1_000_000))
        }
    }

    private func note(_ rv: CK_RV, _ what: String) {
        guard rv != CKR_OK, !Churn.racing.contains(rv) else { return }
        results.withLock { $0.unexpected.append("\(what): 0x\(String(rv, radix: 16))") }
    }

    /// Rounds of: a session (opened again when another thread closed it), a login, the key found, a signature.
    private func sign(until end: Double) {
        var session: CK_SESSION_HANDLE = 0
        var digest = [UInt8](repeating: 5, count: 32)
        var signature = [UInt8](repeating: 0, count: 64)
        let template = Template().add(CKA_CLASS, ulong: CK_ULONG(CKO_PRIVATE_KEY)).add(CKA_LABEL, string: keyLabel)
        while monotonicSeconds() < end && !stopping.load(ordering: .relaxed) {
            if session == 0 {
                let rv = m.f.C_OpenSession!(slot, CK_FLAGS(CKF_SERIAL_SESSION), nil, nil, &session)
                note(rv, "C_OpenSession")
                if rv != CKR_OK { session = 0; continue }
            }
            var pin = Array(userPIN.utf8)
            let login = m.f.C_Login!(session, CK_USER_TYPE(CKU_USER), &pin, CK_ULONG(pin.count))
            note(login, "C_Login")
            if login == CKR_SESSION_HANDLE_INVALID { session = 0; continue }
            let before = state(session)
            let epoch = loginEpoch.load(ordering: .sequentiallyConsistent)
            var found: [CK_OBJECT_HANDLE] = []
            var rv = m.f.C_FindObjectsInit!(session, &template.attributes, template.count)
            if rv == CKR_OK {
                var batch = [CK_OBJECT_HANDLE](repeating: 0, count: 4)
                var count: CK_ULONG = 0
                rv = m.f.C_FindObjects!(session, &batch, 4, &count)
                found = Array(batch.prefix(Int(count)))
                _ = m.f.C_FindObjectsFinal!(session)
            }
            note(rv, "C_FindObjects")
            let after = state(session)
            let steady = epoch % 2 == 0 && loginEpoch.load(ordering: .sequentiallyConsistent) == epoch
            if rv == CKR_OK, steady, before == CKS_RO_USER_FUNCTIONS, after == CKS_RO_USER_FUNCTIONS, found.count != 1 {
                results.withLock { $0.blind.append("found \(found.count)") }
            }
            if let key = found.first {
                var ecdsa = mechanism(CKM_ECDSA)
                var length = CK_ULONG(signature.count)
                rv = m.f.C_SignInit!(session, &ecdsa, key)
                if rv == CKR_OK { rv = m.f.C_Sign!(session, &digest, 32, &signature, &length) }
                note(rv, "C_Sign")
            }
            if rv == CKR_SESSION_HANDLE_INVALID { session = 0 }
            results.withLock { $0.rounds += 1 }
        }
    }

    private func state(_ session: CK_SESSION_HANDLE) -> CK_STATE? {
        var info = CK_SESSION_INFO()
        return m.f.C_GetSessionInfo!(session, &info) == CKR_OK ? info.state : nil
    }
}
