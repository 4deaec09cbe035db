// A fake token's object: an attribute bag with PKCS#11's rules for each class (which attributes exist, their
// defaults, which are sensitive, which may change), and the key material the fake's crypto works on.
import CInterop
import P11HA

struct FakeObject: Sendable {
    var attributes: [CK_ATTRIBUTE_TYPE: [UInt8]]
    /// Both halves of a key pair share it; signatures are a function of it, so the public half can verify.
    /// Never an attribute of the private half: the application cannot read it there.
    var publicValue: [UInt8] = []

    func bool(_ type: CK_ATTRIBUTE_TYPE) -> Bool { attributes[type] == [1] }

    func ulong(_ type: CK_ATTRIBUTE_TYPE) -> CK_ULONG? { attributes[type].flatMap { Attribute(type, $0).ulongValue } }

    var objectClass: CK_OBJECT_CLASS { ulong(CKA_CLASS) ?? CK_ULONG.max }
    var keyType: CK_KEY_TYPE? { ulong(CKA_KEY_TYPE) }
    var isToken: Bool { bool(CKA_TOKEN) }
    var isPrivate: Bool { bool(CKA_PRIVATE) }
    var isSecretKey: Bool { objectClass == CKO_SECRET_KEY }
    var isPrivateKey: Bool { objectClass == CKO_PRIVATE_KEY }
    var isPublicKey: Bool { objectClass == CKO_PUBLIC_KEY }

    /// A secret key's value; a private key's private secret.
    var secret: [UInt8] { attributes[CKA_VALUE] ?? attributes[CKA_PRIVATE_EXPONENT] ?? [] }

    /// Whether the application may not read `type` (PKCS#11: secret values of sensitive or unextractable keys).
    func isSensitive(_ type: CK_ATTRIBUTE_TYPE) -> Bool {
        guard isSecretKey || isPrivateKey, FakeObject.secretTypes.contains(type) else { return false }
        return bool(CKA_SENSITIVE) || !bool(CKA_EXTRACTABLE)
    }

    func matches(_ template: [Attribute]) -> Bool {
        template.allSatisfy { attributes[$0.type] == $0.value }
    }

    var template: [Attribute] {
        attributes.keys.sorted().map { Attribute($0, attributes[$0]!) }
    }

    /// The length C_GetObjectSize reports: the bytes of its attributes.
    var size: Int { attributes.values.reduce(0) { $0 + $1.count } + publicValue.count }
}

extension FakeObject {
    static let secretTypes: Set<CK_ATTRIBUTE_TYPE> = [
        CKA_VALUE, CKA_PRIVATE_EXPONENT, CKA_PRIME_1, CKA_PRIME_2, CKA_EXPONENT_1, CKA_EXPONENT_2, CKA_COEFFICIENT,
    ]

    static let boolTypes: Set<CK_ATTRIBUTE_TYPE> = [
        CKA_TOKEN, CKA_PRIVATE, CKA_MODIFIABLE, CKA_COPYABLE, CKA_DESTROYABLE, CKA_DERIVE, CKA_LOCAL, CKA_SENSITIVE,
        CKA_EXTRACTABLE, CKA_ALWAYS_SENSITIVE, CKA_NEVER_EXTRACTABLE, CKA_ENCRYPT, CKA_DECRYPT, CKA_SIGN, CKA_VERIFY,
        CKA_WRAP, CKA_UNWRAP, CKA_SIGN_RECOVER, CKA_VERIFY_RECOVER, CKA_WRAP_WITH_TRUSTED, CKA_TRUSTED,
        CKA_ALWAYS_AUTHENTICATE,
    ]

    static let ulongTypes: Set<CK_ATTRIBUTE_TYPE> = [
        CKA_CLASS, CKA_KEY_TYPE, CKA_VALUE_LEN, CKA_MODULUS_BITS, CKA_CERTIFICATE_TYPE, CKA_CERTIFICATE_CATEGORY,
        CKA_KEY_GEN_MECHANISM, CKA_JAVA_MIDP_SECURITY_DOMAIN, CKA_NAME_HASH_ALGORITHM,
    ]

    /// Set by the token only: a template that names them is refused.
    static let tokenSet: Set<CK_ATTRIBUTE_TYPE> = [
        CKA_LOCAL, CKA_ALWAYS_SENSITIVE, CKA_NEVER_EXTRACTABLE, CKA_KEY_GEN_MECHANISM,
    ]

    /// Never changed by C_SetAttributeValue or C_CopyObject.
    static let fixedTypes: Set<CK_ATTRIBUTE_TYPE> = tokenSet.union([
        CKA_CLASS, CKA_KEY_TYPE, CKA_VALUE_LEN, CKA_MODULUS, CKA_MODULUS_BITS, CKA_PUBLIC_EXPONENT,
        CKA_PRIVATE_EXPONENT, CKA_PRIME_1, CKA_PRIME_2, CKA_EXPONENT_1, CKA_EXPONENT_2, CKA_COEFFICIENT,
        CKA_EC_PARAMS, CKA_EC_POINT, CKA_CERTIFICATE_TYPE,
    ])

    /// May change in C_CopyObject but not in C_SetAttributeValue.
    static let copyOnlyTypes: Set<CK_ATTRIBUTE_TYPE> = [CKA_TOKEN, CKA_PRIVATE, CKA_MODIFIABLE]

    /// The attributes an object of `objectClass` (and `keyType`) has, with their defaults; nil: not offered.
    static func defaults(_ objectClass: CK_OBJECT_CLASS, keyType: CK_KEY_TYPE?) -> [CK_ATTRIBUTE_TYPE: [UInt8]]? {
        let no: [UInt8] = [0], yes: [UInt8] = [1]
        var a: [CK_ATTRIBUTE_TYPE: [UInt8]] = [
            CKA_CLASS: Attribute(CKA_CLASS, ulong: objectClass).value,
            CKA_TOKEN: no, CKA_MODIFIABLE: yes, CKA_COPYABLE: yes, CKA_DESTROYABLE: yes, CKA_LABEL: [],
            // As SoftHSM: keys that hold secrets are private unless asked otherwise, the rest public.
            CKA_PRIVATE: objectClass == CKO_SECRET_KEY || objectClass == CKO_PRIVATE_KEY ? yes : no,
        ]
        switch objectClass {
        case CKO_DATA:
            a[CKA_APPLICATION] = []
            a[CKA_OBJECT_ID] = []
            a[CKA_VALUE] = []
            return a
        case CKO_CERTIFICATE:
            a[CKA_CERTIFICATE_TYPE] = Attribute(CKA_CERTIFICATE_TYPE, ulong: CK_ULONG(CKC_X_509)).value
            a[CKA_TRUSTED] = no
            a[CKA_CERTIFICATE_CATEGORY] = Attribute(CKA_CERTIFICATE_CATEGORY, ulong: 0).value
            a[CKA_CHECK_VALUE] = []
            a[CKA_START_DATE] = []
            a[CKA_END_DATE] = []
            a[CKA_SUBJECT] = []
            a[CKA_ID] = []
            a[CKA_ISSUER] = []
            a[CKA_SERIAL_NUMBER] = []
            a[CKA_VALUE] = []
            a[CKA_URL] = []
            a[CKA_HASH_OF_SUBJECT_PUBLIC_KEY] = []
            a[CKA_HASH_OF_ISSUER_PUBLIC_KEY] = []
            return a
        case CKO_SECRET_KEY, CKO_PRIVATE_KEY, CKO_PUBLIC_KEY:
            break
        default:
            return nil
        }
        guard let keyType else { return nil }
        a[CKA_KEY_TYPE] = Attribute(CKA_KEY_TYPE, ulong: keyType).value
        a[CKA_ID] = []
        a[CKA_START_DATE] = []
        a[CKA_END_DATE] = []
        a[CKA_DERIVE] = no
        a[CKA_LOCAL] = no
        a[CKA_KEY_GEN_MECHANISM] = Attribute(CKA_KEY_GEN_MECHANISM, ulong: CK_UNAVAILABLE_INFORMATION_VALUE).value
        switch (objectClass, keyType) {
        case (CKO_SECRET_KEY, CKK_AES), (CKO_SECRET_KEY, CKK_GENERIC_SECRET):
            for t in [CKA_ENCRYPT, CKA_DECRYPT, CKA_SIGN, CKA_VERIFY, CKA_WRAP, CKA_UNWRAP] { a[t] = yes }
            for t in [CKA_SENSITIVE, CKA_EXTRACTABLE, CKA_ALWAYS_SENSITIVE, CKA_NEVER_EXTRACTABLE,
                      CKA_WRAP_WITH_TRUSTED, CKA_TRUSTED] { a[t] = no }
            a[CKA_VALUE] = []
            a[CKA_VALUE_LEN] = Attribute(CKA_VALUE_LEN, ulong: 0).value
            a[CKA_CHECK_VALUE] = []
        case (CKO_PRIVATE_KEY, CKK_EC), (CKO_PRIVATE_KEY, CKK_RSA):
            for t in [CKA_DECRYPT, CKA_SIGN, CKA_SIGN_RECOVER, CKA_UNWRAP] { a[t] = yes }
            for t in [CKA_SENSITIVE, CKA_EXTRACTABLE, CKA_ALWAYS_SENSITIVE, CKA_NEVER_EXTRACTABLE,
                      CKA_WRAP_WITH_TRUSTED, CKA_ALWAYS_AUTHENTICATE] { a[t] = no }
            a[CKA_SUBJECT] = []
            a[CKA_PUBLIC_KEY_INFO] = []
            if keyType == CKK_EC {
                a[CKA_EC_PARAMS] = []
                a[CKA_VALUE] = []
            } else {
                a[CKA_MODULUS] = []
                a[CKA_PUBLIC_EXPONENT] = []
                a[CKA_PRIVATE_EXPONENT] = []
            }
        case (CKO_PUBLIC_KEY, CKK_EC), (CKO_PUBLIC_KEY, CKK_RSA):
            for t in [CKA_ENCRYPT, CKA_VERIFY, CKA_VERIFY_RECOVER, CKA_WRAP] { a[t] = yes }
            a[CKA_TRUSTED] = no
            a[CKA_SUBJECT] = []
            a[CKA_PUBLIC_KEY_INFO] = []
            if keyType == CKK_EC {
                a[CKA_EC_PARAMS] = []
                a[CKA_EC_POINT] = []
            } else {
                a[CKA_MODULUS] = []
                a[CKA_MODULUS_BITS] = Attribute(CKA_MODULUS_BITS, ulong: 0).value
                a[CKA_PUBLIC_EXPONENT] = []
            }
        default:
            return nil
        }
        return a
    }

    /// Checks a value's form: booleans are one byte, numbers a CK_ULONG.
    static func checkForm(_ attribute: Attribute) throws(P11Error) {
        if boolTypes.contains(attribute.type), attribute.boolValue == nil {
            throw P11Error.member(CK_RV(CKR_ATTRIBUTE_VALUE_INVALID))
        }
        if ulongTypes.contains(attribute.type), attribute.ulongValue == nil {
            throw P11Error.member(CK_RV(CKR_ATTRIBUTE_VALUE_INVALID))
        }
    }

    /// A new object of the template's class from its defaults and the template. `required` must be in the
    /// template; `classHint` stands for a missing CKA_CLASS (generation, derivation).
    static func build(_ template: [Attribute], classHint: CK_OBJECT_CLASS? = nil, keyTypeHint: CK_KEY_TYPE? = nil,
                      required: [CK_ATTRIBUTE_TYPE] = []) throws(P11Error) -> FakeObject {
        for attribute in template { try checkForm(attribute) }
        guard let objectClass = template[CKA_CLASS]?.ulongValue ?? classHint else {
            throw P11Error.member(CK_RV(CKR_TEMPLATE_INCOMPLETE))
        }
        if let classHint, objectClass != classHint { throw P11Error.member(CK_RV(CKR_TEMPLATE_INCONSISTENT)) }
        let isKey = [CKO_SECRET_KEY, CKO_PRIVATE_KEY, CKO_PUBLIC_KEY].contains(objectClass)
        let keyType = template[CKA_KEY_TYPE]?.ulongValue ?? keyTypeHint
        if isKey && keyType == nil { throw P11Error.member(CK_RV(CKR_TEMPLATE_INCOMPLETE)) }
        if let keyTypeHint, keyType != keyTypeHint { throw P11Error.member(CK_RV(CKR_TEMPLATE_INCONSISTENT)) }
        guard var attributes = defaults(objectClass, keyType: keyType) else {
            throw P11Error.member(CK_RV(CKR_ATTRIBUTE_VALUE_INVALID))
        }
        for attribute in template {
            guard attributes[attribute.type] != nil else { throw P11Error.member(CK_RV(CKR_ATTRIBUTE_TYPE_INVALID)) }
            if tokenSet.contains(attribute.type) { throw P11Error.member(CK_RV(CKR_ATTRIBUTE_READ_ONLY)) }
            attributes[attribute.type] = attribute.value
        }
        for type in required where template[type] == nil { throw P11Error.member(CK_RV(CKR_TEMPLATE_INCOMPLETE)) }
        return FakeObject(attributes: attributes)
    }

    /// Sets what the token computes for a key: where it came from and whether its secret ever left.
    mutating func settle(generatedBy mechanism: CK_MECHANISM_TYPE?, alwaysSensitive: Bool = true, neverExtractable: Bool = true) {
        guard isSecretKey || isPrivateKey || isPublicKey else { return }
        attributes[CKA_LOCAL] = [mechanism != nil ? 1 : 0]
        attributes[CKA_KEY_GEN_MECHANISM] = Attribute(CKA_KEY_GEN_MECHANISM, ulong: mechanism ?? CK_UNAVAILABLE_INFORMATION_VALUE).value
        guard isSecretKey || isPrivateKey else { return }
        attributes[CKA_ALWAYS_SENSITIVE] = [mechanism != nil && alwaysSensitive && bool(CKA_SENSITIVE) ? 1 : 0]
        attributes[CKA_NEVER_EXTRACTABLE] = [mechanism != nil && neverExtractable && !bool(CKA_EXTRACTABLE) ? 1 : 0]
        if isSecretKey {
            attributes[CKA_VALUE_LEN] = Attribute(CKA_VALUE_LEN, ulong: CK_ULONG(secret.count)).value
            attributes[CKA_CHECK_VALUE] = fakeHash("check-value", secret, length: 3)
        }
    }

    /// Applies C_SetAttributeValue's (or C_CopyObject's) template, all or nothing. `mayTrust`: whether the
    /// session may set CKA_TRUSTED.
    func changed(by template: [Attribute], copying: Bool, mayTrust: Bool) throws(P11Error) -> FakeObject {
        if !copying && !bool(CKA_MODIFIABLE) { throw P11Error.member(CK_RV(CKR_ACTION_PROHIBITED)) }
        var result = self
        for attribute in template {
            try FakeObject.checkForm(attribute)
            let type = attribute.type
            guard let current = attributes[type] else { throw P11Error.member(CK_RV(CKR_ATTRIBUTE_TYPE_INVALID)) }
            let readOnly = P11Error.member(CK_RV(CKR_ATTRIBUTE_READ_ONLY))
            if FakeObject.fixedTypes.contains(type) { throw readOnly }
            if !copying && FakeObject.copyOnlyTypes.contains(type) { throw readOnly }
            if type == CKA_VALUE && (isSecretKey || isPrivateKey || objectClass == CKO_CERTIFICATE) { throw readOnly }
            let turnsOn = attribute.value == [1] && current != [1]
            let turnsOff = attribute.value == [0] && current != [0]
            // One-way switches: a key can become more protected, never less.
            if type == CKA_SENSITIVE && turnsOff { throw readOnly }
            if type == CKA_EXTRACTABLE && turnsOn { throw readOnly }
            if type == CKA_WRAP_WITH_TRUSTED && turnsOff { throw readOnly }
            if type == CKA_COPYABLE && turnsOn { throw readOnly }
            if type == CKA_TRUSTED && turnsOn && !mayTrust { throw readOnly }
            result.attributes[type] = attribute.value
        }
        if result.isSecretKey || result.isPrivateKey {
            if !result.bool(CKA_SENSITIVE) { result.attributes[CKA_ALWAYS_SENSITIVE] = [0] }
            if result.bool(CKA_EXTRACTABLE) { result.attributes[CKA_NEVER_EXTRACTABLE] = [0] }
        }
        return result
    }
}

// MARK: key material

/// The fake's public values: an EC point is 64 bytes (P-256-sized), an RSA modulus the asked size.
enum FakeKeyMaterial {
    static func ecPublicValue(secret: [UInt8]) -> [UInt8] { fakeHash("ec-public", secret, length: 64) }

    static func rsaModulus(secret: [UInt8], bits: Int) -> [UInt8] {
        var modulus = fakeHash("rsa-modulus", secret, length: bits / 8)
        modulus[0] |= 0x80
        modulus[modulus.count - 1] |= 1
        return modulus
    }

    /// CKA_EC_POINT: a DER OCTET STRING around the uncompressed point (0x04 || x || y).
    static func ecPointAttribute(_ publicValue: [UInt8]) -> [UInt8] {
        let point = [0x04] + publicValue
        return [0x04, UInt8(point.count)] + point
    }

    /// The public value in an EC point as CKA_EC_POINT holds it (DER) or as ECDH takes it (raw).
    static func publicValue(ecPoint: [UInt8]) -> [UInt8] {
        var point = ecPoint
        if point.count > 2, point[0] == 0x04, Int(point[1]) == point.count - 2 { point = Array(point.dropFirst(2)) }
        if point.count == 65, point[0] == 0x04 { point = Array(point.dropFirst()) }
        return point
    }

    static let defaultPublicExponent: [UInt8] = [0x01, 0x00, 0x01]
}
