// Swift values for what PKCS#11 passes by pointer: attributes, mechanisms, operation outputs.
import CInterop

/// One attribute of a template, its value copied out of the caller's memory.
public struct Attribute: Sendable, Equatable {
    public var type: CK_ATTRIBUTE_TYPE
    public var value: [UInt8]
    /// For an attribute whose value is an array of attributes (`attributeArrayTypes`), the array, copied with
    /// its values (`value` is then empty): p11ha never keeps the caller's pointers inside a value.
    public var elements: [Attribute]?

    public init(_ type: CK_ATTRIBUTE_TYPE, _ value: [UInt8]) {
        self.type = type
        self.value = value
        self.elements = nil
    }

    public init(_ type: CK_ATTRIBUTE_TYPE, elements: [Attribute]) {
        self.type = type
        self.value = []
        self.elements = elements
    }

    public init(_ type: CK_ATTRIBUTE_TYPE, ulong: CK_ULONG) {
        self.init(type, withUnsafeBytes(of: ulong) { Array($0) })
    }

    public init(_ type: CK_ATTRIBUTE_TYPE, bool: Bool) {
        self.init(type, [bool ? 1 : 0])
    }

    public var ulongValue: CK_ULONG? {
        guard value.count == MemoryLayout<CK_ULONG>.size else { return nil }
        return value.withUnsafeBytes { $0.loadUnaligned(as: CK_ULONG.self) }
    }

    public var boolValue: Bool? { value.count == 1 ? value[0] != 0 : nil }
}

extension Array where Element == Attribute {
    public subscript(type: CK_ATTRIBUTE_TYPE) -> Attribute? { first { $0.type == type } }

    /// The template with `type` set to `value`, once (every earlier occurrence taken out).
    func setting(_ type: CK_ATTRIBUTE_TYPE, _ value: Bool) -> [Attribute] {
        filter { $0.type != type } + [Attribute(type, bool: value)]
    }
}

/// Attributes whose value is an array of attributes, with pointers inside (PKCS#11 marks them
/// CKF_ARRAY_ATTRIBUTE; so is CKA_ALLOWED_MECHANISMS, whose value is a flat array of mechanism types).
public let attributeArrayTypes: Set<CK_ATTRIBUTE_TYPE> = [
    CK_ATTRIBUTE_TYPE(CKA_WRAP_TEMPLATE), CK_ATTRIBUTE_TYPE(CKA_UNWRAP_TEMPLATE), CK_ATTRIBUTE_TYPE(CKA_DERIVE_TEMPLATE),
]

/// The most elements of an attribute array p11ha reads back (a template of templates holds a handful).
public let attributeArrayLimit = 64

/// A request for one attribute's value: `capacity` nil asks only for its length.
public struct AttributeQuery: Sendable, Equatable {
    public var type: CK_ATTRIBUTE_TYPE
    public var capacity: Int?
    /// For an attribute array read into the caller's array: its elements as the caller's array gives them (their
    /// types, which PKCS#11 says to ignore and SoftHSM matches, and the room of their values).
    public var elements: [AttributeQuery]?
    public init(_ type: CK_ATTRIBUTE_TYPE, capacity: Int?, elements: [AttributeQuery]? = nil) {
        self.type = type
        self.capacity = capacity
        self.elements = elements
    }
}

/// What a member answered for one attribute: its length (CK_UNAVAILABLE_INFORMATION when refused) and value.
public struct AttributeAnswer: Sendable, Equatable {
    public var length: CK_ULONG
    public var value: [UInt8]?
    /// For an attribute array: what the member wrote into each element.
    public var elements: [AttributeElement]?
    public init(length: CK_ULONG, value: [UInt8]?, elements: [AttributeElement]? = nil) {
        self.length = length
        self.value = value
        self.elements = elements
    }
}

/// One element of an attribute array as a member answered it.
public struct AttributeElement: Sendable, Equatable {
    public var type: CK_ATTRIBUTE_TYPE
    public var length: CK_ULONG
    public var value: [UInt8]?
    public init(type: CK_ATTRIBUTE_TYPE, length: CK_ULONG, value: [UInt8]?) {
        self.type = type
        self.length = length
        self.value = value
    }
}

/// A mechanism with its parameter deep-copied, so an operation can be started again later on another member.
public struct Mechanism: Sendable, Equatable {
    public enum Parameter: Sendable, Equatable {
        case none
        /// A parameter without pointers inside (IV, PSS or CTR parameters, ...).
        case bytes([UInt8])
        /// A parameter of a structure p11ha does not know, passed as the caller gave it: it may hold pointers into
        /// the caller's memory, valid only during the call that gave it, so an operation started with it is never
        /// started again on a peer after that call (`isSelfContained`).
        case opaque([UInt8])
        case gcm(iv: [UInt8], ivBits: CK_ULONG, aad: [UInt8], tagBits: CK_ULONG)
        case oaep(hashAlg: CK_MECHANISM_TYPE, mgf: CK_ULONG, source: CK_ULONG, sourceData: [UInt8])
        case ecdh(kdf: CK_ULONG, sharedData: [UInt8], publicData: [UInt8])
        case derivationString([UInt8])
        case aesCBCEncryptData(iv: [UInt8], data: [UInt8])
        case desCBCEncryptData(iv: [UInt8], data: [UInt8])
        /// CK_EDDSA_PARAMS (PKCS#11 3.0): prehash flag and context.
        case eddsa(prehash: Bool, context: [UInt8])

        /// Whether the parameter is all p11ha's own copy, so that it can be given again after the caller's call.
        public var isSelfContained: Bool {
            if case .opaque = self { return false }
            return true
        }
    }

    public var type: CK_MECHANISM_TYPE
    public var parameter: Parameter

    public init(_ type: CK_MECHANISM_TYPE, _ parameter: Parameter = .none) {
        self.type = type
        self.parameter = parameter
    }
}

/// The result of a call that fills a caller's buffer, following PKCS#11's two-call convention.
public enum Output: Sendable, Equatable {
    /// The caller passed no buffer: only the length is returned; the operation stays active.
    case length(Int)
    /// The caller's buffer was large enough: here is the data.
    case data([UInt8])

    public var bytes: [UInt8]? {
        if case .data(let d) = self { return d }
        return nil
    }
}

/// The PKCS#11 operation kinds a session can have in progress, one of each at a time.
public enum OperationKind: Int, Sendable, CaseIterable {
    case encrypt, decrypt, digest, sign, verify, signRecover, verifyRecover
}

/// Pads or truncates a string into a blank-padded PKCS#11 character field.
public func paddedField(_ text: String, length: Int) -> [UInt8] {
    var bytes = Array(text.utf8.prefix(length))
    bytes.append(contentsOf: repeatElement(0x20, count: length - bytes.count))
    return bytes
}

/// Reads a blank-padded PKCS#11 character field back into a string.
public func fieldString<T>(_ field: T) -> String {
    withUnsafeBytes(of: field) { raw in
        var bytes = Array(raw)
        while let last = bytes.last, last == 0x20 || last == 0 { bytes.removeLast() }
        return String(decoding: bytes, as: UTF8.self)
    }
}

/// `value`'s bytes, most significant first: the order of p11ha's own encodings (records, identities, saved states).
package func bigEndianBytes<T: FixedWidthInteger>(_ value: T) -> [UInt8] { withUnsafeBytes(of: value.bigEndian) { Array($0) } }

/// The integer that `bytes` hold, most significant first (the inverse of `bigEndianBytes`).
package func bigEndianValue<T: FixedWidthInteger>(_ bytes: some Collection<UInt8>) -> T { bytes.reduce(0) { $0 << 8 | T($1) } }
