// Bringing members into agreement: every token object on every member, copied from a member that has it
// (keys wrapped under the replication key, everything else by value); conflicts and what cannot travel reported.
import CInterop

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

/// One token object on one member, as sync sees it.
struct Inventoried {
    let handle: CK_OBJECT_HANDLE
    let identity: SyncIdentity
    /// What proves two copies are the same object (public values, wrapped form, certificate or data value).
    let material: [UInt8]?
    let extractable: Bool
}

/// The attributes an application finds an object by: two objects with equal identities on two members are
/// meant to be one object of the group.
struct SyncIdentity: Hashable, CustomStringConvertible {
    static let types: [CK_ATTRIBUTE_TYPE] = [CKA_CLASS, CKA_KEY_TYPE, CKA_CERTIFICATE_TYPE, CKA_ID, CKA_LABEL]
    let values: [[UInt8]?]

    /// p11ha's own journal object: each member keeps its own, never copied.
    var isJournal: Bool { objectClass == CKO_DATA && values[4] == Array(Journal.label.utf8) }

    var objectClass: CK_OBJECT_CLASS { values[0].flatMap { Attribute(0, $0).ulongValue } ?? CK_OBJECT_CLASS.max }

    var description: String {
        let names: [CK_OBJECT_CLASS: String] = [CKO_DATA: "data", CKO_CERTIFICATE: "certificate", CKO_PUBLIC_KEY: "public key",
                                                CKO_PRIVATE_KEY: "private key", CKO_SECRET_KEY: "secret key"]
        let label = values[4].map { String(decoding: $0, as: UTF8.self) } ?? ""
        let id = values[3].map { $0.map { String($0, radix: 16).count == 1 ? "0" + String($0, radix: 16) : String($0, radix: 16) }.joined() } ?? ""
        return "\(names[objectClass] ?? "object") label=\"\(label)\" id=\(id)"
    }
}

extension Runtime {
    /// Compares the token objects of every member in service of `group` and copies what some lack.
    /// With `dryRun`, only reports. The user PIN logs in members without a PIN of their own.
    public func synchronize(_ group: Group, userPIN: Secret?, dryRun: Bool,
                            progress: (String) -> Void) throws(SyncError) -> SyncReport {
        let members = group.membersInService
        var sessions: [Int: CK_SESSION_HANDLE] = [:]
        defer { for (index, session) in sessions { group.members[index].closeSession(session) } }
        var inventories: [Int: [Inventoried]] = [:]
        var replicationKeys: [Int: CK_OBJECT_HANDLE] = [:]
        for member in members {
            do {
                let session = try member.openSession(readWrite: true)
                sessions[member.index] = session
                do throws(P11Error) {
                    try member.login(session, userType: CK_USER_TYPE(CKU_USER), pin: member.ownPIN ?? userPIN)
                } catch where error.rv == CKR_USER_ALREADY_LOGGED_IN {}
                replicationKeys[member.index] = try member.replicationKey(session)
                inventories[member.index] = try inventory(member, session, replicationKey: replicationKeys[member.index])
            } catch {
                throw SyncError(description: "\(member.name): \(error)")
            }
            progress("\(member.name): \(inventories[member.index]!.count) token objects")
        }

        var report = SyncReport()
        var byIdentity: [SyncIdentity: [Int: [Inventoried]]] = [:]
        var order: [SyncIdentity] = []
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
            let isKey = identity.objectClass == CKO_SECRET_KEY || identity.objectClass == CKO_PRIVATE_KEY
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
                        try copy(original.handle, from: source, sessions[sourceIndex]!, to: target, sessions[target.index]!,
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

    func inventory(_ member: Member, _ session: CK_SESSION_HANDLE,
                           replicationKey: CK_OBJECT_HANDLE?) throws(P11Error) -> [Inventoried] {
        var result: [Inventoried] = []
        for handle in try member.findObjects(session, [Attribute(CKA_TOKEN, bool: true)]) where handle != replicationKey {
            let identity = SyncIdentity(values: try member.readAttributes(session, handle, SyncIdentity.types))
            if identity.isJournal { continue }
            let facts = try member.readAttributes(session, handle, [CKA_EXTRACTABLE, CKA_MODULUS, CKA_EC_POINT, CKA_VALUE])
            let extractable = facts[0] == [1]
            var material = facts[1] ?? facts[2]
            let isKey = identity.objectClass == CKO_SECRET_KEY || identity.objectClass == CKO_PRIVATE_KEY
            if identity.objectClass == CKO_CERTIFICATE || identity.objectClass == CKO_DATA {
                material = facts[3]
            } else if isKey, material == nil, extractable, let replicationKey {
                // The wrapped form under the shared replication key (RFC 5649 is deterministic): equal keys wrap alike.
                material = try? member.wrapForReplication(session, replicationKey: replicationKey, key: handle)
            }
            result.append(Inventoried(handle: handle, identity: identity, material: material, extractable: extractable))
        }
        return result
    }

    func copy(_ object: CK_OBJECT_HANDLE, from source: Member, _ sourceSession: CK_SESSION_HANDLE,
                      to target: Member, _ targetSession: CK_SESSION_HANDLE, wrapped: Bool,
                      replicationKeys: [Int: CK_OBJECT_HANDLE]) throws(P11Error) {
        if wrapped {
            let blob = try source.wrapForReplication(sourceSession, replicationKey: replicationKeys[source.index]!, key: object)
            _ = try target.unwrapKey(targetSession, ReplicationKey.wrapMechanism, unwrappingKey: replicationKeys[target.index]!,
                                     wrapped: blob, try source.replicaTemplate(sourceSession, object))
        } else {
            _ = try target.createObject(targetSession, try source.byValueTemplate(sourceSession, object))
        }
    }
}

extension Member {
    /// Everything readable that makes a public object (certificate, data object, public key) what it is.
    func byValueTemplate(_ session: CK_SESSION_HANDLE, _ object: CK_OBJECT_HANDLE) throws(P11Error) -> [Attribute] {
        let head = try readAttributes(session, object, [CKA_CLASS])
        guard let classBytes = head[0], let objectClass = Attribute(CKA_CLASS, classBytes).ulongValue else { throw P11Error.generalError }
        let types: [CK_ATTRIBUTE_TYPE] = switch objectClass {
        case CKO_DATA: [CKA_TOKEN, CKA_PRIVATE, CKA_LABEL, CKA_MODIFIABLE, CKA_APPLICATION, CKA_OBJECT_ID, CKA_VALUE]
        case CKO_CERTIFICATE: [CKA_TOKEN, CKA_PRIVATE, CKA_LABEL, CKA_MODIFIABLE, CKA_CERTIFICATE_TYPE, CKA_CERTIFICATE_CATEGORY,
                               CKA_ID, CKA_SUBJECT, CKA_ISSUER, CKA_SERIAL_NUMBER, CKA_VALUE, CKA_START_DATE, CKA_END_DATE]
        default: []
        }
        if types.isEmpty { return try replicaTemplate(session, object) }
        var template = [Attribute(CKA_CLASS, classBytes)]
        for (type, value) in zip(types, try readAttributes(session, object, types)) {
            if let value { template.append(Attribute(type, value)) }
        }
        return template
    }
}
