// The library's life: C_Initialize and C_Finalize, use after fork, and the groups and sessions of one initialization.
import CInterop
import Glibc
import Synchronization

/// The process-wide state behind the C ABI. Its locks are `ProcessLock`s, safe across fork (see Fork.swift).
public enum Library {
    static let current = ProcessLock<Runtime?>(nil)
    /// Serializes initialize and finalize, which call members; kept apart from `current` so that
    /// ordinary calls never wait on a member.
    static let lifecycle = ProcessLock(())
    /// Runtimes a child inherited from its parent: never used, never freed (their threads, locks and member
    /// sessions are the parent's; freeing them could wait on a condition no thread here will ever signal).
    private static let inherited = ProcessLock<[Runtime]>([])

    public static func initialize() throws(P11Error) {
        try lifecycle.withLock { (_) throws(P11Error) in
            let afterFork = ForkGate.happened.load(ordering: .sequentiallyConsistent)
            if afterFork {
                if ForkGate.registryLost.load(ordering: .relaxed) {
                    Log.event(.error, "fork-unsafe", "a member module was being loaded when the process forked; p11ha cannot start in this child")
                    throw P11Error.generalError
                }
                // Abandon the parent's runtime without touching its member sessions: they belong to the parent.
                let parents = current.withLock { runtime in defer { runtime = nil }; return runtime }
                if let parents { inherited.withLock { $0.append(parents) } }
                ForkGate.happened.store(false, ordering: .sequentiallyConsistent)
            }
            if current.withLock({ $0 != nil }) { throw P11Error(CK_RV(CKR_CRYPTOKI_ALREADY_INITIALIZED)) }
            let path = Config.pathFromEnvironment()
            let config: Config
            do {
                config = try Config.load(path: path)
            } catch {
                if let (destination, level) = Config.logDestination(inFileAt: path) { Log.configure(destination, level: level) }
                Log.event(.error, "config-error", "\(error)")
                throw P11Error.generalError
            }
            ForkGate.install(drainWait: config.boundedWait)
            // Members start on a thread of p11ha's own: what their modules leave in thread-local state (SoftHSM's
            // OpenSSL error queue) must not reach the application's thread, where nginx would fail a handshake.
            final class Outcome: @unchecked Sendable { var value: Result<Runtime, any Error>? }
            let outcome = Outcome()
            let done = Signal()
            let startConfig = config
            spawnThread {
                outcome.value = Result { try Runtime.start(startConfig, afterFork: afterFork) }
                done.raise()
            }
            done.wait(timeout: nil)
            let runtime: Runtime
            switch outcome.value! {
            case .success(let started): runtime = started
            case .failure(let error):
                Log.event(.error, "config-error", "\(error)")
                throw P11Error.generalError
            }
            current.withLock { $0 = runtime }
            ForkGate.installExitHandler()
        }
    }

    public static func finalize() throws(P11Error) {
        try lifecycle.withLock { (_) throws(P11Error) in
            let runtime = try self.runtime()
            current.withLock { $0 = nil }
            runtime.shutdown()
        }
    }

    /// The runtime of this initialization, or CKR_CRYPTOKI_NOT_INITIALIZED (also in a fresh child after fork).
    @inline(__always)
    public static func runtime() throws(P11Error) -> Runtime {
        if ForkGate.happened.load(ordering: .relaxed) { throw P11Error.notInitialized }
        guard let runtime = current.withLock({ $0 }) else { throw P11Error.notInitialized }
        return runtime
    }
}

/// A member's name in logs and reports: its token's label, with the remote address when it has one.
/// The same whether or not the member answers at start (the label its URI names, when it names one), so that
/// logs and the status file name it alike in every process.
private func memberName(_ config: MemberConfig, token: any TokenBackend, connected: Bool) -> String {
    let answered = connected ? (try? token.tokenInfo()).map { fieldString($0.label) } : nil
    let label = config.uri.tokenLabel ?? answered ?? config.displayURI
    return config.via.map { "\(label)@\($0)" } ?? label
}

/// Makes the backend of a configured member: its module, under the operation-timeout when there is one.
public typealias BackendFactory = (_ member: MemberConfig, _ group: GroupConfig, _ afterFork: Bool) -> any TokenBackend

/// The groups and sessions of one C_Initialize.
public final class Runtime: @unchecked Sendable {
    public let config: Config
    public let groups: [Group]
    let sessions: SessionTable
    /// Runs work on members; the one place their health changes.
    let fanOut: FanOut
    package let replicas: ReplicaKeeper
    let replicator: Replicator
    let recovery: Recovery

    private init(config: Config, groups: [Group], backgroundRecovery: Bool) {
        self.config = config
        self.groups = groups
        let sessions = SessionTable()
        self.sessions = sessions
        let worker = RecoveryWorker(interval: config.recoveryInterval, scrub: config.scrubInterval, background: backgroundRecovery)
        self.fanOut = FanOut(recovery: worker, recoveryWait: config.boundedWait)
        self.replicas = ReplicaKeeper(fanOut: fanOut)
        self.replicator = Replicator(fanOut: fanOut, generatedKeys: config.generatedKeys)
        self.recovery = Recovery(worker: worker, groups: groups, sessions: sessions, fanOut: fanOut)
    }

    public struct StartError: Error, CustomStringConvertible {
        public let description: String
    }

    /// The backends of real members: each member's module, under the operation-timeout when there is one.
    public static func moduleBackends(_ config: Config) -> BackendFactory {
        { member, _, afterFork in
            let module = ModuleBackend(uri: member.uri, via: member.via, afterFork: afterFork)
            guard let timeout = config.operationTimeout else { return module }
            return DeadlineBackend(module, timeout: timeout)
        }
    }

    /// Connects every member's token; a member whose configuration cannot work fails the start, naming its
    /// line; one that does not answer now starts failed, and recovery takes it in when it answers.
    public static func start(_ config: Config, afterFork: Bool = false,
                             backends: BackendFactory? = nil, backgroundRecovery: Bool = true,
                             replicaClock: ReplicaClock? = nil) throws(StartError) -> Runtime {
        Log.configure(config.log, level: config.logLevel, facility: config.logFacility)
        let makeBackend = backends ?? moduleBackends(config)
        var groups: [Group] = []
        let tokens = config.groups.map { group in group.members.map { makeBackend($0, group, afterFork) } }
        func fail(_ line: Int, _ message: String) -> StartError {
            // Every token was connected at once: each lets go of its module (one that never got it does nothing).
            for token in tokens.joined() { token.disconnect() }
            return StartError(description: "\(config.path):\(line): \(message)")
        }
        var seen: [String: Int] = [:]
        var unreachableAtStart: [(Member, String)] = []
        let outcomes = connectAll(zip(config.groups.flatMap(\.members), tokens.joined()).map { ($0.moduleKey, $1) })
        var next = 0
        for (groupIndex, groupConfig) in config.groups.enumerated() {
            var members: [Member] = []
            for (index, memberConfig) in groupConfig.members.enumerated() {
                let token = tokens[groupIndex][index]
                var unreachable: String? = nil
                defer { next += 1 }
                switch outcomes[next] {
                case .success: break
                case .failure(.configuration(let message)):
                    throw fail(memberConfig.line, "member \(memberConfig.displayURI): \(message)")
                case .failure(.unreachable(let message)):
                    unreachable = message
                }
                var ownPIN: Secret? = nil
                if let value = memberConfig.uri.pinValue {
                    ownPIN = Secret(value)
                } else if let source = memberConfig.uri.pinSource {
                    do throws(FileReadError) {
                        ownPIN = try Secret.reading(pinSource: source)
                    } catch {
                        throw fail(memberConfig.line, "member \(memberConfig.displayURI): pin-source \(Secret.pinSourcePath(source)): \(error)")
                    }
                }
                let name = memberName(memberConfig, token: token, connected: unreachable == nil)
                // Two lines naming one token would count every write twice: tokens are told apart by serial.
                if unreachable == nil, let serial = (try? token.tokenInfo()).map({ "\(memberConfig.uri.modulePath)#\(memberConfig.via ?? "")#\(fieldString($0.serialNumber))#\(fieldString($0.label))" }) {
                    if let other = seen[serial] {
                        throw fail(memberConfig.line, "member \(memberConfig.displayURI) is the same token as line \(other)")
                    }
                    seen[serial] = memberConfig.line
                }
                let member = Member(index: index, name: name, config: memberConfig, token: token,
                                    connected: unreachable == nil, ownPIN: ownPIN)
                if let unreachable { unreachableAtStart.append((member, unreachable)) }
                members.append(member)
            }
            groups.append(Group(slotID: CK_SLOT_ID(groupIndex), config: groupConfig, members: members,
                                lockDirectory: config.lockDirectory, lockWait: config.boundedWait,
                                replicaClock: replicaClock ?? ReplicaClock(), retention: config.recordRetention))
        }
        for group in groups {
            Log.event(.info, "group-ready", "group=\(group.name) members=\(group.members.count) mechanisms=\(group.mechanisms.count)")
        }
        let runtime = Runtime(config: config, groups: groups, backgroundRecovery: backgroundRecovery)
        for (member, reason) in unreachableAtStart { runtime.fanOut.startFailed(member, reason: "unreachable at start: \(reason)") }
        if !unreachableAtStart.isEmpty { runtime.recovery.worker.wake() }
        return runtime
    }

    /// Connects every token at once, so that the start takes one operation-timeout however many members do not
    /// answer. Tokens of one module connect one after another: the module starts once, for the first.
    private static func connectAll(_ tokens: [(module: String, token: any TokenBackend)]) -> [Result<Void, ConnectFailure>] {
        final class Outcomes: @unchecked Sendable {
            var results: [Result<Void, ConnectFailure>?]
            init(_ count: Int) { results = Array(repeating: nil, count: count) }
        }
        let outcomes = Outcomes(tokens.count)
        var byModule: [String: [Int]] = [:]
        for (index, entry) in tokens.enumerated() { byModule[entry.module, default: []].append(index) }
        if byModule.count == 1 {
            for (index, entry) in tokens.enumerated() { outcomes.results[index] = Result { () throws(ConnectFailure) in try entry.token.connect() } }
            return outcomes.results.map { $0! }
        }
        let lock = Mutex(())
        var done: [Signal] = []
        for indices in byModule.values {
            let finished = Signal()
            done.append(finished)
            let chain = indices.map { ($0, tokens[$0].token) }
            spawnThread {
                for (index, token) in chain {
                    let result = Result { () throws(ConnectFailure) in try token.connect() }
                    lock.withLock { _ in outcomes.results[index] = result }
                }
                finished.raise()
            }
        }
        for finished in done { finished.wait(timeout: nil) }
        return lock.withLock { _ in outcomes.results.map { $0! } }
    }

    /// Closes every session and releases the modules.
    /// Members are let go of side by side, so that C_Finalize takes one operation-timeout however many members
    /// stop answering now.
    public func shutdown() {
        recovery.worker.stop()
        var byMember: [ObjectIdentifier: [MemberSession]] = [:]
        for session in sessions.removeAll() {
            for (member, handle) in detachMemberSessions(session) { byMember[ObjectIdentifier(member), default: []].append(handle) }
        }
        for group in groups {
            group.login.withLock { $0 = Group.LoginState() }
        }
        let boundedWait = config.boundedWait
        var done: [Signal] = []
        for member in groups.flatMap(\.members) {
            let handles = byMember[ObjectIdentifier(member)] ?? []
            let finished = Signal()
            done.append(finished)
            spawnThread {
                // A member with a call stuck inside it (past its deadline) is not asked: each close would wait the
                // whole operation-timeout for nothing; its sessions end with its module.
                for handle in handles where member.token.callsOverdue == 0 { member.token.closeSession(handle) }
                // Calls given up at their deadline that have since been released (a member that answers again)
                // finish first, within the operation-timeout: a module finalized, or a process exiting, under one of
                // them crashes (SoftHSM's C_Sign). One still stuck after that keeps its module unfinalized.
                waitWhile({ member.token.callsOverdue > 0 }, upTo: boundedWait, polling: .milliseconds(1))
                finished.raise()
            }
        }
        for finished in done { finished.wait(timeout: nil) }
        // Released one after another: members of one module share its start and stop.
        for member in groups.flatMap(\.members) { member.token.disconnect() }
    }

    public func group(_ slot: CK_SLOT_ID) throws(P11Error) -> Group {
        guard slot < CK_SLOT_ID(groups.count) else { throw P11Error.slotIDInvalid }
        return groups[Int(slot)]
    }

    /// The session a call is for, counted as in use until the call's `endCall` (`defer` right after): closing it
    /// waits for the calls under way, since a member's module may not survive its session closed under a call
    /// (SoftHSM crashes in C_Sign).
    @inline(__always)
    func session(_ handle: SessionHandle) throws(P11Error) -> VirtualSession {
        let session = try sessions.resolve(handle)
        try session.beginCall()
        return session
    }

    func closeMemberSessions(_ session: VirtualSession) {
        // A member with a call stuck inside it (past its deadline) is not asked: each close would wait the whole
        // operation-timeout for nothing; its sessions end with its module.
        for (member, handle) in detachMemberSessions(session) where member.token.callsOverdue == 0 {
            member.token.closeSession(handle)
        }
    }

    /// Ends the session for the application and takes its member sessions off it, for the caller to close.
    private func detachMemberSessions(_ session: VirtualSession) -> [(Member, MemberSession)] {
        session.markClosed()
        // Calls already under way finish first (each within the operation-timeout); new ones are refused.
        waitWhile({ session.callsUnderWay > 0 }, upTo: config.boundedWait, polling: .microseconds(200))
        session.endAllOperations()
        let (handles, retired) = session.state.withLock { state in
            defer {
                state.memberSessions = state.memberSessions.map { _ in nil }
                state.retired = []
            }
            return (state.memberSessions, state.retired)
        }
        let members = session.group.members
        return handles.enumerated().compactMap { index, handle in handle.map { (members[index], $0) } }
            + retired.map { (members[$0.member], $0.session) }
    }

    /// Per-member figures for operators and tests.
    public struct MemberFigures: Sendable {
        public let name: String
        public let health: Health
        public let served: UInt64
        public let inFlight: Int
    }

    public func figures(slot: CK_SLOT_ID) throws(P11Error) -> [MemberFigures] {
        try group(slot).members.map {
            MemberFigures(name: $0.name, health: $0.health, served: $0.served.load(ordering: .relaxed),
                          inFlight: $0.inFlight.load(ordering: .relaxed))
        }
    }
}

extension MemberConfig {
    /// Which loaded module the member's token is reached through (members of one SoftHSM share one).
    var moduleKey: String { via.map { "\(uri.modulePath) via \($0)" } ?? uri.modulePath }
}
