// The group's status file: each process using a group records there when a member last failed and recovered,
// so that `p11hactl status`, in another process, can tell an operator.
import Glibc
import Synchronization

public struct MemberStatusRecord: Sendable, Equatable {
    public var member: String
    public var health: String
    public var lastFailure: Int64?
    public var reason: String?
    public var lastRecovery: Int64?
    public var pid: Int32

    func line() -> String {
        // Fields are tab-separated, records newline-separated: neither may appear inside one.
        func clean(_ text: String) -> String { String(text.map { $0 == "\t" || $0 == "\n" || $0 == "\r" ? " " : $0 }) }
        return [clean(member), clean(health), lastFailure.map(String.init) ?? "-", clean(reason ?? "-"),
                lastRecovery.map(String.init) ?? "-", String(pid)].joined(separator: "\t")
    }

    init(member: String, health: String, lastFailure: Int64?, reason: String?, lastRecovery: Int64?, pid: Int32) {
        self.member = member
        self.health = health
        self.lastFailure = lastFailure
        self.reason = reason
        self.lastRecovery = lastRecovery
        self.pid = pid
    }

    init?(line: Substring) {
        let f = line.split(separator: "\t", omittingEmptySubsequences: false).map(String.init)
        guard f.count == 6, let pid = Int32(f[5]) else { return nil }
        self.init(member: f[0], health: f[1], lastFailure: Int64(f[2]), reason: f[3] == "-" ? nil : f[3],
                  lastRecovery: Int64(f[4]), pid: pid)
    }
}

/// The status file of a group in the lock directory, beside its lock file (`NAME.lock`), both verified like every
/// host file: a file planted by another user is neither read as this process's nor written through.
public final class StatusFile: Sendable {
    let directory: HostDirectory
    let name: String
    private let lock: HostFileLock
    /// Members whose health changed and whose record is not written yet (the lock was busy, or refused).
    private let pending = Mutex<Set<Int>>([])
    /// One flush at a time in this process; another thread's change is written by the flush under way or the next.
    private let flushing = Mutex(())
    private let problems = ProblemReport()

    /// A status file larger than this is not p11ha's (a few hundred bytes per member and process).
    static let sizeLimit = 1 << 20

    init(directory: HostDirectory, name: String) {
        self.directory = directory
        self.name = name
        self.lock = HostFileLock(directory: directory, name: name + ".lock")
    }

    public var path: String { "\(directory.path)/\(name)" }

    /// What `p11hactl status` reads: the records, or why the file is not shown (`problem`: a foreign or
    /// unverifiable file, or a refused directory).
    public struct Reading: Sendable {
        public let records: [MemberStatusRecord]
        public let problem: String?
    }

    public func read() -> Reading {
        do throws(HostFileProblem) {
            let open = try directory.open()
            return Reading(records: Self.records(try open.read(name, limit: Self.sizeLimit) ?? []), problem: nil)
        } catch {
            return Reading(records: [], problem: "\(error.event): \(error.path): \(error.reason)")
        }
    }

    static func records(_ bytes: [UInt8]) -> [MemberStatusRecord] {
        String(decoding: bytes, as: UTF8.self).split(separator: "\n").compactMap(MemberStatusRecord.init(line:))
    }

    /// Notes that a member's record must be written (`flush`).
    func markChanged(_ member: Member) {
        pending.withLock { _ = $0.insert(member.index) }
    }

    /// Writes this process's record of each member whose health changed, under the status file's lock, if the
    /// lock can be had within `wait`; returns false when records are still to be written (the recovery worker
    /// tries again). Each live process keeps its own record per member (what it sees of the member now); of
    /// processes that have exited, only the latest record per member stays, as history.
    func flush(_ group: Group, waitingUpTo wait: Duration) -> Bool {
        let result = flushing.withLockIfAvailable { _ -> Bool in
            let changed = pending.withLock { $0 }
            if changed.isEmpty { return true }
            let outcome = lock.withLock(waitingUpTo: wait) { () -> HostFileProblem? in
                do throws(HostFileProblem) {
                    try write(changed.map { group.members[$0] })
                    return nil
                } catch {
                    return error
                }
            }
            switch outcome {
            case .success(nil):
                pending.withLock { $0.subtract(changed) }
                problems.clear { Log.event(.info, "host-lock-available", "group=\(group.name) lock=\(lock.path)") }
                return true
            case .success(let problem?), .failure(.refused(let problem)):
                problems.report(problem.description) {
                    Log.event(.error, problem.event, "group=\(group.name) path=\(problem.path) reason=\"\(problem.reason)\" work=\"status update\" deferred=yes")
                }
            case .failure(.busy(let waited)):
                let details = "group=\(group.name) lock=\(lock.path) work=\"status update\" reason=\"held by another process for \(waited.milliseconds) ms\" deferred=yes"
                // A try without waiting (a health change on the application's thread) often meets another process's
                // update of a moment: only the recovery worker's waits, which fail for longer, are worth a warning.
                if wait > .zero {
                    problems.report("busy") { Log.event(.warning, "host-lock-busy", details) }
                } else {
                    Log.event(.debug, "host-lock-busy", details)
                }
            }
            return false
        }
        return result ?? false
    }

    /// Replaces the file with this process's records of `members` updated; a file that fails verification (planted
    /// by another user) is not read, and is replaced where the directory allows it.
    private func write(_ members: [Member]) throws(HostFileProblem) {
        let open = try directory.open()
        var records: [MemberStatusRecord]
        do throws(HostFileProblem) {
            records = Self.records(try open.read(name, limit: Self.sizeLimit) ?? [])
        } catch {
            problems.report("read " + error.description) {
                Log.event(.error, error.event, "path=\(error.path) reason=\"\(error.reason)\" work=\"status update\" action=replaced")
            }
            records = []
        }
        let pid = getpid()
        for member in members {
            let history = member.history.withLock { $0 }
            let record = MemberStatusRecord(member: member.name, health: member.health.name, lastFailure: history.lastFailure,
                                            reason: history.lastFailureReason, lastRecovery: history.lastRecovery, pid: pid)
            records = records.filter { !($0.member == record.member && $0.pid == record.pid) }
            records.append(record)
        }
        let exited = records.filter { !processIsAlive($0.pid) }
        let latest = Dictionary(exited.map { ($0.member, $0) }, uniquingKeysWith: { a, b in
            max(a.lastFailure ?? 0, a.lastRecovery ?? 0) >= max(b.lastFailure ?? 0, b.lastRecovery ?? 0) ? a : b
        })
        records = records.filter { processIsAlive($0.pid) || latest[$0.member] == $0 }
        try open.replace(name, with: Array((records.map { $0.line() }.joined(separator: "\n") + "\n").utf8))
    }
}

extension Group {
    /// Records a member's health change for operators (p11hactl status). Never waits for another process: when
    /// the status file's lock is busy, the recovery worker writes it later.
    func publish(_ member: Member) {
        statusFile.markChanged(member)
        if !statusFile.flush(self, waitingUpTo: .zero) { hostLock.wakeWorker() }
    }
}

/// Whether a process with this ID exists (one of another user's answers EPERM, and counts).
public func processIsAlive(_ pid: Int32) -> Bool {
    kill(pid, 0) == 0 || errno == EPERM
}
