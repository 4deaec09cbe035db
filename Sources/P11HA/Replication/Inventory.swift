// Copying objects between members: an inventory of a member's token objects, and a copy of one object (keys
// wrapped under the replication key, everything else by value). Used by recovery and by p11hactl sync.
import CInterop

/// One token object on one member, as sync sees it.
package struct Inventoried {
    package let handle: MemberObject
    package let identity: ObjectIdentity
    /// What proves two copies are the same object (public values, wrapped form, certificate or data value).
    package let material: [UInt8]?
    package let extractable: Bool
}

package enum ObjectCopy {
    package static func inventory(_ member: Member, _ session: MemberSession,
                           replicationKey: MemberObject?) throws(P11Error) -> [Inventoried] {
        var result: [Inventoried] = []
        for handle in try member.token.findObjects(session, [Attribute(CKA_TOKEN, bool: true)]) where handle != replicationKey {
            // An object another process destroys between the search and the read is not counted.
            guard let names = try? member.token.readAttributes(session, handle, ObjectIdentity.nameTypes) else { continue }
            let identity = ObjectIdentity(naming: names)
            if identity.isInfrastructure { continue }
            let facts = try member.token.readAttributes(session, handle, [CKA_EXTRACTABLE, CKA_MODULUS, CKA_EC_POINT, CKA_VALUE])
            let extractable = facts[0] == [1]
            var material = facts[1] ?? facts[2]
            if identity.classValue == CKO_CERTIFICATE || identity.classValue == CKO_DATA {
                material = facts[3]
            } else if identity.isKey, material == nil, extractable, let replicationKey {
                // The wrapped form under the shared replication key (RFC 5649 is deterministic): equal keys wrap alike.
                material = try? ReplicationKey.wrap(on: member.token, session, replicationKey: replicationKey, key: handle)
            }
            result.append(Inventoried(handle: handle, identity: identity, material: material, extractable: extractable))
        }
        return result
    }

    package static func copy(_ object: MemberObject, from source: Member, _ sourceSession: MemberSession,
                      to target: Member, _ targetSession: MemberSession, wrapped: Bool,
                      replicationKeys: [Int: MemberObject]) throws(P11Error) {
        if wrapped {
            let blob = try ReplicationKey.wrap(on: source.token, sourceSession, replicationKey: replicationKeys[source.index]!, key: object)
            _ = try target.token.unwrapKey(targetSession, ReplicationKey.wrapMechanism, unwrappingKey: replicationKeys[target.index]!,
                                     wrapped: blob, try ReplicaAttributes.template(on: source.token, sourceSession, object))
        } else {
            _ = try target.token.createObject(targetSession, try ReplicaAttributes.byValueTemplate(on: source.token, sourceSession, object))
        }
    }
}

extension ReplicaAttributes {
    /// Everything readable that makes a public object (certificate, data object, public key) what it is.
    static func byValueTemplate(on token: any TokenBackend, _ session: MemberSession, _ object: MemberObject) throws(P11Error) -> [Attribute] {
        let head = try token.readAttributes(session, object, [CKA_CLASS])
        guard let classBytes = head[0], let objectClass = Attribute(CKA_CLASS, classBytes).ulongValue else { throw P11Error.generalError }
        let types: [CK_ATTRIBUTE_TYPE] = switch objectClass {
        case CKO_DATA: [CKA_TOKEN, CKA_PRIVATE, CKA_LABEL, CKA_MODIFIABLE, CKA_APPLICATION, CKA_OBJECT_ID, CKA_VALUE]
        case CKO_CERTIFICATE: [CKA_TOKEN, CKA_PRIVATE, CKA_LABEL, CKA_MODIFIABLE, CKA_CERTIFICATE_TYPE, CKA_CERTIFICATE_CATEGORY,
                               CKA_ID, CKA_SUBJECT, CKA_ISSUER, CKA_SERIAL_NUMBER, CKA_VALUE, CKA_START_DATE, CKA_END_DATE]
        // DSA and DH domain parameters (CKA_PRIME_BITS is the token's to set).
        case CKO_DOMAIN_PARAMETERS: [CKA_TOKEN, CKA_PRIVATE, CKA_LABEL, CKA_MODIFIABLE, CKA_KEY_TYPE, CKA_PRIME, CKA_SUBPRIME, CKA_BASE]
        default: []
        }
        if types.isEmpty { return try template(on: token, session, object) }
        var template = [Attribute(CKA_CLASS, classBytes)]
        for (type, value) in zip(types, try token.readAttributes(session, object, types)) {
            if let value { template.append(Attribute(type, value)) }
        }
        return template
    }
}
