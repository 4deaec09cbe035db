// Cryptographic operations: each runs on one member chosen by the scheduler; init, updates and final stay there.
import CInterop

extension Runtime {
    public func operationInit(_ kind: OperationKind, _ handle: CK_SESSION_HANDLE, _ mechanism: Mechanism,
                              key: CK_OBJECT_HANDLE?) throws(P11Error) {
        let session = try session(handle)
        let group = session.group
        if session.state.withLock({ $0.operations[kind.rawValue] != nil }) { throw P11Error.operationActive }
        let copies = try key.map { (k) throws(P11Error) in try self.copies(of: k, in: group, invalid: .keyHandleInvalid) }
        let member = try group.pick(holding: copies)
        member.inFlight.add(1, ordering: .relaxed)
        do {
            try member.operationInit(kind, try session.memberSession(member), mechanism, key: copies?[member.index] ?? 0)
        } catch {
            member.inFlight.subtract(1, ordering: .relaxed)
            throw error
        }
        member.served.add(1, ordering: .relaxed)
        session.state.withLock {
            $0.operations[kind.rawValue] = VirtualSession.Operation(member: member.index, mechanism: mechanism, key: key ?? 0)
        }
    }

    /// C_Encrypt, C_Decrypt, C_Digest, C_Sign, C_SignRecover, C_VerifyRecover.
    public func singlePart(_ kind: OperationKind, _ handle: CK_SESSION_HANDLE, _ input: [UInt8], capacity: Int?) throws(P11Error) -> Output {
        try finishing(kind, handle) { (member, s) throws(P11Error) in try member.singlePart(kind, s, input, capacity: capacity) }
    }

    /// C_EncryptFinal, C_DecryptFinal, C_DigestFinal, C_SignFinal.
    public func final(_ kind: OperationKind, _ handle: CK_SESSION_HANDLE, capacity: Int?) throws(P11Error) -> Output {
        try finishing(kind, handle) { (member, s) throws(P11Error) in try member.final(kind, s, capacity: capacity) }
    }

    /// C_EncryptUpdate and C_DecryptUpdate.
    public func cipherUpdate(_ kind: OperationKind, _ handle: CK_SESSION_HANDLE, _ input: [UInt8], capacity: Int?) throws(P11Error) -> Output {
        try continuing(kind, handle) { (member, s) throws(P11Error) in try member.cipherUpdate(kind, s, input, capacity: capacity) }
    }

    /// C_DigestUpdate, C_SignUpdate, C_VerifyUpdate.
    public func update(_ kind: OperationKind, _ handle: CK_SESSION_HANDLE, _ input: [UInt8]) throws(P11Error) {
        try continuing(kind, handle) { (member, s) throws(P11Error) in try member.update(kind, s, input) }
    }

    public func digestKey(_ handle: CK_SESSION_HANDLE, _ key: CK_OBJECT_HANDLE) throws(P11Error) {
        let session = try session(handle)
        let copies = try copies(of: key, in: session.group, invalid: .keyHandleInvalid)
        try continuing(.digest, handle) { (member, s) throws(P11Error) in
            // The digest runs on one member: the key must have a copy there.
            guard let copy = copies[member.index] else { throw P11Error.keyHandleInvalid }
            try member.digestKey(s, copy)
        }
    }

    public func verify(_ handle: CK_SESSION_HANDLE, _ data: [UInt8], signature: [UInt8]) throws(P11Error) {
        try finishing(.verify, handle) { (member, s) throws(P11Error) -> Output in
            try member.verify(s, data, signature: signature)
            return .data([])
        }
    }

    public func verifyFinal(_ handle: CK_SESSION_HANDLE, signature: [UInt8]) throws(P11Error) {
        try finishing(.verify, handle) { (member, s) throws(P11Error) -> Output in
            try member.verifyFinal(s, signature: signature)
            return .data([])
        }
    }

    /// Random bytes from any member in service.
    public func generateRandom(_ handle: CK_SESSION_HANDLE, count: Int) throws(P11Error) -> [UInt8] {
        let session = try session(handle)
        let member = try session.group.pick()
        member.served.add(1, ordering: .relaxed)
        return try member.generateRandom(try session.memberSession(member), count: count)
    }

    /// Mixes the seed into every member's generator.
    public func seedRandom(_ handle: CK_SESSION_HANDLE, _ seed: [UInt8]) throws(P11Error) {
        let session = try session(handle)
        _ = try everyMember(of: session.group, session.group.membersInService) { (member) throws(P11Error) in
            try member.seedRandom(try session.memberSession(member), seed)
        }
    }

    /// A call that may end the operation: it stays active after a length query or CKR_BUFFER_TOO_SMALL
    /// (PKCS#11 5.2), and ends on anything else, success or error.
    @discardableResult
    private func finishing(_ kind: OperationKind, _ handle: CK_SESSION_HANDLE,
                           _ body: (Member, CK_SESSION_HANDLE) throws(P11Error) -> Output) throws(P11Error) -> Output {
        let session = try session(handle)
        let op = try session.operation(kind)
        let member = session.group.members[op.member]
        do {
            let output = try body(member, try session.memberSession(member))
            if case .data = output { session.endOperation(kind) }
            return output
        } catch {
            if error.rv != CKR_BUFFER_TOO_SMALL { session.endOperation(kind) }
            throw error
        }
    }

    /// An update: the operation goes on after success, and ends on an error (PKCS#11 5.2), except
    /// CKR_BUFFER_TOO_SMALL.
    @discardableResult
    private func continuing<T>(_ kind: OperationKind, _ handle: CK_SESSION_HANDLE,
                               _ body: (Member, CK_SESSION_HANDLE) throws(P11Error) -> T) throws(P11Error) -> T {
        let session = try session(handle)
        let op = try session.operation(kind)
        let member = session.group.members[op.member]
        do {
            return try body(member, try session.memberSession(member))
        } catch {
            if error.rv != CKR_BUFFER_TOO_SMALL { session.endOperation(kind) }
            throw error
        }
    }
}
