// The host's coordination files, in-process: which lock directories and files are trusted, what a planted link,
// hard link, FIFO or foreign file gets, and that a lock held elsewhere delays a write by at most its wait, the
// write's journal record following once the lock is free.
import CInterop
import Foundation
import Glibc
@testable import P11HA
import P11HAFake
import Testing

func fileStatus(_ path: String) -> stat? {
    var status = stat()
    return lstat(path, &status) == 0 ? status : nil
}

func contents(_ path: String) -> String? {
    readFileBytes(path).map { String(decoding: $0, as: UTF8.self) }
}

private let me = ProcessIdentity(uid: 1000, groups: [1000, 27])

@Suite struct TheLockDirectoryRules {
    @Test("a directory only its owner (this user, or root) can write to is private")
    func privateDirectories() {
        #expect(directoryTrust(mode: S_IFDIR | 0o700, owner: 1000, group: 1000, for: me, isDefault: false) == .success(.private))
        #expect(directoryTrust(mode: S_IFDIR | 0o755, owner: 0, group: 0, for: me, isDefault: false) == .success(.private))
    }

    @Test("another user's directory is refused, whatever its mode")
    func anotherUsersDirectory() {
        guard case .failure(let reason) = directoryTrust(mode: S_IFDIR | 0o700, owner: 1001, group: 1001, for: me, isDefault: false) else {
            Issue.record("another user's directory was accepted")
            return
        }
        #expect(reason.text.contains("owned by uid 1001"))
    }

    @Test("a world-writable directory is refused unless it is sticky like /tmp, where only this user's and root's files count")
    func worldWritable() {
        guard case .failure(let reason) = directoryTrust(mode: S_IFDIR | 0o777, owner: 0, group: 0, for: me, isDefault: false) else {
            Issue.record("a world-writable directory without the sticky bit was accepted")
            return
        }
        #expect(reason.text.contains("sticky"))
        #expect(directoryTrust(mode: S_IFDIR | 0o1777, owner: 0, group: 0, for: me, isDefault: false) == .success(.sticky))
    }

    @Test("a group-writable directory is shared with that group when the process is in it, or when its owner is this user")
    func groupWritable() {
        #expect(directoryTrust(mode: S_IFDIR | 0o770, owner: 0, group: 27, for: me, isDefault: false) == .success(.group(27)))
        #expect(directoryTrust(mode: S_IFDIR | 0o2770, owner: 1000, group: 50, for: me, isDefault: false) == .success(.group(50)))
        guard case .failure(let reason) = directoryTrust(mode: S_IFDIR | 0o770, owner: 0, group: 50, for: me, isDefault: false) else {
            Issue.record("a directory writable by a group of strangers was accepted")
            return
        }
        #expect(reason.text.contains("group 50"))
    }

    @Test("the default directory must be this user's own, even root's is refused for another user; a file is no directory")
    func defaultAndNonDirectories() {
        guard case .failure = directoryTrust(mode: S_IFDIR | 0o700, owner: 0, group: 0, for: me, isDefault: true) else {
            Issue.record("root's directory was accepted as another user's default")
            return
        }
        guard case .failure(let reason) = directoryTrust(mode: S_IFREG | 0o600, owner: 1000, group: 1000, for: me, isDefault: false) else {
            Issue.record("a regular file was accepted as a directory")
            return
        }
        #expect(reason.text == "not a directory")
    }

    @Test("the default is /run/p11ha for root and /tmp/p11ha-UID for anyone else")
    func defaultPaths() {
        #expect(HostDirectory.defaultPath(uid: 0) == "/run/p11ha")
        #expect(HostDirectory.defaultPath(uid: 33) == "/tmp/p11ha-33")
    }
}

@Suite struct TheHostFileRules {
    @Test("a regular file of this user or root with one link is accepted; hard links, FIFOs and other users' files are not")
    func rules() {
        #expect(fileProblem(mode: S_IFREG | 0o600, links: 1, owner: 1000, group: 1000, in: .private, for: me) == nil)
        #expect(fileProblem(mode: S_IFREG | 0o600, links: 1, owner: 0, group: 0, in: .sticky, for: me) == nil)
        #expect(fileProblem(mode: S_IFREG | 0o600, links: 2, owner: 0, group: 0, in: .sticky, for: me)?.text.contains("hard links") == true)
        #expect(fileProblem(mode: S_IFIFO | 0o600, links: 1, owner: 1000, group: 1000, in: .private, for: me)?.text == "not a regular file")
        #expect(fileProblem(mode: S_IFREG | 0o600, links: 1, owner: 1001, group: 1001, in: .sticky, for: me)?.text.contains("owned by uid 1001") == true)
    }

    @Test("in a directory shared with a group, that group's files are accepted; root's world-writable file is not")
    func sharedAndWide() {
        #expect(fileProblem(mode: S_IFREG | 0o640, links: 1, owner: 1001, group: 27, in: .group(27), for: me) == nil)
        #expect(fileProblem(mode: S_IFREG | 0o640, links: 1, owner: 1001, group: 1001, in: .group(27), for: me) != nil)
        #expect(fileProblem(mode: S_IFREG | 0o666, links: 1, owner: 0, group: 0, in: .sticky, for: me)?.text.contains("world-writable") == true)
        // This user's own file of an earlier version (0666) is narrowed when it is opened, not refused.
        #expect(fileProblem(mode: S_IFREG | 0o666, links: 1, owner: 1000, group: 1000, in: .sticky, for: me) == nil)
    }
}

/// These make files of another user (uid 65534) and read root's: they run as root, as CI does.
@Suite(.enabled(if: geteuid() == 0, "needs root to make another user's files"))
struct HostFilesOnDisk {
    @Test("a symbolic link at the lock's name, pointing at a root-only file, is refused; the file keeps its mode and content")
    func symlinkAtLock() throws {
        let dir = try TemporaryDirectory()
        let elsewhere = try TemporaryDirectory()
        let target = try elsewhere.file("shadow", "root only\n", mode: 0o600)
        chmod(dir.path, 0o1777)
        symlink(target, dir.path + "/group.lock")
        let lock = HostFileLock(directory: HostDirectory(path: dir.path), name: "group.lock")
        guard case .failure(.refused(let problem)) = lock.withLock(waitingUpTo: .milliseconds(100), { () }) else {
            Issue.record("a lock was taken through a symbolic link")
            return
        }
        #expect(problem.event == "host-file-refused" && problem.reason == "a symbolic link", "\(problem)")
        #expect(fileStatus(target).map { $0.st_mode & 0o7777 } == 0o600)
        #expect(contents(target) == "root only\n")
    }

    @Test("a hard link to a root file at the lock's name is refused: it would pass for root's own lock")
    func hardLinkAtLock() throws {
        let dir = try TemporaryDirectory()
        let target = try dir.file("root-file", "root's\n", mode: 0o600)
        link(target, dir.path + "/group.lock")
        let lock = HostFileLock(directory: HostDirectory(path: dir.path), name: "group.lock")
        guard case .failure(.refused(let problem)) = lock.withLock(waitingUpTo: .milliseconds(100), { () }) else {
            Issue.record("a lock was taken on a hard link")
            return
        }
        #expect(problem.reason.contains("2 hard links"), "\(problem)")
        #expect(contents(target) == "root's\n")
    }

    @Test("a FIFO at the lock's name is refused at once, never waited on for a writer")
    func fifoAtLock() throws {
        let dir = try TemporaryDirectory()
        mkfifo(dir.path + "/group.lock", 0o666)
        let lock = HostFileLock(directory: HostDirectory(path: dir.path), name: "group.lock")
        let start = monotonicNanos()
        guard case .failure(.refused(let problem)) = lock.withLock(waitingUpTo: .milliseconds(100), { () }) else {
            Issue.record("a lock was taken on a FIFO")
            return
        }
        #expect(problem.reason == "not a regular file")
        #expect(monotonicNanos() - start < 1_000_000_000)
    }

    @Test("in a sticky directory, a lock file another user planted first is refused rather than used")
    func plantedLockFile() throws {
        let dir = try TemporaryDirectory()
        chmod(dir.path, 0o1777)
        let planted = try dir.file("group.lock", "", mode: 0o644)
        chown(planted, 65534, 65534)
        let lock = HostFileLock(directory: HostDirectory(path: dir.path), name: "group.lock")
        guard case .failure(.refused(let problem)) = lock.withLock(waitingUpTo: .milliseconds(100), { () }) else {
            Issue.record("another user's lock file was used")
            return
        }
        #expect(problem.reason.contains("owned by uid 65534"), "\(problem)")
    }

    @Test("a lock file p11ha makes is 0600, 0640 and the directory's group in a shared directory; one of this user's left 0666 by an earlier version is narrowed")
    func lockFileModes() throws {
        let dir = try TemporaryDirectory()
        let lock = HostFileLock(directory: HostDirectory(path: dir.path), name: "made.lock")
        #expect(throws: Never.self) { try lock.withLock(waitingUpTo: .zero, { () }).get() }
        #expect(fileStatus(dir.path + "/made.lock").map { $0.st_mode & 0o7777 } == 0o600)

        let old = try dir.file("old.lock", "", mode: 0o666)
        _ = HostFileLock(directory: HostDirectory(path: dir.path), name: "old.lock").withLock(waitingUpTo: .zero, { () })
        #expect(fileStatus(old).map { $0.st_mode & 0o7777 } == 0o600)

        let shared = try TemporaryDirectory()
        chown(shared.path, 0, 65534)
        chmod(shared.path, 0o770)
        _ = HostFileLock(directory: HostDirectory(path: shared.path), name: "shared.lock").withLock(waitingUpTo: .zero, { () })
        let made = fileStatus(shared.path + "/shared.lock")
        #expect(made.map { $0.st_mode & 0o7777 } == 0o640)
        #expect(made?.st_gid == 65534)
    }

    @Test("a lock another process holds is waited for up to the wait, then given up, and taken once it is free")
    func heldLock() throws {
        let dir = try TemporaryDirectory()
        let lock = HostFileLock(directory: HostDirectory(path: dir.path), name: "held.lock")
        _ = lock.withLock(waitingUpTo: .zero, { () })
        // Another open file description: flock conflicts with it as with another process.
        let holder = open(dir.path + "/held.lock", O_RDONLY | O_CLOEXEC)
        #expect(flock(holder, LOCK_EX) == 0)
        let start = monotonicNanos()
        let outcome = lock.withLock(waitingUpTo: .milliseconds(300), { () })
        let waited = Double(monotonicNanos() - start) / 1e9
        guard case .failure(.busy) = outcome else {
            Issue.record("a lock held elsewhere was taken")
            return
        }
        #expect(waited >= 0.29 && waited < 1.3, "waited \(waited) s for a 300 ms wait")
        close(holder)
        #expect(throws: Never.self) { try lock.withLock(waitingUpTo: .milliseconds(300), { () }).get() }
    }

    @Test("a file is replaced through a new file of an unpredictable name: a symbolic link at its name is replaced, its target untouched")
    func replaceOverSymlink() throws {
        let dir = try TemporaryDirectory()
        let elsewhere = try TemporaryDirectory()
        let target = try elsewhere.file("passwd", "root:x:0:0\n", mode: 0o644)
        chmod(dir.path, 0o1777)
        symlink(target, dir.path + "/group.status")
        let open = try HostDirectory(path: dir.path).open()
        #expect(throws: HostFileProblem.self) { try open.read("group.status", limit: 1 << 20) }
        try open.replace("group.status", with: Array("mine\n".utf8))
        #expect(contents(target) == "root:x:0:0\n")
        #expect(fileStatus(target).map { $0.st_mode & 0o7777 } == 0o644)
        let replaced = try #require(fileStatus(dir.path + "/group.status"))
        #expect(replaced.st_mode & S_IFMT == S_IFREG && replaced.st_mode & 0o7777 == 0o600)
        #expect(try open.read("group.status", limit: 1 << 20) == Array("mine\n".utf8))
        let names = try directoryNames(dir.path)
        #expect(names == ["group.status"], "no temporary file left behind: \(names)")
    }

    @Test("the default directory is made 0700 and this user's; a link or another user's directory planted at its name is refused")
    func defaultDirectory() throws {
        let parent = try TemporaryDirectory()
        let made = HostDirectory(path: parent.path + "/p11ha-default", isDefault: true)
        _ = try made.open()
        let status = try #require(fileStatus(made.path))
        #expect(status.st_mode & S_IFMT == S_IFDIR && status.st_mode & 0o7777 == 0o700 && status.st_uid == geteuid())

        let decoy = try TemporaryDirectory()
        symlink(decoy.path, parent.path + "/p11ha-linked")
        #expect(throws: HostFileProblem.directory(parent.path + "/p11ha-linked", "a symbolic link")) {
            _ = try HostDirectory(path: parent.path + "/p11ha-linked", isDefault: true).open()
        }

        mkdir(parent.path + "/p11ha-foreign", 0o700)
        chown(parent.path + "/p11ha-foreign", 65534, 65534)
        do {
            _ = try HostDirectory(path: parent.path + "/p11ha-foreign", isDefault: true).open()
            Issue.record("another user's directory was accepted as the default")
        } catch {
            #expect(error.event == "lock-dir-refused" && error.reason.contains("owned by uid 65534"), "\(error)")
        }
    }

    @Test("a configured lock-dir that others can write to is a configuration error naming its line")
    func configuredDirectoryChecked() throws {
        let dir = try TemporaryDirectory()
        chmod(dir.path, 0o777)
        let text = "[p11ha]\nlock-dir = \(dir.path)\n[group g]\nmember = pkcs11:token=a?module-path=/fake/a\n"
        let error = #expect(throws: ConfigError.self) { _ = try Config.parse(text, path: "p11ha.conf") }
        #expect(error?.description.hasPrefix("p11ha.conf:2: lock-dir-refused: \(dir.path): world-writable without the sticky bit") == true,
                "\(String(describing: error))")
        chmod(dir.path, 0o700)
        #expect(try Config.parse(text, path: "p11ha.conf").lockDirectory == dir.path)
    }
}

func directoryNames(_ path: String) throws -> [String] {
    guard let dir = opendir(path) else { throw TestFailure("opendir \(path)") }
    defer { closedir(dir) }
    var names: [String] = []
    while let entry = readdir(dir) {
        let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        if name != "." && name != ".." { names.append(name) }
    }
    return names.sorted()
}

/// How many replication records each fake member holds, read from the store itself.
func recordCounts(_ fake: FakeGroup) -> [Int] {
    fake.stores.map { $0.tokenObjects(matching: ReplicaRecord.searchTemplate(isPrivate: nil)).count }
}

/// Holds flock on a file as another process would (its own open file description) until `release`.
final class LockHolder {
    private var fd: Int32

    init(_ path: String) throws {
        fd = open(path, O_RDONLY | O_CREAT | O_CLOEXEC, 0o600)
        guard fd >= 0, flock(fd, LOCK_EX) == 0 else { throw TestFailure("cannot hold \(path): \(errnoText())") }
    }

    func release() {
        if fd >= 0 { close(fd) }
        fd = -1
    }

    deinit { release() }
}

@Suite struct WritesWhileAnotherProcessHoldsTheHostLock {
    @Test("a write never waits for the host lock: with another process holding it, the write's record is on every member at once")
    func writesDoNotWait() throws {
        let fake = try FakeGroup(operationTimeout: "1s")
        let session = try fake.userSession()
        _ = try fake.runtime.createObject(session, dataObject("before"))
        let before = recordCounts(fake)
        #expect(Set(before).count == 1, "members agree before: \(before)")

        let holder = try LockHolder(fake.group.hostLock.path)
        defer { holder.release() }
        let start = monotonicNanos()
        _ = try fake.runtime.createObject(session, dataObject("while held"))
        let elapsed = Double(monotonicNanos() - start) / 1e9
        #expect(elapsed < 0.8, "the write did not wait for the lock (1 s wait): \(elapsed) s")
        #expect(recordCounts(fake) == before.map { $0 + 1 }, "one record more on every member")
        #expect(fake.members.allSatisfy { $0.isInService })
    }

    @Test("a member that missed a write while the lock was held elsewhere returns only once the write's record is written, with what it missed")
    func noReturnBeforeTheRecord() throws {
        let fake = try FakeGroup(operationTimeout: "300ms")
        let session = try fake.userSession()
        let holder = try LockHolder(fake.group.hostLock.path)
        fake.stores[1].faults.inject(.error(CK_RV(CKR_DEVICE_ERROR)), on: [.createObject], times: 1)
        _ = try fake.runtime.createObject(session, dataObject("missed"))
        #expect(fake.health(1) == .stale)
        fake.recover()
        #expect(fake.health(1) == .stale, "not brought up to date without the lock")
        holder.release()
        fake.recover()
        #expect(fake.health(1) == .inService)
        #expect(fake.objects(labelled: "missed", on: 1) == 1)
        let counts = recordCounts(fake)
        #expect(Set(counts).count == 1, "every member holds the write's record: \(counts)")
    }

    @Test("a process of this host that waits for the host lock to bring a member back is seen while it waits; a catch-up gives way to it, and runs once it is done")
    func catchUpsGiveWay() throws {
        // The lock alone: a wait that announces itself is seen by every other opener, and only while it lasts.
        let dir = try TemporaryDirectory()
        let lock = HostFileLock(directory: HostDirectory(path: dir.path), name: "g.lock")
        let holder = try LockHolder(dir.path + "/g.lock")
        #expect(!lock.isWanted())
        let waiting = Thread { _ = lock.withLock(waitingUpTo: .seconds(3), announced: true, { () }) }
        waiting.start()
        #expect(eventually { lock.isWanted() }, "a wait that announces itself is seen")
        holder.release()
        #expect(eventually { !lock.isWanted() }, "the announcement ends with the wait and the work")

        // A group: the catch-up that would set back a label changed behind p11ha's back waits for the announcement.
        // Its first catch-up saw the value, which may be a write under way; it may be set back once that long has passed.
        let (clock, fake) = try labelChangedBehindP11HA()
        clock.advance(by: fake.group.writeSettles)
        // Another process of this host waits to bring a member back (a shared lock on the announcement file).
        let want = open(fake.group.hostLock.path + ".want", O_RDONLY | O_CREAT | O_CLOEXEC, 0o600)
        #expect(want >= 0 && flock(want, LOCK_SH) == 0)
        fake.group.catchUpWanted.store(true, ordering: .releasing)
        fake.recover()
        #expect(fake.objects(labelled: "changed", on: 1) == 1, "the catch-up gave way")
        close(want)
        fake.group.catchUpWanted.store(true, ordering: .releasing)
        fake.recover()
        #expect(fake.objects(labelled: "kept", on: 1) == 1 && fake.objects(labelled: "changed", on: 1) == 0, "and ran once it was done")
    }

    @Test("a health change meets a busy status file lock without waiting; the worker writes it once the lock is free")
    func statusDeferred() throws {
        let fake = try FakeGroup(operationTimeout: "1s")
        let holder = try LockHolder(fake.group.statusFile.path + ".lock")
        let session = try fake.userSession()
        fake.stores[2].faults.inject(.error(CK_RV(CKR_DEVICE_ERROR)), on: [.createObject], times: 1)
        let start = monotonicNanos()
        _ = try fake.runtime.createObject(session, dataObject("k"))
        #expect(Double(monotonicNanos() - start) / 1e9 < 0.8, "the status update waited for its lock (the operation-timeout is 1 s)")
        #expect(fake.group.statusFile.read().records.isEmpty)
        holder.release()
        fake.recover()
        let records = fake.group.statusFile.read()
        #expect(records.problem == nil)
        #expect(records.records.contains { $0.member == "member-2" && $0.pid == getpid() }, "\(records.records)")
    }

    @Test("a status file another user planted is reported as such, not read as p11ha's",
          .enabled(if: geteuid() == 0, "needs root to make another user's file"))
    func foreignStatusFile() throws {
        let fake = try FakeGroup()
        let dir = HostDirectory(path: fake.directory)
        let name = String(fake.group.statusFile.path.split(separator: "/").last!)
        try dir.open().replace(name, with: Array("member-0\tfailed\t1\t\u{1b}]0;owned\u{07}\t-\t1\n".utf8))
        chown(fake.group.statusFile.path, 65534, 65534)
        let reading = fake.group.statusFile.read()
        #expect(reading.records.isEmpty)
        #expect(reading.problem?.contains("owned by uid 65534") == true, "\(String(describing: reading.problem))")
    }
}
