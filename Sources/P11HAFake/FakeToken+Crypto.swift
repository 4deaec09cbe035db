// Cryptographic operations on a fake connection, with PKCS#11's two-call length convention and its rule that
// an error ends an operation (CKR_BUFFER_TOO_SMALL and a length query do not).
import CInterop
import P11HA

/// An operation in progress in one session.
struct FakeOperation: Sendable {
    let mechanism: Mechanism
    /// The key as it was at init: a real token works on its copy too.
    let key: FakeObject?
    /// Digest, sign, verify and GCM: every byte given so far.
    var input: [UInt8] = []
    /// Block modes: bytes given but not yet output (less than a block, or the block kept back for unpadding).
    var pending: [UInt8] = []
    /// Block modes: the keystream position of `pending`'s first byte.
    var offset = 0
    /// An update was made: the single-part call can no longer end the operation.
    var multiPart = false
}

/// What one call of an operation gives: its output, the length a length query answers (an upper bound where
/// a token cannot know sooner, as CBC_PAD decryption), and the operation afterwards (nil: ended).
struct FakeStep {
    var output: [UInt8]
    var bound: Int
    var next: FakeOperation?
}

extension FakeToken {
    public func operationInit(_ kind: OperationKind, _ session: MemberSession, _ mechanism: Mechanism,
                              key: MemberObject?) throws(P11Error) {
        try gate(.operationInit, kind: kind) { connection, storeState throws(P11Error) in
            let s = try connection.session(session)
            if s.operations[kind] != nil || (store.oneOperationPerSession && !s.operations.isEmpty) {
                throw P11Error.member(CK_RV(CKR_OPERATION_ACTIVE))
            }
            guard store.mechanisms.contains(mechanism.type), let offered = FakeMechanisms.named(mechanism.type),
                  offered.allows(kind) else { throw P11Error.member(CK_RV(CKR_MECHANISM_INVALID)) }
            var keyObject: FakeObject? = nil
            if kind != .digest {
                guard let key else { throw P11Error.member(CK_RV(CKR_KEY_HANDLE_INVALID)) }
                keyObject = try connection.object(key, in: storeState, invalid: CKR_KEY_HANDLE_INVALID).object
                try FakeCrypto.checkKey(keyObject!, for: kind, mechanism.type)
            }
            try FakeCrypto.checkParameter(mechanism)
            connection.sessions[session.raw]!.operations[kind] = FakeOperation(mechanism: mechanism, key: keyObject)
        }
    }

    public func singlePart(_ kind: OperationKind, _ session: MemberSession, _ input: [UInt8], capacity: Int?) throws(P11Error) -> Output {
        try step(.singlePart, kind, session, capacity: capacity) { op, lengthOnly throws(P11Error) in
            if op.multiPart { throw P11Error.member(CK_RV(CKR_OPERATION_ACTIVE)) }
            switch kind {
            case .encrypt, .decrypt:
                let bound = try FakeCrypto.singleCipherBound(kind, op, input.count)
                let output = lengthOnly ? [] : try FakeCrypto.singleCipher(kind, op, input)
                return FakeStep(output: output, bound: bound, next: nil)
            case .digest:
                let length = FakeCrypto.digestLength(op.mechanism.type)
                return FakeStep(output: lengthOnly ? [] : FakeCrypto.digest(op.mechanism.type, input), bound: length, next: nil)
            case .sign:
                let length = FakeCrypto.signatureLength(op.mechanism.type, op.key!)
                let output = lengthOnly ? [] : try FakeCrypto.signature(op.mechanism.type, op.key!, input)
                return FakeStep(output: output, bound: length, next: nil)
            case .verify, .signRecover, .verifyRecover:
                throw P11Error.member(CK_RV(CKR_OPERATION_NOT_INITIALIZED))
            }
        }
    }

    public func update(_ kind: OperationKind, _ session: MemberSession, _ input: [UInt8]) throws(P11Error) {
        _ = try step(.update, kind, session, capacity: 0) { op, _ throws(P11Error) in
            guard [.digest, .sign, .verify].contains(kind) else { throw P11Error.member(CK_RV(CKR_OPERATION_NOT_INITIALIZED)) }
            var next = op
            next.input += input
            next.multiPart = true
            return FakeStep(output: [], bound: 0, next: next)
        }
    }

    public func cipherUpdate(_ kind: OperationKind, _ session: MemberSession, _ input: [UInt8], capacity: Int?) throws(P11Error) -> Output {
        try step(.cipherUpdate, kind, session, capacity: capacity) { op, _ throws(P11Error) in
            guard kind == .encrypt || kind == .decrypt else { throw P11Error.member(CK_RV(CKR_OPERATION_NOT_INITIALIZED)) }
            return FakeCrypto.cipherUpdate(kind, op, input)
        }
    }

    public func final(_ kind: OperationKind, _ session: MemberSession, capacity: Int?) throws(P11Error) -> Output {
        try step(.final, kind, session, capacity: capacity) { op, lengthOnly throws(P11Error) in
            switch kind {
            case .encrypt, .decrypt:
                let bound = try FakeCrypto.finalCipherBound(kind, op)
                let output = lengthOnly ? [] : try FakeCrypto.finalCipher(kind, op)
                return FakeStep(output: output, bound: bound, next: nil)
            case .digest:
                let length = FakeCrypto.digestLength(op.mechanism.type)
                return FakeStep(output: lengthOnly ? [] : FakeCrypto.digest(op.mechanism.type, op.input), bound: length, next: nil)
            case .sign:
                let length = FakeCrypto.signatureLength(op.mechanism.type, op.key!)
                let output = lengthOnly ? [] : try FakeCrypto.signature(op.mechanism.type, op.key!, op.input)
                return FakeStep(output: output, bound: length, next: nil)
            case .verify, .signRecover, .verifyRecover:
                throw P11Error.member(CK_RV(CKR_OPERATION_NOT_INITIALIZED))
            }
        }
    }

    public func digestKey(_ session: MemberSession, _ key: MemberObject) throws(P11Error) {
        try gate(.digestKey, kind: .digest, ending: session) { connection, storeState throws(P11Error) in
            let s = try connection.session(session)
            guard var op = s.operations[.digest] else { throw P11Error.member(CK_RV(CKR_OPERATION_NOT_INITIALIZED)) }
            do throws(P11Error) {
                let object = try connection.object(key, in: storeState, invalid: CKR_KEY_HANDLE_INVALID).object
                guard object.isSecretKey else { throw P11Error.member(CK_RV(CKR_KEY_INDIGESTIBLE)) }
                op.input += object.secret
                op.multiPart = true
                connection.sessions[session.raw]!.operations[.digest] = op
            } catch {
                connection.sessions[session.raw]!.operations[.digest] = nil
                throw error
            }
        }
    }

    public func verify(_ session: MemberSession, _ data: [UInt8], signature: [UInt8]) throws(P11Error) {
        try verifying(.verify, session) { op throws(P11Error) in
            if op.multiPart { throw P11Error.member(CK_RV(CKR_OPERATION_ACTIVE)) }
            try FakeCrypto.verify(op.mechanism.type, op.key!, data, signature)
        }
    }

    public func verifyFinal(_ session: MemberSession, signature: [UInt8]) throws(P11Error) {
        try verifying(.verifyFinal, session) { op throws(P11Error) in
            try FakeCrypto.verify(op.mechanism.type, op.key!, op.input, signature)
        }
    }

    /// The session's digest, as "FAKE-STATE", the mechanism, whether an update was made, and the input so far;
    /// an operation with a key cannot be saved (CKR_STATE_UNSAVEABLE).
    public func operationState(_ session: MemberSession) throws(P11Error) -> [UInt8] {
        try gate(.operationState) { connection, _ throws(P11Error) in
            guard store.savesOperationState else { throw P11Error.member(CK_RV(CKR_FUNCTION_NOT_SUPPORTED)) }
            let s = try connection.session(session)
            if s.operations.isEmpty { throw P11Error.member(CK_RV(CKR_OPERATION_NOT_INITIALIZED)) }
            guard s.operations.count == 1, let op = s.operations[.digest], op.mechanism.parameter == .none else {
                throw P11Error.member(CK_RV(CKR_STATE_UNSAVEABLE))
            }
            return Self.stateMagic + bigEndianBytes(UInt64(op.mechanism.type)) + [op.multiPart ? 1 : 0] + op.input
        }
    }

    public func setOperationState(_ session: MemberSession, _ state: [UInt8], encryptionKey: MemberObject?,
                                  authenticationKey: MemberObject?) throws(P11Error) {
        try gate(.setOperationState) { connection, _ throws(P11Error) in
            guard store.savesOperationState else { throw P11Error.member(CK_RV(CKR_FUNCTION_NOT_SUPPORTED)) }
            _ = try connection.session(session)
            let header = Self.stateMagic.count
            guard state.count >= header + 9, Array(state.prefix(header)) == Self.stateMagic else {
                throw P11Error.member(CK_RV(CKR_SAVED_STATE_INVALID))
            }
            let type: UInt64 = bigEndianValue(state[header..<header + 8])
            guard encryptionKey == nil, authenticationKey == nil else { throw P11Error.member(CK_RV(CKR_KEY_NOT_NEEDED)) }
            guard store.mechanisms.contains(CK_MECHANISM_TYPE(type)) else { throw P11Error.member(CK_RV(CKR_SAVED_STATE_INVALID)) }
            var op = FakeOperation(mechanism: Mechanism(CK_MECHANISM_TYPE(type)), key: nil)
            op.multiPart = state[header + 8] != 0
            op.input = Array(state[(header + 9)...])
            connection.sessions[session.raw]!.operations = [.digest: op]
        }
    }

    private static let stateMagic = Array("FAKE-STATE".utf8)

    /// A verification's last call: it ends the operation whatever the answer.
    private func verifying(_ call: FakeCall, _ session: MemberSession,
                           _ check: (FakeOperation) throws(P11Error) -> Void) throws(P11Error) {
        try gate(call, kind: .verify, ending: session) { connection, _ throws(P11Error) in
            let s = try connection.session(session)
            guard let op = s.operations[.verify] else { throw P11Error.member(CK_RV(CKR_OPERATION_NOT_INITIALIZED)) }
            connection.sessions[session.raw]!.operations[.verify] = nil
            try check(op)
        }
    }

    /// One call of an active operation under the two-call convention: `capacity` nil answers the length and
    /// leaves the operation as it was; too small a capacity throws CKR_BUFFER_TOO_SMALL and leaves it too; any
    /// other error ends it.
    private func step(_ call: FakeCall, _ kind: OperationKind, _ session: MemberSession, capacity: Int?,
                      _ body: (FakeOperation, _ lengthOnly: Bool) throws(P11Error) -> FakeStep) throws(P11Error) -> Output {
        try gate(call, kind: kind, ending: session) { connection, _ throws(P11Error) in
            let s = try connection.session(session)
            guard let op = s.operations[kind] else { throw P11Error.member(CK_RV(CKR_OPERATION_NOT_INITIALIZED)) }
            let result: FakeStep
            do throws(P11Error) {
                result = try body(op, capacity == nil)
            } catch {
                connection.sessions[session.raw]!.operations[kind] = nil
                throw error
            }
            guard let capacity else { return .length(result.bound) }
            if capacity < result.output.count {
                throw P11Error.member(CK_RV(CKR_BUFFER_TOO_SMALL), neededLength: result.output.count)
            }
            connection.sessions[session.raw]!.operations[kind] = result.next
            return .data(result.output)
        }
    }
}

/// The fake's algorithms: deterministic functions of key material and data, the same on every token that holds
/// the same key. Signatures depend on the key pair's public value, so the public half can verify them.
enum FakeCrypto {
    static let block = 16

    // MARK: checks at init

    static func checkKey(_ key: FakeObject, for kind: OperationKind, _ mechanism: CK_MECHANISM_TYPE) throws(P11Error) {
        let usage: CK_ATTRIBUTE_TYPE = switch kind {
        case .encrypt: CKA_ENCRYPT
        case .decrypt: CKA_DECRYPT
        case .sign: CKA_SIGN
        case .verify: CKA_VERIFY
        case .signRecover: CKA_SIGN_RECOVER
        case .verifyRecover: CKA_VERIFY_RECOVER
        case .digest: CKA_CLASS
        }
        if kind != .digest && !key.bool(usage) { throw P11Error.member(CK_RV(CKR_KEY_FUNCTION_NOT_PERMITTED)) }
        let pairClass = kind == .sign ? CKO_PRIVATE_KEY : CKO_PUBLIC_KEY
        let fits = switch mechanism {
        case CKM_AES_ECB, CKM_AES_CBC, CKM_AES_CBC_PAD, CKM_AES_GCM:
            key.isSecretKey && key.keyType == CKK_AES
        case CKM_SHA256_HMAC:
            key.isSecretKey
        case CKM_ECDSA, CKM_ECDSA_SHA256:
            key.objectClass == pairClass && key.keyType == CKK_EC
        case CKM_RSA_PKCS, CKM_SHA256_RSA_PKCS:
            key.objectClass == pairClass && key.keyType == CKK_RSA
        default:
            false
        }
        if !fits { throw P11Error.member(CK_RV(CKR_KEY_TYPE_INCONSISTENT)) }
    }

    static func checkParameter(_ mechanism: Mechanism) throws(P11Error) {
        let ok = switch (mechanism.type, mechanism.parameter) {
        case (CKM_AES_CBC, .bytes(let iv)), (CKM_AES_CBC_PAD, .bytes(let iv)), (CKM_AES_CBC, .opaque(let iv)), (CKM_AES_CBC_PAD, .opaque(let iv)):
            iv.count == block
        case (CKM_AES_GCM, .gcm(let iv, _, _, let tagBits)):
            !iv.isEmpty && tagBits % 8 == 0 && (32...128).contains(tagBits)
        case (CKM_AES_CBC, _), (CKM_AES_CBC_PAD, _), (CKM_AES_GCM, _):
            false
        case (_, .none), (_, .bytes([])):
            true
        default:
            false
        }
        if !ok { throw P11Error.member(CK_RV(CKR_MECHANISM_PARAM_INVALID)) }
    }

    // MARK: digest and signatures

    static func digestLength(_ mechanism: CK_MECHANISM_TYPE) -> Int {
        switch mechanism {
        case CKM_SHA384: 48
        case CKM_SHA512: 64
        default: 32
        }
    }

    static func digest(_ mechanism: CK_MECHANISM_TYPE, _ data: [UInt8]) -> [UInt8] {
        fakeHash("digest \(mechanism)", data, length: digestLength(mechanism))
    }

    static func signatureLength(_ mechanism: CK_MECHANISM_TYPE, _ key: FakeObject) -> Int {
        switch mechanism {
        case CKM_SHA256_HMAC: 32
        case CKM_ECDSA, CKM_ECDSA_SHA256: 64
        default: key.publicValue.count
        }
    }

    /// The DER DigestInfo prefix of SHA-256, as PKCS #1 v1.5 puts before the hash.
    static let sha256DigestInfo: [UInt8] = [0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03,
                                            0x04, 0x02, 0x01, 0x05, 0x00, 0x04, 0x20]

    /// Hash-then-sign mechanisms equal their raw mechanism over the hash, as real ones do.
    static func signature(_ mechanism: CK_MECHANISM_TYPE, _ key: FakeObject, _ data: [UInt8]) throws(P11Error) -> [UInt8] {
        switch mechanism {
        case CKM_SHA256_HMAC:
            return fakeHash("hmac-sha256", key.secret, data, length: 32)
        case CKM_ECDSA:
            return fakeHash("ecdsa", key.publicValue, data, length: 64)
        case CKM_ECDSA_SHA256:
            return try signature(CK_MECHANISM_TYPE(CKM_ECDSA), key, digest(CK_MECHANISM_TYPE(CKM_SHA256), data))
        case CKM_RSA_PKCS:
            guard data.count <= key.publicValue.count - 11 else { throw P11Error.member(CK_RV(CKR_DATA_LEN_RANGE)) }
            return fakeHash("rsa-pkcs", key.publicValue, data, length: key.publicValue.count)
        case CKM_SHA256_RSA_PKCS:
            return try signature(CK_MECHANISM_TYPE(CKM_RSA_PKCS), key, sha256DigestInfo + digest(CK_MECHANISM_TYPE(CKM_SHA256), data))
        default:
            throw P11Error.member(CK_RV(CKR_MECHANISM_INVALID))
        }
    }

    static func verify(_ mechanism: CK_MECHANISM_TYPE, _ key: FakeObject, _ data: [UInt8], _ signature: [UInt8]) throws(P11Error) {
        guard signature.count == signatureLength(mechanism, key) else { throw P11Error.member(CK_RV(CKR_SIGNATURE_LEN_RANGE)) }
        guard try self.signature(mechanism, key, data) == signature else { throw P11Error.member(CK_RV(CKR_SIGNATURE_INVALID)) }
    }

    // MARK: ciphers

    private static func nonce(_ mechanism: Mechanism) -> [UInt8] {
        switch mechanism.parameter {
        case .bytes(let iv), .opaque(let iv): u64Bytes(UInt64(mechanism.type)) + iv
        case .gcm(let iv, _, _, _): u64Bytes(UInt64(mechanism.type)) + iv
        default: u64Bytes(UInt64(mechanism.type))
        }
    }

    private static func xor(_ op: FakeOperation, _ data: [UInt8], at offset: Int) -> [UInt8] {
        keystreamXOR(data, key: op.key!.secret, nonce: nonce(op.mechanism), offset: offset)
    }

    private static func tagLength(_ mechanism: Mechanism) -> Int {
        if case .gcm(_, _, _, let tagBits) = mechanism.parameter { return Int(tagBits / 8) }
        return 0
    }

    private static func tag(_ op: FakeOperation, _ ciphertext: [UInt8]) -> [UInt8] {
        guard case .gcm(let iv, _, let aad, let tagBits) = op.mechanism.parameter else { return [] }
        return fakeHash("gcm-tag", op.key!.secret, iv, aad, ciphertext, length: Int(tagBits / 8))
    }

    private static func pad(_ data: [UInt8]) -> [UInt8] {
        let n = block - data.count % block
        return data + [UInt8](repeating: UInt8(n), count: n)
    }

    private static func unpad(_ data: [UInt8]) throws(P11Error) -> [UInt8] {
        guard let last = data.last, (1...block).contains(Int(last)), data.count >= Int(last),
              data.suffix(Int(last)).allSatisfy({ $0 == last }) else {
            throw P11Error.member(CK_RV(CKR_ENCRYPTED_DATA_INVALID))
        }
        return Array(data.dropLast(Int(last)))
    }

    private static func lengthRange(_ kind: OperationKind) -> P11Error {
        P11Error.member(CK_RV(kind == .encrypt ? CKR_DATA_LEN_RANGE : CKR_ENCRYPTED_DATA_LEN_RANGE))
    }

    static func singleCipherBound(_ kind: OperationKind, _ op: FakeOperation, _ count: Int) throws(P11Error) -> Int {
        switch (op.mechanism.type, kind) {
        case (CKM_AES_ECB, _), (CKM_AES_CBC, _):
            guard count % block == 0 else { throw lengthRange(kind) }
            return count
        case (CKM_AES_CBC_PAD, .encrypt):
            return count - count % block + block
        case (CKM_AES_CBC_PAD, _):
            guard count % block == 0, count > 0 else { throw lengthRange(kind) }
            return count  // the padding is only known once decrypted
        case (CKM_AES_GCM, .encrypt):
            return count + tagLength(op.mechanism)
        default:
            guard count >= tagLength(op.mechanism) else { throw lengthRange(kind) }
            return count - tagLength(op.mechanism)
        }
    }

    static func singleCipher(_ kind: OperationKind, _ op: FakeOperation, _ input: [UInt8]) throws(P11Error) -> [UInt8] {
        _ = try singleCipherBound(kind, op, input.count)
        switch (op.mechanism.type, kind) {
        case (CKM_AES_ECB, _), (CKM_AES_CBC, _):
            return xor(op, input, at: 0)
        case (CKM_AES_CBC_PAD, .encrypt):
            return xor(op, pad(input), at: 0)
        case (CKM_AES_CBC_PAD, _):
            return try unpad(xor(op, input, at: 0))
        case (CKM_AES_GCM, .encrypt):
            let ciphertext = xor(op, input, at: 0)
            return ciphertext + tag(op, ciphertext)
        default:
            let ciphertext = Array(input.dropLast(tagLength(op.mechanism)))
            guard tag(op, ciphertext) == Array(input.suffix(tagLength(op.mechanism))) else {
                throw P11Error.member(CK_RV(CKR_ENCRYPTED_DATA_INVALID))
            }
            return xor(op, ciphertext, at: 0)
        }
    }

    /// Block modes give whole blocks as they come (CBC_PAD decryption keeps the last one back for unpadding);
    /// GCM gives everything at the end, as a token must that checks the tag before releasing plaintext.
    static func cipherUpdate(_ kind: OperationKind, _ op: FakeOperation, _ input: [UInt8]) -> FakeStep {
        var next = op
        next.multiPart = true
        if op.mechanism.type == CKM_AES_GCM {
            next.input += input
            return FakeStep(output: [], bound: 0, next: next)
        }
        let buffered = op.pending + input
        var ready = buffered.count - buffered.count % block
        if op.mechanism.type == CKM_AES_CBC_PAD && kind == .decrypt && ready == buffered.count && ready > 0 { ready -= block }
        let output = xor(op, Array(buffered.prefix(ready)), at: op.offset)
        next.pending = Array(buffered.dropFirst(ready))
        next.offset += ready
        return FakeStep(output: output, bound: output.count, next: next)
    }

    static func finalCipherBound(_ kind: OperationKind, _ op: FakeOperation) throws(P11Error) -> Int {
        switch (op.mechanism.type, kind) {
        case (CKM_AES_GCM, _):
            return try singleCipherBound(kind, op, op.input.count)
        case (CKM_AES_CBC_PAD, .encrypt):
            return block
        case (CKM_AES_CBC_PAD, _):
            guard op.pending.count == block else { throw lengthRange(kind) }
            return block
        default:
            guard op.pending.isEmpty else { throw lengthRange(kind) }
            return 0
        }
    }

    static func finalCipher(_ kind: OperationKind, _ op: FakeOperation) throws(P11Error) -> [UInt8] {
        _ = try finalCipherBound(kind, op)
        switch (op.mechanism.type, kind) {
        case (CKM_AES_GCM, _):
            return try singleCipher(kind, op, op.input)
        case (CKM_AES_CBC_PAD, .encrypt):
            return xor(op, pad(op.pending), at: op.offset)
        case (CKM_AES_CBC_PAD, _):
            return try unpad(xor(op, op.pending, at: op.offset))
        default:
            return []
        }
    }
}
