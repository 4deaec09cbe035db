// Hostile requests: what a TLS server receives from anyone on the internet (garbage ciphertexts, oversize input)
// and ordinary caller mistakes, through the group and on a member token directly: the same code comes back, no
// member leaves service, and a signing load beside them sees no error.
import CInterop
import Glibc
import Synchronization

func hostileScenario(_ m: Module) {
    let s = initialized(m)
    let session = openLoggedIn(m, slot: s, pin: userPIN)
    // SoftHSM itself, the same module instance p11ha loaded: its own answers are the reference.
    let direct = Module(path: env("SOFTHSM_MODULE") ?? "")
    guard let label = memberLabels.first, let memberSlot = slot(labelled: label, in: direct) else { fatal("no member token") }
    let ds = openLoggedIn(direct, slot: memberSlot, pin: userPIN)
    let groupKeys = HostileKeys(m, session)
    let directKeys = HostileKeys(direct, ds)

    let load = SigningLoad(m, slot: s, key: ecPair(m, session, label: "hostile-load-\(getpid())", token: false), threads: 3)
    for round in 0..<5 {
        for request in HostileRequest.allCases {
            let expected = request.run(direct, ds, directKeys)
            let got = request.run(m, session, groupKeys)
            if round == 0 { print("\(request): SoftHSM 0x\(String(expected, radix: 16)), group 0x\(String(got, radix: 16))") }
            expect(got, expected, "round \(round): \(request) through the group answers what SoftHSM answers directly")
        }
    }
    let (signatures, errors) = load.stop()
    check(signatures > 0, "the signing load ran (\(signatures) signatures)")
    check(errors.isEmpty, "the signing load beside the hostile requests saw no error: \(errors.prefix(5))")
    check(memberStates(m, s).allSatisfy { $0 == 0 }, "every member is still in service: \(memberStates(m, s))")
    ok(m.f.C_Finalize!(nil), "C_Finalize")
}

/// The keys the requests use, made the same way through the group and directly (session objects).
struct HostileKeys {
    let rsaPublic: CK_OBJECT_HANDLE
    let rsaPrivate: CK_OBJECT_HANDLE
    let rsaNoSign: CK_OBJECT_HANDLE
    let aes: CK_OBJECT_HANDLE

    init(_ m: Module, _ session: CK_SESSION_HANDLE) {
        func rsaPair(sign: Bool) -> (CK_OBJECT_HANDLE, CK_OBJECT_HANDLE) {
            var gen = mechanism(CKM_RSA_PKCS_KEY_PAIR_GEN)
            let pub = Template().add(CKA_TOKEN, bool: false).add(CKA_MODULUS_BITS, ulong: 2048)
                .add(CKA_PUBLIC_EXPONENT, [1, 0, 1]).add(CKA_ENCRYPT, bool: true).add(CKA_VERIFY, bool: true)
            let priv = Template().add(CKA_TOKEN, bool: false).add(CKA_PRIVATE, bool: true).add(CKA_SENSITIVE, bool: true)
                .add(CKA_DECRYPT, bool: true).add(CKA_SIGN, bool: sign)
            var p: CK_OBJECT_HANDLE = 0
            var q: CK_OBJECT_HANDLE = 0
            ok(m.f.C_GenerateKeyPair!(session, &gen, &pub.attributes, pub.count, &priv.attributes, priv.count, &p, &q), "RSA key pair")
            return (p, q)
        }
        (rsaPublic, rsaPrivate) = rsaPair(sign: true)
        (_, rsaNoSign) = rsaPair(sign: false)
        let aesTemplate = Template().add(CKA_CLASS, ulong: CKO_SECRET_KEY).add(CKA_KEY_TYPE, ulong: CKK_AES)
            .add(CKA_TOKEN, bool: false).add(CKA_ENCRYPT, bool: true).add(CKA_DECRYPT, bool: true)
            .add(CKA_VALUE, [UInt8](repeating: 0x42, count: 32))
        var key: CK_OBJECT_HANDLE = 0
        ok(m.f.C_CreateObject!(session, &aesTemplate.attributes, aesTemplate.count, &key), "AES key")
        aes = key
    }
}

enum HostileRequest: CaseIterable, CustomStringConvertible {
    case rsaDecryptGarbage, oaepDecryptGarbage, rsaSignTooLong, cbcPadDecryptGarbage, unknownCurve
    case wrongKeyType, keyWithoutSign, shortIV, bufferTooSmall

    var description: String {
        switch self {
        case .rsaDecryptGarbage: "RSA PKCS#1 v1.5 decryption of a garbage ciphertext"
        case .oaepDecryptGarbage: "RSA OAEP decryption of a garbage ciphertext"
        case .rsaSignTooLong: "RSA_PKCS signature of input longer than the modulus allows"
        case .cbcPadDecryptGarbage: "AES-CBC-PAD decryption of garbage"
        case .unknownCurve: "an EC key pair on an unknown curve OID"
        case .wrongKeyType: "ECDSA with an RSA key"
        case .keyWithoutSign: "a signature with a key whose CKA_SIGN is false"
        case .shortIV: "AES-CBC with a 3-byte IV"
        case .bufferTooSmall: "a signature into too small a buffer"
        }
    }

    /// Makes the request; returns the code of the call that fails (CKR_OK if none does).
    func run(_ m: Module, _ session: CK_SESSION_HANDLE, _ keys: HostileKeys) -> CK_RV {
        let garbage = (0..<256).map { UInt8(truncatingIfNeeded: $0 &* 37 &+ 11) }
        var out = [UInt8](repeating: 0, count: 512)
        var outLength = CK_ULONG(out.count)
        // The init, then (if it succeeded) the call: the code of whichever failed.
        func signing(_ mech: inout CK_MECHANISM, _ key: CK_OBJECT_HANDLE, _ data: [UInt8]) -> CK_RV {
            var data = data
            let rv = m.f.C_SignInit!(session, &mech, key)
            return rv != CKR_OK ? rv : m.f.C_Sign!(session, &data, CK_ULONG(data.count), &out, &outLength)
        }
        func decrypting(_ mech: inout CK_MECHANISM, _ key: CK_OBJECT_HANDLE, _ data: [UInt8]) -> CK_RV {
            var data = data
            let rv = m.f.C_DecryptInit!(session, &mech, key)
            return rv != CKR_OK ? rv : m.f.C_Decrypt!(session, &data, CK_ULONG(data.count), &out, &outLength)
        }
        /// A mechanism whose parameter is these bytes (an IV), for the duration of `body`.
        func with(_ type: CK_ULONG, parameter: [UInt8], _ body: (inout CK_MECHANISM) -> CK_RV) -> CK_RV {
            var parameter = parameter
            return parameter.withUnsafeMutableBytes { p in
                var mech = CK_MECHANISM(mechanism: CK_MECHANISM_TYPE(type), pParameter: p.baseAddress, ulParameterLen: CK_ULONG(p.count))
                return body(&mech)
            }
        }
        switch self {
        case .rsaDecryptGarbage:
            var mech = mechanism(CKM_RSA_PKCS)
            return decrypting(&mech, keys.rsaPrivate, garbage)
        case .oaepDecryptGarbage:
            var params = CK_RSA_PKCS_OAEP_PARAMS(hashAlg: CK_MECHANISM_TYPE(CKM_SHA_1), mgf: CK_ULONG(CKG_MGF1_SHA1),
                                                 source: CK_ULONG(CKZ_DATA_SPECIFIED), pSourceData: nil, ulSourceDataLen: 0)
            return withUnsafeMutablePointer(to: &params) { p in
                var mech = CK_MECHANISM(mechanism: CK_MECHANISM_TYPE(CKM_RSA_PKCS_OAEP), pParameter: UnsafeMutableRawPointer(p),
                                        ulParameterLen: CK_ULONG(MemoryLayout<CK_RSA_PKCS_OAEP_PARAMS>.size))
                return decrypting(&mech, keys.rsaPrivate, garbage)
            }
        case .rsaSignTooLong:
            var mech = mechanism(CKM_RSA_PKCS)
            return signing(&mech, keys.rsaPrivate, [UInt8](repeating: 7, count: 300))
        case .cbcPadDecryptGarbage:
            return with(CKM_AES_CBC_PAD, parameter: [UInt8](repeating: 3, count: 16)) { decrypting(&$0, keys.aes, Array(garbage.prefix(32))) }
        case .unknownCurve:
            var gen = mechanism(CKM_EC_KEY_PAIR_GEN)
            let pub = Template().add(CKA_TOKEN, bool: false).add(CKA_EC_PARAMS, [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x99])
                .add(CKA_VERIFY, bool: true)
            let priv = Template().add(CKA_TOKEN, bool: false).add(CKA_SIGN, bool: true).add(CKA_PRIVATE, bool: true)
            var p: CK_OBJECT_HANDLE = 0
            var q: CK_OBJECT_HANDLE = 0
            return m.f.C_GenerateKeyPair!(session, &gen, &pub.attributes, pub.count, &priv.attributes, priv.count, &p, &q)
        case .wrongKeyType:
            var mech = mechanism(CKM_ECDSA)
            return signing(&mech, keys.rsaPrivate, Array(garbage.prefix(32)))
        case .keyWithoutSign:
            var mech = mechanism(CKM_RSA_PKCS)
            return signing(&mech, keys.rsaNoSign, Array(garbage.prefix(32)))
        case .shortIV:
            return with(CKM_AES_CBC, parameter: [1, 2, 3]) { decrypting(&$0, keys.aes, Array(garbage.prefix(32))) }
        case .bufferTooSmall:
            var mech = mechanism(CKM_RSA_PKCS)
            let rv = m.f.C_SignInit!(session, &mech, keys.rsaPrivate)
            guard rv == CKR_OK else { return rv }
            var data = Array(garbage.prefix(32))
            var small: CK_ULONG = 16
            let answer = m.f.C_Sign!(session, &data, 32, &out, &small)
            // CKR_BUFFER_TOO_SMALL leaves the operation active: finish it, as an application does.
            if answer == CKR_BUFFER_TOO_SMALL { ok(m.f.C_Sign!(session, &data, 32, &out, &outLength), "C_Sign after CKR_BUFFER_TOO_SMALL") }
            return answer
        }
    }
}

/// Threads signing through the group in sessions of their own until stopped, counting what fails.
final class SigningLoad: @unchecked Sendable {
    private let m: Module
    private let slot: CK_SLOT_ID
    private let key: (pub: CK_OBJECT_HANDLE, priv: CK_OBJECT_HANDLE)
    private let stopping = Atomic<Bool>(false)
    private let running = Atomic<Int>(0)
    private let results = Mutex((signatures: 0, errors: [String]()))

    init(_ m: Module, slot: CK_SLOT_ID, key: (pub: CK_OBJECT_HANDLE, priv: CK_OBJECT_HANDLE), threads: Int) {
        self.m = m
        self.slot = slot
        self.key = key
        for _ in 0..<threads {
            running.add(1, ordering: .relaxed)
            let context = Unmanaged.passRetained(self).toOpaque()
            var thread = pthread_t()
            let rc = pthread_create(&thread, nil, { raw in
                let load = Unmanaged<SigningLoad>.fromOpaque(raw!).takeRetainedValue()
                load.work()
                return nil
            }, context)
            if rc != 0 { fatal("pthread_create: \(rc)") }
            pthread_detach(thread)
        }
    }

    private func work() {
        defer { running.subtract(1, ordering: .relaxed) }
        var session: CK_SESSION_HANDLE = 0
        guard m.f.C_OpenSession!(slot, CK_FLAGS(CKF_SERIAL_SESSION), nil, nil, &session) == CKR_OK else {
            results.withLock { $0.errors.append("C_OpenSession") }
            return
        }
        defer { _ = m.f.C_CloseSession!(session) }
        var digest = [UInt8](repeating: 9, count: 32)
        var signature = [UInt8](repeating: 0, count: 64)
        var ecdsa = mechanism(CKM_ECDSA)
        while !stopping.load(ordering: .relaxed) {
            var length = CK_ULONG(signature.count)
            var rv = m.f.C_SignInit!(session, &ecdsa, key.priv)
            if rv == CKR_OK { rv = m.f.C_Sign!(session, &digest, 32, &signature, &length) }
            results.withLock { results in
                if rv == CKR_OK { results.signatures += 1 } else { results.errors.append("C_Sign: 0x\(String(rv, radix: 16))") }
            }
        }
    }

    /// Stops the threads and waits for them; what they did.
    func stop() -> (signatures: Int, errors: [String]) {
        stopping.store(true, ordering: .relaxed)
        _ = pollUntil(seconds: 30) { running.load(ordering: .relaxed) == 0 }
        return results.withLock { ($0.signatures, $0.errors) }
    }
}
