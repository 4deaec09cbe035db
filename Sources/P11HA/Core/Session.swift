// A virtual session: its session on each member, and the operations in progress (with what replaying them needs).
import CInterop
import Synchronization

public final class VirtualSession: @unchecked Sendable {
    public let handle: SessionHandle
    public let group: Group
    public let readWrite: Bool
    let state: Mutex<State>
    private let closedFlag = Atomic<Bool>(false)
    /// The application closed it (C_CloseSession, C_CloseAllSessions, C_Finalize): a call still under way on
    /// another thread gets CKR_SESSION_HANDLE_INVALID, not a member fault.
    var isClosed: Bool { closedFlag.load(ordering: .sequentiallyConsistent) }
    func markClosed() { closedFlag.store(true, ordering: .sequentiallyConsistent) }

    /// Application calls using this session now. Counted before the closed flag is read (and the flag set before
    /// the count is read on closing), so that no call reaches a member once closing saw none under way.
    private let calls = Atomic<Int>(0)
    var callsUnderWay: Int { calls.load(ordering: .sequentiallyConsistent) }

    func beginCall() throws(P11Error) {
        calls.add(1, ordering: .sequentiallyConsistent)
        if isClosed {
            calls.subtract(1, ordering: .sequentiallyConsistent)
            throw P11Error.sessionHandleInvalid
        }
    }

    func endCall() { calls.subtract(1, ordering: .sequentiallyConsistent) }

    /// An operation in progress: which member runs it, and how to start it again elsewhere.
    struct Operation {
        var member: Int
        /// The member's failure count when the operation started there: if it has failed since, replay.
        var epoch: Int
        let mechanism: Mechanism
        /// The virtual key handle (nil for digest).
        let key: ObjectHandle?
        /// The updates so far, to replay on a peer if the member fails mid-operation.
        var parts: [[UInt8]] = []
        var bufferedBytes = 0
        /// Why a member fault ends the operation instead of a replay on a peer; nil while it can be replayed.
        var unreplayable: String? = nil
        var replayable: Bool { unreplayable == nil }

        init(member: Int, epoch: Int, mechanism: Mechanism, key: ObjectHandle?) {
            self.member = member
            self.epoch = epoch
            self.mechanism = mechanism
            self.key = key
            if !mechanism.parameter.isSelfContained {
                unreplayable = "the mechanism's parameter is a structure p11ha does not copy (it may point into the application's memory)"
            }
        }
    }

    struct Search {
        var results: [ObjectHandle]
        var cursor = 0
    }

    struct State {
        /// This session's session on each member, by member index; nil where none is open.
        var memberSessions: [MemberSession?]
        var operations = [Operation?](repeating: nil, count: OperationKind.allCases.count)
        var search: Search?
        /// Member sessions replaced after their member returned: closed with this session, never earlier,
        /// since a call may still be using one.
        var retired: [(member: Int, session: MemberSession)] = []
    }

    init(handle: SessionHandle, group: Group, readWrite: Bool, memberSessions: [MemberSession?]) {
        self.handle = handle
        self.group = group
        self.readWrite = readWrite
        self.state = Mutex(State(memberSessions: memberSessions))
    }

    /// This session's handle on `member`.
    /// A missing one (it could not be opened when the member returned) is that member's fault: the work moves on.
    func memberSession(_ member: Member) throws(P11Error) -> MemberSession {
        if let session = state.withLock({ $0.memberSessions[member.index] }) { return session }
        if isClosed { throw P11Error.sessionHandleInvalid }
        // None there: the member was out of service when this session opened, and came back before the session
        // was in the table its recovery gives sessions to. It gets one now.
        let opened = try member.token.openSession(readWrite: readWrite)
        let kept = state.withLock { state -> MemberSession in
            if let other = state.memberSessions[member.index] { return other }
            state.memberSessions[member.index] = opened
            return opened
        }
        if kept != opened { member.token.closeSession(opened) }
        return kept
    }

    /// Ends, in our session on `member`, any operation this session does not run there (one a token kept active
    /// past an error, or one left there by a failover): a token allows one operation per session (SoftHSM), and
    /// the session itself must stay, for the session objects it holds. A call that produces a result ends an
    /// operation, whatever it answers (but CKR_BUFFER_TOO_SMALL, which a large buffer avoids).
    func endStrayOperations(on member: Member, _ memberSession: MemberSession, only kinds: [OperationKind] = OperationKind.allCases) {
        let running = state.withLock { state in
            Set(state.operations.enumerated().compactMap { index, op in op?.member == member.index ? OperationKind(rawValue: index) : nil })
        }
        for kind in kinds where !running.contains(kind) {
            if kind == .verify {
                _ = try? member.token.verify(memberSession, [0], signature: [0])
            } else {
                _ = try? member.token.singlePart(kind, memberSession, [], capacity: 1 << 16)
            }
        }
    }

    func operation(_ kind: OperationKind) throws(P11Error) -> Operation {
        guard let op = state.withLock({ $0.operations[kind.rawValue] }) else { throw P11Error.operationNotInitialized }
        return op
    }

    func setOperation(_ kind: OperationKind, _ op: Operation?) {
        state.withLock { $0.operations[kind.rawValue] = op }
    }

    /// Keeps an update for replay, within `limit` bytes for the whole operation.
    func recordPart(_ kind: OperationKind, _ part: [UInt8], limit: Int) {
        state.withLock { state in
            guard var op = state.operations[kind.rawValue], op.replayable else { return }
            if op.bufferedBytes + part.count > limit {
                op.unreplayable = "updates exceeded replay-buffer"
                op.parts = []
            } else {
                op.parts.append(part)
                op.bufferedBytes += part.count
            }
            state.operations[kind.rawValue] = op
        }
    }

    /// Ends the operation of `kind`, releasing its member's load.
    func endOperation(_ kind: OperationKind) {
        let ended = state.withLock { state -> Operation? in
            defer { state.operations[kind.rawValue] = nil }
            return state.operations[kind.rawValue]
        }
        if let ended { group.members[ended.member].inFlight.subtract(1, ordering: .relaxed) }
    }

    /// Ends every operation (session closed, or the library finalized).
    func endAllOperations() {
        for kind in OperationKind.allCases { endOperation(kind) }
    }
}
