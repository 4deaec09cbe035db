// The fuzzer's calls as values: every argument (handles, buffers, templates, mechanisms) is drawn from the seed
// alone, never from what an earlier call returned, so one seed makes the same calls on p11ha and on SoftHSM
// directly. A handle is named by the step that made it and resolved against each module's own results.
import CInterop
import Glibc

/// SplitMix64: small, fast, the same on every machine.
struct FuzzRandom {
    private var state: UInt64
    init(seed: UInt64) { state = seed }

    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    mutating func below(_ n: Int) -> Int { n <= 1 ? 0 : Int(next() % UInt64(n)) }
    mutating func percent(_ p: Int) -> Bool { below(100) < p }
    mutating func pick<T>(_ items: [T]) -> T { items[below(items.count)] }
    mutating func bytes(_ n: Int) -> [UInt8] { (0..<n).map { _ in UInt8(truncatingIfNeeded: next()) } }
}

/// A handle argument: one a step made (resolved by the module's own result; 0 if that step made none), or a value.
enum HandleRef: CustomStringConvertible {
    case made(step: Int, index: Int)
    case raw(CK_ULONG)

    var description: String {
        switch self {
        case .made(let step, let index): index == 0 ? "#\(step)" : "#\(step).\(index)"
        case .raw(let value): "0x\(String(value, radix: 16))"
        }
    }
}

/// A slot argument: the slot under test (the group's, or the reference token's), or a value.
enum SlotRef: CustomStringConvertible {
    case tested
    case raw(CK_SLOT_ID)

    var description: String {
        switch self {
        case .tested: "slot"
        case .raw(let value): "slot 0x\(String(value, radix: 16))"
        }
    }
}

/// Memory for one call's arguments, freed after it.
final class Arena {
    private var blocks: [UnsafeMutableRawPointer] = []

    func zeroed(_ count: Int) -> UnsafeMutableRawPointer {
        let block = UnsafeMutableRawPointer.allocate(byteCount: max(count, 1), alignment: 16)
        block.initializeMemory(as: UInt8.self, repeating: 0, count: max(count, 1))
        blocks.append(block)
        return block
    }

    func bytes(_ data: [UInt8]) -> UnsafeMutablePointer<UInt8> {
        let block = zeroed(data.count)
        block.copyMemory(from: data, byteCount: data.count)
        return block.assumingMemoryBound(to: UInt8.self)
    }

    func value<T>(_ value: T, size: Int = MemoryLayout<T>.size) -> UnsafeMutableRawPointer {
        let block = zeroed(max(size, MemoryLayout<T>.size))
        block.storeBytes(of: value, as: T.self)
        return block
    }

    deinit { for block in blocks { block.deallocate() } }
}

/// An input buffer: data with its true length, NULL with a length, or what an earlier step wrote to its output
/// (a real signature, ciphertext or wrapped key; empty if it wrote none).
enum FuzzIn: CustomStringConvertible {
    case data([UInt8])
    case null(CK_ULONG)
    case output(of: Int)

    func make(_ arena: Arena, _ x: FuzzExecutor) -> (UnsafeMutablePointer<UInt8>?, CK_ULONG) {
        switch self {
        case .data(let bytes): return (arena.bytes(bytes), CK_ULONG(bytes.count))
        case .null(let length): return (nil, length)
        case .output(let step):
            let bytes = x.output(of: step)
            return (arena.bytes(bytes), CK_ULONG(bytes.count))
        }
    }

    var description: String {
        switch self {
        case .data(let bytes): "\(bytes.count) bytes"
        case .null(let length): "NULL/\(length)"
        case .output(let step): "output of #\(step)"
        }
    }
}

/// An output buffer and its length: a length query, no length pointer, a buffer of its true size (or claiming
/// less), or the reserved 2 GiB region claiming up to CK_ULONG max (a module writes only its output's length).
enum FuzzOut: CustomStringConvertible {
    case query(CK_ULONG)
    case noLength(withBuffer: Bool)
    case buffer(Int, claim: CK_ULONG)
    case reserved(claim: CK_ULONG)

    func run(_ arena: Arena, _ x: FuzzExecutor,
             _ body: (UnsafeMutablePointer<UInt8>?, UnsafeMutablePointer<CK_ULONG>?) -> CK_RV) -> CK_RV {
        let length = arena.value(CK_ULONG(0)).assumingMemoryBound(to: CK_ULONG.self)
        switch self {
        case .query(let initial):
            length.pointee = initial
            return body(nil, length)
        case .noLength(let withBuffer):
            return body(withBuffer ? arena.zeroed(64).assumingMemoryBound(to: UInt8.self) : nil, nil)
        case .buffer(let size, let claim):
            length.pointee = claim
            let buffer = arena.zeroed(size).assumingMemoryBound(to: UInt8.self)
            let rv = body(buffer, length)
            if rv == CKR_OK { x.recordOutput(UnsafeBufferPointer(start: buffer, count: min(size, Int(clamping: length.pointee)))) }
            return rv
        case .reserved(let claim):
            length.pointee = claim
            let rv = body(x.reserved.bytes, length)
            if rv == CKR_OK { x.recordOutput(UnsafeBufferPointer(start: x.reserved.bytes, count: min(4096, Int(clamping: length.pointee)))) }
            return rv
        }
    }

    var description: String {
        switch self {
        case .query(let initial): "NULL out (length \(initial))"
        case .noLength(let withBuffer): withBuffer ? "NULL length" : "NULL out, NULL length"
        case .buffer(let size, let claim): claim == CK_ULONG(size) ? "out \(size)" : "out \(size) claiming \(claim)"
        case .reserved(let claim): "reserved out claiming 0x\(String(claim, radix: 16))"
        }
    }
}

/// An attribute of a template to write: bytes, NULL with a length, or an attribute array (CKA_WRAP_TEMPLATE).
indirect enum AttrValue {
    case bytes([UInt8])
    case null(CK_ULONG)
    case nested([AttrSpec])
}

struct AttrSpec: CustomStringConvertible {
    var type: CK_ATTRIBUTE_TYPE
    var value: AttrValue

    func make(_ arena: Arena) -> CK_ATTRIBUTE {
        switch value {
        case .bytes(let bytes): return CK_ATTRIBUTE(type: type, pValue: UnsafeMutableRawPointer(arena.bytes(bytes)), ulValueLen: CK_ULONG(bytes.count))
        case .null(let length): return CK_ATTRIBUTE(type: type, pValue: nil, ulValueLen: length)
        case .nested(let inner):
            let array = arena.zeroed(inner.count * MemoryLayout<CK_ATTRIBUTE>.stride).assumingMemoryBound(to: CK_ATTRIBUTE.self)
            for (i, attribute) in inner.enumerated() { array[i] = attribute.make(arena) }
            return CK_ATTRIBUTE(type: type, pValue: UnsafeMutableRawPointer(array),
                                ulValueLen: CK_ULONG(inner.count * MemoryLayout<CK_ATTRIBUTE>.stride))
        }
    }

    var description: String {
        let name = "0x\(String(type, radix: 16))"
        switch value {
        case .bytes(let bytes): return "\(name):\(bytes.count)"
        case .null(let length): return "\(name):NULL/\(length)"
        case .nested(let inner): return "\(name):[\(inner.map(\.description).joined(separator: " "))]"
        }
    }
}

enum TemplateSpec: CustomStringConvertible {
    case attributes([AttrSpec])
    case null(CK_ULONG)

    func make(_ arena: Arena) -> (UnsafeMutablePointer<CK_ATTRIBUTE>?, CK_ULONG) {
        switch self {
        case .null(let count): return (nil, count)
        case .attributes(let list):
            let array = arena.zeroed(list.count * MemoryLayout<CK_ATTRIBUTE>.stride).assumingMemoryBound(to: CK_ATTRIBUTE.self)
            for (i, attribute) in list.enumerated() { array[i] = attribute.make(arena) }
            return (array, CK_ULONG(list.count))
        }
    }

    var description: String {
        switch self {
        case .null(let count): "NULL template/\(count)"
        case .attributes(let list): "{\(list.map(\.description).joined(separator: " "))}"
        }
    }
}

/// One buffer of a C_GetAttributeValue template: NULL (a length query), a buffer, the reserved region, or an
/// attribute array whose elements have buffers of their own.
indirect enum QueryBuffer: CustomStringConvertible {
    case null(CK_ULONG)
    case buffer(Int, claim: CK_ULONG)
    case reserved(claim: CK_ULONG)
    case nested([QueryBuffer])

    func make(_ arena: Arena, _ x: FuzzExecutor, type: CK_ATTRIBUTE_TYPE) -> CK_ATTRIBUTE {
        switch self {
        case .null(let length): return CK_ATTRIBUTE(type: type, pValue: nil, ulValueLen: length)
        case .buffer(let size, let claim): return CK_ATTRIBUTE(type: type, pValue: arena.zeroed(size), ulValueLen: claim)
        case .reserved(let claim): return CK_ATTRIBUTE(type: type, pValue: x.reserved.base, ulValueLen: claim)
        case .nested(let inner):
            let array = arena.zeroed(inner.count * MemoryLayout<CK_ATTRIBUTE>.stride).assumingMemoryBound(to: CK_ATTRIBUTE.self)
            for (i, element) in inner.enumerated() { array[i] = element.make(arena, x, type: 0) }
            return CK_ATTRIBUTE(type: type, pValue: UnsafeMutableRawPointer(array),
                                ulValueLen: CK_ULONG(inner.count * MemoryLayout<CK_ATTRIBUTE>.stride))
        }
    }

    var description: String {
        switch self {
        case .null(let length): "NULL/\(length)"
        case .buffer(let size, let claim): claim == CK_ULONG(size) ? "\(size)" : "\(size)~\(claim)"
        case .reserved(let claim): "reserved~0x\(String(claim, radix: 16))"
        case .nested(let inner): "[\(inner.map(\.description).joined(separator: " "))]"
        }
    }
}

enum QueriesSpec: CustomStringConvertible {
    case queries([(CK_ATTRIBUTE_TYPE, QueryBuffer)])
    case null(CK_ULONG)

    func make(_ arena: Arena, _ x: FuzzExecutor) -> (UnsafeMutablePointer<CK_ATTRIBUTE>?, CK_ULONG) {
        switch self {
        case .null(let count): return (nil, count)
        case .queries(let list):
            let array = arena.zeroed(list.count * MemoryLayout<CK_ATTRIBUTE>.stride).assumingMemoryBound(to: CK_ATTRIBUTE.self)
            for (i, (type, buffer)) in list.enumerated() { array[i] = buffer.make(arena, x, type: type) }
            return (array, CK_ULONG(list.count))
        }
    }

    var description: String {
        switch self {
        case .null(let count): "NULL template/\(count)"
        case .queries(let list): "{\(list.map { "0x\(String($0.0, radix: 16)):\($0.1)" }.joined(separator: " "))}"
        }
    }
}

/// A mechanism's parameter. Structures are written into a buffer of their size plus `sizeDelta` (the length
/// claimed), never smaller than the structure, so a wrong length is never a lie about the memory behind it.
enum ParamSpec: CustomStringConvertible {
    case none
    case null(CK_ULONG)
    case bytes([UInt8])
    case handle(HandleRef)
    case gcm(iv: FuzzIn, ivBits: CK_ULONG, aad: FuzzIn, tagBits: CK_ULONG, sizeDelta: Int)
    case oaep(hash: CK_MECHANISM_TYPE, mgf: CK_ULONG, source: CK_ULONG, data: FuzzIn, sizeDelta: Int)
    case ecdh(kdf: CK_ULONG, shared: FuzzIn, publicData: FuzzIn, sizeDelta: Int)
    case derivation(FuzzIn, sizeDelta: Int)
    case cbcEncryptData(iv: [UInt8], data: FuzzIn, sizeDelta: Int)

    func make(_ arena: Arena, _ x: FuzzExecutor) -> (UnsafeMutableRawPointer?, CK_ULONG) {
        func structure<T>(_ value: T, _ delta: Int) -> (UnsafeMutableRawPointer?, CK_ULONG) {
            let size = MemoryLayout<T>.size
            return (arena.value(value, size: size + max(delta, 0)), CK_ULONG(max(size + delta, 0)))
        }
        switch self {
        case .none: return (nil, 0)
        case .null(let length): return (nil, length)
        case .bytes(let bytes): return (UnsafeMutableRawPointer(arena.bytes(bytes)), CK_ULONG(bytes.count))
        case .handle(let ref): return structure(x.handle(ref), 0)
        case .gcm(let iv, let ivBits, let aad, let tagBits, let delta):
            let (ivp, ivn) = iv.make(arena, x)
            let (aadp, aadn) = aad.make(arena, x)
            return structure(CK_GCM_PARAMS(pIv: ivp, ulIvLen: ivn, ulIvBits: ivBits, pAAD: aadp, ulAADLen: aadn, ulTagBits: tagBits), delta)
        case .oaep(let hash, let mgf, let source, let data, let delta):
            let (p, n) = data.make(arena, x)
            return structure(CK_RSA_PKCS_OAEP_PARAMS(hashAlg: hash, mgf: mgf, source: source, pSourceData: p.map(UnsafeMutableRawPointer.init),
                                                     ulSourceDataLen: n), delta)
        case .ecdh(let kdf, let shared, let publicData, let delta):
            let (sp, sn) = shared.make(arena, x)
            let (pp, pn) = publicData.make(arena, x)
            return structure(CK_ECDH1_DERIVE_PARAMS(kdf: kdf, ulSharedDataLen: sn, pSharedData: sp, ulPublicDataLen: pn, pPublicData: pp), delta)
        case .derivation(let data, let delta):
            let (p, n) = data.make(arena, x)
            return structure(CK_KEY_DERIVATION_STRING_DATA(pData: p, ulLen: n), delta)
        case .cbcEncryptData(let iv, let data, let delta):
            let (p, n) = data.make(arena, x)
            var params = CK_AES_CBC_ENCRYPT_DATA_PARAMS()
            withUnsafeMutableBytes(of: &params.iv) { $0.copyBytes(from: iv.prefix(16)) }
            params.pData = p
            params.length = n
            return structure(params, delta)
        }
    }

    var description: String {
        switch self {
        case .none: ""
        case .null(let length): "NULL/\(length)"
        case .bytes(let bytes): "\(bytes.count) bytes"
        case .handle(let ref): "key \(ref)"
        case .gcm(let iv, let ivBits, let aad, let tagBits, let delta): "GCM(iv \(iv), ivBits \(ivBits), aad \(aad), tag \(tagBits)\(delta == 0 ? "" : ", size\(delta > 0 ? "+" : "")\(delta)"))"
        case .oaep(let hash, let mgf, let source, let data, let delta): "OAEP(0x\(String(hash, radix: 16)), mgf \(mgf), source \(source), \(data)\(delta == 0 ? "" : ", size\(delta > 0 ? "+" : "")\(delta)"))"
        case .ecdh(let kdf, let shared, let publicData, let delta): "ECDH(kdf \(kdf), shared \(shared), public \(publicData)\(delta == 0 ? "" : ", size\(delta > 0 ? "+" : "")\(delta)"))"
        case .derivation(let data, let delta): "data(\(data)\(delta == 0 ? "" : ", size\(delta > 0 ? "+" : "")\(delta)"))"
        case .cbcEncryptData(_, let data, let delta): "CBC data(\(data)\(delta == 0 ? "" : ", size\(delta > 0 ? "+" : "")\(delta)"))"
        }
    }
}

/// A mechanism argument, or NULL.
struct MechSpec: CustomStringConvertible {
    var type: CK_MECHANISM_TYPE?
    var parameter: ParamSpec = .none

    func run(_ arena: Arena, _ x: FuzzExecutor, _ body: (UnsafeMutablePointer<CK_MECHANISM>?) -> CK_RV) -> CK_RV {
        guard let type else { return body(nil) }
        let (p, n) = parameter.make(arena, x)
        let mechanism = arena.value(CK_MECHANISM(mechanism: type, pParameter: p, ulParameterLen: n))
        return body(mechanism.assumingMemoryBound(to: CK_MECHANISM.self))
    }

    var description: String {
        guard let type else { return "NULL mechanism" }
        let p = parameter.description
        return "mech 0x\(String(type, radix: 16))" + (p.isEmpty ? "" : "(\(p))")
    }
}

/// One call of an episode: its function, how a report shows it (no PIN, no value), and how to make it.
struct FuzzCall {
    let function: String
    let text: String
    /// A call the reference (SoftHSM directly) must not make: C_InitToken could initialize its free slot.
    var notOnReference = false
    let run: (FuzzExecutor, Arena) -> (CK_RV, [CK_ULONG])
}

/// A module under test, with what each step of the episode made on it.
final class FuzzExecutor {
    let m: Module
    /// The slot under test: the group's for p11ha, the reference token's for SoftHSM.
    let slot: CK_SLOT_ID
    /// Every slot of the module: a value that happens to name another (SoftHSM's free slot) is not used.
    let otherSlots: Set<CK_SLOT_ID>
    let reserved: ReservedBuffer
    private var made: [Int: [CK_ULONG]] = [:]

    init(_ m: Module, slot: CK_SLOT_ID, allSlots: [CK_SLOT_ID], reserved: ReservedBuffer) {
        self.m = m
        self.slot = slot
        self.otherSlots = Set(allSlots).subtracting([slot])
        self.reserved = reserved
    }

    func handle(_ ref: HandleRef) -> CK_ULONG {
        switch ref {
        case .raw(let value): return value
        case .made(let step, let index):
            guard let handles = made[step], !handles.isEmpty else { return 0 }
            return handles[index % handles.count]
        }
    }

    func slot(_ ref: SlotRef) -> CK_SLOT_ID {
        switch ref {
        case .tested: return slot
        case .raw(let value): return otherSlots.contains(value) ? 0xdead_beef : value
        }
    }

    private var outputs: [Int: [UInt8]] = [:]
    /// The step being made (its output is recorded under it).
    var step = 0

    func record(_ step: Int, _ handles: [CK_ULONG]) {
        if !handles.isEmpty { made[step] = handles }
    }

    func recordOutput(_ bytes: UnsafeBufferPointer<UInt8>) { outputs[step] = Array(bytes) }
    func output(of step: Int) -> [UInt8] { outputs[step] ?? [] }
}
