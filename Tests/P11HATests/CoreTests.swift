// The group core's decisions on fake members, in-process: failover, replay, undo, classification, recovery,
// deadlines and start-up; each test reads as what a user of the group can count on.
import CInterop
import Foundation
import Glibc
@testable import P11HA
import P11HAFake
import Synchronization
import Testing

@Suite struct TheCoreOnFakeMembers {
    @Test("a member's fault on a single call moves the call to a peer, and only that member leaves service")
    func singleCallFailover() throws {
        let fake = try FakeGroup()
        let session = try fake.userSession()
        let key = try fake.runtime.createObject(session, hmacKey("k"))
        for index in 0..<2 { fake.stores[index].faults.inject(.error(CK_RV(CKR_DEVICE_ERROR)), on: [.singlePart]) }
        for round in 0..<6 {
            try fake.runtime.operationInit(.sign, session, hmac, key: key)
            let signature = try fake.runtime.singlePart(.sign, session, Array("round \(round)".utf8), capacity: 64)
            #expect(signature.bytes?.count == 32)
        }
        #expect(fake.health(0) == .failed && fake.health(1) == .failed, "each faulting member was chosen once and left")
        #expect(fake.health(2) == .inService)
    }

    @Test("the caller's errors come back unchanged and no member leaves service")
    func callersErrors() throws {
        let fake = try FakeGroup()
        let session = try fake.userSession()
        let key = try fake.runtime.createObject(session, hmacKey("k"))
        for _ in 0..<6 {
            try fake.runtime.operationInit(.verify, session, hmac, key: key)
            #expect(throws: P11Error.member(CK_RV(CKR_SIGNATURE_INVALID))) {
                try fake.runtime.verify(session, [1, 2, 3], signature: [UInt8](repeating: 0, count: 32))
            }
        }
        #expect(throws: P11Error.objectHandleInvalid) { try fake.runtime.destroyObject(session, ObjectHandle(999_999)) }
        #expect(fake.members.allSatisfy { $0.isInService })
    }

    @Test("an operation in progress continues on a peer when its member crashes, with the same result")
    func operationReplay() throws {
        let fake = try FakeGroup()
        let session = try fake.userSession()
        let key = try fake.runtime.createObject(session, hmacKey("k"))
        try fake.runtime.operationInit(.sign, session, hmac, key: key)
        try fake.runtime.update(.sign, session, Array("first part, ".utf8))
        let running = try fake.runtime.session(session).operation(.sign).member
        fake.stores[running].faults.crash()
        try fake.runtime.update(.sign, session, Array("second part".utf8))
        let replayed = try fake.runtime.final(.sign, session, capacity: 64).bytes
        #expect(fake.health(running) == .failed)

        try fake.runtime.operationInit(.sign, session, hmac, key: key)
        let direct = try fake.runtime.singlePart(.sign, session, Array("first part, second part".utf8), capacity: 64).bytes
        #expect(replayed != nil && replayed == direct)
    }

    @Test("an operation whose mechanism parameter p11ha does not copy is never started again on a peer after its C_*Init: a member fault then ends it with CKR_DEVICE_ERROR, where a parameter p11ha copies is replayed")
    func opaqueParameterNotReplayed() throws {
        let fake = try FakeGroup()
        let session = try fake.userSession()
        let key = try fake.runtime.createObject(session, [
            Attribute(CKA_CLASS, ulong: CKO_SECRET_KEY), Attribute(CKA_KEY_TYPE, ulong: CKK_AES), Attribute(CKA_TOKEN, bool: true),
            Attribute(CKA_VALUE, [UInt8](repeating: 3, count: 32)), Attribute(CKA_ENCRYPT, bool: true), Attribute(CKA_LABEL, Array("aes".utf8)),
        ])
        let iv = [UInt8](repeating: 7, count: 16)
        for (parameter, replayed) in [(Mechanism.Parameter.bytes(iv), true), (.opaque(iv), false)] {
            for store in fake.stores { store.faults.clearFaults() }
            fake.recover()
            try fake.runtime.operationInit(.encrypt, session, Mechanism(CKM_AES_CBC, parameter), key: key)
            let running = try fake.runtime.session(session).operation(.encrypt).member
            fake.stores[running].faults.crash()
            let result = Result { () throws(P11Error) in try fake.runtime.singlePart(.encrypt, session, [UInt8](repeating: 1, count: 32), capacity: 64) }
            if replayed {
                #expect(result.map(\.bytes?.count) == .success(32), "\(parameter): replayed on a peer")
            } else {
                #expect(result.map(\.bytes?.count) == .failure(.deviceError), "\(parameter): not replayed")
            }
        }
    }

    @Test("an operation's state is saved with the member that runs it and restored there, in another session: the digest goes on where it was; members that cannot save states answer as they would directly")
    func operationStateSavedWithItsMember() throws {
        let stores = (0..<3).map { FakeTokenStore(label: "member-\($0)", serial: "SERIAL\($0)", seed: 40 + UInt64($0), savesOperationState: true) }
        try FakeGroup.setUpReplicationKey(on: stores)
        let fake = try FakeGroup(sharing: stores)
        let sha256 = Mechanism(CK_MECHANISM_TYPE(CKM_SHA256))
        let rt = fake.runtime
        let first = try fake.userSession(), second = try fake.userSession()
        try rt.operationInit(.digest, first, sha256, key: nil)
        try rt.update(.digest, first, Array("a message ".utf8))
        let running = try rt.session(first).operation(.digest).member
        let saved = try rt.operationState(first)
        try rt.setOperationState(second, saved, encryptionKey: nil, authenticationKey: nil)
        #expect(try rt.session(second).operation(.digest).member == running, "restored on the member that saved it")
        try rt.update(.digest, second, Array("in two parts".utf8))
        let restored = try rt.final(.digest, second, capacity: 64).bytes
        try rt.operationInit(.digest, second, sha256, key: nil)
        let whole = try rt.singlePart(.digest, second, Array("a message in two parts".utf8), capacity: 64).bytes
        #expect(restored != nil && restored == whole)
        // The first session's digest is still its own.
        try rt.update(.digest, first, Array("in two parts".utf8))
        #expect(try rt.final(.digest, first, capacity: 64).bytes == whole)

        // What cannot be saved or restored, and why.
        #expect(code { () throws(P11Error) in _ = try rt.operationState(first) } == CK_RV(CKR_OPERATION_NOT_INITIALIZED))
        #expect(code { () throws(P11Error) in _ = try rt.setOperationState(first, Array("garbage".utf8), encryptionKey: nil, authenticationKey: nil) } == CK_RV(CKR_SAVED_STATE_INVALID))
        let key = try rt.createObject(first, hmacKey("k"))
        try rt.operationInit(.sign, first, hmac, key: key)
        #expect(code { () throws(P11Error) in _ = try rt.operationState(first) } == CK_RV(CKR_STATE_UNSAVEABLE),
                "the fake saves no operation with a key (the member's answer)")
        try rt.operationInit(.digest, first, sha256, key: nil)
        #expect(code { () throws(P11Error) in _ = try rt.operationState(first) } == CK_RV(CKR_STATE_UNSAVEABLE),
                "two operations, perhaps on two members")

        // A state whose member is out of service cannot be restored; a restored operation whose member fails ends.
        try rt.operationInit(.digest, second, sha256, key: nil)
        let again = try rt.operationState(second)
        let owner = try rt.session(second).operation(.digest).member
        try rt.setOperationState(first, again, encryptionKey: nil, authenticationKey: nil)
        #expect((try? rt.session(first).operation(.sign)) == nil, "the restored state replaces the session's operations")
        stores[owner].faults.crash()
        #expect(code { () throws(P11Error) in _ = try rt.update(.digest, first, [1]) } == CK_RV(CKR_DEVICE_ERROR),
                "not replayed: p11ha does not know the updates that made the state")
        #expect(code { () throws(P11Error) in _ = try rt.setOperationState(second, again, encryptionKey: nil, authenticationKey: nil) } == CK_RV(CKR_SAVED_STATE_INVALID))
    }

    @Test("a write that a later member refuses is undone where it succeeded, and the caller gets that member's code")
    func partialWriteUndone() throws {
        let fake = try FakeGroup()
        let session = try fake.userSession()
        fake.stores[2].faults.inject(.error(CK_RV(CKR_TEMPLATE_INCONSISTENT)), on: [.createObject], times: 2)
        #expect(throws: P11Error.member(CK_RV(CKR_TEMPLATE_INCONSISTENT))) {
            try fake.runtime.createObject(session, dataObject("refused"))
        }
        for store in 0..<3 { #expect(fake.objects(labelled: "refused", on: store) == 0, "member \(store)") }
        #expect(fake.members.allSatisfy { $0.isInService })
    }

    @Test("a write that a later member refuses once, and takes when asked again, holds on every member")
    func passingRefusalAskedAgain() throws {
        let fake = try FakeGroup()
        let session = try fake.userSession()
        fake.stores[2].faults.inject(.error(CK_RV(CKR_TEMPLATE_INCONSISTENT)), on: [.createObject], times: 1)
        _ = try fake.runtime.createObject(session, dataObject("taken"))
        for store in 0..<3 { #expect(fake.objects(labelled: "taken", on: store) == 1, "member \(store)") }
        #expect(fake.members.allSatisfy { $0.isInService })
    }

    @Test("a generated key pair that a member refuses once to take (its token copy or its public half) reaches every member")
    func generatedPairRefusedOnce() throws {
        // SoftHSM answered CKR_TEMPLATE_INCONSISTENT, once, to a write of the key pair's own template (the chaos
        // test, rarely); the application's C_GenerateKeyPair failed with it.
        let refusals: [(String, Int, FakeCall, CK_RV)] = [
            ("the maker's own token copy", 0, .unwrapKey, CKR_TEMPLATE_INCONSISTENT), ("a peer's token copy", 1, .unwrapKey, CKR_TEMPLATE_INCONSISTENT),
            ("a peer's public half", 2, .createObject, CKR_TEMPLATE_INCONSISTENT),
            // SoftHSM's passing CKR_GENERAL_ERROR: the peer left service stale, and the key was on its maker alone.
            ("a peer's token copy, CKR_GENERAL_ERROR", 1, .unwrapKey, CKR_GENERAL_ERROR),
        ]
        for (what, store, call, code) in refusals {
            let fake = try FakeGroup()
            let session = try fake.userSession()
            fake.stores[store].faults.inject(.error(CK_RV(code)), on: [call], times: 1)
            let p256: [UInt8] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07]
            let named = [Attribute(CKA_TOKEN, bool: true), Attribute(CKA_LABEL, Array("pair".utf8)), Attribute(CKA_ID, [0x12])]
            _ = try fake.runtime.generateKeyPair(session, Mechanism(CK_MECHANISM_TYPE(CKM_EC_KEY_PAIR_GEN)),
                                                 publicTemplate: named + [Attribute(CKA_EC_PARAMS, p256), Attribute(CKA_VERIFY, bool: true)],
                                                 privateTemplate: named + [Attribute(CKA_SIGN, bool: true), Attribute(CKA_PRIVATE, bool: true)])
            #expect(fake.members.allSatisfy { $0.isInService }, "\(what)")
            for member in 0..<3 {
                for objectClass in [CKO_PRIVATE_KEY, CKO_PUBLIC_KEY] {
                    let copies = fake.stores[member].tokenObjects(matching: [Attribute(CKA_CLASS, ulong: objectClass), Attribute(CKA_LABEL, Array("pair".utf8))])
                    #expect(copies.count == 1, "\(what): member \(member) holds \(copies.count) \(objectClass == CKO_PRIVATE_KEY ? "private" : "public") keys")
                }
            }
        }
    }

    @Test("a member that misses a write leaves service stale, and recovery copies what it missed before it serves again")
    func staleMemberResynchronized() throws {
        let fake = try FakeGroup()
        let session = try fake.userSession()
        fake.stores[1].faults.inject(.error(CK_RV(CKR_DEVICE_ERROR)), on: [.createObject], times: 1)
        _ = try fake.runtime.createObject(session, dataObject("missed"))
        #expect(fake.health(1) == .stale)
        #expect(fake.objects(labelled: "missed", on: 1) == 0)
        fake.recover()
        #expect(fake.health(1) == .inService)
        for store in 0..<3 { #expect(fake.objects(labelled: "missed", on: store) == 1, "member \(store)") }
    }

    @Test("a returning member serves again when an object it missed could not be copied because another writer was changing it; the catch-up after its return brings that object")
    func returnsBesideObjectInFlux() throws {
        let clock = SimulatedClock()
        let fake = try FakeGroup(clock: clock)
        let session = try fake.userSession()
        fake.stores[2].faults.crash()
        let template = { (label: String) in
            [Attribute(CKA_TOKEN, bool: true), Attribute(CKA_LABEL, Array(label.utf8)), Attribute(CKA_SIGN, bool: true), Attribute(CKA_VALUE_LEN, ulong: 32)]
        }
        for label in ["first", "second"] {
            _ = try fake.runtime.generateKey(session, Mechanism(CK_MECHANISM_TYPE(CKM_GENERIC_SECRET_KEY_GEN)), template(label))
        }
        #expect(fake.health(2) != .inService)
        fake.stores[2].faults.revive()
        // The holder's copy changed under the copy (another host renamed or destroyed it meanwhile): its placing is
        // refused once with a caller-class code. Under other hosts' steady writes some object is always so.
        fake.stores[2].faults.inject(.error(CK_RV(CKR_TEMPLATE_INCONSISTENT)), on: [.unwrapKey], times: 1)
        fake.recover()
        #expect(fake.health(2) == .inService, "held out for an object in flux")
        #expect(fake.objects(labelled: "first", on: 2) + fake.objects(labelled: "second", on: 2) == 1)
        // The catch-up after its return brings the other, once it can no longer be a write on its way.
        clock.advance(by: fake.group.writeSettles)
        fake.group.catchUpWanted.store(true, ordering: .releasing)
        fake.recover()
        for store in 0..<3 {
            #expect(fake.objects(labelled: "first", on: store) == 1 && fake.objects(labelled: "second", on: store) == 1, "member \(store)")
        }
        #expect(fake.members.allSatisfy { $0.isInService })
    }

    @Test("an object whose copy on a member was replaced behind this process (another process's repair destroyed one of two copies) is sized, renamed and destroyed through the copy found there again, never answered CKR_OBJECT_HANDLE_INVALID")
    func replacedCopyFoundAgain() throws {
        let fake = try FakeGroup()
        let session = try fake.userSession()
        let object = try fake.runtime.createObject(session, dataObject("replaced"))
        // Another program replaces the copy on member 0, the first one every read goes to: same object, new handle.
        try fake.asAnotherProgram(on: 0) { token, s in
            let old = try token.findObjects(s, [Attribute(CKA_LABEL, Array("replaced".utf8))])
            try #require(old.count == 1)
            let template = try token.readAttributes(s, old[0], [CKA_CLASS, CKA_TOKEN, CKA_PRIVATE, CKA_LABEL, CKA_VALUE])
            try token.destroyObject(s, old[0])
            _ = try token.createObject(s, zip([CKA_CLASS, CKA_TOKEN, CKA_PRIVATE, CKA_LABEL, CKA_VALUE], template).map { Attribute($0, $1 ?? []) })
        }
        #expect(try fake.runtime.objectSize(session, object) > 0)
        try fake.runtime.setAttributeValues(session, object, [Attribute(CKA_LABEL, Array("renamed".utf8))])
        try fake.runtime.destroyObject(session, object)
        for store in 0..<3 { #expect(fake.objects(labelled: "replaced", on: store) + fake.objects(labelled: "renamed", on: store) == 0, "member \(store)") }
        #expect(fake.members.allSatisfy { $0.isInService })
    }

    @Test("an object destroyed while a member was away is destroyed there when it returns, never brought back")
    func destroyWhileAway() throws {
        let fake = try FakeGroup()
        let session = try fake.userSession()
        let object = try fake.runtime.createObject(session, dataObject("doomed"))
        fake.stores[2].faults.crash()
        try fake.runtime.destroyObject(session, object)
        #expect(fake.health(2) != .inService)
        fake.stores[2].faults.revive()
        fake.recover()
        #expect(fake.health(2) == .inService)
        for store in 0..<3 { #expect(fake.objects(labelled: "doomed", on: store) == 0, "member \(store)") }
    }

    @Test("an object made again after its twin was destroyed (same class, value, label and ID) is a new object: a catch-up keeps it on every member")
    func madeAgainAfterDestroy() throws {
        let fake = try FakeGroup()
        let session = try fake.userSession()
        try fake.runtime.destroyObject(session, try fake.runtime.createObject(session, dataObject("config")))
        _ = try fake.runtime.createObject(session, dataObject("config"))
        for store in 0..<3 { #expect(fake.objects(labelled: "config", on: store) == 1, "member \(store)") }
        fake.group.catchUpWanted.store(true, ordering: .releasing)
        fake.recover()
        for store in 0..<3 { #expect(fake.objects(labelled: "config", on: store) == 1, "member \(store) after a catch-up") }
    }

    @Test("an object of the same value as a recorded one, under a label no record gave it (the application's write in flight, its record not written yet), is left alone by a catch-up, not destroyed as a second copy")
    func lookAlikeWithoutRecordIsLeftAlone() throws {
        let fake = try FakeGroup()
        let session = try fake.userSession()
        _ = try fake.runtime.createObject(session, dataObject("first", value: [7]))
        // As a write of the application leaves it between its copies and its record: on the members, undescribed.
        for store in fake.stores.indices {
            try fake.asAnotherProgram(on: store) { token, s in
                _ = try token.createObject(s, dataObject("in-flight", value: [7]))
                token.closeSession(s)
            }
        }
        fake.group.catchUpWanted.store(true, ordering: .releasing)
        fake.recover()
        for store in 0..<3 {
            #expect(fake.objects(labelled: "in-flight", on: store) == 1 && fake.objects(labelled: "first", on: store) == 1, "member \(store)")
        }
        #expect(fake.members.allSatisfy { $0.isInService })
    }

    @Test("another process's catch-up between an application's rename on the members and its record leaves the new label: a rename that returns CKR_OK is never set back")
    func catchUpBesideRename() throws {
        let (clock, first, second, session, object) = try twoProcesses()
        // The rename's record waits on member 0, the first it is written to: every member holds the new label then,
        // none its record.
        let outcome = Synchronization.Mutex<Result<Void, P11Error>?>(nil)
        let runtime = first.runtime
        let renamed = try heldWrite(first, member: 0) {
            let result = Result { () throws(P11Error) in
                try runtime.setAttributeValues(session, object, [Attribute(CKA_LABEL, Array("after".utf8))])
            }
            outcome.withLock { $0 = result }
        }
        second.group.catchUpWanted.store(true, ordering: .releasing)
        second.recover()
        for store in 0..<3 { #expect(first.objects(labelled: "after", on: store) == 1, "member \(store) beside the rename") }
        first.connections[0].faults.releaseHangs()
        renamed.wait()
        #expect(throws: Never.self) { try outcome.withLock { $0 }?.get() }
        // Long after, with the record read: nothing to set back either.
        clock.advance(by: second.group.writeSettles + 1)
        second.group.catchUpWanted.store(true, ordering: .releasing)
        second.recover()
        for store in 0..<3 {
            #expect(first.objects(labelled: "after", on: store) == 1 && first.objects(labelled: "before", on: store) == 0,
                    "member \(store) after the rename")
        }
        #expect(first.members.allSatisfy(\.isInService) && second.members.allSatisfy(\.isInService))
    }

    @Test("a write's record on its way to a member is left to the write by another process: its watch asks for no catch-up at the first look, and its catch-up does not write the record a second time")
    func recordOnItsWay() throws {
        let (clock, first, second, session, object) = try twoProcesses()
        let before = try records(first.stores[2]).count
        // The destroy's tombstone is written to members 0 and 1, and waits on member 2, the last. (A rename's
        // record would do too, but the watch asks for a catch-up after any recent rename of another process.)
        let runtime = first.runtime
        let destroyed = try heldWrite(first, member: 2) { _ = try? runtime.destroyObject(session, object) }
        #expect(try records(first.stores[1]).count == before + 1 && records(first.stores[2]).count == before)
        second.group.catchUpWanted.store(false, ordering: .releasing)
        second.runtime.recovery.watch(second.group)
        let afterOneLook = second.group.catchUpWanted.load(ordering: .acquiring)
        #expect(!afterOneLook, "one look at a young record proves nothing")
        second.runtime.recovery.watch(second.group)
        let afterTwoLooks = second.group.catchUpWanted.load(ordering: .acquiring)
        #expect(afterTwoLooks, "lacked at two looks: a catch-up")
        second.recover()
        #expect(try records(first.stores[2]).count == before, "the catch-up left the record to the write")
        let asked = second.group.catchUpAgainAt.load(ordering: .acquiring)
        #expect(asked != 0, "and asked for a catch-up when it can no longer be on its way")
        first.connections[2].faults.releaseHangs()
        destroyed.wait()
        clock.advance(by: second.group.writeSettles + 1)
        second.recover()
        let stamps = try records(first.stores[2]).map(\.stamp)
        #expect(stamps.count == before + 1 && Set(stamps).count == stamps.count, "each record once on member 2")
        for store in 0..<3 { #expect(first.objects(labelled: "before", on: store) == 0, "member \(store)") }
        #expect(first.members.allSatisfy { $0.isInService } && second.members.allSatisfy { $0.isInService })
    }

    @Test("a label changed on a member behind p11ha's back is set back by a catch-up once it has stayed longer than a write can take")
    func changeWithoutRecordIsSetBack() throws {
        let (clock, fake) = try labelChangedBehindP11HA()
        #expect(fake.objects(labelled: "changed", on: 1) == 1, "a write may still be under way: it waits")
        #expect(fake.group.catchUpAgainAt.load(ordering: .acquiring) == clock.milliseconds + fake.group.writeSettles,
                "a catch-up is asked for when it may be set back")
        clock.advance(by: fake.group.writeSettles)
        fake.recover()
        #expect(fake.objects(labelled: "kept", on: 1) == 1 && fake.objects(labelled: "changed", on: 1) == 0)
    }

    @Test("another host's acknowledged rename whose records this process cannot see (SoftHSM hides them after a create of its own) is not set back while every member holds it; p11hactl sync's kind of repair, which has read every record, still sets back such a value")
    func renameWithHiddenRecordsStays() throws {
        let clock = SimulatedClock()
        let first = try FakeGroup(clock: clock, staleIndexes: true)
        let second = try FakeGroup(sharing: first.stores, clock: clock)
        let kept = try first.runtime.createObject(try first.userSession(), dataObject("kept"))
        let session = try second.userSession()
        try first.runtime.setAttributeValues(try first.userSession(), kept, [Attribute(CKA_LABEL, Array("renamed".utf8))])
        // The second process's create takes each store's generation along: the rename's records stay out of its view.
        _ = try second.runtime.createObject(session, dataObject("other"))
        second.group.catchUpWanted.store(true, ordering: .releasing)
        second.recover()
        clock.advance(by: second.group.writeSettles + 1)
        second.group.catchUpWanted.store(true, ordering: .releasing)
        second.recover()
        for store in 0..<3 {
            #expect(first.objects(labelled: "renamed", on: store) == 1 && first.objects(labelled: "kept", on: store) == 0, "member \(store)")
        }

        // A repair allowed to overrule such values (`p11hactl sync`, a fresh process) sets back a value no record
        // gives, held by every member: here one changed behind p11ha's back on all three.
        for store in 0..<3 { try first.relabelBehindP11HA(on: store, "renamed", to: "everywhere") }
        let group = first.group
        let reached = try group.members.map { ReplicaKeeper.Reached(member: $0, session: try $0.token.openSession(readWrite: true)) }
        defer { for r in reached { r.member.token.closeSession(r.session) } }
        for (index, target) in reached.enumerated() {
            let peers = reached.enumerated().filter { $0.offset != index }.map(\.element)
            for _ in 0..<2 {
                _ = try first.runtime.replicas.repair(target, peers: peers, in: group, loggedIn: true, mayOverruleAlike: true)
                clock.advance(by: group.writeSettles + 1)
            }
        }
        for store in 0..<3 { #expect(first.objects(labelled: "renamed", on: store) == 1, "member \(store)") }
    }

    @Test("a compaction leaves each live object one record on every member, and a destroyed one none once its tombstone is past the retention; objects stay as they were, and another process writes nothing back")
    func compaction() throws {
        let settings = ["record-retention = 1s", "scrub-interval = 1s"]
        let first = try FakeGroup(settings: settings)
        let second = try FakeGroup(sharing: first.stores, settings: settings)
        let session = try first.userSession()
        let kept = try first.runtime.createObject(session, dataObject("kept"))
        for n in 1...3 { try first.runtime.setAttributeValues(session, kept, [Attribute(CKA_LABEL, Array("kept-\(n)".utf8))]) }
        try first.runtime.destroyObject(session, try first.runtime.createObject(session, dataObject("doomed")))
        for store in 0..<3 { #expect(first.records(on: store) == 6, "member \(store): 4 records of kept, 2 of doomed") }
        // The other process reads every record now: it must not write back those the compaction removes.
        _ = try second.userSession()
        second.recover()
        usleep(1_100_000)
        // Three catch-ups by `process`, then each member holds one snapshot of kept and nothing of doomed.
        func expectCompacted(after process: FakeGroup, _ when: String) {
            for _ in 0..<3 {
                process.group.catchUpWanted.store(true, ordering: .releasing)
                process.recover()
            }
            for store in 0..<3 {
                #expect(first.records(on: store) == 1, "member \(store) \(when): one snapshot of kept")
                #expect(first.objects(labelled: "kept-3", on: store) == 1 && first.objects(labelled: "doomed", on: store) == 0,
                        "member \(store) \(when)")
            }
        }
        expectCompacted(after: first, "after the compaction")
        expectCompacted(after: second, "after the other process's catch-up")
        #expect(first.members.allSatisfy(\.isInService) && second.members.allSatisfy(\.isInService))
        // The compacted object is still the application's: renamed and destroyed through either process.
        try first.runtime.setAttributeValues(session, kept, [Attribute(CKA_LABEL, Array("kept-4".utf8))])
        try first.runtime.destroyObject(session, kept)
        for store in 0..<3 { #expect(first.objects(labelled: "kept-4", on: store) == 0, "member \(store)") }
    }

    @Test("a compaction round past its deadline looks for copies of one tombstone past the retention only, leaves the others for the next round, and says there is more")
    func compactionRoundKeepsItsDeadline() throws {
        let first = try FakeGroup(settings: ["record-retention = 1s", "scrub-interval = 1s"])
        let session = try first.userSession()
        for n in 0..<5 { try first.runtime.destroyObject(session, try first.runtime.createObject(session, dataObject("doomed-\(n)"))) }
        usleep(1_100_000)
        let group = first.group
        let reached = try group.members.map { ReplicaKeeper.Reached(member: $0, session: try $0.token.openSession(readWrite: true)) }
        defer { for r in reached { r.member.token.closeSession(r.session) } }
        let leases = try reached.map { try #require(try Lease.acquire($0.member, $0.session, clock: group.replicaClock, duration: .seconds(30))) }
        defer { for lease in leases { lease.release() } }
        func searches() -> Int { first.stores.map { $0.faults.count(.findObjects) }.reduce(0, +) }
        let before = searches()
        let late = try #require(try first.runtime.replicas.compact(reached, in: group, leases: leases, deadline: group.replicaClock.milliseconds))
        // Two reads of each member's records (one search each), and the look for copies of one tombstone only (each
        // round gets on): per member, a search for its label, one for its ID, one for the replication key at most
        // (all five tombstones: 32).
        let lookedFor = searches() - before - 2 * reached.count
        #expect(lookedFor > 0 && lookedFor <= 3 * reached.count, "\(lookedFor) searches for copies")
        #expect(late.more && late.expired == 0 && late.removed == 0, "\(late)")
        let onTime = try #require(try first.runtime.replicas.compact(reached, in: group, leases: leases))
        #expect(!onTime.more && onTime.expired == 15, "a tombstone on each of 3 members, 5 times: \(onTime)")
        for store in 0..<3 { #expect(first.records(on: store) == 0, "member \(store)") }
    }

    @Test("a member that missed 100 writes gets their records in a few batches, each record of which every process counts as held; a compaction removes records from a batch by writing again those that stay")
    func recordBatches() throws {
        let settings = ["record-retention = 1s", "scrub-interval = 1s"]
        let fake = try FakeGroup(settings: settings)
        let session = try fake.userSession()
        fake.stores[2].faults.inject(.error(CK_RV(CKR_DEVICE_ERROR)), on: [.createObject], times: 1)
        var objects: [ObjectHandle] = []
        for n in 0..<100 { objects.append(try fake.runtime.createObject(session, dataObject("o\(n)", value: [UInt8(n)]))) }
        #expect(fake.health(2) == .stale)
        fake.recover()
        #expect(fake.health(2) == .inService)
        let held = try recordStamps(fake.stores[0])
        #expect(held.count == 100 && fake.records(on: 0) == 100, "one record per write on a member that took them")
        let batches = ReplicaRecord.batches(try records(fake.stores[0]))
        #expect(batches.count > 1 && batches.count < 10 && fake.records(on: 2) == batches.count,
                "\(fake.records(on: 2)) record objects on the returning member, \(batches.count) batches expected")
        let returned = try recordStamps(fake.stores[2])
        #expect(returned == held)
        // Another process reads them as held: it writes no record again.
        let second = try FakeGroup(sharing: fake.stores, settings: settings)
        _ = try second.userSession()
        second.recover()
        #expect(second.members.allSatisfy { $0.isInService } && fake.records(on: 2) == batches.count)

        // A rename (its two records become a snapshot) and a destroy (its records go after the retention) of
        // objects whose creation records are in the first batch.
        try fake.runtime.setAttributeValues(session, objects[1], [Attribute(CKA_LABEL, Array("renamed".utf8))])
        try fake.runtime.destroyObject(session, objects[2])
        usleep(1_100_000)
        for _ in 0..<3 {
            fake.group.catchUpWanted.store(true, ordering: .releasing)
            fake.recover()
        }
        let left = try recordStamps(fake.stores[0])
        #expect(left.count == 99, "98 creations and the renamed object's snapshot: \(left.count)")
        for store in 1..<3 {
            let stamps = try recordStamps(fake.stores[store])
            #expect(stamps == left, "member \(store)")
        }
        #expect(fake.records(on: 2) == batches.count + 1, "the batches, the first written again without two records, and the snapshot")
        for store in 0..<3 {
            #expect(fake.objects(labelled: "renamed", on: store) == 1 && fake.objects(labelled: "o2", on: store) == 0
                    && fake.objects(labelled: "o3", on: store) == 1, "member \(store)")
        }
        #expect(fake.members.allSatisfy { $0.isInService })
    }

    @Test("objects the members held before p11ha are adopted at the first sync under one identity each on every member, their records written in a few batches")
    func adoptionInBatches() throws {
        let fake = try FakeGroup(prepare: { stores in
            for store in stores {
                let token = store.connection()
                try! token.connect()
                let s = try! token.openSession(readWrite: true)
                try! token.login(s, userType: CK_USER_TYPE(CKU_USER), pin: Secret(FakeGroup.userPIN))
                for n in 0..<100 { _ = try! token.createObject(s, dataObject("pre-\(n)", value: [UInt8(n)])) }
                token.disconnect()
            }
        })
        _ = try fake.userSession()
        for _ in 0..<2 {
            fake.group.catchUpWanted.store(true, ordering: .releasing)
            fake.recover()
        }
        let first = try records(fake.stores[0])
        #expect(first.count == 100 && first.allSatisfy { $0.operation == .adopt }, "\(first.count) records, \(Set(first.map(\.stamp)).count) stamps, \(Set(first.map(\.object)).count) objects, \(fake.records(on: 0)) record objects")
        for store in 0..<3 {
            let stamps = try recordStamps(fake.stores[store])
            #expect(stamps == Set(first.map(\.stamp)), "member \(store) holds every adoption's record")
            #expect(fake.records(on: store) < 10, "member \(store): \(fake.records(on: store)) record objects for 100 records")
            #expect(fake.objects(labelled: "pre-7", on: store) == 1, "member \(store)")
        }
        #expect(fake.members.allSatisfy { $0.isInService })
    }

    @Test("a rename whose object the records in reach do not describe, while a member whose records may (another process renamed it there) cannot be read, is refused with nothing changed")
    func writeRefusedWithoutIdentity() throws {
        let first = try FakeGroup()
        let second = try FakeGroup(sharing: first.stores)
        let session = try first.userSession()
        let object = try first.runtime.createObject(session, dataObject("x"))
        let other = try second.userSession()
        try second.runtime.findObjectsInit(other, [Attribute(CKA_LABEL, Array("x".utf8))])
        let found = try second.runtime.findObjects(other, max: 4)
        try second.runtime.findObjectsFinal(other)
        #expect(found.count == 1)
        // The first process's rename reaches every member, its record members 1 and 2 only.
        first.connections[0].faults.inject(.error(CK_RV(CKR_DEVICE_ERROR)), on: [.createObject], times: 1)
        try first.runtime.setAttributeValues(session, object, [Attribute(CKA_LABEL, Array("y".utf8))])
        // The second process can read member 0 only.
        for member in 1..<3 { second.connections[member].faults.inject(.error(CK_RV(CKR_DEVICE_ERROR))) }
        #expect(throws: P11Error.self) {
            try second.runtime.setAttributeValues(other, found[0], [Attribute(CKA_LABEL, Array("z".utf8))])
        }
        for store in 0..<3 {
            #expect(first.objects(labelled: "y", on: store) == 1 && first.objects(labelled: "z", on: store) == 0, "member \(store)")
        }
        #expect(second.members[0].isInService, "no member is blamed for it")
    }

    @Test("a key generated through the group is carried, wrapped, to every member and signs alike there")
    func generatedKeyReplicated() throws {
        let fake = try FakeGroup()
        let session = try fake.userSession()
        let template = [Attribute(CKA_TOKEN, bool: true), Attribute(CKA_LABEL, Array("gen".utf8)),
                        Attribute(CKA_SIGN, bool: true), Attribute(CKA_VALUE_LEN, ulong: 32)]
        let key = try fake.runtime.generateKey(session, Mechanism(CK_MECHANISM_TYPE(CKM_GENERIC_SECRET_KEY_GEN)), template)
        for store in 0..<3 { #expect(fake.objects(labelled: "gen", on: store) == 1, "member \(store)") }
        var signatures = Set<[UInt8]>()
        for member in 0..<3 {
            // Only `member` can sign: the others fail their start of the operation.
            for other in 0..<3 where other != member { fake.stores[other].faults.inject(.error(CK_RV(CKR_DEVICE_ERROR)), on: [.operationInit]) }
            let served = fake.members[member].served.load(ordering: .relaxed)
            try fake.runtime.operationInit(.sign, session, hmac, key: key)
            signatures.insert(try fake.runtime.singlePart(.sign, session, [7, 7, 7], capacity: 64).bytes ?? [])
            #expect(fake.members[member].served.load(ordering: .relaxed) == served + 1)
            for store in fake.stores { store.faults.clearFaults() }
            fake.recover()
            #expect(fake.members.allSatisfy { $0.isInService })
        }
        #expect(signatures.count == 1, "the copies on every member are one key")
    }

    @Test("a generated key whose copies every other member fails is still made: its source holds it, and the others receive it when they return")
    func generatedKeyWhenCopiesFail() throws {
        let fake = try FakeGroup()
        let session = try fake.userSession()
        for store in 1..<3 { fake.stores[store].faults.inject(.error(CK_RV(CKR_DEVICE_ERROR)), on: [.unwrapKey], times: 1) }
        let template = [Attribute(CKA_TOKEN, bool: true), Attribute(CKA_LABEL, Array("lonely".utf8)),
                        Attribute(CKA_SIGN, bool: true), Attribute(CKA_VALUE_LEN, ulong: 32)]
        _ = try fake.runtime.generateKey(session, Mechanism(CK_MECHANISM_TYPE(CKM_GENERIC_SECRET_KEY_GEN)), template)
        #expect(fake.health(1) == .stale && fake.health(2) == .stale)
        fake.recover()
        #expect(fake.members.allSatisfy { $0.isInService })
        for store in 0..<3 { #expect(fake.objects(labelled: "lonely", on: store) == 1, "member \(store)") }
    }

    @Test("a key pair whose first member fails while the group makes it, in a process that ends at once (pkcs11-tool), leaves that member no second pair of its label when it returns")
    func halfMadePairOutlivesNoProcess() throws {
        // The first member fails right after making the pair (it answers nothing more: carrying fails, and so would
        // destroying what it made), or once it holds its own token copy of the private key (the public half fails).
        let moments: [(String, Set<FakeCall>)] = [
            ("right after making it", [.wrapKey, .unwrapKey, .destroyObject, .attributeValues, .createObject, .findObjects, .setAttributeValues]),
            ("at the public half", [.createObject, .destroyObject]),
        ]
        for (moment, calls) in moments {
            let clock = SimulatedClock()
            let first = try FakeGroup(clock: clock)
            let stores = first.stores
            let session = try first.userSession()
            stores[0].faults.inject(.error(CK_RV(CKR_DEVICE_ERROR)), on: calls)
            let p256: [UInt8] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07]
            let named = [Attribute(CKA_TOKEN, bool: true), Attribute(CKA_LABEL, Array("pair".utf8)), Attribute(CKA_ID, [0x12])]
            _ = try first.runtime.generateKeyPair(session, Mechanism(CK_MECHANISM_TYPE(CKM_EC_KEY_PAIR_GEN)),
                                                  publicTemplate: named + [Attribute(CKA_EC_PARAMS, p256), Attribute(CKA_VERIFY, bool: true)],
                                                  privateTemplate: named + [Attribute(CKA_SIGN, bool: true), Attribute(CKA_PRIVATE, bool: true)])
            #expect(!first.members[0].isInService, "\(moment)")
            // The process ends before the member returns; another one brings it back.
            first.runtime.shutdown()
            stores[0].faults.clearFaults()
            let second = try FakeGroup(sharing: stores, clock: clock)
            _ = try second.userSession()
            for _ in 0..<2 {
                second.group.catchUpWanted.store(true, ordering: .releasing)
                second.recover()
            }
            // What a member in service lacks with its records, all younger than a write can take, may be a write on
            // its way there: the catch-up for it comes once it is older.
            clock.advance(by: second.group.writeSettles)
            second.recover()
            for store in 0..<3 {
                for objectClass in [CKO_PRIVATE_KEY, CKO_PUBLIC_KEY] {
                    let copies = stores[store].tokenObjects(matching: [Attribute(CKA_CLASS, ulong: objectClass), Attribute(CKA_LABEL, Array("pair".utf8))])
                    #expect(copies.count == 1, "\(moment): member \(store) holds \(copies.count) \(objectClass == CKO_PRIVATE_KEY ? "private" : "public") keys labelled pair")
                }
            }
        }
    }

    @Test("a renamed token object is found again under its new name when the login ends and starts again")
    func renamedObjectAfterLogout() throws {
        let fake = try FakeGroup()
        let session = try fake.userSession()
        let object = try fake.runtime.createObject(session, dataObject("before"))
        try fake.runtime.setAttributeValues(session, object, [Attribute(CKA_LABEL, Array("after".utf8))])
        try fake.runtime.logout(session)
        try fake.runtime.login(session, userType: CK_USER_TYPE(CKU_USER), pin: Secret(FakeGroup.userPIN))
        let answer = try fake.runtime.attributeValues(session, object, [AttributeQuery(CKA_LABEL, capacity: 16)])
        #expect(answer.rv == CKR_OK && answer.answers[0].value == Array("after".utf8))
    }

    @Test("a member that hangs is failed over after the operation-timeout; the call returns")
    func hangingMember() throws {
        let fake = try FakeGroup(operationTimeout: "200ms")
        let session = try fake.userSession()
        let key = try fake.runtime.createObject(session, hmacKey("k"))
        fake.stores[0].faults.inject(.hang, on: [.operationInit, .singlePart])
        defer { fake.stores[0].faults.clearFaults() }
        for _ in 0..<4 {
            try fake.runtime.operationInit(.sign, session, hmac, key: key)
            #expect(try fake.runtime.singlePart(.sign, session, [1], capacity: 64).bytes?.count == 32)
        }
        #expect(fake.health(0) == .failed)
        #expect(fake.members[0].token.callsOverdue >= 1, "the hung call, past its deadline, still holds its worker, not the caller")
    }

    @Test("each thread's calls go to a worker of its own, which stops when the thread ends: threads that come and go leave no worker behind")
    func workersEndWithTheirThreads() throws {
        let fake = try FakeGroup(operationTimeout: "5s")
        let sessions = try (0..<6).map { _ in try fake.userSession() }
        let runtime = fake.runtime
        final class Seen: @unchecked Sendable {
            weak var worker: AnyObject?
            var errors = 0
        }
        let seen = sessions.map { _ in Seen() }
        for round in 0..<3 {
            let threads = DispatchGroup()
            for (session, record) in zip(sessions, seen) {
                threads.enter()
                Thread.detachNewThread {
                    for _ in 0..<20 where (try? runtime.generateRandom(session, count: 16))?.count != 16 { record.errors += 1 }
                    record.worker = Executor.currentThreadWorker
                    threads.leave()
                }
            }
            #expect(threads.wait(timeout: .now() + 10) == .success, "round \(round): threads still calling after 10 s")
            #expect(seen.allSatisfy { $0.errors == 0 })
            // Every worker is freed once its thread has ended and it has stopped (a worker left waiting for a
            // thread that is gone would be kept, with its thread, for ever).
            waitWhile({ seen.contains { $0.worker != nil } }, upTo: .seconds(5), polling: .milliseconds(5))
            #expect(seen.allSatisfy { $0.worker == nil }, "round \(round): workers of ended threads still alive")
        }
    }

    @Test("C_Initialize with a member that never answers starts the group without it; C_Finalize returns")
    func startWithSilentMember() throws {
        let fake = try FakeGroup(operationTimeout: "200ms") { stores in
            stores[2].faults.inject(.hang, on: [.connect])
        }
        #expect(fake.health(2) == .failed)
        let session = try fake.userSession()
        _ = try fake.runtime.createObject(session, dataObject("while-silent"))
        #expect(fake.objects(labelled: "while-silent", on: 0) == 1)
        fake.runtime.shutdown()
    }

    @Test("every member down: calls fail at once with a member fault; the session works again when one returns")
    func allDown() throws {
        let fake = try FakeGroup()
        let session = try fake.userSession()
        for store in fake.stores { store.faults.crash() }
        #expect(throws: P11Error.self) { try fake.runtime.generateRandom(session, count: 8) }
        #expect(fake.members.allSatisfy { !$0.isInService })
        fake.stores[1].faults.revive()
        fake.recover()
        #expect(fake.health(1) == .inService)
        #expect(try fake.runtime.generateRandom(session, count: 8).count == 8)
    }
}

@Suite struct ErrorClassification {
    @Test("member faults are device-class codes from a member or a missed deadline; p11ha's own codes never are")
    func faults() {
        #expect(P11Error.member(CK_RV(CKR_DEVICE_ERROR)).isMemberFault)
        #expect(P11Error.member(CK_RV(CKR_TOKEN_NOT_PRESENT)).isMemberFault)
        #expect(P11Error.deadlineExceeded.isMemberFault)
        #expect(!P11Error(CK_RV(CKR_DEVICE_ERROR)).isMemberFault, "p11ha's own answer is not a member's fault")
        #expect(!P11Error.member(CK_RV(CKR_SIGNATURE_INVALID)).isMemberFault)
        #expect(!P11Error.member(CK_RV(CKR_ARGUMENTS_BAD)).isMemberFault)
        #expect(!P11Error.member(CK_RV(CKR_BUFFER_TOO_SMALL), neededLength: 64).isMemberFault)
    }
}

@Suite struct TheRecordFormat {
    func record(_ operation: ReplicaRecord.Operation, _ ms: UInt64, writer: UInt64 = 1, _ attributes: [Attribute] = []) -> ReplicaRecord {
        let fingerprint = Fingerprint([Attribute(CKA_CLASS, ulong: CKO_DATA), Attribute(CKA_VALUE, [1, 2, 3])])
        return ReplicaRecord(stamp: Stamp(milliseconds: ms, counter: 0, writer: writer), operation: operation,
                             object: ObjectUID(fingerprint: fingerprint, attributes: [], occurrence: 0), fingerprint: fingerprint,
                             attributes: attributes, isPrivate: true)
    }

    @Test("a record survives encoding; damaged bytes are refused")
    func roundTrip() {
        let original = record(.set, 42, [Attribute(CKA_LABEL, Array("new".utf8)), Attribute(CKA_ID, [])])
        let decoded = ReplicaRecord(decoding: original.encoded())
        #expect(decoded?.stamp == original.stamp && decoded?.object == original.object && decoded?.operation == .set)
        #expect(decoded?.fingerprint == original.fingerprint && decoded?.attributes == original.attributes && decoded?.isPrivate == true)
        #expect(ReplicaRecord(decoding: Array("p11ha-record 1 create x\n".utf8)) == nil)
        #expect(ReplicaRecord(decoding: Array(String(decoding: original.encoded(), as: UTF8.self).replacingOccurrences(of: "set", with: "sot").utf8)) == nil)
        #expect(ReplicaRecord(decoding: []) == nil)
    }

    @Test("a batch of records survives encoding, each record whole and in order; damaged or truncated batches are refused; batches keep one privacy each and their limits")
    func batchRoundTrip() throws {
        let records = (0..<5).map { record(.set, UInt64(40 + $0), [Attribute(CKA_LABEL, Array("label \($0)\nwith a newline".utf8))]) }
        let decoded = try #require(ReplicaRecord.decodeAll(ReplicaRecord.encodedBatch(records)))
        #expect(decoded.map(\.stamp) == records.map(\.stamp) && decoded.map(\.attributes) == records.map(\.attributes))
        #expect(ReplicaRecord.decodeAll(records[0].encoded())?.map(\.stamp) == [records[0].stamp], "a record alone")
        let batch = ReplicaRecord.encodedBatch(records)
        #expect(ReplicaRecord.decodeAll(Array(batch.dropLast())) == nil, "truncated")
        #expect(ReplicaRecord.decodeAll(batch + [10]) == nil, "trailing bytes")
        #expect(ReplicaRecord.decodeAll(Array(String(decoding: batch, as: UTF8.self).replacingOccurrences(of: "records 1 5", with: "records 1 6").utf8)) == nil)
        #expect(ReplicaRecord.decodeAll(Array(String(decoding: batch, as: UTF8.self).replacingOccurrences(of: "set", with: "sot").utf8)) == nil)
        #expect(ReplicaRecord.decodeAll(Array("p11ha-records 1 99999999999999999999\n".utf8)) == nil)
        #expect(ReplicaRecord(decoding: batch) == nil, "a reader of single records skips a batch")

        var mixed: [ReplicaRecord] = []
        for n in 0..<200 {
            let value = [UInt8](repeating: 1, count: n == 7 ? 20_000 : 4)
            let fingerprint = Fingerprint([Attribute(CKA_CLASS, ulong: CKO_DATA), Attribute(CKA_VALUE, value)])
            mixed.append(ReplicaRecord(stamp: Stamp(milliseconds: 1, counter: UInt64(n), writer: 7), operation: .create,
                                       object: ObjectUID(high: 1, low: UInt64(n)), fingerprint: fingerprint,
                                       attributes: [Attribute(CKA_LABEL, Array("o\(n)".utf8))], isPrivate: n % 3 == 0))
        }
        let cut = ReplicaRecord.batches(mixed)
        let all: [ReplicaRecord] = cut.flatMap { $0 }
        #expect(all.count == 200 && Set(all.map { $0.stamp }) == Set(mixed.map { $0.stamp }))
        for batch in cut {
            let stamps = batch.map { $0.stamp }
            #expect(Set(batch.map { $0.isPrivate }).count == 1)
            #expect(stamps == stamps.sorted(), "in order")
            #expect(batch.count <= ReplicaRecord.batchCount)
            #expect(batch.count == 1 || ReplicaRecord.encodedBatch(batch).count <= ReplicaRecord.batchBytes + 64)
        }
        #expect(cut.contains { $0.count == 1 && $0[0].stamp.counter == 7 }, "a record over the size limit goes alone")
    }

    @Test("a snapshot survives encoding and folds as the records it stands for, beside changes made meanwhile; those records are no longer written to members")
    func snapshots() throws {
        let label = { (text: String) in [Attribute(CKA_LABEL, Array(text.utf8))] }
        let originals = [record(.create, 1, [Attribute(CKA_LABEL, Array("a".utf8)), Attribute(CKA_ID, [1])]),
                         record(.set, 5, label("b")), record(.set, 3, [Attribute(CKA_ID, [2])])]
        let uid = originals[0].object
        let snapshot = try #require(P11HA.Ledger(originals).snapshot(of: uid, stamp: Stamp(milliseconds: 10, counter: 0, writer: 9)))
        let decoded = try #require(ReplicaRecord(decoding: snapshot.encoded()))
        #expect(decoded.operation == .snapshot && decoded.folded == snapshot.folded && decoded.attributes == snapshot.attributes)
        #expect(Set(snapshot.folded?.supersedes ?? []) == Set(originals.map(\.stamp)))
        // Changes another writer made beside the compaction: one with a stamp between the folded ones loses to the
        // later label it would have lost to, one later wins, as without the snapshot.
        let meanwhile = [record(.set, 4, writer: 2, label("c")), record(.set, 7, writer: 2, [Attribute(CKA_ID, [3])])]
        let plain = P11HA.Ledger(originals + meanwhile)
        for records in [[decoded] + meanwhile, meanwhile + [decoded] + originals, originals + meanwhile + [decoded]] {
            let folded = P11HA.Ledger(records)
            #expect(folded.objects[uid] == plain.objects[uid])
            #expect(folded.objects[uid]?.template == [Attribute(CKA_LABEL, Array("b".utf8)), Attribute(CKA_ID, [3])])
        }
        let both = P11HA.Ledger(originals + [decoded])
        #expect(originals.allSatisfy { !both.isReplicable($0, now: 20, retention: nil) } && both.isReplicable(decoded, now: 20, retention: nil))
        // A destroyed object: only its tombstone is written to a member that lacks it, and only within the retention.
        var ended = both
        let tombstone = record(.destroy, 30)
        ended.add(tombstone)
        #expect(!ended.isReplicable(decoded, now: 40, retention: nil) && ended.isReplicable(tombstone, now: 40, retention: 100))
        #expect(!ended.isReplicable(tombstone, now: 131, retention: 100) && ended.isReplicable(tombstone, now: 131, retention: nil))
        #expect(ended.objects[uid]?.isLive == false)
    }

    @Test("records merge by union in any order: the greatest stamp wins an attribute, a destroy is final")
    func ledgerRules() {
        let label = { (text: String) in [Attribute(CKA_LABEL, Array(text.utf8))] }
        let records = [record(.create, 1, label("a")), record(.set, 5, writer: 2, label("from host 2")),
                       record(.set, 5, writer: 1, label("from host 1")), record(.set, 3, label("older"))]
        var orders = [records, records.reversed(), [records[2], records[0], records[3], records[1]]]
        orders.append(records + records)
        let ledgers = orders.map { P11HA.Ledger($0) }
        let uid = records[0].object
        for ledger in ledgers {
            #expect(ledger.objects[uid]?.template == label("from host 2"), "stamp (5, writer 2) is the greatest")
            #expect(ledger.objects[uid]?.isLive == true)
        }
        var ended = P11HA.Ledger(records)
        ended.add(record(.destroy, 2))
        ended.add(record(.set, 9, label("after the destroy")))
        #expect(ended.objects[uid]?.isLive == false, "a destroy is never undone, whatever comes after")
        ended.add(record(.adopt, 12))
        #expect(ended.objects[uid]?.isLive == false, "an adoption after the tombstone (a copy it missed) is not a new object")
        for order in [[record(.create, 20), record(.destroy, 2)], [record(.destroy, 2), record(.create, 20)]] {
            var again = P11HA.Ledger(records)
            for r in order { again.add(r) }
            #expect(again.objects[uid]?.isLive == true, "a creation later than the tombstone is the object made again")
        }
    }
}

/// The code a core call answers: CKR_OK, or its error's.
private func code(_ body: () throws(P11Error) -> Void) -> CK_RV {
    do { try body(); return CK_RV(CKR_OK) } catch { return error.rv }
}

/// The records a store holds, read from the store itself: each record object's, a batch's several.
private func records(_ store: FakeTokenStore) throws -> [ReplicaRecord] {
    try store.tokenObjects(matching: [Attribute(CKA_LABEL, Array(ReplicaRecord.label.utf8))]).flatMap { object in
        let value = object.first { $0.type == CKA_VALUE }?.value ?? []
        return try #require(ReplicaRecord.decodeAll(value), "a record object that does not decode")
    }
}

private func recordStamps(_ store: FakeTokenStore) throws -> Set<Stamp> { Set(try records(store).map(\.stamp)) }

/// Two processes of one host sharing three fake members on one clock; the first made an object labelled "before",
/// which the second has read.
private func twoProcesses() throws -> (SimulatedClock, FakeGroup, FakeGroup, SessionHandle, ObjectHandle) {
    let clock = SimulatedClock()
    let first = try FakeGroup(clock: clock)
    let second = try FakeGroup(sharing: first.stores, clock: clock)
    let session = try first.userSession()
    let object = try first.runtime.createObject(session, dataObject("before"))
    _ = try second.userSession()
    second.recover()
    return (clock, first, second, session, object)
}

/// Starts `write` on a thread of its own with its first C_CreateObject on `member` (a record's) held, and returns
/// once it is held (`releaseHangs` lets it go on); the semaphore is signalled when the write has returned.
private func heldWrite(_ fake: FakeGroup, member: Int, _ write: @escaping @Sendable () -> Void) throws -> DispatchSemaphore {
    fake.connections[member].faults.inject(.hangThenProceed, on: [.createObject], times: 1)
    let done = DispatchSemaphore(value: 0)
    Thread {
        write()
        done.signal()
    }.start()
    try #require(eventually { fake.connections[member].faults.hangingCalls == 1 }, "the write's record never reached member \(member)")
    return done
}
