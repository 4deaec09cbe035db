// The library's life: C_Initialize and C_Finalize, use after fork, and the groups and sessions of one initialization.
import CInterop
import Glibc
import Synchronization

/// The process-wide state behind the C ABI.
public enum Library {
    private static let current = Mutex<Runtime?>(nil)
    /// Serializes initialize and finalize, which call members; kept apart from `current` so that
    /// ordinary calls never wait on a member.
    private static let lifecycle = Mutex(false)
    /// Set in a child process after fork: the parent's state is not this process's to use.
    private static let forked = Atomic<Bool>(false)

    public static func initialize() throws(P11Error) {
        try lifecycle.withLock { (atforkRegistered) throws(P11Error) in
            if !atforkRegistered {
                pthread_atfork(nil, nil, { Library.forked.store(true, ordering: .sequentiallyConsistent) })
                atforkRegistered = true
            }
            let afterFork = forked.load(ordering: .sequentiallyConsistent)
            if afterFork {
                // Abandon the parent's runtime without touching its member sessions: they belong to the parent.
                current.withLock { $0 = nil }
                ModuleRegistry.forgetUsersAfterFork()
                forked.store(false, ordering: .sequentiallyConsistent)
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
            // Members start on a thread of p11ha's own: what their modules leave in thread-local state (SoftHSM's
            // OpenSSL error queue) must not reach the application's thread, where nginx would fail a handshake.
            final class Outcome: @unchecked Sendable { var value: Result<Runtime, any Error>? }
            let outcome = Outcome()
            let done = Signal()
            let startConfig = config
            spawnThread {
                outcome.value = Result { try Runtime.start(startConfig, afterFork: afterFork) }
                done.raise()
                parkForever()
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
        if forked.load(ordering: .relaxed) { throw P11Error.notInitialized }
        guard let runtime = current.withLock({ $0 }) else { throw P11Error.notInitialized }
        return runtime
    }
}

/// A member's name in logs and reports: its token's label, with the remote address when it has one.
private func memberName(_ config: MemberConfig, module: LoadedModule, slot: CK_SLOT_ID, in group: GroupConfig) -> String {
    var info = CK_TOKEN_INFO()
    let label = slot != CK_SLOT_ID.max && module.f.C_GetTokenInfo!(slot, &info) == CKR_OK ? fieldString(info.label) : config.displayURI
    return config.via.map { "\(label)@\($0)" } ?? label
}

/// The groups and sessions of one C_Initialize.
public final class Runtime: @unchecked Sendable {
    public let config: Config
    public let groups: [Group]
    let sessions = Mutex<[CK_SESSION_HANDLE: VirtualSession]>([:])
    private let nextSession = Atomic<UInt>(1)
    private let modules: [LoadedModule]
    let recovery: RecoveryWorker

    private init(config: Config, groups: [Group], modules: [LoadedModule]) {
        self.config = config
        self.groups = groups
        self.modules = modules
        self.recovery = RecoveryWorker(interval: config.recoveryInterval)
        recovery.attach(self)
    }

    public struct StartError: Error, CustomStringConvertible {
        public let description: String
    }

    /// Loads every member's module and finds its token; any member that cannot be reached fails the start,
    /// naming the configuration line.
    public static func start(_ config: Config, afterFork: Bool = false) throws(StartError) -> Runtime {
        Log.configure(config.log, level: config.logLevel, facility: config.logFacility)
        var modules: [LoadedModule] = []
        var groups: [Group] = []
        func fail(_ line: Int, _ message: String) -> StartError {
            for module in modules { ModuleRegistry.release(module) }
            return StartError(description: "\(config.path):\(line): \(message)")
        }
        var seen: [String: Int] = [:]
        for (groupIndex, groupConfig) in config.groups.enumerated() {
            var members: [Member] = []
            for (index, memberConfig) in groupConfig.members.enumerated() {
                let module: LoadedModule
                let slot: CK_SLOT_ID
                do {
                    module = try ModuleRegistry.acquire(path: memberConfig.uri.modulePath, address: memberConfig.via,
                                                        afterFork: afterFork)
                } catch {
                    throw fail(memberConfig.line, "member \(memberConfig.displayURI): \(error)")
                }
                modules.append(module)
                var unreachable: String? = nil
                do {
                    slot = try Member.locate(memberConfig.uri, in: module)
                } catch {
                    // A remote member whose server is down, or a slot that does not answer, is a failed member,
                    // not a configuration error: the group starts without it and takes it in when it answers.
                    guard memberConfig.via != nil || error.unreachable else {
                        throw fail(memberConfig.line, "member \(memberConfig.displayURI): \(error)")
                    }
                    slot = CK_SLOT_ID.max
                    unreachable = "\(error)"
                }
                let key = "\(module.path)#\(memberConfig.via ?? "")#\(slot)"
                if unreachable == nil, let other = seen[key] {
                    throw fail(memberConfig.line, "member \(memberConfig.displayURI) is the same token as line \(other)")
                }
                seen[key] = memberConfig.line
                var ownPIN: Secret? = nil
                if let value = memberConfig.uri.pinValue {
                    ownPIN = Secret(value)
                } else if let source = memberConfig.uri.pinSource {
                    guard let pin = Secret.fromPinSource(source) else {
                        throw fail(memberConfig.line, "member \(memberConfig.displayURI): cannot read pin-source \(source)")
                    }
                    ownPIN = pin
                }
                let member = Member(index: index, name: memberName(memberConfig, module: module, slot: slot, in: groupConfig),
                                    config: memberConfig, module: module, slotID: slot, ownPIN: ownPIN,
                                    deadline: config.operationTimeout)
                if let unreachable { member.leaveService(.failed, reason: "unreachable at start: \(unreachable)") }
                members.append(member)
            }
            groups.append(Group(slotID: CK_SLOT_ID(groupIndex), config: groupConfig, members: members,
                                lockDirectory: config.lockDirectory))
        }
        for group in groups {
            Log.event(.info, "group-ready", "group=\(group.name) members=\(group.members.count) mechanisms=\(group.mechanisms.count)")
        }
        let runtime = Runtime(config: config, groups: groups, modules: modules)
        if groups.contains(where: { $0.members.contains { !$0.isInService } }) { runtime.recovery.wake() }
        return runtime
    }

    /// Closes every session and releases the modules.
    public func shutdown() {
        recovery.stop()
        let all = sessions.withLock { table in
            defer { table.removeAll() }
            return Array(table.values)
        }
        for session in all { closeMemberSessions(session) }
        for group in groups {
            group.login.withLock { $0 = Group.LoginState() }
        }
        for module in modules { ModuleRegistry.release(module) }
        for group in groups { for member in group.members { member.executor.close() } }
    }

    public func group(_ slot: CK_SLOT_ID) throws(P11Error) -> Group {
        guard slot < CK_SLOT_ID(groups.count) else { throw P11Error.slotIDInvalid }
        return groups[Int(slot)]
    }

    @inline(__always)
    func session(_ handle: CK_SESSION_HANDLE) throws(P11Error) -> VirtualSession {
        guard let session = sessions.withLock({ $0[handle] }) else { throw P11Error.sessionHandleInvalid }
        return session
    }

    func newSessionHandle() -> CK_SESSION_HANDLE {
        CK_SESSION_HANDLE(nextSession.add(1, ordering: .relaxed).oldValue)
    }

    func closeMemberSessions(_ session: VirtualSession) {
        session.endAllOperations()
        let (handles, retired) = session.state.withLock { state in
            defer {
                state.memberSessions = state.memberSessions.map { _ in nil }
                state.retired = []
            }
            return (state.memberSessions, state.retired)
        }
        for (index, handle) in handles.enumerated() {
            if let handle { session.group.members[index].closeSession(handle) }
        }
        for (index, handle) in retired { session.group.members[index].closeSession(handle) }
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
