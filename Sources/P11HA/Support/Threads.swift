// The few thread primitives p11ha needs without Foundation: a thread of its own and a wakeable wait.
import Glibc
import Synchronization

/// Runs `body` on a thread of p11ha's own, with every signal blocked (a dead remote member's SIGPIPE, for one,
/// must not reach the application through p11ha's threads).
///
/// p11ha's threads never end: a thread that called into a member holds that module's thread-local state (SoftHSM's
/// OpenSSL keeps some), and if it ended while the process exits, its destructors would race OpenSSL's own cleanup
/// at exit and crash; threads waiting when the process exits just vanish. So a thread whose work is done waits in
/// a pool for the next: there are as many as ever ran at once, however many initializations come and go.
func spawnThread(_ body: @escaping @Sendable () -> Void) {
    if let thread = ThreadPool.idle.withLock({ $0.popLast() }) {
        thread.job = body
        thread.wake.raise()
        return
    }
    let context = Unmanaged.passRetained(PooledThread(first: body)).toOpaque()
    var attributes = pthread_attr_t()
    pthread_attr_init(&attributes)
    pthread_attr_setdetachstate(&attributes, Int32(PTHREAD_CREATE_DETACHED))
    var all = sigset_t()
    var previous = sigset_t()
    sigfillset(&all)
    pthread_sigmask(SIG_SETMASK, &all, &previous)
    var thread = pthread_t()
    let rc = pthread_create(&thread, &attributes, { raw in
        let me = Unmanaged<PooledThread>.fromOpaque(raw!).takeRetainedValue()
        me.run()
    }, context)
    pthread_sigmask(SIG_SETMASK, &previous, nil)
    pthread_attr_destroy(&attributes)
    if rc != 0 { Unmanaged<PooledThread>.fromOpaque(context).release() }
}

/// One of p11ha's threads: runs a job, then waits in the pool for the next.
final class PooledThread: @unchecked Sendable {
    fileprivate let wake = Signal()
    /// Set by `spawnThread` before `wake` is raised (the signal's mutex orders the two).
    fileprivate var job: (@Sendable () -> Void)?

    fileprivate init(first: @escaping @Sendable () -> Void) { job = first }

    fileprivate func run() -> Never {
        while true {
            if let job { job() }
            job = nil
            ThreadPool.idle.withLock { $0.append(self) }
            wake.wait(timeout: nil)
        }
    }
}

/// The threads waiting for work. Process-wide: in a child after fork they do not exist (see Fork.swift).
enum ThreadPool {
    static let idle = ProcessLock<[PooledThread]>([])

    /// In a child: the parent's idle threads are not here. Their records are kept, never freed: destroying a
    /// condition another (here absent) thread waits on can wait for ever.
    static func forgetInChild() {
        idle.withLock { threads in
            _ = Unmanaged.passRetained(Inherited(threads))
            threads = []
        }
    }

    private final class Inherited {
        let threads: [PooledThread]
        init(_ threads: [PooledThread]) { self.threads = threads }
    }
}

/// A flag one thread waits on, with a deadline, and another raises.
final class Signal: @unchecked Sendable {
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let condition = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)
    private var raised = false

    init() {
        pthread_mutex_init(mutex, nil)
        var attributes = pthread_condattr_t()
        pthread_condattr_init(&attributes)
        pthread_condattr_setclock(&attributes, CLOCK_MONOTONIC)
        pthread_cond_init(condition, &attributes)
        pthread_condattr_destroy(&attributes)
    }

    deinit {
        pthread_cond_destroy(condition)
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
        condition.deallocate()
    }

    func raise() {
        pthread_mutex_lock(mutex)
        raised = true
        pthread_cond_signal(condition)
        pthread_mutex_unlock(mutex)
    }

    /// Waits until raised or until `timeout` has passed (nil: forever); returns whether it was raised, and lowers it.
    @discardableResult
    func wait(timeout: Duration?) -> Bool {
        var deadline = timespec()
        clock_gettime(CLOCK_MONOTONIC, &deadline)
        if let timeout {
            let (seconds, attoseconds) = timeout.components
            let nanos = Int(deadline.tv_nsec) + Int(attoseconds / 1_000_000_000)
            deadline.tv_sec += Int(seconds) + nanos / 1_000_000_000
            deadline.tv_nsec = nanos % 1_000_000_000
        }
        pthread_mutex_lock(mutex)
        while !raised {
            if timeout == nil {
                pthread_cond_wait(condition, mutex)
            } else if pthread_cond_timedwait(condition, mutex, &deadline) == ETIMEDOUT {
                break
            }
        }
        let result = raised
        raised = false
        pthread_mutex_unlock(mutex)
        return result
    }
}

/// Monotonic time in nanoseconds.
func monotonicNanos() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}

/// Polls `condition` every `interval` while it holds, for at most `limit`: a bounded wait on state other threads
/// (or other processes' calls) change.
func waitWhile(_ condition: () -> Bool, upTo limit: Duration, polling interval: Duration) {
    let deadline = monotonicNanos() + limit.nanoseconds
    while condition() && monotonicNanos() < deadline { usleep(UInt32(clamping: interval.nanoseconds / 1_000)) }
}

extension Duration {
    var nanoseconds: UInt64 {
        UInt64(max(0, components.seconds)) * 1_000_000_000 + UInt64(max(0, components.attoseconds) / 1_000_000_000)
    }
}

/// p11ha's lock for state shared between threads: a plain pthread mutex, in place of Synchronization's Mutex, which
/// p11ha does not use (this type shadows it in P11HA).
///
/// Synchronization's Mutex on Linux is a priority-inheritance futex whose word holds its owner's thread ID, and it
/// caches that ID in thread-local storage. After fork, the thread that forked keeps its parent's cached ID in the
/// child: a lock it takes there names a thread of another process, and the first time a thread of p11ha's waits
/// for it the kernel refuses (the stdlib's fatal "Unknown error occurred while attempting to acquire a Mutex", seen
/// in an nginx worker, whose main thread forked from the master's; reproduced by a ten-line program). nginx workers,
/// preforking servers and any application that forks call p11ha on exactly that thread. A pthread mutex records
/// no owner the kernel checks, and glibc keeps its thread IDs right across fork. ThreadSanitizer also sees it (it
/// cannot see a PI futex handed over in the kernel), so `scripts/sanitize thread` checks the locks the product uses.
final class Mutex<Value>: @unchecked Sendable {
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    /// Out of line: the sanitizer puts an access to a stored property of no size (Mutex(())) at the object's first
    /// bytes, which every call reads (its type's metadata) before it locks: a race on nothing.
    private let value = UnsafeMutablePointer<Value>.allocate(capacity: 1)

    init(_ initialValue: Value) {
        value.initialize(to: initialValue)
        pthread_mutex_init(mutex, nil)
    }

    deinit {
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
        value.deinitialize(count: 1)
        value.deallocate()
    }

    func withLock<Result, E: Error>(_ body: (inout Value) throws(E) -> Result) throws(E) -> Result {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body(&value.pointee)
    }

    func withLockIfAvailable<Result, E: Error>(_ body: (inout Value) throws(E) -> Result) throws(E) -> Result? {
        guard pthread_mutex_trylock(mutex) == 0 else { return nil }
        defer { pthread_mutex_unlock(mutex) }
        return try body(&value.pointee)
    }
}
