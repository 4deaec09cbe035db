// p11ha's lock in a child after fork, on the thread that forked, with another thread waiting for it: what an nginx
// worker's main thread and p11ha's own threads do. (Synchronization's Mutex traps here: its cached thread ID is the
// parent's.)
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
