// A member leaves service only on evidence against it: the evidence rule of the fan-out, on fake members.
import CInterop
import Glibc
@testable import P11HA
import P11HAFake
import Synchronization
import Testing

@Suite struct OnlyAFailingMemberLeavesService {
    @Test("a code every member gives a request (CKR_GENERAL_ERROR, as SoftHSM gives a badly padded ciphertext) is the caller's answer, and no member leaves service")
    func requestAtFault() throws {
        let fake = try FakeGroup()
        let session = try fake.userSession()
        let key = try fake.runtime.createObject(session, hmacKey("k"))
        for store in fake.stores { store.faults.inject(.error(CK_RV(CKR_GENERAL_ERROR)), on: [.singlePart], times: 1) }
        try fake.runtime.operationInit(.sign, session, hmac, key: key)
        #expect(throws: P11Error(CK_RV(CKR_GENERAL_ERROR))) { try fake.runtime.singlePart(.sign, session, [1], capacity: 64) }
        #expect(fake.members.allSatisfy { $0.isInService })
        #expect(throws: P11Error.operationNotInitialized, "the error ended the operation, as on one token") {
            try fake.runtime.singlePart(.sign, session, [1], capacity: 64)
        }
        try fake.runtime.operationInit(.sign, session, hmac, key: key)
        #expect(try fake.runtime.singlePart(.sign, session, [1], capacity: 64).bytes?.count == 32)
    }

    @Test("the same for a multi-part operation's last call, replayed on every member before the request is blamed")
    func requestAtFaultMidOperation() throws {
        let fake = try FakeGroup()
        let session = try fake.userSession()
        let key = try fake.runtime.createObject(session, hmacKey("k"))
        for store in fake.stores { store.faults.inject(.error(CK_RV(CKR_GENERAL_ERROR)), on: [.final], times: 1) }
        try fake.runtime.operationInit(.sign, session, hmac, key: key)
        try fake.runtime.update(.sign, session, [1, 2, 3])
        #expect(throws: P11Error(CK_RV(CKR_GENERAL_ERROR))) { try fake.runtime.final(.sign, session, capacity: 64) }
        #expect(fake.members.allSatisfy { $0.isInService })
        #expect(fake.stores.allSatisfy { $0.faults.count(.final) == 1 }, "each member was asked once")
    }

    @Test("a write every member refuses with a fault-class code is refused, nowhere made, and no member is marked stale")
    func writeRefusedByEveryMember() throws {
        let fake = try FakeGroup()
        let session = try fake.userSession()
        for store in fake.stores { store.faults.inject(.error(CK_RV(CKR_GENERAL_ERROR)), on: [.createObject], times: 1) }
        #expect(throws: P11Error(CK_RV(CKR_GENERAL_ERROR))) { try fake.runtime.createObject(session, dataObject("odd")) }
        #expect(fake.members.allSatisfy { $0.isInService })
        for store in 0..<3 { #expect(fake.objects(labelled: "odd", on: store) == 0) }
    }

    @Test("the last member in service does not leave service because of one request; it leaves when its probe fails too")
    func lastMember() throws {
        let fake = try FakeGroup()
        let session = try fake.userSession()
        let key = try fake.runtime.createObject(session, hmacKey("k"))
        fake.stores[1].faults.crash()
        fake.stores[2].faults.crash()
        _ = try fake.runtime.generateRandom(session, count: 8)
        _ = try fake.runtime.generateRandom(session, count: 8)
        #expect(fake.health(1) == .failed && fake.health(2) == .failed)
        fake.stores[0].faults.inject(.error(CK_RV(CKR_GENERAL_ERROR)), on: [.singlePart], times: 1)
        try fake.runtime.operationInit(.sign, session, hmac, key: key)
        #expect(throws: P11Error(CK_RV(CKR_GENERAL_ERROR))) { try fake.runtime.singlePart(.sign, session, [1], capacity: 64) }
        #expect(fake.health(0) == .inService)
        try fake.runtime.operationInit(.sign, session, hmac, key: key)
        #expect(try fake.runtime.singlePart(.sign, session, [1], capacity: 64).bytes?.count == 32)

        fake.stores[0].faults.crash()
        #expect(throws: P11Error.self) { try fake.runtime.generateRandom(session, count: 8) }
        #expect(fake.health(0) == .failed, "a member that fails its probe too is at fault")
    }

    @Test("a call under way when another thread closes its session answers CKR_SESSION_HANDLE_INVALID, and no member leaves service")
    func sessionClosedUnderACall() throws {
        let fake = try FakeGroup()
        let session = try fake.userSession()
        let other = try fake.userSession()
        let key = try fake.runtime.createObject(session, hmacKey("k"))
        // The call blocks inside whichever member got it until the session is closed, then goes on there.
        for store in fake.stores { store.faults.inject(.hangThenProceed, on: [.singlePart], times: 1) }
        try fake.runtime.operationInit(.sign, session, hmac, key: key)
        final class Box: @unchecked Sendable { var error: P11Error? }
        let outcome = Box()
        let runtime = fake.runtime
        let done = Signal()
        spawnThread {
            do throws(P11Error) { _ = try runtime.singlePart(.sign, session, [1], capacity: 64) } catch { outcome.error = error }
            done.raise()
        }
        #expect(eventually { fake.stores.contains { $0.faults.hangingCalls == 1 } })
        try fake.runtime.closeSession(session)
        for store in fake.stores { store.faults.releaseHangs() }
        #expect(done.wait(timeout: .seconds(5)))
        #expect(outcome.error == P11Error.sessionHandleInvalid)
        #expect(fake.members.allSatisfy { $0.isInService })
        #expect(try fake.runtime.generateRandom(other, count: 4).count == 4)
    }
}

@Suite struct OneLoginStatePerGroup {
    @Test("threads opening, logging in, searching and closing sessions at once: while a session says it is logged in, every member is logged in and it sees the private objects")
    func loginChurn() throws {
        let fake = try FakeGroup()
        let setup = try fake.userSession()
        _ = try fake.runtime.createObject(setup, dataObject("secret"))
        try fake.runtime.closeSession(setup)
        // Slow session calls, as a real token's, widen the window in which the races happen.
        for store in fake.stores { store.faults.inject(.latency(.microseconds(300)), on: [.openSession, .closeSession, .login, .logout]) }
        final class Tally: @unchecked Sendable {
            let lock = Mutex<(rounds: Int, blind: Int, errors: [String])>((0, 0, []))
        }
        let tally = Tally()
        let runtime = fake.runtime
        let members = fake.members
        let finished = Signal()
        let threads = 4
        let done = Mutex(0)
        for _ in 0..<threads {
            spawnThread {
                for _ in 0..<300 {
                    do throws(P11Error) {
                        let session = try runtime.openSession(0, flags: CK_FLAGS(CKF_SERIAL_SESSION | CKF_RW_SESSION))
                        do throws(P11Error) {
                            try runtime.login(session, userType: CK_USER_TYPE(CKU_USER), pin: Secret(FakeGroup.userPIN))
                        } catch where error.rv == CKR_USER_ALREADY_LOGGED_IN {}
                        try runtime.findObjectsInit(session, [Attribute(CKA_LABEL, Array("secret".utf8))])
                        let found = try runtime.findObjects(session, max: 10)
                        try runtime.findObjectsFinal(session)
                        let state = try runtime.sessionInfo(session).state
                        // While this session is open and says "logged in", every member must be logged in: its
                        // own session there keeps it so, whatever the other threads do.
                        let loggedOutMembers = members.filter { $0.isInService && !($0.token as! FakeToken).isUserLoggedIn }.count
                        try runtime.closeSession(session)
                        tally.lock.withLock {
                            $0.rounds += 1
                            if state == CK_STATE(CKS_RW_USER_FUNCTIONS) && (found.count != 1 || loggedOutMembers > 0) { $0.blind += 1 }
                        }
                    } catch {
                        tally.lock.withLock { $0.errors.append("\(error)") }
                    }
                }
                if done.withLock({ $0 += 1; return $0 }) == threads { finished.raise() }
            }
        }
        #expect(finished.wait(timeout: .seconds(60)))
        let result = tally.lock.withLock { $0 }
        #expect(result.errors.isEmpty, "\(result.errors.prefix(5))")
        #expect(result.blind == 0, "\(result.blind) of \(result.rounds) logged-in sessions did not see the private object, or had members logged out under them")
        #expect(fake.members.allSatisfy { $0.isInService })
    }
}

@Suite struct WithoutALogin {
    func publicObject(_ label: String) -> [Attribute] {
        [Attribute(CKA_CLASS, ulong: CKO_DATA), Attribute(CKA_TOKEN, bool: true), Attribute(CKA_PRIVATE, bool: false),
         Attribute(CKA_LABEL, Array(label.utf8)), Attribute(CKA_VALUE, [9, 9])]
    }

    @Test("a process that never logs in writes public objects while a member fails and returns: they are journaled, reach every member, and no member is left out")
    func publicWrites() throws {
        let fake = try FakeGroup()
        let session = try fake.runtime.openSession(0, flags: CK_FLAGS(CKF_SERIAL_SESSION | CKF_RW_SESSION))
        let kept = try fake.runtime.createObject(session, publicObject("public-1"))
        #expect(fake.members.allSatisfy { $0.isInService }, "a write without a login leaves every member in service")
        fake.stores[1].faults.crash()
        _ = try fake.runtime.createObject(session, publicObject("public-2"))
        try fake.runtime.destroyObject(session, kept)
        #expect(fake.health(1) != .inService)
        fake.stores[1].faults.revive()
        fake.recover()
        #expect(fake.health(1) == .inService, "recovery needs no login: the member returns in the public state")
        for store in 0..<3 {
            #expect(fake.objects(labelled: "public-1", on: store) == 0, "member \(store)")
            #expect(fake.objects(labelled: "public-2", on: store) == 1, "member \(store)")
        }
        try fake.runtime.findObjectsInit(session, [])
        let visible = try fake.runtime.findObjects(session, max: 100)
        try fake.runtime.findObjectsFinal(session)
        #expect(visible.count == 1, "the public journal is p11ha's, not the application's: only public-2 is listed")
    }

    @Test("a member that failed while nobody was logged in returns; sessions and a login work afterwards, and the login finds it up to date")
    func recoveryBeforeLogin() throws {
        let fake = try FakeGroup()
        let user = try fake.userSession()
        _ = try fake.runtime.createObject(user, dataObject("private-1"))
        try fake.runtime.closeSession(user)
        fake.stores[2].faults.crash()
        let session = try fake.runtime.openSession(0, flags: CK_FLAGS(CKF_SERIAL_SESSION | CKF_RW_SESSION))
        _ = try fake.runtime.generateRandom(session, count: 4)
        _ = try fake.runtime.generateRandom(session, count: 4)
        _ = try fake.runtime.generateRandom(session, count: 4)
        #expect(fake.health(2) == .failed)
        fake.stores[2].faults.revive()
        fake.recover()
        #expect(fake.health(2) == .inService)
        try fake.runtime.login(session, userType: CK_USER_TYPE(CKU_USER), pin: Secret(FakeGroup.userPIN))
        #expect(fake.members.allSatisfy { $0.isInService }, "it missed no write: the login finds every journal equal")
        #expect(fake.members.allSatisfy { ($0.token as! FakeToken).isUserLoggedIn })
    }
}

@Suite struct PartialWrites {
    @Test("a copy that a later member refuses is undone where it was made")
    func copyUndone() throws {
        let fake = try FakeGroup()
        let session = try fake.userSession()
        let original = try fake.runtime.createObject(session, dataObject("original"))
        fake.stores[2].faults.inject(.error(CK_RV(CKR_TEMPLATE_INCONSISTENT)), on: [.copyObject], times: 2)
        #expect(throws: P11Error.member(CK_RV(CKR_TEMPLATE_INCONSISTENT))) {
            try fake.runtime.copyObject(session, original, [Attribute(CKA_LABEL, Array("copy".utf8))])
        }
        for store in 0..<3 { #expect(fake.objects(labelled: "copy", on: store) == 0, "member \(store)") }
        #expect(fake.members.allSatisfy { $0.isInService })
    }

    @Test("an attribute change that a later member refuses is set back where it succeeded")
    func attributeChangeUndone() throws {
        let fake = try FakeGroup()
        let session = try fake.userSession()
        let object = try fake.runtime.createObject(session, dataObject("before"))
        fake.stores[2].faults.inject(.error(CK_RV(CKR_ATTRIBUTE_VALUE_INVALID)), on: [.setAttributeValues], times: 2)
        #expect(throws: P11Error.member(CK_RV(CKR_ATTRIBUTE_VALUE_INVALID))) {
            try fake.runtime.setAttributeValues(session, object, [Attribute(CKA_LABEL, Array("after".utf8))])
        }
        for store in 0..<3 {
            #expect(fake.objects(labelled: "before", on: store) == 1 && fake.objects(labelled: "after", on: store) == 0, "member \(store)")
        }
        #expect(fake.members.allSatisfy { $0.isInService })
    }

    @Test("a destroy holds once its record is written: a member that then refuses to destroy its copy leaves service and loses the copy on its return")
    func destroyHoldsOnceRecorded() throws {
        let fake = try FakeGroup()
        let session = try fake.userSession()
        let object = try fake.runtime.createObject(session, dataObject("gone"))
        fake.stores[2].faults.inject(.error(CK_RV(CKR_ACTION_PROHIBITED)), on: [.destroyObject], times: 1)
        try fake.runtime.destroyObject(session, object)
        #expect(fake.health(0) == .inService && fake.health(1) == .inService && fake.health(2) == .stale)
        fake.recover()
        #expect(fake.members.allSatisfy { $0.isInService })
        for store in 0..<3 { #expect(fake.objects(labelled: "gone", on: store) == 0, "member \(store)") }
    }

    @Test("a destroy whose record no member takes fails and leaves the object on every member")
    func destroyUnrecordedFails() throws {
        let fake = try FakeGroup()
        let session = try fake.userSession()
        let object = try fake.runtime.createObject(session, dataObject("kept"))
        for store in fake.stores { store.faults.inject(.error(CK_RV(CKR_DEVICE_ERROR)), on: [.createObject], times: 1) }
        #expect(throws: P11Error.self) { try fake.runtime.destroyObject(session, object) }
        for store in 0..<3 { #expect(fake.objects(labelled: "kept", on: store) == 1, "member \(store)") }
        try fake.runtime.destroyObject(session, object)
        for store in 0..<3 { #expect(fake.objects(labelled: "kept", on: store) == 0, "member \(store)") }
    }

    @Test("an object that may not be destroyed answers CKR_ACTION_PROHIBITED and stays, with no tombstone written")
    func destroyProhibited() throws {
        let fake = try FakeGroup()
        let session = try fake.userSession()
        let object = try fake.runtime.createObject(session, dataObject("fixed") + [Attribute(CKA_DESTROYABLE, bool: false)])
        #expect(throws: P11Error.member(CK_RV(CKR_ACTION_PROHIBITED))) { try fake.runtime.destroyObject(session, object) }
        #expect(fake.members.allSatisfy { $0.isInService })
        fake.recover()
        for store in 0..<3 { #expect(fake.objects(labelled: "fixed", on: store) == 1, "member \(store)") }
    }

    @Test("an attribute change whose record no member takes fails and is set back on every member")
    func attributeChangeUnrecordedUndone() throws {
        let fake = try FakeGroup()
        let session = try fake.userSession()
        let object = try fake.runtime.createObject(session, dataObject("before"))
        for store in fake.stores { store.faults.inject(.error(CK_RV(CKR_DEVICE_ERROR)), on: [.createObject], times: 1) }
        #expect(throws: P11Error.self) {
            try fake.runtime.setAttributeValues(session, object, [Attribute(CKA_LABEL, Array("after".utf8))])
        }
        for store in 0..<3 {
            #expect(fake.objects(labelled: "before", on: store) == 1 && fake.objects(labelled: "after", on: store) == 0, "member \(store)")
        }
    }

    @Test("a session object whose every holder restarted is gone: its handle answers CKR_KEY_HANDLE_INVALID, never another object")
    func sessionObjectGone() throws {
        let fake = try FakeGroup()
        let session = try fake.userSession()
        var template = hmacKey("session key")
        template.removeAll { $0.type == CKA_TOKEN }
        template.append(Attribute(CKA_TOKEN, bool: false))
        let key = try fake.runtime.createObject(session, template)
        for store in fake.stores { store.faults.crash() }
        _ = try? fake.runtime.generateRandom(session, count: 4)
        for store in fake.stores { store.faults.revive() }
        fake.recover()
        #expect(fake.members.allSatisfy { $0.isInService })
        #expect(throws: P11Error.keyHandleInvalid) { try fake.runtime.operationInit(.sign, session, hmac, key: key) }
    }

    @Test("a login a member answers CKR_GENERAL_ERROR once or twice (SoftHSM, while other processes log in) is tried again there; one it answers so three times takes it out until recovery logs it in, and no write of the application meets it not logged in")
    func loginFaultsOnOneMember() throws {
        let fake = try FakeGroup()
        fake.connections[1].faults.inject(.error(CK_RV(CKR_GENERAL_ERROR)), on: [.login], times: 2)
        let session = try fake.userSession()
        #expect(fake.members.allSatisfy { $0.isInService })
        _ = try fake.runtime.createObject(session, dataObject("after-two"))
        for store in 0..<3 { #expect(fake.objects(labelled: "after-two", on: store) == 1) }

        let other = try FakeGroup(seed: 2)
        other.connections[1].faults.inject(.error(CK_RV(CKR_GENERAL_ERROR)), on: [.login], times: 3)
        let session2 = try other.userSession()
        #expect(other.health(1) == .failed, "not logged in, it does not serve")
        _ = try other.runtime.createObject(session2, dataObject("while-out"))
        other.recover()
        #expect(other.members.allSatisfy { $0.isInService })
        _ = try other.runtime.createObject(session2, dataObject("after-recovery"))
        for store in 0..<3 {
            #expect(other.objects(labelled: "while-out", on: store) == 1, "brought up to date on its return")
            #expect(other.objects(labelled: "after-recovery", on: store) == 1)
        }
    }
}
