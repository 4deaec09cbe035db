// Scenarios for replication: generated keys reach every member as the same key, without their value in clear.
import CInterop
import Glibc

/// The attributes that must be equal on every member's copy of a generated key.
let sharedAttributes: [CK_ATTRIBUTE_TYPE] = [CKA_CLASS, CKA_KEY_TYPE, CKA_LABEL, CKA_ID, CKA_TOKEN, CKA_PRIVATE, CKA_SENSITIVE,
                                             CKA_EXTRACTABLE, CKA_WRAP_WITH_TRUSTED, CKA_SIGN, CKA_VERIFY, CKA_ENCRYPT,
                                             CKA_DECRYPT, CKA_DERIVE, CKA_MODIFIABLE, CKA_EC_PARAMS, CKA_EC_POINT,
                                             CKA_MODULUS, CKA_PUBLIC_EXPONENT]

func replicationScenario(_ m: Module) {
    let s = initialized(m)
    let session = openLoggedIn(m, slot: s, pin: userPIN)
    let f = m.f
    let run = "\(getpid())"

    var gen = mechanism(CKM_EC_KEY_PAIR_GEN)
    let ecPub = Template().add(CKA_EC_PARAMS, p256).add(CKA_VERIFY, bool: true).add(CKA_TOKEN, bool: true)
        .add(CKA_LABEL, string: "rep-ec-\(run)").add(CKA_ID, [0xec])
    let ecPriv = Template().add(CKA_SIGN, bool: true).add(CKA_TOKEN, bool: true).add(CKA_PRIVATE, bool: true)
        .add(CKA_SENSITIVE, bool: true).add(CKA_EXTRACTABLE, bool: false)
        .add(CKA_LABEL, string: "rep-ec-\(run)").add(CKA_ID, [0xec])
    var ecPubKey: CK_OBJECT_HANDLE = 0
    var ecPrivKey: CK_OBJECT_HANDLE = 0
    ok(f.C_GenerateKeyPair!(session, &gen, &ecPub.attributes, ecPub.count, &ecPriv.attributes, ecPriv.count, &ecPubKey, &ecPrivKey), "EC token C_GenerateKeyPair")
    gen = mechanism(CKM_RSA_PKCS_KEY_PAIR_GEN)
    let rsaPub = Template().add(CKA_MODULUS_BITS, ulong: 2048).add(CKA_VERIFY, bool: true).add(CKA_TOKEN, bool: true)
        .add(CKA_LABEL, string: "rep-rsa-\(run)")
    let rsaPriv = Template().add(CKA_SIGN, bool: true).add(CKA_TOKEN, bool: true).add(CKA_LABEL, string: "rep-rsa-\(run)")
    var rsaPubKey: CK_OBJECT_HANDLE = 0
    var rsaPrivKey: CK_OBJECT_HANDLE = 0
    ok(f.C_GenerateKeyPair!(session, &gen, &rsaPub.attributes, rsaPub.count, &rsaPriv.attributes, rsaPriv.count, &rsaPubKey, &rsaPrivKey), "RSA token C_GenerateKeyPair")
    var aesGen = mechanism(CKM_AES_KEY_GEN)
    let aesT = Template().add(CKA_VALUE_LEN, ulong: 32).add(CKA_ENCRYPT, bool: true).add(CKA_TOKEN, bool: true)
        .add(CKA_LABEL, string: "rep-aes-\(run)")
    var aes: CK_OBJECT_HANDLE = 0
    ok(f.C_GenerateKey!(session, &aesGen, &aesT.attributes, aesT.count, &aes), "AES token C_GenerateKey")
    let sessionAES = Template().add(CKA_VALUE_LEN, ulong: 16).add(CKA_ENCRYPT, bool: true).add(CKA_TOKEN, bool: false)
    var ephemeral: CK_OBJECT_HANDLE = 0
    ok(f.C_GenerateKey!(session, &aesGen, &sessionAES.attributes, sessionAES.count, &ephemeral), "AES session C_GenerateKey")

    // Through the group: whichever member serves, the copies are one key.
    var ciphertexts = Set<[UInt8]>()
    for _ in 0..<30 {
        if let c = encryptBlock(m, session, aes) { ciphertexts.insert(c) } else { check(false, "encrypt with the replicated AES key") }
        if encryptBlock(m, session, ephemeral) == nil { check(false, "encrypt with the replicated session key") }
        var digest = [UInt8](repeating: 0x5c, count: 32)
        var ecdsa = mechanism(CKM_ECDSA)
        var sig = [UInt8](repeating: 0, count: 64)
        var len: CK_ULONG = 64
        ok(f.C_SignInit!(session, &ecdsa, ecPrivKey), "C_SignInit")
        ok(f.C_Sign!(session, &digest, 32, &sig, &len), "C_Sign")
        ok(f.C_VerifyInit!(session, &ecdsa, ecPubKey), "C_VerifyInit")
        expect(f.C_Verify!(session, &digest, 32, &sig, len), CKR_OK, "a signature by one member's copy verifies with another's")
    }
    check(ciphertexts.count == 1, "every member's copy of the AES key encrypts alike")
    let served = memberCounters(m, s)
    check(served.count > 1 && served.allSatisfy { $0 > 0 }, "every member served the replicated keys: \(served)")

    // Changes and deletion reach every copy.
    let relabel = Template().add(CKA_LABEL, string: "rep-aes-renamed-\(run)")
    expect(f.C_SetAttributeValue!(session, aes, &relabel.attributes, relabel.count), CKR_OK, "C_SetAttributeValue on a replicated key")
    expect(f.C_DestroyObject!(session, rsaPrivKey), CKR_OK, "C_DestroyObject RSA private key")
    expect(f.C_DestroyObject!(session, rsaPubKey), CKR_OK, "C_DestroyObject RSA public key")
    ok(f.C_Finalize!(nil), "C_Finalize")

    // Each member, opened directly: the same key, with the same attributes.
    let direct = Module(path: env("SOFTHSM_MODULE") ?? "")
    ok(direct.f.C_Initialize!(nil), "C_Initialize SoftHSM directly")
    var copies: [(label: String, session: CK_SESSION_HANDLE, ecPriv: CK_OBJECT_HANDLE, ecPub: CK_OBJECT_HANDLE, aes: CK_OBJECT_HANDLE)] = []
    for label in (env("P11HA_TEST_MEMBERS") ?? "").split(separator: ",").map(String.init) {
        guard let memberSlot = slot(labelled: label, in: direct) else { fatal("no member \(label)") }
        let ms = openLoggedIn(direct, slot: memberSlot, pin: userPIN)
        let ec = find(direct, ms, Template().add(CKA_LABEL, string: "rep-ec-\(run)").add(CKA_CLASS, ulong: CK_ULONG(CKO_PRIVATE_KEY)))
        let ecp = find(direct, ms, Template().add(CKA_LABEL, string: "rep-ec-\(run)").add(CKA_CLASS, ulong: CK_ULONG(CKO_PUBLIC_KEY)))
        let key = find(direct, ms, Template().add(CKA_LABEL, string: "rep-aes-renamed-\(run)"))
        check(ec.count == 1 && ecp.count == 1, "\(label) holds the EC key pair once")
        check(key.count == 1, "\(label) holds the AES key under its new label")
        check(find(direct, ms, Template().add(CKA_LABEL, string: "rep-rsa-\(run)")).isEmpty, "\(label) no longer holds the destroyed RSA pair")
        check(find(direct, ms, Template().add(CKA_LABEL, string: "rep-aes-\(run)")).isEmpty, "\(label) has no copy under the old label")
        if ec.count == 1, ecp.count == 1, key.count == 1 { copies.append((label, ms, ec[0], ecp[0], key[0])) }
    }
    check(copies.count >= 2, "the key reached several members")
    guard let first = copies.first else { return }
    for copy in copies.dropFirst() {
        for (a, b) in [(first.ecPriv, copy.ecPriv), (first.ecPub, copy.ecPub), (first.aes, copy.aes)] {
            for type in sharedAttributes {
                check(attribute(direct, first.session, a, type) == attribute(direct, copy.session, b, type),
                      "attribute 0x\(String(type, radix: 16)) is equal on \(first.label) and \(copy.label)")
            }
        }
        check(encryptBlock(direct, first.session, first.aes) == encryptBlock(direct, copy.session, copy.aes),
              "AES encryption of one block is equal on \(first.label) and \(copy.label)")
        // Signed with one member's private copy, verified with another member's public copy.
        var digest = [UInt8](repeating: 0x11, count: 32)
        var ecdsa = mechanism(CKM_ECDSA)
        var sig = [UInt8](repeating: 0, count: 64)
        var len: CK_ULONG = 64
        ok(direct.f.C_SignInit!(first.session, &ecdsa, first.ecPriv), "direct C_SignInit")
        ok(direct.f.C_Sign!(first.session, &digest, 32, &sig, &len), "direct C_Sign")
        ok(direct.f.C_VerifyInit!(copy.session, &ecdsa, copy.ecPub), "direct C_VerifyInit")
        expect(direct.f.C_Verify!(copy.session, &digest, 32, &sig, len), CKR_OK,
               "a signature by \(first.label)'s copy verifies with \(copy.label)'s public key")
    }
    ok(direct.f.C_Finalize!(nil), "C_Finalize SoftHSM")
}

/// Without a replication key, a generated token key fails with a clear error; session keys still work.
func noReplicationKeyScenario(_ m: Module) {
    let s = initialized(m)
    let session = openLoggedIn(m, slot: s, pin: userPIN)
    var aesGen = mechanism(CKM_AES_KEY_GEN)
    let token = Template().add(CKA_VALUE_LEN, ulong: 32).add(CKA_ENCRYPT, bool: true).add(CKA_TOKEN, bool: true)
    var key: CK_OBJECT_HANDLE = 0
    expect(m.f.C_GenerateKey!(session, &aesGen, &token.attributes, token.count, &key), CKR_FUNCTION_FAILED,
           "a generated token key without a replication key")
    let ephemeral = Template().add(CKA_VALUE_LEN, ulong: 32).add(CKA_ENCRYPT, bool: true).add(CKA_TOKEN, bool: false)
    expect(m.f.C_GenerateKey!(session, &aesGen, &ephemeral.attributes, ephemeral.count, &key), CKR_OK,
           "a generated session key without a replication key")
    let byValue = Template().add(CKA_CLASS, ulong: CK_ULONG(CKO_SECRET_KEY)).add(CKA_KEY_TYPE, ulong: CK_ULONG(CKK_AES))
        .add(CKA_VALUE, [UInt8](repeating: 1, count: 32)).add(CKA_TOKEN, bool: true).add(CKA_LABEL, string: "imported")
    expect(m.f.C_CreateObject!(session, &byValue.attributes, byValue.count, &key), CKR_OK, "an imported token key needs no replication key")
    ok(m.f.C_Finalize!(nil), "C_Finalize")
}

/// With generated-keys = refuse, generation is refused and import still works.
func refusedGenerationScenario(_ m: Module) {
    let s = initialized(m)
    let session = openLoggedIn(m, slot: s, pin: userPIN)
    var gen = mechanism(CKM_EC_KEY_PAIR_GEN)
    let pub = Template().add(CKA_EC_PARAMS, p256).add(CKA_TOKEN, bool: true)
    let priv = Template().add(CKA_SIGN, bool: true).add(CKA_TOKEN, bool: true)
    var a: CK_OBJECT_HANDLE = 0
    var b: CK_OBJECT_HANDLE = 0
    expect(m.f.C_GenerateKeyPair!(session, &gen, &pub.attributes, pub.count, &priv.attributes, priv.count, &a, &b),
           CK_RV(CKR_FUNCTION_FAILED), "key pair generation when the configuration refuses it (a code C_GenerateKeyPair may return)")
    ok(m.f.C_Finalize!(nil), "C_Finalize")
}

/// How many operations each member has served, in member order.
func memberCounters(_ m: Module, _ s: CK_SLOT_ID) -> [CK_ULONG] {
    memberFigures(m, s, "p11ha_member_counters")
}
