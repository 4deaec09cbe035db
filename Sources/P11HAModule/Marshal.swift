// Turning the caller's pointers into Swift values and results back into the caller's buffers, with the
// specification's codes for bad input. Nothing here decides anything about members.
import CInterop
import P11HA

typealias Bytes = UnsafeMutablePointer<UInt8>
typealias ULongPtr = UnsafeMutablePointer<CK_ULONG>
typealias AttributePtr = UnsafeMutablePointer<CK_ATTRIBUTE>
typealias MechanismPtr = UnsafeMutablePointer<CK_MECHANISM>

let CKR_OK_RV = CK_RV(CKR_OK)

/// Runs an entry point's body and turns its error into the CK_RV the caller gets.
@inline(__always)
func entry(_ body: () throws(P11Error) -> Void) -> CK_RV {
    do {
        try body()
        return CKR_OK_RV
    } catch {
        return error.rv
    }
}

/// The runtime, or CKR_CRYPTOKI_NOT_INITIALIZED.
@inline(__always)
func runtime() throws(P11Error) -> Runtime { try Library.runtime() }

/// A caller's length as a Swift Int; lengths past what memory can hold are the caller's error.
@inline(__always)
func length(_ value: CK_ULONG) throws(P11Error) -> Int {
    guard let n = Int(exactly: value), n <= Int(Int32.max) else { throw P11Error.argumentsBad }
    return n
}

/// Converts a session call's other arguments. When one is bad, a session handle that is bad too is named first, as
/// a token checks the session before the rest (SoftHSM does): CKR_SESSION_HANDLE_INVALID is in every such
/// function's list, where the argument's own code may not be (C_EncryptInit lists no CKR_ARGUMENTS_BAD).
func arguments<T>(_ rt: Runtime, _ session: CK_SESSION_HANDLE, _ convert: () throws(P11Error) -> T) throws(P11Error) -> T {
    do {
        return try convert()
    } catch {
        _ = try rt.sessionInfo(SessionHandle(session))
        throw error
    }
}

/// The room a caller claims for an output buffer or list. Claims past 2 GiB count as 2 GiB (no token writes
/// that much into one buffer); p11ha's own buffers follow what the member answers, never the claim.
@inline(__always)
func room(_ claimed: CK_ULONG) -> Int { Int(min(claimed, CK_ULONG(Int32.max))) }

/// Copies an input buffer; NULL is allowed only with length 0.
func input(_ pointer: Bytes?, _ count: CK_ULONG) throws(P11Error) -> [UInt8] {
    let n = try length(count)
    if n == 0 { return [] }
    guard let pointer else { throw P11Error.argumentsBad }
    return Array(UnsafeBufferPointer(start: pointer, count: n))
}

func required<T>(_ pointer: UnsafeMutablePointer<T>?) throws(P11Error) -> UnsafeMutablePointer<T> {
    guard let pointer else { throw P11Error.argumentsBad }
    return pointer
}

/// Copies a template's attributes (values included; an attribute array's elements with theirs, so that no
/// pointer into the caller's memory outlives the call).
func template(_ pointer: AttributePtr?, _ count: CK_ULONG, nested: Bool = true) throws(P11Error) -> [Attribute] {
    let n = try length(count)
    if n == 0 { return [] }
    guard let pointer else { throw P11Error.argumentsBad }
    var attributes: [Attribute] = []
    attributes.reserveCapacity(n)
    for attribute in UnsafeBufferPointer(start: pointer, count: n) {
        let size = try length(attribute.ulValueLen)
        if size == 0 {
            attributes.append(Attribute(attribute.type, []))
            continue
        }
        guard let value = attribute.pValue else { throw P11Error.argumentsBad }
        let stride = MemoryLayout<CK_ATTRIBUTE>.stride
        if nested && attributeArrayTypes.contains(attribute.type) && size % stride == 0 {
            let elements = value.bindMemory(to: CK_ATTRIBUTE.self, capacity: size / stride)
            attributes.append(Attribute(attribute.type, elements: try template(elements, CK_ULONG(size / stride), nested: false)))
            continue
        }
        attributes.append(Attribute(attribute.type, Array(UnsafeRawBufferPointer(start: value, count: size))))
    }
    return attributes
}

/// The capacity of an output buffer: nil when the caller only asks for the length.
func capacity(_ buffer: Bytes?, _ length: ULongPtr?) throws(P11Error) -> Int? {
    let length = try required(length)
    guard buffer != nil else { return nil }
    return room(length.pointee)
}

/// Runs a call that fills an output buffer, and writes its result or needed length back.
func produce(_ buffer: Bytes?, _ length: ULongPtr?, _ body: (Int?) throws(P11Error) -> Output) throws(P11Error) {
    let room = try capacity(buffer, length)
    let output: Output
    do {
        output = try body(room)
    } catch {
        if let needed = error.neededLength { length!.pointee = CK_ULONG(needed) }
        throw error
    }
    switch output {
    case .length(let n):
        length!.pointee = CK_ULONG(n)
    case .data(let bytes):
        if !bytes.isEmpty { buffer!.update(from: bytes, count: min(bytes.count, room ?? 0)) }
        length!.pointee = CK_ULONG(bytes.count)
    }
}

/// Fills a caller's array by PKCS#11's two-call convention (slot lists, mechanism lists).
func fillList<T>(_ items: [T], _ buffer: UnsafeMutablePointer<T>?, _ count: ULongPtr?) throws(P11Error) {
    let count = try required(count)
    defer { count.pointee = CK_ULONG(items.count) }
    guard let buffer else { return }
    guard room(count.pointee) >= items.count else { throw P11Error(CK_RV(CKR_BUFFER_TOO_SMALL)) }
    buffer.update(from: items, count: items.count)
}

/// A PIN as a Secret; NULL with length 0 means the protected authentication path.
func secret(_ pointer: Bytes?, _ count: CK_ULONG) throws(P11Error) -> Secret? {
    let n = try length(count)
    guard let pointer else {
        if n == 0 { return nil }
        throw P11Error.argumentsBad
    }
    return Secret(copying: UnsafeRawBufferPointer(start: pointer, count: n))
}

/// Copies a mechanism and its parameter, following the pointers of the parameter structures p11ha knows.
func mechanism(_ pointer: MechanismPtr?) throws(P11Error) -> Mechanism {
    let m = try required(pointer).pointee
    let size = try length(m.ulParameterLen)
    guard size > 0 else { return Mechanism(m.mechanism) }
    // A parameter that is not there is a bad parameter (every function taking a mechanism lists
    // CKR_MECHANISM_PARAM_INVALID; C_EncryptInit lists no CKR_ARGUMENTS_BAD).
    guard let raw = m.pParameter else { throw P11Error.mechanismParamInvalid }
    // A parameter whose length is not its structure's is passed as given (`.opaque`): the member answers it as it
    // answers it directly (SoftHSM ignores EdDSA's, and answers CKR_ARGUMENTS_BAD to a short OAEP one).
    func asGiven() -> Mechanism { Mechanism(m.mechanism, .opaque(Array(UnsafeRawBufferPointer(start: raw, count: size)))) }
    func load<P>(_ type: P.Type) -> P? {
        guard size == MemoryLayout<P>.size else { return nil }
        return raw.loadUnaligned(as: P.self)
    }
    func copy(_ p: UnsafeMutablePointer<UInt8>?, _ n: CK_ULONG) throws(P11Error) -> [UInt8] {
        let count = try length(n)
        if count == 0 { return [] }
        guard let p else { throw P11Error.mechanismParamInvalid }
        return Array(UnsafeBufferPointer(start: p, count: count))
    }
    switch m.mechanism {
    case CK_MECHANISM_TYPE(CKM_AES_GCM):
        guard let p = load(CK_GCM_PARAMS.self) else { return asGiven() }
        return Mechanism(m.mechanism, .gcm(iv: try copy(p.pIv, p.ulIvLen), ivBits: p.ulIvBits,
                                           aad: try copy(p.pAAD, p.ulAADLen), tagBits: p.ulTagBits))
    case CK_MECHANISM_TYPE(CKM_RSA_PKCS_OAEP):
        guard let p = load(CK_RSA_PKCS_OAEP_PARAMS.self) else { return asGiven() }
        let data = try copy(p.pSourceData?.assumingMemoryBound(to: UInt8.self), p.ulSourceDataLen)
        return Mechanism(m.mechanism, .oaep(hashAlg: p.hashAlg, mgf: p.mgf, source: p.source, sourceData: data))
    case CK_MECHANISM_TYPE(CKM_ECDH1_DERIVE), CK_MECHANISM_TYPE(CKM_ECDH1_COFACTOR_DERIVE):
        guard let p = load(CK_ECDH1_DERIVE_PARAMS.self) else { return asGiven() }
        return Mechanism(m.mechanism, .ecdh(kdf: p.kdf, sharedData: try copy(p.pSharedData, p.ulSharedDataLen),
                                            publicData: try copy(p.pPublicData, p.ulPublicDataLen)))
    case CK_MECHANISM_TYPE(CKM_CONCATENATE_BASE_AND_DATA), CK_MECHANISM_TYPE(CKM_CONCATENATE_DATA_AND_BASE),
         CK_MECHANISM_TYPE(CKM_XOR_BASE_AND_DATA), CK_MECHANISM_TYPE(CKM_AES_ECB_ENCRYPT_DATA),
         CK_MECHANISM_TYPE(CKM_DES_ECB_ENCRYPT_DATA), CK_MECHANISM_TYPE(CKM_DES3_ECB_ENCRYPT_DATA):
        guard let p = load(CK_KEY_DERIVATION_STRING_DATA.self) else { return asGiven() }
        return Mechanism(m.mechanism, .derivationString(try copy(p.pData, p.ulLen)))
    case CK_MECHANISM_TYPE(CKM_AES_CBC_ENCRYPT_DATA):
        guard let p = load(CK_AES_CBC_ENCRYPT_DATA_PARAMS.self) else { return asGiven() }
        let iv = withUnsafeBytes(of: p.iv) { Array($0) }
        return Mechanism(m.mechanism, .aesCBCEncryptData(iv: iv, data: try copy(p.pData, p.length)))
    case CK_MECHANISM_TYPE(CKM_DES_CBC_ENCRYPT_DATA), CK_MECHANISM_TYPE(CKM_DES3_CBC_ENCRYPT_DATA):
        guard let p = load(CK_DES_CBC_ENCRYPT_DATA_PARAMS.self) else { return asGiven() }
        let iv = withUnsafeBytes(of: p.iv) { Array($0) }
        return Mechanism(m.mechanism, .desCBCEncryptData(iv: iv, data: try copy(p.pData, p.length)))
    case CK_MECHANISM_TYPE(CKM_EDDSA):
        guard let p = load(CK_EDDSA_PARAMS.self) else { return asGiven() }
        return Mechanism(m.mechanism, .eddsa(prehash: p.phFlag != 0, context: try copy(p.pContextData, p.ulContextDataLen)))
    case CK_MECHANISM_TYPE(CKM_CONCATENATE_BASE_AND_KEY):
        // Its parameter is an object handle, which differs per member: not supported.
        throw P11Error(CK_RV(CKR_MECHANISM_INVALID))
    default:
        return pointerFree.contains(m.mechanism) ? Mechanism(m.mechanism, .bytes(Array(UnsafeRawBufferPointer(start: raw, count: size)))) : asGiven()
    }
}

/// Mechanisms whose parameter is plain bytes, with no pointer inside: an IV, CK_AES_CTR_PARAMS, CK_RSA_PKCS_PSS_PARAMS,
/// a DH public value, a MAC length (CK_MAC_GENERAL_PARAMS), CK_EXTRACT_PARAMS. Any other parameter that p11ha does not
/// read field by field above is passed as given, and its operation is not started again after the call (`.opaque`).
private let pointerFree: Set<CK_MECHANISM_TYPE> = Set([
    CKM_AES_CBC, CKM_AES_CBC_PAD, CKM_AES_CTR, CKM_AES_OFB, CKM_AES_CFB8, CKM_AES_CFB64, CKM_AES_CFB128,
    CKM_AES_KEY_WRAP, CKM_AES_KEY_WRAP_PAD, CKM_AES_MAC_GENERAL, CKM_AES_CMAC_GENERAL,
    CKM_DES_CBC, CKM_DES_CBC_PAD, CKM_DES3_CBC, CKM_DES3_CBC_PAD, CKM_DES3_MAC_GENERAL, CKM_DES3_CMAC_GENERAL,
    CKM_RSA_PKCS_PSS, CKM_SHA1_RSA_PKCS_PSS, CKM_SHA224_RSA_PKCS_PSS, CKM_SHA256_RSA_PKCS_PSS, CKM_SHA384_RSA_PKCS_PSS,
    CKM_SHA512_RSA_PKCS_PSS, CKM_DH_PKCS_DERIVE, CKM_EXTRACT_KEY_FROM_KEY,
    CKM_MD5_HMAC_GENERAL, CKM_SHA_1_HMAC_GENERAL, CKM_SHA224_HMAC_GENERAL, CKM_SHA256_HMAC_GENERAL,
    CKM_SHA384_HMAC_GENERAL, CKM_SHA512_HMAC_GENERAL,
].map { CK_MECHANISM_TYPE($0) })
