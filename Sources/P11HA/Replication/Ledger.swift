// The ledger: what the union of the members' records says the token holds (pure: no member is called here),
// and how one member's objects pair with it, which is what bringing a member up to date repairs.
import CInterop

/// The objects the records describe. Merge is union, so every process that has read the same records computes
/// the same ledger, whatever order it read them in.
package struct Ledger: Sendable {
    package private(set) var records: [Stamp: ReplicaRecord] = [:]
    package private(set) var objects: [ObjectUID: ObjectState] = [:]
    /// Records a snapshot stands for: their fold is in it, so they are never written to a member again.
    package private(set) var superseded = Set<Stamp>()

    package struct ObjectState: Sendable, Equatable {
        /// What the object is: the fingerprint of its latest record (a change of a data object's value changes it).
        package var fingerprint: Fingerprint
        var fingerprintStamp: Stamp? = nil
        package var isPrivate: Bool
        /// Each replicated attribute with the stamp of the record that set it: the greatest stamp wins.
        package var attributes: [CK_ATTRIBUTE_TYPE: (value: [UInt8], stamp: Stamp)]
        package var created = false
        /// Created by a write through p11ha (not only adopted).
        var written = false
        /// Dead: a tombstone is later than the latest creation through p11ha. An object made again, identical to one
        /// destroyed (same value, label and ID), can get that one's identity in a process that never read its
        /// tombstone; its creation's stamp is then later than the tombstone, and it is a new incarnation, live.
        package internal(set) var destroyed = false
        /// The greatest stamp of a creation (not an adoption: an adoption can find a copy the tombstone missed).
        var bornStamp: Stamp? = nil
        /// The greatest stamp of a tombstone.
        var diedStamp: Stamp? = nil
        /// The fingerprints its tombstones name: a key first described without its wrapped form (no replication key
        /// found yet) is named by the stronger form its copies have when it is destroyed (simulation seed 5194).
        var tombstoneFingerprints: Set<Fingerprint> = []
        /// Every value any record gave each replicated attribute: a copy on a member that missed a change still has
        /// one of them.
        var pastValues: [CK_ATTRIBUTE_TYPE: Set<[UInt8]>] = [:]

        package var isLive: Bool { created && !destroyed }
        package var template: [Attribute] { attributes.keys.sorted().map { Attribute($0, attributes[$0]!.value) } }

        package static func == (a: ObjectState, b: ObjectState) -> Bool {
            a.fingerprint == b.fingerprint && a.isPrivate == b.isPrivate && a.created == b.created && a.destroyed == b.destroyed
                && a.template == b.template
        }
    }

    package init(_ records: some Sequence<ReplicaRecord> = []) {
        for record in records { add(record) }
    }

    /// Adds a record; returns whether it was new.
    @discardableResult
    package mutating func add(_ record: ReplicaRecord) -> Bool {
        guard records[record.stamp] == nil else { return false }
        records[record.stamp] = record
        var state = objects[record.object]
            ?? ObjectState(fingerprint: record.fingerprint, isPrivate: record.isPrivate, attributes: [:])
        let fingerprintStamp = record.folded?.fingerprintStamp ?? record.stamp
        if record.operation != .destroy, state.fingerprintStamp.map({ $0 < fingerprintStamp }) ?? true {
            state.fingerprint = record.fingerprint
            state.fingerprintStamp = fingerprintStamp
        }
        func born(_ stamp: Stamp) {
            state.written = true
            if state.bornStamp.map({ $0 < stamp }) ?? true { state.bornStamp = stamp }
        }
        switch record.operation {
        case .create, .adopt, .set, .snapshot:
            if record.operation != .set { state.created = true }
            if record.operation == .create { born(record.stamp) }
            if let folded = record.folded {
                if let stamp = folded.bornStamp { born(stamp) } else if folded.written { state.written = true }
                superseded.formUnion(folded.supersedes)
            }
            // A snapshot's attributes carry their own stamps.
            let stamps = record.folded?.attributeStamps ?? Array(repeating: record.stamp, count: record.attributes.count)
            for (attribute, stamp) in zip(record.attributes, stamps) {
                state.pastValues[attribute.type, default: []].insert(attribute.value)
                if let old = state.attributes[attribute.type], old.stamp > stamp { continue }
                state.attributes[attribute.type] = (attribute.value, stamp)
            }
        case .destroy:
            if state.diedStamp.map({ $0 < record.stamp }) ?? true { state.diedStamp = record.stamp }
            state.tombstoneFingerprints.insert(record.fingerprint)
        }
        state.destroyed = state.diedStamp.map { died in state.bornStamp.map { $0 < died } ?? true } ?? false
        objects[record.object] = state
        return true
    }

    /// Whether a member that lacks this record must be given it. Not when a snapshot stands for it; not, for a
    /// destroyed object, anything but its tombstones (they alone say what holds); not a tombstone older than the
    /// retention (nil: kept for ever), which only a compaction with every member of the group in service removes
    /// (`ReplicaKeeper.compact`). The rule depends only on the records and the clock, so every process applies it
    /// alike, and no repair writes back what a compaction removed.
    package func isReplicable(_ record: ReplicaRecord, now: UInt64, retention: UInt64?) -> Bool {
        if superseded.contains(record.stamp) { return false }
        guard let state = objects[record.object], state.destroyed else { return true }
        guard record.operation == .destroy else { return false }
        guard let retention else { return true }
        return now < record.stamp.milliseconds || now - record.stamp.milliseconds <= retention
    }

    /// The snapshot that would stand for every record of a live object (nil when one record already does): its
    /// attributes with their stamps, its creation's and fingerprint's stamps. Older incarnations' tombstones are
    /// among what it supersedes.
    /// `foldable`: the object's entry of `foldable()`, when the caller has it (a compaction, for every object).
    /// `stamp` is taken only when there is a snapshot to make.
    package func snapshot(of uid: ObjectUID, stamp: @autoclosure () -> Stamp, foldable: [Stamp]? = nil) -> ReplicaRecord? {
        guard let state = objects[uid], state.isLive, let fingerprintStamp = state.fingerprintStamp else { return nil }
        let folded = (foldable ?? self.foldable()[uid] ?? []).sorted()
        guard folded.count > 1 else { return nil }
        let types = state.attributes.keys.sorted()
        return ReplicaRecord(stamp: stamp(), operation: .snapshot, object: uid, fingerprint: state.fingerprint,
                             attributes: types.map { Attribute($0, state.attributes[$0]!.value) }, isPrivate: state.isPrivate,
                             folded: .init(written: state.written, bornStamp: state.bornStamp, fingerprintStamp: fingerprintStamp,
                                           attributeStamps: types.map { state.attributes[$0]!.stamp }, supersedes: folded))
    }

    /// The stamps of the records no snapshot stands for, by object: what `snapshot(of:)` would fold, for every
    /// object in one pass over the records (a compaction looks at every object).
    package func foldable() -> [ObjectUID: [Stamp]] {
        var result: [ObjectUID: [Stamp]] = [:]
        for record in records.values where !superseded.contains(record.stamp) { result[record.object, default: []].append(record.stamp) }
        return result
    }

    /// Forgets an object and its records (none is on any member any more: `ReplicaKeeper.repair`).
    mutating func forget(_ uid: ObjectUID) {
        objects[uid] = nil
        records = records.filter { $0.value.object != uid }
    }

    package mutating func merge(_ other: Ledger) {
        for record in other.records.values { add(record) }
    }

    /// Whether the ledger knows a live object with this fingerprint and these attributes.
    func knows(_ fingerprint: Fingerprint, attributes: [Attribute]) -> Bool {
        let sorted = attributes.sorted { $0.type < $1.type }
        return live(fingerprint).contains { objects[$0]!.agrees(with: sorted) }
    }

    /// Live objects (created, not destroyed) with this fingerprint, in identity order.
    func live(_ fingerprint: Fingerprint) -> [ObjectUID] {
        objects.filter { $0.value.isLive && $0.value.fingerprint == fingerprint }.keys.sorted()
    }

    /// The identity of an object the application writes to: the live one with its fingerprint and attributes if
    /// the records know it; else the one an adoption would give it (so that every host names it alike).
    func identity(of fingerprint: Fingerprint, attributes: [Attribute]) -> ObjectUID {
        let sorted = attributes.sorted { $0.type < $1.type }
        let candidates = live(fingerprint)
        if let match = candidates.first(where: { objects[$0]!.agrees(with: sorted) }) { return match }
        // A copy on a member that missed a change (a rename another process made while the member was out for it)
        // still has values a record gave the object: the one live object of its fingerprint that once had them all
        // is it (simulation seed 5947: named otherwise, a destroy's tombstone named nobody and the object was copied
        // back to every member).
        let lagging = candidates.filter { objects[$0]!.once(had: sorted) }
        if lagging.count == 1 { return lagging[0] }
        // A candidate whose attributes differ is never taken for this object: two objects can share a fingerprint
        // (data objects of one value; every EC private key of one curve behind a member that cannot wrap), and
        // naming another one would make a destroy's tombstone destroy it (seen: an acknowledged data object lost on
        // every member). The caller reads the records first (`knows`), so a rename by another writer is known.
        if let weak = objects.filter({ $0.value.isLive && $0.value.agrees(with: sorted)
                && ($0.value.fingerprint.isWeakForm(of: fingerprint) || fingerprint.isWeakForm(of: $0.value.fingerprint)) })
            .keys.sorted().first {
            return weak
        }
        return ObjectUID(fingerprint: fingerprint, attributes: sorted, occurrence: 0)
    }

    /// A new object's identity: the next occurrence of its fingerprint and attributes among those written through
    /// p11ha or destroyed. One only adopted is this very object, adopted by a repair while its write was under way:
    /// the same identity, so the two records name one object. One destroyed is never named again here: its
    /// tombstone would take the new object for it (an object made again, identical to one destroyed, was lost on
    /// every member at the next catch-up).
    func newIdentity(_ fingerprint: Fingerprint, attributes: [Attribute]) -> ObjectUID {
        var occurrence = 0
        while true {
            let uid = ObjectUID(fingerprint: fingerprint, attributes: attributes, occurrence: occurrence)
            guard let state = objects[uid], (state.isLive && state.written) || state.diedStamp != nil else { return uid }
            occurrence += 1
        }
    }
}

extension Ledger.ObjectState {
    /// Whether an object with these attributes (sorted) has this state's replicated values.
    func agrees(with attributes: [Attribute]) -> Bool {
        attributes.allSatisfy { a in self.attributes[a.type].map { $0.value == a.value } ?? true }
    }

    /// Whether every one of these attributes has a value some record gave this object.
    func once(had attributes: [Attribute]) -> Bool {
        attributes.allSatisfy { a in pastValues[a.type].map { $0.contains(a.value) } ?? true }
    }

    /// Whether `value` of `type`, found on a member whose records are `held`, may be an application's change under
    /// way rather than one the member missed: no record gave it, or the member holds the record of the value it
    /// should have (it took that change, and its value moved on since: a change back to an earlier value).
    func mayBeUnderWay(_ value: [UInt8], of type: CK_ATTRIBUTE_TYPE, memberHolds held: Set<Stamp>) -> Bool {
        !once(had: [Attribute(type, value)]) || (attributes[type].map { held.contains($0.stamp) } ?? false)
    }

    /// The attributes of `actual` to set so that it has this state's values.
    package func corrections(to actual: [Attribute]) -> [Attribute] {
        template.filter { wanted in actual[wanted.type].map { $0.value != wanted.value } ?? true }
    }
}

/// One object on one member, as a repair sees it.
package struct MemberCopy: Sendable {
    package let handle: MemberObject
    package let fingerprint: Fingerprint
    /// Its values of the replicated attribute types (those of `ReplicaRecord.replicatedTypes` and any set since).
    package let attributes: [Attribute]
    package let isPrivate: Bool
    package let extractable: Bool
}

/// How a member's objects stand against the ledger.
package struct Pairing: Sendable {
    /// Live objects and their copy on the member.
    package var copies: [ObjectUID: MemberCopy] = [:]
    /// Live objects the member lacks.
    package var missing: [ObjectUID] = []
    /// Copies to destroy: of destroyed objects, and second copies of one object.
    package var surplus: [(MemberCopy, reason: String)] = []
    /// Objects no record describes (made outside p11ha, or by a write whose records no member took): left alone.
    package var unrecorded: [MemberCopy] = []

    /// Pairs `objects` with the live objects of `ledger`: objects of one fingerprint first with the live ones whose
    /// attributes they already have, then in order (their attributes are corrected); what is left over of a
    /// fingerprint the ledger knows is surplus.
    package init(_ objects: [MemberCopy], with ledger: Ledger, visibleOnly isVisible: (Ledger.ObjectState) -> Bool = { _ in true }) {
        var byFingerprint: [Fingerprint: [MemberCopy]] = [:]
        for object in objects { byFingerprint[object.fingerprint, default: []].append(object) }
        var known = Set<Fingerprint>()
        var liveByFingerprint: [Fingerprint: [ObjectUID]] = [:]
        var knownByFingerprint: [Fingerprint: [ObjectUID]] = [:]
        // Only objects whose creation (or adoption) or destroy a record says: a change recorded without either (its
        // creation not read yet, or an object no record describes) says nothing about what copies should exist. A
        // tombstone alone does: a compaction removes a destroyed object's other records.
        for (uid, state) in ledger.objects where isVisible(state) && (state.created || state.diedStamp != nil) {
            known.insert(state.fingerprint)
            known.formUnion(state.tombstoneFingerprints)
            for fingerprint in state.tombstoneFingerprints.union([state.fingerprint]) { knownByFingerprint[fingerprint, default: []].append(uid) }
            if state.isLive { liveByFingerprint[state.fingerprint, default: []].append(uid) }
        }
        for fingerprint in known {
            var left = (byFingerprint[fingerprint] ?? []).sorted { $0.handle.raw < $1.handle.raw }
            var wanted = (liveByFingerprint[fingerprint] ?? []).sorted()
            for uid in wanted {
                let state = ledger.objects[uid]!
                if let index = left.firstIndex(where: { state.agrees(with: $0.attributes) && state.corrections(to: $0.attributes).isEmpty }) {
                    copies[uid] = left.remove(at: index)
                }
            }
            wanted.removeAll { copies[$0] != nil }
            if fingerprint.isWeak {
                // Different keys can look alike here: only attributes pair them; what is left is another key (left
                // alone, as if no record described it), unless it is a destroyed one by its attributes too.
                missing += wanted
                for copy in left {
                    let destroyed = ledger.objects.values.contains { state in
                        state.destroyed && state.fingerprint == fingerprint && state.agrees(with: copy.attributes)
                            && state.corrections(to: copy.attributes).isEmpty
                    }
                    if destroyed { surplus.append((copy, "destroyed")) } else { unrecorded.append(copy) }
                }
                continue
            }
            for uid in wanted {
                if left.isEmpty { missing.append(uid) } else { copies[uid] = left.removeFirst() }
            }
            // What is left over of a fingerprint only live objects have is surplus only when one of them once had
            // its values: a copy with a label no record ever gave any of them is another object. Different objects
            // can share a fingerprint (data objects of one value); the application's new object, made on the
            // members but its record not written yet, was destroyed as a second copy by a catch-up beside the
            // write, then copied back (scripts/bench-failover: a data object of the value of two earlier ones). It
            // is left alone, as an object no record describes, until its record comes. Where a destroyed object
            // has the fingerprint, a leftover is its copy whatever its values: a process that never read a rename
            // of it (another host's, during a partition) does not know all the labels it had (simulation seeds
            // 632, 3099: a copy renamed after the destroy stayed).
            let sharing = knownByFingerprint[fingerprint] ?? []
            let destroyedOnes = sharing.contains { ledger.objects[$0]!.diedStamp != nil }
            for copy in left {
                let once = sharing.filter { ledger.objects[$0]!.isLive && ledger.objects[$0]!.once(had: copy.attributes) }
                if !once.isEmpty {
                    surplus.append((copy, "second copy"))
                } else if destroyedOnes {
                    surplus.append((copy, (liveByFingerprint[fingerprint] ?? []).isEmpty ? "destroyed" : "second copy"))
                } else {
                    unrecorded.append(copy)
                }
            }
        }
        for (fingerprint, list) in byFingerprint where !known.contains(fingerprint) { unrecorded += list }
        // A key recorded without its wrapped form (the replication key could not be found when it was described)
        // is paired with an object no record describes that is its stronger form, by its attributes.
        // So is a key recorded with it and read here without it (a member that cannot wrap this way).
        for uid in missing.sorted() {
            let state = ledger.objects[uid]!
            guard state.fingerprint.isKey else { continue }
            if let index = unrecorded.firstIndex(where: {
                (state.fingerprint.isWeakForm(of: $0.fingerprint) || $0.fingerprint.isWeakForm(of: state.fingerprint))
                    && state.agrees(with: $0.attributes) && state.corrections(to: $0.attributes).isEmpty }) {
                copies[uid] = unrecorded.remove(at: index)
                missing.removeAll { $0 == uid }
            }
        }
    }
}
