// Leases between two processes on one member whose store hides other processes' new objects as SoftHSM's file
// store does (`FakeTokenStore.staleIndexes`): whatever each process sees, only one of them keeps the lease.
import CInterop
import Glibc
@testable import P11HA
import P11HAFake
import Testing

@Suite("Leases on a store that hides new objects")
struct LeasesOnStaleIndexes {
    /// Two processes (hosts) on member 0, each with a session of its own there.
    final class Two {
        let first: FakeGroup
        let second: FakeGroup
        let a: MemberSession
        let b: MemberSession

        init() throws {
            first = try FakeGroup(staleIndexes: true)
            second = try FakeGroup(sharing: first.stores)
            a = try first.members[0].token.openSession(readWrite: true)
            b = try second.members[0].token.openSession(readWrite: true)
        }

        func claimByFirst() throws -> Lease? { try claim(first, a) }
        /// Claims a millisecond later at least: stamps of one millisecond order by counter and writer, whichever
        /// process claimed first.
        func claimBySecond() throws -> Lease? {
            usleep(2_000)
            return try claim(second, b)
        }

        private func claim(_ process: FakeGroup, _ session: MemberSession) throws -> Lease? {
            try Lease.acquire(process.members[0], session, clock: process.group.replicaClock, duration: .seconds(30))
        }

        /// A write of the first or second process on the member (as its application's writes and its repairs make).
        func write(byFirst: Bool) throws {
            let (token, session) = byFirst ? (first.members[0].token, a) : (second.members[0].token, b)
            try token.destroyObject(session, try token.createObject(session, [
                Attribute(CKA_CLASS, ulong: CKO_DATA), Attribute(CKA_TOKEN, bool: true), Attribute(CKA_PRIVATE, bool: false),
                Attribute(CKA_LABEL, Array("a write".utf8)),
            ]))
        }

        /// The first process holds the lease; the second writes, which hides the first's claim from its searches
        /// (the token's generation taken along), and so claims the lease too.
        func holderAndHiddenClaimant() throws -> (held: Lease, blind: Lease) {
            let held = try #require(try claimByFirst())
            try write(byFirst: false)
            guard let blind = try claimBySecond() else {
                held.release()
                throw TestFailure("the store did not hide the holder's claim")
            }
            return (held, blind)
        }

        /// The claims the member holds (read from the store itself).
        var claims: Int { first.objects(labelled: Lease.label, on: 0) }
    }

    @Test("a claimant that wrote nothing since the holder claimed sees the claim before making its own, and leaves nothing behind")
    func seenBeforeClaiming() throws {
        let two = try Two()
        let held = try #require(try two.claimByFirst())
        defer { held.release() }
        #expect(try two.claimBySecond() == nil)
        #expect(two.claims == 1)
    }

    @Test("a claimant whose own write hid the holder's claim finds its claim removed at its next change, once the holder has looked")
    func hiddenClaimRemovedByHolder() throws {
        let two = try Two()
        let (held, blind) = try two.holderAndHiddenClaimant()
        defer { held.release(); blind.release() }
        try held.check()
        #expect(two.claims == 1, "the holder removed the later claim")
        let error = #expect(throws: P11Error.self) { try blind.check() }
        #expect(error?.rv == CK_RV(CKR_FUNCTION_CANCELED))
        try held.check()
    }

    @Test("a claimant whose own write hid the holder's claim gives way at its first change when the holder wrote since")
    func hiddenClaimSeenAtFirstChange() throws {
        let two = try Two()
        let (held, blind) = try two.holderAndHiddenClaimant()
        defer { held.release(); blind.release() }
        try two.write(byFirst: true)
        let error = #expect(throws: P11Error.self) { try blind.check() }
        #expect(error?.rv == CK_RV(CKR_FUNCTION_CANCELED))
        blind.release()
        #expect(two.claims == 1)
        try held.check()
    }
}
