// Deadlines: a member's calls run on threads of p11ha's own, and the caller waits no longer than the
// operation-timeout. A call that never returns holds only its worker thread, never the application's.
//
// Handing a call to another thread costs two wake-ups, tens of microseconds on a virtual machine; both
// sides therefore spin briefly before they sleep: a caller waits for a fast call by spinning (yielding the
// CPU), and a worker that just finished spins a little for the next call, which comes from the same application
// thread (each has its worker), whatever member it goes to.
import Glibc
import Synchronization

final class Executor: @unchecked Sendable {
    /// This member's calls under way, overdue ones included: a member whose calls hang cannot eat every thread of
    /// the process; past the limit its calls fail at once (it is out of service by then anyway).
    private let calls = Atomic<Int>(0)
    static let maxCalls = 64

    /// Runs `work` on the calling thread's worker and waits for it until `timeout`; nil when the deadline passed
    /// first. Nothing is allocated for the hand-off: the worker and its two wake-ups are the thread's, reused call
    /// after call, and the result is written straight into this frame (only by a call whose caller still waits).
    func run<T, E: Error>(timeout: Duration, _ work: @escaping () throws(E) -> T) -> Result<T, E>? {
        if Worker.isCurrentThreadWorker { return Result { () throws(E) -> T in try work() } }
        guard calls.add(1, ordering: .relaxed).newValue <= Self.maxCalls else {
            calls.subtract(1, ordering: .relaxed)
            return nil
        }
        let forks = ForkGate.forks
        let worker = Worker.paired()
        var result: Result<T, E>? = nil
        let delivered = withUnsafeMutablePointer(to: &result) { slot in
            // Outlives this frame only in a call whose caller gave up, and such a call cannot claim it (below).
            let slot = UnsafeMutableRawPointer(slot)
            worker.start { [self, worker] in
                let value = Result { () throws(E) -> T in try work() }
                calls.subtract(1, ordering: .relaxed)
                if worker.claim() {
                    slot.assumingMemoryBound(to: Result<T, E>?.self).pointee = value
                    worker.deliver()
                } else {
                    overdueCalls.subtract(1, ordering: .relaxed)
                }
            }
            return worker.awaitDelivery(timeout: timeout, overdue: overdueCalls, forksBefore: forks)
        }
        guard delivered else {
            // The worker is still inside the member: this thread gets another for its next call.
            Worker.unpair(worker)
            return nil
        }
        return result
    }

    /// Calls whose caller gave up at the deadline and that are still inside the token.
    var overdue: Int { overdueCalls.load(ordering: .relaxed) }
    private let overdueCalls = Atomic<Int>(0)

    /// Calls under way (a call past its deadline stays under way until the module returns).
    var busy: Int { calls.load(ordering: .relaxed) }

    /// The calling thread's worker, if it has one (for tests: it is freed once the thread has ended and the
    /// worker has stopped).
    static var currentThreadWorker: AnyObject? { Worker.current }
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

/// A thread of p11ha's paired with one application thread, which hands it that thread's member calls, whatever the
/// member. Calls from one thread come one at a time, so its worker is idle, and most often still spinning after the
/// last call, when the next comes. Workers per member (the earlier design) made a loop of calls spread over three
/// members find its member's worker asleep each time, a wake-up of about 20 us per call where one member cost 2.4 us
/// (Benchmarks/Overhead). A worker left inside an overdue call is unpaired: it stops once the call returns.
private final class Worker: @unchecked Sendable {
    /// The caller's wake-up for the worker: a call is ready.
    private let wake = Handoff()
    /// The worker's wake-up for the caller: the result is in place.
    private let done = Handoff()
    /// The call under way: 0 running, 1 claimed by the worker (its result is being written), 2 given up by the
    /// caller (overdue). Back to 0 once delivered; a worker whose call was given up is never used again.
    private let outcome = Atomic<Int>(0)
    /// Set by `start`, taken by the worker's thread (the handoff orders the two).
    private var job: (() -> Void)?
    private let stopping = Atomic<Bool>(false)
    /// The process it was made in: after fork, the forking thread still names its parent's worker, whose thread
    /// is not in the child.
    private let generation = ForkGate.generation
    /// Made in a parent process: kept, never freed, in this one (its wake-up may be one an absent thread waited on,
    /// and destroying such a condition can wait for ever).
    private var isInherited: Bool { generation != ForkGate.generation }

    /// Marks p11ha's worker threads (a call they make runs inline).
    private static let workerKey: pthread_key_t = {
        var key = pthread_key_t()
        pthread_key_create(&key, nil)
        return key
    }()

    /// The calling thread's worker (retained); stopped when the thread ends.
    private static let pairKey: pthread_key_t = {
        var key = pthread_key_t()
        pthread_key_create(&key) { raw in
            guard let raw else { return }
            let worker = Unmanaged<Worker>.fromOpaque(raw)
            guard !worker.takeUnretainedValue().isInherited else { return }
            worker.takeRetainedValue().stop()
        }
        return key
    }()

    static var isCurrentThreadWorker: Bool { pthread_getspecific(workerKey) != nil }

    static var current: Worker? {
        pthread_getspecific(pairKey).map { Unmanaged<Worker>.fromOpaque($0).takeUnretainedValue() }
    }

    /// The calling thread's worker, made on its first call (and again in a forked child, and after an overdue call).
    @inline(__always)
    static func paired() -> Worker {
        // An inherited worker is left in place of being released: the new one takes its slot.
        if let worker = current, !worker.isInherited { return worker }
        let worker = Worker()
        pthread_setspecific(pairKey, Unmanaged.passRetained(worker).toOpaque())
        return worker
    }

    /// Lets `worker`, inside an overdue call, stop when the call returns; the calling thread gets a new one.
    static func unpair(_ worker: Worker) {
        guard let raw = pthread_getspecific(pairKey), raw == Unmanaged.passUnretained(worker).toOpaque() else { return }
        pthread_setspecific(pairKey, nil)
        Unmanaged<Worker>.fromOpaque(raw).release()
        worker.stop()
    }

    private init() {
        spawnThread { [self] in
            pthread_setspecific(Self.workerKey, UnsafeRawPointer(bitPattern: 1))
            // The thread goes back to the pool (see spawnThread): no longer a worker then.
            defer { pthread_setspecific(Self.workerKey, nil) }
            while true {
                _ = wake.wait(spinNanos: 50_000, timeout: nil)
                if stopping.load(ordering: .acquiring) { return }
                guard let current = job else { continue }
                job = nil
                current()
            }
        }
    }

    private func stop() {
        stopping.store(true, ordering: .releasing)
        wake.post()
    }

    func start(_ job: @escaping () -> Void) {
        self.job = job
        wake.post()
    }

    /// On the worker, once the member returned: whether the caller still waits (the result may then be written).
    func claim() -> Bool {
        outcome.compareExchange(expected: 0, desired: 1, ordering: .acquiringAndReleasing).exchanged
    }

    /// On the worker, once the claimed result is written.
    func deliver() { done.post() }

    /// On the caller: whether the result was delivered before `timeout`. A call given up counts in `overdue` until
    /// it returns (counted before it is marked given up, so that its end never finds the count at zero).
    func awaitDelivery(timeout: Duration, overdue: borrowing Atomic<Int>, forksBefore: UInt64) -> Bool {
        // Most calls (signatures with EC keys, digests, random) finish within the spin; longer ones (RSA)
        // afford the wake-up. A longer spin starves other processes on a loaded machine.
        var delivered = done.wait(spinNanos: 200_000, timeout: timeout)
        if !delivered, ForkGate.forked(since: forksBefore) {
            // A fork held the call back (it waits for the calls in flight to end): the member gets its full time
            // once more, and is not blamed for the application's fork.
            delivered = done.wait(spinNanos: 0, timeout: timeout)
        }
        if !delivered {
            overdue.add(1, ordering: .relaxed)
            if outcome.compareExchange(expected: 0, desired: 2, ordering: .acquiringAndReleasing).exchanged { return false }
            // The worker claimed the call as the deadline passed: its result is being written, a matter of moments.
            overdue.subtract(1, ordering: .relaxed)
            _ = done.wait(spinNanos: 200_000, timeout: nil)
        }
        outcome.store(0, ordering: .releasing)
        return true
    }
}
