// The mechanism table: every mechanism the group lists, with a valid parameter and invalid ones, run through the
// group and directly on a member (SoftHSM, the same instance, the same keys): the same codes at every step and the
// same output where the mechanism is deterministic; otherwise each side's output is checked by the other.
import CInterop
import Glibc

/// One side of the comparison: a module, a session on it, and the test keys by name.
private struct Side {
    let name: String
    let m: Module
    let session: CK_SESSION_HANDLE
    let keys: [String: CK_OBJECT_HANDLE]

    func key(_ name: String) -> CK_OBJECT_HANDLE {
        guard let key = keys[name] else { fatal("\(self.name) has no key \(name)") }
        return key
    }
}

/// What one run of a case gave: the code of each call in order, and the output of the last.
private struct Outcome {
    var codes: [CK_RV] = []
    var output: [UInt8]? = nil
}

/// Parameters live in the fuzzer's arena until the scenario ends (both sides use the same structure: they are one
/// process).
private extension Arena {
    func parameter<T>(_ value: T) -> Parameter { Parameter(pointer: self.value(value), length: MemoryLayout<T>.size) }
    func raw(_ value: [UInt8]) -> Parameter { Parameter(pointer: UnsafeMutableRawPointer(bytes(value)), length: value.count) }
}

private struct Parameter {
    let pointer: UnsafeMutableRawPointer?
    let length: Int
    static var none: Parameter { Parameter(pointer: nil, length: 0) }
}

/// What a case does with its mechanism.
private enum Use {
    case digest
    /// Sign with `key`, verify with `verifyKey`; `input` bytes of 0x5a.
    case sign(key: String, verifyKey: String, input: Int)
    case encrypt(key: String, decryptKey: String, input: Int)
    case wrap(wrappingKey: String, key: String)
    /// Derives a 16-byte AES session key from `key`, compared by a block it encrypts.
    case derive(key: String)
    case generate(template: () -> Template)
    case generatePair(publicTemplate: () -> Template, privateTemplate: () -> Template)
}

private struct Case {
    let mechanism: CK_ULONG
    let use: Use
    /// Whether two runs with one key give one output (then compared across the sides).
    let deterministic: Bool
    let valid: Parameter
    let invalid: [Parameter]
    /// A mechanism the member lists and refuses all the same (then the group must refuse it alike).
    let memberRefuses: Bool
}

func mechanismTableScenario(_ m: Module) {
    let s = initialized(m)
    let groupSession = openLoggedIn(m, slot: s, pin: userPIN)
    let run = "mt-\(getpid())"
    let arena = Arena()
    let made = makeKeys(m, groupSession, prefix: run)
    let group = Side(name: "group", m: m, session: groupSession, keys: made)

    // SoftHSM directly, beside p11ha in this process: the instance p11ha's members use (already initialized by it).
    let direct = Module(path: env("SOFTHSM_MODULE") ?? "")
    let initialize = direct.f.C_Initialize!(nil)
    check(initialize == CKR_OK || initialize == CKR_CRYPTOKI_ALREADY_INITIALIZED, "C_Initialize SoftHSM directly: 0x\(String(initialize, radix: 16))")
    guard let memberName = (env("P11HA_TEST_MEMBERS") ?? "").split(separator: ",").first.map(String.init),
          let memberSlot = slot(labelled: memberName, in: direct) else { fatal("no member to compare with") }
    let directSession = openLoggedIn(direct, slot: memberSlot, pin: userPIN)
    var directKeys: [String: CK_OBJECT_HANDLE] = [:]
    for (name, handle) in made {
        guard let classBytes = attribute(m, groupSession, handle, CK_ATTRIBUTE_TYPE(CKA_CLASS)) else { fatal("no class for \(name)") }
        let found = find(direct, directSession, Template().add(CKA_LABEL, string: "\(run)-\(name)").add(CKA_CLASS, classBytes))
        guard found.count == 1 else { fatal("\(memberName) holds \(found.count) copies of \(name)") }
        directKeys[name] = found[0]
    }
    let member = Side(name: memberName, m: direct, session: directSession, keys: directKeys)

    let cases = mechanismCases(arena)
    var listed = [CK_MECHANISM_TYPE](repeating: 0, count: 256)
    var count = CK_ULONG(listed.count)
    ok(m.f.C_GetMechanismList!(s, &listed, &count), "C_GetMechanismList")
    let table = Dictionary(cases.map { (CK_MECHANISM_TYPE($0.mechanism), $0) }, uniquingKeysWith: { a, _ in a })
    for mechanismType in listed.prefix(Int(count)) {
        guard let entry = table[mechanismType] else {
            check(false, "the group lists mechanism 0x\(String(mechanismType, radix: 16)), which the table lacks")
            continue
        }
        let name = "mechanism 0x\(String(mechanismType, radix: 16))"
        let viaGroup = perform(entry, entry.valid, on: group)
        let viaMember = perform(entry, entry.valid, on: member)
        if entry.memberRefuses {
            check(viaMember.codes.last != CKR_OK, "\(name), listed, is refused on \(memberName) directly: \(hex(viaMember.codes))")
        } else {
            check(viaMember.codes.allSatisfy { $0 == CKR_OK }, "\(name) with its valid parameter works on \(memberName) directly: \(hex(viaMember.codes))")
        }
        check(viaGroup.codes == viaMember.codes, "\(name) with its valid parameter: the group answers \(hex(viaGroup.codes)), \(memberName) \(hex(viaMember.codes))")
        if entry.deterministic {
            check(viaGroup.output == viaMember.output, "\(name): the group's output equals \(memberName)'s")
        } else if let g = viaGroup.output, let d = viaMember.output {
            check(confirm(entry, g, on: member), "\(name): \(memberName) accepts the group's output")
            check(confirm(entry, d, on: group), "\(name): the group accepts \(memberName)'s output")
        }
        for (index, parameter) in entry.invalid.enumerated() {
            let g = perform(entry, parameter, on: group)
            let d = perform(entry, parameter, on: member)
            check(g.codes == d.codes, "\(name) with invalid parameter \(index + 1): the group answers \(hex(g.codes)), \(memberName) \(hex(d.codes))")
        }
    }
    let listedSet = Set(listed.prefix(Int(count)))
    for entry in cases where !listedSet.contains(CK_MECHANISM_TYPE(entry.mechanism)) {
        check(false, "the table's mechanism 0x\(String(entry.mechanism, radix: 16)) is not listed by the group")
    }
    ok(m.f.C_Finalize!(nil), "C_Finalize")
}

private func hex(_ codes: [CK_RV]) -> String { "[" + codes.map { "0x" + String($0, radix: 16) }.joined(separator: " ") + "]" }

/// Runs one case: its calls in order, stopping at the first that fails.
private func perform(_ entry: Case, _ parameter: Parameter, on side: Side) -> Outcome {
    let f = side.m.f
    let session = side.session
    var mech = CK_MECHANISM(mechanism: CK_MECHANISM_TYPE(entry.mechanism), pParameter: parameter.pointer, ulParameterLen: CK_ULONG(parameter.length))
    var outcome = Outcome()
    func step(_ rv: CK_RV) -> Bool { outcome.codes.append(rv); return rv == CKR_OK }
    /// A single-part call with its length query first.
    func twoCalls(_ call: (UnsafeMutablePointer<UInt8>?, UnsafeMutablePointer<CK_ULONG>) -> CK_RV) {
        var length: CK_ULONG = 0
        guard step(call(nil, &length)) else { return }
        var out = [UInt8](repeating: 0, count: Int(length))
        guard step(call(&out, &length)) else { return }
        outcome.output = Array(out.prefix(Int(length)))
    }
    switch entry.use {
    case .digest:
        var input = [UInt8](repeating: 0x5a, count: 100)
        guard step(f.C_DigestInit!(session, &mech)) else { break }
        twoCalls { f.C_Digest!(session, &input, CK_ULONG(input.count), $0, $1) }
    case .sign(let key, _, let size):
        var input = [UInt8](repeating: 0x5a, count: size)
        guard step(f.C_SignInit!(session, &mech, side.key(key))) else { break }
        twoCalls { f.C_Sign!(session, &input, CK_ULONG(input.count), $0, $1) }
    case .encrypt(let key, _, let size):
        var input = [UInt8](repeating: 0x5a, count: size)
        if size > 0 { input[0] = 0 }  // below an RSA modulus, for raw RSA
        guard step(f.C_EncryptInit!(session, &mech, side.key(key))) else { break }
        twoCalls { f.C_Encrypt!(session, &input, CK_ULONG(input.count), $0, $1) }
    case .wrap(let wrappingKey, let key):
        twoCalls { f.C_WrapKey!(session, &mech, side.key(wrappingKey), side.key(key), $0, $1) }
    case .derive(let key):
        let template = Template().add(CKA_CLASS, ulong: CK_ULONG(CKO_SECRET_KEY)).add(CKA_KEY_TYPE, ulong: CK_ULONG(CKK_AES))
            .add(CKA_VALUE_LEN, ulong: 16).add(CKA_ENCRYPT, bool: true).add(CKA_TOKEN, bool: false)
        var derived: CK_OBJECT_HANDLE = 0
        guard step(f.C_DeriveKey!(session, &mech, side.key(key), &template.attributes, template.count, &derived)) else { break }
        outcome.output = encryptBlock(side.m, session, derived)
        _ = f.C_DestroyObject!(session, derived)
    case .generate(let make):
        let template = make()
        var key: CK_OBJECT_HANDLE = 0
        if step(f.C_GenerateKey!(session, &mech, &template.attributes, template.count, &key)) { _ = f.C_DestroyObject!(session, key) }
    case .generatePair(let makePublic, let makePrivate):
        let pub = makePublic(), priv = makePrivate()
        var a: CK_OBJECT_HANDLE = 0, b: CK_OBJECT_HANDLE = 0
        if step(f.C_GenerateKeyPair!(session, &mech, &pub.attributes, pub.count, &priv.attributes, priv.count, &a, &b)) {
            _ = f.C_DestroyObject!(session, a)
            _ = f.C_DestroyObject!(session, b)
        }
    }
    return outcome
}

/// Checks the other side's output of a case whose outputs differ from run to run: a signature verifies, a
/// ciphertext decrypts to the input.
private func confirm(_ entry: Case, _ output: [UInt8], on side: Side) -> Bool {
    let f = side.m.f
    let session = side.session
    var mech = CK_MECHANISM(mechanism: CK_MECHANISM_TYPE(entry.mechanism), pParameter: entry.valid.pointer, ulParameterLen: CK_ULONG(entry.valid.length))
    var output = output
    switch entry.use {
    case .sign(_, let verifyKey, let size):
        var input = [UInt8](repeating: 0x5a, count: size)
        guard f.C_VerifyInit!(session, &mech, side.key(verifyKey)) == CKR_OK else { return false }
        return f.C_Verify!(session, &input, CK_ULONG(size), &output, CK_ULONG(output.count)) == CKR_OK
    case .encrypt(_, let decryptKey, let size):
        var input = [UInt8](repeating: 0x5a, count: size)
        if size > 0 { input[0] = 0 }
        guard f.C_DecryptInit!(session, &mech, side.key(decryptKey)) == CKR_OK else { return false }
        var plain = [UInt8](repeating: 0, count: output.count + 16)
        var length = CK_ULONG(plain.count)
        guard f.C_Decrypt!(session, &output, CK_ULONG(output.count), &plain, &length) == CKR_OK else { return false }
        return Array(plain.prefix(Int(length))) == input
    default:
        return true
    }
}

/// The test keys, made through the group as token objects: secret keys and an Ed25519 pair by value (so that
/// every member holds them by replay), RSA, EC, DSA and DH pairs generated (and carried).
private func makeKeys(_ m: Module, _ session: CK_SESSION_HANDLE, prefix: String) -> [String: CK_OBJECT_HANDLE] {
    let f = m.f
    var keys: [String: CK_OBJECT_HANDLE] = [:]
    func create(_ name: String, _ template: Template) {
        template.add(CKA_LABEL, string: "\(prefix)-\(name)").add(CKA_TOKEN, bool: true)
        var handle: CK_OBJECT_HANDLE = 0
        ok(f.C_CreateObject!(session, &template.attributes, template.count, &handle), "C_CreateObject \(name)")
        keys[name] = handle
    }
    func secret(_ name: String, _ type: CK_ULONG, _ value: [UInt8]) {
        create(name, Template().add(CKA_CLASS, ulong: CK_ULONG(CKO_SECRET_KEY)).add(CKA_KEY_TYPE, ulong: type).add(CKA_VALUE, value)
            .add(CKA_ENCRYPT, bool: true).add(CKA_DECRYPT, bool: true).add(CKA_SIGN, bool: true).add(CKA_VERIFY, bool: true)
            .add(CKA_WRAP, bool: true).add(CKA_UNWRAP, bool: true).add(CKA_DERIVE, bool: true).add(CKA_EXTRACTABLE, bool: true)
            .add(CKA_SENSITIVE, bool: true).add(CKA_PRIVATE, bool: true))
    }
    secret("aes", CK_ULONG(CKK_AES), (0..<32).map { UInt8($0) })
    secret("target", CK_ULONG(CKK_AES), (0..<16).map { UInt8(0xa0 + $0) })
    secret("des", CK_ULONG(CKK_DES), [0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef])
    secret("des3", CK_ULONG(CKK_DES3), (0..<24).map { UInt8(0x10 + $0 * 3) })
    // As long as SHA-512's output: SoftHSM refuses an HMAC key shorter than the hash (CKR_KEY_SIZE_RANGE).
    secret("hmac", CK_ULONG(CKK_GENERIC_SECRET), (0..<64).map { UInt8(0x70 + $0) })

    // RFC 8032's first Ed25519 test vector.
    create("ed-private", Template().add(CKA_CLASS, ulong: CK_ULONG(CKO_PRIVATE_KEY)).add(CKA_KEY_TYPE, ulong: CK_ULONG(CKK_EC_EDWARDS))
        .add(CKA_EC_PARAMS, ed25519).add(CKA_VALUE, hexBytes("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60"))
        .add(CKA_SIGN, bool: true).add(CKA_PRIVATE, bool: true).add(CKA_SENSITIVE, bool: true))
    create("ed-public", Template().add(CKA_CLASS, ulong: CK_ULONG(CKO_PUBLIC_KEY)).add(CKA_KEY_TYPE, ulong: CK_ULONG(CKK_EC_EDWARDS))
        .add(CKA_EC_PARAMS, ed25519).add(CKA_EC_POINT, [0x04, 0x20] + hexBytes("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"))
        .add(CKA_VERIFY, bool: true))

    func pair(_ name: String, _ mechanismType: CK_ULONG, _ pub: Template, _ priv: Template) {
        pub.add(CKA_LABEL, string: "\(prefix)-\(name)-public").add(CKA_TOKEN, bool: true)
        priv.add(CKA_LABEL, string: "\(prefix)-\(name)-private").add(CKA_TOKEN, bool: true).add(CKA_PRIVATE, bool: true).add(CKA_SENSITIVE, bool: true)
        var gen = mechanism(CK_MECHANISM_TYPE(mechanismType))
        var a: CK_OBJECT_HANDLE = 0, b: CK_OBJECT_HANDLE = 0
        ok(f.C_GenerateKeyPair!(session, &gen, &pub.attributes, pub.count, &priv.attributes, priv.count, &a, &b), "C_GenerateKeyPair \(name)")
        keys["\(name)-public"] = a
        keys["\(name)-private"] = b
    }
    pair("rsa", CKM_RSA_PKCS_KEY_PAIR_GEN,
         Template().add(CKA_MODULUS_BITS, ulong: 2048).add(CKA_PUBLIC_EXPONENT, [1, 0, 1]).add(CKA_VERIFY, bool: true)
            .add(CKA_ENCRYPT, bool: true).add(CKA_WRAP, bool: true),
         Template().add(CKA_SIGN, bool: true).add(CKA_DECRYPT, bool: true).add(CKA_UNWRAP, bool: true))
    pair("ec", CKM_EC_KEY_PAIR_GEN, Template().add(CKA_EC_PARAMS, p256).add(CKA_VERIFY, bool: true),
         Template().add(CKA_SIGN, bool: true).add(CKA_DERIVE, bool: true))

    func domain(_ mechanismType: CK_ULONG, _ keyType: CK_ULONG, bits: CK_ULONG, _ types: [CK_ULONG]) -> [[UInt8]] {
        var gen = mechanism(CK_MECHANISM_TYPE(mechanismType))
        let t = Template().add(CKA_CLASS, ulong: CK_ULONG(CKO_DOMAIN_PARAMETERS)).add(CKA_KEY_TYPE, ulong: keyType)
            .add(CKA_PRIME_BITS, ulong: bits).add(CKA_TOKEN, bool: false)
        var handle: CK_OBJECT_HANDLE = 0
        ok(f.C_GenerateKey!(session, &gen, &t.attributes, t.count, &handle), "C_GenerateKey of domain parameters")
        return types.map { attribute(m, session, handle, CK_ATTRIBUTE_TYPE($0)) ?? [] }
    }
    let dsa = domain(CKM_DSA_PARAMETER_GEN, CK_ULONG(CKK_DSA), bits: 1024, [CKA_PRIME, CKA_SUBPRIME, CKA_BASE])
    pair("dsa", CKM_DSA_KEY_PAIR_GEN, Template().add(CKA_PRIME, dsa[0]).add(CKA_SUBPRIME, dsa[1]).add(CKA_BASE, dsa[2]).add(CKA_VERIFY, bool: true),
         Template().add(CKA_SIGN, bool: true))
    let dh = domain(CKM_DH_PKCS_PARAMETER_GEN, CK_ULONG(CKK_DH), bits: 512, [CKA_PRIME, CKA_BASE])
    pair("dh", CKM_DH_PKCS_KEY_PAIR_GEN, Template().add(CKA_PRIME, dh[0]).add(CKA_BASE, dh[1]), Template().add(CKA_DERIVE, bool: true))
    var point = attribute(m, session, keys["ec-public"]!, CK_ATTRIBUTE_TYPE(CKA_EC_POINT)) ?? []
    if point.count > 2, point[0] == 0x04, Int(point[1]) == point.count - 2 { point = Array(point.dropFirst(2)) }
    domains = Domains(dsa: dsa, dh: dh, dhPeer: attribute(m, session, keys["dh-public"]!, CK_ATTRIBUTE_TYPE(CKA_VALUE)) ?? [], ecPeer: point)
    return keys
}

/// Values the table takes from the keys made: domain parameters for generation, and the public values the
/// agreement cases take as their peer's (their own key's: an agreement with oneself).
private struct Domains {
    var dsa: [[UInt8]] = []
    var dh: [[UInt8]] = []
    var dhPeer: [UInt8] = []
    var ecPeer: [UInt8] = []
}
nonisolated(unsafe) private var domains = Domains()

/// The table. Invalid parameters: one where none is taken, wrong lengths and values the specification rules out.
private func mechanismCases(_ a: Arena) -> [Case] {
    let garbage = a.raw([1, 2, 3, 4])
    let iv16 = a.raw((0..<16).map { UInt8($0) })
    let iv8 = a.raw((0..<8).map { UInt8($0) })
    var cases: [Case] = []
    func add(_ mechanism: CK_ULONG, _ use: Use, deterministic: Bool = true, valid: Parameter = .none, invalid: [Parameter]? = nil,
             memberRefuses: Bool = false) {
        cases.append(Case(mechanism: mechanism, use: use, deterministic: deterministic, valid: valid, invalid: invalid ?? [garbage],
                          memberRefuses: memberRefuses))
    }

    for digest in [CKM_MD5, CKM_SHA_1, CKM_SHA224, CKM_SHA256, CKM_SHA384, CKM_SHA512] { add(digest, .digest) }
    for hmac in [CKM_MD5_HMAC, CKM_SHA_1_HMAC, CKM_SHA224_HMAC, CKM_SHA256_HMAC, CKM_SHA384_HMAC, CKM_SHA512_HMAC] {
        add(hmac, .sign(key: "hmac", verifyKey: "hmac", input: 100))
    }
    add(CKM_AES_CMAC, .sign(key: "aes", verifyKey: "aes", input: 100))
    add(CKM_DES3_CMAC, .sign(key: "des3", verifyKey: "des3", input: 100))

    // RSA: PKCS#1 v1.5 and raw signatures are deterministic; PSS and OAEP are not.
    add(CKM_RSA_PKCS, .sign(key: "rsa-private", verifyKey: "rsa-public", input: 51))
    add(CKM_RSA_X_509, .sign(key: "rsa-private", verifyKey: "rsa-public", input: 256))
    for hashed in [CKM_MD5_RSA_PKCS, CKM_SHA1_RSA_PKCS, CKM_SHA224_RSA_PKCS, CKM_SHA256_RSA_PKCS, CKM_SHA384_RSA_PKCS, CKM_SHA512_RSA_PKCS] {
        add(hashed, .sign(key: "rsa-private", verifyKey: "rsa-public", input: 100))
    }
    let pss: [(CK_ULONG, CK_ULONG, CK_ULONG, Int, Int)] = [  // mechanism, hash, MGF, digest length (input of the raw one)
        (CKM_RSA_PKCS_PSS, CKM_SHA256, CKG_MGF1_SHA256, 32, 32), (CKM_SHA1_RSA_PKCS_PSS, CKM_SHA_1, CKG_MGF1_SHA1, 20, 100),
        (CKM_SHA224_RSA_PKCS_PSS, CKM_SHA224, CKG_MGF1_SHA224, 28, 100), (CKM_SHA256_RSA_PKCS_PSS, CKM_SHA256, CKG_MGF1_SHA256, 32, 100),
        (CKM_SHA384_RSA_PKCS_PSS, CKM_SHA384, CKG_MGF1_SHA384, 48, 100), (CKM_SHA512_RSA_PKCS_PSS, CKM_SHA512, CKG_MGF1_SHA512, 64, 100),
    ]
    for (mechanismType, hash, mgf, length, input) in pss {
        let valid = a.parameter(CK_RSA_PKCS_PSS_PARAMS(hashAlg: CK_MECHANISM_TYPE(hash), mgf: CK_RSA_PKCS_MGF_TYPE(mgf), sLen: CK_ULONG(length)))
        let wrongHash = a.parameter(CK_RSA_PKCS_PSS_PARAMS(hashAlg: CK_MECHANISM_TYPE(hash == CKM_SHA_1 ? CKM_SHA256 : CKM_SHA_1),
                                                           mgf: CK_RSA_PKCS_MGF_TYPE(mgf), sLen: CK_ULONG(length)))
        let wrongMGF = a.parameter(CK_RSA_PKCS_PSS_PARAMS(hashAlg: CK_MECHANISM_TYPE(hash), mgf: 0x99, sLen: CK_ULONG(length)))
        let short = Parameter(pointer: valid.pointer, length: valid.length - 1)
        add(mechanismType, .sign(key: "rsa-private", verifyKey: "rsa-public", input: input), deterministic: false, valid: valid,
            invalid: [.none, wrongHash, wrongMGF, short])
    }
    let oaep = a.parameter(CK_RSA_PKCS_OAEP_PARAMS(hashAlg: CK_MECHANISM_TYPE(CKM_SHA_1), mgf: CK_RSA_PKCS_MGF_TYPE(CKG_MGF1_SHA1),
                                                   source: CK_RSA_PKCS_OAEP_SOURCE_TYPE(CKZ_DATA_SPECIFIED), pSourceData: nil, ulSourceDataLen: 0))
    let oaepSHA256 = a.parameter(CK_RSA_PKCS_OAEP_PARAMS(hashAlg: CK_MECHANISM_TYPE(CKM_SHA256), mgf: CK_RSA_PKCS_MGF_TYPE(CKG_MGF1_SHA256),
                                                         source: CK_RSA_PKCS_OAEP_SOURCE_TYPE(CKZ_DATA_SPECIFIED), pSourceData: nil, ulSourceDataLen: 0))
    let oaepLabel = a.parameter(CK_RSA_PKCS_OAEP_PARAMS(hashAlg: CK_MECHANISM_TYPE(CKM_SHA_1), mgf: CK_RSA_PKCS_MGF_TYPE(CKG_MGF1_SHA1),
                                                        source: CK_RSA_PKCS_OAEP_SOURCE_TYPE(CKZ_DATA_SPECIFIED), pSourceData: a.bytes([1, 2, 3]), ulSourceDataLen: 3))
    add(CKM_RSA_PKCS_OAEP, .encrypt(key: "rsa-public", decryptKey: "rsa-private", input: 40), deterministic: false, valid: oaep,
        invalid: [.none, oaepSHA256, oaepLabel, Parameter(pointer: oaep.pointer, length: oaep.length - 8)])

    add(CKM_ECDSA, .sign(key: "ec-private", verifyKey: "ec-public", input: 32), deterministic: false)
    // Ed25519 is deterministic; CK_EDDSA_PARAMS (phFlag, context) is the parameter of Ed25519ctx and Ed25519ph.
    add(CKM_EDDSA, .sign(key: "ed-private", verifyKey: "ed-public", input: 64),
        invalid: [garbage, a.parameter(CK_EDDSA_PARAMS(phFlag: CK_BBOOL(CK_TRUE), ulContextDataLen: 0, pContextData: nil))])
    add(CKM_DSA, .sign(key: "dsa-private", verifyKey: "dsa-public", input: 20), deterministic: false)
    for hashed in [CKM_DSA_SHA1, CKM_DSA_SHA224, CKM_DSA_SHA256, CKM_DSA_SHA384, CKM_DSA_SHA512] {
        add(hashed, .sign(key: "dsa-private", verifyKey: "dsa-public", input: 100), deterministic: false)
    }

    // Block ciphers: deterministic with a fixed IV. Invalid: an IV of the wrong length, none.
    add(CKM_AES_ECB, .encrypt(key: "aes", decryptKey: "aes", input: 64))
    add(CKM_AES_CBC, .encrypt(key: "aes", decryptKey: "aes", input: 64), valid: iv16, invalid: [.none, iv8])
    add(CKM_AES_CBC_PAD, .encrypt(key: "aes", decryptKey: "aes", input: 61), valid: iv16, invalid: [.none, iv8])
    var counter = CK_AES_CTR_PARAMS()
    counter.ulCounterBits = 32
    withUnsafeMutableBytes(of: &counter.cb) { $0.copyBytes(from: (0..<16).map { UInt8($0) }) }
    var noCounter = counter
    noCounter.ulCounterBits = 0
    add(CKM_AES_CTR, .encrypt(key: "aes", decryptKey: "aes", input: 61), valid: a.parameter(counter),
        invalid: [.none, a.parameter(noCounter), Parameter(pointer: iv16.pointer, length: 16)])
    let gcmIV = a.bytes((0..<12).map { UInt8($0) })
    let aad = a.bytes([9, 8, 7, 6])
    add(CKM_AES_GCM, .encrypt(key: "aes", decryptKey: "aes", input: 61),
        valid: a.parameter(CK_GCM_PARAMS(pIv: gcmIV, ulIvLen: 12, ulIvBits: 96, pAAD: aad, ulAADLen: 4, ulTagBits: 128)),
        invalid: [.none, a.parameter(CK_GCM_PARAMS(pIv: gcmIV, ulIvLen: 0, ulIvBits: 0, pAAD: aad, ulAADLen: 4, ulTagBits: 128)),
                  a.parameter(CK_GCM_PARAMS(pIv: gcmIV, ulIvLen: 12, ulIvBits: 96, pAAD: aad, ulAADLen: 4, ulTagBits: 200))])
    // SoftHSM 2.6.1 lists single DES, but OpenSSL 3 (without its legacy provider) has no DES cipher: refused with
    // CKR_MECHANISM_INVALID at C_*Init, directly as through the group.
    add(CKM_DES_ECB, .encrypt(key: "des", decryptKey: "des", input: 64), memberRefuses: true)
    add(CKM_DES_CBC, .encrypt(key: "des", decryptKey: "des", input: 64), valid: iv8, invalid: [.none, iv16], memberRefuses: true)
    add(CKM_DES_CBC_PAD, .encrypt(key: "des", decryptKey: "des", input: 61), valid: iv8, invalid: [.none, iv16], memberRefuses: true)
    add(CKM_DES3_ECB, .encrypt(key: "des3", decryptKey: "des3", input: 64))
    add(CKM_DES3_CBC, .encrypt(key: "des3", decryptKey: "des3", input: 64), valid: iv8, invalid: [.none, iv16])
    add(CKM_DES3_CBC_PAD, .encrypt(key: "des3", decryptKey: "des3", input: 61), valid: iv8, invalid: [.none, iv16])
    add(CKM_AES_KEY_WRAP, .wrap(wrappingKey: "aes", key: "target"))
    add(CKM_AES_KEY_WRAP_PAD, .wrap(wrappingKey: "aes", key: "target"))

    // Derivation: the derived key compared by a block it encrypts.
    let data16 = (0..<16).map { UInt8(0x30 + $0) }
    let string16 = a.parameter(CK_KEY_DERIVATION_STRING_DATA(pData: a.bytes(data16), ulLen: 16))
    let string15 = a.parameter(CK_KEY_DERIVATION_STRING_DATA(pData: a.bytes(data16), ulLen: 15))
    add(CKM_AES_ECB_ENCRYPT_DATA, .derive(key: "aes"), valid: string16, invalid: [.none, string15])
    add(CKM_DES_ECB_ENCRYPT_DATA, .derive(key: "des"), valid: string16, invalid: [.none, string15], memberRefuses: true)
    add(CKM_DES3_ECB_ENCRYPT_DATA, .derive(key: "des3"), valid: string16, invalid: [.none, string15])
    var aesCBC = CK_AES_CBC_ENCRYPT_DATA_PARAMS()
    withUnsafeMutableBytes(of: &aesCBC.iv) { $0.copyBytes(from: (0..<16).map { UInt8($0) }) }
    aesCBC.pData = a.bytes(data16)
    aesCBC.length = 16
    var aesCBCShort = aesCBC
    aesCBCShort.length = 15
    add(CKM_AES_CBC_ENCRYPT_DATA, .derive(key: "aes"), valid: a.parameter(aesCBC), invalid: [.none, a.parameter(aesCBCShort)])
    var desCBC = CK_DES_CBC_ENCRYPT_DATA_PARAMS()
    withUnsafeMutableBytes(of: &desCBC.iv) { $0.copyBytes(from: (0..<8).map { UInt8($0) }) }
    desCBC.pData = a.bytes(data16)
    desCBC.length = 16
    var desCBCShort = desCBC
    desCBCShort.length = 15
    add(CKM_DES_CBC_ENCRYPT_DATA, .derive(key: "des"), valid: a.parameter(desCBC), invalid: [.none, a.parameter(desCBCShort)],
        memberRefuses: true)
    add(CKM_DES3_CBC_ENCRYPT_DATA, .derive(key: "des3"), valid: a.parameter(desCBC), invalid: [.none, a.parameter(desCBCShort)])
    let ecPoint = a.bytes(domains.ecPeer)
    let ecdh = a.parameter(CK_ECDH1_DERIVE_PARAMS(kdf: CK_ULONG(CKD_NULL), ulSharedDataLen: 0, pSharedData: nil,
                                                   ulPublicDataLen: CK_ULONG(domains.ecPeer.count), pPublicData: ecPoint))
    let ecdhBadKDF = a.parameter(CK_ECDH1_DERIVE_PARAMS(kdf: 0x99, ulSharedDataLen: 0, pSharedData: nil,
                                                         ulPublicDataLen: CK_ULONG(domains.ecPeer.count), pPublicData: ecPoint))
    let ecdhNoPoint = a.parameter(CK_ECDH1_DERIVE_PARAMS(kdf: CK_ULONG(CKD_NULL), ulSharedDataLen: 0, pSharedData: nil,
                                                          ulPublicDataLen: 0, pPublicData: nil))
    add(CKM_ECDH1_DERIVE, .derive(key: "ec-private"), valid: ecdh, invalid: [.none, ecdhBadKDF, ecdhNoPoint])
    add(CKM_DH_PKCS_DERIVE, .derive(key: "dh-private"), valid: a.raw(domains.dhPeer), invalid: [.none])

    // Generation, of session objects: the same code with a good template and with one that lacks what it needs.
    func secretTemplate(_ length: CK_ULONG?) -> () -> Template {
        { let t = Template().add(CKA_TOKEN, bool: false).add(CKA_ENCRYPT, bool: true); if let length { t.add(CKA_VALUE_LEN, ulong: length) }; return t }
    }
    add(CKM_AES_KEY_GEN, .generate(template: secretTemplate(16)), invalid: [garbage])
    add(CKM_GENERIC_SECRET_KEY_GEN, .generate(template: secretTemplate(32)), invalid: [garbage])
    add(CKM_DES_KEY_GEN, .generate(template: secretTemplate(nil)), invalid: [garbage])
    add(CKM_DES2_KEY_GEN, .generate(template: secretTemplate(nil)), invalid: [garbage])
    add(CKM_DES3_KEY_GEN, .generate(template: secretTemplate(nil)), invalid: [garbage])
    let session = { Template().add(CKA_TOKEN, bool: false) }
    add(CKM_RSA_PKCS_KEY_PAIR_GEN, .generatePair(publicTemplate: { session().add(CKA_MODULUS_BITS, ulong: 1024) }, privateTemplate: session),
        invalid: [garbage])
    add(CKM_EC_KEY_PAIR_GEN, .generatePair(publicTemplate: { session().add(CKA_EC_PARAMS, p256) }, privateTemplate: session), invalid: [garbage])
    add(CKM_EC_EDWARDS_KEY_PAIR_GEN, .generatePair(publicTemplate: { session().add(CKA_EC_PARAMS, ed25519) }, privateTemplate: session),
        invalid: [garbage])
    add(CKM_DSA_PARAMETER_GEN, .generate(template: {
        Template().add(CKA_CLASS, ulong: CK_ULONG(CKO_DOMAIN_PARAMETERS)).add(CKA_KEY_TYPE, ulong: CK_ULONG(CKK_DSA))
            .add(CKA_PRIME_BITS, ulong: 1024).add(CKA_TOKEN, bool: false) }), invalid: [garbage])
    add(CKM_DH_PKCS_PARAMETER_GEN, .generate(template: {
        Template().add(CKA_CLASS, ulong: CK_ULONG(CKO_DOMAIN_PARAMETERS)).add(CKA_KEY_TYPE, ulong: CK_ULONG(CKK_DH))
            .add(CKA_PRIME_BITS, ulong: 512).add(CKA_TOKEN, bool: false) }), invalid: [garbage])
    add(CKM_DSA_KEY_PAIR_GEN, .generatePair(publicTemplate: {
        session().add(CKA_PRIME, domains.dsa[0]).add(CKA_SUBPRIME, domains.dsa[1]).add(CKA_BASE, domains.dsa[2]) }, privateTemplate: session), invalid: [garbage])
    add(CKM_DH_PKCS_KEY_PAIR_GEN, .generatePair(publicTemplate: {
        session().add(CKA_PRIME, domains.dh[0]).add(CKA_BASE, domains.dh[1]) }, privateTemplate: session), invalid: [garbage])
    return cases
}
