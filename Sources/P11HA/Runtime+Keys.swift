// Key management: generation on one member; unwrap, derive and copy replayed on every member holding the inputs.
import CInterop

extension Runtime {
    /// Generates a key on the group's first member in service. Until replication carries keys to the
    /// other members, generated keys live there only, together (so that wrapping and derivation, which
    /// need two keys on one member, work), and operations with them are routed there.
    public func generateKey(_ handle: CK_SESSION_HANDLE, _ mechanism: Mechanism, _ template: [Attribute]) throws(P11Error) -> CK_OBJECT_HANDLE {
        let session = try session(handle)
        let member = try session.group.generationMember()
        let key = try member.generateKey(try session.memberSession(member), mechanism, template)
        return record([(member.index, key)], in: session, isToken: template[CK_ATTRIBUTE_TYPE(CKA_TOKEN)]?.boolValue ?? false)
    }

    public func generateKeyPair(_ handle: CK_SESSION_HANDLE, _ mechanism: Mechanism, publicTemplate: [Attribute],
                                privateTemplate: [Attribute]) throws(P11Error) -> (CK_OBJECT_HANDLE, CK_OBJECT_HANDLE) {
        let session = try session(handle)
        let member = try session.group.generationMember()
        let (pub, priv) = try member.generateKeyPair(try session.memberSession(member), mechanism,
                                                     publicTemplate: publicTemplate, privateTemplate: privateTemplate)
        let tokenFlag = CK_ATTRIBUTE_TYPE(CKA_TOKEN)
        return (record([(member.index, pub)], in: session, isToken: publicTemplate[tokenFlag]?.boolValue ?? false),
                record([(member.index, priv)], in: session, isToken: privateTemplate[tokenFlag]?.boolValue ?? false))
    }

    /// Wraps on a member that holds both keys.
    public func wrapKey(_ handle: CK_SESSION_HANDLE, _ mechanism: Mechanism, wrappingKey: CK_OBJECT_HANDLE,
                        key: CK_OBJECT_HANDLE, capacity: Int?) throws(P11Error) -> Output {
        let session = try session(handle)
        let group = session.group
        let wrapping = try copies(of: wrappingKey, in: group, invalid: P11Error(CK_RV(CKR_WRAPPING_KEY_HANDLE_INVALID)))
        let wrapped = try copies(of: key, in: group, invalid: .keyHandleInvalid)
        let both = zip(wrapping, wrapped).map { $0 != nil && $1 != nil ? $0 : nil }
        let member = try group.pick(holding: both)
        member.served.add(1, ordering: .relaxed)
        return try member.wrapKey(try session.memberSession(member), mechanism, wrappingKey: wrapping[member.index]!,
                                  key: wrapped[member.index]!, capacity: capacity)
    }

    /// Unwrapping is deterministic: it is replayed on every member that holds the unwrapping key.
    public func unwrapKey(_ handle: CK_SESSION_HANDLE, _ mechanism: Mechanism, unwrappingKey: CK_OBJECT_HANDLE,
                          wrapped: [UInt8], _ template: [Attribute]) throws(P11Error) -> CK_OBJECT_HANDLE {
        let session = try session(handle)
        let source = try copies(of: unwrappingKey, in: session.group, invalid: P11Error(CK_RV(CKR_UNWRAPPING_KEY_HANDLE_INVALID)))
        let made = try everyHolder(source, in: session) { (member, s, key) throws(P11Error) in
            try member.unwrapKey(s, mechanism, unwrappingKey: key, wrapped: wrapped, template)
        }
        return record(made, in: session, isToken: template[CK_ATTRIBUTE_TYPE(CKA_TOKEN)]?.boolValue ?? false)
    }

    /// Derivation is deterministic: it is replayed on every member that holds the base key.
    public func deriveKey(_ handle: CK_SESSION_HANDLE, _ mechanism: Mechanism, baseKey: CK_OBJECT_HANDLE,
                          _ template: [Attribute]) throws(P11Error) -> CK_OBJECT_HANDLE {
        let session = try session(handle)
        let source = try copies(of: baseKey, in: session.group, invalid: .keyHandleInvalid)
        let made = try everyHolder(source, in: session) { (member, s, key) throws(P11Error) in
            try member.deriveKey(s, mechanism, baseKey: key, template)
        }
        return record(made, in: session, isToken: template[CK_ATTRIBUTE_TYPE(CKA_TOKEN)]?.boolValue ?? false)
    }
}
