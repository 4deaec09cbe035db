// A loaded PKCS#11 module (one dlopen handle and function list per path, per address for remote members),
// shared by every member that uses it, and its initialization counted across them.
import CInterop
import Glibc
import Synchronization

/// Several members are often slots of one module instance (one SoftHSM config): the module is
/// initialized once, and finalized once by whoever initialized it.
public final class LoadedModule: @unchecked Sendable {
    public let path: String
    let functions: UnsafeMutablePointer<CK_FUNCTION_LIST>
    struct Users {
        var count = 0
        /// Whether p11ha's C_Initialize started it (and so must finalize it).
        var initializedByUs = false
    }
    /// Never held while the module is called: a module that never answers must not freeze its peers.
    let users = ProcessLock(Users())
    /// A C_Initialize or C_Finalize of this module is under way (perhaps stuck past its deadline): another
    /// one must not start beside it.
    fileprivate let changing = Atomic<Bool>(false)
    /// Calls inside the module now (`ForkGate`).
    let inFlight = Atomic<Int>(0)
    /// A restart of the module is under way (`ModuleRegistry.restartShared`): calls wait at `ForkGate.enter`.
    let restarting = Atomic<Bool>(false)
    /// A call outlasted a fork's wait for it: later forks do not wait for this module until its calls end.
    let wedged = Atomic<Bool>(false)
    /// In a child: one of the parent's calls was inside the module at fork, so its locks may be held for ever
    /// here. The child never calls it.
    let abandoned = Atomic<Bool>(false)

    fileprivate init(path: String, functions: UnsafeMutablePointer<CK_FUNCTION_LIST>) {
        self.path = path
        self.functions = functions
    }

    /// In the child, from fork's handler: the parent's users, starts and restarts under way are not this process's.
    /// A restart's flag copied set would hold every call of the child at `ForkGate.enter` for ever: the thread
    /// that would clear it is not here (a fork may come while a restart waits for the calls in flight to end).
    func afterFork() {
        users.withLock { $0.count = 0 }
        changing.store(false, ordering: .relaxed)
        restarting.store(false, ordering: .relaxed)
        abandoned.store(inFlight.load(ordering: .relaxed) > 0 || abandoned.load(ordering: .relaxed), ordering: .relaxed)
        inFlight.store(0, ordering: .relaxed)
        wedged.store(false, ordering: .relaxed)
    }

    /// Runs a start or stop of the module, unless one is under way already (then nil, at once).
    fileprivate func changingAlone<T, E: Error>(_ body: () throws(E) -> T) throws(E) -> T? {
        guard changing.compareExchange(expected: false, desired: true, ordering: .acquiringAndReleasing).exchanged else { return nil }
        defer { changing.store(false, ordering: .releasing) }
        return try body()
    }
}

public enum ModuleRegistry {
    /// Held only to look a module up or load it (dlopen and C_GetFunctionList), never across its C_Initialize.
    static let modules = ProcessLock<[String: LoadedModule]>([:])

    /// The module at `path` (for `address`, a p11-kit server address: `path` is then p11-kit's client module,
    /// whose C_GetFunctionList binds a new function list to P11_KIT_SERVER_ADDRESS at the moment of the call).
    /// Modules are never dlclosed: a module unloaded while its atexit handlers or threads are still
    /// registered (SoftHSM's OpenSSL) crashes the process.
    static func load(path: String, address: String?) throws(ConnectFailure) -> LoadedModule {
        try modules.withLock { (table) throws(ConnectFailure) -> LoadedModule in
            let key = address.map { "\(path) via \($0)" } ?? path
            if let existing = table[key] { return existing }
            guard let handle = dlopen(path, RTLD_NOW | RTLD_LOCAL) else {
                throw .configuration("cannot load module \(path): \(String(cString: dlerror()))")
            }
            // p11ha as its own member would call itself under its own locks: a deadlock at the first call.
            if dlsym(handle, "p11ha_module_identity") != nil {
                throw .configuration("\(path) is p11ha itself; a member must be another module")
            }
            guard let symbol = dlsym(handle, "C_GetFunctionList") else {
                throw .configuration("\(path) exports no C_GetFunctionList")
            }
            typealias GetFunctionList = @convention(c) (UnsafeMutablePointer<UnsafeMutablePointer<CK_FUNCTION_LIST>?>?) -> CK_RV
            let getFunctionList = unsafeBitCast(symbol, to: GetFunctionList.self)
            var list: UnsafeMutablePointer<CK_FUNCTION_LIST>? = nil
            let previous = getenv("P11_KIT_SERVER_ADDRESS").map { String(cString: $0) }
            if let address { setenv("P11_KIT_SERVER_ADDRESS", address, 1) }
            let rv = getFunctionList(&list)
            if address != nil {
                if let previous { setenv("P11_KIT_SERVER_ADDRESS", previous, 1) } else { unsetenv("P11_KIT_SERVER_ADDRESS") }
            }
            guard rv == CKR_OK, let list else {
                throw .configuration("\(path): C_GetFunctionList returned \(ckrName(rv))")
            }
            let module = LoadedModule(path: path, functions: list)
            table[key] = module
            return module
        }
    }

    /// Counts one more user of the module, initializing it for the first. `remote`: a link that may be down
    /// right now (its member starts failed and recovery retries). `afterFork`: this process is a child that
    /// inherited the module from its parent.
    static func acquire(_ module: LoadedModule, remote: Bool, afterFork: Bool) throws(ConnectFailure) {
        if module.abandoned.load(ordering: .relaxed) {
            throw .unreachable("\(module.path): the parent process was inside this module when it forked; not used in this process")
        }
        let started: Void? = try module.changingAlone { () throws(ConnectFailure) in
            try startUser(module, remote: remote, afterFork: afterFork)
        }
        if started == nil { throw .unreachable("\(module.path): a start or stop of the module is still under way") }
    }

    /// `acquire`'s work, done with no other start or stop of the module beside it.
    private static func startUser(_ module: LoadedModule, remote: Bool, afterFork: Bool) throws(ConnectFailure) {
        let (first, ours) = module.users.withLock { ($0.count == 0, $0.initializedByUs) }
        if first {
            var rv = initialize(module)
            if rv == CKR_CRYPTOKI_ALREADY_INITIALIZED && afterFork && ours {
                // The module kept its parent's state across fork (no call of the parent's was inside it): restart
                // it for this process.
                _ = finalize(module)
                rv = initialize(module)
            }
            switch rv {
            case CKR_OK: module.users.withLock { $0.initializedByUs = true }
            case CKR_CRYPTOKI_ALREADY_INITIALIZED: module.users.withLock { $0.initializedByUs = false }  // the application's own
            case _ where remote: module.users.withLock { $0.initializedByUs = false }
            default: throw .configuration("\(module.path): C_Initialize returned \(ckrName(rv))")
            }
        }
        module.users.withLock { $0.count += 1 }
    }

    /// Drops one user of the module; the last one finalizes it if p11ha initialized it.
    static func release(_ module: LoadedModule) {
        let last = module.users.withLock { users -> Bool in
            users.count = max(0, users.count - 1)
            defer { if users.count == 0 { users.initializedByUs = false } }
            return users.count == 0 && users.initializedByUs
        }
        guard last else { return }
        _ = module.changingAlone { _ = finalize(module) }
    }

    /// Starts a module afresh after its member came back (a restarted device, a reconnected server):
    /// C_Finalize and C_Initialize for a module of one member (`exclusive`), C_Initialize alone otherwise.
    static func restart(_ module: LoadedModule, exclusive: Bool) -> Bool {
        module.changingAlone { () -> Bool in
            if exclusive { _ = finalize(module) }
            let rv = initialize(module)
            if rv == CKR_OK { module.users.withLock { $0.initializedByUs = true } }
            return rv == CKR_OK || rv == CKR_CRYPTOKI_ALREADY_INITIALIZED
        } ?? false
    }

    /// Finalizes and initializes again a module that p11ha started, though other members use it too: what a
    /// module whose own state broke needs (SoftHSM, once it read a token's file while another process rewrote it,
    /// answers every call for that token CKR_GENERAL_ERROR until then; docs/REPLICATION.md, "What the stores do").
    /// New calls wait while it restarts; it starts only once no call is inside the module, waiting for that no
    /// longer than half the operation-timeout. Every session and object handle of every token of the module is new.
    static func restartShared(_ module: LoadedModule) -> RestartOutcome {
        guard module.users.withLock({ $0.initializedByUs }) else { return .notOurs }
        return module.changingAlone { () -> RestartOutcome in
            module.restarting.store(true, ordering: .sequentiallyConsistent)
            defer { module.restarting.store(false, ordering: .sequentiallyConsistent) }
            // Half the operation-timeout: the restart's own calls have the rest of the caller's deadline.
            let deadline = monotonicNanos() + ForkGate.drainWait / 2
            while module.inFlight.load(ordering: .sequentiallyConsistent) > 0 {
                if monotonicNanos() >= deadline { return .busy }
                usleep(100)
            }
            _ = finalize(module, gate: ForkGate.enterForRestart)
            let rv = initialize(module, gate: ForkGate.enterForRestart)
            return rv == CKR_OK ? .restarted : .failed(rv)
        } ?? .busy
    }

    enum RestartOutcome: Equatable {
        case restarted
        /// The application started it (p11ha would finalize it under the application).
        case notOurs
        /// A call stayed inside it past the wait, or another start or stop was under way.
        case busy
        /// C_Initialize answered this.
        case failed(CK_RV)
    }

    private static func initialize(_ module: LoadedModule, gate: (LoadedModule) -> Bool = ForkGate.enter) -> CK_RV {
        var args = CK_C_INITIALIZE_ARGS()
        args.flags = CK_FLAGS(CKF_OS_LOCKING_OK)
        guard gate(module) else { return CK_RV(CKR_DEVICE_ERROR) }
        defer { ForkGate.exit(module) }
        return withUnsafeMutablePointer(to: &args) { module.functions.pointee.C_Initialize!(UnsafeMutableRawPointer($0)) }
    }

    private static func finalize(_ module: LoadedModule, gate: (LoadedModule) -> Bool = ForkGate.enter) -> CK_RV {
        guard gate(module) else { return CK_RV(CKR_DEVICE_ERROR) }
        defer { ForkGate.exit(module) }
        return module.functions.pointee.C_Finalize!(nil)
    }
}
