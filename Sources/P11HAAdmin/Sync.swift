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
                inventories[member.index] = try ObjectCopy.inventory(member, session, replicationKey: replicationKeys[member.index])
            } catch {
                throw SyncError(description: "\(member.name): \(error)")
            }
            progress("\(member.name): \(inventories[member.index]!.count) token objects")
        }

        var report = SyncReport()
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
