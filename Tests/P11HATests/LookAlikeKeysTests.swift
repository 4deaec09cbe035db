// Keys that look alike to p11ha (members that cannot wrap them, so nothing but class and type tells them apart):
// a write names the right one.
import CInterop
import Glibc
@testable import P11HA
import P11HAFake
import Testing

@Suite struct LookAlikeKeys {
    /// Two hosts on three fake members that refuse AES key wrap (as p11-kit 0.24's client does): keys of one type
    /// have the same weak fingerprint.
    func hosts() throws -> (stores: [FakeTokenStore], first: SimulatedHost, second: SimulatedHost, directory: TemporaryDirectory) {
        let stores = (0..<3).map { FakeTokenStore(label: "member-\($0)", serial: "LOOKALIKE\($0)", seed: UInt64(40 + $0)) }
        try FakeGroup.setUpReplicationKey(on: stores)
        for store in stores { store.faults.inject(.error(CK_RV(CKR_MECHANISM_INVALID)), on: [.wrapKey]) }
        let directory = try TemporaryDirectory("p11ha-lookalike")
        let clock = SimulatedClock()
        func host(_ number: Int) throws -> SimulatedHost {
            let lockDir = directory.path + "/host\(number)"
            mkdir(lockDir, 0o700)
            let config = try SimulatedHost.config(members: stores, directory: lockDir, log: directory.path + "/p11ha.log", logLevel: .warning)
            let host = try SimulatedHost(number: number, stores: stores, config: config, clock: clock)
            #expect(host.logIn() == nil)
            return host
        }
        return (stores, try host(0), try host(1), directory)
    }

    @Test("a host that knows one look-alike key destroys another by its label: the tombstone names the key destroyed, and the other stays on every member")
    func destroyNamesTheRightKey() throws {
        let (stores, first, second, directory) = try hosts()
        defer { first.shutdown(); second.shutdown(); withExtendedLifetime(directory) {} }
        // The second host makes "kept" (its ledger knows it); the first makes "gone".
        _ = try second.runtime.createObject(second.session!, hmacKey("kept"))
        _ = try first.runtime.createObject(first.session!, hmacKey("gone"))
        // The second host finds "gone" and destroys it: its ledger knows a live key of that weak fingerprint
        // ("kept") but not "gone" itself.
        let session = second.session!
        try second.runtime.findObjectsInit(session, [Attribute(CKA_LABEL, Array("gone".utf8))])
        let found = try second.runtime.findObjects(session, max: 4)
        try second.runtime.findObjectsFinal(session)
        try #require(found.count == 1)
        try second.runtime.destroyObject(session, found[0])
        // Every process catches the members up.
        for _ in 0..<3 {
            for host in [first, second] {
                host.runtime.groups[0].catchUpWanted.store(true, ordering: .releasing)
                _ = host.runtime.recovery.recoverMembers()
            }
        }
        for (index, store) in stores.enumerated() {
            #expect(store.tokenObjects(matching: [Attribute(CKA_LABEL, Array("kept".utf8))]).count == 1, "member \(index) keeps \"kept\"")
            #expect(store.tokenObjects(matching: [Attribute(CKA_LABEL, Array("gone".utf8))]).isEmpty, "member \(index) holds no \"gone\"")
        }
    }
}
