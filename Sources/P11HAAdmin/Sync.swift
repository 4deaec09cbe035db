// p11hactl sync: every token object on every member, copied from a member that has it (keys wrapped under the
// replication key, everything else by value); conflicts and what cannot travel reported.
import CInterop
import P11HA

public struct SyncError: Error, CustomStringConvertible, Sendable {
    public let description: String
}

public struct SyncReport: Sendable {
    public struct Copy: Sendable {
        public let object: String
        public let from: String
        public let to: String
        public let wrapped: Bool
    }
    public struct Problem: Sendable {
        public let object: String
        public let detail: String
    }
    public var copies: [Copy] = []
    public var uncopyable: [Problem] = []
    public var conflicts: [Problem] = []
    public var objectCount = 0
    /// Changes the replication records call for that were not made (a dry run), or objects a repair could not
    /// bring or must try again.
    public var repairsPending = 0
}

extension Runtime {
    /// Compares the token objects of every member in service of `group` and copies what some lack.
    /// With `dryRun`, only reports. The user PIN logs in members without a PIN of their own.
    public func synchronize(_ group: Group, userPIN: Secret?, dryRun: Bool,
                            progress: (String) -> Void) throws(SyncError) -> SyncReport {
        let members = group.membersInService
        var sessions: [Int: MemberSession] = [:]
        defer { for (index, session) in sessions { group.members[index].token.closeSession(session) } }
        var inventories: [Int: [Inventoried]] = [:]
        var replicationKeys: [Int: MemberObject] = [:]
        for member in members {
            do {
                let session = try member.token.openSession(readWrite: true)
                sessions[member.index] = session
                do throws(P11Error) {
                    try member.token.login(session, userType: CK_USER_TYPE(CKU_USER), pin: member.ownPIN ?? userPIN)
                } catch where error.rv == CKR_USER_ALREADY_LOGGED_IN {}
                replicationKeys[member.index] = try ReplicationKey.find(on: member.token, session)
            } catch {
                throw SyncError(description: "\(member.name): \(error)")
            }
        }

        var report = SyncReport()
        // The records first: every member is brought to what the replication records say, as a returning member
        // is (copies, destroys, attribute changes, under each member's lease), so that an object destroyed through
        // p11ha is never copied back from a member that missed the destroy, nor a renamed one copied under its old
        // label. What follows copies only objects no record describes (made outside p11ha).
        for member in members {
            do throws(P11Error) { try replicas.readRecords(group, from: member, sessions[member.index]!) } catch {
                throw SyncError(description: "\(member.name): reading its replication records: \(error)")
            }
        }
        let reached = members.map { ReplicaKeeper.Reached(member: $0, session: sessions[$0.index]!) }
        for target in reached {
            let peers = reached.filter { $0.member !== target.member }
            if dryRun {
                let ledger = replicas.ledger(of: group)
                guard let view = try? replicas.enumerate(target, ledger: ledger) else { continue }
                let pairing = Pairing(view, with: ledger)
                let changes = pairing.copies.filter { !ledger.objects[$0.key]!.corrections(to: $0.value.attributes).isEmpty }.count
                if !pairing.missing.isEmpty || !pairing.surplus.isEmpty || changes > 0 {
                    progress("\(target.member.name): would be repaired from the replication records: \(pairing.missing.count) to copy, \(pairing.surplus.count) to destroy, \(changes) to change")
                }
                report.repairsPending += pairing.missing.count + pairing.surplus.count + changes
                continue
            }
            let lease: Lease?
            do throws(P11Error) {
                lease = try Lease.acquire(target.member, target.session, clock: group.replicaClock, duration: Lease.repairDuration)
            } catch {
                throw SyncError(description: "\(target.member.name): taking its lease: \(error)")
            }
            guard let lease else {
                throw SyncError(description: "\(target.member.name): another process holds its lease (it is being repaired): try again")
            }
            defer { lease.release() }
            do throws(P11Error) {
                // A process just started, which has read every member's records before writing to them: a value no
                // record gives is not a change whose records it cannot see, even where every member holds it.
                let repair = try replicas.repair(target, peers: peers, in: group, loggedIn: true, lease: lease,
                                                 mayOverruleAlike: true)
                progress("\(target.member.name): repaired from the replication records: \(repair)")
                report.repairsPending += repair.unrepairable.count + repair.retry + repair.inFlux + repair.waiting
            } catch {
                throw SyncError(description: "\(target.member.name): repair from the replication records: \(error)")
            }
        }
        // What the repairs left (what is there, for a dry run).
        for member in members {
            do {
                inventories[member.index] = try ObjectCopy.inventory(member, sessions[member.index]!, replicationKey: replicationKeys[member.index])
            } catch {
                throw SyncError(description: "\(member.name): \(error)")
            }
            progress("\(member.name): \(inventories[member.index]!.count) token objects")
        }
        var byIdentity: [ObjectIdentity: [Int: [Inventoried]]] = [:]
        var order: [ObjectIdentity] = []
        for member in members {
            for object in inventories[member.index]! {
                if byIdentity[object.identity] == nil { order.append(object.identity) }
                byIdentity[object.identity, default: [:]][member.index, default: []].append(object)
            }
        }
        report.objectCount = order.count
        let planned = order.filter { identity in members.contains { byIdentity[identity]![$0.index] == nil } }
        for identity in order {
            let holders = byIdentity[identity]!
            if let (index, _) = holders.first(where: { $0.value.count > 1 }) {
                report.conflicts.append(.init(object: "\(identity)", detail: "\(holders[index]!.count) objects with this identity on \(group.members[index].name)"))
                continue
            }
            let materials = Set(holders.values.compactMap { $0[0].material })
            if materials.count > 1 {
                let names = holders.keys.sorted().map { group.members[$0].name }.joined(separator: ", ")
                report.conflicts.append(.init(object: "\(identity)", detail: "different key material or value on \(names)"))
                continue
            }
            guard let sourceIndex = holders.keys.sorted().first else { continue }
            let source = group.members[sourceIndex]
            let original = holders[sourceIndex]![0]
            // An object the records describe (live, renamed since, or destroyed) is the repair's above.
            if members.contains(where: { holders[$0.index] == nil }),
               let fingerprint = try? replicas.fingerprint(of: source, sessions[sourceIndex]!, original.handle),
               replicas.recordsDescribe(group, fingerprint) {
                continue
            }
            let isKey = identity.isKey
            for target in members where holders[target.index] == nil {
                if isKey && !original.extractable {
                    report.uncopyable.append(.init(object: "\(identity)", detail: "not extractable on \(source.name): cannot travel to \(target.name)"))
                    continue
                }
                if isKey && (replicationKeys[sourceIndex] == nil || replicationKeys[target.index] == nil) {
                    report.uncopyable.append(.init(object: "\(identity)", detail: "no replication key on \(source.name) or \(target.name) (run p11hactl domain create)"))
                    continue
                }
                let position = (planned.firstIndex(of: identity) ?? 0) + 1
                progress("\(dryRun ? "would copy" : "copying") [\(position)/\(planned.count)] \(identity) from \(source.name) to \(target.name)")
                if !dryRun {
                    do {
                        try ObjectCopy.copy(original.handle, from: source, sessions[sourceIndex]!, to: target, sessions[target.index]!,
                                 wrapped: isKey, replicationKeys: replicationKeys)
                    } catch {
                        report.uncopyable.append(.init(object: "\(identity)", detail: "copy to \(target.name) failed: \(error)"))
                        continue
                    }
                }
                report.copies.append(.init(object: "\(identity)", from: source.name, to: target.name, wrapped: isKey))
            }
        }
        return report
    }
}
