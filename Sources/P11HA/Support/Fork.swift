// Fork: a child can always start p11ha afresh, and never inherits a member module with one of the parent's calls
// inside it.
//
// Two hazards, both measured in nginx-like parents (threads of p11ha's busy while the application forks):
// - A lock another thread holds at fork is held for ever in the child, and the state it guards may be half
//   changed. So process-wide state, which a child uses again, lives behind `ProcessLock`: fork's prepare handler
//   takes every one (so none is copied held, nor its state copied half-changed) and the child makes each anew.
//   Per-initialization state (a Runtime's groups, sessions, workers) is behind p11ha's `Mutex`: a child never
//   touches its parent's runtime. Both are pthread mutexes, never Synchronization's Mutex (see `Mutex`, Threads.swift).
// - A member module (SoftHSM, p11-kit's client) with a call inside it at fork is copied with its own locks held: the
//   child's calls into it hang. Every member call passes through p11ha (`ForkGate.enter`/`exit`), so fork waits,
//   within the operation-timeout, until none is in flight; a module still busy then is left unused by the child.
// The same gate serves the process's exit (`installExitHandler`): from then on no member call starts, and the exit
// waits for those in flight, so that none runs while the exit handlers tear down what the modules use.
import Glibc
import Synchronization

/// A lock for process-wide state, safe across fork (see above). Never held while a member is called.
final class ProcessLock<State>: @unchecked Sendable {
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private var state: State

    init(_ state: State) {
        self.state = state
        pthread_mutex_init(mutex, nil)
    }

    deinit {
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
    }

    func withLock<R, E: Error>(_ body: (inout State) throws(E) -> R) throws(E) -> R {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body(&state)
    }

    /// For fork's prepare handler: takes the lock, waiting no later than `deadline` (monotonic nanoseconds).
    fileprivate func lockForFork(until deadline: UInt64) -> Bool {
        while pthread_mutex_trylock(mutex) != 0 {
            if monotonicNanos() >= deadline { return false }
            usleep(100)
        }
        return true
    }

    fileprivate func unlockInParent() { pthread_mutex_unlock(mutex) }

    /// In the child, where the only thread is the one that forked: a lock taken by the prepare handler, or held by a
    /// thread that does not exist here, is made anew.
    fileprivate func recreateInChild() { pthread_mutex_init(mutex, nil) }

    /// The state, in fork's handlers only (every other thread is stopped there, or absent).
    fileprivate var stateDuringFork: State { state }
}

/// Counts member calls in flight per module and makes fork wait for them.
public enum ForkGate {
    /// A fork is waiting for member calls to end: calls that start now wait until it is done.
    private static let pending = Atomic<Bool>(false)
    /// How long fork waits for member calls in flight: the operation-timeout (set at C_Initialize).
    private static let drainNanos = Atomic<UInt64>(2_000_000_000)
    /// Set in a child: the parent's runtime is not this process's to use.
    static let happened = Atomic<Bool>(false)
    /// Counts the forks into this process (0 in a process that was not forked from one using p11ha): records made
    /// in a parent tell by it that they are inherited.
    private static let children = Atomic<UInt64>(0)
    static var generation: UInt64 { children.load(ordering: .relaxed) }
    /// Forks begun, and forks finished, in this process: for calls to tell whether one held them back.
    private static let begun = Atomic<UInt64>(0)
    private static let finished = Atomic<UInt64>(0)

    /// Moves when a fork begins and again when it ends: a call that starts while a fork waits for the calls in
    /// flight is held at the gate too, and its count must tell it so after the fork (counting beginnings alone, such
    /// a call, held to within moments of its deadline by the fork's wait for a hung member's call, then missed it
    /// by the time fork took, and its member left service: the fork test, parent_errors=349 and 351).
    static var forks: UInt64 { begun.load(ordering: .relaxed) &+ finished.load(ordering: .relaxed) }

    /// Whether a fork began or ended since `forks` read `count`, or is under way.
    static func forked(since count: UInt64) -> Bool {
        pending.load(ordering: .relaxed) || forks != count
    }

    private static let registered = Atomic<Bool>(false)

    /// The process is exiting (`exit`, or a return from `main`): member calls are refused from then on. A thread of
    /// p11ha's inside a member's module while the exit handlers ran crashed the process: a recovery worker reading a
    /// record in SoftHSM, whose OpenSSL the exit had just torn down (pkcs11-tool exiting at "object not found" with
    /// a member down: 5 exits of 30 ended in SIGSEGV, and the chaos test once).
    static let exiting = Atomic<Bool>(false)
    private static let exitHandlerRegistered = Atomic<Bool>(false)

    /// Registers the exit handler, once per process, once the members' modules have started: exit handlers run in
    /// the reverse order of their registration, so it runs before those the modules, and the libraries they start,
    /// registered at their C_Initialize.
    static func installExitHandler() {
        guard exitHandlerRegistered.compareExchange(expected: false, desired: true, ordering: .acquiringAndReleasing).exchanged else { return }
        atexit { ForkGate.processExiting() }
    }

    /// Refuses member calls from now on, and waits, within the operation-timeout, for those in flight.
    private static func processExiting() {
        exiting.store(true, ordering: .sequentiallyConsistent)
        let deadline = monotonicNanos() + drainNanos.load(ordering: .relaxed)
        guard ModuleRegistry.modules.lockForFork(until: deadline) else { return }
        let modules = Array(ModuleRegistry.modules.stateDuringFork.values)
        ModuleRegistry.modules.unlockInParent()
        while modules.contains(where: { $0.inFlight.load(ordering: .sequentiallyConsistent) > 0 && !$0.wedged.load(ordering: .relaxed) }),
              monotonicNanos() < deadline {
            usleep(50)
        }
    }

    /// Installs the fork handlers (once per process) and sets how long a fork may wait for member calls.
    static func install(drainWait: Duration) {
        drainNanos.store(drainWait.nanoseconds, ordering: .relaxed)
        guard registered.compareExchange(expected: false, desired: true, ordering: .acquiringAndReleasing).exchanged else { return }
        pthread_atfork({ ForkGate.prepare() }, { ForkGate.parent() }, { ForkGate.child() })
    }

    /// Before a call into `module`; false when the process is exiting (the call must not be made, and `exit` not
    /// called). Seen together with `prepare`'s store of `pending` (both sequentially consistent): either the fork
    /// sees this call in flight and waits for it, or this call sees the fork and waits for it. The same holds for
    /// the exit's store of `exiting`.
    /// A restart of the module (`ModuleRegistry.restartShared`) holds calls back the same way, seen together
    /// with its store of `module.restarting`.
    @inline(__always)
    static func enter(_ module: LoadedModule) -> Bool { enter(module, heldByRestart: true) }

    /// The restart's own C_Finalize and C_Initialize: past its gate, still waiting for a fork.
    static func enterForRestart(_ module: LoadedModule) -> Bool { enter(module, heldByRestart: false) }

    @inline(__always)
    private static func enter(_ module: LoadedModule, heldByRestart: Bool) -> Bool {
        let held = { pending.load(ordering: .sequentiallyConsistent) || (heldByRestart && module.restarting.load(ordering: .sequentiallyConsistent)) }
        while true {
            module.inFlight.add(1, ordering: .sequentiallyConsistent)
            if exiting.load(ordering: .sequentiallyConsistent) {
                module.inFlight.subtract(1, ordering: .sequentiallyConsistent)
                return false
            }
            if !held() { return true }
            module.inFlight.subtract(1, ordering: .sequentiallyConsistent)
            // Bounded: the fork or restart waits at most its drain time, then goes on.
            let deadline = monotonicNanos() + drainNanos.load(ordering: .relaxed) + 1_000_000_000
            while held() && monotonicNanos() < deadline { usleep(50) }
        }
    }

    /// How long a fork or a module's restart waits for the calls in flight: the operation-timeout.
    static var drainWait: UInt64 { drainNanos.load(ordering: .relaxed) }

    @inline(__always)
    static func exit(_ module: LoadedModule) {
        if module.inFlight.subtract(1, ordering: .sequentiallyConsistent).newValue == 0,
           module.wedged.load(ordering: .relaxed) {
            module.wedged.store(false, ordering: .relaxed)
        }
    }

    // MARK: the handlers (run by the thread that calls fork)

    /// What prepare took, released by `parent` and made anew by `child`.
    private nonisolated(unsafe) static var taken: [() -> Void] = []
    private nonisolated(unsafe) static var registryTaken = false
    /// In a child: the module table was being changed at fork (a module loading past the wait), so this
    /// process cannot know its modules' state, and p11ha refuses to start in it.
    static let registryLost = Atomic<Bool>(false)

    private static func prepare() {
        begun.add(1, ordering: .relaxed)
        let deadline = monotonicNanos() + drainNanos.load(ordering: .relaxed)
        var release: [() -> Void] = []
        func take<S>(_ lock: ProcessLock<S>) {
            if lock.lockForFork(until: deadline) { release.append { lock.unlockInParent() } }
        }
        take(Library.current)
        // The table is read only when held (a thread loading a module changes it).
        registryTaken = ModuleRegistry.modules.lockForFork(until: deadline)
        if registryTaken { release.append { ModuleRegistry.modules.unlockInParent() } }
        let modules = registryTaken ? Array(ModuleRegistry.modules.stateDuringFork.values) : []
        pending.store(true, ordering: .sequentiallyConsistent)
        // A module whose call outlasted an earlier fork's wait (a member that never answers) is not waited for
        // again until that call ends: each fork would pay the whole wait.
        while modules.contains(where: { $0.inFlight.load(ordering: .sequentiallyConsistent) > 0 && !$0.wedged.load(ordering: .relaxed) }),
              monotonicNanos() < deadline {
            usleep(50)
        }
        for module in modules where module.inFlight.load(ordering: .sequentiallyConsistent) > 0 {
            module.wedged.store(true, ordering: .relaxed)
        }
        for module in modules { take(module.users) }
        take(ThreadPool.idle)
        take(Log.sink)
        taken = release
    }

    private static func parent() {
        for unlock in taken.reversed() { unlock() }
        taken = []
        finished.add(1, ordering: .relaxed)
        pending.store(false, ordering: .sequentiallyConsistent)
    }

    private static func child() {
        taken = []
        Library.current.recreateInChild()
        Library.lifecycle.recreateInChild()
        ModuleRegistry.modules.recreateInChild()
        if registryTaken {
            for module in ModuleRegistry.modules.stateDuringFork.values {
                module.users.recreateInChild()
                module.afterFork()
            }
        } else {
            registryLost.store(true, ordering: .relaxed)
        }
        ThreadPool.idle.recreateInChild()
        ThreadPool.forgetInChild()
        Log.sink.recreateInChild()
        children.add(1, ordering: .relaxed)
        happened.store(true, ordering: .sequentiallyConsistent)
        pending.store(false, ordering: .sequentiallyConsistent)
    }
}
