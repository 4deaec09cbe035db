// Fork, in the test process itself: p11ha's lock in a child, on the thread that forked, with another thread waiting
// for it (what an nginx worker's main thread and p11ha's own threads do; Synchronization's Mutex traps here: its
// cached thread ID is the parent's); a call held back by a fork; and a child forked while a member's module restarts.
import Glibc
@testable import P11HA
import Testing

@Suite struct LocksAfterFork {
    @Test("a lock taken in a forked child by the thread that forked, while a new thread waits for it, is handed over")
    func lockInChild() {
        let lock = Mutex(0)
        lock.withLock { $0 += 1 }  // the thread's ID is in use by the lock type before fork, as in an application
        let child = fork()
        if child == 0 {
            let context = Unmanaged.passRetained(lock).toOpaque()
            var waiter = pthread_t()
            lock.withLock { value in
                pthread_create(&waiter, nil, { raw in
                    Unmanaged<Mutex<Int>>.fromOpaque(raw!).takeRetainedValue().withLock { $0 += 1 }
                    return nil
                }, context)
                usleep(100_000)  // the waiter blocks on the lock meanwhile
                value += 1
            }
            pthread_join(waiter, nil)
            _exit(lock.withLock { $0 } == 3 ? 0 : 1)
        }
        var status: Int32 = 0
        waitpid(child, &status, 0)
        let signal = status & 0x7f
        #expect(signal == 0, "the child was killed by signal \(signal)")
        #expect(signal != 0 || (status >> 8) & 0xff == 0, "the child's count was wrong (exit status \((status >> 8) & 0xff))")
    }
}

/// Waits for `child` up to `seconds`, then kills it; its status, nil when it had to be killed.
private func waitForChild(_ child: pid_t, seconds: Double) -> Int32? {
    var status: Int32 = 0
    if eventually(seconds: seconds, { waitpid(child, &status, WNOHANG) == child }) { return status }
    kill(child, SIGKILL)
    waitpid(child, &status, 0)
    return nil
}

@Suite(.serialized) struct ModulesAfterFork {
    @Test("a call that starts while a fork waits for a member's call in flight is told, after the fork, that a fork held it back")
    func callHeldByFork() throws {
        ForkGate.install(drainWait: .seconds(2))
        let module = try ModuleRegistry.load(path: "/usr/lib/softhsm/libsofthsm2.so", address: nil)
        // A member's call that does not return: the fork waits for it (up to the drain time).
        try #require(ForkGate.enter(module))
        defer { ForkGate.exit(module) }
        var forker = pthread_t()
        pthread_create(&forker, nil, { _ in
            let child = fork()
            if child == 0 { _exit(0) }
            var status: Int32 = 0
            waitpid(child, &status, 0)
            return nil
        }, nil)
        // A call that starts now, while the fork waits, is held at the gate until the fork is done.
        _ = eventually(seconds: 2) { ForkGate.forked(since: ForkGate.forks) }
        let whileWaiting = ForkGate.forks
        pthread_join(forker, nil)
        #expect(ForkGate.forked(since: whileWaiting),
                "the fork is over: a call that read the count while it waited must see that a fork held it back")
    }

    @Test("a child forked while a module's restart waits for the calls in flight to end can call the module")
    func forkDuringRestart() throws {
        ForkGate.install(drainWait: .seconds(2))
        // Loaded, never initialized: the child only passes the gate that every call into it passes.
        let module = try ModuleRegistry.load(path: "/usr/lib/softhsm/libsofthsm2.so", address: nil)
        // What `ModuleRegistry.restartShared` holds while it waits: new calls wait at the gate until it is done.
        module.restarting.store(true, ordering: .sequentiallyConsistent)
        let child = fork()
        if child == 0 {
            // The restart's thread is not in this process: nothing here would ever clear its flag.
            let entered = ForkGate.enter(module)
            if entered { ForkGate.exit(module) }
            _exit(entered ? 0 : 1)
        }
        module.restarting.store(false, ordering: .sequentiallyConsistent)
        // The gate holds a call at most 3 s (the drain, then one more second) before it looks again; 10 s is a hang.
        let status = waitForChild(child, seconds: 10)
        #expect(status != nil, "the child's call waited for a restart that is not under way in the child (killed after 10 s)")
        if let status { #expect(status == 0, "the child could not call the module (status \(status))") }
    }
}

