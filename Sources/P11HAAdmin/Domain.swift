// The replication key's set-up (domain create) and proof (domain check). Its value never leaves a member in
// clear: it is generated on one member and carried to each other one wrapped under a key that the two members
// agree by ECDH, each from a key pair of its own.
import CInterop
import P11HA

public struct DomainError: Error, CustomStringConvertible, Sendable {
    public let description: String
}

public struct DomainMemberState: Sendable {
    public let member: String
    /// The replication key's fingerprint on this member: nil when it holds none (or could not be reached).
    public let fingerprint: [UInt8]?
    public let problem: String?
}

extension Runtime {
    /// Whether every member holds the same replication key: each wraps one public test key under its copy
    /// (RFC 3394 key wrap is deterministic), and the results are compared. Needs no PIN.
    public func domainCheck(_ group: Group) -> [DomainMemberState] {
        group.members.map { member in
            do {
                let session = try member.token.openSession(readWrite: false)
                defer { member.token.closeSession(session) }
                guard let key = try ReplicationKey.find(on: member.token, session) else {
                    return DomainMemberState(member: member.name, fingerprint: nil, problem: "no replication key")
                }
                return DomainMemberState(member: member.name, fingerprint: try ReplicationKey.fingerprint(on: member.token, session, key), problem: nil)
            } catch {
                return DomainMemberState(member: member.name, fingerprint: nil, problem: "\(error)")
            }
        }
    }

    /// Makes sure every member of `group` holds the replication key: generates it on the first member if no
    /// member has one, then carries it to each member that lacks it. Refuses when members hold different keys.
    public func domainCreate(_ group: Group, soPIN: Secret, progress: (String) -> Void) throws(DomainError) {
        var sessions: [Int: MemberSession] = [:]
        defer {
            for (index, session) in sessions {
                try? group.members[index].token.logout(session)
                group.members[index].token.closeSession(session)
            }
        }
        func step<T>(_ what: String, _ member: Member, _ body: () throws(P11Error) -> T) throws(DomainError) -> T {
            do { return try body() } catch { throw DomainError(description: "\(member.name): \(what): \(error)") }
        }
        var holders: [(Member, MemberObject, [UInt8])] = []
        for member in group.members {
            let session = try step("open a session", member) { () throws(P11Error) in try member.token.openSession(readWrite: true) }
            sessions[member.index] = session
            try step("SO login", member) { () throws(P11Error) in
                do throws(P11Error) {
                    try member.token.login(session, userType: CK_USER_TYPE(CKU_SO), pin: soPIN)
                } catch where error.rv == CKR_USER_ALREADY_LOGGED_IN {}
            }
            if let key = try step("look for the replication key", member, { () throws(P11Error) in try ReplicationKey.find(on: member.token, session) }) {
                let print = try step("fingerprint", member) { () throws(P11Error) in try ReplicationKey.fingerprint(on: member.token, session, key) }
                holders.append((member, key, print))
            }
        }
        if let first = holders.first, let other = holders.first(where: { $0.2 != first.2 }) {
            throw DomainError(description: "\(first.0.name) and \(other.0.name) hold different replication keys; remove the wrong one by hand")
        }
        let source: (member: Member, key: MemberObject)
        if let holder = holders.first {
            source = (holder.0, holder.1)
            progress("\(holder.0.name): holds the replication key")
        } else {
            let member = group.members[0]
            let key = try step("generate the replication key", member) { () throws(P11Error) in
                try member.token.generateKey(sessions[0]!, Mechanism(CK_MECHANISM_TYPE(CKM_AES_KEY_GEN)),
                                       replicationKeyTemplate + [Attribute(CK_ATTRIBUTE_TYPE(CKA_VALUE_LEN), ulong: 32)])
            }
            source = (member, key)
            progress("\(member.name): generated the replication key")
        }
        for target in group.members where !holders.contains(where: { $0.0 === target }) && target !== source.member {
            try step("carry the replication key from \(source.member.name)", target) { () throws(P11Error) in
                try carryReplicationKey(from: source.member, sessions[source.member.index]!, key: source.key,
                                        to: target, sessions[target.index]!)
            }
            progress("\(target.name): received the replication key (wrapped under a transport key the two members agreed)")
        }
    }

    /// Carries the replication key from `source` to `target`, agreeing a transport key by ECDH; where a member
    /// cannot take ECDH parameters (p11-kit 0.24's remote protocol does not carry them), by RSA key transport.
    func carryReplicationKey(from source: Member, _ sourceSession: MemberSession, key: MemberObject,
                             to target: Member, _ targetSession: MemberSession) throws(P11Error) {
        do {
            try carryByECDH(from: source, sourceSession, key: key, to: target, targetSession)
        } catch where [CKR_MECHANISM_INVALID, CKR_MECHANISM_PARAM_INVALID].contains(error.rv) {
            try carryByRSA(from: source, sourceSession, key: key, to: target, targetSession)
        }
    }

    /// ECDH between a fresh key pair on each member gives both the same AES key; the source wraps the
    /// replication key under its copy (which it marks trusted, as the replication key demands), the target
    /// unwraps under its own. Only public points and the wrapped key pass through p11ha.
    private func carryByECDH(from source: Member, _ sourceSession: MemberSession, key: MemberObject,
                             to target: Member, _ targetSession: MemberSession) throws(P11Error) {
        let (sourcePrivate, sourcePoint) = try ephemeralECPair(source, sourceSession)
        let (targetPrivate, targetPoint) = try ephemeralECPair(target, targetSession)
        let agreed: [Attribute] = [
            Attribute(CK_ATTRIBUTE_TYPE(CKA_CLASS), ulong: CK_ULONG(CKO_SECRET_KEY)),
            Attribute(CK_ATTRIBUTE_TYPE(CKA_KEY_TYPE), ulong: CK_ULONG(CKK_AES)),
            Attribute(CK_ATTRIBUTE_TYPE(CKA_VALUE_LEN), ulong: 32),
            Attribute(CK_ATTRIBUTE_TYPE(CKA_TOKEN), bool: false), Attribute(CK_ATTRIBUTE_TYPE(CKA_PRIVATE), bool: false),
            Attribute(CK_ATTRIBUTE_TYPE(CKA_SENSITIVE), bool: true), Attribute(CK_ATTRIBUTE_TYPE(CKA_EXTRACTABLE), bool: false),
        ]
        let ecdh = { (point: [UInt8]) in Mechanism(CK_MECHANISM_TYPE(CKM_ECDH1_DERIVE), .ecdh(kdf: CK_ULONG(CKD_NULL), sharedData: [], publicData: point)) }
        let wrapping = try source.token.deriveKey(sourceSession, ecdh(targetPoint), baseKey: sourcePrivate,
                                            agreed + [Attribute(CK_ATTRIBUTE_TYPE(CKA_WRAP), bool: true), Attribute(CK_ATTRIBUTE_TYPE(CKA_TRUSTED), bool: true)])
        let unwrapping = try target.token.deriveKey(targetSession, ecdh(sourcePoint), baseKey: targetPrivate,
                                              agreed + [Attribute(CK_ATTRIBUTE_TYPE(CKA_UNWRAP), bool: true)])
        let blob = try ReplicationKey.wrap(on: source.token, sourceSession, replicationKey: wrapping, key: key)
        _ = try target.token.unwrapKey(targetSession, ReplicationKey.wrapMechanism, unwrappingKey: unwrapping, wrapped: blob,
                                 replicationKeyTemplate)
        for (member, session, object) in [(source, sourceSession, wrapping), (target, targetSession, unwrapping)] {
            try? member.token.destroyObject(session, object)
        }
    }

    /// The target makes an RSA key pair; its public key is created on the source, trusted, and wraps the
    /// replication key (CKM_RSA_PKCS, which needs no mechanism parameter); the target unwraps with its private
    /// key. Only the public key and the wrapped key pass through p11ha.
    private func carryByRSA(from source: Member, _ sourceSession: MemberSession, key: MemberObject,
                            to target: Member, _ targetSession: MemberSession) throws(P11Error) {
        let ephemeral = [Attribute(CKA_TOKEN, bool: false), Attribute(CKA_PRIVATE, bool: false)]
        let (pub, priv) = try target.token.generateKeyPair(targetSession, Mechanism(CKM_RSA_PKCS_KEY_PAIR_GEN),
                                                     publicTemplate: ephemeral + [Attribute(CKA_MODULUS_BITS, ulong: 2048),
                                                                                  Attribute(CKA_PUBLIC_EXPONENT, [1, 0, 1])],
                                                     privateTemplate: ephemeral + [Attribute(CKA_UNWRAP, bool: true)])
        defer {
            try? target.token.destroyObject(targetSession, pub)
            try? target.token.destroyObject(targetSession, priv)
        }
        let values = try target.token.readAttributes(targetSession, pub, [CKA_MODULUS, CKA_PUBLIC_EXPONENT])
        guard let modulus = values[0], let exponent = values[1] else { throw P11Error.generalError }
        let transport = try source.token.createObject(sourceSession, ephemeral + [
            Attribute(CKA_CLASS, ulong: CKO_PUBLIC_KEY), Attribute(CKA_KEY_TYPE, ulong: CKK_RSA),
            Attribute(CKA_MODULUS, modulus), Attribute(CKA_PUBLIC_EXPONENT, exponent),
            Attribute(CKA_WRAP, bool: true), Attribute(CKA_TRUSTED, bool: true),
        ])
        defer { try? source.token.destroyObject(sourceSession, transport) }
        let rsa = Mechanism(CKM_RSA_PKCS)
        guard case .length(let n) = try source.token.wrapKey(sourceSession, rsa, wrappingKey: transport, key: key, capacity: nil),
              let blob = try source.token.wrapKey(sourceSession, rsa, wrappingKey: transport, key: key, capacity: n).bytes else {
            throw P11Error.generalError
        }
        _ = try target.token.unwrapKey(targetSession, rsa, unwrappingKey: priv, wrapped: blob, replicationKeyTemplate)
    }

    private func ephemeralECPair(_ member: Member, _ session: MemberSession) throws(P11Error) -> (MemberObject, [UInt8]) {
        let p256: [UInt8] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07]
        let ephemeral = [Attribute(CK_ATTRIBUTE_TYPE(CKA_TOKEN), bool: false), Attribute(CK_ATTRIBUTE_TYPE(CKA_PRIVATE), bool: false)]
        let (pub, priv) = try member.token.generateKeyPair(session, Mechanism(CK_MECHANISM_TYPE(CKM_EC_KEY_PAIR_GEN)),
                                                     publicTemplate: ephemeral + [Attribute(CK_ATTRIBUTE_TYPE(CKA_EC_PARAMS), p256)],
                                                     privateTemplate: ephemeral + [Attribute(CK_ATTRIBUTE_TYPE(CKA_DERIVE), bool: true)])
        guard let point = try member.token.readAttributes(session, pub, [CK_ATTRIBUTE_TYPE(CKA_EC_POINT)])[0] else { throw P11Error.generalError }
        try? member.token.destroyObject(session, pub)
        return (priv, rawECPoint(point))
    }
}

/// The replication key's attributes on every member (public: only the SO can create a trusted key, and the
/// SO cannot create private objects).
let replicationKeyTemplate: [Attribute] = [
    Attribute(CK_ATTRIBUTE_TYPE(CKA_CLASS), ulong: CK_ULONG(CKO_SECRET_KEY)),
    Attribute(CK_ATTRIBUTE_TYPE(CKA_KEY_TYPE), ulong: CK_ULONG(CKK_AES)),
    Attribute(CK_ATTRIBUTE_TYPE(CKA_TOKEN), bool: true), Attribute(CK_ATTRIBUTE_TYPE(CKA_PRIVATE), bool: false),
    Attribute(CK_ATTRIBUTE_TYPE(CKA_LABEL), Array(ReplicationKey.label.utf8)), Attribute(CK_ATTRIBUTE_TYPE(CKA_ID), ReplicationKey.id),
    Attribute(CK_ATTRIBUTE_TYPE(CKA_SENSITIVE), bool: true), Attribute(CK_ATTRIBUTE_TYPE(CKA_EXTRACTABLE), bool: true),
    Attribute(CK_ATTRIBUTE_TYPE(CKA_WRAP_WITH_TRUSTED), bool: true), Attribute(CK_ATTRIBUTE_TYPE(CKA_TRUSTED), bool: true),
    Attribute(CK_ATTRIBUTE_TYPE(CKA_WRAP), bool: true), Attribute(CK_ATTRIBUTE_TYPE(CKA_UNWRAP), bool: true),
    Attribute(CK_ATTRIBUTE_TYPE(CKA_ENCRYPT), bool: false), Attribute(CK_ATTRIBUTE_TYPE(CKA_DECRYPT), bool: false),
    Attribute(CK_ATTRIBUTE_TYPE(CKA_SIGN), bool: false), Attribute(CK_ATTRIBUTE_TYPE(CKA_VERIFY), bool: false),
    Attribute(CK_ATTRIBUTE_TYPE(CKA_DERIVE), bool: false), Attribute(CK_ATTRIBUTE_TYPE(CKA_MODIFIABLE), bool: false),
]

/// CKA_EC_POINT is a DER OCTET STRING around the point; ECDH takes the point itself.
package func rawECPoint(_ der: [UInt8]) -> [UInt8] {
    guard der.count > 2, der[0] == 0x04 else { return der }
    if der[1] < 0x80, Int(der[1]) == der.count - 2 { return Array(der.dropFirst(2)) }
    if der[1] == 0x81, der.count > 3, Int(der[2]) == der.count - 3 { return Array(der.dropFirst(3)) }
    return der
}

extension ReplicationKey {
    /// The replication key wraps a public test key (RFC 3394, deterministic): equal results, equal keys.
    static func fingerprint(on token: any TokenBackend, _ session: MemberSession, _ key: MemberObject) throws(P11Error) -> [UInt8] {
        let probe = try token.createObject(session, [
            Attribute(CK_ATTRIBUTE_TYPE(CKA_CLASS), ulong: CK_ULONG(CKO_SECRET_KEY)),
            Attribute(CK_ATTRIBUTE_TYPE(CKA_KEY_TYPE), ulong: CK_ULONG(CKK_AES)),
            Attribute(CK_ATTRIBUTE_TYPE(CKA_TOKEN), bool: false), Attribute(CK_ATTRIBUTE_TYPE(CKA_PRIVATE), bool: false),
            Attribute(CK_ATTRIBUTE_TYPE(CKA_EXTRACTABLE), bool: true), Attribute(CK_ATTRIBUTE_TYPE(CKA_SENSITIVE), bool: false),
            Attribute(CK_ATTRIBUTE_TYPE(CKA_VALUE), Array("p11ha domain check: public probe".utf8)),
        ])
        defer { try? token.destroyObject(session, probe) }
        let wrap = Mechanism(CK_MECHANISM_TYPE(CKM_AES_KEY_WRAP))
        guard let blob = try token.wrapKey(session, wrap, wrappingKey: key, key: probe, capacity: 64).bytes else { throw P11Error.generalError }
        return blob
    }
}
