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
        /// False once the updates outgrew the replay buffer: a member fault then ends the operation.
        var replayable = true
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

    /// Gives this session a fresh session on `member` (an operation left active in the old one would refuse the
    /// next): opened before the old one closes, since closing an application's last session on a token logs it
    /// out there. Returns the new one, or nil when the member would not open one (the old one then stays).
    @discardableResult
    func replaceMemberSession(_ member: Member) -> MemberSession? {
        guard let fresh = try? member.token.openSession(readWrite: readWrite) else { return nil }
        let old = state.withLock { state -> MemberSession? in
            defer { state.memberSessions[member.index] = fresh }
            return state.memberSessions[member.index]
        }
        if let old { member.token.closeSession(old) }
        return fresh
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
                op.replayable = false
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
