// Keeps the members convergent: records each write to token objects on the members (one record per member),
// and repairs a member from the union of every reachable member's records (under a lease held on that member).
import CInterop
import Glibc

/// Reading and writing the records of the application's writes, and the group's view of them (`Group.ledger`).
package final class ReplicaKeeper: Sendable {
    private let fanOut: FanOut

    init(fanOut: FanOut) { self.fanOut = fanOut }

    // MARK: the application's writes

    /// What a write's record says of an object: read on a member that holds it.
    struct Description {
        let fingerprint: Fingerprint
        let attributes: [Attribute]
        let isPrivate: Bool
    }

    /// The member's replication key (see `Member.replicationKeyCache`); nil when two looks find none.
    func replicationKey(_ member: Member, _ session: MemberSession) throws(P11Error) -> MemberObject? {
        // Valid for one era of the member's handles and one login (a token may renumber private objects at a
        // logout, and `p11hactl domain` may have made the key private).
        let epoch = member.handleEra
        let generation = member.group?.objects.withLock { $0.generation } ?? 0
        if let cached = member.replicationKeyCache.withLock({ $0 }), cached.epoch == epoch, cached.generation == generation {
            return cached.handle
        }
        var found = try ReplicationKey.find(on: member.token, session)
        if found == nil { found = try ReplicationKey.find(on: member.token, session) }
        guard let found else { return nil }
        member.replicationKeyCache.withLock { $0 = (epoch, generation, found) }
        member.group?.replicationKeySeen.store(true, ordering: .releasing)
        return found
    }

    func describe(_ member: Member, _ session: MemberSession, _ copy: MemberObject) throws(P11Error) -> Description {
        var replicationKey = try replicationKey(member, session)
        let fingerprint: Fingerprint
        do throws(P11Error) {
            fingerprint = try Fingerprint.read(on: member.token, session, copy, replicationKey: replicationKey)
        } catch where error.rv == CKR_WRAPPING_KEY_HANDLE_INVALID {
            // The kept handle went stale (renumbered): looked up again, once.
            member.replicationKeyCache.withLock { $0 = nil }
            replicationKey = try self.replicationKey(member, session)
            fingerprint = try Fingerprint.read(on: member.token, session, copy, replicationKey: replicationKey)
        }
        if replicationKey == nil, let group = member.group, !group.replicationKeySeen.load(ordering: .acquiring) {
            // Not seen yet in this process: another member's answer says whether the group has one.
            for other in group.membersInService where other !== member {
                guard let s = try? other.token.openSession(readWrite: false) else { continue }
                defer { other.token.closeSession(s) }
                if (try? self.replicationKey(other, s)) != nil { break }
            }
        }
        if replicationKey == nil, member.group?.replicationKeySeen.load(ordering: .acquiring) == true, fingerprint.isKey,
           fingerprint.attributes[CKA_MODULUS] == nil,
           try member.token.readAttributes(session, copy, [CKA_EXTRACTABLE])[0] == [1] {
            // The group has a replication key, but two looks here found none (a search that briefly missed it):
            // this key's fingerprint would lack the wrapped form its copies have. Another member describes it.
            throw P11Error.member(CK_RV(CKR_DEVICE_ERROR))
        }
        let types = ReplicaRecord.replicatedTypes + [CKA_PRIVATE]
        let values = try member.token.readAttributes(session, copy, types)
        var attributes: [Attribute] = []
        for (type, value) in zip(ReplicaRecord.replicatedTypes, values) { attributes.append(Attribute(type, value ?? [])) }
        return Description(fingerprint: fingerprint, attributes: attributes, isPrivate: values.last??.first == 1)
    }

    /// Reads the member's records into the group's ledger (only those at handles this process has not read
    /// yet). Returns the stamps the member holds, and the records new to the ledger.
    @discardableResult
    func refreshLedger(_ group: Group, from member: Member, _ session: MemberSession) throws(P11Error) -> (held: Set<Stamp>, new: [ReplicaRecord]) {
        let epoch = member.handleEra
        let generation = group.objects.withLock { $0.generation }
        var cache = group.recordCache.withLock { $0[member.index] }.flatMap { $0.epoch == epoch && $0.generation == generation ? $0 : nil }
            ?? RecordCache(epoch: epoch, generation: generation)
        let found = try member.token.findObjects(session, ReplicaRecord.searchTemplate(isPrivate: nil))
        let handles = Set(found)
        // Records gone since (compacted): forgotten here, never concluded from.
        cache.stamps = cache.stamps.filter { handles.contains($0.key) }
        let fresh = try ReplicaRecord.read(on: member.token, session, handles: found.filter { cache.stamps[$0] == nil })
        var new: [ReplicaRecord] = []
        group.ledger.withLock { ledger in
            for (handle, record) in fresh {
                cache.stamps[handle, default: []].append(record.stamp)
                if ledger.add(record) {
                    new.append(record)
                    group.replicaClock.witness(record.stamp)
                }
            }
        }
        let held = Set(cache.stamps.values.joined())
        group.recordCache.withLock { $0[member.index] = cache }
        return (held, new)
    }

    /// Reads a member's records into the group's ledger (for `p11hactl sync`).
    package func readRecords(_ group: Group, from member: Member, _ session: MemberSession) throws(P11Error) {
        try refreshLedger(group, from: member, session)
    }

    /// Whether the records describe an object of this fingerprint, live or destroyed: then its copies are the
    /// records' to repair, never an operator's copy to make (`p11hactl sync`).
    package func recordsDescribe(_ group: Group, _ fingerprint: Fingerprint) -> Bool {
        group.ledger.withLock { ledger in
            // A tombstone alone describes it too: a compaction removes a destroyed object's other records.
            ledger.objects.values.contains { ($0.created || $0.diedStamp != nil) && ($0.fingerprint == fingerprint || $0.tombstoneFingerprints.contains(fingerprint)) }
        }
    }

    /// What the records read so far say (for `p11hactl sync --dry-run`).
    package func ledger(of group: Group) -> Ledger { group.ledger.withLock { $0 } }

    /// An object's fingerprint as the records name it (for `p11hactl sync`).
    package func fingerprint(of member: Member, _ session: MemberSession, _ object: MemberObject) throws(P11Error) -> Fingerprint {
        try describe(member, session, object).fingerprint
    }

    /// Notes a record this process wrote on a member at `handle`.
    func noteWritten(_ record: ReplicaRecord, at handle: MemberObject, on member: Member, in group: Group) {
        noteWritten([record], at: handle, on: member, in: group)
    }

    /// Notes records this process wrote on a member at `handle`, a batch of them.
    func noteWritten(_ records: [ReplicaRecord], at handle: MemberObject, on member: Member, in group: Group) {
        let epoch = member.handleEra
        let generation = group.objects.withLock { $0.generation }
        group.recordCache.withLock { caches in
            guard var cache = caches[member.index], cache.epoch == epoch, cache.generation == generation else { return }
            cache.stamps[handle] = records.map(\.stamp)
            caches[member.index] = cache
        }
    }

    /// The identity of an existing object the application writes to, from its copy on a member in service: the
    /// group's ledger is read from that member first if it does not know the object's fingerprint.
    /// One look proves nothing: an object the records seem not to describe (a store can hide them for a moment, and
    /// then a renamed object would be named by the identity an adoption gives it, which no other record shares: a
    /// rename or destroy lost, simulation seeds 8206 and 5735) is looked for in the records again, on this member
    /// and on `elsewhere` (the other members in service), three times more, before it is taken for an object no
    /// record describes.
    func identify(_ group: Group, _ member: Member, _ session: MemberSession, _ copy: MemberObject,
                  known uid: ObjectUID? = nil, elsewhere: [(Member, MemberSession)] = []) throws(P11Error) -> (ObjectUID, Description) {
        let description = try describe(member, session, copy)
        if let uid { return (uid, description) }
        let knows = { group.ledger.withLock { $0.knows(description.fingerprint, attributes: description.attributes) } }
        if knows() { return (group.ledger.withLock { $0.identity(of: description.fingerprint, attributes: description.attributes) }, description) }
        // The members whose records were read here.
        var read = Set<Int>()
        try refreshLedger(group, from: member, session)
        read.insert(member.index)
        for _ in 0..<3 where !knows() {
            for (other, otherSession) in elsewhere + [(member, session)] where !knows() {
                if (try? refreshLedger(group, from: other, otherSession)) != nil { read.insert(other.index) }
            }
        }
        let (uid, alike) = group.ledger.withLock { ledger in
            let uid = ledger.identity(of: description.fingerprint, attributes: description.attributes)
            return (uid, ledger.objects[uid]?.isLive != true && !ledger.live(description.fingerprint).isEmpty)
        }
        if alike && read.count < group.members.count {
            // The records read do not describe this copy, yet an object of its fingerprint is live: most likely this
            // very object, changed by another process whose record only a member not read holds (a rename that
            // reached one member). Named by the identity an adoption gives it, its change or destroy would name
            // nobody, and the object would be copied back (simulation seed 9005: an acknowledged destroy undone).
            // Named after the live one, it could be another object of the same fingerprint. So the write is
            // refused (nothing has been changed yet; no member is blamed), and it can be made once every member's
            // records can be read.
            Log.event(.warning, "write-refused", "group=\(group.name) reason=\"the records in reach do not identify the object; a member that cannot be read may hold them\"")
            throw P11Error.deviceError
        }
        if alike {
            // The records read do not describe this copy, yet an object of its fingerprint is live: most likely this
            // very object, changed by another process whose record this one cannot see. Reading again does not
            // always help: SoftHSM hides from a process the objects others created before its own last create or
            // destroy ("What the stores do" in REPLICATION.md). Named by the identity an adoption gives it, its
            // rename and destroy named nobody, and a key destroyed with CKR_OK stayed on the member that missed the
            // destroy, then came back to the others (simulation seeds 6249 and 8564 under `--stale-indexes`: another
            // host's rename record hidden by this process's own destroy). So the copy is what a repair of this
            // member would take it for: the live object the pairing gives it to, when it gives it to one (a copy
            // under values no record gave, beside the live object's own copy, is another object: `Pairing`).
            // Rare, so the member's objects are read whole for it. (Every member's records were read: see above.)
            let ledger = group.ledger.withLock { $0 }
            let view = try enumerate(Reached(member: member, session: session), ledger: ledger)
            if let (paired, _) = Pairing(view, with: ledger).copies.first(where: { $0.value.handle == copy }) {
                return (paired, description)
            }
        }
        return (uid, description)
    }

    /// A new object's record, from its first copy.
    func creation(_ group: Group, _ member: Member, _ session: MemberSession, _ copy: MemberObject) throws(P11Error) -> ReplicaRecord {
        let d = try describe(member, session, copy)
        let uid = group.ledger.withLock { $0.newIdentity(d.fingerprint, attributes: d.attributes) }
        return ReplicaRecord(stamp: group.replicaClock.next(), operation: .create, object: uid, fingerprint: d.fingerprint,
                             attributes: d.attributes, isPrivate: d.isPrivate)
    }

    /// Writes `record` on `members` (in the given member sessions). A member that cannot take it while others
    /// did is stale (it is brought up to date from their records). Throws when no member took it: the write is
    /// then not acknowledged (its caller undoes what it can).
    /// Returns whether a member that answers took the write but not its record (it is caught up, not taken out).
    @discardableResult
    func write(_ record: ReplicaRecord, in group: Group, on members: [Int], session: (Member) -> MemberSession?) throws(P11Error) -> Bool {
        var failed: [(Member, P11Error)] = []
        var written = 0
        for index in members {
            let member = group.members[index]
            guard let s = session(member) else { continue }
            do throws(P11Error) {
                noteWritten(record, at: try record.write(on: member.token, s), on: member, in: group)
                written += 1
            } catch {
                failed.append((member, error))
            }
        }
        if written == 0, let (_, error) = failed.first {
            Log.event(.warning, "replication-record-failed", "group=\(group.name) object=\(record.object) reason=\"\(error)\"")
            throw error.isMemberFault ? P11Error.deviceError : error
        }
        var catchUp = false
        for (member, error) in failed {
            // It holds the write but not the record. A member that misses its deadline or fails a probe leaves
            // service; one that answers a probe (a fault-class code alone is no evidence) stays, and a catch-up gives
            // it the record.
            if error.timedOut || !error.isMemberFault || !fanOut.answersProbe(member) {
                fanOut.markStale(member, reason: "missed a write's record: \(error)")
            } else {
                group.recordsDue.withLock { _ = $0.insert(record.stamp) }
                catchUp = true
            }
        }
        group.ledger.withLock { _ = $0.add(record) }
        return catchUp
    }

    // MARK: bringing a member up to date

    /// What a repair came to, for the log and `p11hactl status`.
    package struct Repair: CustomStringConvertible {
        var copied = 0, destroyed = 0, changed = 0, recordsWritten = 0, adopted = 0
        /// Live objects the member lacks that no reachable member can give it (none holds a copy, or the key is
        /// not extractable, or a member has no replication key).
        package var unrepairable: [String] = []
        /// What kept the repair from reading all it must (a peer that could not be read: it may hold tombstones
        /// the target must apply): tried again later, and a returning member stays out until then.
        package var retry = 0
        /// Objects another writer was changing while the repair ran (the holder's copy changed under the copy, a
        /// copy appeared on the target meanwhile, one object listed under two handles): left to the catch-up that
        /// follows. A returning member does not wait for them: under other hosts' steady writes some object is
        /// always in flux, and waiting for none kept a member out for as long as they wrote (multi-writer test).
        package var inFlux = 0
        /// Values left for a later catch-up, which may be an application's change under way (`Group.settles`), and
        /// objects and records left so because they may be writes on their way (`settledBefore`).
        package var waiting = 0
        /// Values no record gives that every other member in reach holds alike, left as they are (see `repair`).
        package var heldAlike = 0
        /// When (replica clock, ms) what was left as possibly on its way can no longer be (0: nothing left so).
        var settlesAt: UInt64 = 0
        var unrecorded = 0
        /// Objects no member in reach was seen to hold (named as in `unrepairable`): one look proves nothing (a
        /// store can hide objects for a moment, and SoftHSM a tombstone for longer), so they are looked for again later.
        package var noHolder: Set<String> = []
        /// The target's copy of each live object the repair paired or placed (by replication identity), as the
        /// repair left it: what a returning member's handles are (`Recovery.reattach`), without a search each.
        package var copiesHeld: [ObjectUID: MemberObject] = [:]

        /// Every object settled: nothing left for a later pass.
        package var complete: Bool { retry == 0 && inFlux == 0 }
        /// Up to date but for objects other writers are changing (which the catch-up after its return brings): a
        /// returning member may serve again.
        package var mayReturn: Bool { retry == 0 }
        var changedAnything: Bool { copied + destroyed + changed + recordsWritten + adopted > 0 }
        package var description: String {
            "copied=\(copied) destroyed=\(destroyed) changed=\(changed) records=\(recordsWritten) adopted=\(adopted) unrepairable=\(unrepairable.count) retry=\(retry)\(inFlux > 0 ? " in-flux=\(inFlux)" : "") unrecorded=\(unrecorded)\(waiting > 0 ? " waiting=\(waiting)" : "")\(heldAlike > 0 ? " held-alike=\(heldAlike)" : "")"
        }
    }

    /// A member with a session open on it, logged in as the application is.
    package struct Reached {
        package let member: Member
        package let session: MemberSession
        package init(member: Member, session: MemberSession) {
            self.member = member
            self.session = session
        }
    }

    /// Brings `target` up to date with the union of the records of `target` and `peers`: the records it lacks
    /// are written to it, copies of destroyed objects and second copies are destroyed, attribute changes it
    /// missed are applied (the greatest stamp wins), objects it lacks are copied from a peer that holds them.
    /// Objects no record describes are left alone, except at a member's first sync (no record on it, or the
    /// previous format's journal): then they are adopted. `loggedIn`: private records and objects are visible.
    /// Called under the target's lease.
    /// `settledBefore` (replica clock, ms; a catch-up of members in service): an object the target lacks with every
    /// record of it, all stamped after this, and a record stamped after it, may be a write on its way to the target
    /// (a write makes its objects on one member after another, then its records so): left for a later catch-up,
    /// asked for by the time it can no longer be (`Group.writeSettles`), unless a write found the record missed.
    package func repair(_ target: Reached, peers: [Reached], in group: Group, loggedIn: Bool,
                lease: Lease? = nil, settledBefore: UInt64? = nil, mayOverruleAlike: Bool = false,
                cancelled: () -> Bool = { false }) throws(P11Error) -> Repair {
        var report = Repair()
        // Before each change: the lease still held, and no shutdown under way (C_Finalize waits for the pass).
        func mayChange() throws(P11Error) {
            if cancelled() { throw P11Error(CK_RV(CKR_FUNCTION_CANCELED)) }
            try lease?.check()
        }
        let visible: (Ledger.ObjectState) -> Bool = { loggedIn || !$0.isPrivate }
        // The union of the records, and which ones the target holds.
        var held = try refreshLedger(group, from: target.member, target.session).held
        var peersHoldRecords = false
        // The records every member of the group holds, when all were read: a record none holds is known only to
        // this process (see `records-forgotten` below).
        var heldAnywhere: Set<Stamp>? = peers.count + 1 == group.members.count ? held : nil
        for peer in peers {
            // A peer that cannot be read is not the target's fault: the repair is incomplete (the peer may hold
            // tombstones the target must apply) and is tried again.
            do throws(P11Error) {
                let peerHeld = try refreshLedger(group, from: peer.member, peer.session).held
                if !peerHeld.isEmpty { peersHoldRecords = true }
                heldAnywhere?.formUnion(peerHeld)
            } catch {
                heldAnywhere = nil
                report.retry += 1
                // Evidence against the peer itself: it fails a probe too (its module restarted behind this process,
                // say). It leaves service and is brought back; left in, every catch-up would stop at it for ever
                // (simulation seed 8967: a tombstone never applied).
                if error.isMemberFault { fanOut.failUnlessItAnswersProbe(peer.member, error) }
            }
        }
        var views: [Int: [MemberCopy]] = [:]
        func view(_ reached: Reached) throws(P11Error) -> [MemberCopy] {
            if let v = views[reached.member.index] { return v }
            let ledger = group.ledger.withLock { $0 }
            let v = try enumerate(reached, ledger: ledger)
            views[reached.member.index] = v
            return v
        }
        // First sync: what the member held before p11ha (or under the previous format) is adopted, nothing lost.
        var oldJournals: [MemberObject] = []
        for label in Journal.labels.sorted() {
            oldJournals += try target.member.token.findObjects(target.session, [Attribute(CKA_CLASS, ulong: CKO_DATA),
                                                                                Attribute(CKA_LABEL, Array(label.utf8))])
        }
        // A member with no records has never been synced, unless a search missed them: one look proves nothing (a
        // store can hide objects for a moment), and adopting a renamed object anew gives it a second identity that a
        // tombstone of the first leaves live (simulation seed 2954: copied back after its destroy). So: no records
        // in three more looks, and none on any peer in reach (a group already under records adopts nothing; objects
        // a member brings that no record describes are left alone and reported as unrecorded).
        var firstSync = held.isEmpty && !peersHoldRecords
        for _ in 0..<3 where firstSync && loggedIn && oldJournals.isEmpty {
            held = try refreshLedger(group, from: target.member, target.session).held
            firstSync = held.isEmpty
        }
        // Only with every record visible (logged in): without, a member's private records would be missed.
        if loggedIn && (firstSync || !oldJournals.isEmpty) {
            let adopted = try adopt(target, in: group, view: try view(target))
            report.adopted = adopted.count
            // Held now: not written to it a second time below.
            held.formUnion(adopted)
            views[target.member.index] = nil
        }
        let ledger = group.ledger.withLock { $0 }
        // Objects this repair could not settle: their records wait for a later one.
        var unsettled = Set<ObjectUID>()
        let pairing = Pairing(try view(target), with: ledger, visibleOnly: visible)
        report.unrecorded = pairing.unrecorded.count
        let token = target.member.token
        let targetView = try view(target)
        for (copy, reason) in pairing.surplus {
            try mayChange()
            // A second copy goes only when it is another object than the copy kept. SoftHSM, with several processes
            // writing one token, now and then lists one object under two handles in one process, both readable and
            // both found again by a fresh search (seen in the one-host multi-writer test: 24 objects of a member at
            // once). Destroying either handle destroys the object: the only copy, lost (once on every member).
            // A marker label set through one handle and read through the other tells them apart; the label is
            // set back at once when they are one object.
            if reason == "second copy" {
                let kept = pairing.copies.values.filter { $0.fingerprint == copy.fingerprint }.map(\.handle)
                guard let other = kept.first, try distinct(copy.handle, other, on: target) else {
                    Log.event(.info, "repair-kept-copy", "group=\(group.name) member=\(target.member.name) handles=\(copy.handle.raw),\(kept.first?.raw ?? 0) reason=\"the member lists one object under two handles\"")
                    report.inFlux += 1
                    continue
                }
            }
            do throws(P11Error) {
                try token.destroyObject(target.session, copy.handle)
            } catch where error.rv == CKR_OBJECT_HANDLE_INVALID {
                // Another process destroyed it meanwhile (a multi-writer test's repair failed whole so, again and again).
                continue
            }
            Log.event(.info, "repair-destroyed", "group=\(group.name) member=\(target.member.name) label=\"\(copy.attributes[CK_ATTRIBUTE_TYPE(CKA_LABEL)].map { String(decoding: $0.value, as: UTF8.self) } ?? "")\" reason=\"\(reason)\"")
            report.destroyed += 1
        }
        // A value that may be an application's change under way waits (`Group.settles`); one the member missed is
        // set at once. Only on a copy of an object the member holds a record of: a write changes the copies it knows,
        // made with their records; a copy of an object the member has no record of is another one's, paired with it
        // (a look-alike, relabelled: `Pairing`).
        let objectsHeld = Set(held.compactMap { ledger.records[$0]?.object })
        var inDoubt = Set<ValueInDoubt>()
        defer { group.keepValuesInDoubt(inDoubt, on: target.member.index) }
        // Each peer paired once, not once per object (a returning member missing 500 objects paired a whole peer
        // 500 times).
        var peerPairings: [Int: Pairing] = [:]
        func peerPairing(_ peer: Reached) -> Pairing? {
            if let pairing = peerPairings[peer.member.index] { return pairing }
            guard let peerView = try? view(peer) else { return nil }
            let pairing = Pairing(peerView, with: ledger, visibleOnly: visible)
            peerPairings[peer.member.index] = pairing
            return pairing
        }
        for (uid, copy) in pairing.copies {
            report.copiesHeld[uid] = copy.handle
            let state = ledger.objects[uid]!
            let corrections = state.corrections(to: copy.attributes).filter { wanted in
                guard objectsHeld.contains(uid), let found = copy.attributes[wanted.type]?.value,
                      state.mayBeUnderWay(found, of: wanted.type, memberHolds: held) else { return true }
                let doubt = ValueInDoubt(member: target.member.index, object: uid, type: wanted.type, value: found)
                inDoubt.insert(doubt)
                guard group.settles(doubt) else {
                    report.waiting += 1
                    return false
                }
                // Still unexplained, but every other member in reach holds it too: it may be an acknowledged
                // change whose records this process cannot see. SoftHSM hides from a process the objects others
                // created before its own last create or destroy, until another process writes ("What the stores
                // do"), and a catch-up set back another host's acknowledged rename so (simulation seed 3832 under
                // `--stale-indexes`). Left as it is, counted; a process that sees every record (`p11hactl sync`,
                // or this one once another process has written) sets it back if no record gives it.
                if !mayOverruleAlike, !peers.isEmpty, peers.allSatisfy({ peer in
                    peerPairing(peer)?.copies[uid]?.attributes[wanted.type]?.value == found
                }) {
                    report.heldAlike += 1
                    return false
                }
                return true
            }
            guard !corrections.isEmpty else { continue }
            try mayChange()
            do throws(P11Error) {
                try token.setAttributeValues(target.session, copy.handle, corrections)
            } catch where error.rv == CKR_OBJECT_HANDLE_INVALID {
                // Destroyed by another process since the enumeration: its tombstone is read at the next pass.
                report.inFlux += 1
                continue
            }
            report.changed += 1
        }
        var newcomers = Newcomers(token: token, session: target.session, enumerated: Set(targetView.map(\.handle)))
        // Each object's first record, when young ones wait (`settledBefore`).
        var born: [ObjectUID: UInt64] = [:]
        if settledBefore != nil {
            for record in ledger.records.values { born[record.object] = min(born[record.object] ?? .max, record.stamp.milliseconds) }
        }
        func young(_ milliseconds: UInt64) -> Bool {
            guard let settledBefore, milliseconds > settledBefore else { return false }
            let settles = milliseconds &+ group.writeSettles
            report.settlesAt = report.settlesAt == 0 ? settles : min(report.settlesAt, settles)
            report.waiting += 1
            return true
        }
        for uid in pairing.missing.sorted() {
            let state = ledger.objects[uid]!
            if !objectsHeld.contains(uid), let first = born[uid], young(first) {
                unsettled.insert(uid)
                continue
            }
            var source: (Reached, MemberCopy)? = nil
            for peer in peers {
                if let copy = peerPairing(peer)?.copies[uid] { source = (peer, copy); break }
            }
            let name = describeObject(uid, state)
            if source == nil, let heldAnywhere, !ledger.records.values.contains(where: { $0.object == uid && heldAnywhere.contains($0.stamp) }) {
                // No copy and no record of it on any member of the group: a fresh process would not know it either.
                // Its records were compacted away after its tombstone, which this process never read, expired
                // (a process that runs longer than the retention); or they are hidden from this one look, and are
                // read again at the next.
                group.ledger.withLock { $0.forget(uid) }
                Log.event(.info, "records-forgotten", "group=\(group.name) \(name) reason=\"no member holds it or a record of it\"")
                // Nor are its records written back below (this repair's view of the ledger still holds them).
                unsettled.insert(uid)
                continue
            }
            guard let (peer, copy) = source else {
                report.unrepairable.append(name + " reason=\"no member in reach holds it\"")
                report.noHolder.insert(report.unrepairable.last!)
                unsettled.insert(uid)
                continue
            }
            // Not there after all? Another process may have copied it since the target was enumerated (it held
            // the lease before this one), or the enumeration missed it: an object of its class, label and ID that
            // the enumeration did not list means the copy waits for the next pass (two processes copied one key to
            // one member seconds apart in the multi-writer test).
            let probe = [Attribute(CKA_CLASS, ulong: state.fingerprint.objectClass)]
                + state.template.filter { [CK_ATTRIBUTE_TYPE(CKA_LABEL), CK_ATTRIBUTE_TYPE(CKA_ID)].contains($0.type) }
            if newcomers.match(probe) {
                report.inFlux += 1
                unsettled.insert(uid)
                continue
            }
            let carried: Carried
            do throws(P11Error) {
                carried = try self.carry(copy, state: state, from: peer, to: target)
            } catch where error.rv == CKR_FUNCTION_FAILED || ReplicationKey.wrapRefusals.contains(error.rv) {
                // The key cannot travel this way at all (not extractable, no replication key, or a holder that cannot
                // wrap: p11-kit 0.24's client refuses AES key wrap): reported, never tried for ever.
                report.unrepairable.append(name + " reason=\"cannot be wrapped under the replication key there (\(error))\"")
                continue
            } catch {
                // The holder's doing (a fault, or its copy changed under us by another process), never the target's:
                // tried again at the next pass.
                if error.isMemberFault { report.retry += 1 } else { report.inFlux += 1 }
                unsettled.insert(uid)
                continue
            }
            try mayChange()
            do throws(P11Error) {
                let placed = try place(carried, on: target)
                newcomers.placed.insert(placed)
                report.copiesHeld[uid] = placed
                Log.event(.info, "repair-copied", "group=\(group.name) member=\(target.member.name) from=\(peer.member.name) \(name)")
                report.copied += 1
            } catch where error.isMemberFault {
                throw error
            } catch where error.rv == CKR_FUNCTION_FAILED || ReplicationKey.wrapRefusals.contains(error.rv) {
                report.unrepairable.append(name + " reason=\"cannot be unwrapped there (\(error))\"")
            } catch {
                // The holder's copy changed under us (another process): tried again at the next pass.
                report.inFlux += 1
                unsettled.insert(uid)
            }
        }
        // The records it lacks, last: a member that holds a record holds what it describes, or was repaired to.
        // Not those of objects it could not be given: its records then differ from its peers', and every process's
        // watch asks for another repair (simulation seed 29115: once written, the records were alike everywhere,
        // the one process that knew the object was missing restarted, and it stayed missing for good).
        // In batches: one object per record made a resync write two objects per missed one.
        let due = group.recordsDue.withLock { $0 }
        let lacking = ledger.records.values.sorted(by: { $0.stamp < $1.stamp }).filter { record in
            !held.contains(record.stamp) && !unsettled.contains(record.object) && group.isReplicable(record, in: ledger)
                && (loggedIn || !record.isPrivate) && (due.contains(record.stamp) || !young(record.stamp.milliseconds))
        }
        for batch in ReplicaRecord.batches(lacking) {
            try mayChange()
            try write(batch, on: target, in: group)
            report.recordsWritten += batch.count
        }
        // The previous format's journals go once what the member holds is adopted (only logged in: see above).
        if loggedIn { for handle in oldJournals { try? token.destroyObject(target.session, handle) } }
        return report
    }

    /// What a compaction did.
    package struct Compaction: CustomStringConvertible {
        package var snapshots = 0, removed = 0, expired = 0
        /// Stopped at its deadline with work left (the next round takes it up).
        package var more = false
        /// A copy of an object whose tombstone is past the retention was seen: the tombstone stays, and a catch-up
        /// is due.
        package var copiesSeen = false
        var changedAnything: Bool { snapshots + removed + expired > 0 }
        package var description: String {
            "snapshots=\(snapshots) removed=\(removed) tombstones-expired=\(expired)\(copiesSeen ? " copies-of-destroyed-seen=yes" : "")\(more ? " more=yes" : "")"
        }
    }

    /// Compacts the records of every member of the group: each live object with more than one record gets one
    /// snapshot on every member, written first; then every record no member needs any more is removed from every
    /// member (those a snapshot stands for, a destroyed object's records but its tombstones, and tombstones older
    /// than the retention). Only with every member of the group reached (`reached`, under `leases`), right after a
    /// catch-up of them all. A destroyed object's records go only when every member showed one of its tombstones in
    /// two reads; a tombstone past the retention only when every member showed it, and a search of every member for
    /// its object, besides the catch-up's, finds none. Other writers may write meanwhile: nothing here depends on
    /// the members holding the same records.
    /// Every step is safe alone: the fold of the records left is the fold of the records before, so a compaction
    /// that stops halfway (a lease lapsed, a member failed) leaves nothing wrong, and the next one finishes it.
    /// `expiring`: whether tombstones past the retention may go (the catch-up before repaired every member in full).
    /// `deadline` (replica clock, ms): it stops there, with `more` set, before its leases run out (removing a few
    /// thousand records from SoftHSM takes longer than a lease lasts).
    package func compact(_ reached: [Reached], in group: Group, leases: [Lease], expiring mayExpire: Bool = true,
                         deadline: UInt64 = .max, cancelled: () -> Bool = { false }) throws(P11Error) -> Compaction? {
        guard reached.count == group.members.count, leases.count == reached.count else { return nil }
        // Before each change: false when the deadline is past (stop, more to do).
        func mayChange() throws(P11Error) -> Bool {
            if cancelled() { throw P11Error(CK_RV(CKR_FUNCTION_CANCELED)) }
            if group.replicaClock.milliseconds >= deadline { return false }
            for lease in leases { try lease.check() }
            return true
        }
        // The records every member showed in both of two reads.
        var everywhere: Set<Stamp>? = nil
        for _ in 0..<2 {
            for r in reached {
                let held = try refreshLedger(group, from: r.member, r.session).held
                everywhere = everywhere.map { $0.intersection(held) } ?? held
            }
        }
        let heldEverywhere = everywhere ?? []
        var result = Compaction()
        var writtenEverywhere = Set<Stamp>()
        let before = group.ledger.withLock { $0 }
        let foldable = before.foldable()
        for uid in before.objects.keys.sorted() {
            guard let snapshot = before.snapshot(of: uid, stamp: group.replicaClock.next(), foldable: foldable[uid] ?? []) else { continue }
            guard try mayChange() else {
                result.more = true
                return result
            }
            for r in reached {
                noteWritten(snapshot, at: try snapshot.write(on: r.member.token, r.session), on: r.member, in: group)
            }
            group.ledger.withLock { _ = $0.add(snapshot) }
            writtenEverywhere.insert(snapshot.stamp)
            result.snapshots += 1
        }
        let ledger = group.ledger.withLock { $0 }
        // A record a snapshot stands for goes only where that snapshot is sure to be on every member: written there
        // by this compaction, or shown by every member in both reads. One written by a compaction that stopped
        // halfway (a member failed after the first writes) may be on some members only; the catch-up brings it to
        // the others, and the next compaction removes what it stands for.
        let covered = Set(ledger.records.values.filter { writtenEverywhere.contains($0.stamp) || heldEverywhere.contains($0.stamp) }
            .flatMap { $0.folded?.supersedes ?? [] })
        let now = group.replicaClock.milliseconds
        // Tombstones past the retention go only when no member shows a copy of the object now either (the catch-up
        // before looked at every object: this is a second look). One that does is kept, and a catch-up asked for.
        var expiring = Set<Stamp>(), kept = Set<Stamp>()
        var lookedForCopies = 0
        // A destroyed object whose tombstone some member did not show keeps all its records: that member may hold a
        // copy, and only they make it surplus there.
        let tombstoned = Set(ledger.records.values.filter { $0.operation == .destroy && heldEverywhere.contains($0.stamp) }.map(\.object))
        for record in ledger.records.values where ledger.objects[record.object]?.destroyed == true && !tombstoned.contains(record.object) {
            kept.insert(record.stamp)
        }
        for record in ledger.records.values where record.operation == .destroy && !kept.contains(record.stamp)
            && !group.isReplicable(record, in: ledger) && ledger.isReplicable(record, now: now, retention: nil) {
            let named = (ledger.objects[record.object]?.template ?? []) + record.attributes
            if cancelled() { throw P11Error(CK_RV(CKR_FUNCTION_CANCELED)) }
            if !mayExpire || !heldEverywhere.contains(record.stamp) {
                kept.insert(record.stamp)
            } else if group.replicaClock.milliseconds >= deadline && lookedForCopies > 0 {
                // Its look for copies (a search of every member per label and ID, 20 ms each on SoftHSM) waits for the
                // next round: with hundreds of tombstones past the retention, a round held every lease for 11 s and
                // more in the two-host multi-writer test, where a round may hold them 5 s. One look per round, late or
                // not: each round gets on.
                kept.insert(record.stamp)
                result.more = true
            } else if ledger.live(record.fingerprint).contains(where: { ledger.objects[$0]!.agrees(with: named) }) {
                // A live object alike, of the same label and ID (made again after the destroy), would look like a copy
                // left behind: the tombstone stays while it lives.
                kept.insert(record.stamp)
            } else {
                lookedForCopies += 1
                if try anyCopy(of: record, ledger.objects[record.object], on: reached) {
                    kept.insert(record.stamp)
                    result.copiesSeen = true
                } else {
                    expiring.insert(record.stamp)
                }
            }
        }
        func removable(_ stamp: Stamp) -> Bool {
            guard !kept.contains(stamp), let record = ledger.records[stamp], !group.isReplicable(record, in: ledger) else { return false }
            return !ledger.superseded.contains(stamp) || covered.contains(stamp) || ledger.objects[record.object]?.destroyed == true
        }
        let first = Stamp(milliseconds: 0, counter: 0, writer: 0)
        for r in reached {
            let cache = group.recordCache.withLock { $0[r.member.index] }
            for (handle, stamps) in (cache?.stamps ?? [:]).sorted(by: { ($0.value.min() ?? first) < ($1.value.min() ?? first) }) {
                let going = stamps.filter(removable)
                guard !going.isEmpty else { continue }
                // A batch some of whose records must stay is written again without the others, first.
                let staying = stamps.filter { !going.contains($0) }.compactMap { ledger.records[$0] }
                guard staying.count + going.count == stamps.count else { continue }
                guard try mayChange() else {
                    result.more = true
                    return result
                }
                do throws(P11Error) {
                    // Still these records at this handle: a module may give a handle freed by another process's
                    // compaction to another object.
                    let value = try r.member.token.readAttributes(r.session, handle, [CKA_VALUE], expected: ReplicaRecord.expectedSize)[0] ?? []
                    guard let there = ReplicaRecord.decodeAll(value), Set(there.map(\.stamp)) == Set(stamps) else { continue }
                    if !staying.isEmpty { try write(staying, on: r, in: group) }
                    try r.member.token.destroyObject(r.session, handle)
                    for stamp in going { if expiring.contains(stamp) { result.expired += 1 } else { result.removed += 1 } }
                } catch where error.rv == CKR_OBJECT_HANDLE_INVALID {
                    // Removed meanwhile by another process's compaction.
                }
                group.recordCache.withLock { _ = $0[r.member.index]?.stamps.removeValue(forKey: handle) }
            }
        }
        return result
    }

    /// Whether a member shows a copy of the object a tombstone destroyed: an object of its class, with the label or
    /// the ID the records last gave it, and the tombstone's fingerprint.
    private func anyCopy(of tombstone: ReplicaRecord, _ state: Ledger.ObjectState?, on reached: [Reached]) throws(P11Error) -> Bool {
        let objectClass = Attribute(CKA_CLASS, ulong: tombstone.fingerprint.objectClass)
        // Its last label and ID, and those the tombstone names (all a fresh process knows once its other records are
        // compacted away); a tombstone of the first format names none: then every object of its class.
        var named = ((state?.template ?? []) + tombstone.attributes).filter { [CK_ATTRIBUTE_TYPE(CKA_LABEL), CK_ATTRIBUTE_TYPE(CKA_ID)].contains($0.type) }
        named = named.enumerated().filter { i, a in !named.prefix(i).contains(a) }.map(\.1)
        let probes = named.isEmpty ? [[objectClass, Attribute(CKA_TOKEN, bool: true)]]
            : named.map { [objectClass, Attribute(CKA_TOKEN, bool: true), $0] }
        for r in reached {
            var handles = Set<MemberObject>()
            for probe in probes { handles.formUnion(try r.member.token.findObjects(r.session, probe)) }
            let key = try replicationKey(r.member, r.session)
            for handle in handles {
                let fingerprint = try? Fingerprint.read(on: r.member.token, r.session, handle, replicationKey: key)
                if fingerprint == tombstone.fingerprint || fingerprint.map({ state?.tombstoneFingerprints.contains($0) == true }) == true {
                    return true
                }
            }
        }
        return false
    }

    /// Records every unrecorded object of the member as created (identities drawn from what they are, so that
    /// another host adopting the same objects names them alike, and identical copies merge).
    /// Returns the stamps of the records it wrote.
    private func adopt(_ target: Reached, in group: Group, view: [MemberCopy]) throws(P11Error) -> [Stamp] {
        let ledger = group.ledger.withLock { $0 }
        let pairing = Pairing(view, with: ledger)
        var adopted: [Stamp] = []
        var seen = Set<ObjectUID>()
        var records: [ReplicaRecord] = []
        for copy in pairing.unrecorded {
            let attributes = copy.attributes.filter { ReplicaRecord.replicatedTypes.contains($0.type) }
            let uid = ObjectUID(fingerprint: copy.fingerprint, attributes: attributes, occurrence: 0)
            guard seen.insert(uid).inserted else { continue }
            records.append(ReplicaRecord(stamp: group.replicaClock.next(), operation: .adopt, object: uid, fingerprint: copy.fingerprint,
                                         attributes: attributes, isPrivate: copy.isPrivate))
        }
        // In batches, as a repair's: a token of a thousand objects joining the group took a thousand writes.
        for batch in ReplicaRecord.batches(records) {
            try write(batch, on: target, in: group)
            group.ledger.withLock { ledger in for record in batch { _ = ledger.add(record) } }
            let stamps = batch.map(\.stamp)
            // Complete, not on their way: the other members get them at once.
            group.recordsDue.withLock { $0.formUnion(stamps) }
            adopted += stamps
        }
        if !adopted.isEmpty { Log.event(.info, "objects-adopted", "group=\(group.name) member=\(target.member.name) objects=\(adopted.count)") }
        return adopted
    }

    /// Writes `batch` (one privacy) on the target as one token object; a token that refuses an object that large
    /// (its own limit) takes the records one by one.
    private func write(_ batch: [ReplicaRecord], on target: Reached, in group: Group) throws(P11Error) {
        let token = target.member.token
        do throws(P11Error) {
            noteWritten(batch, at: try ReplicaRecord.writeBatch(batch, on: token, target.session), on: target.member, in: group)
        } catch where !error.isMemberFault && batch.count > 1 {
            for record in batch { noteWritten(record, at: try record.write(on: token, target.session), on: target.member, in: group) }
        }
    }

    /// The member's token objects (not p11ha's own), each with its fingerprint and replicated attributes.
    package func enumerate(_ reached: Reached, ledger: Ledger) throws(P11Error) -> [MemberCopy] {
        let token = reached.member.token
        let s = reached.session
        let replicationKey = try self.replicationKey(reached.member, s)
        // Without it, keys' fingerprints would be weaker than the records': nothing could be paired rightly.
        if replicationKey == nil, reached.member.group?.replicationKeySeen.load(ordering: .acquiring) == true
            || ledger.objects.values.contains(where: { $0.fingerprint.attributes[Fingerprint.wrappedDigest] != nil }) {
            throw P11Error(CK_RV(CKR_FUNCTION_CANCELED))
        }
        var extraTypes = Set<CK_ATTRIBUTE_TYPE>()
        for state in ledger.objects.values { extraTypes.formUnion(state.attributes.keys) }
        let types = ReplicaRecord.replicatedTypes + extraTypes.subtracting(ReplicaRecord.replicatedTypes).sorted()
        var result: [MemberCopy] = []
        for handle in try token.findObjects(s, [Attribute(CKA_TOKEN, bool: true)]) where handle != replicationKey {
            // An object another process destroys between the search and the read is simply not there any more.
            let head: [[UInt8]?]
            do throws(P11Error) {
                head = try token.readAttributes(s, handle, [CKA_CLASS, CKA_LABEL, CKA_PRIVATE, CKA_EXTRACTABLE, CKA_ID])
            } catch where error.rv == CKR_OBJECT_HANDLE_INVALID {
                continue
            }
            if isInfrastructure(objectClass: head[0], label: head[1]) { continue }
            // The replication key, whatever handle a search gave it: never an application's object.
            if ObjectIdentity(objectClass: head[0], id: head[4]).isReplicationKey { continue }
            let fingerprint: Fingerprint
            let values: [[UInt8]?]
            do throws(P11Error) {
                fingerprint = try Fingerprint.read(on: token, s, handle, replicationKey: replicationKey)
                values = try token.readAttributes(s, handle, types)
            } catch where error.rv == CKR_OBJECT_HANDLE_INVALID || error.rv == CKR_KEY_HANDLE_INVALID {
                continue
            }
            // An attribute the object does not have reads as nil; it is compared as empty.
            let attributes = zip(types, values).map { Attribute($0, $1 ?? []) }
            result.append(MemberCopy(handle: handle, fingerprint: fingerprint, attributes: attributes,
                                     isPrivate: head[2] == [1], extractable: head[3] == [1]))
        }
        return result
    }

    /// Copies a live object to the target: a key wrapped under the replication key, anything else by value; with
    /// the ledger's values of the replicated attributes.
    /// What travels to a member that lacks an object: a key wrapped under the replication key (with the target's
    /// replication key to unwrap it), or a template by value; with the ledger's values of the replicated attributes.
    final class Carried {
        private(set) var wrapped: [UInt8]?
        let unwrappingKey: MemberObject?
        let template: [Attribute]

        init(wrapped: [UInt8]?, unwrappingKey: MemberObject?, template: [Attribute]) {
            self.wrapped = wrapped
            self.unwrappingKey = unwrappingKey
            self.template = template
        }

        /// The wrapped key is zeroed whatever way the copy ends (this is its one owner).
        deinit {
            wrapped?.withUnsafeMutableBufferPointer { buffer in
                for i in buffer.indices { buffer[i] = 0 }
            }
        }
    }

    /// The source's part of a copy (calls only the source, and finds the target's replication key).
    private func carry(_ copy: MemberCopy, state: Ledger.ObjectState, from source: Reached, to target: Reached) throws(P11Error) -> Carried {
        let wanted = state.template.filter { !$0.value.isEmpty || ReplicaRecord.replicatedTypes.contains($0.type) }
        func overridden(_ template: [Attribute]) -> [Attribute] {
            template.filter { a in !wanted.contains { $0.type == a.type } } + wanted.filter { !$0.value.isEmpty }
        }
        if copy.fingerprint.isKey {
            guard let sourceKey = try replicationKey(source.member, source.session),
                  let targetKey = try? replicationKey(target.member, target.session) else {
                throw P11Error(CK_RV(CKR_FUNCTION_FAILED))
            }
            let blob = try ReplicationKey.wrap(on: source.member.token, source.session, replicationKey: sourceKey, key: copy.handle)
            let template = overridden(try ReplicaAttributes.template(on: source.member.token, source.session, copy.handle))
            return Carried(wrapped: blob, unwrappingKey: targetKey, template: template)
        }
        return Carried(wrapped: nil, unwrappingKey: nil,
                       template: overridden(try ReplicaAttributes.byValueTemplate(on: source.member.token, source.session, copy.handle)))
    }

    /// Whether two handles on a member name two objects: a marker label set through `a` must not show through
    /// `b`. When it does (one object), `a`'s label is set back; a label changed meanwhile by an application is
    /// put right by its record at the next repair. An object whose label cannot be set is taken for one.
    private func distinct(_ a: MemberObject, _ b: MemberObject, on target: Reached) throws(P11Error) -> Bool {
        let token = target.member.token
        let label = CK_ATTRIBUTE_TYPE(CKA_LABEL)
        guard let before = try? token.readAttributes(target.session, a, [label])[0] else { return false }
        var nonce = [UInt8](repeating: 0, count: 8)
        for i in nonce.indices { nonce[i] = UInt8.random(in: 0...255) }
        let marker = Array("p11ha second copy ".utf8) + Array(hexEncode(nonce).utf8)
        guard (try? token.setAttributeValues(target.session, a, [Attribute(label, marker)])) != nil else { return false }
        let seen = try? token.readAttributes(target.session, b, [label])[0]
        if seen == marker || seen == nil {
            try token.setAttributeValues(target.session, a, [Attribute(label, before)])
            return false
        }
        return true
    }

    /// The target's part of a copy.
    private func place(_ carried: Carried, on target: Reached) throws(P11Error) -> MemberObject {
        if let blob = carried.wrapped, let key = carried.unwrappingKey {
            return try target.member.token.unwrapKey(target.session, ReplicationKey.wrapMechanism, unwrappingKey: key, wrapped: blob, carried.template)
        }
        return try target.member.token.createObject(target.session, carried.template)
    }

    func describeObject(_ uid: ObjectUID, _ state: Ledger.ObjectState) -> String {
        let names: [CK_OBJECT_CLASS: String] = [CKO_DATA: "data", CKO_CERTIFICATE: "certificate", CKO_PUBLIC_KEY: "public key",
                                                CKO_PRIVATE_KEY: "private key", CKO_SECRET_KEY: "secret key"]
        let label = state.attributes[CKA_LABEL].map { String(decoding: $0.value, as: UTF8.self) } ?? ""
        let id = (state.attributes[CKA_ID]?.value ?? []).map { ($0 < 16 ? "0" : "") + String($0, radix: 16) }.joined()
        return "\(names[state.fingerprint.objectClass] ?? "object") label=\"\(label)\" id=\(id) uid=\(uid)"
    }
}

/// The token objects on a repair's target that its enumeration did not list and the repair did not place: another
/// process's, or ones the enumeration missed. Looked for again every `every` copies, not before each: on SoftHSM a
/// search costs as much as listing the whole token (22 ms with 1,000 objects), and a look before each copy held a
/// member that missed 500 objects out of service for 10 s (about 50 copies/s). Counted in copies, not time, so that
/// a seeded simulation replays alike.
struct Newcomers {
    let token: any TokenBackend
    let session: MemberSession
    let enumerated: Set<MemberObject>
    var placed = Set<MemberObject>()
    static let every = 16
    private var seen: [[[UInt8]?]] = []
    /// Copies since the last look; the first copy looks.
    private var sinceLook = Newcomers.every

    init(token: any TokenBackend, session: MemberSession, enumerated: Set<MemberObject>) {
        self.token = token
        self.session = session
        self.enumerated = enumerated
    }

    /// Whether a newcomer has the class, and the label and ID where given, of `probe` (a search's template). A look
    /// that fails finds nothing, as a failed search did.
    mutating func match(_ probe: [Attribute]) -> Bool {
        if sinceLook >= Self.every {
            sinceLook = 0
            seen = []
            if let present = try? token.findObjects(session, [Attribute(CKA_TOKEN, bool: true)]) {
                for handle in present where !enumerated.contains(handle) && !placed.contains(handle) {
                    if let values = try? token.readAttributes(session, handle, Self.types) { seen.append(values) }
                }
            }
        }
        sinceLook += 1
        let wanted = Self.types.map { type in probe.first { $0.type == type }?.value }
        return seen.contains { values in zip(wanted, values).allSatisfy { want, have in want == nil || want == have } }
    }

    private static let types: [CK_ATTRIBUTE_TYPE] = [CKA_CLASS, CKA_LABEL, CKA_ID]
}

/// p11ha's own objects on a member: records, leases, the previous format's journals (and the replication key,
/// told apart by its identity).
func isInfrastructure(objectClass: [UInt8]?, label: [UInt8]?) -> Bool {
    guard let objectClass, Attribute(CKA_CLASS, objectClass).ulongValue == CKO_DATA, let label else { return false }
    return infrastructureLabels.contains(String(decoding: label, as: UTF8.self))
}

let infrastructureLabels: Set<String> = Journal.labels.union([ReplicaRecord.label, Lease.label])

/// A lease on one member, held through the member itself: whoever holds it is the only one repairing that member
/// (copying to it, destroying on it), so two hosts never copy the same object to one member twice. A claim is a
/// public data object; among the live claims the one with the smallest stamp holds the lease. Claims expire, so
/// a claimant that died blocks others for at most `duration`.
package final class Lease {
    static let label = "p11ha lease"
    let member: Member
    let session: MemberSession
    let clock: ReplicaClock
    let stamp: Stamp
    let expires: UInt64
    private var claim: MemberObject?

    struct Claim {
        let stamp: Stamp
        let expires: UInt64
        /// The claimant's host (its boot ID) and process, so that a claim of a process of this host that died is
        /// taken away at once rather than at its expiry.
        var host = ""
        var pid: Int32 = 0

        var claimantIsDeadHere: Bool {
            host == Lease.thisHost && !host.isEmpty && pid > 0 && pid != getpid() && kill(pid, 0) != 0 && errno == ESRCH
        }
    }

    /// This boot of this host and this PID namespace (process IDs mean something only within one): the boot ID
    /// and the namespace's link, "" when either is unreadable (claims then only expire).
    static let thisHost: String = {
        let fd = open("/proc/sys/kernel/random/boot_id", O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return "" }
        defer { close(fd) }
        var buffer = [UInt8](repeating: 0, count: 64)
        let n = read(fd, &buffer, 64)
        var link = [CChar](repeating: 0, count: 64)
        let m = readlink("/proc/self/ns/pid", &link, 63)
        guard n > 0, m > 0 else { return "" }
        let namespace = String(decoding: link.prefix(m).map { UInt8(bitPattern: $0) }.filter { $0 > 32 && $0 < 127 }, as: UTF8.self)
        return String(decoding: buffer.prefix(n).filter { $0 > 32 && $0 < 127 }, as: UTF8.self) + "/" + namespace
    }()

    private init(member: Member, session: MemberSession, clock: ReplicaClock, stamp: Stamp, expires: UInt64) {
        self.member = member
        self.session = session
        self.clock = clock
        self.stamp = stamp
        self.expires = expires
    }

    /// Claims the member's lease; nil when another claimant holds it (then nothing is left behind).
    /// How long a repairer's claim lives: longer than any one change a repair makes, re-checked before each.
    package static let repairDuration: Duration = .seconds(30)

    package static func acquire(_ member: Member, _ session: MemberSession, clock: ReplicaClock, duration: Duration) throws(P11Error) -> Lease? {
        let token = member.token
        // A look before claiming. SoftHSM's file store shows a process the objects other processes created only
        // until it creates or destroys one itself: its own write takes the token's generation along without
        // reading the token again, so what others made before stays out of its searches until some other process
        // writes ("What the stores do" in REPLICATION.md). A claim made first hid, from the search after it, the
        // very claims it was looking for: two hosts held one member's lease and copied the same objects to it.
        if try !liveClaims(on: token, session, excluding: nil, clock: clock).isEmpty { return nil }
        let stamp = clock.next()
        let expires = stamp.milliseconds + UInt64(duration.milliseconds)
        let lease = Lease(member: member, session: session, clock: clock, stamp: stamp, expires: expires)
        lease.claim = try token.createObject(session, [
            Attribute(CKA_CLASS, ulong: CKO_DATA), Attribute(CKA_TOKEN, bool: true), Attribute(CKA_PRIVATE, bool: false),
            Attribute(CKA_LABEL, Array(label.utf8)), Attribute(CKA_APPLICATION, Array(ReplicaRecord.application.utf8)),
            Attribute(CKA_VALUE, Array("p11ha-lease 1 \(stamp.milliseconds) \(stamp.counter) \(hex64(stamp.writer)) \(expires) \(thisHost.isEmpty ? "-" : thisHost) \(getpid())".utf8)),
        ])
        do throws(P11Error) {
            try lease.look()
        } catch {
            lease.release()
            if error.rv == CKR_FUNCTION_CANCELED { return nil }
            throw error
        }
        // The first change looks again (`check`): one look proves nothing, and by then other processes' writes
        // have likely shown this one what its own claim hid.
        return lease
    }

    /// The live claims of other claimants on the member, with their handles. Expired claims, this process's own
    /// claims left by a repair that could not remove them, and claims of processes of this host that are gone
    /// are removed on the way.
    private static func liveClaims(on token: any TokenBackend, _ session: MemberSession, excluding own: MemberObject?,
                                   clock: ReplicaClock) throws(P11Error) -> [(MemberObject, Claim)] {
        let now = clock.milliseconds
        var live: [(MemberObject, Claim)] = []
        for (handle, other) in try claims(on: token, session) where handle != own {
            if other.expires < now || other.stamp.writer == clock.writer || other.claimantIsDeadHere {
                try? token.destroyObject(session, handle)
                continue
            }
            live.append((handle, other))
        }
        return live
    }

    /// A look at the other claims: an earlier one holds the lease (this claim gives way: CKR_FUNCTION_CANCELED);
    /// a later one is removed. Its claimant may not see this claim (its own claim hid it), and learns that it lost
    /// when it finds its claim gone, before its next change (`check`).
    private func look() throws(P11Error) {
        for (handle, other) in try Self.liveClaims(on: member.token, session, excluding: claim, clock: clock) {
            if other.stamp < stamp { throw P11Error(CK_RV(CKR_FUNCTION_CANCELED)) }
            try? member.token.destroyObject(session, handle)
            Log.event(.info, "lease-claim-removed", "member=\(member.name) reason=\"a later claim than this process's\"")
        }
    }

    static func parse(_ value: [UInt8]) -> Claim? {
        let fields = String(decoding: value, as: UTF8.self).split(separator: " ")
        guard fields.count == 8, fields[0] == "p11ha-lease", fields[1] == "1", let ms = UInt64(fields[2]), let counter = UInt64(fields[3]),
              let writer = UInt64(fields[4], radix: 16), let expires = UInt64(fields[5]), let pid = Int32(fields[7]) else { return nil }
        return Claim(stamp: Stamp(milliseconds: ms, counter: counter, writer: writer), expires: expires,
                     host: fields[6] == "-" ? "" : String(fields[6]), pid: pid)
    }

    /// Before each change to the member: the lease must still hold for a while (a margin for the change itself),
    /// this claim must still be there (an earlier claimant that saw it removed it), and, looked at again every
    /// second (the first change always looks), no earlier claim may have appeared: a claimant whose search ran
    /// before this claim was made, or whose own write hid it, also believes it holds the lease; the later stamp
    /// gives way at its next look, and the earlier one removes the later claim when it sees it.
    func check() throws(P11Error) {
        let now = clock.milliseconds
        if now + 1_000 > expires {
            Log.event(.warning, "lease-lapsed", "member=\(member.name)")
            throw P11Error(CK_RV(CKR_FUNCTION_CANCELED))
        }
        if let claim {
            // Read by handle, afresh: SoftHSM reads an object's file again when it changed or went.
            do throws(P11Error) {
                _ = try member.token.readAttributes(session, claim, [CKA_LABEL])
            } catch where error.rv == CKR_OBJECT_HANDLE_INVALID {
                self.claim = nil
                Log.event(.info, "lease-yielded", "member=\(member.name) reason=\"an earlier claimant removed this claim\"")
                throw P11Error(CK_RV(CKR_FUNCTION_CANCELED))
            }
        }
        guard lastLook == 0 || now >= lastLook + 1_000 else { return }
        lastLook = now
        do throws(P11Error) {
            try look()
        } catch where error.rv == CKR_FUNCTION_CANCELED {
            Log.event(.info, "lease-yielded", "member=\(member.name)")
            throw error
        }
    }

    private var lastLook: UInt64 = 0

    /// The claims on the member, with their handles.
    static func claims(on token: any TokenBackend, _ session: MemberSession) throws(P11Error) -> [(MemberObject, Claim)] {
        var result: [(MemberObject, Claim)] = []
        for handle in try token.findObjects(session, [Attribute(CKA_CLASS, ulong: CKO_DATA), Attribute(CKA_LABEL, Array(label.utf8))]) {
            if let value = try? token.readAttributes(session, handle, [CKA_VALUE])[0], let claim = parse(value) { result.append((handle, claim)) }
        }
        return result
    }

    package func release() {
        if let claim { try? member.token.destroyObject(session, claim) }
        claim = nil
    }
}

extension ReplicaKeeper {
    /// How a member stands against the union of the records, without changing anything (`p11hactl status`).
    package struct Standing: Sendable {
        package var records = 0
        /// Live objects it lacks, named; those no reachable member can give it are also in `unrepairable`.
        package var missing: [String] = []
        package var unrepairable: [String] = []
        /// Copies of destroyed objects and second copies.
        package var surplus = 0
        /// Copies whose attributes differ from the records'.
        package var differing = 0
        package var unrecorded = 0
        /// Objects no record describes that not every reachable member holds alike (made on one member outside
        /// p11ha): the members do not agree, though no record says which is right (`p11hactl sync` copies them).
        package var unrecordedDiffer = false

        package var agrees: Bool { missing.isEmpty && surplus == 0 && differing == 0 && !unrecordedDiffer }
    }

    /// The standing of each reached member (by member index).
    package func standings(_ reached: [Reached], in group: Group, loggedIn: Bool) throws(P11Error) -> [Int: Standing] {
        var counts: [Int: Int] = [:]
        for r in reached { counts[r.member.index] = try refreshLedger(group, from: r.member, r.session).held.count }
        let ledger = group.ledger.withLock { $0 }
        let visible: (Ledger.ObjectState) -> Bool = { loggedIn || !$0.isPrivate }
        var pairings: [Int: Pairing] = [:]
        var views: [Int: [MemberCopy]] = [:]
        for r in reached {
            views[r.member.index] = try enumerate(r, ledger: ledger)
            pairings[r.member.index] = Pairing(views[r.member.index]!, with: ledger, visibleOnly: visible)
        }
        var unrecorded: [[Fingerprint: Int]] = []
        for r in reached {
            var counts: [Fingerprint: Int] = [:]
            for copy in pairings[r.member.index]!.unrecorded { counts[copy.fingerprint, default: 0] += 1 }
            unrecorded.append(counts)
        }
        let unrecordedDiffer = unrecorded.dropFirst().contains { $0 != unrecorded.first }
        var result: [Int: Standing] = [:]
        for r in reached {
            let pairing = pairings[r.member.index]!
            var standing = Standing(records: counts[r.member.index] ?? 0, surplus: pairing.surplus.count, unrecorded: pairing.unrecorded.count,
                                    unrecordedDiffer: unrecordedDiffer)
            standing.differing = pairing.copies.filter { !ledger.objects[$0.key]!.corrections(to: $0.value.attributes).isEmpty }.count
            for uid in pairing.missing.sorted() {
                let state = ledger.objects[uid]!
                let name = describeObject(uid, state)
                standing.missing.append(name)
                let holders = pairings.filter { $0.value.copies[uid] != nil }
                if holders.isEmpty {
                    standing.unrepairable.append(name + " reason=\"no member in reach holds it\"")
                } else if state.fingerprint.isKey, !holders.contains(where: { $0.value.copies[uid]!.extractable }) {
                    standing.unrepairable.append(name + " reason=\"not extractable: it cannot travel under the replication key\"")
                } else if state.fingerprint.isKey, holders.allSatisfy({ $0.value.copies[uid]!.fingerprint.isWeak }) {
                    // Read without its wrapped form where it is held: its holders cannot wrap it (a key type they cannot
                    // wrap, kept on its maker by generated-keys = replicate-or-keep; a member behind p11-kit 0.24's client).
                    standing.unrepairable.append(name + " reason=\"its holders cannot wrap it under the replication key\"")
                }
            }
            result[r.member.index] = standing
        }
        return result
    }
}
