// Deadlines: a member's calls run on threads of p11ha's own, and the caller waits no longer than the
// operation-timeout. A call that never returns holds only its worker thread, never the application's.
//
// Handing a call to another thread costs two wake-ups, tens of microseconds on a virtual machine; both
// sides therefore spin briefly before they sleep: a caller waits for a fast call by spinning (yielding the
// CPU), and a worker that just finished spins a little for the next call.
import Glibc
import Synchronization

final class Executor: @unchecked Sendable {
    /// This member's calls under way: a member whose calls hang cannot eat every thread of the process; past the
    /// limit its calls fail at once (it is out of service by then anyway).
    private let calls = Atomic<Int>(0)
    static let maxThreads = 64

    /// Runs `work` on a worker and waits for it until `timeout`; nil when the deadline passed first.
    func run<T>(timeout: Duration, _ work: @escaping () -> T) -> T? {
        if Worker.isCurrentThreadWorker { return work() }
        guard calls.add(1, ordering: .relaxed).newValue <= Self.maxThreads else {
            calls.subtract(1, ordering: .relaxed)
            return nil
        }
        let ticket = Ticket<T>()
        let forks = ForkGate.forks
        let worker = WorkerPool.take()
        worker.start { [self] in
            let value = work()
            calls.subtract(1, ordering: .relaxed)
            // Back in the pool before the caller wakes: its next call finds this worker still spinning.
            WorkerPool.finished(worker)
            if !ticket.complete(value) { overdueCalls.subtract(1, ordering: .relaxed) }
        }
        return ticket.wait(timeout: timeout, overdue: overdueCalls, forksBefore: forks)
    }

    /// Calls whose caller gave up at the deadline and that are still inside the token.
    var overdue: Int { overdueCalls.load(ordering: .relaxed) }
    private let overdueCalls = Atomic<Int>(0)

    /// Calls under way (a call past its deadline stays under way until the module returns).
    var busy: Int { calls.load(ordering: .relaxed) }
}

/// The process's idle workers, shared by every member's executor. A loop of calls spread over three members
/// reuses the one worker still spinning from the last call; with a pool per member, each call found its member's
/// worker asleep (its spin over while the two other members served) and paid a wake-up: about 20 us per call
/// where one member alone cost 2.4 us (the overhead benchmark, Benchmarks/Overhead). Process-wide: in a child after
/// fork the parent's workers do not exist (see Fork.swift).
enum WorkerPool {
    static let idle = ProcessLock<[Worker]>([])

    static func take() -> Worker {
        idle.withLock { $0.popLast() } ?? Worker()
    }

    fileprivate static func finished(_ worker: Worker) {
        idle.withLock { $0.append(worker) }
    }

    /// In a child: the parent's workers' threads are not here (see `forgetInherited`).
    static func forgetInChild() {
        idle.withLock { forgetInherited(&$0) }
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

final class Worker: @unchecked Sendable {
    private let wake = Handoff()
    /// The next call, set by `start` and taken by the thread before it runs it: a call puts its worker back in
    /// the pool before it ends, so the next one may be set while this one still runs.
    private var job: (() -> Void)?

    private static let key: pthread_key_t = {
        var key = pthread_key_t()
        pthread_key_create(&key, nil)
        return key
    }()

    static var isCurrentThreadWorker: Bool { pthread_getspecific(key) != nil }

    fileprivate init() {
        spawnThread { [self] in
            pthread_setspecific(Self.key, UnsafeRawPointer(bitPattern: 1))
            while true {
                _ = wake.wait(spinNanos: 50_000, timeout: nil)
                guard let current = job else { continue }
                job = nil
                current()
            }
        }
    }

    fileprivate func start(_ job: @escaping () -> Void) {
        self.job = job
        wake.post()
    }
}
