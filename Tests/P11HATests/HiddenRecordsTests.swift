// Replication between two processes on members whose stores hide other processes' new objects as SoftHSM's file
// store does (`FakeTokenStore.staleIndexes`): a write by a process that cannot see another's rename names the object
// its records name.
import CInterop
@testable import P11HA
import P11HAFake
import Testing

@Suite("Replication on stores that hide new objects")
struct HiddenRecords {
    let clock = SimulatedClock()
    let first: FakeGroup
    let second: FakeGroup

    init() throws {
        first = try FakeGroup(members: 2, clock: clock, staleIndexes: true)
        second = try FakeGroup(members: 2, sharing: first.stores, clock: clock)
    }

    /// Catch-ups by `process` of every member in service, with time for values that may be writes under way.
    func catchUp(by process: FakeGroup) {
        for _ in 0..<2 {
            process.group.catchUpWanted.store(true, ordering: .releasing)
            process.recover()
            clock.advance(by: process.group.writeSettles + 1)
        }
    }

    func copies(_ labels: [String], on store: Int) -> Int {
        labels.reduce(0) { $0 + first.objects(labelled: $1, on: store) }
    }

    @Test("an object another host renamed, found before the rename, renamed and then destroyed by a process whose own create hid that rename's records, stays destroyed on every member, the one that missed the destroy included")
    func renamedThenDestroyedBlind() throws {
        let a = try first.userSession()
        let kept = try first.runtime.createObject(a, dataObject("kept", value: [7, 7, 7]))
        // The second process finds the object while every record of it is in its view.
        let b = try second.userSession()
        try second.runtime.findObjectsInit(b, [Attribute(CKA_LABEL, Array("kept".utf8))])
        let found = try #require(try second.runtime.findObjects(b, max: 2).first)
        try second.runtime.findObjectsFinal(b)
        // The first renames it; the second's own create then takes each store's generation along, and the
        // rename's records stay out of its view: its copy's label is one no record it can read gave.
        try first.runtime.setAttributeValues(a, kept, [Attribute(CKA_LABEL, Array("renamed".utf8))])
        _ = try second.runtime.createObject(b, dataObject("other", value: [8]))
        try second.runtime.setAttributeValues(b, found, [Attribute(CKA_LABEL, Array("second-name".utf8))])
        // Member 0 fails for the second process alone: the destroy reaches member 1 only, and member 0 keeps a copy.
        second.connections[0].faults.inject(.error(CK_RV(CKR_DEVICE_ERROR)))
        try second.runtime.destroyObject(b, found)
        second.connections[0].faults.clearFaults()

        let labels = ["kept", "renamed", "second-name"]
        #expect(copies(labels, on: 1) == 0)
        // A third process, which sees every record, brings the members together: the destroy names the object
        // its creation named, so member 0's copy goes and none comes back to member 1.
        let third = try FakeGroup(members: 2, sharing: first.stores, clock: clock)
        _ = try third.userSession()
        catchUp(by: third)
        for store in 0..<2 { #expect(copies(labels, on: store) == 0, "member \(store)") }
        #expect(copies(["other"], on: 0) == 1 && copies(["other"], on: 1) == 1)
    }

    @Test("an object the records say is live that no member holds (as one destroyed by a process whose tombstone this one cannot see) is noted when first found, and counts as lasting only once it is still missing a watch interval later")
    func noHolderIsWarnedOnlyWhenLasting() throws {
        let a = try first.userSession()
        _ = try first.runtime.createObject(a, dataObject("vanished", value: [4]))
        for store in 0..<2 {
            try first.asAnotherProgram(on: store) { token, s in
                for copy in try token.findObjects(s, [Attribute(CKA_LABEL, Array("vanished".utf8))]) { try token.destroyObject(s, copy) }
            }
        }
        func since() -> [UInt64] { first.members.flatMap { $0.history.withLock { Array($0.noHolderSince.values) } } }
        first.group.catchUpWanted.store(true, ordering: .releasing)
        first.recover()
        let noted = since()
        #expect(noted.count == 2 && noted.allSatisfy { $0 == noted[0] }, "each member's object noted once: \(noted)")
        let interval = UInt64(first.runtime.recovery.worker.watchInterval.milliseconds)
        clock.advance(by: interval)
        first.recover()
        #expect(since() == noted, "still missing a watch interval later, since the first sighting")
        #expect(clock.milliseconds >= noted[0] + interval)
    }
}
