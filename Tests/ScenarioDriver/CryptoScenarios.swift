// Scenarios for cryptography through the group: sign, verify, encrypt, decrypt, digest, wrap, derive, random.
import CInterop
import Glibc

func cryptoScenario(_ m: Module) {
    let s = initialized(m)
    let session = openLoggedIn(m, slot: s, pin: userPIN)
    let f = m.f

    // ECDSA, with PKCS#11's two-call length convention.
    var gen = mechanism(CKM_EC_KEY_PAIR_GEN)
    let ecPub = Template().add(CKA_EC_PARAMS, p256).add(CKA_VERIFY, bool: true).add(CKA_TOKEN, bool: false)
    let ecPriv = Template().add(CKA_SIGN, bool: true).add(CKA_DERIVE, bool: true).add(CKA_TOKEN, bool: false)
    var ecPubKey: CK_OBJECT_HANDLE = 0
    var ecPrivKey: CK_OBJECT_HANDLE = 0
    ok(f.C_GenerateKeyPair!(session, &gen, &ecPub.attributes, ecPub.count, &ecPriv.attributes, ecPriv.count, &ecPubKey, &ecPrivKey), "EC C_GenerateKeyPair")
    var digest = [UInt8](repeating: 0xab, count: 32)
    var ecdsa = mechanism(CKM_ECDSA)
    ok(f.C_SignInit!(session, &ecdsa, ecPrivKey), "C_SignInit ECDSA")
    var sigLen: CK_ULONG = 0
    expect(f.C_Sign!(session, &digest, 32, nil, &sigLen), CKR_OK, "C_Sign length query")
    check(sigLen == 64, "an ECDSA P-256 signature is 64 bytes")
    var signature = [UInt8](repeating: 0, count: 64)
    sigLen = 10
    expect(f.C_Sign!(session, &digest, 32, &signature, &sigLen), CKR_BUFFER_TOO_SMALL, "C_Sign into 10 bytes")
    check(sigLen == 64, "CKR_BUFFER_TOO_SMALL returns the length needed")
    sigLen = 64
    expect(f.C_Sign!(session, &digest, 32, &signature, &sigLen), CKR_OK, "C_Sign after the length query (operation still active)")
    expect(f.C_Sign!(session, &digest, 32, &signature, &sigLen), CKR_OPERATION_NOT_INITIALIZED, "C_Sign after the operation ended")
    ok(f.C_VerifyInit!(session, &ecdsa, ecPubKey), "C_VerifyInit")
    expect(f.C_Verify!(session, &digest, 32, &signature, 64), CKR_OK, "C_Verify of a good signature")
    signature[5] ^= 0x40
    ok(f.C_VerifyInit!(session, &ecdsa, ecPubKey), "C_VerifyInit")
    expect(f.C_Verify!(session, &digest, 32, &signature, 64), CKR_SIGNATURE_INVALID, "C_Verify of a tampered signature")

    // RSA: multi-part SHA256-RSA-PKCS, PSS (flat parameters) and OAEP (parameters with pointers).
    gen = mechanism(CKM_RSA_PKCS_KEY_PAIR_GEN)
    let rsaPub = Template().add(CKA_MODULUS_BITS, ulong: 2048).add(CKA_PUBLIC_EXPONENT, [1, 0, 1])
        .add(CKA_VERIFY, bool: true).add(CKA_ENCRYPT, bool: true).add(CKA_TOKEN, bool: false)
    let rsaPriv = Template().add(CKA_SIGN, bool: true).add(CKA_DECRYPT, bool: true).add(CKA_TOKEN, bool: false)
    var rsaPubKey: CK_OBJECT_HANDLE = 0
    var rsaPrivKey: CK_OBJECT_HANDLE = 0
    ok(f.C_GenerateKeyPair!(session, &gen, &rsaPub.attributes, rsaPub.count, &rsaPriv.attributes, rsaPriv.count, &rsaPubKey, &rsaPrivKey), "RSA C_GenerateKeyPair")
    var message = Array("a message in three parts".utf8)
    var sha256RSA = mechanism(CKM_SHA256_RSA_PKCS)
    ok(f.C_SignInit!(session, &sha256RSA, rsaPrivKey), "C_SignInit SHA256-RSA-PKCS")
    for part in [0..<2, 2..<10, 10..<message.count] {
        var chunk = Array(message[part])
        expect(f.C_SignUpdate!(session, &chunk, CK_ULONG(chunk.count)), CKR_OK, "C_SignUpdate")
    }
    var rsaSig = [UInt8](repeating: 0, count: 256)
    var rsaLen: CK_ULONG = 256
    expect(f.C_SignFinal!(session, &rsaSig, &rsaLen), CKR_OK, "C_SignFinal")
    ok(f.C_VerifyInit!(session, &sha256RSA, rsaPubKey), "C_VerifyInit")
    expect(f.C_VerifyUpdate!(session, &message, CK_ULONG(message.count)), CKR_OK, "C_VerifyUpdate")
    expect(f.C_VerifyFinal!(session, &rsaSig, rsaLen), CKR_OK, "C_VerifyFinal")

    var pssParams = CK_RSA_PKCS_PSS_PARAMS(hashAlg: CK_MECHANISM_TYPE(CKM_SHA256), mgf: CK_ULONG(CKG_MGF1_SHA256), sLen: 32)
    withUnsafeMutablePointer(to: &pssParams) { p in
        var pss = CK_MECHANISM(mechanism: CK_MECHANISM_TYPE(CKM_SHA256_RSA_PKCS_PSS), pParameter: p,
                               ulParameterLen: CK_ULONG(MemoryLayout<CK_RSA_PKCS_PSS_PARAMS>.size))
        ok(f.C_SignInit!(session, &pss, rsaPrivKey), "C_SignInit PSS")
        rsaLen = 256
        expect(f.C_Sign!(session, &message, CK_ULONG(message.count), &rsaSig, &rsaLen), CKR_OK, "C_Sign PSS")
        ok(f.C_VerifyInit!(session, &pss, rsaPubKey), "C_VerifyInit PSS")
        expect(f.C_Verify!(session, &message, CK_ULONG(message.count), &rsaSig, rsaLen), CKR_OK, "C_Verify PSS")
    }
    var oaepParams = CK_RSA_PKCS_OAEP_PARAMS(hashAlg: CK_MECHANISM_TYPE(CKM_SHA_1), mgf: CK_ULONG(CKG_MGF1_SHA1),
                                             source: CK_ULONG(CKZ_DATA_SPECIFIED), pSourceData: nil, ulSourceDataLen: 0)
    withUnsafeMutablePointer(to: &oaepParams) { p in
        var oaep = CK_MECHANISM(mechanism: CK_MECHANISM_TYPE(CKM_RSA_PKCS_OAEP), pParameter: p,
                                ulParameterLen: CK_ULONG(MemoryLayout<CK_RSA_PKCS_OAEP_PARAMS>.size))
        ok(f.C_EncryptInit!(session, &oaep, rsaPubKey), "C_EncryptInit OAEP")
        var cipher = [UInt8](repeating: 0, count: 256)
        var cipherLen: CK_ULONG = 256
        expect(f.C_Encrypt!(session, &message, CK_ULONG(message.count), &cipher, &cipherLen), CKR_OK, "C_Encrypt OAEP")
        ok(f.C_DecryptInit!(session, &oaep, rsaPrivKey), "C_DecryptInit OAEP")
        var plain = [UInt8](repeating: 0, count: 256)
        var plainLen: CK_ULONG = 256
        expect(f.C_Decrypt!(session, &cipher, cipherLen, &plain, &plainLen), CKR_OK, "C_Decrypt OAEP")
        check(Array(plain.prefix(Int(plainLen))) == message, "OAEP decrypts to the message")
    }

    // AES: GCM single-part (parameters with pointers), CBC-PAD multi-part.
    var aesGen = mechanism(CKM_AES_KEY_GEN)
    let aesT = Template().add(CKA_VALUE_LEN, ulong: 32).add(CKA_ENCRYPT, bool: true).add(CKA_DECRYPT, bool: true)
        .add(CKA_TOKEN, bool: false).add(CKA_EXTRACTABLE, bool: true).add(CKA_WRAP, bool: true).add(CKA_UNWRAP, bool: true)
    var aes: CK_OBJECT_HANDLE = 0
    ok(f.C_GenerateKey!(session, &aesGen, &aesT.attributes, aesT.count, &aes), "C_GenerateKey AES-256")
    var plaintext = (0..<1024).map { UInt8(truncatingIfNeeded: $0) }
    var iv = [UInt8](repeating: 3, count: 12)
    var aad = Array("header".utf8)
    iv.withUnsafeMutableBufferPointer { ivp in
        aad.withUnsafeMutableBufferPointer { aadp in
            var gcm = CK_GCM_PARAMS(pIv: ivp.baseAddress, ulIvLen: 12, ulIvBits: 96, pAAD: aadp.baseAddress, ulAADLen: CK_ULONG(aadp.count), ulTagBits: 128)
            withUnsafeMutablePointer(to: &gcm) { p in
                var mech = CK_MECHANISM(mechanism: CK_MECHANISM_TYPE(CKM_AES_GCM), pParameter: p, ulParameterLen: CK_ULONG(MemoryLayout<CK_GCM_PARAMS>.size))
                ok(f.C_EncryptInit!(session, &mech, aes), "C_EncryptInit GCM")
                var cipher = [UInt8](repeating: 0, count: 1100)
                var cipherLen: CK_ULONG = 1100
                expect(f.C_Encrypt!(session, &plaintext, 1024, &cipher, &cipherLen), CKR_OK, "C_Encrypt GCM")
                check(cipherLen == 1040, "GCM output is the text and a 16-byte tag")
                ok(f.C_DecryptInit!(session, &mech, aes), "C_DecryptInit GCM")
                var back = [UInt8](repeating: 0, count: 1100)
                var backLen: CK_ULONG = 1100
                expect(f.C_Decrypt!(session, &cipher, cipherLen, &back, &backLen), CKR_OK, "C_Decrypt GCM")
                check(Array(back.prefix(Int(backLen))) == plaintext, "GCM decrypts to the plaintext")
            }
        }
    }
    var cbcIV = [UInt8](repeating: 5, count: 16)
    var cipher: [UInt8] = []
    cbcIV.withUnsafeMutableBytes { ivp in
        var cbc = CK_MECHANISM(mechanism: CK_MECHANISM_TYPE(CKM_AES_CBC_PAD), pParameter: ivp.baseAddress, ulParameterLen: 16)
        ok(f.C_EncryptInit!(session, &cbc, aes), "C_EncryptInit CBC-PAD")
        for start in stride(from: 0, to: 1000, by: 100) {
            var chunk = Array(plaintext[start..<start + 100])
            var outLen: CK_ULONG = 0
            expect(f.C_EncryptUpdate!(session, &chunk, 100, nil, &outLen), CKR_OK, "C_EncryptUpdate length query")
            var out = [UInt8](repeating: 0, count: Int(outLen) + 16)
            outLen = CK_ULONG(out.count)
            expect(f.C_EncryptUpdate!(session, &chunk, 100, &out, &outLen), CKR_OK, "C_EncryptUpdate")
            cipher += out.prefix(Int(outLen))
        }
        var last = [UInt8](repeating: 0, count: 32)
        var lastLen: CK_ULONG = 32
        expect(f.C_EncryptFinal!(session, &last, &lastLen), CKR_OK, "C_EncryptFinal")
        cipher += last.prefix(Int(lastLen))
        ok(f.C_DecryptInit!(session, &cbc, aes), "C_DecryptInit CBC-PAD")
        var back = [UInt8](repeating: 0, count: cipher.count)
        var backLen = CK_ULONG(back.count)
        expect(f.C_Decrypt!(session, &cipher, CK_ULONG(cipher.count), &back, &backLen), CKR_OK, "C_Decrypt CBC-PAD")
        check(Array(back.prefix(Int(backLen))) == Array(plaintext.prefix(1000)), "multi-part CBC-PAD decrypts to the plaintext")
    }

    // Digest: single and multi-part agree with SHA-256("abc").
    var sha = mechanism(CKM_SHA256)
    var abc = Array("abc".utf8)
    var d1 = [UInt8](repeating: 0, count: 32)
    var d1Len: CK_ULONG = 32
    ok(f.C_DigestInit!(session, &sha), "C_DigestInit")
    expect(f.C_Digest!(session, &abc, 3, &d1, &d1Len), CKR_OK, "C_Digest")
    let expected: [UInt8] = [0xba, 0x78, 0x16, 0xbf, 0x8f, 0x01, 0xcf, 0xea, 0x41, 0x41, 0x40, 0xde, 0x5d, 0xae, 0x22, 0x23,
                             0xb0, 0x03, 0x61, 0xa3, 0x96, 0x17, 0x7a, 0x9c, 0xb4, 0x10, 0xff, 0x61, 0xf2, 0x00, 0x15, 0xad]
    check(d1 == expected, "SHA-256(\"abc\")")
    ok(f.C_DigestInit!(session, &sha), "C_DigestInit")
    for var byte in abc { expect(f.C_DigestUpdate!(session, &byte, 1), CKR_OK, "C_DigestUpdate") }
    var d2 = [UInt8](repeating: 0, count: 32)
    var d2Len: CK_ULONG = 32
    expect(f.C_DigestFinal!(session, &d2, &d2Len), CKR_OK, "C_DigestFinal")
    check(d2 == expected, "multi-part SHA-256(\"abc\")")

    // Wrap and unwrap: the unwrapped key encrypts like the original.
    let targetT = Template().add(CKA_VALUE_LEN, ulong: 16).add(CKA_ENCRYPT, bool: true).add(CKA_TOKEN, bool: false).add(CKA_EXTRACTABLE, bool: true)
    var target: CK_OBJECT_HANDLE = 0
    ok(f.C_GenerateKey!(session, &aesGen, &targetT.attributes, targetT.count, &target), "C_GenerateKey AES-128")
    var wrap = mechanism(CKM_AES_KEY_WRAP_PAD)
    var wrappedLen: CK_ULONG = 0
    expect(f.C_WrapKey!(session, &wrap, aes, target, nil, &wrappedLen), CKR_OK, "C_WrapKey length query")
    var wrapped = [UInt8](repeating: 0, count: Int(wrappedLen))
    expect(f.C_WrapKey!(session, &wrap, aes, target, &wrapped, &wrappedLen), CKR_OK, "C_WrapKey")
    let unwrapT = Template().add(CKA_CLASS, ulong: CK_ULONG(CKO_SECRET_KEY)).add(CKA_KEY_TYPE, ulong: CK_ULONG(CKK_AES))
        .add(CKA_ENCRYPT, bool: true).add(CKA_TOKEN, bool: false)
    var unwrapped: CK_OBJECT_HANDLE = 0
    expect(f.C_UnwrapKey!(session, &wrap, aes, &wrapped, wrappedLen, &unwrapT.attributes, unwrapT.count, &unwrapped), CKR_OK, "C_UnwrapKey")
    check(encryptBlock(m, session, target) == encryptBlock(m, session, unwrapped), "the unwrapped key is the wrapped one")

    // ECDH derivation with parameters that carry pointers: both sides derive the same secret.
    var peerPubKey: CK_OBJECT_HANDLE = 0
    var peerPrivKey: CK_OBJECT_HANDLE = 0
    gen = mechanism(CKM_EC_KEY_PAIR_GEN)
    ok(f.C_GenerateKeyPair!(session, &gen, &ecPub.attributes, ecPub.count, &ecPriv.attributes, ecPriv.count, &peerPubKey, &peerPrivKey), "peer C_GenerateKeyPair")
    let a = derive(m, session, ecPrivKey, peerPublic: attribute(m, session, peerPubKey, CKA_EC_POINT) ?? [])
    let b = derive(m, session, peerPrivKey, peerPublic: attribute(m, session, ecPubKey, CKA_EC_POINT) ?? [])
    check(a != nil && a == b, "ECDH gives both sides the same secret")

    // A derivation whose parameter carries a pointer (CK_DES_CBC_ENCRYPT_DATA_PARAMS): the derived value is the
    // DES3-CBC encryption of the data under the base key, as the mechanism defines it.
    let des3Value: [UInt8] = (0..<24).map { UInt8(0x10 &+ $0 &* 7) }
    let des3T = Template().add(CKA_CLASS, ulong: CK_ULONG(CKO_SECRET_KEY)).add(CKA_KEY_TYPE, ulong: CK_ULONG(CKK_DES3))
        .add(CKA_VALUE, des3Value).add(CKA_ENCRYPT, bool: true).add(CKA_DERIVE, bool: true).add(CKA_TOKEN, bool: false)
    var des3: CK_OBJECT_HANDLE = 0
    ok(f.C_CreateObject!(session, &des3T.attributes, des3T.count, &des3), "C_CreateObject DES3 key")
    let desIV: [UInt8] = [1, 2, 3, 4, 5, 6, 7, 8]
    var desData = [UInt8](repeating: 0x5a, count: 16)
    var desParams = CK_DES_CBC_ENCRYPT_DATA_PARAMS()
    withUnsafeMutableBytes(of: &desParams.iv) { $0.copyBytes(from: desIV) }
    desParams.length = 16
    let derivedT = Template().add(CKA_CLASS, ulong: CK_ULONG(CKO_SECRET_KEY)).add(CKA_KEY_TYPE, ulong: CK_ULONG(CKK_GENERIC_SECRET))
        .add(CKA_VALUE_LEN, ulong: 16).add(CKA_SENSITIVE, bool: false).add(CKA_EXTRACTABLE, bool: true).add(CKA_TOKEN, bool: false)
    var derivedDES: CK_OBJECT_HANDLE = 0
    let derivedRV = desData.withUnsafeMutableBufferPointer { d -> CK_RV in
        desParams.pData = d.baseAddress
        return withUnsafeMutablePointer(to: &desParams) { p in
            var mech = CK_MECHANISM(mechanism: CK_MECHANISM_TYPE(CKM_DES3_CBC_ENCRYPT_DATA), pParameter: UnsafeMutableRawPointer(p),
                                    ulParameterLen: CK_ULONG(MemoryLayout<CK_DES_CBC_ENCRYPT_DATA_PARAMS>.size))
            return f.C_DeriveKey!(session, &mech, des3, &derivedT.attributes, derivedT.count, &derivedDES)
        }
    }
    expect(derivedRV, CKR_OK, "C_DeriveKey with CKM_DES3_CBC_ENCRYPT_DATA")
    var desCBCIV = desIV
    var expectedDES = [UInt8](repeating: 0, count: 16)
    var expectedLen: CK_ULONG = 16
    let encrypted = desCBCIV.withUnsafeMutableBytes { iv -> Bool in
        var cbc = CK_MECHANISM(mechanism: CK_MECHANISM_TYPE(CKM_DES3_CBC), pParameter: iv.baseAddress, ulParameterLen: 8)
        var plain = [UInt8](repeating: 0x5a, count: 16)
        return f.C_EncryptInit!(session, &cbc, des3) == CKR_OK && f.C_Encrypt!(session, &plain, 16, &expectedDES, &expectedLen) == CKR_OK
    }
    check(encrypted && derivedRV == CKR_OK && attribute(m, session, derivedDES, CKA_VALUE) == expectedDES,
          "the key derived by DES3-CBC-ENCRYPT-DATA is the DES3-CBC encryption of its data")

    var random = [UInt8](repeating: 0, count: 32)
    expect(f.C_GenerateRandom!(session, &random, 32), CKR_OK, "C_GenerateRandom")
    check(random != [UInt8](repeating: 0, count: 32), "random bytes are not all zero")
    var seed = Array("seed".utf8)
    let seedRV = f.C_SeedRandom!(session, &seed, 4)
    check(seedRV == CKR_OK || seedRV == CKR_RANDOM_SEED_NOT_SUPPORTED, "C_SeedRandom")
    ok(f.C_Finalize!(nil), "C_Finalize")
}

func encryptBlock(_ m: Module, _ session: CK_SESSION_HANDLE, _ key: CK_OBJECT_HANDLE) -> [UInt8]? {
    var ecb = mechanism(CKM_AES_ECB)
    guard m.f.C_EncryptInit!(session, &ecb, key) == CKR_OK else { return nil }
    var block = [UInt8](repeating: 0x42, count: 16)
    var out = [UInt8](repeating: 0, count: 16)
    var len: CK_ULONG = 16
    guard m.f.C_Encrypt!(session, &block, 16, &out, &len) == CKR_OK else { return nil }
    return out
}

/// Derives a 32-byte generic secret by ECDH and reads its value (the test's key is not sensitive).
func derive(_ m: Module, _ session: CK_SESSION_HANDLE, _ priv: CK_OBJECT_HANDLE, peerPublic: [UInt8]) -> [UInt8]? {
    // CKA_EC_POINT is a DER OCTET STRING; ECDH takes the raw point.
    var point = peerPublic
    if point.count > 2, point[0] == 0x04, Int(point[1]) == point.count - 2 { point = Array(point.dropFirst(2)) }
    let t = Template().add(CKA_CLASS, ulong: CK_ULONG(CKO_SECRET_KEY)).add(CKA_KEY_TYPE, ulong: CK_ULONG(CKK_GENERIC_SECRET))
        .add(CKA_VALUE_LEN, ulong: 32).add(CKA_SENSITIVE, bool: false).add(CKA_EXTRACTABLE, bool: true).add(CKA_TOKEN, bool: false)
    return point.withUnsafeMutableBufferPointer { pp -> [UInt8]? in
        var params = CK_ECDH1_DERIVE_PARAMS(kdf: CK_ULONG(CKD_NULL), ulSharedDataLen: 0, pSharedData: nil,
                                            ulPublicDataLen: CK_ULONG(pp.count), pPublicData: pp.baseAddress)
        return withUnsafeMutablePointer(to: &params) { p -> [UInt8]? in
            var mech = CK_MECHANISM(mechanism: CK_MECHANISM_TYPE(CKM_ECDH1_DERIVE), pParameter: p,
                                    ulParameterLen: CK_ULONG(MemoryLayout<CK_ECDH1_DERIVE_PARAMS>.size))
            var key: CK_OBJECT_HANDLE = 0
            guard expect(m.f.C_DeriveKey!(session, &mech, priv, &t.attributes, t.count, &key), CKR_OK, "C_DeriveKey ECDH") else { return nil }
            return attribute(m, session, key, CKA_VALUE)
        }
    }
}
