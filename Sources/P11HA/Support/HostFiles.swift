// This host's coordination files (lock-dir): which directory, whether it can be trusted, and files in it opened so
// that another local user can neither redirect p11ha's writes (symlinks, hard links) nor pass files off as its own.
import Glibc
import Synchronization

/// Why a host directory or file cannot be used. `event` is the log event: `lock-dir-refused` for the directory,
/// `host-file-refused` for a file in it.
struct HostFileProblem: Error, Equatable, CustomStringConvertible {
    let event: String
    let path: String
    let reason: String

    static func directory(_ path: String, _ reason: String) -> HostFileProblem {
        HostFileProblem(event: "lock-dir-refused", path: path, reason: reason)
    }

    static func file(_ path: String, _ reason: String) -> HostFileProblem {
        HostFileProblem(event: "host-file-refused", path: path, reason: reason)
    }

    var description: String { "\(event) path=\(path) reason=\"\(reason)\"" }
}

/// Whose files this process may trust: its own user's and root's, and in a directory shared with a group, that
/// group's.
struct ProcessIdentity: Sendable, Equatable {
    let uid: uid_t
    let groups: Set<gid_t>

    static func current() -> ProcessIdentity {
        var groups: Set<gid_t> = [getegid()]
        let count = getgroups(0, nil)
        if count > 0 {
            var list = [gid_t](repeating: 0, count: Int(count))
            let got = getgroups(count, &list)
            if got > 0 { groups.formUnion(list.prefix(Int(got))) }
        }
        return ProcessIdentity(uid: geteuid(), groups: groups)
    }
}

/// What a verified directory lets in.
enum DirectoryTrust: Equatable, Sendable {
    /// Writable only by its owner (this process's user or root): files there are this user's or root's.
    case `private`
    /// Writable by a group this process is in (or that its owner, this user, chose): processes of several users
    /// share coordination; files of that group are accepted too, and new files are given to it (mode 0640).
    case group(gid_t)
    /// World-writable with the sticky bit, like /tmp: anyone can plant a name, nobody can replace another's
    /// file; only files of this user or root are accepted.
    case sticky
}

/// The lock directory's rules, from its lstat/fstat fields alone (so that every rule is testable in-process).
/// `isDefault`: p11ha's own default, which must belong to this process's user.
func directoryTrust(mode: mode_t, owner: uid_t, group: gid_t, for identity: ProcessIdentity,
                    isDefault: Bool) -> Result<DirectoryTrust, HostFileReason> {
    guard mode & S_IFMT == S_IFDIR else { return .failure(.init("not a directory")) }
    if isDefault && owner != identity.uid {
        return .failure(.init("owned by uid \(owner), not by this process's user (uid \(identity.uid)): p11ha made no such directory"))
    }
    guard owner == identity.uid || owner == 0 else {
        return .failure(.init("owned by uid \(owner), neither this process's user (uid \(identity.uid)) nor root"))
    }
    let permissions = "mode \(octal(mode & 0o7777))"
    if mode & 0o002 != 0 {
        guard mode & mode_t(S_ISVTX) != 0 else {
            return .failure(.init("world-writable without the sticky bit (\(permissions)): anyone could replace its files"))
        }
        return .success(.sticky)
    }
    if mode & 0o020 != 0 {
        // Its owner (this user) chose the group; otherwise the group must be this process's own peers.
        guard owner == identity.uid || identity.groups.contains(group) else {
            return .failure(.init("group-writable (\(permissions)) by group \(group), which is not one of this process's groups"))
        }
        return .success(.group(group))
    }
    return .success(.private)
}

/// The rules for a file in a verified directory: a regular file with one link (a hard link would make another
/// file, perhaps root's, pass for this one), of this user or root (or of the directory's group where it is
/// shared), and writable by nobody else. A file of this user's that is wider is narrowed on opening (files of
/// earlier versions were 0666), so that is not held against it here.
func fileProblem(mode: mode_t, links: UInt, owner: uid_t, group: gid_t, in trust: DirectoryTrust,
                 for identity: ProcessIdentity) -> HostFileReason? {
    guard mode & S_IFMT == S_IFREG else { return HostFileReason("not a regular file") }
    guard links == 1 else { return HostFileReason("\(links) hard links to it: it may be another file's") }
    var sharedGroup: gid_t? = nil
    if case .group(let g) = trust { sharedGroup = g }
    let ours = owner == identity.uid
    guard ours || owner == 0 || (sharedGroup != nil && group == sharedGroup) else {
        let alternatives = sharedGroup.map { ", nor of the directory's group \($0)" } ?? ""
        return HostFileReason("owned by uid \(owner), neither this process's user (uid \(identity.uid)) nor root\(alternatives)")
    }
    if !ours {
        if mode & 0o002 != 0 { return HostFileReason("world-writable (mode \(octal(mode & 0o7777)))") }
        if mode & 0o020 != 0 && (sharedGroup == nil || group != sharedGroup) {
            return HostFileReason("writable by group \(group) (mode \(octal(mode & 0o7777)))")
        }
    }
    return nil
}

/// A refusal's reason, as the log and the operator read it.
struct HostFileReason: Error, Equatable {
    let text: String
    init(_ text: String) { self.text = text }
}

func octal(_ mode: mode_t) -> String {
    let digits = String(mode, radix: 8)
    return String(repeating: "0", count: max(0, 4 - digits.count)) + digits
}

/// The directory this host's processes coordinate in.
struct HostDirectory: Sendable {
    let path: String
    /// p11ha's default rather than a configured one: made when missing, and never a symbolic link.
    let isDefault: Bool

    init(path: String) {
        self.init(path: path, isDefault: path == Self.defaultPath())
    }

    init(path: String, isDefault: Bool) {
        self.path = path
        self.isDefault = isDefault
    }

    /// root: /run/p11ha (tmpfs, root's own). Other users: /tmp/p11ha-UID. Every process of one user must find the
    /// same directory whatever its environment, which rules out $XDG_RUNTIME_DIR: a cron job or a service has none
    /// while a login session has one, and logind removes it at the user's last logout, under a running daemon.
    /// /tmp/p11ha-UID can be planted by another user before it exists: it is then refused, and the log says so.
    static func defaultPath(uid: uid_t = geteuid()) -> String {
        uid == 0 ? "/run/p11ha" : "/tmp/p11ha-\(uid)"
    }

    /// Opens and verifies the directory, making the default one (0700) when it is missing. Verified at every
    /// opening: a directory removed and replaced by someone else's is refused from then on.
    func open(as identity: ProcessIdentity = .current()) throws(HostFileProblem) -> OpenHostDirectory {
        var flags = O_RDONLY | O_DIRECTORY | O_CLOEXEC
        var status = stat()
        if isDefault {
            // The default's name is predictable: it must be a directory of this user's, not a link to one.
            if lstat(path, &status) != 0 {
                guard errno == ENOENT else { throw .directory(path, "cannot be examined: \(errnoText())") }
                if mkdir(path, 0o700) != 0 && errno != EEXIST {
                    throw .directory(path, "cannot be made: \(errnoText())")
                }
                guard lstat(path, &status) == 0 else { throw .directory(path, "cannot be examined: \(errnoText())") }
            }
            if status.st_mode & S_IFMT == S_IFLNK { throw .directory(path, "a symbolic link") }
            flags |= O_NOFOLLOW
        }
        let fd = Glibc.open(path, flags)
        guard fd >= 0 else {
            switch errno {
            case ENOENT: throw .directory(path, "does not exist")
            case ENOTDIR, ELOOP: throw .directory(path, "not a directory")
            case EACCES: throw .directory(path, "cannot be opened by this process (uid \(geteuid())): \(errnoText())")
            default: throw .directory(path, "cannot be opened: \(errnoText())")
            }
        }
        guard fstat(fd, &status) == 0 else {
            let reason = errnoText()
            close(fd)
            throw .directory(path, "cannot be examined: \(reason)")
        }
        switch directoryTrust(mode: status.st_mode, owner: status.st_uid, group: status.st_gid, for: identity, isDefault: isDefault) {
        case .success(let trust):
            return OpenHostDirectory(fd: fd, path: path, trust: trust, identity: identity)
        case .failure(let reason):
            close(fd)
            throw .directory(path, reason.text)
        }
    }

    /// Why a configured directory would be refused now (nil: it is usable), for the configuration's check. The
    /// default is made when first needed, so only a default that exists and is wrong is refused here.
    func problem() -> HostFileProblem? {
        if isDefault {
            var status = stat()
            if lstat(path, &status) != 0 && errno == ENOENT { return nil }
        }
        do throws(HostFileProblem) {
            _ = try open()
        } catch {
            return error
        }
        // Accepted but of no use to this process (root's 0700 /run/p11ha for another user): said now, not at the
        // first write.
        if faccessat(AT_FDCWD, path, W_OK | X_OK, AT_EACCESS) != 0 {
            return .directory(path, "not writable by this process (uid \(geteuid())): it could make no lock file there")
        }
        return nil
    }
}

/// A verified lock directory, open: files are reached relative to it, so that the directory cannot be swapped
/// between its verification and their opening.
struct OpenHostDirectory: ~Copyable {
    let fd: Int32
    let path: String
    let trust: DirectoryTrust
    let identity: ProcessIdentity

    deinit { close(fd) }

    /// The mode of the files p11ha makes: its own user's alone, or with the group it shares the directory with
    /// (processes of other users in it must open the lock and read the status).
    var fileMode: mode_t {
        if case .group = trust { return 0o640 }
        return 0o600
    }

    /// Opens a lock file for flock (read-only suffices), making it when missing. Never follows a symbolic link,
    /// never creates over an existing name, never blocks on a planted FIFO.
    func openLockFile(_ name: String) throws(HostFileProblem) -> Int32 {
        let flags = O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK | O_NOCTTY
        for _ in 0..<3 {
            var file = openat(fd, name, flags)
            var made = false
            if file < 0 && errno == ENOENT {
                file = openat(fd, name, flags | O_CREAT | O_EXCL, fileMode)
                // Someone else made it meanwhile: open theirs (and verify it) instead.
                if file < 0 && errno == EEXIST { continue }
                made = file >= 0
            }
            guard file >= 0 else { throw refusal(name, errno) }
            do throws(HostFileProblem) {
                try adopt(file, name, made: made)
                return file
            } catch {
                close(file)
                throw error
            }
        }
        throw .file(filePath(name), "made and removed again as it was opened, three times")
    }

    /// A file's content (nil when there is none), refused when it fails verification or exceeds `limit` bytes.
    func read(_ name: String, limit: Int) throws(HostFileProblem) -> [UInt8]? {
        let file = openat(fd, name, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK | O_NOCTTY)
        if file < 0 && errno == ENOENT { return nil }
        guard file >= 0 else { throw refusal(name, errno) }
        defer { close(file) }
        let size = try adopt(file, name, made: false)
        guard size <= limit else { throw .file(filePath(name), "larger than \(limit) bytes") }
        var result: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 4096)
        while result.count <= limit {
            let n = chunk.withUnsafeMutableBytes { Glibc.read(file, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            guard n >= 0 else { throw .file(filePath(name), "cannot be read: \(errnoText())") }
            if n == 0 { break }
            result.append(contentsOf: chunk[0..<n])
        }
        guard result.count <= limit else { throw .file(filePath(name), "larger than \(limit) bytes") }
        return result
    }

    /// Replaces a file whole: a new file under an unpredictable name (O_EXCL, never following a link), renamed over
    /// the old name, which is replaced whatever it was (a link is replaced, not followed). Readers see the old file
    /// or the new one, never a part.
    func replace(_ name: String, with bytes: [UInt8]) throws(HostFileProblem) {
        var random = SystemRandomNumberGenerator()  // getrandom(2)
        let suffix = String(random.next(), radix: 16)
        let temporary = ".\(name).\(suffix).tmp"
        let file = openat(fd, temporary, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, fileMode)
        guard file >= 0 else { throw .file(filePath(temporary), "cannot be made: \(errnoText())") }
        var written = 0
        var failure: String? = nil
        do throws(HostFileProblem) {
            try adopt(file, temporary, made: true)
        } catch {
            failure = error.reason
        }
        while failure == nil && written < bytes.count {
            let n = bytes.withUnsafeBytes { Glibc.write(file, $0.baseAddress! + written, $0.count - written) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { failure = "cannot be written: \(errnoText())" } else { written += n }
        }
        close(file)
        if failure == nil && renameat(fd, temporary, fd, name) != 0 {
            failure = "cannot replace \(filePath(name)): \(errnoText())"
        }
        if let failure {
            unlinkat(fd, temporary, 0)
            throw .file(filePath(temporary), failure)
        }
    }

    /// Verifies an opened file (`made`: this process just made it) and makes it no wider than p11ha's own mode;
    /// returns its size.
    @discardableResult
    private func adopt(_ fd: Int32, _ name: String, made: Bool) throws(HostFileProblem) -> Int {
        var status = stat()
        guard fstat(fd, &status) == 0 else { throw .file(filePath(name), "cannot be examined: \(errnoText())") }
        if case .group(let g) = trust, made, status.st_gid != g {
            // Without the directory's setgid bit a new file gets this process's group: hand it to the shared one.
            if fchown(fd, uid_t.max, g) == 0 { status.st_gid = g }
        }
        if let problem = fileProblem(mode: status.st_mode, links: UInt(status.st_nlink), owner: status.st_uid,
                                     group: status.st_gid, in: trust, for: identity) {
            throw .file(filePath(name), problem.text)
        }
        let allowed = fileMode
        if status.st_uid == identity.uid && status.st_mode & 0o777 & ~allowed != 0 {
            // Narrower only, never wider: a file of this user's from an earlier version (0666) loses what others had.
            fchmod(fd, status.st_mode & 0o777 & allowed)
        }
        return Int(status.st_size)
    }

    private func refusal(_ name: String, _ code: Int32) -> HostFileProblem {
        switch code {
        case ELOOP: .file(filePath(name), "a symbolic link")
        case EACCES, EPERM: .file(filePath(name), "cannot be opened or made (\(String(cString: strerror(code))))")
        default: .file(filePath(name), "cannot be opened: \(String(cString: strerror(code)))")
        }
    }

    func filePath(_ name: String) -> String { "\(path)/\(name)" }
}

/// flock on a file of the lock directory, waited for by polling: a blocking flock would wait for as long as
/// anyone who can open the file holds it, another local user included.
struct HostFileLock: Sendable {
    let directory: HostDirectory
    let name: String

    var path: String { "\(directory.path)/\(name)" }

    enum Failure: Error {
        /// Held elsewhere for all of the wait.
        case busy(waited: Duration)
        /// The directory or the file failed verification: there is no lock to take.
        case refused(HostFileProblem)
    }

    /// Runs `body` holding the lock if it can be had within `wait` (flock LOCK_NB polled with short sleeps);
    /// `cancelled` ends the wait early (a shutdown). `announced`: while it waits and holds the lock, the process
    /// says so on a second file (`isWanted`), so that work that gives way (`Recovery`'s catch-ups and compactions)
    /// stops and leaves the lock to it: polled, a lock that its holder takes again at once is seldom had (a process
    /// of one host waited for it for 20 s, every try, while another caught up and compacted).
    func withLock<T, E: Error>(waitingUpTo wait: Duration, announced: Bool = false, cancelled: () -> Bool = { false },
                               _ body: () throws(E) -> T) throws(E) -> Result<T, Failure> {
        let fd: Int32
        var announcement: Int32 = -1
        do throws(HostFileProblem) {
            let open = try directory.open()
            fd = try open.openLockFile(name)
            if announced, let want = try? open.openLockFile(wantName) {
                // Shared: several may wait at once. Refused only while another process looks (`isWanted` holds it
                // exclusively for a moment): asked again a few times, a millisecond apart.
                announcement = want
                var tries = 0
                while flock(want, LOCK_SH | LOCK_NB) != 0 && tries < 5 {
                    tries += 1
                    usleep(1_000)
                }
            }
        } catch {
            return .failure(.refused(error))
        }
        // Closing the files releases the locks, also when `body` throws.
        defer {
            close(fd)
            if announcement >= 0 { close(announcement) }
        }
        let start = monotonicNanos()
        let deadline = start + wait.nanoseconds
        var pause: UInt64 = 500_000
        while flock(fd, LOCK_EX | LOCK_NB) != 0 {
            let code = errno
            if code == EINTR { continue }
            guard code == EWOULDBLOCK else {
                return .failure(.refused(.file(path, "cannot be locked: \(String(cString: strerror(code)))")))
            }
            let now = monotonicNanos()
            if now >= deadline || cancelled() { return .failure(.busy(waited: .nanoseconds(now - start))) }
            usleep(UInt32(min(pause, deadline - now) / 1_000))
            pause = min(pause * 2, 20_000_000)
        }
        return .success(try body())
    }

    private var wantName: String { name + ".want" }

    /// Whether another process waits for the lock, or holds it, with `announced`.
    func isWanted() -> Bool {
        guard let open = try? directory.open(), let want = try? open.openLockFile(wantName) else { return false }
        defer { close(want) }
        guard flock(want, LOCK_EX | LOCK_NB) == 0 else { return errno == EWOULDBLOCK }
        flock(want, LOCK_UN)
        return false
    }
}

/// Logs a lasting problem once, and once more when it changes or clears: a lock held for an hour is a few lines,
/// not one per write.
final class ProblemReport: Sendable {
    private let last = Mutex<String?>(nil)

    /// Logs through `log` unless `key` is the problem already reported.
    func report(_ key: String, _ log: () -> Void) {
        let isNew = last.withLock { last -> Bool in
            defer { last = key }
            return last != key
        }
        if isNew { log() }
    }

    /// The problem is over: logs through `log` if one was reported.
    func clear(_ log: () -> Void) {
        if last.withLock({ last -> Bool in
            defer { last = nil }
            return last != nil
        }) { log() }
    }
}

extension Duration {
    var milliseconds: UInt64 { nanoseconds / 1_000_000 }
}

func errnoText() -> String { String(cString: strerror(errno)) }
