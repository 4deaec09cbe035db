// A member whose module's own state broke in this process comes back through a restart of the module, and the
// members that share the module come back with it.
import CInterop
import Glibc
@testable import P11HA
import P11HAFake
import Testing

@Suite struct ABrokenModuleIsRestarted {
    /// Signs once per member in service (the scheduler goes round them); returns how many signatures failed.
    private func signRound(_ fake: FakeGroup, _ session: SessionHandle, _ key: ObjectHandle) -> Int {
        var failures = 0
        for _ in 0..<fake.members.count {
            do {
                try fake.runtime.operationInit(.sign, session, hmac, key: key)
                _ = try fake.runtime.singlePart(.sign, session, [1, 2], capacity: 64)
            } catch {
                failures += 1
            }
        }
        return failures
    }

    @Test("a member whose module answers CKR_GENERAL_ERROR to every call in this process is brought back by a restart of the module; the members sharing it come back too, and the application's session and key handles keep working on all")
    func wedgedMemberComesBack() throws {
        let fake = try FakeGroup(sharedModule: true)
        let session = try fake.userSession()
        let key = try fake.runtime.createObject(session, hmacKey("k"))
        #expect(signRound(fake, session, key) == 0)
        fake.connections[1].faults.inject(.wedge(CK_RV(CKR_GENERAL_ERROR)))
        #expect(signRound(fake, session, key) == 0, "the peers finish what the broken member cannot")
        #expect(fake.health(1) == .failed)

        // Each pass probes it once: the module restarts at the third probe that answers CKR_GENERAL_ERROR.
        fake.recover()
        fake.recover()
        #expect(fake.connections[1].faults.count(.restartModule) == 0)
        #expect(fake.members[0].isInService && fake.members[2].isInService)
        fake.recover()
        #expect(fake.connections[1].faults.count(.restartModule) == 1)
        #expect(!fake.connections[1].faults.isWedged)
        for _ in 0..<3 where !fake.members.allSatisfy({ $0.isInService }) { fake.recover() }
        #expect(fake.members.allSatisfy { $0.isInService }, "\(fake.members.map { $0.health })")
        let served = fake.members.map { $0.served.load(ordering: .relaxed) }
        #expect(signRound(fake, session, key) == 0, "the same session and key handle, after every member's handles changed")
        let after = fake.members.map { $0.served.load(ordering: .relaxed) }
        #expect(zip(served, after).allSatisfy { $0 < $1 }, "every member serves again: \(served) -> \(after)")
    }

    @Test("a member that is down (CKR_DEVICE_ERROR) never restarts its module; one that stays broken restarts it ever more rarely (after 3, 6, 12 probes), and the others come back after each restart")
    func restartsAreRare() throws {
        let fake = try FakeGroup(sharedModule: true)
        let session = try fake.userSession()
        let key = try fake.runtime.createObject(session, hmacKey("k"))
        fake.connections[1].faults.inject(.error(CK_RV(CKR_DEVICE_ERROR)))
        _ = signRound(fake, session, key)
        #expect(fake.health(1) == .failed)
        for _ in 0..<12 { fake.recover() }
        #expect(fake.connections[1].faults.count(.restartModule) == 0)

        fake.connections[1].faults.clearFaults()
        fake.connections[1].faults.inject(.error(CK_RV(CKR_GENERAL_ERROR)))
        var restartsAt: [Int] = []
        for pass in 1...21 {
            let before = fake.connections[1].faults.count(.restartModule)
            fake.recover()
            if fake.connections[1].faults.count(.restartModule) > before { restartsAt.append(pass) }
        }
        #expect(restartsAt == [3, 9, 21], "restarts at passes \(restartsAt)")
        for _ in 0..<2 { fake.recover() }
        #expect(fake.members[0].isInService && fake.members[2].isInService && fake.health(1) == .failed)
        #expect(signRound(fake, session, key) == 0)
    }
}
