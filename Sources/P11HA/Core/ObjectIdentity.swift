// What makes copies of an object on different members one object: the attributes every copy shares and that an
// application finds it by.
import CInterop

package struct ObjectIdentity: Hashable, CustomStringConvertible {
    package var objectClass: [UInt8]?
    package var isToken: [UInt8]?
    package var keyType: [UInt8]?
    package var certificateType: [UInt8]?
    package var id: [UInt8]?
    package var label: [UInt8]?
    /// Public values tell apart keys that share a label and ID (and keep conflicting copies apart). Left out
    /// (nil) where key material is compared another way (an inventory compares wrapped forms).
    package var modulus: [UInt8]?
    package var ecPoint: [UInt8]?

    /// The attributes to read for a whole identity, in the order `init(reading:)` takes them.
    static let attributeTypes: [CK_ATTRIBUTE_TYPE] = [
        CKA_CLASS, CKA_TOKEN, CKA_KEY_TYPE, CKA_CERTIFICATE_TYPE, CKA_ID, CKA_LABEL, CKA_MODULUS, CKA_EC_POINT,
    ]
    /// The attributes an inventory of token objects names them by (no public values: it compares material apart).
    static let nameTypes: [CK_ATTRIBUTE_TYPE] = [CKA_CLASS, CKA_KEY_TYPE, CKA_CERTIFICATE_TYPE, CKA_ID, CKA_LABEL]

    init(objectClass: [UInt8]? = nil, isToken: [UInt8]? = nil, keyType: [UInt8]? = nil, certificateType: [UInt8]? = nil,
         id: [UInt8]? = nil, label: [UInt8]? = nil, modulus: [UInt8]? = nil, ecPoint: [UInt8]? = nil) {
        self.objectClass = objectClass
        self.isToken = isToken
        self.keyType = keyType
        self.certificateType = certificateType
        self.id = id
        self.label = label
        self.modulus = modulus
        self.ecPoint = ecPoint
    }

    /// From the values of `attributeTypes`, as a member answered them.
    init(reading values: [[UInt8]?]) {
        precondition(values.count == Self.attributeTypes.count)
        self.init(objectClass: values[0], isToken: values[1], keyType: values[2], certificateType: values[3],
                  id: values[4], label: values[5], modulus: values[6], ecPoint: values[7])
    }

    /// From the values of `nameTypes`.
    init(naming values: [[UInt8]?]) {
        precondition(values.count == Self.nameTypes.count)
        self.init(objectClass: values[0], keyType: values[1], certificateType: values[2], id: values[3], label: values[4])
    }

    /// The identity once `template` is set on the object (C_SetAttributeValue): what it sets, it is.
    func changed(by template: [Attribute]) -> ObjectIdentity {
        var values = Self.attributeTypes.map { type in template[type]?.value }
        for (index, value) in zip(values.indices, [objectClass, isToken, keyType, certificateType, id, label, modulus, ecPoint])
        where values[index] == nil {
            values[index] = value
        }
        return ObjectIdentity(reading: values)
    }

    /// The search template that finds this object on a member.
    var template: [Attribute] {
        let fields: [(CK_ATTRIBUTE_TYPE, [UInt8]?)] = [
            (CKA_CLASS, objectClass), (CKA_TOKEN, isToken), (CKA_KEY_TYPE, keyType), (CKA_CERTIFICATE_TYPE, certificateType),
            (CKA_ID, id), (CKA_LABEL, label), (CKA_MODULUS, modulus), (CKA_EC_POINT, ecPoint),
        ]
        return fields.compactMap { type, value in value.map { Attribute(type, $0) } }
    }

    package var classValue: CK_OBJECT_CLASS { objectClass.flatMap { Attribute(CKA_CLASS, $0).ulongValue } ?? CK_OBJECT_CLASS.max }
    package var isKey: Bool { classValue == CKO_SECRET_KEY || classValue == CKO_PRIVATE_KEY }

    /// p11ha's own data objects, not the application's: replication records, leases, the previous format's
    /// journals (the replication key, set up by `p11hactl domain`, is told apart by `isReplicationKey`).
    package var isInfrastructure: Bool { P11HA.isInfrastructure(objectClass: objectClass, label: label) }
    package var isReplicationKey: Bool { classValue == CKO_SECRET_KEY && id == ReplicationKey.id }

    package var description: String {
        let names: [CK_OBJECT_CLASS: String] = [CKO_DATA: "data", CKO_CERTIFICATE: "certificate", CKO_PUBLIC_KEY: "public key",
                                                CKO_PRIVATE_KEY: "private key", CKO_SECRET_KEY: "secret key"]
        let text = label.map { String(decoding: $0, as: UTF8.self) } ?? ""
        let hex = (id ?? []).map { ($0 < 16 ? "0" : "") + String($0, radix: 16) }.joined()
        return "\(names[classValue] ?? "object") label=\"\(text)\" id=\(hex)"
    }
}
