// Deadlines: a member's calls run on threads of p11ha's own, and the caller waits no longer than the
// operation-timeout. A call that never returns holds only its worker thread, never the application's.
//
// Handing a call to another thread costs two wake-ups, tens of microseconds on a virtual machine; both
// sides therefore spin briefly before they sleep: a caller waits for a fast call by spinning (yielding the
// CPU), and a worker that just finished spins a little for the next call.
import Glibc
import Synchronization

final class Executor: @unchecked Sendable {
    private let idle = Mutex<[Worker]>([])
    /// Threads serving this member, busy or idle: a member whose calls hang cannot eat every thread of the
    /// process; past the limit its calls fail at once (it is out of service by then anyway).
    private let threads = Atomic<Int>(0)
    static let maxThreads = 64
    fileprivate let closed = Atomic<Bool>(false)

    /// Runs `work` on a worker and waits for it until `timeout`; nil when the deadline passed first.
    func run<T>(timeout: Duration, _ work: @escaping () -> T) -> T? {
        if Worker.isCurrentThreadWorker { return work() }
        let ticket = Ticket<T>()
        let forks = ForkGate.forks
        guard let worker = takeWorker() else { return nil }
        worker.start { [self] in
            if !ticket.complete(work()) { overdueCalls.subtract(1, ordering: .relaxed) }
        }
        return ticket.wait(timeout: timeout, overdue: overdueCalls, forksBefore: forks)
    }

    /// Calls whose caller gave up at the deadline and that are still inside the token.
    var overdue: Int { overdueCalls.load(ordering: .relaxed) }
    private let overdueCalls = Atomic<Int>(0)

    /// Calls under way (a call past its deadline stays under way until the module returns).
    var busy: Int { threads.load(ordering: .relaxed) - idle.withLock { $0.count } }

    /// Stops idle workers (busy ones stop when their call returns); their threads wait for other work (see spawnThread).
    func close() {
        closed.store(true, ordering: .releasing)
        for worker in idle.withLock({ list in defer { list.removeAll() }; return list }) { worker.stop() }
    }

    private func takeWorker() -> Worker? {
        if let worker = idle.withLock({ $0.popLast() }) { return worker }
        guard threads.add(1, ordering: .relaxed).newValue <= Self.maxThreads else {
            threads.subtract(1, ordering: .relaxed)
            return nil
        }
        return Worker(owner: self)
    }

    /// Returns whether the worker should wait for more work.
    fileprivate func finished(_ worker: Worker) -> Bool {
        if closed.load(ordering: .acquiring) { return false }
        idle.withLock { $0.append(worker) }
        return true
    }
}

/// Spins while `condition` holds, for at most `nanos`, yielding the CPU now and then; returns the condition's
/// last value.
@inline(__always)
private func spin(for nanos: UInt64, while condition: () -> Bool) -> Bool {
    let start = monotonicNanos()
    var rounds = 0
    while condition() {
        rounds += 1
        if rounds & 63 == 0 {
            if monotonicNanos() - start > nanos { return true }
            sched_yield()
        }
    }
    return false
}

/// A wake-up that costs nothing when the other side is still spinning: only a sleeper gets a signal.
private final class Handoff: @unchecked Sendable {
    private let state = Atomic<Int>(0)  // 0 waiting, 1 sleeping, 2 ready
    private let signal = Signal()

    func post() {
        if state.exchange(2, ordering: .acquiringAndReleasing) == 1 { signal.raise() }
    }

    /// Waits for `post`, spinning `spinNanos` first; false when `timeout` passed first.
    func wait(spinNanos: UInt64, timeout: Duration?) -> Bool {
        defer { state.store(0, ordering: .releasing) }
        if !spin(for: spinNanos, while: { state.load(ordering: .acquiring) != 2 }) { return true }
        guard state.compareExchange(expected: 0, desired: 1, ordering: .acquiringAndReleasing).exchanged else { return true }
        while state.load(ordering: .acquiring) != 2 {
            if !signal.wait(timeout: timeout), timeout != nil {
                // Timed out, unless the post raced with it.
                return state.exchange(0, ordering: .acquiringAndReleasing) == 2
            }
        }
        return true
    }
}

/// The result of one call, handed from the worker to the waiting caller (who may have given up).
private final class Ticket<T>: @unchecked Sendable {
    private let done = Handoff()
    private var result: T?
    /// 0 waiting, 1 completed, 2 the caller gave up (the call is overdue).
    private let state = Atomic<Int>(0)

    /// Hands the result over; false when the caller had given up on it.
    func complete(_ value: T) -> Bool {
        result = value
        let (completed, _) = state.compareExchange(expected: 0, desired: 1, ordering: .acquiringAndReleasing)
        done.post()
        return completed
    }

    /// The result, or nil when `timeout` passed first: the call then counts in `overdue` until it completes
    /// (counted before the call is marked given up, so that its completion never finds the count at zero).
    func wait(timeout: Duration, overdue: borrowing Atomic<Int>, forksBefore: UInt64) -> T? {
        // Most calls (signatures with EC keys, digests, random) finish within the spin; longer ones (RSA)
        // afford the wake-up. A longer spin starves other processes on a loaded machine.
        if !done.wait(spinNanos: 200_000, timeout: timeout), ForkGate.forked(since: forksBefore) {
            // A fork held the call back (it waits for the calls in flight to end): the member gets its full time
            // once more, and is not blamed for the application's fork.
            _ = done.wait(spinNanos: 0, timeout: timeout)
        }
        if state.load(ordering: .acquiring) == 1 { return result }
        overdue.add(1, ordering: .relaxed)
        if state.compareExchange(expected: 0, desired: 2, ordering: .acquiringAndReleasing).exchanged { return nil }
        overdue.subtract(1, ordering: .relaxed)
        return result
    }
}

private final class Worker: @unchecked Sendable {
    private let wake = Handoff()
    private var job: (() -> Void)?
    private var stopping = false
    private let owner: Executor

    private static let key: pthread_key_t = {
        var key = pthread_key_t()
        pthread_key_create(&key, nil)
        return key
    }()

    static var isCurrentThreadWorker: Bool { pthread_getspecific(key) != nil }

    init(owner: Executor) {
        self.owner = owner
        spawnThread { [self] in
            pthread_setspecific(Self.key, UnsafeRawPointer(bitPattern: 1))
            // The thread goes back to the pool (see spawnThread): no longer a worker then.
            defer { pthread_setspecific(Self.key, nil) }
            while true {
                _ = wake.wait(spinNanos: 50_000, timeout: nil)
                if stopping { return }
                job?()
                job = nil
                if !owner.finished(self) { return }
            }
        }
    }

    func stop() {
        stopping = true
        wake.post()
    }

    func start(_ job: @escaping () -> Void) {
        self.job = job
        wake.post()
    }
}
