// Scenarios for key types beyond RSA, EC and AES: DSA and DH domain parameters and key pairs, and keys the members
// cannot carry to each other (SoftHSM 2.6.1 cannot wrap EdDSA keys) under each generated-keys policy.
import CInterop
import Glibc

/// Ed25519's curve, as its OID (1.3.101.112, DER).
let ed25519: [UInt8] = [0x06, 0x03, 0x2b, 0x65, 0x70]

/// DSA and DH domain parameters generated through the group, and key pairs made from them: every member holds each
/// once with the same values; a DSA signature by one member's copy verifies with another's public copy; two DH
/// parties derive one secret through the group.
func domainParametersScenario(_ m: Module) {
    let s = initialized(m)
    let session = openLoggedIn(m, slot: s, pin: userPIN)
    let f = m.f
    let run = "\(getpid())"

    var dsaParameterGen = mechanism(CKM_DSA_PARAMETER_GEN)
    let dsaDomain = Template().add(CKA_CLASS, ulong: CK_ULONG(CKO_DOMAIN_PARAMETERS)).add(CKA_KEY_TYPE, ulong: CK_ULONG(CKK_DSA))
        .add(CKA_PRIME_BITS, ulong: 1024).add(CKA_TOKEN, bool: true).add(CKA_LABEL, string: "dp-dsa-\(run)")
    var dsaParameters: CK_OBJECT_HANDLE = 0
    ok(f.C_GenerateKey!(session, &dsaParameterGen, &dsaDomain.attributes, dsaDomain.count, &dsaParameters), "C_GenerateKey of DSA domain parameters")
    let values = [CKA_PRIME, CKA_SUBPRIME, CKA_BASE].map { attribute(m, session, dsaParameters, CK_ATTRIBUTE_TYPE($0)) }
    guard let prime = values[0], let subprime = values[1], let base = values[2], !prime.isEmpty else { fatal("the DSA domain parameters have no prime, subprime or base") }

    var dsaGen = mechanism(CKM_DSA_KEY_PAIR_GEN)
    let dsaPublic = Template().add(CKA_PRIME, prime).add(CKA_SUBPRIME, subprime).add(CKA_BASE, base).add(CKA_VERIFY, bool: true)
        .add(CKA_TOKEN, bool: true).add(CKA_LABEL, string: "dp-dsa-\(run)")
    let dsaPrivate = Template().add(CKA_SIGN, bool: true).add(CKA_TOKEN, bool: true).add(CKA_PRIVATE, bool: true)
        .add(CKA_SENSITIVE, bool: true).add(CKA_LABEL, string: "dp-dsa-\(run)")
    var dsaPub: CK_OBJECT_HANDLE = 0
    var dsaPriv: CK_OBJECT_HANDLE = 0
    ok(f.C_GenerateKeyPair!(session, &dsaGen, &dsaPublic.attributes, dsaPublic.count, &dsaPrivate.attributes, dsaPrivate.count, &dsaPub, &dsaPriv),
       "DSA token C_GenerateKeyPair from the parameters")
    for _ in 0..<20 {
        guard let signature = signDSA(m, session, dsaPriv) else { check(false, "a DSA signature through the group"); break }
        expect(verifyDSA(m, session, dsaPub, signature), CKR_OK, "a DSA signature through the group verifies through the group")
    }

    // DH: parameters, two parties' session key pairs, and one agreed secret whichever member derives it.
    var dhParameterGen = mechanism(CKM_DH_PKCS_PARAMETER_GEN)
    let dhDomain = Template().add(CKA_CLASS, ulong: CK_ULONG(CKO_DOMAIN_PARAMETERS)).add(CKA_KEY_TYPE, ulong: CK_ULONG(CKK_DH))
        .add(CKA_PRIME_BITS, ulong: 512).add(CKA_TOKEN, bool: true).add(CKA_LABEL, string: "dp-dh-\(run)")
    var dhParameters: CK_OBJECT_HANDLE = 0
    ok(f.C_GenerateKey!(session, &dhParameterGen, &dhDomain.attributes, dhDomain.count, &dhParameters), "C_GenerateKey of DH domain parameters")
    guard let dhPrime = attribute(m, session, dhParameters, CK_ATTRIBUTE_TYPE(CKA_PRIME)),
          let dhBase = attribute(m, session, dhParameters, CK_ATTRIBUTE_TYPE(CKA_BASE)) else { fatal("the DH domain parameters have no prime or base") }
    var parties: [(pub: CK_OBJECT_HANDLE, priv: CK_OBJECT_HANDLE)] = []
    for _ in 0..<2 {
        var dhGen = mechanism(CKM_DH_PKCS_KEY_PAIR_GEN)
        let pub = Template().add(CKA_PRIME, dhPrime).add(CKA_BASE, dhBase).add(CKA_TOKEN, bool: false)
        let priv = Template().add(CKA_DERIVE, bool: true).add(CKA_TOKEN, bool: false)
        var a: CK_OBJECT_HANDLE = 0
        var b: CK_OBJECT_HANDLE = 0
        ok(f.C_GenerateKeyPair!(session, &dhGen, &pub.attributes, pub.count, &priv.attributes, priv.count, &a, &b), "DH session C_GenerateKeyPair")
        parties.append((a, b))
    }
    var secrets: [CK_OBJECT_HANDLE] = []
    for (me, peer) in [(0, 1), (1, 0)] {
        guard var peerValue = attribute(m, session, parties[peer].pub, CK_ATTRIBUTE_TYPE(CKA_VALUE)) else { fatal("a DH public key has no value") }
        let derived = Template().add(CKA_CLASS, ulong: CK_ULONG(CKO_SECRET_KEY)).add(CKA_KEY_TYPE, ulong: CK_ULONG(CKK_AES))
            .add(CKA_VALUE_LEN, ulong: 16).add(CKA_ENCRYPT, bool: true).add(CKA_TOKEN, bool: false)
        var secret: CK_OBJECT_HANDLE = 0
        let rv = peerValue.withUnsafeMutableBytes { raw -> CK_RV in
            var dhDerive = CK_MECHANISM(mechanism: CK_MECHANISM_TYPE(CKM_DH_PKCS_DERIVE), pParameter: raw.baseAddress, ulParameterLen: CK_ULONG(raw.count))
            return f.C_DeriveKey!(session, &dhDerive, parties[me].priv, &derived.attributes, derived.count, &secret)
        }
        ok(rv, "C_DeriveKey by DH")
        secrets.append(secret)
    }
    var agreed = Set<[UInt8]>()
    for _ in 0..<10 {
        for secret in secrets {
            if let block = encryptBlock(m, session, secret) { agreed.insert(block) } else { check(false, "encrypt with a DH-derived key") }
        }
    }
    check(agreed.count == 1, "both parties derive one secret, whichever member derives and encrypts (\(agreed.count) different blocks)")
    ok(f.C_Finalize!(nil), "C_Finalize")

    // Each member, opened directly: the parameters and the DSA pair once each, with the same values.
    let direct = Module(path: env("SOFTHSM_MODULE") ?? "")
    ok(direct.f.C_Initialize!(nil), "C_Initialize SoftHSM directly")
    var copies: [(label: String, session: CK_SESSION_HANDLE, pub: CK_OBJECT_HANDLE, priv: CK_OBJECT_HANDLE)] = []
    for label in (env("P11HA_TEST_MEMBERS") ?? "").split(separator: ",").map(String.init) {
        guard let memberSlot = slot(labelled: label, in: direct) else { fatal("no member \(label)") }
        let ms = openLoggedIn(direct, slot: memberSlot, pin: userPIN)
        let ofClass = { (objectClass: CK_OBJECT_CLASS, name: String) in
            find(direct, ms, Template().add(CKA_LABEL, string: name).add(CKA_CLASS, ulong: CK_ULONG(objectClass)))
        }
        for (name, expected) in [("dp-dsa-\(run)", [prime, subprime, base]), ("dp-dh-\(run)", [dhPrime, [], dhBase])] {
            let found = ofClass(CKO_DOMAIN_PARAMETERS, name)
            check(found.count == 1, "\(label) holds the domain parameters \(name) once (\(found.count))")
            guard found.count == 1 else { continue }
            for (type, value) in zip([CKA_PRIME, CKA_SUBPRIME, CKA_BASE], expected) where !value.isEmpty {
                check(attribute(direct, ms, found[0], CK_ATTRIBUTE_TYPE(type)) == value, "\(label): attribute 0x\(String(type, radix: 16)) of \(name) as generated")
            }
        }
        let pub = ofClass(CKO_PUBLIC_KEY, "dp-dsa-\(run)")
        let priv = ofClass(CKO_PRIVATE_KEY, "dp-dsa-\(run)")
        check(pub.count == 1 && priv.count == 1, "\(label) holds the DSA key pair once (\(pub.count) public, \(priv.count) private)")
        if pub.count == 1, priv.count == 1 { copies.append((label, ms, pub[0], priv[0])) }
    }
    check(copies.count >= 2, "the DSA key pair reached several members")
    if let first = copies.first {
        for copy in copies.dropFirst() {
            for type in [CKA_PRIME, CKA_SUBPRIME, CKA_BASE, CKA_VALUE] {
                check(attribute(direct, first.session, first.pub, CK_ATTRIBUTE_TYPE(type)) == attribute(direct, copy.session, copy.pub, CK_ATTRIBUTE_TYPE(type)),
                      "DSA public attribute 0x\(String(type, radix: 16)) is equal on \(first.label) and \(copy.label)")
            }
            if let signature = signDSA(direct, first.session, first.priv) {
                expect(verifyDSA(direct, copy.session, copy.pub, signature), CKR_OK,
                       "a DSA signature by \(first.label)'s copy verifies with \(copy.label)'s public key")
            } else {
                check(false, "a DSA signature on \(first.label) directly")
            }
        }
    }
    ok(direct.f.C_Finalize!(nil), "C_Finalize SoftHSM")
}

/// A DSA signature (CKM_DSA) of a 20-byte digest, or nil.
private func signDSA(_ m: Module, _ session: CK_SESSION_HANDLE, _ key: CK_OBJECT_HANDLE) -> [UInt8]? {
    var dsa = mechanism(CKM_DSA)
    var digest = [UInt8](repeating: 0x2d, count: 20)
    var signature = [UInt8](repeating: 0, count: 40)
    var length = CK_ULONG(signature.count)
    guard m.f.C_SignInit!(session, &dsa, key) == CKR_OK, m.f.C_Sign!(session, &digest, 20, &signature, &length) == CKR_OK else { return nil }
    return Array(signature.prefix(Int(length)))
}

private func verifyDSA(_ m: Module, _ session: CK_SESSION_HANDLE, _ key: CK_OBJECT_HANDLE, _ signature: [UInt8]) -> CK_RV {
    var dsa = mechanism(CKM_DSA)
    var digest = [UInt8](repeating: 0x2d, count: 20)
    var signature = signature
    let rv = m.f.C_VerifyInit!(session, &dsa, key)
    if rv != CKR_OK { return rv }
    return m.f.C_Verify!(session, &digest, 20, &signature, CK_ULONG(signature.count))
}

/// An Ed25519 key pair generated through the group, labelled `label`: the return value, and the handles.
private func generateEd25519(_ m: Module, _ session: CK_SESSION_HANDLE, label: String, token: Bool = true) -> (CK_RV, CK_OBJECT_HANDLE, CK_OBJECT_HANDLE) {
    var gen = mechanism(CKM_EC_EDWARDS_KEY_PAIR_GEN)
    let pub = Template().add(CKA_EC_PARAMS, ed25519).add(CKA_VERIFY, bool: true).add(CKA_TOKEN, bool: token).add(CKA_LABEL, string: label)
    let priv = Template().add(CKA_SIGN, bool: true).add(CKA_TOKEN, bool: token).add(CKA_PRIVATE, bool: true)
        .add(CKA_SENSITIVE, bool: true).add(CKA_LABEL, string: label)
    var a: CK_OBJECT_HANDLE = 0
    var b: CK_OBJECT_HANDLE = 0
    let rv = m.f.C_GenerateKeyPair!(session, &gen, &pub.attributes, pub.count, &priv.attributes, priv.count, &a, &b)
    return (rv, a, b)
}

/// How many token objects labelled `label` each member holds, read directly, by class (private, public).
private func copiesOnMembers(label: String) -> [(member: String, privateKeys: Int, publicKeys: Int)] {
    let direct = Module(path: env("SOFTHSM_MODULE") ?? "")
    ok(direct.f.C_Initialize!(nil), "C_Initialize SoftHSM directly")
    defer { ok(direct.f.C_Finalize!(nil), "C_Finalize SoftHSM") }
    return (env("P11HA_TEST_MEMBERS") ?? "").split(separator: ",").map(String.init).map { member in
        guard let memberSlot = slot(labelled: member, in: direct) else { fatal("no member \(member)") }
        let ms = openLoggedIn(direct, slot: memberSlot, pin: userPIN)
        let count = { (objectClass: CK_OBJECT_CLASS) in
            find(direct, ms, Template().add(CKA_LABEL, string: label).add(CKA_CLASS, ulong: CK_ULONG(objectClass))).count
        }
        return (member, count(CKO_PRIVATE_KEY), count(CKO_PUBLIC_KEY))
    }
}

/// Under the default policy (generated-keys = replicate), a token key type the members cannot carry (Ed25519 on
/// SoftHSM 2.6.1) fails its generation with CKR_FUNCTION_FAILED, a code C_GenerateKeyPair may return, and leaves
/// nothing on any member. A session key pair of that type stays on the member that made it, and signs.
func uncarriedKeyScenario(_ m: Module) {
    let s = initialized(m)
    let session = openLoggedIn(m, slot: s, pin: userPIN)
    let label = "uncarried-\(getpid())"
    let (rv, _, _) = generateEd25519(m, session, label: label)
    expect(rv, CK_RV(CKR_FUNCTION_FAILED), "an Ed25519 token key pair the members cannot carry, under generated-keys = replicate")
    let (sessionRV, _, priv) = generateEd25519(m, session, label: label + "-session", token: false)
    expect(sessionRV, CKR_OK, "an Ed25519 session key pair, kept on the member that made it")
    if sessionRV == CKR_OK {
        for _ in 0..<10 {
            var eddsa = mechanism(CKM_EDDSA)
            var message = Array("signed by a session key on one member".utf8)
            var signature = [UInt8](repeating: 0, count: 64)
            var length: CK_ULONG = 64
            guard expect(m.f.C_SignInit!(session, &eddsa, priv), CKR_OK, "C_SignInit with the session key"),
                  expect(m.f.C_Sign!(session, &message, CK_ULONG(message.count), &signature, &length), CKR_OK, "C_Sign with the session key") else { break }
        }
    }
    ok(m.f.C_Finalize!(nil), "C_Finalize")
    for copy in copiesOnMembers(label: label) {
        check(copy.privateKeys == 0 && copy.publicKeys == 0, "\(copy.member) holds nothing of the failed generation (\(copy.privateKeys) private, \(copy.publicKeys) public)")
    }
}

/// Under generated-keys = replicate-or-keep, such a key pair is kept on the member that made it: every signature
/// through the group is made there and verifies, and no other member holds the private key. A signature with
/// CK_EDDSA_PARAMS (PKCS#11 3.0) through the group is the one the member gives directly (Ed25519 is deterministic).
func keptKeyScenario(_ m: Module) {
    let s = initialized(m)
    let session = openLoggedIn(m, slot: s, pin: userPIN)
    let label = "kept-\(getpid())"
    let (rv, pub, priv) = generateEd25519(m, session, label: label)
    ok(rv, "an Ed25519 key pair under generated-keys = replicate-or-keep")
    let message = Array("a message signed by the kept key".utf8)
    var throughGroup: [UInt8]? = nil
    for round in 0..<20 {
        var eddsa = mechanism(CKM_EDDSA)
        var signature = [UInt8](repeating: 0, count: 64)
        var length: CK_ULONG = 64
        var text = message
        let signed = withEdDSA(parameters: round % 2 == 1) { (mech: UnsafeMutablePointer<CK_MECHANISM>) -> Bool in
            expect(m.f.C_SignInit!(session, mech, priv), CKR_OK, "C_SignInit with the kept key")
                && expect(m.f.C_Sign!(session, &text, CK_ULONG(text.count), &signature, &length), CKR_OK, "C_Sign with the kept key")
        }
        guard signed else { break }
        if round % 2 == 1 { throughGroup = Array(signature.prefix(Int(length))) }
        expect(m.f.C_VerifyInit!(session, &eddsa, pub), CKR_OK, "C_VerifyInit with the kept public key")
        expect(m.f.C_Verify!(session, &text, CK_ULONG(text.count), &signature, length), CKR_OK, "the kept key's signature verifies")
    }
    ok(m.f.C_Finalize!(nil), "C_Finalize")
    let copies = copiesOnMembers(label: label)
    check(copies.map(\.privateKeys).reduce(0, +) == 1 && copies.allSatisfy { $0.privateKeys <= 1 },
          "exactly one member holds the kept private key: \(copies.map { "\($0.member)=\($0.privateKeys)" })")
    let keeper = copies.filter { $0.privateKeys == 1 }.map(\.member)
    print("kept-on=\(keeper.joined(separator: ","))")

    // The keeper, directly: the same signature with the same parameter.
    let direct = Module(path: env("SOFTHSM_MODULE") ?? "")
    ok(direct.f.C_Initialize!(nil), "C_Initialize SoftHSM directly")
    if let member = keeper.first, let memberSlot = slot(labelled: member, in: direct) {
        let ms = openLoggedIn(direct, slot: memberSlot, pin: userPIN)
        let found = find(direct, ms, Template().add(CKA_LABEL, string: label).add(CKA_CLASS, ulong: CK_ULONG(CKO_PRIVATE_KEY)))
        var signature = [UInt8](repeating: 0, count: 64)
        var length: CK_ULONG = 64
        var text = message
        if found.count == 1 {
            _ = withEdDSA(parameters: true) { (mech: UnsafeMutablePointer<CK_MECHANISM>) -> Bool in
                expect(direct.f.C_SignInit!(ms, mech, found[0]), CKR_OK, "direct C_SignInit with CK_EDDSA_PARAMS")
                    && expect(direct.f.C_Sign!(ms, &text, CK_ULONG(text.count), &signature, &length), CKR_OK, "direct C_Sign")
            }
        }
        check(throughGroup != nil && throughGroup == Array(signature.prefix(Int(length))),
              "a signature with CK_EDDSA_PARAMS through the group is the member's own")
    } else {
        check(false, "the keeper is a member")
    }
    ok(direct.f.C_Finalize!(nil), "C_Finalize SoftHSM")
}

/// Runs `body` with CKM_EDDSA, and with a CK_EDDSA_PARAMS (no prehash, a context) if `parameters`.
private func withEdDSA(parameters: Bool, _ body: (UnsafeMutablePointer<CK_MECHANISM>) -> Bool) -> Bool {
    guard parameters else {
        var plain = mechanism(CKM_EDDSA)
        return body(&plain)
    }
    var context = Array("p11ha".utf8)
    return context.withUnsafeMutableBufferPointer { c in
        var parameters = CK_EDDSA_PARAMS(phFlag: CK_BBOOL(0), ulContextDataLen: CK_ULONG(c.count), pContextData: c.baseAddress)
        return withUnsafeMutablePointer(to: &parameters) { p in
            var mech = CK_MECHANISM(mechanism: CK_MECHANISM_TYPE(CKM_EDDSA), pParameter: UnsafeMutableRawPointer(p),
                                    ulParameterLen: CK_ULONG(MemoryLayout<CK_EDDSA_PARAMS>.size))
            return body(&mech)
        }
    }
}

/// Secret keys generated through the group answer their CKA_VALUE_LEN as one token does, although each member's
/// copy is an unwrapped one, which SoftHSM 2.6.1 leaves at 0 (checked on the members directly, so that the
/// group's answer is shown to be its own).
func valueLengthScenario(_ m: Module) {
    let s = initialized(m)
    let session = openLoggedIn(m, slot: s, pin: userPIN)
    let f = m.f
    let run = "\(getpid())"
    let keys: [(label: String, mechanism: CK_ULONG, type: CK_ULONG, length: CK_ULONG)] = [
        ("vl-aes16-\(run)", CKM_AES_KEY_GEN, CKK_AES, 16), ("vl-aes24-\(run)", CKM_AES_KEY_GEN, CKK_AES, 24),
        ("vl-aes32-\(run)", CKM_AES_KEY_GEN, CKK_AES, 32), ("vl-hmac-\(run)", CKM_GENERIC_SECRET_KEY_GEN, CKK_GENERIC_SECRET, 48),
    ]
    var made: [CK_OBJECT_HANDLE] = []
    for key in keys {
        var generate = mechanism(key.mechanism)
        let template = Template().add(CKA_VALUE_LEN, ulong: key.length).add(CKA_TOKEN, bool: true).add(CKA_PRIVATE, bool: true)
            .add(CKA_SIGN, bool: true).add(CKA_LABEL, string: key.label)
        var handle: CK_OBJECT_HANDLE = 0
        ok(f.C_GenerateKey!(session, &generate, &template.attributes, template.count, &handle), "C_GenerateKey of \(key.label)")
        made.append(handle)
    }
    for _ in 0..<3 {
        for (key, handle) in zip(keys, made) {
            // In one template with other attributes, as p11test and OpenSSL read it.
            var objectClass = CK_ULONG(0), keyType = CK_ULONG(0), length = CK_ULONG(0)
            let rv = withUnsafeMutablePointer(to: &objectClass) { c in
                withUnsafeMutablePointer(to: &keyType) { t in
                    withUnsafeMutablePointer(to: &length) { l in
                        var template = [CK_ATTRIBUTE(type: CK_ATTRIBUTE_TYPE(CKA_CLASS), pValue: c, ulValueLen: CK_ULONG(MemoryLayout<CK_ULONG>.size)),
                                        CK_ATTRIBUTE(type: CK_ATTRIBUTE_TYPE(CKA_VALUE_LEN), pValue: l, ulValueLen: CK_ULONG(MemoryLayout<CK_ULONG>.size)),
                                        CK_ATTRIBUTE(type: CK_ATTRIBUTE_TYPE(CKA_KEY_TYPE), pValue: t, ulValueLen: CK_ULONG(MemoryLayout<CK_ULONG>.size))]
                        return f.C_GetAttributeValue!(session, handle, &template, 3)
                    }
                }
            }
            expect(rv, CKR_OK, "C_GetAttributeValue of \(key.label)")
            check(objectClass == CKO_SECRET_KEY && keyType == key.type && length == key.length,
                  "\(key.label) answers CKA_VALUE_LEN \(key.length) through the group (class \(objectClass), type \(keyType), length \(length))")
        }
    }
    ok(f.C_Finalize!(nil), "C_Finalize")

    let direct = Module(path: env("SOFTHSM_MODULE") ?? "")
    ok(direct.f.C_Initialize!(nil), "C_Initialize SoftHSM directly")
    var zeros = 0
    for label in (env("P11HA_TEST_MEMBERS") ?? "").split(separator: ",").map(String.init) {
        guard let memberSlot = slot(labelled: label, in: direct) else { fatal("no member \(label)") }
        let ms = openLoggedIn(direct, slot: memberSlot, pin: userPIN)
        for key in keys {
            let found = find(direct, ms, Template().add(CKA_LABEL, string: key.label))
            guard check(found.count == 1, "\(label) holds \(key.label) once (\(found.count))") else { continue }
            let value = attribute(direct, ms, found[0], CK_ATTRIBUTE_TYPE(CKA_VALUE_LEN)) ?? []
            if value == withUnsafeBytes(of: CK_ULONG(0), { Array($0) }) { zeros += 1 }
        }
    }
    check(zeros > 0, "the members' own copies answer CKA_VALUE_LEN 0 (\(zeros) copies)")
    ok(direct.f.C_Finalize!(nil), "C_Finalize SoftHSM")
}

/// Every mechanism the group lists for generation (CKF_GENERATE, CKF_GENERATE_KEY_PAIR), used through the group
/// for a token object: each member then holds it once and it is the same key everywhere (secret keys: the same
/// SHA-256 by C_DigestKey; key pairs: one member's signature verifies with every other's public key, DH copies
/// agree with one peer; domain parameters: the same prime), or the generated-keys policy answers with
/// CKR_FUNCTION_FAILED and nothing is left (Ed25519 under the default, replicate).
func generatedKeysScenario(_ m: Module) {
    let s = initialized(m)
    let session = openLoggedIn(m, slot: s, pin: userPIN)
    let f = m.f
    let run = "gk-\(getpid())"
    var listed = [CK_MECHANISM_TYPE](repeating: 0, count: 256)
    var count = CK_ULONG(listed.count)
    ok(f.C_GetMechanismList!(s, &listed, &count), "C_GetMechanismList")
    let generators = listed.prefix(Int(count)).filter { type in
        var info = CK_MECHANISM_INFO()
        return f.C_GetMechanismInfo!(s, type, &info) == CKR_OK && info.flags & CK_FLAGS(CKF_GENERATE | CKF_GENERATE_KEY_PAIR) != 0
    }
    check(generators.count >= 10, "the group lists the members' generation mechanisms (\(generators.count))")

    // DSA and DH keys need domain parameters: generated once, as session objects.
    func domain(_ mechanismType: CK_ULONG, _ keyType: CK_ULONG, bits: CK_ULONG, token: Bool, label: String) -> (CK_OBJECT_HANDLE, [[UInt8]]) {
        var gen = mechanism(CK_MECHANISM_TYPE(mechanismType))
        let t = Template().add(CKA_CLASS, ulong: CK_ULONG(CKO_DOMAIN_PARAMETERS)).add(CKA_KEY_TYPE, ulong: keyType)
            .add(CKA_PRIME_BITS, ulong: bits).add(CKA_TOKEN, bool: token).add(CKA_LABEL, string: label)
        var handle: CK_OBJECT_HANDLE = 0
        ok(f.C_GenerateKey!(session, &gen, &t.attributes, t.count, &handle), "C_GenerateKey of domain parameters (\(label))")
        return (handle, [CKA_PRIME, CKA_SUBPRIME, CKA_BASE].map { attribute(m, session, handle, CK_ATTRIBUTE_TYPE($0)) ?? [] })
    }
    let dsa = domain(CKM_DSA_PARAMETER_GEN, CK_ULONG(CKK_DSA), bits: 1024, token: false, label: "\(run)-dsa-domain").1
    let dh = domain(CKM_DH_PKCS_PARAMETER_GEN, CK_ULONG(CKK_DH), bits: 512, token: false, label: "\(run)-dh-domain").1

    enum Kind { case secret, pair(sign: CK_ULONG?, input: Int), agreement, parameters, uncarried }
    var made: [(label: String, mechanism: CK_MECHANISM_TYPE, kind: Kind)] = []
    for type in generators {
        let label = "\(run)-\(String(type, radix: 16))"
        var gen = mechanism(type)
        let rv: CK_RV
        let kind: Kind
        func secret(_ length: CK_ULONG?) -> CK_RV {
            let t = Template().add(CKA_TOKEN, bool: true).add(CKA_PRIVATE, bool: true).add(CKA_SENSITIVE, bool: true)
                .add(CKA_ENCRYPT, bool: true).add(CKA_SIGN, bool: true).add(CKA_LABEL, string: label)
            if let length { t.add(CKA_VALUE_LEN, ulong: length) }
            var key: CK_OBJECT_HANDLE = 0
            return f.C_GenerateKey!(session, &gen, &t.attributes, t.count, &key)
        }
        func pair(_ pub: Template, _ priv: Template) -> CK_RV {
            pub.add(CKA_TOKEN, bool: true).add(CKA_LABEL, string: label)
            priv.add(CKA_TOKEN, bool: true).add(CKA_PRIVATE, bool: true).add(CKA_SENSITIVE, bool: true).add(CKA_LABEL, string: label)
            var a: CK_OBJECT_HANDLE = 0, b: CK_OBJECT_HANDLE = 0
            return f.C_GenerateKeyPair!(session, &gen, &pub.attributes, pub.count, &priv.attributes, priv.count, &a, &b)
        }
        switch type {
        case CK_MECHANISM_TYPE(CKM_AES_KEY_GEN): rv = secret(32); kind = .secret
        case CK_MECHANISM_TYPE(CKM_GENERIC_SECRET_KEY_GEN): rv = secret(40); kind = .secret
        case CK_MECHANISM_TYPE(CKM_DES_KEY_GEN), CK_MECHANISM_TYPE(CKM_DES2_KEY_GEN), CK_MECHANISM_TYPE(CKM_DES3_KEY_GEN):
            rv = secret(nil); kind = .secret
        case CK_MECHANISM_TYPE(CKM_RSA_PKCS_KEY_PAIR_GEN):
            rv = pair(Template().add(CKA_MODULUS_BITS, ulong: 2048).add(CKA_VERIFY, bool: true), Template().add(CKA_SIGN, bool: true))
            kind = .pair(sign: CKM_SHA256_RSA_PKCS, input: 100)
        case CK_MECHANISM_TYPE(CKM_EC_KEY_PAIR_GEN):
            rv = pair(Template().add(CKA_EC_PARAMS, p256).add(CKA_VERIFY, bool: true), Template().add(CKA_SIGN, bool: true))
            kind = .pair(sign: CKM_ECDSA, input: 32)
        case CK_MECHANISM_TYPE(CKM_DSA_KEY_PAIR_GEN):
            rv = pair(Template().add(CKA_PRIME, dsa[0]).add(CKA_SUBPRIME, dsa[1]).add(CKA_BASE, dsa[2]).add(CKA_VERIFY, bool: true),
                      Template().add(CKA_SIGN, bool: true))
            kind = .pair(sign: CKM_DSA_SHA256, input: 100)
        case CK_MECHANISM_TYPE(CKM_DH_PKCS_KEY_PAIR_GEN):
            rv = pair(Template().add(CKA_PRIME, dh[0]).add(CKA_BASE, dh[2]), Template().add(CKA_DERIVE, bool: true))
            kind = .agreement
        case CK_MECHANISM_TYPE(CKM_EC_EDWARDS_KEY_PAIR_GEN):
            rv = pair(Template().add(CKA_EC_PARAMS, ed25519).add(CKA_VERIFY, bool: true), Template().add(CKA_SIGN, bool: true))
            kind = .uncarried
        case CK_MECHANISM_TYPE(CKM_DSA_PARAMETER_GEN):
            _ = domain(CKM_DSA_PARAMETER_GEN, CK_ULONG(CKK_DSA), bits: 1024, token: true, label: label); rv = CK_RV(CKR_OK); kind = .parameters
        case CK_MECHANISM_TYPE(CKM_DH_PKCS_PARAMETER_GEN):
            _ = domain(CKM_DH_PKCS_PARAMETER_GEN, CK_ULONG(CKK_DH), bits: 512, token: true, label: label); rv = CK_RV(CKR_OK); kind = .parameters
        default:
            check(false, "the group lists generation mechanism 0x\(String(type, radix: 16)), which this scenario lacks")
            continue
        }
        if case .uncarried = kind {
            // SoftHSM 2.6.1 cannot wrap EdDSA keys: under the default policy (replicate) the generation fails.
            expect(rv, CKR_FUNCTION_FAILED, "generating with 0x\(String(type, radix: 16)) (a key type the members cannot carry)")
        } else {
            expect(rv, CKR_OK, "generating a token object with 0x\(String(type, radix: 16))")
        }
        made.append((label, type, kind))
    }
    ok(f.C_Finalize!(nil), "C_Finalize")

    // Each member, directly.
    let direct = Module(path: env("SOFTHSM_MODULE") ?? "")
    ok(direct.f.C_Initialize!(nil), "C_Initialize SoftHSM directly")
    var sessions: [(label: String, session: CK_SESSION_HANDLE)] = []
    for label in (env("P11HA_TEST_MEMBERS") ?? "").split(separator: ",").map(String.init) {
        guard let memberSlot = slot(labelled: label, in: direct) else { fatal("no member \(label)") }
        sessions.append((label, openLoggedIn(direct, slot: memberSlot, pin: userPIN)))
    }
    func copies(_ label: String, _ objectClass: CK_ULONG) -> [(member: String, session: CK_SESSION_HANDLE, handle: CK_OBJECT_HANDLE)] {
        sessions.compactMap { member in
            let found = find(direct, member.session, Template().add(CKA_LABEL, string: label).add(CKA_CLASS, ulong: objectClass))
            check(found.count == 1, "\(member.label) holds \(label) (class \(objectClass)) once (\(found.count))")
            return found.count == 1 ? (member.label, member.session, found[0]) : nil
        }
    }
    for key in made {
        let name = "0x\(String(key.mechanism, radix: 16))"
        switch key.kind {
        case .secret:
            var digests = Set<[UInt8]>()
            for copy in copies(key.label, CK_ULONG(CKO_SECRET_KEY)) {
                var sha256 = mechanism(CK_MECHANISM_TYPE(CKM_SHA256))
                var digest = [UInt8](repeating: 0, count: 32)
                var length: CK_ULONG = 32
                guard expect(direct.f.C_DigestInit!(copy.session, &sha256), CKR_OK, "C_DigestInit on \(copy.member)"),
                      expect(direct.f.C_DigestKey!(copy.session, copy.handle), CKR_OK, "C_DigestKey of the \(name) key on \(copy.member)"),
                      expect(direct.f.C_DigestFinal!(copy.session, &digest, &length), CKR_OK, "C_DigestFinal on \(copy.member)") else { continue }
                digests.insert(digest)
            }
            check(digests.count == 1, "the \(name) key is the same on every member (\(digests.count) different digests)")
        case .pair(let signing, let size):
            let privates = copies(key.label, CK_ULONG(CKO_PRIVATE_KEY))
            let publics = copies(key.label, CK_ULONG(CKO_PUBLIC_KEY))
            guard let signing else { break }
            for signer in privates {
                var sign = mechanism(CK_MECHANISM_TYPE(signing))
                var input = [UInt8](repeating: 0x5a, count: size)
                var signature = [UInt8](repeating: 0, count: 512)
                var length = CK_ULONG(signature.count)
                guard expect(direct.f.C_SignInit!(signer.session, &sign, signer.handle), CKR_OK, "C_SignInit with \(signer.member)'s \(name) key"),
                      expect(direct.f.C_Sign!(signer.session, &input, CK_ULONG(size), &signature, &length), CKR_OK, "C_Sign on \(signer.member)") else { continue }
                for verifier in publics {
                    var verify = mechanism(CK_MECHANISM_TYPE(signing))
                    _ = direct.f.C_VerifyInit!(verifier.session, &verify, verifier.handle)
                    expect(direct.f.C_Verify!(verifier.session, &input, CK_ULONG(size), &signature, length), CKR_OK,
                           "\(signer.member)'s \(name) signature verifies with \(verifier.member)'s public key")
                }
            }
        case .agreement:
            let privates = copies(key.label, CK_ULONG(CKO_PRIVATE_KEY))
            let publics = copies(key.label, CK_ULONG(CKO_PUBLIC_KEY))
            guard let peer = publics.first.flatMap({ attribute(direct, $0.session, $0.handle, CK_ATTRIBUTE_TYPE(CKA_VALUE)) }) else { break }
            var agreed = Set<[UInt8]>()
            for party in privates {
                let t = Template().add(CKA_CLASS, ulong: CK_ULONG(CKO_SECRET_KEY)).add(CKA_KEY_TYPE, ulong: CK_ULONG(CKK_AES))
                    .add(CKA_VALUE_LEN, ulong: 16).add(CKA_ENCRYPT, bool: true).add(CKA_TOKEN, bool: false)
                var value = peer
                var secret: CK_OBJECT_HANDLE = 0
                let rv = value.withUnsafeMutableBytes { raw -> CK_RV in
                    var derive = CK_MECHANISM(mechanism: CK_MECHANISM_TYPE(CKM_DH_PKCS_DERIVE), pParameter: raw.baseAddress, ulParameterLen: CK_ULONG(raw.count))
                    return direct.f.C_DeriveKey!(party.session, &derive, party.handle, &t.attributes, t.count, &secret)
                }
                guard expect(rv, CKR_OK, "DH derivation with \(party.member)'s copy"), let block = encryptBlock(direct, party.session, secret) else { continue }
                agreed.insert(block)
            }
            check(agreed.count == 1, "every member's copy of the DH key agrees with one peer (\(agreed.count) different secrets)")
        case .parameters:
            var primes = Set<[UInt8]>()
            for copy in copies(key.label, CK_ULONG(CKO_DOMAIN_PARAMETERS)) {
                primes.insert(attribute(direct, copy.session, copy.handle, CK_ATTRIBUTE_TYPE(CKA_PRIME)) ?? [])
            }
            check(primes.count == 1, "the \(name) domain parameters are the same on every member")
        case .uncarried:
            for member in sessions {
                let found = find(direct, member.session, Template().add(CKA_LABEL, string: key.label))
                check(found.isEmpty, "the refused \(name) generation left nothing on \(member.label) (\(found.count))")
            }
        }
    }
    ok(direct.f.C_Finalize!(nil), "C_Finalize SoftHSM")
}
