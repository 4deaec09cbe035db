// The fake token behaves as the core needs a real one to: PKCS#11's login, visibility, operation and length
// rules, deterministic crypto that agrees across tokens holding the same key, and faults a test can script.
import CInterop
import Glibc
@testable import P11HA
import P11HAAdmin
import P11HAFake
import Synchronization
import Testing

private let userPIN = Secret("1234")
private let soPIN = Secret("5678")

/// The code a call answered: CKR_OK, or the one it threw.
private func answer(_ body: () throws -> Void) -> CK_RV {
    do {
        try body()
        return CK_RV(CKR_OK)
    } catch let error as P11Error {
        return error.rv
    } catch {
        return CK_RV(CKR_GENERAL_ERROR)
    }
}

/// A connected connection to `store` with a R/W session, logged in as the user when `login`.
private func open(_ store: FakeTokenStore, login: Bool = true) throws -> (FakeToken, MemberSession) {
    let token = store.connection()
    try token.connect()
    let session = try token.openSession(readWrite: true)
    if login { try token.login(session, userType: CK_USER_TYPE(CKU_USER), pin: userPIN) }
    return (token, session)
}

private func dataObject(_ label: String, token: Bool = true, private isPrivate: Bool = true) -> [Attribute] {
    [Attribute(CKA_CLASS, ulong: CKO_DATA), Attribute(CKA_TOKEN, bool: token), Attribute(CKA_PRIVATE, bool: isPrivate),
     Attribute(CKA_LABEL, Array(label.utf8)), Attribute(CKA_VALUE, Array("value of \(label)".utf8))]
}

private let replicationKeyValue = [UInt8](repeating: 0x42, count: 32)

/// The group's replication key as tests make it: the same value on every token, trusted, by C_CreateObject.
private func makeReplicationKey(_ token: FakeToken, _ session: MemberSession) throws -> MemberObject {
    try token.createObject(session, [
        Attribute(CKA_CLASS, ulong: CKO_SECRET_KEY), Attribute(CKA_KEY_TYPE, ulong: CKK_AES),
        Attribute(CKA_TOKEN, bool: true), Attribute(CKA_PRIVATE, bool: false),
        Attribute(CKA_ID, ReplicationKey.id), Attribute(CKA_VALUE, replicationKeyValue),
        Attribute(CKA_SENSITIVE, bool: true), Attribute(CKA_TRUSTED, bool: true),
        Attribute(CKA_WRAP, bool: true), Attribute(CKA_UNWRAP, bool: true),
    ])
}

/// The whole output of a two-call function: the length first, then the data.
private func twoCalls(_ call: (Int?) throws(P11Error) -> Output) throws(P11Error) -> [UInt8] {
    guard case .length(let n) = try call(nil), case .data(let bytes) = try call(n) else { throw P11Error.generalError }
    return bytes
}

private func encrypt(_ token: FakeToken, _ session: MemberSession, _ key: MemberObject, _ data: [UInt8]) throws(P11Error) -> [UInt8] {
    try token.operationInit(.encrypt, session, Mechanism(CKM_AES_CBC_PAD, .bytes([UInt8](repeating: 7, count: 16))), key: key)
    return try twoCalls { (capacity) throws(P11Error) in try token.singlePart(.encrypt, session, data, capacity: capacity) }
}

private func sign(_ token: FakeToken, _ session: MemberSession, _ mechanism: CK_MECHANISM_TYPE, _ key: MemberObject,
                  _ data: [UInt8]) throws(P11Error) -> [UInt8] {
    try token.operationInit(.sign, session, Mechanism(mechanism), key: key)
    return try twoCalls { (capacity) throws(P11Error) in try token.singlePart(.sign, session, data, capacity: capacity) }
}

private func waitUntil(_ condition: () -> Bool) {
    for _ in 0..<2000 where !condition() { usleep(1000) }
}

@Suite struct FakeTokenLogin {
    @Test("a login on one session logs in every session of that connection, and no other connection")
    func loginIsPerConnection() throws {
        let store = FakeTokenStore(seed: 1)
        let (a, first) = try open(store, login: false)
        let second = try a.openSession(readWrite: false)
        #expect(answer { try a.login(first, userType: CK_USER_TYPE(CKU_USER), pin: Secret("0000")) } == CKR_PIN_INCORRECT)
        try a.login(first, userType: CK_USER_TYPE(CKU_USER), pin: userPIN)
        #expect(answer { try a.login(second, userType: CK_USER_TYPE(CKU_USER), pin: userPIN) } == CKR_USER_ALREADY_LOGGED_IN)
        #expect(answer { try a.login(second, userType: CK_USER_TYPE(CKU_SO), pin: soPIN) } == CKR_USER_ANOTHER_ALREADY_LOGGED_IN)

        let (b, other) = try open(store, login: false)
        #expect(!b.isUserLoggedIn)
        #expect(answer { try b.logout(other) } == CKR_USER_NOT_LOGGED_IN)
        try b.login(other, userType: CK_USER_TYPE(CKU_USER), pin: userPIN)

        try a.logout(second)
        #expect(!a.isUserLoggedIn, "logging out of one session logs out the connection")
        #expect(b.isUserLoggedIn)
        #expect(answer { try a.login(MemberSession(999), userType: CK_USER_TYPE(CKU_USER), pin: userPIN) } == CKR_SESSION_HANDLE_INVALID)
    }

    @Test("closing the last session logs out; the SO cannot log in beside a read-only session")
    func lastSessionLogsOut() throws {
        let store = FakeTokenStore(seed: 2)
        let (token, session) = try open(store)
        let readOnly = try token.openSession(readWrite: false)
        token.closeSession(session)
        #expect(token.isUserLoggedIn, "another session is still open")
        token.closeSession(readOnly)
        #expect(!token.isUserLoggedIn)
        let rw = try token.openSession(readWrite: true)
        let ro = try token.openSession(readWrite: false)
        #expect(answer { try token.login(rw, userType: CK_USER_TYPE(CKU_SO), pin: soPIN) } == CKR_SESSION_READ_ONLY_EXISTS)
        token.closeSession(ro)
        try token.login(rw, userType: CK_USER_TYPE(CKU_SO), pin: soPIN)
        #expect(answer { _ = try token.openSession(readWrite: false) } == CKR_SESSION_READ_WRITE_SO_EXISTS)
    }

    @Test("a PIN changed through one connection is the PIN for every connection")
    func pinIsShared() throws {
        let store = FakeTokenStore(seed: 3)
        let (a, s) = try open(store, login: false)
        try a.setPIN(s, old: userPIN, new: Secret("abcd"))
        let (b, t) = try open(store, login: false)
        #expect(answer { try b.login(t, userType: CK_USER_TYPE(CKU_USER), pin: userPIN) } == CKR_PIN_INCORRECT)
        try b.login(t, userType: CK_USER_TYPE(CKU_USER), pin: Secret("abcd"))
    }
}

@Suite struct FakeTokenObjects {
    @Test("private objects are invisible and unusable without the user's login")
    func privateObjectsNeedLogin() throws {
        let store = FakeTokenStore(seed: 4)
        let (token, session) = try open(store)
        let secret = try token.createObject(session, dataObject("secret"))
        let visible = try token.createObject(session, dataObject("visible", private: false))
        #expect(try token.findObjects(session, [Attribute(CKA_CLASS, ulong: CKO_DATA)]) == [secret, visible])

        let (stranger, strangerSession) = try open(store, login: false)
        #expect(try stranger.findObjects(strangerSession, [Attribute(CKA_CLASS, ulong: CKO_DATA)]).count == 1)
        #expect(answer { _ = try stranger.createObject(strangerSession, dataObject("mine")) } == CKR_USER_NOT_LOGGED_IN)

        try token.logout(session)
        #expect(try token.findObjects(session, [Attribute(CKA_CLASS, ulong: CKO_DATA)]) == [visible])
        #expect(answer { _ = try token.readAttributes(session, secret, [CKA_LABEL]) } == CKR_OBJECT_HANDLE_INVALID)
        try token.login(session, userType: CK_USER_TYPE(CKU_USER), pin: userPIN)
        #expect(try token.readAttributes(session, secret, [CKA_LABEL]) == [Array("secret".utf8)], "the handle stays valid")
    }

    @Test("a read-only session may hold session objects but not write token objects")
    func readOnlySessions() throws {
        let store = FakeTokenStore(seed: 5)
        let (token, rw) = try open(store)
        let ro = try token.openSession(readWrite: false)
        #expect(answer { _ = try token.createObject(ro, dataObject("t")) } == CKR_SESSION_READ_ONLY)
        let sessionObject = try token.createObject(ro, dataObject("s", token: false))
        let tokenObject = try token.createObject(rw, dataObject("t"))
        #expect(answer { try token.destroyObject(ro, tokenObject) } == CKR_SESSION_READ_ONLY)
        #expect(answer { try token.setAttributeValues(ro, tokenObject, [Attribute(CKA_LABEL, [1])]) } == CKR_SESSION_READ_ONLY)
        token.closeSession(ro)
        #expect(answer { _ = try token.readAttributes(rw, sessionObject, [CKA_LABEL]) } == CKR_OBJECT_HANDLE_INVALID,
                "a session object dies with the session that made it")
    }

    @Test("attributes answer sensitive, invalid type and too small a buffer one by one, filling the others")
    func attributeAnswers() throws {
        let store = FakeTokenStore(seed: 6)
        let (token, session) = try open(store)
        let key = try token.generateKey(session, Mechanism(CKM_AES_KEY_GEN), [
            Attribute(CKA_TOKEN, bool: true), Attribute(CKA_SENSITIVE, bool: true), Attribute(CKA_LABEL, Array("k".utf8)),
        ])
        let (rv, answers) = try token.attributeValues(session, key, [
            AttributeQuery(CKA_VALUE, capacity: 64), AttributeQuery(CKA_MODULUS, capacity: 64),
            AttributeQuery(CKA_LABEL, capacity: 0), AttributeQuery(CKA_VALUE_LEN, capacity: nil),
            AttributeQuery(CKA_LABEL, capacity: 1),
        ])
        #expect(rv == CKR_ATTRIBUTE_SENSITIVE)
        #expect(answers[0] == AttributeAnswer(length: CK_UNAVAILABLE_INFORMATION_VALUE, value: nil))
        #expect(answers[1] == AttributeAnswer(length: CK_UNAVAILABLE_INFORMATION_VALUE, value: nil))
        #expect(answers[2] == AttributeAnswer(length: CK_UNAVAILABLE_INFORMATION_VALUE, value: nil))
        #expect(answers[3] == AttributeAnswer(length: CK_ULONG(MemoryLayout<CK_ULONG>.size), value: nil))
        #expect(answers[4] == AttributeAnswer(length: 1, value: Array("k".utf8)))
        #expect(try token.readAttributes(session, key, [CKA_VALUE_LEN, CKA_LOCAL, CKA_ALWAYS_SENSITIVE])
                == [Attribute(CKA_VALUE_LEN, ulong: 32).value, [1], [1]])
    }

    @Test("fixed attributes are read-only, an unmodifiable object refuses changes, an allowed change is seen by other connections")
    func settingAttributes() throws {
        let store = FakeTokenStore(seed: 7)
        let (token, session) = try open(store)
        let object = try token.createObject(session, dataObject("d"))
        let frozen = try token.createObject(session, dataObject("f") + [Attribute(CKA_MODIFIABLE, bool: false)])
        #expect(answer { try token.setAttributeValues(session, object, [Attribute(CKA_CLASS, ulong: CKO_CERTIFICATE)]) } == CKR_ATTRIBUTE_READ_ONLY)
        #expect(answer { try token.setAttributeValues(session, frozen, [Attribute(CKA_LABEL, [1])]) } == CKR_ACTION_PROHIBITED)
        #expect(answer { try token.setAttributeValues(session, object, [Attribute(CKA_MODULUS, [1])]) } == CKR_ATTRIBUTE_TYPE_INVALID)
        try token.setAttributeValues(session, object, [Attribute(CKA_LABEL, Array("renamed".utf8))])
        let (other, otherSession) = try open(store)
        #expect(try other.findObjects(otherSession, [Attribute(CKA_LABEL, Array("renamed".utf8))]).count == 1)
        let copy = try token.copyObject(session, object, [Attribute(CKA_TOKEN, bool: false)])
        #expect(try token.readAttributes(session, copy, [CKA_TOKEN, CKA_LABEL]) == [[0], Array("renamed".utf8)])
        try token.destroyObject(session, object)
        #expect(try other.findObjects(otherSession, [Attribute(CKA_LABEL, Array("renamed".utf8))]).isEmpty)
    }
}

@Suite struct FakeTokenCrypto {
    @Test("a key generated and wrapped on one token, unwrapped on another under the shared replication key, encrypts and signs alike")
    func replicatedKeysAgree() throws {
        let storeA = FakeTokenStore(label: "a", seed: 10)
        let storeB = FakeTokenStore(label: "b", seed: 20)
        let (a, sa) = try open(storeA)
        let (b, sb) = try open(storeB)
        let wrapA = try makeReplicationKey(a, sa)
        let wrapB = try makeReplicationKey(b, sb)
        #expect(try a.findObjects(sa, ReplicationKey.searchTemplate) == [wrapA])

        let carried: [Attribute] = [Attribute(CKA_TOKEN, bool: true), Attribute(CKA_SENSITIVE, bool: true),
                                    Attribute(CKA_EXTRACTABLE, bool: true), Attribute(CKA_WRAP_WITH_TRUSTED, bool: true)]
        let aes = try a.generateKey(sa, Mechanism(CKM_AES_KEY_GEN), carried + [Attribute(CKA_VALUE_LEN, ulong: 32)])
        let blob = try twoCalls { (c) throws(P11Error) in try a.wrapKey(sa, ReplicationKey.wrapMechanism, wrappingKey: wrapA, key: aes, capacity: c) }
        #expect(blob.count == 40, "RFC 5649's length: the padded key and 8 bytes")
        let aesB = try b.unwrapKey(sb, ReplicationKey.wrapMechanism, unwrappingKey: wrapB, wrapped: blob, [
            Attribute(CKA_CLASS, ulong: CKO_SECRET_KEY), Attribute(CKA_KEY_TYPE, ulong: CKK_AES),
        ] + carried)
        let plaintext = Array("the same on every member".utf8)
        #expect(try encrypt(a, sa, aes, plaintext) == encrypt(b, sb, aesB, plaintext))
        #expect(try b.readAttributes(sb, aesB, [CKA_LOCAL, CKA_VALUE]) == [[0], nil])

        let (publicA, privateA) = try a.generateKeyPair(sa, Mechanism(CKM_EC_KEY_PAIR_GEN),
            publicTemplate: [Attribute(CKA_EC_PARAMS, [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07])],
            privateTemplate: carried)
        let privateBlob = try twoCalls { (c) throws(P11Error) in
            try a.wrapKey(sa, ReplicationKey.wrapMechanism, wrappingKey: wrapA, key: privateA, capacity: c)
        }
        let privateB = try b.unwrapKey(sb, ReplicationKey.wrapMechanism, unwrappingKey: wrapB, wrapped: privateBlob, [
            Attribute(CKA_CLASS, ulong: CKO_PRIVATE_KEY), Attribute(CKA_KEY_TYPE, ulong: CKK_EC),
        ] + carried)
        let message = Array("signed twice".utf8)
        let signatureA = try sign(a, sa, CKM_ECDSA_SHA256, privateA, message)
        let signatureB = try sign(b, sb, CKM_ECDSA_SHA256, privateB, message)
        #expect(signatureA == signatureB)
        #expect(signatureA.count == 64)
        try a.operationInit(.verify, sa, Mechanism(CKM_ECDSA_SHA256), key: publicA)
        try a.verify(sa, message, signature: signatureB)
        try a.operationInit(.verify, sa, Mechanism(CKM_ECDSA_SHA256), key: publicA)
        #expect(answer { try a.verify(sa, message + [0], signature: signatureB) } == CKR_SIGNATURE_INVALID)
        try a.operationInit(.verify, sa, Mechanism(CKM_ECDSA_SHA256), key: publicA)
        #expect(answer { try a.verify(sa, message, signature: [1, 2, 3]) } == CKR_SIGNATURE_LEN_RANGE)
    }

    @Test("wrapping refuses an unextractable key, and a wrap-with-trusted key under an untrusted key; unwrapping notices a wrong key or a changed blob")
    func wrappingRules() throws {
        let store = FakeTokenStore(seed: 11)
        let (token, session) = try open(store)
        let trusted = try makeReplicationKey(token, session)
        let untrusted = try token.generateKey(session, Mechanism(CKM_AES_KEY_GEN), [Attribute(CKA_WRAP, bool: true)])
        let guarded = try token.generateKey(session, Mechanism(CKM_AES_KEY_GEN), [
            Attribute(CKA_EXTRACTABLE, bool: true), Attribute(CKA_WRAP_WITH_TRUSTED, bool: true),
        ])
        let kept = try token.generateKey(session, Mechanism(CKM_AES_KEY_GEN), [Attribute(CKA_EXTRACTABLE, bool: false)])
        let wrap = ReplicationKey.wrapMechanism
        #expect(answer { _ = try token.wrapKey(session, wrap, wrappingKey: untrusted, key: guarded, capacity: nil) } == CKR_KEY_NOT_WRAPPABLE)
        #expect(answer { _ = try token.wrapKey(session, wrap, wrappingKey: trusted, key: kept, capacity: nil) } == CKR_KEY_UNEXTRACTABLE)
        #expect(answer { _ = try token.wrapKey(session, wrap, wrappingKey: trusted, key: guarded, capacity: nil) } == CKR_OK)
        let blob = try twoCalls { (c) throws(P11Error) in try token.wrapKey(session, wrap, wrappingKey: trusted, key: guarded, capacity: c) }
        let template = [Attribute(CKA_CLASS, ulong: CKO_SECRET_KEY), Attribute(CKA_KEY_TYPE, ulong: CKK_AES)]
        #expect(answer { _ = try token.unwrapKey(session, wrap, unwrappingKey: untrusted, wrapped: blob, template) } == CKR_WRAPPED_KEY_INVALID,
                "the wrong unwrapping key is noticed")
        #expect(answer { _ = try token.unwrapKey(session, wrap, unwrappingKey: trusted, wrapped: Array(blob.dropLast(8)) + [UInt8](repeating: 0, count: 8), template) }
                == CKR_WRAPPED_KEY_INVALID)
    }

    @Test("two-call convention: a length query and too small a buffer leave the operation active; the data ends it")
    func lengthConvention() throws {
        let store = FakeTokenStore(seed: 12)
        let (token, session) = try open(store)
        let key = try token.generateKey(session, Mechanism(CKM_AES_KEY_GEN), [])
        let gcm = Mechanism(CKM_AES_GCM, .gcm(iv: [UInt8](repeating: 1, count: 12), ivBits: 96, aad: [9], tagBits: 128))
        let data = [UInt8](repeating: 0xAB, count: 20)
        try token.operationInit(.encrypt, session, gcm, key: key)
        #expect(answer { try token.operationInit(.encrypt, session, gcm, key: key) } == CKR_OPERATION_ACTIVE)
        #expect(try token.singlePart(.encrypt, session, data, capacity: nil) == .length(36))
        #expect(throws: P11Error.member(CK_RV(CKR_BUFFER_TOO_SMALL), neededLength: 36)) {
            try token.singlePart(.encrypt, session, data, capacity: 35)
        }
        let sealed = try #require(try token.singlePart(.encrypt, session, data, capacity: 36).bytes)
        #expect(answer { _ = try token.singlePart(.encrypt, session, data, capacity: 36) } == CKR_OPERATION_NOT_INITIALIZED)

        try token.operationInit(.decrypt, session, gcm, key: key)
        #expect(try token.singlePart(.decrypt, session, sealed, capacity: 64) == .data(data))
        var forged = sealed
        forged[forged.count - 1] ^= 1
        try token.operationInit(.decrypt, session, gcm, key: key)
        #expect(answer { _ = try token.singlePart(.decrypt, session, forged, capacity: 64) } == CKR_ENCRYPTED_DATA_INVALID)
        #expect(answer { _ = try token.singlePart(.decrypt, session, sealed, capacity: 64) } == CKR_OPERATION_NOT_INITIALIZED,
                "an error ends the operation")
    }

    @Test("multi-part operations give what single-part ones give")
    func multiPartEqualsSinglePart() throws {
        let store = FakeTokenStore(seed: 13)
        let (token, session) = try open(store)
        let key = try token.generateKey(session, Mechanism(CKM_AES_KEY_GEN), [])
        let hmacKey = try token.generateKey(session, Mechanism(CKM_GENERIC_SECRET_KEY_GEN), [Attribute(CKA_VALUE_LEN, ulong: 32)])
        let data = (0..<45).map { UInt8($0) }
        let single = try encrypt(token, session, key, data)
        #expect(single.count == 48)

        try token.operationInit(.encrypt, session, Mechanism(CKM_AES_CBC_PAD, .bytes([UInt8](repeating: 7, count: 16))), key: key)
        var parts: [UInt8] = []
        for chunk in [data[0..<10], data[10..<33], data[33...]] {
            parts += try twoCalls { (c) throws(P11Error) in try token.cipherUpdate(.encrypt, session, Array(chunk), capacity: c) }
        }
        parts += try twoCalls { (c) throws(P11Error) in try token.final(.encrypt, session, capacity: c) }
        #expect(parts == single)

        try token.operationInit(.decrypt, session, Mechanism(CKM_AES_CBC_PAD, .bytes([UInt8](repeating: 7, count: 16))), key: key)
        var back = try twoCalls { (c) throws(P11Error) in try token.cipherUpdate(.decrypt, session, single, capacity: c) }
        back += try #require(try token.final(.decrypt, session, capacity: 16).bytes)
        #expect(back == data)

        let mac = try sign(token, session, CKM_SHA256_HMAC, hmacKey, data)
        try token.operationInit(.sign, session, Mechanism(CKM_SHA256_HMAC), key: hmacKey)
        try token.update(.sign, session, Array(data[..<20]))
        try token.update(.sign, session, Array(data[20...]))
        #expect(try twoCalls { (c) throws(P11Error) in try token.final(.sign, session, capacity: c) } == mac)
        try token.operationInit(.verify, session, Mechanism(CKM_SHA256_HMAC), key: hmacKey)
        try token.update(.verify, session, data)
        try token.verifyFinal(session, signature: mac)

        try token.operationInit(.digest, session, Mechanism(CKM_SHA256), key: nil)
        let digest = try twoCalls { (c) throws(P11Error) in try token.singlePart(.digest, session, data, capacity: c) }
        try token.operationInit(.digest, session, Mechanism(CKM_SHA256), key: nil)
        try token.update(.digest, session, Array(data[..<5]))
        try token.update(.digest, session, Array(data[5...]))
        #expect(try token.final(.digest, session, capacity: 32) == .data(digest))
    }

    @Test("ECDH between key pairs on two tokens derives the same key on both")
    func ecdhAgrees() throws {
        let (a, sa) = try open(FakeTokenStore(seed: 14))
        let (b, sb) = try open(FakeTokenStore(seed: 15))
        let p256: [UInt8] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07]
        func pair(_ t: FakeToken, _ s: MemberSession) throws -> (MemberObject, [UInt8]) {
            let (pub, priv) = try t.generateKeyPair(s, Mechanism(CKM_EC_KEY_PAIR_GEN), publicTemplate: [Attribute(CKA_EC_PARAMS, p256)],
                                                    privateTemplate: [Attribute(CKA_DERIVE, bool: true)])
            return (priv, rawECPoint(try #require(try t.readAttributes(s, pub, [CKA_EC_POINT])[0])))
        }
        let (privateA, pointA) = try pair(a, sa)
        let (privateB, pointB) = try pair(b, sb)
        let template = [Attribute(CKA_KEY_TYPE, ulong: CKK_AES), Attribute(CKA_VALUE_LEN, ulong: 32),
                        Attribute(CKA_EXTRACTABLE, bool: true), Attribute(CKA_PRIVATE, bool: false)]
        func ecdh(_ point: [UInt8]) -> Mechanism { Mechanism(CKM_ECDH1_DERIVE, .ecdh(kdf: CK_ULONG(CKD_NULL), sharedData: [], publicData: point)) }
        let keyA = try a.deriveKey(sa, ecdh(pointB), baseKey: privateA, template)
        let keyB = try b.deriveKey(sb, ecdh(pointA), baseKey: privateB, template)
        let valueA = try a.readAttributes(sa, keyA, [CKA_VALUE])[0]
        #expect(valueA != nil)
        #expect(valueA == (try b.readAttributes(sb, keyB, [CKA_VALUE])[0]))
    }

    @Test("one seed gives the same keys and random bytes; another seed different ones")
    func seeded() throws {
        func run(_ seed: UInt64) throws -> [[UInt8]?] {
            let (token, session) = try open(FakeTokenStore(seed: seed))
            let key = try token.generateKey(session, Mechanism(CKM_AES_KEY_GEN), [Attribute(CKA_EXTRACTABLE, bool: true)])
            return [try token.readAttributes(session, key, [CKA_VALUE])[0], try token.generateRandom(session, count: 16)]
        }
        #expect(try run(7) == run(7))
        #expect(try run(7) != run(8))
    }
}

@Suite struct FakeTokenFaults {
    @Test("a scripted error answers for the calls and times asked, and every call is counted")
    func scriptedErrors() throws {
        let store = FakeTokenStore(seed: 30)
        let (a, sa) = try open(store)
        let (b, sb) = try open(store)
        store.faults.inject(.error(CK_RV(CKR_DEVICE_MEMORY)), on: [.createObject], times: 1)
        a.faults.inject(.error(CK_RV(CKR_GENERAL_ERROR)), on: [.findObjects])
        #expect(answer { _ = try b.createObject(sb, dataObject("x")) } == CKR_DEVICE_MEMORY)
        _ = try a.createObject(sa, dataObject("x"))
        #expect(answer { _ = try a.findObjects(sa, []) } == CKR_GENERAL_ERROR)
        #expect(try b.findObjects(sb, []).count == 1, "another connection does not see this connection's fault")
        a.faults.clearFaults()
        #expect(try a.findObjects(sa, []).count == 1)
        #expect(store.faults.count(.createObject) == 2)
        #expect(a.faults.count(.findObjects) == 2)
        #expect(b.faults.count(.findObjects) == 1)

        store.faults.inject(.error(CK_RV(CKR_DEVICE_ERROR)), on: [.singlePart], kinds: [.sign])
        let key = try a.generateKey(sa, Mechanism(CKM_GENERIC_SECRET_KEY_GEN), [Attribute(CKA_VALUE_LEN, ulong: 32)])
        #expect(answer { _ = try sign(a, sa, CKM_SHA256_HMAC, key, [1]) } == CKR_DEVICE_ERROR)
        try a.operationInit(.digest, sa, Mechanism(CKM_SHA256), key: nil)
        #expect(try a.singlePart(.digest, sa, [1], capacity: nil) == .length(32), "a digest is not a sign")
    }

    @Test("a hung call blocks until released, then answers CKR_DEVICE_ERROR; hangThenProceed does its work")
    func hangs() throws {
        let store = FakeTokenStore(seed: 31)
        let (token, session) = try open(store)
        store.faults.inject(.hang, on: [.tokenInfo], times: 1)
        let result = Mutex<CK_RV?>(nil)
        spawnThread { let rv = answer { _ = try token.tokenInfo() }; result.withLock { $0 = rv } }
        waitUntil { store.faults.hangingCalls == 1 }
        #expect(token.callsUnderWay == 1)
        usleep(5000)
        #expect(result.withLock { $0 } == nil, "still blocked")
        store.faults.releaseHangs()
        waitUntil { result.withLock { $0 } != nil }
        #expect(result.withLock { $0 } == CKR_DEVICE_ERROR)
        #expect(token.callsUnderWay == 0)

        token.faults.inject(.hangThenProceed, on: [.createObject], times: 1)
        let created = Mutex<CK_RV?>(nil)
        spawnThread { let rv = answer { _ = try token.createObject(session, dataObject("late")) }; created.withLock { $0 = rv } }
        waitUntil { token.faults.hangingCalls == 1 }
        token.faults.clearFaults()
        waitUntil { created.withLock { $0 } != nil }
        #expect(created.withLock { $0 } == CKR_OK)
        #expect(store.tokenObjects(matching: [Attribute(CKA_LABEL, Array("late".utf8))]).count == 1)
    }

    @Test("latency delays a call and lets it proceed")
    func latency() throws {
        let store = FakeTokenStore(seed: 32)
        let (token, _) = try open(store)
        store.faults.inject(.latency(.milliseconds(20)), on: [.tokenInfo], times: 1)
        let start = monotonicNanos()
        _ = try token.tokenInfo()
        #expect(monotonicNanos() - start >= 20_000_000)
    }

    @Test("a crash takes every connection down until revived; then each restarts its module, and token objects remain")
    func crashAndRevive() throws {
        let store = FakeTokenStore(seed: 33)
        let (a, sa) = try open(store)
        let (b, _) = try open(store)
        _ = try a.createObject(sa, dataObject("kept"))
        _ = try a.createObject(sa, dataObject("lost", token: false))
        store.faults.inject(.crash, on: [.generateRandom], times: 1)
        #expect(answer { _ = try a.generateRandom(sa, count: 1) } == CKR_DEVICE_ERROR)
        #expect(answer { _ = try b.tokenInfo() } == CKR_DEVICE_ERROR)
        #expect(answer { try b.reconnect(restartingModule: true) } == CKR_DEVICE_ERROR)
        store.faults.revive()
        #expect(answer { _ = try a.tokenInfo() } == CKR_CRYPTOKI_NOT_INITIALIZED)
        #expect(answer { try a.reconnect(restartingModule: false) } == CKR_CRYPTOKI_NOT_INITIALIZED)
        try a.reconnect(restartingModule: true)
        #expect(answer { _ = try a.findObjects(sa, []) } == CKR_SESSION_HANDLE_INVALID)
        #expect(answer { _ = try b.tokenInfo() } == CKR_CRYPTOKI_NOT_INITIALIZED, "each connection restarts on its own")
        let fresh = try a.openSession(readWrite: true)
        #expect(!a.isUserLoggedIn)
        try a.login(fresh, userType: CK_USER_TYPE(CKU_USER), pin: userPIN)
        #expect(try a.findObjects(fresh, [Attribute(CKA_CLASS, ulong: CKO_DATA)]).count == 1, "the token object, not the session object")
    }

    @Test("one connection's crash leaves the others working")
    func connectionCrash() throws {
        let store = FakeTokenStore(seed: 34)
        let (a, _) = try open(store)
        let (b, _) = try open(store)
        a.faults.crash()
        #expect(answer { _ = try a.tokenInfo() } == CKR_DEVICE_ERROR)
        _ = try b.tokenInfo()
        a.faults.revive()
        #expect(answer { _ = try a.tokenInfo() } == CKR_CRYPTOKI_NOT_INITIALIZED)
        try a.reconnect(restartingModule: true)
        _ = try a.tokenInfo()
    }

    @Test("before connect and after disconnect a connection answers CKR_CRYPTOKI_NOT_INITIALIZED; connect faults are unreachable")
    func connectAndDisconnect() throws {
        let store = FakeTokenStore(seed: 35)
        let token = store.connection()
        #expect(answer { _ = try token.tokenInfo() } == CKR_CRYPTOKI_NOT_INITIALIZED)
        token.faults.inject(.error(CK_RV(CKR_DEVICE_ERROR)), on: [.connect], times: 1)
        #expect(throws: ConnectFailure.self) { try token.connect() }
        try token.connect()
        _ = try token.openSession(readWrite: false)
        token.disconnect()
        #expect(answer { _ = try token.openSession(readWrite: false) } == CKR_CRYPTOKI_NOT_INITIALIZED)
    }

    @Test("a connection whose connect failed starts its module at the next reconnect, as a module member's does")
    func reconnectAfterFailedConnect() throws {
        let store = FakeTokenStore(seed: 37)
        let token = store.connection()
        store.faults.crash()
        #expect(throws: ConnectFailure.self) { try token.connect() }
        #expect(answer { try token.reconnect(restartingModule: false) } == CKR_DEVICE_ERROR)
        store.faults.revive()
        try token.reconnect(restartingModule: false)
        _ = try token.openSession(readWrite: false)
    }

    @Test("a hidden object is missing from the next searches asked, then found again, and stays usable by handle")
    func hiddenObjects() throws {
        let store = FakeTokenStore(seed: 36)
        let (a, sa) = try open(store)
        let (b, sb) = try open(store)
        let object = try a.createObject(sa, dataObject("flaky"))
        let label = [Attribute(CKA_LABEL, Array("flaky".utf8))]
        store.hideObjects(matching: label, forSearches: 2)
        #expect(try b.findObjects(sb, [Attribute(CKA_LABEL, Array("other".utf8))]).isEmpty, "a search without it uses up nothing")
        #expect(try b.findObjects(sb, label).isEmpty)
        #expect(try a.readAttributes(sa, object, [CKA_LABEL]) == [Array("flaky".utf8)])
        #expect(try a.findObjects(sa, label).isEmpty)
        #expect(try b.findObjects(sb, label).count == 1)

        func pattern(_ seed: UInt64) throws -> [Bool] {
            let store = FakeTokenStore(seed: seed)
            let (t, s) = try open(store)
            _ = try t.createObject(s, dataObject("flaky"))
            store.hideObjects(matching: label, forSearches: nil, probability: 0.5)
            return try (0..<32).map { _ in try t.findObjects(s, label).isEmpty }
        }
        #expect(try pattern(5) == pattern(5), "the same seed hides the same searches")
        #expect(try pattern(5).contains(true) && pattern(5).contains(false))
    }

    @Test("with SoftHSM's indexes, a process that creates an object after another's does not find the other's until a third process writes; destroys and renames show at once")
    func staleIndexes() throws {
        // As measured on SoftHSM 2.6.1 (README, "What the stores do"): two processes, one creates "solo"; the other
        // creates an object of its own after it and then searches 164,000 times in 3 s without finding "solo".
        let store = FakeTokenStore(seed: 37, staleIndexes: true)
        let (a, sa) = try open(store)
        let (b, sb) = try open(store)
        let (c, sc) = try open(store)
        let solo = [Attribute(CKA_LABEL, Array("solo".utf8))]
        _ = try b.findObjects(sb, [])
        let object = try a.createObject(sa, dataObject("solo"))
        #expect(try b.findObjects(sb, solo).count == 1, "nothing written by b since: its index is rebuilt")
        let (d, sd) = try open(store)
        _ = try d.findObjects(sd, [])
        let other = try a.createObject(sa, dataObject("other"))
        _ = try d.createObject(sd, dataObject("mine"))
        for _ in 0..<3 { #expect(try d.findObjects(sd, [Attribute(CKA_LABEL, Array("other".utf8))]).isEmpty) }
        #expect(try d.findObjects(sd, [Attribute(CKA_LABEL, Array("mine".utf8))]).count == 1, "its own object it sees")
        try a.setAttributeValues(sa, object, [Attribute(CKA_LABEL, Array("solo-2".utf8))])
        #expect(try b.findObjects(sb, [Attribute(CKA_LABEL, Array("solo-2".utf8))]).count == 1, "a rename shows at once")
        _ = try c.createObject(sc, dataObject("third"))
        #expect(try d.findObjects(sd, [Attribute(CKA_LABEL, Array("other".utf8))]).count == 1, "a third process wrote: d's index is rebuilt")
        try a.destroyObject(sa, other)
        _ = try d.createObject(sd, dataObject("mine-2"))
        #expect(try d.findObjects(sd, [Attribute(CKA_LABEL, Array("other".utf8))]).isEmpty, "a destroy shows at once")
    }

    @Test("probabilistic faults replay from the seed")
    func probabilisticFaults() throws {
        func pattern(_ seed: UInt64) throws -> [CK_RV] {
            let store = FakeTokenStore(seed: seed)
            let (t, _) = try open(store)
            store.faults.inject(.error(CK_RV(CKR_DEVICE_ERROR)), on: [.tokenInfo], probability: 0.3)
            return (0..<40).map { _ in answer { _ = try t.tokenInfo() } }
        }
        #expect(try pattern(9) == pattern(9))
        #expect(try Set(pattern(9)).count == 2)
    }
}
