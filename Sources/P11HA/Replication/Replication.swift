// Replication of generated keys: made on one member, carried to the others wrapped under the group's
// replication key, never in clear; public halves re-created from their public values.
import CInterop

/// The group's replication key: an AES-256 key with CKA_TRUSTED on every member, under one identity.
public enum ReplicationKey {
    public static let id = Array("p11ha-replication-key".utf8)
    public static let label = "p11ha replication key"
    /// RFC 5649 key wrap: deterministic, and takes private keys as well as secret keys.
    public static let wrapMechanism = Mechanism(CK_MECHANISM_TYPE(CKM_AES_KEY_WRAP_PAD))

    /// What a member answers when it cannot wrap a key this way: the key's own doing (not extractable, a type the
    /// member cannot wrap: SoftHSM 2.6.1's EdDSA keys) or the member's (p11-kit 0.24's client refuses AES key wrap),
    /// alike on every try.
    static let wrapRefusals: Set<CK_RV> = [CK_RV(CKR_KEY_UNEXTRACTABLE), CK_RV(CKR_KEY_NOT_WRAPPABLE), CK_RV(CKR_MECHANISM_INVALID),
                                           CK_RV(CKR_MECHANISM_PARAM_INVALID), CK_RV(CKR_FUNCTION_NOT_SUPPORTED)]

    public static var searchTemplate: [Attribute] {
        [Attribute(CK_ATTRIBUTE_TYPE(CKA_CLASS), ulong: CK_ULONG(CKO_SECRET_KEY)),
         Attribute(CK_ATTRIBUTE_TYPE(CKA_KEY_TYPE), ulong: CK_ULONG(CKK_AES)),
         Attribute(CK_ATTRIBUTE_TYPE(CKA_ID), id)]
    }
}

/// What to do when an application generates a key in a group of several members.
public enum GeneratedKeys: String, Sendable {
    /// Generate it wrappable under trusted keys only (CKA_EXTRACTABLE and CKA_WRAP_WITH_TRUSTED set) and carry it;
    /// a key of a type the members cannot wrap fails the generation (CKR_FUNCTION_FAILED).
    case replicate
    /// As `replicate`, but a token key of a type the members cannot wrap is kept on the member that made it, with
    /// the attributes of any generated key; `p11hactl status` names it as CANNOT BE REPAIRED on the others.
    case replicateOrKeep = "replicate-or-keep"
    /// Refuse the generation (CKR_FUNCTION_FAILED): keys must be imported (created or unwrapped), which replays on
    /// every member.
    case refuse
}

/// The attributes that make a copy the same key as its original, by object class; read from the original.
enum ReplicaAttributes {
    static let common: [CK_ATTRIBUTE_TYPE] = [CKA_LABEL, CKA_ID, CKA_TOKEN, CKA_PRIVATE, CKA_MODIFIABLE, CKA_START_DATE, CKA_END_DATE, CKA_DERIVE]
    static let secret: [CK_ATTRIBUTE_TYPE] = common + [CKA_SENSITIVE, CKA_EXTRACTABLE, CKA_WRAP_WITH_TRUSTED, CKA_ENCRYPT, CKA_DECRYPT,
                                           CKA_SIGN, CKA_VERIFY, CKA_WRAP, CKA_UNWRAP]
    static let `private`: [CK_ATTRIBUTE_TYPE] = common + [CKA_SUBJECT, CKA_SENSITIVE, CKA_EXTRACTABLE, CKA_WRAP_WITH_TRUSTED, CKA_DECRYPT,
                                              CKA_SIGN, CKA_SIGN_RECOVER, CKA_UNWRAP, CKA_ALWAYS_AUTHENTICATE]
    /// CKA_PRIME, CKA_SUBPRIME, CKA_BASE and CKA_VALUE: a DSA or DH public key's domain and public value.
    static let `public`: [CK_ATTRIBUTE_TYPE] = common + [CKA_SUBJECT, CKA_ENCRYPT, CKA_VERIFY, CKA_VERIFY_RECOVER, CKA_WRAP,
                                             CKA_MODULUS, CKA_PUBLIC_EXPONENT, CKA_EC_PARAMS, CKA_EC_POINT,
                                             CKA_PRIME, CKA_SUBPRIME, CKA_BASE, CKA_VALUE]

    static func types(forClass objectClass: CK_OBJECT_CLASS) -> [CK_ATTRIBUTE_TYPE] {
        switch objectClass {
        case CK_OBJECT_CLASS(CKO_SECRET_KEY): secret
        case CK_OBJECT_CLASS(CKO_PRIVATE_KEY): `private`
        default: `public`
        }
    }
}

extension ReplicationKey {
    /// The replication key's handle on a member, if it holds one.
    package static func find(on token: any TokenBackend, _ session: MemberSession) throws(P11Error) -> MemberObject? {
        try token.findObjects(session, searchTemplate).first
    }

    /// Wraps `key` under the replication key: the only form in which key material leaves a member.
    package static func wrap(on token: any TokenBackend, _ session: MemberSession, replicationKey: MemberObject,
                     key: MemberObject) throws(P11Error) -> [UInt8] {
        guard case .length(let n) = try token.wrapKey(session, wrapMechanism, wrappingKey: replicationKey, key: key, capacity: nil),
              let blob = try token.wrapKey(session, wrapMechanism, wrappingKey: replicationKey, key: key, capacity: n).bytes
        else {
            Log.event(.error, "replication-failed", "reason=\"the member's C_WrapKey gave no wrapped key after its length\"")
            throw P11Error.generalError
        }
        return blob
    }
}

extension ReplicaAttributes {
    /// The template that re-creates `object` elsewhere: its class, key type and the attributes of its class
    /// that it has (values of public keys included; nothing sensitive can be read).
    static func template(on token: any TokenBackend, _ session: MemberSession, _ object: MemberObject) throws(P11Error) -> [Attribute] {
        let head = try token.readAttributes(session, object, [CK_ATTRIBUTE_TYPE(CKA_CLASS), CK_ATTRIBUTE_TYPE(CKA_KEY_TYPE)])
        guard let classBytes = head[0] else {
            Log.event(.error, "replication-failed", "reason=\"the member gave no CKA_CLASS for the object to carry\"")
            throw P11Error.generalError
        }
        let objectClass = Attribute(CK_ATTRIBUTE_TYPE(CKA_CLASS), classBytes)
        var template = [objectClass]
        if let keyType = head[1] { template.append(Attribute(CK_ATTRIBUTE_TYPE(CKA_KEY_TYPE), keyType)) }
        let types = types(forClass: objectClass.ulongValue ?? 0)
        for (type, value) in zip(types, try token.readAttributes(session, object, types)) {
            if let value, !value.isEmpty { template.append(Attribute(type, value)) }
        }
        return template
    }
}

/// Carries generated keys from the member that made them to the others in service.
final class Replicator: Sendable {
    private let fanOut: FanOut
    private let generatedKeys: GeneratedKeys

    init(fanOut: FanOut, generatedKeys: GeneratedKeys) {
        self.fanOut = fanOut
        self.generatedKeys = generatedKeys
    }

    private func missingReplicationKey(_ group: Group, _ member: Member) -> P11Error {
        Log.event(.error, "replication-key-missing",
                  "group=\(group.name) member=\(member.name) hint=\"run: p11hactl domain create --group \(group.name)\"")
        return P11Error(CK_RV(CKR_FUNCTION_FAILED))
    }

    /// Makes a generated key (or private key) exist on every member in service: generated on `source`,
    /// wrapped there under the replication key, unwrapped on each other member with the original's attributes.
    /// `tokenCopies`: the key on `source` is a session object standing in for a token key; the source gets its
    /// token copy by the same unwrap, first, and the copies are all there is (none: the write failed).
    /// A key of a type the source cannot wrap is not carried: a session key (it dies with its session, as one made
    /// in a group without a replication key), or a token key under `replicate-or-keep`, throws `cannotTravel` (the
    /// caller keeps such a key on its maker); a token key under `replicate` fails with CKR_FUNCTION_FAILED.
    func carry(_ session: VirtualSession, source: Member, key: MemberObject, plan: ReplicationPlan,
               tokenCopies: Bool = false) throws(P11Error) -> [(Int, MemberObject)] {
        let sourceSession = try session.memberSession(source)
        var blob: [UInt8]
        do throws(P11Error) {
            blob = try ReplicationKey.wrap(on: source.token, sourceSession, replicationKey: plan.keys[source.index]!, key: key)
        } catch where error.fromMember && ReplicationKey.wrapRefusals.contains(error.rv) {
            let keyType = (try? source.token.readAttributes(sourceSession, key, [CKA_KEY_TYPE])[0]).flatMap { $0 }
            let named = "group=\(session.group.name) member=\(source.name) key-type=\(keyTypeName(keyType.flatMap { Attribute(CKA_KEY_TYPE, $0).ulongValue })) rv=\(ckrName(error.rv))"
            if generatedKeys == .replicateOrKeep || !tokenCopies {
                Log.event(.warning, "generated-key-kept", named + " token=\(tokenCopies) reason=\"the member cannot wrap it under the replication key: kept on this member only\"")
                throw Self.cannotTravel
            }
            Log.event(.error, "generated-key-not-carried", named + " hint=\"the members cannot carry this key type; generated-keys = replicate-or-keep keeps such keys on one member\"")
            throw P11Error(CK_RV(CKR_FUNCTION_FAILED))
        }
        defer { for i in blob.indices { blob[i] = 0 } }
        var template = try ReplicaAttributes.template(on: source.token, sourceSession, key)
        if tokenCopies { template = template.setting(CK_ATTRIBUTE_TYPE(CKA_TOKEN), true) }
        let targets = (tokenCopies ? [source] : []) + plan.others
        return try fanOut.everyMember(of: session.group, targets, othersHoldIt: !tokenCopies, refusals: .askedAgain, session: session) { (member) throws(P11Error) in
            try member.token.unwrapKey(try session.memberSession(member), ReplicationKey.wrapMechanism,
                                 unwrappingKey: plan.keys[member.index]!, wrapped: blob, template)
        } undo: { member, copy in
            if let s = try? session.memberSession(member) { try? member.token.destroyObject(s, copy) }
        }
    }

    /// A generated key its member cannot wrap, to keep there (see `carry`): p11ha's own error (no member answers it).
    static let cannotTravel = P11Error(CK_RV(CKR_KEY_NOT_WRAPPABLE))

    struct ReplicationPlan {
        let others: [Member]
        let keys: [Int: MemberObject]
    }

    /// The members a key generated on `source` must reach, with their replication keys; nil when it stays on
    /// `source` (a group of one, or a session key without a replication key). A member fault of `source`
    /// propagates; one of another member takes that member out (stale: it misses this write).
    func plan(_ session: VirtualSession, source: Member, isToken: Bool) throws(P11Error) -> ReplicationPlan? {
        let group = session.group
        let others = group.membersInService.filter { $0 !== source }
        if others.isEmpty { return nil }
        if generatedKeys == .refuse {
            Log.event(.warning, "generation-refused",
                      "group=\(group.name) reason=\"generated-keys = refuse; import the key instead (C_CreateObject or C_UnwrapKey)\"")
            throw P11Error(CK_RV(CKR_FUNCTION_FAILED))
        }
        var keys: [Int: MemberObject] = [:]
        guard let sourceKey = try ReplicationKey.find(on: source.token, try session.memberSession(source)) else {
            if !isToken { return nil }  // a session key dies with its session: it may stay on one member
            throw missingReplicationKey(group, source)
        }
        keys[source.index] = sourceKey
        var reachable: [Member] = []
        for member in others {
            do throws(P11Error) {
                guard let key = try ReplicationKey.find(on: member.token, try session.memberSession(member)) else {
                    if !isToken { return nil }
                    throw missingReplicationKey(group, member)
                }
                keys[member.index] = key
                reachable.append(member)
            } catch where error.isMemberFault {
                fanOut.markStale(member, reason: "missed a write: \(error)")
            }
        }
        return ReplicationPlan(others: reachable, keys: keys)
    }
}

/// The application's template with what lets p11ha carry the key. A key the application asked to be
/// extractable is left as asked; any other is made extractable only under trusted keys (CKA_EXTRACTABLE and
/// CKA_WRAP_WITH_TRUSTED set), so that only the replication key can wrap it.
func wrappableTemplate(_ template: [Attribute]) -> [Attribute] {
    let extractable = template[CK_ATTRIBUTE_TYPE(CKA_EXTRACTABLE)]?.boolValue
    if extractable == true { return template }
    if extractable == false {
        Log.event(.info, "generated-key-extractable",
                  "reason=\"CKA_EXTRACTABLE=false asked; set true with CKA_WRAP_WITH_TRUSTED so the key can reach every member (generated-keys = refuse to refuse instead)\"")
    }
    return template.setting(CK_ATTRIBUTE_TYPE(CKA_EXTRACTABLE), true).setting(CK_ATTRIBUTE_TYPE(CKA_WRAP_WITH_TRUSTED), true)
}

/// A key type's PKCS#11 name for the log (CKK_...), or its number.
func keyTypeName(_ keyType: CK_ULONG?) -> String {
    guard let keyType else { return "unknown" }
    let names: [CK_ULONG: String] = [
        CK_ULONG(CKK_RSA): "CKK_RSA", CK_ULONG(CKK_DSA): "CKK_DSA", CK_ULONG(CKK_DH): "CKK_DH", CK_ULONG(CKK_EC): "CKK_EC",
        CK_ULONG(CKK_GENERIC_SECRET): "CKK_GENERIC_SECRET", CK_ULONG(CKK_AES): "CKK_AES", CK_ULONG(CKK_DES3): "CKK_DES3",
        0x40: "CKK_EC_EDWARDS", 0x41: "CKK_EC_MONTGOMERY", 0x30: "CKK_GOSTR3410",
    ]
    return names[keyType] ?? "0x\(String(keyType, radix: 16))"
}
