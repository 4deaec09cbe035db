// Object management on a fake connection: create, copy, destroy, attributes and searches.
import CInterop
import P11HA

extension FakeToken {
    public func createObject(_ session: MemberSession, _ template: [Attribute]) throws(P11Error) -> MemberObject {
        try gate(.createObject) { connection, storeState throws(P11Error) in
            _ = try connection.session(session)
            let object = try FakeToken.imported(template)
            return try connection.insert(object, session: session, in: &storeState, owner: store)
        }
    }

    /// An object from C_CreateObject's template: what each class and key type requires, key material checked,
    /// public values derived as generation derives them (an imported key equals a generated one).
    static func imported(_ template: [Attribute]) throws(P11Error) -> FakeObject {
        let objectClass = template[CKA_CLASS]?.ulongValue
        let keyType = template[CKA_KEY_TYPE]?.ulongValue
        let required: [CK_ATTRIBUTE_TYPE] = switch (objectClass, keyType) {
        case (CKO_SECRET_KEY, _): [CKA_VALUE]
        case (CKO_PRIVATE_KEY, CKK_EC): [CKA_EC_PARAMS, CKA_VALUE]
        case (CKO_PRIVATE_KEY, CKK_RSA): [CKA_MODULUS, CKA_PRIVATE_EXPONENT]
        case (CKO_PUBLIC_KEY, CKK_EC): [CKA_EC_PARAMS, CKA_EC_POINT]
        case (CKO_PUBLIC_KEY, CKK_RSA): [CKA_MODULUS, CKA_PUBLIC_EXPONENT]
        default: []
        }
        if template[CKA_VALUE_LEN] != nil && objectClass == CKO_SECRET_KEY {
            throw P11Error.member(CK_RV(CKR_TEMPLATE_INCONSISTENT))  // the value gives the length
        }
        var object = try FakeObject.build(template, required: required)
        switch (object.objectClass, object.keyType) {
        case (CKO_SECRET_KEY, CKK_AES):
            guard [16, 24, 32].contains(object.secret.count) else { throw P11Error.member(CK_RV(CKR_ATTRIBUTE_VALUE_INVALID)) }
        case (CKO_SECRET_KEY, _):
            guard !object.secret.isEmpty else { throw P11Error.member(CK_RV(CKR_ATTRIBUTE_VALUE_INVALID)) }
        case (CKO_PRIVATE_KEY, CKK_EC):
            object.publicValue = FakeKeyMaterial.ecPublicValue(secret: object.secret)
        case (CKO_PRIVATE_KEY, CKK_RSA):
            object.publicValue = object.attributes[CKA_MODULUS]!
            if object.attributes[CKA_PUBLIC_EXPONENT] == [] {
                object.attributes[CKA_PUBLIC_EXPONENT] = FakeKeyMaterial.defaultPublicExponent
            }
        case (CKO_PUBLIC_KEY, CKK_EC):
            object.publicValue = FakeKeyMaterial.publicValue(ecPoint: object.attributes[CKA_EC_POINT]!)
        case (CKO_PUBLIC_KEY, CKK_RSA):
            object.publicValue = object.attributes[CKA_MODULUS]!
            object.attributes[CKA_MODULUS_BITS] = Attribute(CKA_MODULUS_BITS, ulong: CK_ULONG(object.publicValue.count * 8)).value
        default:
            break
        }
        object.settle(generatedBy: nil)
        return object
    }

    public func copyObject(_ session: MemberSession, _ object: MemberObject, _ template: [Attribute]) throws(P11Error) -> MemberObject {
        try gate(.copyObject) { connection, storeState throws(P11Error) in
            _ = try connection.session(session)
            let (_, original) = try connection.object(object, in: storeState, invalid: CKR_OBJECT_HANDLE_INVALID)
            guard original.bool(CKA_COPYABLE) else { throw P11Error.member(CK_RV(CKR_ACTION_PROHIBITED)) }
            let copy = try original.changed(by: template, copying: true, mayTrust: connection.mayTrust)
            return try connection.insert(copy, session: session, in: &storeState, owner: store)
        }
    }

    public func destroyObject(_ session: MemberSession, _ object: MemberObject) throws(P11Error) {
        try gate(.destroyObject) { connection, storeState throws(P11Error) in
            let s = try connection.session(session)
            let (ref, found) = try connection.object(object, in: storeState, invalid: CKR_OBJECT_HANDLE_INVALID)
            try connection.checkMayHold(found, in: s)
            guard found.bool(CKA_DESTROYABLE) else { throw P11Error.member(CK_RV(CKR_ACTION_PROHIBITED)) }
            if case .token(let id) = ref {
                storeState.objects[id] = nil
                if store.staleIndexes { connection.committed(id, created: false, in: &storeState) }
            }
            connection.forget(ref)
        }
    }

    public func objectSize(_ session: MemberSession, _ object: MemberObject) throws(P11Error) -> CK_ULONG {
        try gate(.objectSize) { connection, storeState throws(P11Error) in
            _ = try connection.session(session)
            return CK_ULONG(try connection.object(object, in: storeState, invalid: CKR_OBJECT_HANDLE_INVALID).object.size)
        }
    }

    public func attributeValues(_ session: MemberSession, _ object: MemberObject,
                                _ queries: [AttributeQuery]) throws(P11Error) -> (rv: CK_RV, answers: [AttributeAnswer]) {
        try gate(.attributeValues) { connection, storeState throws(P11Error) in
            _ = try connection.session(session)
            let (_, found) = try connection.object(object, in: storeState, invalid: CKR_OBJECT_HANDLE_INVALID)
            var rv = CK_RV(CKR_OK)
            var answers: [AttributeAnswer] = []
            for query in queries {
                let unavailable = AttributeAnswer(length: CK_UNAVAILABLE_INFORMATION_VALUE, value: nil)
                // PKCS#11 allows any of several problems to be the answer; the first one met is.
                func refuse(_ code: UInt) {
                    if rv == CKR_OK { rv = CK_RV(code) }
                    answers.append(unavailable)
                }
                guard let value = found.attributes[query.type] else {
                    refuse(CKR_ATTRIBUTE_TYPE_INVALID)
                    continue
                }
                if found.isSensitive(query.type) {
                    refuse(CKR_ATTRIBUTE_SENSITIVE)
                    continue
                }
                guard let capacity = query.capacity else {
                    answers.append(AttributeAnswer(length: CK_ULONG(value.count), value: nil))
                    continue
                }
                if capacity < value.count {
                    refuse(CKR_BUFFER_TOO_SMALL)
                    continue
                }
                answers.append(AttributeAnswer(length: CK_ULONG(value.count), value: value))
            }
            return (rv, answers)
        }
    }

    public func setAttributeValues(_ session: MemberSession, _ object: MemberObject, _ template: [Attribute]) throws(P11Error) {
        try gate(.setAttributeValues) { connection, storeState throws(P11Error) in
            let s = try connection.session(session)
            let (ref, found) = try connection.object(object, in: storeState, invalid: CKR_OBJECT_HANDLE_INVALID)
            try connection.checkMayHold(found, in: s)
            let changed = try found.changed(by: template, copying: false, mayTrust: connection.mayTrust)
            connection.update(ref, changed, in: &storeState)
        }
    }

    public func findObjects(_ session: MemberSession, _ template: [Attribute]) throws(P11Error) -> [MemberObject] {
        try gate(.findObjects) { connection, storeState throws(P11Error) in
            _ = try connection.session(session)
            let user = connection.login == .user
            let visible = { (object: FakeObject) in (!object.isPrivate || user) && object.matches(template) }
            let indexed = store.staleIndexes ? connection.indexed(&storeState) : nil
            let tokenIDs = storeState.objects.keys.sorted().filter { indexed?.contains($0) != false && visible(storeState.objects[$0]!) }
            let shown = FakeTokenStore.unhidden(tokenIDs, in: &storeState)
            let sessionIDs = connection.sessionObjects.keys.sorted().filter { visible(connection.sessionObjects[$0]!.object) }
            let refs = shown.map { ObjectRef.token($0) } + sessionIDs.map { ObjectRef.session($0) }
            return refs.map { MemberObject(connection.handle(for: $0)) }
        }
    }
}
