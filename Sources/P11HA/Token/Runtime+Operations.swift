// Operations in progress across failures: an operation is started on a member chosen by the scheduler, and
// started again on a peer with its updates so far when its member fails.
import CInterop

extension Runtime {
    /// Starts an operation on a member chosen by the scheduler and replays `parts` (its updates so far) there,
    /// moving on at each member fault. Returns the member's index; its load counts the operation.
    /// `suspects`: members that answered the operation a fault-class code already (they are not asked again; a
    /// peer's success convicts them).
    func startOperation(_ kind: OperationKind, _ session: VirtualSession, _ mechanism: Mechanism,
                        key: ObjectHandle?, replaying parts: [[UInt8]] = [],
                        suspects: inout FanOut.Suspects) throws(P11Error) -> Int {
        let group = session.group
        // The members in service when the copies were read (taken first): one that returns meanwhile (waited for
        // below) had its copies found again as it returned, and after a module restart an old handle may name
        // another key there (seen: CKR_KEY_FUNCTION_NOT_PERMITTED on a public key after every member returned).
        var servingThen = Set(group.membersInService.map(\.index))
        var copies = try key.map { (k) throws(P11Error) in try self.copies(of: k, in: session, invalid: .keyHandleInvalid) }
        var refreshed = Set<Int>()
        var excluded = suspects.indices
        let earlier = suspects.count
        var refused: P11Error? = nil
        while true {
            let member: Member
            do {
                member = try fanOut.awaitingRecovery(group) { () throws(P11Error) in try group.pick(holding: copies, excluding: excluded) }
            } catch {
                throw fanOut.verdict(on: suspects, otherwise: refused ?? error)
            }
            if let key, !servingThen.contains(member.index) {
                servingThen = Set(group.membersInService.map(\.index))
                copies = try self.copies(of: key, in: session, invalid: .keyHandleInvalid)
                if copies?[member.index] == nil { excluded.insert(member.index); continue }
            }
            member.inFlight.add(1, ordering: .relaxed)
            do throws(P11Error) {
                let memberSession = try session.memberSession(member)
                do throws(P11Error) {
                    try member.token.operationInit(kind, memberSession, mechanism, key: copies?[member.index] ?? nil)
                } catch where error.fromMember && error.rv == CKR_OPERATION_ACTIVE {
                    // This virtual session runs none of this kind there: one was left active in our session there (a
                    // token that did not end it at an error). Ended, and tried once more.
                    session.endStrayOperations(on: member, memberSession)
                    try member.token.operationInit(kind, memberSession, mechanism, key: copies?[member.index] ?? nil)
                }
                for part in parts {
                    if kind == .encrypt || kind == .decrypt {
                        // The application already has these parts' output: the replay's is discarded.
                        _ = try member.token.cipherUpdate(kind, memberSession, part, capacity: part.count + 1024)
                    } else {
                        try member.token.update(kind, memberSession, part)
                    }
                }
                member.served.add(1, ordering: .relaxed)
                // A peer started it where they could not: those that failed this start are at fault.
                fanOut.convict(suspects, from: earlier)
                return member.index
            } catch where error.isMemberFault {
                member.inFlight.subtract(1, ordering: .relaxed)
                if session.isClosed, error.isSessionLoss { throw P11Error.sessionHandleInvalid }
                excluded.insert(member.index)
                fanOut.accuse(member, error, &suspects)
            } catch where error.fromMember && (error.rv == CKR_KEY_HANDLE_INVALID || error.rv == CKR_OBJECT_HANDLE_INVALID)
                        && key != nil && !refreshed.contains(member.index) {
                // Our handle of the key's copy there went stale (the member's module restarted): find it again. Not
                // found, that member cannot do it now (perhaps the key is private and another thread logged out):
                // if none can, the members' answer is the caller's, as one token's would be.
                member.inFlight.subtract(1, ordering: .relaxed)
                refreshed.insert(member.index)
                if refreshCopy(of: key!, on: member, in: session) == nil {
                    excluded.insert(member.index)
                    refused = .keyHandleInvalid
                }
                copies = try self.copies(of: key!, in: session, invalid: .keyHandleInvalid)
            } catch {
                member.inFlight.subtract(1, ordering: .relaxed)
                // The key argument is the application's handle: its code is CKR_KEY_HANDLE_INVALID, which every
                // *Init lists, where SoftHSM names a key it cannot find CKR_OBJECT_HANDLE_INVALID, which none does.
                if error.fromMember && error.rv == CKR_OBJECT_HANDLE_INVALID && key != nil { throw P11Error.keyHandleInvalid }
                throw error
            }
        }
    }

    /// The operation's member answered a fault-class code (it is among `suspects`) or had already left service:
    /// start it again on a peer with its updates so far. Past the replay buffer, or with no peer, the
    /// operation ends (the suspects judged by a probe: the member's code if it answers, a member fault if not).
    func failover(_ kind: OperationKind, _ session: VirtualSession, _ op: VirtualSession.Operation,
                  suspects: inout FanOut.Suspects) throws(P11Error) -> VirtualSession.Operation {
        let failed = session.group.members[op.member]
        failed.inFlight.subtract(1, ordering: .relaxed)
        // Left while it still answers (a suspect, or a member whose failure has not been judged against it), the
        // operation may still be active in our session there: it is ended, or the next search or operation there
        // would find CKR_OPERATION_ACTIVE (a token allows one operation per session: SoftHSM).
        if failed.isInService, let s = try? session.memberSession(failed) { session.endStrayOperations(on: failed, s, only: [kind]) }
        session.setOperation(kind, nil)
        if let reason = op.unreplayable {
            Log.event(.warning, "replay-impossible", "group=\(session.group.name) member=\(failed.name) reason=\"\(reason)\"")
            throw fanOut.verdict(on: suspects, otherwise: .deviceError)
        }
        let index: Int
        do {
            index = try startOperation(kind, session, op.mechanism, key: op.key, replaying: op.parts, suspects: &suspects)
        } catch where error.rv == CKR_KEY_HANDLE_INVALID {
            // The key is gone since the operation began (destroyed, or a private key a logout took with it): it cannot
            // start again anywhere. Its member's own answer is the caller's, judged as any other (SoftHSM answers
            // CKR_GENERAL_ERROR to C_Sign there; no C_Sign, C_*Update or C_*Final lists a key handle code).
            throw fanOut.verdict(on: suspects, otherwise: .deviceError)
        }
        var moved = op
        moved.member = index
        moved.epoch = session.group.members[index].epoch.load(ordering: .acquiring)
        session.setOperation(kind, moved)
        Log.event(.info, "operation-replayed", "group=\(session.group.name) from=\(failed.name) to=\(session.group.members[index].name) parts=\(op.parts.count)")
        return moved
    }
}

/// The operation flags of CK_MECHANISM_INFO that C_SessionCancel takes, by operation.
extension OperationKind {
    public var cancelFlag: CK_FLAGS {
        switch self {
        case .encrypt: CK_FLAGS(CKF_ENCRYPT)
        case .decrypt: CK_FLAGS(CKF_DECRYPT)
        case .digest: CK_FLAGS(CKF_DIGEST)
        case .sign: CK_FLAGS(CKF_SIGN)
        case .verify: CK_FLAGS(CKF_VERIFY)
        case .signRecover: CK_FLAGS(CKF_SIGN_RECOVER)
        case .verifyRecover: CK_FLAGS(CKF_VERIFY_RECOVER)
        }
    }
}

extension Runtime {
    /// C_SessionCancel (PKCS#11 3.0), done by p11ha itself over 2.40 members: the session's operations named by
    /// `flags` end (a search too, for CKF_FIND_OBJECTS), and each one's member session is rid of it the way a
    /// stray operation is (`VirtualSession.endStrayOperations`), so that the next C_*Init starts afresh. A flag
    /// for an operation not under way is ignored, as the specification says.
    public func cancelOperations(_ handle: SessionHandle, flags: CK_FLAGS) throws(P11Error) {
        let session = try session(handle)
        defer { session.endCall() }
        if flags & CK_FLAGS(P11HA_CKF_FIND_OBJECTS) != 0 {
            session.state.withLock { $0.search = nil }
        }
        for kind in OperationKind.allCases where flags & kind.cancelFlag != 0 {
            guard let op = try? session.operation(kind) else { continue }
            session.endOperation(kind)
            let member = session.group.members[op.member]
            guard let memberSession = try? session.memberSession(member) else { continue }
            session.endStrayOperations(on: member, memberSession, only: [kind])
        }
    }
}

/// C_GetOperationState and C_SetOperationState: an operation's state is its member's own format, so it is saved
/// with the member it belongs to (p11ha's header: "P11HA-OS", the member's index, the operation's kind and
/// mechanism) and restored on that member only. A restored operation is not replayed on a peer if its member
/// fails: p11ha does not know the updates that made the state.
extension Runtime {
    private static let stateMagic = Array("P11HA-OS".utf8)
    private static let stateHeader = stateMagic.count + 4 + 1 + 8

    public func operationState(_ handle: SessionHandle) throws(P11Error) -> [UInt8] {
        let session = try session(handle)
        defer { session.endCall() }
        let active = session.state.withLock { state in
            state.operations.enumerated().compactMap { index, op in op.map { (kind: OperationKind(rawValue: index)!, op: $0) } }
        }
        // Operations of several kinds may run on different members: no one member's state holds them all.
        guard active.count <= 1 else { throw P11Error(CK_RV(CKR_STATE_UNSAVEABLE)) }
        // Without an operation, the first member in service answers as it would directly (SoftHSM:
        // CKR_FUNCTION_NOT_SUPPORTED), and its state, if it gives one, restores "no operation".
        guard let member = active.first.map({ session.group.members[$0.op.member] }) ?? session.group.membersInService.first else {
            throw P11Error.deviceError
        }
        if let first = active.first, !member.isInService || member.epoch.load(ordering: .acquiring) != first.op.epoch {
            throw P11Error(CK_RV(CKR_STATE_UNSAVEABLE))
        }
        let state: [UInt8]
        do {
            state = try member.token.operationState(try session.memberSession(member))
        } catch where error.isMemberFault {
            // An operation goes on (its next call fails it over); its state cannot be had now.
            throw P11Error(CK_RV(CKR_STATE_UNSAVEABLE))
        }
        return Self.stateMagic + bigEndianBytes(UInt32(member.index)) + [active.first.map { UInt8($0.kind.rawValue) } ?? Self.noOperation]
            + bigEndianBytes(UInt64(active.first?.op.mechanism.type ?? 0)) + state
    }

    /// The kind byte of a state saved with no operation under way.
    private static let noOperation: UInt8 = 0xFF

    public func setOperationState(_ handle: SessionHandle, _ saved: [UInt8], encryptionKey: ObjectHandle?,
                                  authenticationKey: ObjectHandle?) throws(P11Error) {
        let session = try session(handle)
        defer { session.endCall() }
        let invalid = P11Error(CK_RV(CKR_SAVED_STATE_INVALID))
        let magic = Self.stateMagic.count
        guard saved.count >= Self.stateHeader, Array(saved.prefix(magic)) == Self.stateMagic else {
            // Not a state p11ha saved: the first member in service answers it as it would directly (SoftHSM:
            // CKR_FUNCTION_NOT_SUPPORTED; a token that saves states: CKR_SAVED_STATE_INVALID).
            guard let member = session.group.membersInService.first else { throw invalid }
            let memberSession = try session.memberSession(member)
            do {
                try member.token.setOperationState(memberSession, saved, encryptionKey: nil, authenticationKey: nil)
            } catch where !error.isMemberFault {
                throw error
            } catch {
                throw invalid
            }
            session.endStrayOperations(on: member, memberSession)
            throw invalid
        }
        let index = Int(bigEndianValue(saved[magic..<magic + 4]) as UInt32)
        let mechanismType: UInt64 = bigEndianValue(saved[magic + 5..<magic + 13])
        let kindByte = saved[magic + 4]
        let kind = OperationKind(rawValue: Int(kindByte))
        guard index < session.group.members.count, kind != nil || kindByte == Self.noOperation else { throw invalid }
        let member = session.group.members[index]
        guard member.isInService else {
            Log.event(.warning, "operation-state-lost", "group=\(session.group.name) member=\(member.name) reason=\"the state belongs to a member out of service\"")
            throw invalid
        }
        func copy(_ key: ObjectHandle?) throws(P11Error) -> MemberObject? {
            guard let key else { return nil }
            guard let copy = try copies(of: key, in: session, invalid: .keyHandleInvalid)[index] else { throw P11Error.keyHandleInvalid }
            return copy
        }
        let memberSession = try session.memberSession(member)
        do {
            try member.token.setOperationState(memberSession, Array(saved[Self.stateHeader...]),
                                               encryptionKey: try copy(encryptionKey), authenticationKey: try copy(authenticationKey))
        } catch where error.isMemberFault {
            // No peer can take a state in that member's format: the device's error, whatever its code.
            throw P11Error.deviceError
        }
        // The saved operation replaces the session's: those running on other members end there.
        let replaced = session.state.withLock { state in state.operations.compactMap { $0?.member } }
        session.endAllOperations()
        for other in Set(replaced) where other != index {
            let otherMember = session.group.members[other]
            if let s = try? session.memberSession(otherMember) { session.endStrayOperations(on: otherMember, s) }
        }
        guard let kind else { return }
        var op = VirtualSession.Operation(member: index, epoch: member.epoch.load(ordering: .acquiring),
                                          mechanism: Mechanism(CK_MECHANISM_TYPE(mechanismType)), key: nil)
        op.unreplayable = "restored by C_SetOperationState: its state is that member's own"
        member.inFlight.add(1, ordering: .relaxed)
        session.setOperation(kind, op)
    }
}
