// The episode a seed makes: a prologue (initialize, a session, login, a key of each kind), then random calls and
// short flows (init, updates, final; sign then verify; find) with valid, boundary, NULL and wrong arguments, in
// whatever state the earlier calls left: after logout, closed sessions, finalize, operations left active.
import CInterop
import Glibc

/// The keys the prologue makes, by the step and index that made them.
struct FuzzKeys {
    let ecPublic = HandleRef.made(step: 3, index: 0)
    let ecPrivate = HandleRef.made(step: 3, index: 1)
    let rsaPublic = HandleRef.made(step: 4, index: 0)
    let rsaPrivate = HandleRef.made(step: 4, index: 1)
    let aes = HandleRef.made(step: 5, index: 0)
    let hmac = HandleRef.made(step: 6, index: 0)
    let data = HandleRef.made(step: 7, index: 0)
    var all: [HandleRef] { [ecPublic, ecPrivate, rsaPublic, rsaPrivate, aes, hmac, data] }
}

/// P-256's generator point: a valid public point (raw, and as the DER OCTET STRING of CKA_EC_POINT).
let p256Generator: [UInt8] = [0x04] + hexBytes("6B17D1F2E12C4247F8BCE6E563A440F277037D812DEB33A0F4A13945D898C296")
    + hexBytes("4FE342E2FE1A7F9B8EE7EB4A7C0F9E162BCE33576B315ECECBB6406837BF51F5")
let p256GeneratorDER: [UInt8] = [0x04, 0x41] + p256Generator

func hexBytes(_ text: String) -> [UInt8] {
    var bytes: [UInt8] = []
    var index = text.startIndex
    while index < text.endIndex {
        let next = text.index(index, offsetBy: 2)
        bytes.append(UInt8(text[index..<next], radix: 16)!)
        index = next
    }
    return bytes
}

func ulongBytes(_ value: CK_ULONG) -> [UInt8] { withUnsafeBytes(of: value) { Array($0) } }

struct FuzzEpisode {
    private(set) var calls: [FuzzCall] = []
    private var r: FuzzRandom
    private let keys = FuzzKeys()
    private let userPIN: [UInt8]
    private let soPIN: [UInt8]
    /// The session most calls use; every session opened so far (closed ones stay: stale handles).
    private var main = HandleRef.made(step: 1, index: 0)
    private var sessions: [HandleRef] = []
    /// Objects made after the prologue, and steps whose output later calls may take as input.
    private var objects: [HandleRef] = []
    private var outputs: [Int] = []

    /// `focus` names a function to call more often: a draw after the prologue that makes no call of it is drawn
    /// again, 9 times in 10 (the episode stays what its seed and focus make).
    init(seed: UInt64, steps: Int, userPIN: String, soPIN: String, focus: String? = nil) {
        r = FuzzRandom(seed: seed)
        self.userPIN = Array(userPIN.utf8)
        self.soPIN = Array(soPIN.utf8)
        prologue()
        while calls.count < steps { if let focus { next(focus: focus) } else { next() } }
    }

    private mutating func next(focus: String) {
        let before = self
        next()
        if !calls[before.calls.count...].contains(where: { $0.function == focus }) && r.percent(90) {
            let random = r
            self = before
            r = random
        }
    }

    // MARK: prologue

    private mutating func prologue() {
        add(initialize(args: .none))
        add(openSession(.tested, flags: CK_FLAGS(CKF_SERIAL_SESSION | CKF_RW_SESSION)))
        sessions.append(main)
        add(login(main, CK_USER_TYPE(CKU_USER), .data(userPIN), pinText: "the user PIN"))
        add(generateKeyPair(main, MechSpec(type: CK_MECHANISM_TYPE(CKM_EC_KEY_PAIR_GEN)),
                            .attributes([bytes(CKA_EC_PARAMS, p256), bool(CKA_VERIFY, true), bool(CKA_TOKEN, false), text(CKA_LABEL, "fuzz-ec")]),
                            .attributes([bool(CKA_SIGN, true), bool(CKA_DERIVE, true), bool(CKA_TOKEN, false), bool(CKA_PRIVATE, true),
                                         bool(CKA_SENSITIVE, true), text(CKA_LABEL, "fuzz-ec")])))
        add(generateKeyPair(main, MechSpec(type: CK_MECHANISM_TYPE(CKM_RSA_PKCS_KEY_PAIR_GEN)),
                            .attributes([ulong(CKA_MODULUS_BITS, 1024), bytes(CKA_PUBLIC_EXPONENT, [1, 0, 1]), bool(CKA_VERIFY, true),
                                         bool(CKA_ENCRYPT, true), bool(CKA_WRAP, true), bool(CKA_VERIFY_RECOVER, true), bool(CKA_TOKEN, false)]),
                            .attributes([bool(CKA_SIGN, true), bool(CKA_DECRYPT, true), bool(CKA_UNWRAP, true), bool(CKA_SIGN_RECOVER, true),
                                         bool(CKA_TOKEN, false), bool(CKA_PRIVATE, true), bool(CKA_SENSITIVE, true)])))
        add(createObject(main, .attributes(secretKey(CKK_AES, value: r.bytes(32), token: false))))
        add(createObject(main, .attributes(secretKey(CKK_GENERIC_SECRET, value: r.bytes(32), token: false))))
        add(createObject(main, .attributes([ulong(CKA_CLASS, CKO_DATA), bool(CKA_TOKEN, false), text(CKA_LABEL, "fuzz-data"),
                                            bytes(CKA_VALUE, r.bytes(40))])))
        let readOnly = HandleRef.made(step: calls.count, index: 0)
        add(openSession(.tested, flags: CK_FLAGS(CKF_SERIAL_SESSION)))
        sessions.append(readOnly)
    }

    // MARK: what comes next

    private mutating func next() {
        switch r.below(100) {
        case 0..<34: operationFlow()
        case 34..<44: findFlow()
        case 44..<56: objectCall()
        case 56..<64: keyCall()
        case 64..<70: stateChange()
        default: singleCall()
        }
    }

    private mutating func add(_ call: FuzzCall) { calls.append(call) }
    private var step: Int { calls.count }

    /// An unrelated call in the middle of a flow, now and then.
    private mutating func maybeInterleave() {
        if r.percent(8) { singleCall() }
    }

    /// Makes a new main session, logged in (after the old one was closed or the library finalized).
    private mutating func reestablish(initialize: Bool) {
        if initialize { add(self.initialize(args: r.percent(80) ? .none : .osLocking)) }
        main = .made(step: step, index: 0)
        sessions.append(main)
        add(openSession(.tested, flags: CK_FLAGS(CKF_SERIAL_SESSION | CKF_RW_SESSION)))
        add(login(main, CK_USER_TYPE(CKU_USER), .data(userPIN), pinText: "the user PIN"))
    }

    // MARK: argument choices

    private mutating func session() -> HandleRef {
        switch r.below(100) {
        case 0..<78: return main
        case 78..<92: return r.pick(sessions)
        default: return .raw(r.pick([0, 1, 2, 3, 17, 0x7fff_ffff, 0x8000_0000, CK_ULONG.max]))
        }
    }

    private mutating func slot() -> SlotRef {
        r.percent(85) ? .tested : .raw(r.pick([0, 1, 7, 42, 0x7fff_ffff, CK_ULONG.max]))
    }

    /// A key: usually one of `preferred`, sometimes any object, a made one, or a value.
    private mutating func key(_ preferred: [HandleRef]) -> HandleRef {
        switch r.below(100) {
        case 0..<75: return r.pick(preferred)
        case 75..<83: return r.pick(keys.all)
        case 83..<91 where !objects.isEmpty: return r.pick(objects)
        // Small values are other objects' handles: p11ha numbers objects from 1 (the prologue makes 1 to 7, the first
        // search gives p11ha's own objects the next ones).
        default: return .raw(r.pick([0, 1, 2, 3, 5, 8, 9, 10, 11, 13, 21, 0x7fff_ffff, 0x8000_0000, CK_ULONG.max]))
        }
    }

    private mutating func object() -> HandleRef {
        if !objects.isEmpty && r.percent(55) { return r.pick(objects) }
        return key(keys.all)
    }

    private mutating func data(_ sizes: [Int] = [0, 1, 15, 16, 17, 20, 31, 32, 33, 48, 64, 100, 128, 255, 256, 512, 1000, 4096]) -> FuzzIn {
        switch r.below(100) {
        case 0..<5: return .null(r.pick([0, 1, 32, 0x8000_0000, CK_ULONG.max]))
        case 5..<7: return .data(r.bytes(70_000))
        default: return .data(r.bytes(r.pick(sizes)))
        }
    }

    private mutating func out() -> FuzzOut {
        let sizes = [0, 1, 7, 8, 15, 16, 20, 31, 32, 33, 48, 63, 64, 65, 127, 128, 255, 256, 257, 512, 1024, 4096]
        switch r.below(100) {
        case 0..<22: return .query(r.pick([0, 5, CK_ULONG.max]))
        case 22..<26: return .noLength(withBuffer: r.percent(50))
        case 26..<38: return .reserved(claim: r.pick([0x1_0001, 0x7fff_ffff, 0x8000_0000, 0xffff_ffff, CK_ULONG.max]))
        case 38..<46:
            let size = r.pick(sizes)
            return .buffer(size, claim: CK_ULONG(r.below(size + 1)))
        default:
            let size = r.pick(sizes)
            return .buffer(size, claim: CK_ULONG(size))
        }
    }

    // MARK: templates

    private func bool(_ type: CK_ULONG, _ value: Bool) -> AttrSpec { AttrSpec(type: type, value: .bytes([value ? 1 : 0])) }
    private func ulong(_ type: CK_ULONG, _ value: CK_ULONG) -> AttrSpec { AttrSpec(type: type, value: .bytes(ulongBytes(value))) }
    private func bytes(_ type: CK_ULONG, _ value: [UInt8]) -> AttrSpec { AttrSpec(type: type, value: .bytes(value)) }
    private func text(_ type: CK_ULONG, _ value: String) -> AttrSpec { AttrSpec(type: type, value: .bytes(Array(value.utf8))) }

    private func secretKey(_ keyType: CK_ULONG, value: [UInt8], token: Bool) -> [AttrSpec] {
        [ulong(CKA_CLASS, CKO_SECRET_KEY), ulong(CKA_KEY_TYPE, keyType), bytes(CKA_VALUE, value), bool(CKA_TOKEN, token),
         bool(CKA_ENCRYPT, true), bool(CKA_DECRYPT, true), bool(CKA_SIGN, true), bool(CKA_VERIFY, true), bool(CKA_WRAP, true),
         bool(CKA_UNWRAP, true), bool(CKA_DERIVE, true), bool(CKA_EXTRACTABLE, true), text(CKA_LABEL, "fuzz-secret")]
    }

    /// Attribute types a template may carry. Never CKA_DESTROYABLE: an object that cannot be destroyed would
    /// outlive the episode and change the next one's start.
    private static let attributeTypes: [CK_ULONG] = [
        CKA_CLASS, CKA_TOKEN, CKA_PRIVATE, CKA_LABEL, CKA_APPLICATION, CKA_VALUE, CKA_OBJECT_ID, CKA_CERTIFICATE_TYPE,
        CKA_ISSUER, CKA_SERIAL_NUMBER, CKA_KEY_TYPE, CKA_SUBJECT, CKA_ID, CKA_SENSITIVE, CKA_ENCRYPT, CKA_DECRYPT, CKA_WRAP,
        CKA_UNWRAP, CKA_SIGN, CKA_SIGN_RECOVER, CKA_VERIFY, CKA_VERIFY_RECOVER, CKA_DERIVE, CKA_START_DATE, CKA_END_DATE,
        CKA_MODULUS, CKA_MODULUS_BITS, CKA_PUBLIC_EXPONENT, CKA_PRIVATE_EXPONENT, CKA_PRIME_1, CKA_VALUE_LEN,
        CKA_EXTRACTABLE, CKA_LOCAL, CKA_NEVER_EXTRACTABLE, CKA_ALWAYS_SENSITIVE, CKA_KEY_GEN_MECHANISM, CKA_MODIFIABLE,
        CKA_COPYABLE, CKA_EC_PARAMS, CKA_EC_POINT, CKA_ALWAYS_AUTHENTICATE, CKA_WRAP_WITH_TRUSTED, CKA_TRUSTED,
        CKA_CHECK_VALUE, CKA_WRAP_TEMPLATE, CKA_UNWRAP_TEMPLATE, CKA_ALLOWED_MECHANISMS, 0x8000_0001, 0x7fff_ffff, 0xffff,
        CK_ULONG.max,
    ]
    private static let boolTypes: Set<CK_ULONG> = [CKA_TOKEN, CKA_PRIVATE, CKA_SENSITIVE, CKA_ENCRYPT, CKA_DECRYPT, CKA_WRAP,
        CKA_UNWRAP, CKA_SIGN, CKA_SIGN_RECOVER, CKA_VERIFY, CKA_VERIFY_RECOVER, CKA_DERIVE, CKA_EXTRACTABLE, CKA_LOCAL,
        CKA_MODIFIABLE, CKA_COPYABLE, CKA_ALWAYS_AUTHENTICATE, CKA_WRAP_WITH_TRUSTED, CKA_TRUSTED]
    private static let ulongTypes: Set<CK_ULONG> = [CKA_CLASS, CKA_KEY_TYPE, CKA_CERTIFICATE_TYPE, CKA_MODULUS_BITS, CKA_VALUE_LEN,
        CKA_KEY_GEN_MECHANISM]

    /// A value for an attribute: of its type's shape mostly, sometimes of a wrong length, NULL, or nested.
    /// CKA_EC_POINT is always a point: SoftHSM 2.6.1 takes any bytes there and then crashes the process in
    /// C_VerifyInit of the key (SoftHSM directly too; seed 17773813388405568512 before this), a member's bug p11ha
    /// cannot see without checking curve points itself.
    private mutating func value(for type: CK_ULONG, depth: Int = 0) -> AttrValue {
        if type == CKA_EC_POINT { return .bytes(p256GeneratorDER) }
        if r.percent(4) { return .null(r.pick([0, 1, 8, 0x8000_0000])) }
        if (type == CKA_WRAP_TEMPLATE || type == CKA_UNWRAP_TEMPLATE) && depth == 0 && r.percent(80) {
            return .nested((0..<r.below(4)).map { _ in randomAttribute(depth: depth + 1) })
        }
        if r.percent(8) { return .bytes(r.bytes(r.pick([0, 2, 3, 9, 33]))) }
        if Self.boolTypes.contains(type) { return .bytes([r.percent(50) ? 1 : 0]) }
        if Self.ulongTypes.contains(type) {
            return .bytes(ulongBytes(r.pick([0, 1, 2, 3, 4, 16, 24, 32, 1024, CKO_DATA, CKO_SECRET_KEY, CKK_AES, 0x8000_0000, CK_ULONG.max])))
        }
        switch type {
        case CKA_LABEL, CKA_APPLICATION: return .bytes(Array(r.pick(["fuzz-a", "fuzz-b", "", String(repeating: "l", count: 300)]).utf8))
        case CKA_EC_PARAMS: return .bytes(r.pick([p256, [0x06, 0x03, 0x2b, 0x81, 0x04], r.bytes(10)]))
        case CKA_ALLOWED_MECHANISMS: return .bytes(ulongBytes(CKM_ECDSA) + ulongBytes(CKM_AES_ECB))
        default: return .bytes(r.bytes(r.pick([0, 1, 8, 16, 32, 64])))
        }
    }

    private mutating func randomAttribute(depth: Int = 0) -> AttrSpec {
        let type = r.pick(Self.attributeTypes)
        return AttrSpec(type: type, value: value(for: type, depth: depth))
    }

    /// A template to create an object: one of a real kind, sometimes altered, sometimes random, sometimes NULL.
    /// A token object's template is never altered: SoftHSM 2.6.1 keeps, on the token, the half-made object of a
    /// C_CreateObject it refuses, and a later search there can answer CKR_GENERAL_ERROR (p11ha's journal then marks
    /// that member stale and cannot bring it back: fuzzer seed 11310652665734998615; a member's bug, see the report).
    private mutating func objectTemplate() -> TemplateSpec {
        if r.percent(4) { return .null(r.pick([0, 1, 3])) }
        var attributes: [AttrSpec]
        let token = r.percent(20)
        if token {
            switch r.below(3) {
            case 0: return .attributes([ulong(CKA_CLASS, CKO_DATA), bool(CKA_TOKEN, true), text(CKA_LABEL, "fuzz-data"), bytes(CKA_VALUE, r.bytes(r.below(100)))])
            case 1: return .attributes(secretKey(CKK_AES, value: r.bytes(r.pick([16, 24, 32])), token: true))
            default: return .attributes(secretKey(CKK_GENERIC_SECRET, value: r.bytes(32), token: true))
            }
        }
        switch r.below(6) {
        case 0: attributes = [ulong(CKA_CLASS, CKO_DATA), bool(CKA_TOKEN, token), text(CKA_LABEL, "fuzz-data"), bytes(CKA_VALUE, r.bytes(r.below(100)))]
        case 1: attributes = secretKey(CKK_AES, value: r.bytes(r.pick([16, 24, 32, 7])), token: token)
        case 2: attributes = secretKey(CKK_GENERIC_SECRET, value: r.bytes(r.pick([1, 16, 32, 64])), token: token)
        case 3: attributes = [ulong(CKA_CLASS, CKO_PUBLIC_KEY), ulong(CKA_KEY_TYPE, CKK_EC), bytes(CKA_EC_PARAMS, p256),
                              bytes(CKA_EC_POINT, p256GeneratorDER), bool(CKA_VERIFY, true), bool(CKA_TOKEN, token)]
        case 4: attributes = [ulong(CKA_CLASS, CKO_CERTIFICATE), ulong(CKA_CERTIFICATE_TYPE, CKC_X_509), bool(CKA_TOKEN, token),
                              bytes(CKA_SUBJECT, r.bytes(20)), bytes(CKA_VALUE, r.bytes(100))]
        default: attributes = (0..<r.below(6)).map { _ in randomAttribute() }
        }
        if r.percent(25) { attributes.append(randomAttribute()) }
        if r.percent(10) && !attributes.isEmpty { attributes.remove(at: r.below(attributes.count)) }
        if r.percent(10) && !attributes.isEmpty {
            let i = r.below(attributes.count)
            attributes[i].value = value(for: attributes[i].type)
        }
        if r.percent(10) { attributes.append(bool(CKA_PRIVATE, r.percent(50))) }
        return .attributes(attributes)
    }

    /// A template for an attribute change or a copy: a few attributes, some harmless; never CKA_TOKEN true (a
    /// refused copy to a token object leaves SoftHSM's half-made object on the token, as a refused create does).
    private mutating func changeTemplate() -> TemplateSpec {
        if r.percent(4) { return .null(r.pick([0, 2])) }
        return .attributes((0..<(1 + r.below(3))).map { _ in
            r.percent(40) ? text(CKA_LABEL, r.pick(["fuzz-a", "fuzz-b"])) : randomAttribute()
        }.map { $0.type == CKA_TOKEN ? bool(CKA_TOKEN, false) : $0 })
    }

    /// A search template: empty (every object), by class, label or token, or random.
    private mutating func searchTemplate() -> TemplateSpec {
        switch r.below(8) {
        case 0, 1: return .attributes([])
        case 2: return .attributes([ulong(CKA_CLASS, r.pick([CKO_DATA, CKO_SECRET_KEY, CKO_PUBLIC_KEY, CKO_PRIVATE_KEY]))])
        case 3: return .attributes([text(CKA_LABEL, r.pick(["fuzz-a", "fuzz-b", "fuzz-ec", "fuzz-secret", "p11ha journal"]))])
        case 4: return .attributes([bool(CKA_TOKEN, r.percent(50))])
        case 5: return .null(r.pick([0, 1]))
        default: return .attributes((0..<r.below(3)).map { _ in randomAttribute() })
        }
    }

    /// What C_GetAttributeValue asks: a few types, each with a length query, a buffer, a claim or an array.
    private mutating func queries() -> QueriesSpec {
        if r.percent(4) { return .null(r.pick([0, 1, 2])) }
        if r.percent(3) { return .queries([]) }
        return .queries((0..<(1 + r.below(4))).map { _ in
            let type = r.percent(15) ? r.pick([CKA_WRAP_TEMPLATE, CKA_UNWRAP_TEMPLATE]) : r.pick(Self.attributeTypes)
            return (type, queryBuffer(array: type == CKA_WRAP_TEMPLATE || type == CKA_UNWRAP_TEMPLATE))
        })
    }

    /// An attribute array's buffer is an array of attributes whose pointers the module follows: never the reserved
    /// region, which holds earlier outputs (garbage pointers are the caller's undefined behaviour, for any module).
    private mutating func queryBuffer(array: Bool) -> QueryBuffer {
        if array {
            if r.percent(60) {
                return .nested((0..<r.below(4)).map { _ in r.percent(50) ? .null(0) : .buffer(r.pick([0, 1, 8, 64]), claim: CK_ULONG(r.pick([0, 1, 8]))) })
            }
            return r.percent(50) ? .null(r.pick([0, 7, CK_ULONG.max])) : .buffer(48, claim: CK_ULONG(r.pick([0, 24, 48])))
        }
        switch r.below(100) {
        case 0..<35: return .null(r.pick([0, 7, CK_ULONG.max]))
        case 35..<50: return .reserved(claim: r.pick([0x1_0001, 0x7fff_ffff, 0x8000_0000, CK_ULONG.max]))
        case 50..<60:
            let size = r.pick([1, 4, 8, 16, 64])
            return .buffer(size, claim: CK_ULONG(r.below(size)))
        default:
            let size = r.pick([0, 1, 8, 16, 32, 64, 128, 300, 1024])
            return .buffer(size, claim: CK_ULONG(size))
        }
    }

    // MARK: mechanisms

    private enum KeyKind { case ec, rsa, aes, hmac, none }

    /// A mechanism for `use`, its parameter mostly right, sometimes of a wrong length, NULL, or garbage; and the
    /// kind of key it wants.
    private mutating func mechanism(for use: String) -> (MechSpec, KeyKind) {
        if r.percent(3) { return (MechSpec(type: nil), .none) }
        if r.percent(4) { return (MechSpec(type: r.pick([0x7fff_fff0, 0x8000_1234, CK_ULONG.max, CKM_CONCATENATE_BASE_AND_KEY])), .none) }
        var (type, parameter, kind): (CK_ULONG, ParamSpec, KeyKind)
        switch use {
        case "sign", "verify":
            switch r.below(9) {
            case 0, 1: (type, parameter, kind) = (CKM_ECDSA, .none, .ec)
            case 2: (type, parameter, kind) = (CKM_RSA_PKCS, .none, .rsa)
            case 3: (type, parameter, kind) = (r.pick([CKM_SHA256_RSA_PKCS, CKM_SHA1_RSA_PKCS]), .none, .rsa)
            case 4: (type, parameter, kind) = (r.pick([CKM_RSA_PKCS_PSS, CKM_SHA256_RSA_PKCS_PSS]), pss(), .rsa)
            case 5: (type, parameter, kind) = (CKM_RSA_X_509, .none, .rsa)
            case 6: (type, parameter, kind) = (CKM_SHA256_HMAC, .none, .hmac)
            case 7: (type, parameter, kind) = (CKM_SHA256_HMAC_GENERAL, .bytes(ulongBytes(r.pick([0, 16, 32, 100]))), .hmac)
            default: (type, parameter, kind) = (CKM_AES_CMAC, .none, .aes)
            }
        case "recover":
            (type, parameter, kind) = (r.pick([CKM_RSA_PKCS, CKM_RSA_X_509]), .none, .rsa)
        case "encrypt", "decrypt":
            switch r.below(8) {
            case 0: (type, parameter, kind) = (CKM_AES_ECB, .none, .aes)
            case 1, 2: (type, parameter, kind) = (r.pick([CKM_AES_CBC, CKM_AES_CBC_PAD]), iv(), .aes)
            case 3: (type, parameter, kind) = (CKM_AES_CTR, ctr(), .aes)
            case 4: (type, parameter, kind) = (CKM_AES_GCM, gcm(), .aes)
            case 5: (type, parameter, kind) = (CKM_RSA_PKCS, .none, .rsa)
            case 6: (type, parameter, kind) = (CKM_RSA_PKCS_OAEP, oaep(), .rsa)
            default: (type, parameter, kind) = (CKM_RSA_X_509, .none, .rsa)
            }
        case "digest":
            (type, parameter, kind) = (r.pick([CKM_SHA_1, CKM_SHA256, CKM_SHA384, CKM_SHA512, CKM_MD5, CKM_SHA224]), .none, .none)
        case "wrap":
            switch r.below(5) {
            case 0: (type, parameter, kind) = (CKM_AES_KEY_WRAP, .none, .aes)
            case 1: (type, parameter, kind) = (CKM_AES_KEY_WRAP_PAD, .none, .aes)
            case 2: (type, parameter, kind) = (CKM_AES_CBC_PAD, iv(), .aes)
            case 3: (type, parameter, kind) = (CKM_RSA_PKCS, .none, .rsa)
            default: (type, parameter, kind) = (CKM_RSA_PKCS_OAEP, oaep(), .rsa)
            }
        default:  // derive
            switch r.below(7) {
            case 0, 1: (type, parameter, kind) = (CKM_ECDH1_DERIVE, ecdh(), .ec)
            case 2: (type, parameter, kind) = (CKM_AES_ECB_ENCRYPT_DATA, .derivation(data([15, 16, 32]), sizeDelta: delta()), .aes)
            case 3: (type, parameter, kind) = (CKM_AES_CBC_ENCRYPT_DATA, .cbcEncryptData(iv: r.bytes(16), data: data([16, 32]), sizeDelta: delta()), .aes)
            case 4: (type, parameter, kind) = (CKM_CONCATENATE_BASE_AND_KEY, .handle(key([keys.hmac, keys.aes])), .hmac)
            case 5: (type, parameter, kind) = (r.pick([CKM_CONCATENATE_BASE_AND_DATA, CKM_CONCATENATE_DATA_AND_BASE]), .derivation(data([0, 8, 16]), sizeDelta: delta()), .hmac)
            default: (type, parameter, kind) = (CKM_XOR_BASE_AND_DATA, .derivation(data([8, 32]), sizeDelta: delta()), .hmac)
            }
        }
        // Now and then, a parameter that does not fit.
        switch r.below(100) {
        case 0..<4: parameter = .bytes(r.bytes(r.below(48)))
        case 4..<7: parameter = .null(r.pick([1, 16, 40]))
        default: break
        }
        return (MechSpec(type: type, parameter: parameter), kind)
    }

    private mutating func delta() -> Int { r.percent(85) ? 0 : r.pick([-1, -8, 8]) }
    private mutating func iv() -> ParamSpec { .bytes(r.bytes(r.percent(85) ? 16 : r.pick([0, 3, 15, 32]))) }

    private mutating func pss() -> ParamSpec {
        var p = CK_RSA_PKCS_PSS_PARAMS(hashAlg: CK_MECHANISM_TYPE(CKM_SHA256), mgf: CK_ULONG(CKG_MGF1_SHA256), sLen: 32)
        if r.percent(15) { p.hashAlg = r.pick([CKM_SHA_1, 0x7fff]) }
        if r.percent(10) { p.sLen = r.pick([0, 1000, CK_ULONG.max]) }
        let bytes = withUnsafeBytes(of: p) { Array($0) }
        return .bytes(r.percent(90) ? bytes : Array(bytes.prefix(r.below(bytes.count))))
    }

    private mutating func ctr() -> ParamSpec {
        var p = CK_AES_CTR_PARAMS()
        p.ulCounterBits = r.percent(85) ? 128 : r.pick([0, 1, 129])
        withUnsafeMutableBytes(of: &p.cb) { $0.copyBytes(from: r.bytes(16)) }
        let bytes = withUnsafeBytes(of: p) { Array($0) }
        return .bytes(r.percent(90) ? bytes : Array(bytes.prefix(r.below(bytes.count))))
    }

    private mutating func gcm() -> ParamSpec {
        let iv: FuzzIn = r.percent(85) ? .data(r.bytes(12)) : r.pick([.data([]), .data(r.bytes(1)), .data(r.bytes(300)), .null(12)])
        let aad: FuzzIn = r.percent(80) ? .data(r.bytes(r.pick([0, 1, 16, 100]))) : .null(r.pick([0, 4]))
        return .gcm(iv: iv, ivBits: r.percent(85) ? 96 : r.pick([0, 8, 1 << 20]), aad: aad,
                    tagBits: r.percent(85) ? 128 : r.pick([0, 7, 96, 129]), sizeDelta: delta())
    }

    private mutating func oaep() -> ParamSpec {
        .oaep(hash: r.percent(85) ? CK_MECHANISM_TYPE(CKM_SHA_1) : r.pick([CKM_SHA256, 0x7fff]),
              mgf: r.percent(85) ? CK_ULONG(CKG_MGF1_SHA1) : r.pick([CKG_MGF1_SHA256, 0, 99]),
              source: r.percent(85) ? CK_ULONG(CKZ_DATA_SPECIFIED) : r.pick([0, 2]),
              data: r.percent(80) ? .data([]) : r.pick([.data(r.bytes(8)), .null(8)]), sizeDelta: delta())
    }

    private mutating func ecdh() -> ParamSpec {
        .ecdh(kdf: r.percent(85) ? CK_ULONG(CKD_NULL) : r.pick([CKD_SHA1_KDF, 0x7fff]),
              shared: r.percent(85) ? .data([]) : r.pick([.data(r.bytes(8)), .null(8)]),
              publicData: r.percent(80) ? .data(r.pick([p256Generator, p256GeneratorDER])) : r.pick([.data(r.bytes(65)), .data([]), .null(65)]),
              sizeDelta: delta())
    }

    private func keyRef(_ kind: KeyKind, forPrivateUse: Bool) -> [HandleRef] {
        switch kind {
        case .ec: [forPrivateUse ? keys.ecPrivate : keys.ecPublic]
        case .rsa: [forPrivateUse ? keys.rsaPrivate : keys.rsaPublic]
        case .aes: [keys.aes]
        case .hmac: [keys.hmac]
        case .none: keys.all
        }
    }

    // MARK: flows

    private mutating func operationFlow() {
        switch r.below(10) {
        case 0, 1, 2: signFlow()
        case 3, 4: cipherFlow(encrypt: true)
        case 5: cipherFlow(encrypt: false)
        case 6, 7: digestFlow()
        default: recoverFlow()
        }
    }

    private mutating func signFlow() {
        let s = session()
        let (mech, kind) = mechanism(for: "sign")
        let message = data()
        if r.percent(92) { add(operationInit("C_SignInit", \.C_SignInit, s, mech, key(keyRef(kind, forPrivateUse: true)))) }
        maybeInterleave()
        if r.percent(55) {
            if r.percent(30) { add(singlePart("C_Sign", \.C_Sign, s, message, .query(0))) }
            add(singlePart("C_Sign", \.C_Sign, s, message, out()))
        } else {
            for _ in 0..<r.below(4) { add(update("C_SignUpdate", \.C_SignUpdate, s, data())) }
            maybeInterleave()
            if r.percent(30) { add(final("C_SignFinal", \.C_SignFinal, s, .query(0))) }
            add(final("C_SignFinal", \.C_SignFinal, s, out()))
        }
        let signature = step - 1
        outputs.append(signature)
        guard r.percent(60) else { return }
        let verifying = r.percent(85) ? mech : mechanism(for: "verify").0
        add(operationInit("C_VerifyInit", \.C_VerifyInit, s, verifying, key(keyRef(kind, forPrivateUse: false) + [keys.hmac])))
        let sig: FuzzIn = r.percent(70) ? .output(of: signature) : data([0, 64, 128, 256])
        if r.percent(55) {
            add(verify(s, r.percent(85) ? message : data(), sig))
        } else {
            for _ in 0..<r.below(3) { add(update("C_VerifyUpdate", \.C_VerifyUpdate, s, data())) }
            add(verifyFinal(s, sig))
        }
    }

    private mutating func cipherFlow(encrypt: Bool) {
        let s = session()
        let (mech, kind) = mechanism(for: encrypt ? "encrypt" : "decrypt")
        let (initName, initPath, single, singlePath, updateName, updatePath, finalName, finalPath) = encrypt
            ? ("C_EncryptInit", \CK_FUNCTION_LIST.C_EncryptInit, "C_Encrypt", \CK_FUNCTION_LIST.C_Encrypt,
               "C_EncryptUpdate", \CK_FUNCTION_LIST.C_EncryptUpdate, "C_EncryptFinal", \CK_FUNCTION_LIST.C_EncryptFinal)
            : ("C_DecryptInit", \CK_FUNCTION_LIST.C_DecryptInit, "C_Decrypt", \CK_FUNCTION_LIST.C_Decrypt,
               "C_DecryptUpdate", \CK_FUNCTION_LIST.C_DecryptUpdate, "C_DecryptFinal", \CK_FUNCTION_LIST.C_DecryptFinal)
        if r.percent(92) { add(operationInit(initName, initPath, s, mech, key(keyRef(kind, forPrivateUse: !encrypt)))) }
        maybeInterleave()
        let input: FuzzIn = !encrypt && !outputs.isEmpty && r.percent(50) ? .output(of: r.pick(outputs)) : data()
        if r.percent(50) {
            if r.percent(30) { add(singlePart(single, singlePath, s, input, .query(0))) }
            add(singlePart(single, singlePath, s, input, out()))
            if encrypt { outputs.append(step - 1) }
        } else {
            for _ in 0..<(1 + r.below(3)) { add(singlePart(updateName, updatePath, s, data([0, 1, 15, 16, 17, 32, 100]), out())) }
            maybeInterleave()
            if r.percent(30) { add(final(finalName, finalPath, s, .query(0))) }
            add(final(finalName, finalPath, s, out()))
        }
    }

    private mutating func digestFlow() {
        let s = session()
        let (mech, _) = mechanism(for: "digest")
        if r.percent(92) { add(digestInit(s, mech)) }
        maybeInterleave()
        if r.percent(50) {
            add(singlePart("C_Digest", \.C_Digest, s, data(), out()))
        } else {
            for _ in 0..<r.below(4) {
                if r.percent(20) { add(digestKey(s, key([keys.aes, keys.hmac]))) } else { add(update("C_DigestUpdate", \.C_DigestUpdate, s, data())) }
            }
            add(final("C_DigestFinal", \.C_DigestFinal, s, out()))
        }
    }

    private mutating func recoverFlow() {
        let s = session()
        let (mech, _) = mechanism(for: "recover")
        if r.percent(50) {
            add(operationInit("C_SignRecoverInit", \.C_SignRecoverInit, s, mech, key([keys.rsaPrivate])))
            add(singlePart("C_SignRecover", \.C_SignRecover, s, data([0, 16, 32, 117, 128, 200]), out()))
            outputs.append(step - 1)
        } else {
            add(operationInit("C_VerifyRecoverInit", \.C_VerifyRecoverInit, s, mech, key([keys.rsaPublic])))
            let input: FuzzIn = !outputs.isEmpty && r.percent(50) ? .output(of: r.pick(outputs)) : data([0, 64, 128, 129])
            add(singlePart("C_VerifyRecover", \.C_VerifyRecover, s, input, out()))
        }
    }

    private mutating func findFlow() {
        let s = session()
        if r.percent(92) { add(findObjectsInit(s, searchTemplate())) }
        maybeInterleave()
        for _ in 0..<(1 + r.below(3)) {
            let found = step
            add(findObjects(s, max: r.pick([0, 1, 2, 3, 64, 0x7fff_ffff, CK_ULONG.max]), array: r.percent(95)))
            objects.append(.made(step: found, index: r.below(8)))
        }
        if r.percent(90) { add(findObjectsFinal(s)) }
    }

    // MARK: single calls

    private mutating func objectCall() {
        let s = session()
        switch r.below(10) {
        case 0, 1:
            objects.append(.made(step: step, index: 0))
            add(createObject(s, objectTemplate()))
        case 2:
            objects.append(.made(step: step, index: 0))
            add(copyObject(s, object(), changeTemplate()))
        case 3:
            // Mostly objects made here; the prologue's keys now and then.
            add(destroyObject(s, !objects.isEmpty && r.percent(85) ? r.pick(objects) : key(keys.all)))
        case 4: add(getObjectSize(s, object(), nullSize: r.percent(5)))
        case 5, 6, 7: add(getAttributeValue(s, object(), queries()))
        default: add(setAttributeValue(s, object(), changeTemplate()))
        }
    }

    private mutating func keyCall() {
        let s = session()
        switch r.below(6) {
        case 0:
            objects.append(.made(step: step, index: 0))
            let aes = r.percent(70)
            let mech = MechSpec(type: r.percent(90) ? (aes ? CKM_AES_KEY_GEN : CKM_GENERIC_SECRET_KEY_GEN) : r.pick([CKM_EC_KEY_PAIR_GEN, 0x7fff_fff0]))
            // Token keys from valid templates only (see objectTemplate).
            let token = r.percent(20)
            var template = [ulong(CKA_VALUE_LEN, r.percent(85) || token ? (aes ? r.pick([16, 24, 32]) : 32) : r.pick([0, 7, 1 << 20])),
                            bool(CKA_TOKEN, token), bool(CKA_ENCRYPT, true), bool(CKA_SIGN, true), bool(CKA_EXTRACTABLE, r.percent(70))]
            if !token && r.percent(20) { template.append(randomAttribute()) }
            if !token && r.percent(10) { template.removeFirst() }
            add(generateKey(s, mech, r.percent(96) ? .attributes(template) : .null(2)))
        case 1:
            objects.append(.made(step: step, index: 0))
            objects.append(.made(step: step, index: 1))
            add(keyPair(s))
        case 2:
            let (mech, kind) = mechanism(for: "wrap")
            let wrapping = key(kind == .rsa ? [keys.rsaPublic] : [keys.aes])
            add(wrapKey(s, mech, wrapping, key([keys.aes, keys.hmac, keys.ecPrivate, keys.rsaPrivate]), out()))
            outputs.append(step - 1)
        case 3:
            let (mech, kind) = mechanism(for: "wrap")
            let unwrapping = key(kind == .rsa ? [keys.rsaPrivate] : [keys.aes])
            let wrapped: FuzzIn = !outputs.isEmpty && r.percent(60) ? .output(of: r.pick(outputs)) : data([0, 8, 24, 40, 128])
            objects.append(.made(step: step, index: 0))
            let token = r.percent(15)
            add(unwrapKey(s, mech, unwrapping, wrapped, .attributes(secretKey(r.percent(70) ? CKK_AES : CKK_GENERIC_SECRET, value: [], token: token)
                .filter { $0.type != CKA_VALUE } + (!token && r.percent(15) ? [randomAttribute()] : []))))
        case 4:
            let (mech, kind) = mechanism(for: "derive")
            objects.append(.made(step: step, index: 0))
            let token = r.percent(15)
            var template = [ulong(CKA_CLASS, CKO_SECRET_KEY), ulong(CKA_KEY_TYPE, r.percent(60) ? CKK_AES : CKK_GENERIC_SECRET),
                            bool(CKA_TOKEN, token), bool(CKA_ENCRYPT, true), bool(CKA_EXTRACTABLE, true)]
            if r.percent(70) { template.append(ulong(CKA_VALUE_LEN, token ? r.pick([16, 32]) : r.pick([16, 32, 0, 1000]))) }
            if !token && r.percent(15) { template.append(randomAttribute()) }
            add(deriveKey(s, mech, key(keyRef(kind, forPrivateUse: true)), r.percent(96) ? .attributes(template) : .null(1)))
        default:
            if r.percent(50) { add(generateRandom(s, r.percent(95) ? .data(Array(repeating: 0, count: r.pick([0, 1, 16, 32, 100, 65_537, 300_000]))) : .null(r.pick([0, 16])))) }
            else { add(update("C_SeedRandom", \.C_SeedRandom, s, data())) }
        }
    }

    private mutating func keyPair(_ s: HandleRef) -> FuzzCall {
        let token = r.percent(15)
        if r.percent(60) {
            let params = r.percent(85) ? bytes(CKA_EC_PARAMS, p256) : r.pick([bytes(CKA_EC_PARAMS, [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x99]),
                                                                                 bytes(CKA_EC_PARAMS, r.bytes(12)), ulong(CKA_MODULUS_BITS, 256)])
            var pub = [params, bool(CKA_VERIFY, true), bool(CKA_TOKEN, token)]
            var priv = [bool(CKA_SIGN, true), bool(CKA_DERIVE, r.percent(50)), bool(CKA_TOKEN, token), bool(CKA_SENSITIVE, r.percent(50)),
                        bool(CKA_EXTRACTABLE, r.percent(50))]
            if !token && r.percent(15) { pub.append(randomAttribute()) }
            if !token && r.percent(15) { priv.append(randomAttribute()) }
            return generateKeyPair(s, MechSpec(type: r.percent(92) ? CKM_EC_KEY_PAIR_GEN : CKM_RSA_PKCS_KEY_PAIR_GEN),
                                   r.percent(97) ? .attributes(pub) : .null(1), r.percent(97) ? .attributes(priv) : .null(1))
        }
        // RSA: 1024 bits mostly; 2048 rarely (slow); sizes no token accepts, quickly refused.
        let bits = r.percent(80) ? 1024 : r.pick([2048, 0, 7, 100_000] as [CK_ULONG])
        var pub = [ulong(CKA_MODULUS_BITS, bits), bytes(CKA_PUBLIC_EXPONENT, r.percent(85) ? [1, 0, 1] : r.pick([[3], [], [0], [2]])),
                   bool(CKA_VERIFY, true), bool(CKA_ENCRYPT, true), bool(CKA_TOKEN, token)]
        let priv = [bool(CKA_SIGN, true), bool(CKA_DECRYPT, true), bool(CKA_TOKEN, token), bool(CKA_PRIVATE, r.percent(80))]
        if r.percent(10) { pub.removeFirst() }
        return generateKeyPair(s, MechSpec(type: CKM_RSA_PKCS_KEY_PAIR_GEN), .attributes(pub), .attributes(priv))
    }

    private mutating func stateChange() {
        switch r.below(100) {
        case 0..<22:
            add(logout(session()))
            if r.percent(60) { add(login(main, CK_USER_TYPE(CKU_USER), .data(userPIN), pinText: "the user PIN")) }
        case 22..<44: loginCall()
        case 44..<54:
            sessions.append(.made(step: step, index: 0))
            add(openSession(slot(), flags: r.pick([CK_FLAGS(CKF_SERIAL_SESSION), CK_FLAGS(CKF_SERIAL_SESSION | CKF_RW_SESSION), 0, CK_FLAGS.max])))
        case 54..<64:
            let closing = session()
            add(closeSession(closing))
            if case .made = closing, closing.description == main.description { reestablish(initialize: false) }
        case 64..<70:
            add(closeAllSessions(slot()))
            reestablish(initialize: false)
        case 70..<78:
            add(finalize(reserved: r.percent(90) ? nil : 8))
            for _ in 0..<r.below(3) { singleCall() }
            reestablish(initialize: true)
        case 78..<84:
            add(initialize(args: r.pick([.none, .osLocking, .reserved, .someCallbacks, .callbacksOnly, .cantCreateThreads])))
        default: pinCall()
        }
    }

    private mutating func loginCall() {
        let s = session()
        switch r.below(10) {
        case 0..<5: add(login(s, CK_USER_TYPE(CKU_USER), .data(userPIN), pinText: "the user PIN"))
        case 5: add(login(s, CK_USER_TYPE(CKU_USER), .data(r.bytes(r.pick([0, 4, 8, 300]))), pinText: "a wrong PIN"))
        case 6: add(login(s, CK_USER_TYPE(CKU_SO), .data(soPIN), pinText: "the SO PIN"))
        case 7: add(login(s, CK_USER_TYPE(CKU_CONTEXT_SPECIFIC), .data(userPIN), pinText: "the user PIN"))
        case 8: add(login(s, r.pick([3, 77, CK_ULONG.max]), .data(userPIN), pinText: "the user PIN"))
        default: add(login(s, CK_USER_TYPE(CKU_USER), .null(r.pick([0, 4])), pinText: "NULL"))
        }
    }

    /// PIN changes that never change a PIN: the new PIN is the old one, or the old one is wrong, or the new one's
    /// length is refused.
    private mutating func pinCall() {
        let s = session()
        switch r.below(5) {
        case 0: add(setPIN(s, .data(userPIN), .data(userPIN), "the user PIN to itself"))
        case 1: add(setPIN(s, .data(r.bytes(6)), .data(r.bytes(8)), "a wrong PIN to another"))
        case 2: add(setPIN(s, r.percent(50) ? .data(userPIN) : .data(soPIN), .data(r.bytes(r.pick([0, 1, 3, 300]))), "a PIN to one of a refused length"))
        case 3: add(setPIN(s, .null(r.pick([0, 6])), .data(userPIN), "NULL to the user PIN"))
        default:
            let pin: FuzzIn = r.percent(50) ? .data(userPIN) : r.pick([.data(r.bytes(r.pick([0, 1, 300]))), .null(6)])
            add(initPIN(s, pin, "the user PIN, a PIN of a refused length, or NULL"))
        }
    }

    private mutating func singleCall() {
        let s = session()
        switch r.below(24) {
        case 0: add(getInfo(null: r.percent(10)))
        case 1: add(getFunctionList(null: r.percent(20)))
        case 2: add(getSlotList(present: r.percent(50), out: r.percent(50) ? .query(0) : listOut(MemoryLayout<CK_SLOT_ID>.stride)))
        case 3: add(getSlotInfo(slot(), null: r.percent(10)))
        case 4: add(getTokenInfo(slot(), null: r.percent(10)))
        case 5: add(getMechanismList(slot(), r.percent(30) ? .query(0) : listOut(MemoryLayout<CK_MECHANISM_TYPE>.stride)))
        case 6: add(getMechanismInfo(slot(), r.pick([CKM_ECDSA, CKM_AES_GCM, CKM_RSA_PKCS, 0x7fff_fff0, CK_ULONG.max]), null: r.percent(10)))
        case 7: add(initToken(slot(), .data(r.bytes(8)), label: r.percent(80)))
        case 8: add(getSessionInfo(s, null: r.percent(10)))
        case 9: add(getOperationState(s, out()))
        case 10: add(setOperationState(s, data(), key([keys.aes]), key([keys.hmac])))
        case 11, 12:
            let (name, path) = r.pick([("C_DigestEncryptUpdate", \CK_FUNCTION_LIST.C_DigestEncryptUpdate),
                                       ("C_DecryptDigestUpdate", \CK_FUNCTION_LIST.C_DecryptDigestUpdate),
                                       ("C_SignEncryptUpdate", \CK_FUNCTION_LIST.C_SignEncryptUpdate),
                                       ("C_DecryptVerifyUpdate", \CK_FUNCTION_LIST.C_DecryptVerifyUpdate)])
            add(singlePart(name, path, s, data(), out()))
        case 13: add(getFunctionStatus("C_GetFunctionStatus", \.C_GetFunctionStatus, s))
        case 14: add(getFunctionStatus("C_CancelFunction", \.C_CancelFunction, s))
        case 15: add(waitForSlotEvent(flags: r.percent(80) ? CK_FLAGS(CKF_DONT_BLOCK) : CK_FLAGS.max, reserved: r.percent(10)))
        case 16: add(interfaceList(r.percent(40) ? .query(0) : listOut(MemoryLayout<CK_INTERFACE>.stride)))
        case 17: add(interface(name: r.pick(["PKCS 11", "Vendor", nil]), version: r.pick([nil, (2, 40), (3, 0)]), flags: r.pick([0, 1]), nullResult: r.percent(10)))
        case 18: add(getSessionInfo(s, null: false))
        // Operation calls out of their flow: wrong states.
        case 19:
            let (name, path) = r.pick([("C_Sign", \CK_FUNCTION_LIST.C_Sign), ("C_Encrypt", \.C_Encrypt), ("C_Decrypt", \.C_Decrypt), ("C_Digest", \.C_Digest)])
            add(singlePart(name, path, s, data(), out()))
        case 20:
            let (name, path) = r.pick([("C_SignFinal", \CK_FUNCTION_LIST.C_SignFinal), ("C_EncryptFinal", \.C_EncryptFinal),
                                       ("C_DecryptFinal", \.C_DecryptFinal), ("C_DigestFinal", \.C_DigestFinal)])
            add(final(name, path, s, out()))
        case 21:
            let (name, path) = r.pick([("C_SignUpdate", \CK_FUNCTION_LIST.C_SignUpdate), ("C_VerifyUpdate", \.C_VerifyUpdate), ("C_DigestUpdate", \.C_DigestUpdate)])
            add(update(name, path, s, data()))
        case 22: add(findObjects(s, max: r.pick([0, 1, 5]), array: r.percent(90)))
        default: add(findObjectsFinal(s))
        }
    }

    /// A list's buffer (lengths in elements): 512 elements' room, claiming fewer, or the reserved region.
    private mutating func listOut(_ elementSize: Int) -> FuzzOut {
        r.percent(80) ? .buffer(elementSize * 512, claim: CK_ULONG(r.pick([0, 1, 2, 8, 512])))
            : .reserved(claim: r.pick([0x7fff_ffff / CK_ULONG(elementSize), CK_ULONG.max]))
    }
}
