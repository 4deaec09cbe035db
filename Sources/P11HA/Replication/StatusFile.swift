// The group's status file: each process using a group records there when a member last failed and recovered,
// so that `p11hactl status`, in another process, can tell an operator.
import Glibc

public struct MemberStatusRecord: Sendable, Equatable {
    public var member: String
    public var health: String
    public var lastFailure: Int64?
    public var reason: String?
    public var lastRecovery: Int64?
    public var pid: Int32

    func line() -> String {
        let clean = (reason ?? "-").map { $0 == "\t" || $0 == "\n" ? " " : $0 }
        return [member, health, lastFailure.map(String.init) ?? "-", String(clean), lastRecovery.map(String.init) ?? "-", String(pid)]
            .joined(separator: "\t")
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

public struct StatusFile: Sendable {
    public let path: String

    public func read() -> [MemberStatusRecord] {
        guard let text = readTextFile(path) else { return [] }
        return text.split(separator: "\n").compactMap(MemberStatusRecord.init(line:))
    }

    /// Replaces this process's record of one member, under a lock shared with other processes. Each live process
    /// keeps its own record (what it sees of the member now); of processes that have exited, only the latest
    /// record per member stays, as history.
    func update(_ record: MemberStatusRecord) {
        HostLock(path: path + ".lock").withLock {
            var records = read().filter { !($0.member == record.member && $0.pid == record.pid) }
            records.append(record)
            let exited = records.filter { !processIsAlive($0.pid) }
            let latest = Dictionary(exited.map { ($0.member, $0) }, uniquingKeysWith: { a, b in
                max(a.lastFailure ?? 0, a.lastRecovery ?? 0) >= max(b.lastFailure ?? 0, b.lastRecovery ?? 0) ? a : b
            })
            records = records.filter { processIsAlive($0.pid) || latest[$0.member] == $0 }
            let text = records.map { $0.line() }.joined(separator: "\n") + "\n"
            let temp = "\(path).\(getpid())"
            let fd = open(temp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
            guard fd >= 0 else { return }
            var bytes = Array(text.utf8)
            _ = bytes.withUnsafeMutableBytes { write(fd, $0.baseAddress, $0.count) }
            fchmod(fd, 0o644)
            close(fd)
            rename(temp, path)
        }
    }
}

extension Group {
    /// Records a member's health change for operators (p11hactl status).
    func publish(_ member: Member) {
        let history = member.history.withLock { $0 }
        statusFile.update(MemberStatusRecord(member: member.name, health: member.health.name, lastFailure: history.lastFailure,
                                             reason: history.lastFailureReason, lastRecovery: history.lastRecovery, pid: getpid()))
    }
}

/// Whether a process with this ID exists (one of another user's answers EPERM, and counts).
public func processIsAlive(_ pid: Int32) -> Bool {
    kill(pid, 0) == 0 || errno == EPERM
}
