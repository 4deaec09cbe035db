// The host lock: one lock file per group in lock-dir, shared by this host's processes.
import Glibc
import Synchronization

/// An exclusive lock shared by the processes of this host that use a group (nginx workers): held while a member
/// is brought up to date, so that this host's processes do not repair one member side by side (hosts are kept
/// apart by the member's own lease). The application's writes never take it. Never waited for beyond `wait`:
/// whoever holds it (another local user can hold a lock file of a shared directory, or plant one) delays a
/// repair, never the application, and the repair is tried again at the next pass, never done without it.
final class HostLock: Sendable {
    let file: HostFileLock
    let group: String
    /// How long a repair waits for the lock: the operation-timeout.
    let wait: Duration
    /// Wakes the worker that does what waits for the lock (set by `Recovery`).
    private let wakeHook = Mutex<(@Sendable () -> Void)?>(nil)
    private let problems = ProblemReport()

    init(file: HostFileLock, group: String, wait: Duration) {
        self.file = file
        self.group = group
        self.wait = wait
    }

    var path: String { file.path }

    /// Runs `body` holding the lock, or returns nil when it could not be had within `wait` (held elsewhere, or a
    /// directory or file that failed verification), which is logged once per problem (`host-lock-busy`).
    /// `cancelled` ends the wait early. `announced` (a returning member's repair): work that gives way
    /// (`isWanted`) leaves the lock to it.
    func withLock<T, E: Error>(for work: String, waitingUpTo wait: Duration, announced: Bool = false, cancelled: () -> Bool = { false },
                               _ body: () throws(E) -> T) throws(E) -> T? {
        switch try file.withLock(waitingUpTo: wait, announced: announced, cancelled: cancelled, body) {
        case .success(let value):
            problems.clear { Log.event(.info, "host-lock-available", "group=\(group) lock=\(path)") }
            return value
        case .failure(.busy(let waited)):
            problems.report("busy") {
                Log.event(.warning, "host-lock-busy", "group=\(group) lock=\(path) work=\"\(work)\" reason=\"held by another process for \(waited.milliseconds) ms\" deferred=yes")
            }
            return nil
        case .failure(.refused(let problem)):
            problems.report(problem.description) {
                Log.event(.error, problem.event, "group=\(group) path=\(problem.path) reason=\"\(problem.reason)\"")
                Log.event(.warning, "host-lock-busy", "group=\(group) lock=\(path) work=\"\(work)\" reason=\"\(problem.event): \(problem.reason)\" deferred=yes")
            }
            return nil
        }
    }

    /// Whether another process of this host waits for the lock to bring a member up to date: catch-ups and
    /// compactions stop for it (and do not start).
    var isWanted: Bool { file.isWanted() }

    func onDeferredWork(_ wake: @escaping @Sendable () -> Void) {
        wakeHook.withLock { $0 = wake }
    }

    /// Asks the recovery worker to do what waits for the host files (a status update).
    func wakeWorker() {
        wakeHook.withLock { $0 }?()
    }
}

