// Cryptographic operations: each runs on one member chosen by the scheduler; init, updates and final stay there,
// unless that member fails: then the operation is replayed on a peer (Failover.swift).
import CInterop

extension Runtime {
    public func operationInit(_ kind: OperationKind, _ handle: SessionHandle, _ mechanism: Mechanism,
                              key: ObjectHandle?) throws(P11Error) {
        let session = try session(handle)
        defer { session.endCall() }
        if session.state.withLock({ $0.operations[kind.rawValue] != nil }) { throw P11Error.operationActive }
        if let key, kind != .digest { try checkKeyType(mechanism, key, in: session) }
        var suspects = FanOut.Suspects()
        let index = try startOperation(kind, session, mechanism, key: key, suspects: &suspects)
        let epoch = session.group.members[index].epoch.load(ordering: .acquiring)
        session.setOperation(kind, VirtualSession.Operation(member: index, epoch: epoch, mechanism: mechanism, key: key))
    }

    /// A key of another type than an RSA mechanism takes is refused before a member sees it, with the code PKCS#11
    /// gives it (CKR_KEY_TYPE_INCONSISTENT): SoftHSM 2.6.1 takes any key for RSA mechanisms at C_*Init, and then
    /// crashes the process in C_VerifyFinal (an RSA verification with a generic secret key and an empty signature:
    /// found by the fuzzer, seed 7202067731235806811). Other mechanisms keep the member's own answer (SoftHSM gives
    /// ECDSA with an RSA key CKR_GENERAL_ERROR at C_Sign, which the hostile scenario holds p11ha to). An RSA key
    /// needs its modulus too, which every RSA key has and shows (SoftHSM's half-made object of a refused
    /// C_CreateObject can lack it, and crashes the process the same way: seed 1075003282771797675). The values are
    /// the identity's, or read from a copy; a key type that cannot be told is left to the member.
    private func checkKeyType(_ mechanism: Mechanism, _ key: ObjectHandle, in session: VirtualSession) throws(P11Error) {
        guard Self.rsaMechanisms.contains(mechanism.type) else { return }
        let identity = session.group.objects.withLock { $0[key]?.identity }
        var values: [[UInt8]?] = [identity?.keyType, identity?.modulus]
        if values[0] == nil || values[1] == nil {
            values = (try? onPrimaryCopy(of: key, in: session) { (member, s, copy) throws(P11Error) in
                try member.token.readAttributes(s, copy, [CK_ATTRIBUTE_TYPE(CKA_KEY_TYPE), CK_ATTRIBUTE_TYPE(CKA_MODULUS)])
            }) ?? [nil, nil]
        }
        guard let keyType = values[0], let value = Attribute(CK_ATTRIBUTE_TYPE(CKA_KEY_TYPE), keyType).ulongValue else { return }
        if value != CK_KEY_TYPE(CKK_RSA) || (values[1] ?? []).isEmpty { throw P11Error(CK_RV(CKR_KEY_TYPE_INCONSISTENT)) }
    }

    private static let rsaMechanisms: Set<CK_MECHANISM_TYPE> = Set([
        CKM_RSA_PKCS, CKM_RSA_9796, CKM_RSA_X_509, CKM_MD2_RSA_PKCS, CKM_MD5_RSA_PKCS, CKM_SHA1_RSA_PKCS,
        CKM_RIPEMD128_RSA_PKCS, CKM_RIPEMD160_RSA_PKCS, CKM_RSA_PKCS_OAEP, CKM_RSA_X9_31, CKM_SHA1_RSA_X9_31,
        CKM_RSA_PKCS_PSS, CKM_SHA1_RSA_PKCS_PSS, CKM_SHA256_RSA_PKCS, CKM_SHA384_RSA_PKCS, CKM_SHA512_RSA_PKCS,
        CKM_SHA256_RSA_PKCS_PSS, CKM_SHA384_RSA_PKCS_PSS, CKM_SHA512_RSA_PKCS_PSS, CKM_SHA224_RSA_PKCS,
        CKM_SHA224_RSA_PKCS_PSS,
    ].map { CK_MECHANISM_TYPE($0) })

    /// C_Encrypt, C_Decrypt, C_Digest, C_Sign, C_SignRecover, C_VerifyRecover.
    public func singlePart(_ kind: OperationKind, _ handle: SessionHandle, _ input: [UInt8], capacity: Int?) throws(P11Error) -> Output {
        try finishing(kind, handle) { (member, s) throws(P11Error) in try member.token.singlePart(kind, s, input, capacity: capacity) }
    }

    /// C_EncryptFinal, C_DecryptFinal, C_DigestFinal, C_SignFinal.
    public func final(_ kind: OperationKind, _ handle: SessionHandle, capacity: Int?) throws(P11Error) -> Output {
        try finishing(kind, handle) { (member, s) throws(P11Error) in try member.token.final(kind, s, capacity: capacity) }
    }

    /// C_EncryptUpdate and C_DecryptUpdate.
    public func cipherUpdate(_ kind: OperationKind, _ handle: SessionHandle, _ input: [UInt8], capacity: Int?) throws(P11Error) -> Output {
        try continuing(kind, handle, part: input) { (member, s) throws(P11Error) in
            try member.token.cipherUpdate(kind, s, input, capacity: capacity)
        } consumed: { output in
            if case .data = output { return true }
            return false
        }
    }

    /// C_DigestUpdate, C_SignUpdate, C_VerifyUpdate.
    public func update(_ kind: OperationKind, _ handle: SessionHandle, _ input: [UInt8]) throws(P11Error) {
        try continuing(kind, handle, part: input) { (member, s) throws(P11Error) in try member.token.update(kind, s, input) } consumed: { _ in true }
    }

    /// C_DigestKey: the key's value enters the digest inside one member, so it cannot be replayed elsewhere.
    public func digestKey(_ handle: SessionHandle, _ key: ObjectHandle) throws(P11Error) {
        let session = try session(handle)
        defer { session.endCall() }
        let copies = try copies(of: key, in: session, invalid: .keyHandleInvalid)
        session.state.withLock { state in
            if var op = state.operations[OperationKind.digest.rawValue] {
                op.unreplayable = "C_DigestKey: the key's value entered the digest on that member"
                op.parts = []
                state.operations[OperationKind.digest.rawValue] = op
            }
        }
        try continuing(.digest, handle, part: nil) { (member, s) throws(P11Error) in
            guard let copy = copies[member.index] else { throw P11Error.keyHandleInvalid }
            try member.token.digestKey(s, copy)
        } consumed: { _ in false }
    }

    public func verify(_ handle: SessionHandle, _ data: [UInt8], signature: [UInt8]) throws(P11Error) {
        try finishing(.verify, handle) { (member, s) throws(P11Error) -> Output in
            try member.token.verify(s, data, signature: signature)
            return .data([])
        }
    }

    public func verifyFinal(_ handle: SessionHandle, signature: [UInt8]) throws(P11Error) {
        try finishing(.verify, handle) { (member, s) throws(P11Error) -> Output in
            try member.token.verifyFinal(s, signature: signature)
            return .data([])
        }
    }

    /// Random bytes from any member in service.
    public func generateRandom(_ handle: SessionHandle, count: Int) throws(P11Error) -> [UInt8] {
        let session = try session(handle)
        defer { session.endCall() }
        return try fanOut.onOneMember(session.group, session: session) { (member) throws(P11Error) in
            member.served.add(1, ordering: .relaxed)
            return try member.token.generateRandom(try session.memberSession(member), count: count)
        }
    }

    /// Mixes the seed into every member's generator.
    public func seedRandom(_ handle: SessionHandle, _ seed: [UInt8]) throws(P11Error) {
        let session = try session(handle)
        defer { session.endCall() }
        _ = try fanOut.everyMember(of: session.group, session.group.membersInService, onFault: .failed, session: session) { (member) throws(P11Error) in
            try member.token.seedRandom(try session.memberSession(member), seed)
        }
    }

    /// A call that may end the operation: it stays active after a length query or CKR_BUFFER_TOO_SMALL
    /// (PKCS#11 5.2), and ends on anything else, success or error.
    @discardableResult
    private func finishing(_ kind: OperationKind, _ handle: SessionHandle,
                           _ body: (Member, MemberSession) throws(P11Error) -> Output) throws(P11Error) -> Output {
        try onOperationMember(kind, handle) { (session, member, memberSession) throws(P11Error) in
            let output = try body(member, memberSession)
            if case .data = output { session.endOperation(kind) }
            return output
        }
    }

    /// An update: the operation goes on after success. What the member consumed is kept for a replay.
    @discardableResult
    private func continuing<T>(_ kind: OperationKind, _ handle: SessionHandle, part: [UInt8]?,
                               _ body: (Member, MemberSession) throws(P11Error) -> T,
                               consumed: (T) -> Bool) throws(P11Error) -> T {
        try onOperationMember(kind, handle) { (session, member, memberSession) throws(P11Error) in
            let result = try body(member, memberSession)
            if let part, consumed(result) { session.recordPart(kind, part, limit: config.replayBuffer) }
            return result
        }
    }

    /// Runs a call of the operation in progress on its member. A member fault (or a member that failed since
    /// the operation started there) replays the operation on a peer and tries again; any other error ends the
    /// operation (PKCS#11 5.2), except CKR_BUFFER_TOO_SMALL.
    private func onOperationMember<T>(_ kind: OperationKind, _ handle: SessionHandle,
                                      _ body: (VirtualSession, Member, MemberSession) throws(P11Error) -> T) throws(P11Error) -> T {
        let session = try session(handle)
        defer { session.endCall() }
        var op = try session.operation(kind)
        // Members that answered this call a fault-class code: a peer's success convicts them.
        var suspects = FanOut.Suspects()
        while true {
            let member = session.group.members[op.member]
            if !member.isInService || member.epoch.load(ordering: .acquiring) != op.epoch {
                op = try failover(kind, session, op, suspects: &suspects)
                continue
            }
            do {
                let result = try body(session, member, try session.memberSession(member))
                fanOut.convict(suspects)
                return result
            } catch where error.isMemberFault {
                if session.isClosed, error.isSessionLoss { throw P11Error.sessionHandleInvalid }
                fanOut.accuse(member, error, &suspects)
                op = try failover(kind, session, op, suspects: &suspects)
            } catch {
                if error.rv != CKR_BUFFER_TOO_SMALL {
                    session.endOperation(kind)
                    // A token may keep the operation active past an error that ends it (SoftHSM, after
                    // CKR_FUNCTION_NOT_SUPPORTED from a multi-part update of RSA): ended there too, or the next search
                    // or record write in that session would find CKR_OPERATION_ACTIVE.
                    if error.fromMember, let s = try? session.memberSession(member) {
                        session.endStrayOperations(on: member, s, only: [kind])
                    }
                }
                throw error
            }
        }
    }
}
