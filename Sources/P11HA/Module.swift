// A loaded PKCS#11 module (one dlopen handle and function list per path), shared by every member that uses it.
import CInterop
import Glibc
import Synchronization

/// Several members are often slots of one module instance (one SoftHSM config): the module is
/// initialized once, and finalized once by whoever initialized it.
public final class LoadedModule: @unchecked Sendable {
    public let path: String
    let functions: UnsafeMutablePointer<CK_FUNCTION_LIST>
    /// Whether p11ha's C_Initialize started it (and so must finalize it); guarded by the registry's lock.
    fileprivate var initializedByUs = false
    fileprivate var users = 0

    fileprivate init(path: String, functions: UnsafeMutablePointer<CK_FUNCTION_LIST>) {
        self.path = path
        self.functions = functions
    }

    var f: CK_FUNCTION_LIST { functions.pointee }
}

public enum ModuleRegistry {
    private static let modules = Mutex<[String: LoadedModule]>([:])

    /// Loads and initializes the module at `path`. Modules are never dlclosed: a module unloaded while
    /// its atexit handlers or threads are still registered (SoftHSM's OpenSSL) crashes the process.
    /// `afterFork`: this process is a child that inherited the module from its parent.
    /// `address`: a p11-kit server address: `path` is then p11-kit's client module, whose C_GetFunctionList
    /// binds a new function list to the address in P11_KIT_SERVER_ADDRESS at the moment of the call.
    public static func acquire(path: String, address: String? = nil, afterFork: Bool) throws(ModuleError) -> LoadedModule {
        try modules.withLock { (table) throws(ModuleError) -> LoadedModule in
            let module: LoadedModule
            let key = address.map { "\(path) via \($0)" } ?? path
            if let existing = table[key] {
                module = existing
            } else {
                guard let handle = dlopen(path, RTLD_NOW | RTLD_LOCAL) else {
                    throw ModuleError(message: "cannot load module \(path): \(String(cString: dlerror()))")
                }
                guard let symbol = dlsym(handle, "C_GetFunctionList") else {
                    throw ModuleError(message: "\(path) exports no C_GetFunctionList")
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
                    throw ModuleError(message: "\(path): C_GetFunctionList returned \(ckrName(rv))")
                }
                module = LoadedModule(path: path, functions: list)
                table[key] = module
            }
            if module.users == 0 {
                var rv = initialize(module)
                if rv == CKR_CRYPTOKI_ALREADY_INITIALIZED && afterFork && module.initializedByUs {
                    // The module kept its parent's state across fork: restart it for this process.
                    _ = module.f.C_Finalize!(nil)
                    rv = initialize(module)
                }
                switch rv {
                case CKR_OK: module.initializedByUs = true
                case CKR_CRYPTOKI_ALREADY_INITIALIZED: module.initializedByUs = false  // the application's own
                // A remote member's link may be down right now: its member starts failed and recovery retries.
                case _ where address != nil: module.initializedByUs = false
                default: throw ModuleError(message: "\(path): C_Initialize returned \(ckrName(rv))")
                }
            }
            module.users += 1
            return module
        }
    }

    /// Drops one user of the module; the last one finalizes it if p11ha initialized it.
    public static func release(_ module: LoadedModule) {
        modules.withLock { _ in
            module.users -= 1
            if module.users == 0 && module.initializedByUs {
                _ = module.f.C_Finalize!(nil)
                module.initializedByUs = false
            }
        }
    }

    /// Starts a module afresh after its member came back (a restarted device, a reconnected server):
    /// C_Finalize and C_Initialize for a module of one member (`exclusive`), C_Initialize alone otherwise.
    public static func restart(_ module: LoadedModule, exclusive: Bool) -> Bool {
        modules.withLock { _ in
            if exclusive { _ = module.f.C_Finalize!(nil) }
            let rv = initialize(module)
            if rv == CKR_OK { module.initializedByUs = true }
            return rv == CKR_OK || rv == CKR_CRYPTOKI_ALREADY_INITIALIZED
        }
    }

    /// In a child after fork: the parent's users of every module are not ours.
    public static func forgetUsersAfterFork() {
        modules.withLock { table in
            for module in table.values { module.users = 0 }
        }
    }

    private static func initialize(_ module: LoadedModule) -> CK_RV {
        var args = CK_C_INITIALIZE_ARGS()
        args.flags = CK_FLAGS(CKF_OS_LOCKING_OK)
        return withUnsafeMutablePointer(to: &args) { module.f.C_Initialize!(UnsafeMutableRawPointer($0)) }
    }
}

public struct ModuleError: Error, CustomStringConvertible, Sendable {
    public let message: String
    /// The token could not be told because a slot did not answer (a member down), not because none matches.
    public var unreachable = false
    public var description: String { message }
}
