// Objects: one virtual handle per object whatever member holds it; writes reach every member that holds a copy.
import CInterop

extension Runtime {
    public func createObject(_ handle: SessionHandle, _ template: [Attribute]) throws(P11Error) -> ObjectHandle {
        let session = try session(handle)
        defer { session.endCall() }
        let group = session.group
        let copies = try fanOut.everyMember(of: group, group.membersInService, refusals: .askedAgainAfterPeers, session: session) { (member) throws(P11Error) in
            try member.token.createObject(try session.memberSession(member), template)
        } undo: { member, object in
            if let s = try? session.memberSession(member) { try? member.token.destroyObject(s, object) }
        }
        return try record(copies, in: session, isToken: template[CK_ATTRIBUTE_TYPE(CKA_TOKEN)]?.boolValue ?? false)
    }

    /// C_CopyObject, replayed on every member that holds the original.
    public func copyObject(_ handle: SessionHandle, _ object: ObjectHandle, _ template: [Attribute]) throws(P11Error) -> ObjectHandle {
        let session = try session(handle)
        defer { session.endCall() }
        let source = try copies(of: object, in: session, invalid: .objectHandleInvalid)
        let copies = try fanOut.everyHolder(source, in: session, refusals: .askedAgainAfterPeers) { (member, s, original) throws(P11Error) in
            try member.token.copyObject(s, original, template)
        } undo: { member, s, copy in
            try? member.token.destroyObject(s, copy)
        }
        // A copy is a token object if asked for, else it inherits the original's CKA_TOKEN.
        let isToken = template[CK_ATTRIBUTE_TYPE(CKA_TOKEN)]?.boolValue ?? (try? isTokenObject(object, in: session)) ?? false
        return try record(copies, in: session, isToken: isToken, withoutSource: membersWithoutCopy(source, in: session.group))
    }

    public func destroyObject(_ handle: SessionHandle, _ object: ObjectHandle) throws(P11Error) {
        let session = try session(handle)
        defer { session.endCall() }
        let group = session.group
        let isToken = group.objects.withLock { $0[object]?.owner == nil }
        let source = try completeCopies(of: object, try copies(of: object, in: session, invalid: .objectHandleInvalid),
                                        in: session, isToken: isToken)
        let withoutCopy = membersWithoutCopy(source, in: group)
        guard isToken else {
            // A session object: no record; a member that refuses after another destroyed it differs from the rest.
            try destroyEverywhere(object, source, in: session)
            return
        }
        // A token object's destroy is decided by its record, a tombstone, written before any copy goes: a destroy
        // cannot be undone, so one whose record no member took must leave the object where it was (before, the
        // copies went first, and a tombstone that failed after them lost an object the application was told still
        // exists: simulation seeds 3815, 7178, 8406, 8773). The members' own refusal is asked first: the
        // tombstone cannot be taken back either.
        let (uid, description) = try identifyForWrite(object, source, in: session)
        let destroyable = try onPrimaryCopy(of: object, in: session) { (member, s, copy) throws(P11Error) in
            try member.token.readAttributes(s, copy, [CK_ATTRIBUTE_TYPE(CKA_DESTROYABLE)])
        }
        if destroyable.first??.first == 0 { throw P11Error.member(CK_RV(CKR_ACTION_PROHIBITED)) }
        // A token object goes only through a read-write session: the members would refuse it
        // (CKR_SESSION_READ_ONLY) after the tombstone, and each would be marked stale (found by the fuzzer).
        if !session.readWrite { throw P11Error(CK_RV(CKR_SESSION_READ_ONLY)) }
        // The label and ID it had: once the compaction has removed its other records, a look for copies left behind
        // before its tombstone expires searches by them (`ReplicaKeeper.compact`); the fold reads no attribute of a
        // tombstone.
        let tombstone = ReplicaRecord(stamp: group.replicaClock.next(), operation: .destroy, object: uid,
                                      fingerprint: description.fingerprint, attributes: description.attributes, isPrivate: description.isPrivate)
        try writeRecord(tombstone, session, on: group.membersInService.map(\.index), withoutCopy: withoutCopy)
        // Written: the destroy holds. A holder that does not destroy its copy now is brought to the tombstone
        // before it serves again; no search reaches the copy meanwhile.
        let holders = group.membersInService.filter { source[$0.index] != nil }
        for member in holders {
            let copy = source[member.index]!
            do throws(P11Error) {
                try member.token.destroyObject(try session.memberSession(member), copy)
            } catch where error.rv == CKR_OBJECT_HANDLE_INVALID {
                // Our handle names nothing there now: gone already (another process's destroy), or a copy a repair
                // replaced (a second copy made while a search missed the first, then one of the two destroyed).
                // Looked for again by identity; and a catch-up applies the tombstone to whatever is left (seed
                // 10387: a copy stayed, the members agreeing on their records, so nothing else would repair it).
                if let again = refreshCopy(of: object, on: member, in: session), let s = try? session.memberSession(member) {
                    try? member.token.destroyObject(s, again)
                }
                recovery.requestCatchUp(group)
            } catch where session.isClosed && error.isSessionLoss {
                // The application closed its session meanwhile: the member is not at fault; a catch-up destroys it.
                recovery.requestCatchUp(group)
            } catch {
                fanOut.markStale(member, reason: "missed a destroy whose record was written: \(error)")
            }
            group.objects.withLock { $0.removeCopy(object, member: member.index) }
        }
    }

    private func destroyEverywhere(_ object: ObjectHandle, _ source: [MemberObject?], in session: VirtualSession) throws(P11Error) {
        let group = session.group
        // A destroy cannot be undone: where it succeeded before a later member refused it (the members disagree),
        // those members lost an object the application still has.
        var lost: [Member] = []
        let destroyed: [(Int, Void)]
        do {
            destroyed = try fanOut.everyHolder(source, in: session) { (member, s, copy) throws(P11Error) in
                try member.token.destroyObject(s, copy)
            } undo: { member, _, _ in
                lost.append(member)
            }
        } catch {
            if !lost.isEmpty { diverged(session, object, lost: lost, write: "destroy", error) }
            throw error
        }
        group.objects.withLock { table in
            for (index, _) in destroyed { table.removeCopy(object, member: index) }
        }
    }

    public func objectSize(_ handle: SessionHandle, _ object: ObjectHandle) throws(P11Error) -> CK_ULONG {
        let session = try session(handle)
        defer { session.endCall() }
        return try onPrimaryCopy(of: object, in: session) { (member, s, copy) throws(P11Error) in try member.token.objectSize(s, copy) }
    }

    /// Attribute values as the member holding the first copy answers them, with its own return value.
    public func attributeValues(_ handle: SessionHandle, _ object: ObjectHandle,
                                _ queries: [AttributeQuery]) throws(P11Error) -> (rv: CK_RV, answers: [AttributeAnswer]) {
        let session = try session(handle)
        defer { session.endCall() }
        return try onPrimaryCopy(of: object, in: session) { (member, s, copy) throws(P11Error) in
            var result = try member.token.attributeValues(s, copy, queries)
            if P11Error.member(result.rv).isMemberFault { throw P11Error.member(result.rv) }
            fillValueLength(&result.answers, queries, member, s, copy)
            return result
        }
    }

    /// A secret key's CKA_VALUE_LEN when the member answers 0: SoftHSM 2.6.1 does not set it on a key it unwraps,
    /// and every token copy of a key generated through a group is an unwrapped one, so the group would answer 0
    /// where one token answers the key's length (p11test's key listing; an application sizing a key by it). The
    /// length is the member's own: the size of the key wrapped under the replication key with RFC 3394 key wrap
    /// (8 bytes more than the key; asked as a length only, nothing is wrapped out). A key it cannot wrap that way
    /// (not extractable, a length not a multiple of 8) keeps the member's answer.
    private func fillValueLength(_ answers: inout [AttributeAnswer], _ queries: [AttributeQuery],
                                 _ member: Member, _ session: MemberSession, _ copy: MemberObject) {
        let zero = withUnsafeBytes(of: CK_ULONG(0)) { Array($0) }
        guard let index = queries.indices.first(where: { queries[$0].type == CKA_VALUE_LEN }),
              index < answers.count, answers[index].value == zero,
              let objectClass = try? member.token.readAttributes(session, copy, [CKA_CLASS])[0],
              Attribute(CKA_CLASS, objectClass).ulongValue == CK_ULONG(CKO_SECRET_KEY),
              let replicationKey = try? replicas.replicationKey(member, session), replicationKey != copy,
              case .length(let wrapped)? = try? member.token.wrapKey(session, Mechanism(CK_MECHANISM_TYPE(CKM_AES_KEY_WRAP)),
                                                                    wrappingKey: replicationKey, key: copy, capacity: nil),
              wrapped > 8 else { return }
        answers[index].value = withUnsafeBytes(of: CK_ULONG(wrapped - 8)) { Array($0) }
    }

    public func setAttributeValues(_ handle: SessionHandle, _ object: ObjectHandle, _ template: [Attribute]) throws(P11Error) {
        let session = try session(handle)
        defer { session.endCall() }
        let group = session.group
        let isToken = group.objects.withLock { $0[object]?.owner == nil }
        let source = try completeCopies(of: object, try copies(of: object, in: session, invalid: .objectHandleInvalid),
                                        in: session, isToken: isToken)
        let withoutCopy = membersWithoutCopy(source, in: group)
        // In one read: the identity before the change (so that a member that misses it can apply it on its
        // return), and what the attributes were (to set them back where the change succeeded if a later member
        // refuses it; not if one of them cannot be read). A token object's write needs the identity; a session
        // object's goes on without the read.
        let identified = isToken ? try identifyForWrite(object, source, in: session) : nil
        let identityCount = ObjectIdentity.attributeTypes.count
        let read = { () throws(P11Error) -> [[UInt8]?] in
            try self.onPrimaryCopy(of: object, in: session) { (member, s, copy) throws(P11Error) in
                try member.token.readAttributes(s, copy, ObjectIdentity.attributeTypes + template.map(\.type))
            }
        }
        let values: [[UInt8]?]? = isToken ? try read() : try? read()
        let before = isToken ? values.map { ObjectIdentity(reading: Array($0.prefix(identityCount))) } : nil
        let old = values?.dropFirst(identityCount)
        let restore: [Attribute]? = old.flatMap { old in
            old.contains(where: { $0 == nil }) ? nil : zip(template, old).map { Attribute($0.type, $1!) }
        }
        // Sets the old values back on a member's copy (the one found again if `onFreshCopy` replaced it).
        let setBack = { (member: Member, s: MemberSession) -> Bool in
            guard let restore, let copy = group.objects.withLock({ $0[object]?.copies[member.index] }) ?? source[member.index] else { return false }
            return (try? member.token.setAttributeValues(s, copy, restore)) != nil
        }
        var unrestored: [Member] = []
        let changed: [(Int, Void)]
        do {
            changed = try fanOut.everyHolder(source, in: session, refusals: .askedAgainAfterPeers) { (member, s, copy) throws(P11Error) in
                try onFreshCopy(of: object, on: member, in: session, copy) { (copy) throws(P11Error) in
                    try member.token.setAttributeValues(s, copy, template)
                }
            } undo: { member, s, _ in
                if !setBack(member, s) { unrestored.append(member) }
            }
        } catch {
            if !unrestored.isEmpty { diverged(session, object, lost: unrestored, write: "attribute change", error) }
            throw error
        }
        guard let before, let (uid, description) = identified else { return }
        group.objects.withLock { $0.replaceIdentity(object, before.changed(by: template)) }
        // A change of what the object is made of (a data object's value) changes its fingerprint: read anew.
        let material = Set(Fingerprint.materialTypes(description.fingerprint.objectClass))
        do {
            let fingerprint = template.contains(where: { material.contains($0.type) })
                ? try identifyForWrite(object, source, in: session).1.fingerprint : description.fingerprint
            let change = ReplicaRecord(stamp: group.replicaClock.next(), operation: .set, object: uid, fingerprint: fingerprint,
                                       attributes: template, isPrivate: description.isPrivate)
            try writeRecord(change, session, on: changed.map(\.0) + withoutCopy, withoutCopy: withoutCopy)
        } catch {
            // No member took the record: the change is set back where it was made, as when a member refuses it
            // (before, it stayed, unrecorded, while the application was told it failed: simulation seed 3815).
            let unrestored = changed.map { group.members[$0.0] }.filter { member in
                guard let s = try? session.memberSession(member) else { return true }
                return !setBack(member, s)
            }
            if unrestored.isEmpty {
                group.objects.withLock { $0.replaceIdentity(object, before) }
            } else {
                diverged(session, object, lost: unrestored, write: "attribute change", error)
            }
            throw error
        }
    }

    /// A write that failed part-way and could not be undone where it succeeded: the members that kept it differ
    /// from what the application was told (no record was written). They leave service to be brought back to
    /// what the records say; the log and the status file (`p11hactl status`) say which.
    private func diverged(_ session: VirtualSession, _ object: ObjectHandle, lost: [Member], write: String, _ error: P11Error) {
        let group = session.group
        Log.event(.warning, "write-diverged", "group=\(group.name) write=\"\(write)\" members=\(lost.map(\.name)) reason=\"\(error)\"")
        for member in lost { fanOut.markStale(member, reason: "\(write) failed part-way and could not be undone: \(error)") }
    }

    // MARK: search

    /// Searches every member in service and merges what they hold: each object once, with one handle.
    public func findObjectsInit(_ handle: SessionHandle, _ template: [Attribute]) throws(P11Error) {
        let session = try session(handle)
        defer { session.endCall() }
        let group = session.group
        if session.state.withLock({ $0.search != nil }) { throw P11Error.operationActive }
        var results: [ObjectHandle] = []
        var seen = Set<ObjectHandle>()
        let generation = group.objects.withLock { $0.generation }
        let found = try fanOut.everyMember(of: group, group.membersInService, onFault: .failed, session: session) { (member) throws(P11Error) in
            let s = try session.memberSession(member)
            do throws(P11Error) {
                return (s, try member.token.findObjects(s, template))
            } catch where error.fromMember && error.rv == CKR_OPERATION_ACTIVE {
                // An operation left active in our session there (see startOperation): ended, and once more.
                session.endStrayOperations(on: member, s)
                return (s, try member.token.findObjects(s, template))
            }
        }
        for (index, (memberSession, handles)) in found {
            let member = group.members[index]
            for copy in handles {
                var object = group.objects.withLock { $0.handle(member: index, copy: copy) }
                if object == nil {
                    guard let values = try? member.token.readAttributes(memberSession, copy, ObjectIdentity.attributeTypes) else { continue }
                    let identity = ObjectIdentity(reading: values)
                    object = group.objects.withLock { table in
                        // Another thread may have mapped it meanwhile. A login that ended since the search began makes
                        // the handle unfit to record (see ObjectTable.generation): the object is named, not recorded.
                        table.handle(member: index, copy: copy)
                            ?? (table.generation == generation
                                ? table.attach(member: index, copy: copy, identity: identity, memberCount: group.members.count)
                                : table.object(identity: identity))
                    }
                }
                if let object, !group.isInfrastructure(object), seen.insert(object).inserted { results.append(object) }
            }
        }
        session.state.withLock { $0.search = VirtualSession.Search(results: results) }
    }

    public func findObjects(_ handle: SessionHandle, max: Int) throws(P11Error) -> [ObjectHandle] {
        let session = try session(handle)
        defer { session.endCall() }
        return try session.state.withLock { (state) throws(P11Error) -> [ObjectHandle] in
            guard var search = state.search else { throw P11Error.operationNotInitialized }
            let end = min(search.cursor + max, search.results.count)
            let batch = Array(search.results[search.cursor..<end])
            search.cursor = end
            state.search = search
            return batch
        }
    }

    public func findObjectsFinal(_ handle: SessionHandle) throws(P11Error) {
        let session = try session(handle)
        defer { session.endCall() }
        try session.state.withLock { (state) throws(P11Error) in
            guard state.search != nil else { throw P11Error.operationNotInitialized }
            state.search = nil
        }
    }

    // MARK: helpers shared with key management and cryptography

    /// The per-member copies of a virtual object; `invalid` is the caller's error for an unknown handle.
    func copies(of object: ObjectHandle, in session: VirtualSession, invalid: P11Error) throws(P11Error) -> [MemberObject?] {
        let group = session.group
        guard var record = group.objects.withLock({ $0[object] }) else { throw invalid }
        // p11ha's own objects (the replication key, the records, the leases) are not the application's: searches skip them,
        // and the handles a search gave them internally are refused like any handle p11ha never gave. Before, a
        // guessed handle destroyed the replication key on every member (fuzzer seed 11961027084769893313:
        // C_DestroyObject of handle 10).
        if group.isInfrastructure(object) { throw invalid }
        if record.refind, let identity = record.identity {
            // Found again on each member in service that has no copy recorded (no lock held while they answer);
            // recorded only if the login did not end meanwhile, used for this call either way.
            let generation = group.objects.withLock { $0.generation }
            var foundNow = record.copies
            for member in group.membersInService where record.copies[member.index] == nil {
                guard let s = try? session.memberSession(member),
                      let found = try? member.token.findObjects(s, identity.template).first else { continue }
                foundNow[member.index] = found
                group.objects.withLock { table in
                    if table.generation == generation { table.setCopy(object, member: member.index, copy: found) }
                }
            }
            record = group.objects.withLock({ $0[object] }) ?? record
            for (index, copy) in foundNow.enumerated() where record.copies[index] == nil { record.copies[index] = copy }
            // Found on no member: invisible now (a private object with nobody logged in), as on one token.
            if record.copies.allSatisfy({ $0 == nil }) { throw invalid }
        }
        // A session object lives only on the members that held it when it was made; when none holds it any more
        // (their modules restarted), it is gone: the caller's handle is invalid, never another member's object.
        if record.owner != nil && record.copies.allSatisfy({ $0 == nil }) {
            group.objects.withLock { _ = $0.remove(object) }
            throw invalid
        }
        return record.copies
    }

    /// Runs a read on the first member in service with a copy (so that a two-call length query and its read
    /// agree), moving to the next one on a member fault.
    func onPrimaryCopy<T>(of object: ObjectHandle, in session: VirtualSession,
                          _ read: (Member, MemberSession, MemberObject) throws(P11Error) -> T) throws(P11Error) -> T {
        let copies = try copies(of: object, in: session, invalid: .objectHandleInvalid)
        return try fanOut.onOneMember(session.group, holding: copies, choice: .first, session: session) { (member) throws(P11Error) in
            let s = try session.memberSession(member)
            // A copy a repair replaced is found again (the member's CKR_OBJECT_HANDLE_INVALID reached an application
            // once, in a rename or destroy of the one-host multi-writer test, for a handle it held rightly).
            return try onFreshCopy(of: object, on: member, in: session, copies[member.index]!) { (copy) throws(P11Error) in
                try read(member, s, copy)
            }
        }
    }

    /// Before a write to a token object: its copy on each member in service this process has none recorded for,
    /// looked for by identity (a search that missed it, or a member that returned with it). The write's record goes
    /// to members without a copy as to members that missed nothing: one that holds a copy must get the write too.
    func completeCopies(of object: ObjectHandle, _ copies: [MemberObject?], in session: VirtualSession, isToken: Bool) throws(P11Error) -> [MemberObject?] {
        let group = session.group
        guard isToken, let identity = group.objects.withLock({ $0[object]?.identity }) else { return copies }
        var result = copies
        let generation = group.objects.withLock { $0.generation }
        for member in group.membersInService where result[member.index] == nil {
            guard let s = try? session.memberSession(member),
                  let found = try? member.token.findObjects(s, identity.template), found.count == 1 else { continue }
            result[member.index] = found[0]
            group.objects.withLock { table in
                if table.generation == generation && table.handle(member: member.index, copy: found[0]) == nil {
                    table.setCopy(object, member: member.index, copy: found[0])
                }
            }
        }
        return result
    }

    /// Members in service that hold no copy of an object only some members have (a key that could not be copied
    /// to them, or one a token made alone: SoftHSM keeps the object a failed C_CreateObject began). A write to it
    /// passes them by with nothing to miss: the write's record goes to them with the members that made it; they
    /// are not marked stale.
    func membersWithoutCopy(_ copies: [MemberObject?], in group: Group) -> [Int] {
        group.membersInService.filter { copies[$0.index] == nil }.map(\.index)
    }

    /// Runs `body` with member sessions to read and write records in: the application's session's; or, while it
    /// has an operation under way there (a digest kept active by CKR_BUFFER_TOO_SMALL, a signature in parts), on a
    /// token that allows one operation per session (SoftHSM refuses searches then with CKR_OPERATION_ACTIVE),
    /// sessions of its own, opened for it and closed.
    func withRecordSessions<T>(_ session: VirtualSession, _ body: ((Member) -> MemberSession?) throws(P11Error) -> T) throws(P11Error) -> T {
        let busy = session.state.withLock { state in state.operations.contains { $0 != nil } }
        guard busy else { return try body { try? session.memberSession($0) } }
        var opened: [Int: MemberSession] = [:]
        defer { for (index, s) in opened { session.group.members[index].token.closeSession(s) } }
        return try body { member in
            if let s = opened[member.index] { return s }
            guard let s = try? member.token.openSession(readWrite: true) else { return nil }
            opened[member.index] = s
            return s
        }
    }

    /// The identity and description of a token object the application writes to, read from its first copy in
    /// service (see `ReplicaKeeper.identify`).
    func identifyForWrite(_ object: ObjectHandle, _ copies: [MemberObject?], in session: VirtualSession) throws(P11Error) -> (ObjectUID, ReplicaKeeper.Description) {
        let group = session.group
        let known = group.objects.withLock { $0[object]?.uid }
        let identified = try withRecordSessions(session) { (sessionFor) throws(P11Error) in
            try fanOut.onOneMember(group, holding: copies, choice: .first, session: session) { (member) throws(P11Error) in
                guard let s = sessionFor(member) else { throw P11Error.deviceError }
                let elsewhere = known != nil ? [] : group.membersInService.filter { $0 !== member }.compactMap { other in
                    sessionFor(other).map { (other, $0) }
                }
                return try replicas.identify(group, member, s, copies[member.index]!, known: known, elsewhere: elsewhere)
            }
        }
        if known == nil { group.objects.withLock { $0.setUID(object, identified.0) } }
        return identified
    }

    /// Writes a write's record on `members` (those that made the write and those in service that hold no copy of
    /// what it was made from); a member that came into service while the write was under way did not get it and
    /// is brought up to date.
    func writeRecord(_ record: ReplicaRecord, _ session: VirtualSession, on members: [Int], withoutCopy: [Int] = []) throws(P11Error) {
        let group = session.group
        let catchUp = try withRecordSessions(session) { (sessionFor) throws(P11Error) -> Bool in
            try replicas.write(record, in: group, on: members, session: sessionFor)
        }
        if catchUp { recovery.requestCatchUp(group) }
        for member in group.membersInService where !members.contains(member.index) {
            fanOut.markStale(member, reason: "missed a write made while it was returning")
        }
        // A member in service with no copy known here took the record without the write: it may hold a copy
        // this process could not find (renamed by another process meanwhile). The catch-up settles it.
        if !withoutCopy.isEmpty { recovery.requestCatchUp(group) }
    }

    /// Records newly made copies (by member index) as one virtual object; a token object's creation is recorded
    /// on the members that made it and on those in service that could not (`withoutSource`: they hold no copy of
    /// the object it was made from, which only some members have), who missed nothing. When no member takes the
    /// record, the copies are destroyed and the write fails: an object no record describes would never be
    /// carried to a member that missed it.
    func record(_ made: [(Int, MemberObject)], in session: VirtualSession, isToken: Bool, withoutSource: [Int] = []) throws(P11Error) -> ObjectHandle {
        let group = session.group
        var createdUID: ObjectUID? = nil
        if isToken, !made.isEmpty {
            do throws(P11Error) {
                // Described on the first member that can (see ReplicaKeeper.describe).
                let creation = try withRecordSessions(session) { (sessionFor) throws(P11Error) -> ReplicaRecord in
                    var failure = P11Error.deviceError
                    for (index, copy) in made {
                        guard let s = sessionFor(group.members[index]) else { continue }
                        do throws(P11Error) {
                            return try replicas.creation(group, group.members[index], s, copy)
                        } catch where error.isMemberFault {
                            failure = error
                        }
                    }
                    throw failure
                }
                try writeRecord(creation, session, on: made.map(\.0) + withoutSource)
                createdUID = creation.object
            } catch {
                for (index, copy) in made {
                    let member = group.members[index]
                    if let s = try? session.memberSession(member) { try? member.token.destroyObject(s, copy) }
                }
                throw error
            }
        }
        var copies = [MemberObject?](repeating: nil, count: group.members.count)
        for (index, copy) in made { copies[index] = copy }
        // A token object's identity is read now, while its handles are good: a module may renumber them later
        // (SoftHSM after a logout), and then only the identity finds them again.
        let identity = isToken ? made.first.flatMap { (index, copy) -> ObjectIdentity? in
            let member = group.members[index]
            guard let s = try? session.memberSession(member),
                  let values = try? member.token.readAttributes(s, copy, ObjectIdentity.attributeTypes) else { return nil }
            return ObjectIdentity(reading: values)
        } : nil
        return group.objects.withLock {
            $0.insert(ObjectTable.Record(copies: copies, identity: identity, owner: isToken ? nil : session.handle, uid: createdUID))
        }
    }

    /// A member says our handle for an object's copy is invalid (its module restarted behind our back, say):
    /// finds the copy there again by identity. Returns the new handle, or nil when none is found; the old one is
    /// then kept, not forgotten: one look proves nothing (a private key is invisible for a moment while another
    /// thread logs out and in again), and recovery finds copies again when a member truly lost them.
    func refreshCopy(of object: ObjectHandle, on member: Member, in session: VirtualSession) -> MemberObject? {
        let group = session.group
        guard let record = group.objects.withLock({ $0[object] }) else { return nil }
        let identity = group.identity(of: record, except: member) { holder, copy in
            (try? session.memberSession(holder)).flatMap { try? holder.token.readAttributes($0, copy, ObjectIdentity.attributeTypes) }
        }
        let found = identity.flatMap { identity in
            (try? session.memberSession(member)).flatMap { try? member.token.findObjects($0, identity.template).first }
        }
        group.objects.withLock {
            if let identity { $0.setIdentity(object, identity) }
            if let found { $0.setCopy(object, member: member.index, copy: found) }
        }
        return found
    }

    /// Runs a write on a member's copy; when the member says the handle names nothing (a repair replaced that
    /// copy: a second copy made while a search missed the first, then one of the two destroyed), on the copy found
    /// there again by identity, once. Before, such writes failed with CKR_OBJECT_HANDLE_INVALID and were undone
    /// on the members that had taken them.
    func onFreshCopy<T>(of object: ObjectHandle, on member: Member, in session: VirtualSession, _ copy: MemberObject,
                        _ write: (MemberObject) throws(P11Error) -> T) throws(P11Error) -> T {
        do {
            return try write(copy)
        } catch where error.rv == CKR_OBJECT_HANDLE_INVALID && error.fromMember {
            guard let again = refreshCopy(of: object, on: member, in: session), again != copy else { throw error }
            return try write(again)
        }
    }

    func isTokenObject(_ object: ObjectHandle, in session: VirtualSession) throws(P11Error) -> Bool {
        let values = try onPrimaryCopy(of: object, in: session) { (member, s, copy) throws(P11Error) in
            try member.token.readAttributes(s, copy, [CK_ATTRIBUTE_TYPE(CKA_TOKEN)])
        }
        return values[0]?.first.map { $0 != 0 } ?? false
    }
}
