// Key management on a fake connection: generation, wrapping, unwrapping, derivation and random numbers.
import CInterop
import P11HA

extension FakeToken {
    public func generateKey(_ session: MemberSession, _ mechanism: Mechanism, _ template: [Attribute]) throws(P11Error) -> MemberObject {
        try gate(.generateKey) { connection, storeState throws(P11Error) in
            let s = try connection.session(session)
            try checkOffered(mechanism, CKF_GENERATE)
            let keyType: CK_KEY_TYPE
            let length: Int
            switch mechanism.type {
            case CKM_AES_KEY_GEN:
                keyType = CK_KEY_TYPE(CKK_AES)
                length = Int(template[CKA_VALUE_LEN]?.ulongValue ?? 32)
                guard [16, 24, 32].contains(length) else { throw P11Error.member(CK_RV(CKR_ATTRIBUTE_VALUE_INVALID)) }
            default:
                keyType = CK_KEY_TYPE(CKK_GENERIC_SECRET)
                guard let asked = template[CKA_VALUE_LEN]?.ulongValue else { throw P11Error.member(CK_RV(CKR_TEMPLATE_INCOMPLETE)) }
                length = Int(asked)
                guard (1...512).contains(length) else { throw P11Error.member(CK_RV(CKR_ATTRIBUTE_VALUE_INVALID)) }
            }
            if template[CKA_VALUE] != nil { throw P11Error.member(CK_RV(CKR_TEMPLATE_INCONSISTENT)) }
            var key = try FakeObject.build(template.filter { $0.type != CKA_VALUE_LEN },
                                           classHint: CK_OBJECT_CLASS(CKO_SECRET_KEY), keyTypeHint: keyType)
            try connection.checkMayHold(key, in: s)
            key.attributes[CKA_VALUE] = storeState.random.bytes(length)
            key.settle(generatedBy: mechanism.type)
            return try connection.insert(key, session: session, in: &storeState, owner: store)
        }
    }

    public func generateKeyPair(_ session: MemberSession, _ mechanism: Mechanism, publicTemplate: [Attribute],
                                privateTemplate: [Attribute]) throws(P11Error) -> (public: MemberObject, private: MemberObject) {
        try gate(.generateKeyPair) { connection, storeState throws(P11Error) in
            let s = try connection.session(session)
            try checkOffered(mechanism, CKF_GENERATE_KEY_PAIR)
            let isEC = mechanism.type == CKM_EC_KEY_PAIR_GEN
            let keyType = CK_KEY_TYPE(isEC ? CKK_EC : CKK_RSA)
            // Values the token computes: a template naming them is inconsistent.
            let computed: [CK_ATTRIBUTE_TYPE] = [CKA_EC_POINT, CKA_VALUE, CKA_MODULUS, CKA_PRIVATE_EXPONENT]
            if (publicTemplate + privateTemplate).contains(where: { computed.contains($0.type) }) {
                throw P11Error.member(CK_RV(CKR_TEMPLATE_INCONSISTENT))
            }
            var publicKey = try FakeObject.build(publicTemplate,
                                                 classHint: CK_OBJECT_CLASS(CKO_PUBLIC_KEY), keyTypeHint: keyType,
                                                 required: isEC ? [CKA_EC_PARAMS] : [])
            var privateKey = try FakeObject.build(privateTemplate, classHint: CK_OBJECT_CLASS(CKO_PRIVATE_KEY), keyTypeHint: keyType)
            try connection.checkMayHold(publicKey, in: s)
            try connection.checkMayHold(privateKey, in: s)
            let secret = storeState.random.bytes(32)
            if isEC {
                let publicValue = FakeKeyMaterial.ecPublicValue(secret: secret)
                publicKey.attributes[CKA_EC_POINT] = FakeKeyMaterial.ecPointAttribute(publicValue)
                privateKey.attributes[CKA_EC_PARAMS] = publicKey.attributes[CKA_EC_PARAMS]
                privateKey.attributes[CKA_VALUE] = secret
                publicKey.publicValue = publicValue
                privateKey.publicValue = publicValue
            } else {
                guard let bits = publicTemplate[CKA_MODULUS_BITS]?.ulongValue else {
                    throw P11Error.member(CK_RV(CKR_TEMPLATE_INCOMPLETE))
                }
                guard (1024...4096).contains(bits), bits % 8 == 0 else { throw P11Error.member(CK_RV(CKR_KEY_SIZE_RANGE)) }
                let modulus = FakeKeyMaterial.rsaModulus(secret: secret, bits: Int(bits))
                let exponent = publicTemplate[CKA_PUBLIC_EXPONENT]?.value ?? FakeKeyMaterial.defaultPublicExponent
                for attribute in [CKA_MODULUS: modulus, CKA_PUBLIC_EXPONENT: exponent] {
                    publicKey.attributes[attribute.key] = attribute.value
                    privateKey.attributes[attribute.key] = attribute.value
                }
                publicKey.attributes[CKA_MODULUS_BITS] = Attribute(CKA_MODULUS_BITS, ulong: bits).value
                privateKey.attributes[CKA_PRIVATE_EXPONENT] = secret
                publicKey.publicValue = modulus
                privateKey.publicValue = modulus
            }
            publicKey.settle(generatedBy: mechanism.type)
            privateKey.settle(generatedBy: mechanism.type)
            let publicHandle = try connection.insert(publicKey, session: session, in: &storeState, owner: store)
            let privateHandle = try connection.insert(privateKey, session: session, in: &storeState, owner: store)
            return (publicHandle, privateHandle)
        }
    }

    public func wrapKey(_ session: MemberSession, _ mechanism: Mechanism, wrappingKey: MemberObject, key: MemberObject,
                        capacity: Int?) throws(P11Error) -> Output {
        try gate(.wrapKey) { connection, storeState throws(P11Error) in
            _ = try connection.session(session)
            try checkOffered(mechanism, CKF_WRAP)
            try checkNoParameter(mechanism)
            let wrapping = try connection.object(wrappingKey, in: storeState, invalid: CKR_WRAPPING_KEY_HANDLE_INVALID).object
            let target = try connection.object(key, in: storeState, invalid: CKR_KEY_HANDLE_INVALID).object
            guard wrapping.bool(CKA_WRAP) else { throw P11Error.member(CK_RV(CKR_KEY_FUNCTION_NOT_PERMITTED)) }
            let isRSA = mechanism.type == CKM_RSA_PKCS
            let wrappingFits = isRSA ? wrapping.isPublicKey && wrapping.keyType == CKK_RSA
                                     : wrapping.isSecretKey && wrapping.keyType == CKK_AES
            guard wrappingFits else { throw P11Error.member(CK_RV(CKR_WRAPPING_KEY_TYPE_INCONSISTENT)) }
            guard target.isSecretKey || target.isPrivateKey else { throw P11Error.member(CK_RV(CKR_KEY_NOT_WRAPPABLE)) }
            guard target.bool(CKA_EXTRACTABLE) else { throw P11Error.member(CK_RV(CKR_KEY_UNEXTRACTABLE)) }
            if target.bool(CKA_WRAP_WITH_TRUSTED) && !wrapping.bool(CKA_TRUSTED) {
                throw P11Error.member(CK_RV(CKR_KEY_NOT_WRAPPABLE))
            }
            // Only RFC 5649 (with its length field) carries a private key's encoding.
            if target.isPrivateKey && mechanism.type != CKM_AES_KEY_WRAP_PAD { throw P11Error.member(CK_RV(CKR_KEY_NOT_WRAPPABLE)) }
            let payload = target.isPrivateKey ? FakeWrap.encodePrivate(target) : target.secret
            let blob = try FakeWrap.wrap(mechanism.type, under: isRSA ? wrapping.publicValue : wrapping.secret, payload)
            guard let capacity else { return .length(blob.count) }
            if capacity < blob.count { throw P11Error.member(CK_RV(CKR_BUFFER_TOO_SMALL), neededLength: blob.count) }
            return .data(blob)
        }
    }

    public func unwrapKey(_ session: MemberSession, _ mechanism: Mechanism, unwrappingKey: MemberObject, wrapped: [UInt8],
                          _ template: [Attribute]) throws(P11Error) -> MemberObject {
        try gate(.unwrapKey) { connection, storeState throws(P11Error) in
            _ = try connection.session(session)
            try checkOffered(mechanism, CKF_UNWRAP)
            try checkNoParameter(mechanism)
            let unwrapping = try connection.object(unwrappingKey, in: storeState, invalid: CKR_UNWRAPPING_KEY_HANDLE_INVALID).object
            guard unwrapping.bool(CKA_UNWRAP) else { throw P11Error.member(CK_RV(CKR_KEY_FUNCTION_NOT_PERMITTED)) }
            let isRSA = mechanism.type == CKM_RSA_PKCS
            let unwrappingFits = isRSA ? unwrapping.isPrivateKey && unwrapping.keyType == CKK_RSA
                                       : unwrapping.isSecretKey && unwrapping.keyType == CKK_AES
            guard unwrappingFits else { throw P11Error.member(CK_RV(CKR_UNWRAPPING_KEY_TYPE_INCONSISTENT)) }
            let payload = try FakeWrap.unwrap(mechanism.type, under: isRSA ? unwrapping.publicValue : unwrapping.secret, wrapped)
            let computed: [CK_ATTRIBUTE_TYPE] = [CKA_VALUE, CKA_EC_POINT, CKA_MODULUS, CKA_PRIVATE_EXPONENT]
            if template.contains(where: { computed.contains($0.type) }) { throw P11Error.member(CK_RV(CKR_TEMPLATE_INCONSISTENT)) }
            var key = try FakeObject.build(template.filter { $0.type != CKA_VALUE_LEN })
            switch (key.objectClass, key.keyType) {
            case (CKO_SECRET_KEY, let keyType):
                if keyType == CKK_AES && ![16, 24, 32].contains(payload.count) { throw P11Error.member(CK_RV(CKR_WRAPPED_KEY_INVALID)) }
                key.attributes[CKA_VALUE] = payload
            case (CKO_PRIVATE_KEY, CKK_EC):
                guard let (secret, publicValue) = FakeWrap.decodePrivate(payload) else { throw P11Error.member(CK_RV(CKR_WRAPPED_KEY_INVALID)) }
                key.attributes[CKA_VALUE] = secret
                key.publicValue = publicValue
            case (CKO_PRIVATE_KEY, _):
                guard let (secret, publicValue) = FakeWrap.decodePrivate(payload) else { throw P11Error.member(CK_RV(CKR_WRAPPED_KEY_INVALID)) }
                key.attributes[CKA_PRIVATE_EXPONENT] = secret
                key.attributes[CKA_MODULUS] = publicValue
                if key.attributes[CKA_PUBLIC_EXPONENT] == [] { key.attributes[CKA_PUBLIC_EXPONENT] = FakeKeyMaterial.defaultPublicExponent }
                key.publicValue = publicValue
            default:
                throw P11Error.member(CK_RV(CKR_TEMPLATE_INCONSISTENT))
            }
            key.settle(generatedBy: nil)
            return try connection.insert(key, session: session, in: &storeState, owner: store)
        }
    }

    public func deriveKey(_ session: MemberSession, _ mechanism: Mechanism, baseKey: MemberObject,
                          _ template: [Attribute]) throws(P11Error) -> MemberObject {
        try gate(.deriveKey) { connection, storeState throws(P11Error) in
            _ = try connection.session(session)
            try checkOffered(mechanism, CKF_DERIVE)
            let base = try connection.object(baseKey, in: storeState, invalid: CKR_KEY_HANDLE_INVALID).object
            guard base.bool(CKA_DERIVE) else { throw P11Error.member(CK_RV(CKR_KEY_FUNCTION_NOT_PERMITTED)) }
            if template[CKA_VALUE] != nil { throw P11Error.member(CK_RV(CKR_TEMPLATE_INCONSISTENT)) }
            var key = try FakeObject.build(template.filter { $0.type != CKA_VALUE_LEN }, classHint: CK_OBJECT_CLASS(CKO_SECRET_KEY))
            let askedLength = template[CKA_VALUE_LEN]?.ulongValue.map { Int($0) }
            let raw = try FakeWrap.derivedBytes(mechanism, base: base, length: askedLength)
            let length = askedLength ?? (key.keyType == CKK_AES && ![16, 24, 32].contains(raw.count) ? 32 : raw.count)
            if key.keyType == CKK_AES && ![16, 24, 32].contains(length) { throw P11Error.member(CK_RV(CKR_ATTRIBUTE_VALUE_INVALID)) }
            key.attributes[CKA_VALUE] = raw.count >= length ? Array(raw.prefix(length)) : fakeHash("derive-expand", raw, length: length)
            key.settle(generatedBy: nil)
            // A derived key was always sensitive (never extractable) only if its base was too.
            key.attributes[CKA_ALWAYS_SENSITIVE] = [base.bool(CKA_ALWAYS_SENSITIVE) && key.bool(CKA_SENSITIVE) ? 1 : 0]
            key.attributes[CKA_NEVER_EXTRACTABLE] = [base.bool(CKA_NEVER_EXTRACTABLE) && !key.bool(CKA_EXTRACTABLE) ? 1 : 0]
            return try connection.insert(key, session: session, in: &storeState, owner: store)
        }
    }

    public func generateRandom(_ session: MemberSession, count: Int) throws(P11Error) -> [UInt8] {
        try gate(.generateRandom) { connection, storeState throws(P11Error) in
            _ = try connection.session(session)
            return storeState.random.bytes(count)
        }
    }

    public func seedRandom(_ session: MemberSession, _ seed: [UInt8]) throws(P11Error) {
        try gate(.seedRandom) { connection, storeState throws(P11Error) in
            _ = try connection.session(session)
            storeState.random.absorb(seed)
        }
    }

    private func checkOffered(_ mechanism: Mechanism, _ flag: UInt) throws(P11Error) {
        guard store.mechanisms.contains(mechanism.type), let offered = FakeMechanisms.named(mechanism.type),
              offered.info.flags & CK_FLAGS(flag) != 0 else { throw P11Error.member(CK_RV(CKR_MECHANISM_INVALID)) }
    }

    private func checkNoParameter(_ mechanism: Mechanism) throws(P11Error) {
        switch mechanism.parameter {
        case .none, .bytes([]): return
        default: throw P11Error.member(CK_RV(CKR_MECHANISM_PARAM_INVALID))
        }
    }
}

/// Wrapped forms and derived bytes: deterministic (equal keys wrap alike under equal keys, as RFC 5649 does),
/// with an integrity check so that the wrong unwrapping key is noticed.
enum FakeWrap {
    private static let privateMagic: [UInt8] = [0x50, 0x4B]

    static func encodePrivate(_ key: FakeObject) -> [UInt8] {
        privateMagic + u32Bytes(key.secret.count) + key.secret + key.publicValue
    }

    static func decodePrivate(_ payload: [UInt8]) -> (secret: [UInt8], publicValue: [UInt8])? {
        guard payload.count >= 6, Array(payload.prefix(2)) == privateMagic else { return nil }
        let n = readU32(payload[2...])
        guard payload.count >= 6 + n else { return nil }
        return (Array(payload[6..<6 + n]), Array(payload[(6 + n)...]))
    }

    /// A header (check and length) and the padded payload, XORed with a keystream of the wrapping key; as long
    /// as the real mechanism's output (RFC 3394: n + 8, RFC 5649: padded n + 8, PKCS #1: the modulus).
    static func wrap(_ mechanism: CK_MECHANISM_TYPE, under key: [UInt8], _ payload: [UInt8]) throws(P11Error) -> [UInt8] {
        let header = fakeHash("wrap-check \(mechanism)", key, payload, length: 4) + u32Bytes(payload.count)
        var body = payload
        switch mechanism {
        case CKM_AES_KEY_WRAP:
            guard payload.count >= 16, payload.count % 8 == 0 else { throw P11Error.member(CK_RV(CKR_KEY_SIZE_RANGE)) }
        case CKM_AES_KEY_WRAP_PAD:
            body += [UInt8](repeating: 0, count: (8 - payload.count % 8) % 8)
        default:  // CKM_RSA_PKCS
            guard payload.count <= key.count - 11 else { throw P11Error.member(CK_RV(CKR_KEY_SIZE_RANGE)) }
            body += [UInt8](repeating: 0, count: key.count - 8 - payload.count)
        }
        return keystreamXOR(header + body, key: key, nonce: u64Bytes(UInt64(mechanism)), offset: 0)
    }

    static func unwrap(_ mechanism: CK_MECHANISM_TYPE, under key: [UInt8], _ wrapped: [UInt8]) throws(P11Error) -> [UInt8] {
        let fits = switch mechanism {
        case CKM_AES_KEY_WRAP: wrapped.count >= 24 && wrapped.count % 8 == 0
        case CKM_AES_KEY_WRAP_PAD: wrapped.count >= 16 && wrapped.count % 8 == 0
        default: wrapped.count == key.count
        }
        guard fits else { throw P11Error.member(CK_RV(CKR_WRAPPED_KEY_LEN_RANGE)) }
        let plain = keystreamXOR(wrapped, key: key, nonce: u64Bytes(UInt64(mechanism)), offset: 0)
        let n = readU32(plain[4...])
        let invalid = P11Error.member(CK_RV(CKR_WRAPPED_KEY_INVALID))
        guard n <= plain.count - 8 else { throw invalid }
        let payload = Array(plain[8..<8 + n])
        guard plain[(8 + n)...].allSatisfy({ $0 == 0 }),
              Array(plain.prefix(4)) == fakeHash("wrap-check \(mechanism)", key, payload, length: 4) else { throw invalid }
        return payload
    }

    /// The bytes a derivation makes from its base key (`length`: what the template asked, if it did).
    static func derivedBytes(_ mechanism: Mechanism, base: FakeObject, length: Int?) throws(P11Error) -> [UInt8] {
        let paramInvalid = P11Error.member(CK_RV(CKR_MECHANISM_PARAM_INVALID))
        let typeInconsistent = P11Error.member(CK_RV(CKR_KEY_TYPE_INCONSISTENT))
        switch (mechanism.type, mechanism.parameter) {
        case (CKM_ECDH1_DERIVE, .ecdh(let kdf, let sharedData, let publicData)):
            guard base.isPrivateKey && base.keyType == CKK_EC else { throw typeInconsistent }
            let peer = FakeKeyMaterial.publicValue(ecPoint: publicData)
            guard peer.count == 64 else { throw paramInvalid }
            // Symmetric in the two public values, so each side's derivation with the other's point agrees.
            let own = base.publicValue
            let (low, high) = own.lexicographicallyPrecedes(peer) ? (own, peer) : (peer, own)
            let shared = fakeHash("ecdh", low, high, length: 32)
            switch kdf {
            case CK_ULONG(CKD_NULL):
                guard sharedData.isEmpty else { throw paramInvalid }
                return shared
            case CK_ULONG(CKD_SHA256_KDF):
                return fakeHash("x9.63 sha256", shared, sharedData, length: length ?? 32)
            default:
                throw paramInvalid
            }
        case (CKM_ECDH1_DERIVE, _):
            throw paramInvalid
        case (CKM_SHA256_KEY_DERIVATION, .none), (CKM_SHA256_KEY_DERIVATION, .bytes([])):
            guard base.isSecretKey else { throw typeInconsistent }
            return FakeCrypto.digest(CK_MECHANISM_TYPE(CKM_SHA256), base.secret)
        case (CKM_CONCATENATE_BASE_AND_DATA, .derivationString(let data)), (CKM_CONCATENATE_BASE_AND_DATA, .bytes(let data)):
            guard base.isSecretKey else { throw typeInconsistent }
            return base.secret + data
        case (CKM_CONCATENATE_DATA_AND_BASE, .derivationString(let data)), (CKM_CONCATENATE_DATA_AND_BASE, .bytes(let data)):
            guard base.isSecretKey else { throw typeInconsistent }
            return data + base.secret
        default:
            throw paramInvalid
        }
    }
}
