// The host's lock directory against a local attacker: an unprivileged user's links, planted files and held locks
// in a shared lock-dir touch nothing outside it and delay no call of a root application past the
// operation-timeout; what waited for the lock is done once the attacker lets go; p11hactl flags what is not
// p11ha's and prints no control character; the default directory is made private, and refused when planted.
import Foundation
import Testing

/// A local user made for one test (useradd) and removed after it (userdel), whose commands run with its ids and
/// no supplementary groups (setpriv).
final class LocalUser {
    let name: String
    let uid: UInt32
    let gid: UInt32
    private var started: [Started] = []

    init(_ role: String) throws {
        let name = "p11ha-\(role)-\(String(UInt32.random(in: 0x1000_0000...UInt32.max), radix: 16))"
        self.name = name
        let added = try runProcess("useradd", ["--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name])
        guard added.status == 0 else { throw SupportError("useradd \(name) failed:\n\(added.output)") }
        let ids = try ["-u", "-g"].map { flag in try runProcess("id", [flag, name]).stdout.trimmingCharacters(in: .whitespacesAndNewlines) }
        guard let uid = UInt32(ids[0]), let gid = UInt32(ids[1]) else {
            _ = try? runProcess("userdel", [name])
            throw SupportError("no ids for \(name): \(ids)")
        }
        self.uid = uid
        self.gid = gid
    }

    deinit {
        for process in started { process.killTree() }
        _ = try? runProcess("userdel", [name])
    }

    private var identity: [String] { ["--reuid=\(uid)", "--regid=\(gid)", "--clear-groups", "--"] }

    func run(_ program: String, _ arguments: [String], environment: [String: String]? = nil) throws -> ProcessResult {
        try runProcess("setpriv", identity + [program] + arguments, environment: environment)
    }

    /// Runs a command in the background until `stop` (or the end of the test).
    func start(_ program: String, _ arguments: [String], in dir: String) throws -> Started {
        let process = try Started("setpriv", identity + [program] + arguments, environment: ProcessInfo.processInfo.environment,
                                  output: dir + "/\(name).out", errors: dir + "/\(name).err")
        started.append(process)
        return process
    }
}

/// The names p11ha uses in the lock directory for the members' group, as `p11hactl status --json` tells them.
struct HostFileNames {
    let status: String
    var lock: String { String(status.dropLast(".status".count)) + ".lock" }
    var statusLock: String { status + ".lock" }
}

struct StatusReport: Decodable {
    struct Group: Decodable {
        let healthy: Bool
        let statusFile: StatusFile
        let members: [Member]
    }
    struct StatusFile: Decodable {
        let path: String
        let problem: String?
    }
    struct Member: Decodable {
        let name: String
        let records: Int?
    }
    let groups: [Group]
}

/// Members whose group coordinates in `lockDir`, with a 1 s operation-timeout (so every call must end within 2 s).
func hostFileMembers(lockDir: String) throws -> Members {
    let members = try Members()
    try members.setLockDirectory(lockDir)
    try members.addGlobal(["operation-timeout = 1s", "recovery-interval = 300ms"])
    return members
}

/// A world-writable sticky directory like /tmp, made for one test (removed with the value).
final class SharedDirectory {
    let path: String

    init(mode: mode_t = 0o1777) throws {
        path = try makeTemporaryDirectory("p11ha-shared-lock-dir")
        chmod(path, mode)
    }

    deinit { try? FileManager.default.removeItem(atPath: path) }
}

func statusReport(_ members: Members, pin: Bool = true) throws -> (ProcessResult, StatusReport) {
    let arguments = ["status", "--json"] + (pin ? ["--pin-source", try pinFile(members, "user.pin", members.userPIN)] : [])
    let result = try p11hactl(arguments, members)
    guard let report = try? JSONDecoder().decode(StatusReport.self, from: Data(result.stdout.utf8)) else {
        throw SupportError("p11hactl status --json printed no report (status \(result.status)):\n\(result.output)")
    }
    return (result, report)
}

/// How many replication records each member holds, read by p11hactl with the user PIN.
func recordCounts(_ members: Members) throws -> [Int] {
    let (result, report) = try statusReport(members)
    let counts = report.groups.first?.members.compactMap(\.records) ?? []
    guard counts.count == members.count else { throw SupportError("no record count for every member:\n\(result.output)") }
    return counts
}

func hostFileNames(_ members: Members) throws -> HostFileNames {
    let (_, report) = try statusReport(members, pin: false)
    guard let path = report.groups.first?.statusFile.path else { throw SupportError("no status file path in p11hactl's report") }
    return HostFileNames(status: path)
}

/// Files of root's outside the lock directory, for the attacker's links to point at.
final class RootFiles {
    let dir: String
    let paths: [String]
    let expected: [String: (mode: mode_t, content: String)]

    init() throws {
        dir = try makeTemporaryDirectory("p11ha-root-files")
        chmod(dir, 0o755)
        var expected: [String: (mode_t, String)] = [:]
        var paths: [String] = []
        for (name, mode) in [("lock-target", mode_t(0o600)), ("status-target", 0o600), ("status-lock-target", 0o640)] {
            let path = dir + "/" + name
            let content = "root's \(name), not to be touched\n"
            guard FileManager.default.createFile(atPath: path, contents: Data(content.utf8)) else { throw SupportError("cannot make \(path)") }
            chmod(path, mode)
            expected[path] = (mode, content)
            paths.append(path)
        }
        self.paths = paths
        self.expected = expected
    }

    deinit { try? FileManager.default.removeItem(atPath: dir) }

    /// The files whose mode or content changed, described.
    var touched: [String] {
        paths.compactMap { path in
            var status = stat()
            guard lstat(path, &status) == 0 else { return "\(path): gone" }
            let content = (try? String(contentsOfFile: path, encoding: .utf8)) ?? "?"
            let (mode, original) = expected[path]!
            if status.st_mode & 0o7777 != mode || content != original {
                return "\(path): mode \(String(status.st_mode & 0o7777, radix: 8)), content \(content.debugDescription)"
            }
            return nil
        }
    }
}

/// The timed_writes client (Tests/HostFileClient), started against the members' group: it writes and signs, then
/// waits for `finish` before C_Finalize.
final class TimedWrites {
    let process: Started
    let finish: String

    init(_ members: Members, rounds: Int = 3) throws {
        let program = try compileC(Paths.packageRoot + "/Tests/HostFileClient/timed_writes.c", to: members.dir + "/timed_writes").path
        finish = members.dir + "/finish-\(UUID().uuidString)"
        process = try Started(program, [Paths.debugModule, members.group, members.userPIN, String(rounds), finish],
                              environment: members.environment, output: members.dir + "/timed_writes.out",
                              errors: members.dir + "/timed_writes.err")
    }

    deinit { process.killTree() }

    /// The token objects it created, once every write is done.
    func waitForWrites() throws -> UInt64 {
        var writes: UInt64? = nil
        try waitUntil("timed_writes finishes its writes:\n\(process.output)\n\(process.errorOutput)", timeout: 60) {
            writes = process.output.split(separator: "\n").first { $0.hasPrefix("writes ") }.flatMap { UInt64($0.dropFirst(7)) }
            if writes == nil && !process.isRunning { throw SupportError("timed_writes exited early:\n\(process.output)\n\(process.errorOutput)") }
            return writes != nil
        }
        return writes!
    }

    /// Lets it finalize and exit; its result.
    func finishAndWait() throws -> ProcessResult {
        guard FileManager.default.createFile(atPath: finish, contents: nil) else { throw SupportError("cannot make \(finish)") }
        guard let result = process.wait(seconds: 30) else { throw SupportError("timed_writes did not exit:\n\(process.output)") }
        return result
    }

    /// Every call's duration, by name.
    var durations: [(call: String, seconds: Double)] {
        process.output.split(separator: "\n").compactMap { line in
            let words = line.split(separator: " ")
            guard words.count == 3, words[0] == "duration", let seconds = Double(words[2]) else { return nil }
            return (String(words[1]), seconds)
        }
    }
}

/// Characters that would reach the terminal as control sequences (every control character but the newline).
func controlCharacters(in text: String) -> [String] {
    text.unicodeScalars.filter { $0.properties.generalCategory == .control && $0 != "\n" }.map { "U+\(String($0.value, radix: 16))" }
}

@Suite("A local user cannot turn p11ha's host files against it", .serialized,
       .enabled(if: getuid() == 0, "makes local users and runs commands as them: needs root, as CI has"))
struct HostFilesAgainstALocalUser {
    @Test("links an unprivileged user planted at the lock and status names in a shared sticky lock-dir touch no file outside it and delay no call; every write's record is on every member at once")
    func plantedLinks() throws {
        let shared = try SharedDirectory()
        let rootFiles = try RootFiles()
        let members = try hostFileMembers(lockDir: shared.path)
        let names = try hostFileNames(members)
        let attacker = try LocalUser("attacker")
        for (link, target) in zip([names.lock, names.status, names.statusLock], rootFiles.paths) {
            let linked = try attacker.run("ln", ["-s", target, link])
            try #require(linked.status == 0, "the attacker could not plant \(link):\n\(linked.output)")
        }
        let before = try recordCounts(members)

        let flagged = try p11hactl(["status"], members)
        #expect(flagged.status == 1 && flagged.stdout.contains("STATUS FILE NOT SHOWN") && flagged.stdout.contains("a symbolic link"),
                "p11hactl status did not flag the link at the status file's name:\n\(flagged.output)")

        let client = try TimedWrites(members)
        let writes = try client.waitForWrites()
        for (call, seconds) in client.durations {
            #expect(seconds <= 2, "\(call) took \(seconds) s, more than operation-timeout (1 s) + 1 s:\n\(members.log)")
        }
        #expect(rootFiles.touched.isEmpty, "files outside the lock directory changed: \(rootFiles.touched)")
        // Records need no lock: each write's is on every member already.
        let during = try recordCounts(members)
        #expect(during == before.map { $0 + Int(writes) }, "every member holds the \(writes) writes' records: \(before) -> \(during)")

        let removed = try attacker.run("rm", ["-f", names.lock, names.status, names.statusLock])
        try #require(removed.status == 0, "\(removed.output)")
        let finished = try client.finishAndWait()
        #expect(finished.status == 0, "timed_writes failed:\n\(finished.output)")
        #expect(client.durations.contains { $0.call == "C_Finalize" && $0.seconds <= 2 }, "\(finished.output)")
        let after = try recordCounts(members)
        #expect(after == before.map { $0 + Int(writes) }, "every member holds the \(writes) writes' records: \(before) -> \(after)")
        #expect(rootFiles.touched.isEmpty, "files outside the lock directory changed: \(rootFiles.touched)")
    }

    @Test("a lock file and a status file an unprivileged user planted first (it holds flock on the lock, the status carries terminal escapes) are refused; p11hactl flags the status file and prints no control character")
    func plantedFiles() throws {
        let shared = try SharedDirectory()
        let members = try hostFileMembers(lockDir: shared.path)
        let names = try hostFileNames(members)
        let attacker = try LocalUser("attacker")
        let escapes = #"member-a\tfailed\t1700000000\t\033]0;pwned\007\033[2J\233m\t-\t1\n"#
        let planted = try attacker.run("sh", ["-c", "printf '\(escapes)' > '\(names.status)'"])
        try #require(planted.status == 0, "\(planted.output)")
        let holder = try attacker.start("flock", [names.lock, "sleep", "300"], in: members.dir)
        try waitUntil("the attacker holds its lock file", timeout: 10) { FileManager.default.fileExists(atPath: names.lock) }
        let before = try recordCounts(members)

        for arguments in [["status"], ["status", "--json"]] {
            let shown = try p11hactl(arguments, members)
            #expect(shown.status == 1, "a foreign status file leaves the group flagged:\n\(shown.output)")
            #expect(shown.stdout.contains("owned by uid \(attacker.uid)"), "\(shown.output)")
            #expect(!shown.stdout.contains("OUT OF SERVICE") && !shown.stdout.contains("pwned"), "the planted records were shown:\n\(shown.output)")
            #expect(controlCharacters(in: shown.output).isEmpty, "control characters reached the terminal: \(controlCharacters(in: shown.output))")
        }

        let client = try TimedWrites(members)
        let writes = try client.waitForWrites()
        for (call, seconds) in client.durations {
            #expect(seconds <= 2, "\(call) took \(seconds) s, more than operation-timeout (1 s) + 1 s:\n\(members.log)")
        }
        #expect(try recordCounts(members) == before.map { $0 + Int(writes) }, "records need no lock")

        holder.killTree()
        let removed = try attacker.run("rm", ["-f", names.lock])
        try #require(removed.status == 0, "\(removed.output)")
        #expect(try client.finishAndWait().status == 0)
        #expect(try recordCounts(members) == before.map { $0 + Int(writes) })
    }

    @Test("p11hactl status shows a status file of root's with control characters in its fields escaped, never raw")
    func escapedFields() throws {
        let shared = try SharedDirectory(mode: 0o700)
        let members = try hostFileMembers(lockDir: shared.path)
        let names = try hostFileNames(members)
        // pid 1 is alive: the record is shown as a live process's, reason included.
        let record = "member-b\tfailed\u{1b}[31m\t1700000000\tdevice \u{1b}]0;pwned\u{07}gone\u{9b}2J\t-\t1\n"
        try record.write(toFile: names.status, atomically: false, encoding: .utf8)
        chmod(names.status, 0o600)
        for arguments in [["status"], ["status", "--json"]] {
            let shown = try p11hactl(arguments, members)
            #expect(shown.stdout.contains("process 1") || shown.stdout.contains("\"pid\" : 1"), "the record was not shown:\n\(shown.output)")
            #expect(shown.stdout.contains(#"\u{1b}]0;pwned\u{7}gone\u{9b}2J"#) || shown.stdout.contains(#"\\u{1b}]0;pwned\\u{7}gone\\u{9b}2J"#),
                    "the reason is not shown escaped:\n\(shown.output)")
            #expect(controlCharacters(in: shown.output).isEmpty, "control characters reached the terminal: \(controlCharacters(in: shown.output))")
        }
    }

    @Test("a lock another process holds delays no write: each write's record is on every member at once")
    func heldLock() throws {
        let shared = try SharedDirectory(mode: 0o700)
        let members = try hostFileMembers(lockDir: shared.path)
        let names = try hostFileNames(members)
        let holder = try Started("flock", [names.lock, "sleep", "300"], environment: members.environment,
                                 output: members.dir + "/flock.out", errors: members.dir + "/flock.err")
        defer { holder.killTree() }
        try waitUntil("the lock is held", timeout: 10) { FileManager.default.fileExists(atPath: names.lock) }
        let before = try recordCounts(members)

        let client = try TimedWrites(members)
        let writes = try client.waitForWrites()
        let creates = client.durations.filter { $0.call == "C_CreateObject" }.map(\.seconds)
        try #require(creates.count == Int(writes), "\(client.process.output)")
        #expect(creates.allSatisfy { $0 < 0.8 }, "no write waits for the lock (1 s wait): \(creates)")
        for (call, seconds) in client.durations {
            #expect(seconds <= 2, "\(call) took \(seconds) s, more than operation-timeout (1 s) + 1 s")
        }
        #expect(try recordCounts(members) == before.map { $0 + Int(writes) })

        holder.killTree()
        #expect(try client.finishAndWait().status == 0)
        #expect(try recordCounts(members) == before.map { $0 + Int(writes) })
    }

    @Test("an unprivileged application's default lock directory is /tmp/p11ha-UID, made 0700; planted first by another user, or as a link, it is refused with lock-dir-refused")
    func defaultDirectory() throws {
        let members = try Members()
        try members.setLockDirectory(nil)
        let application = try LocalUser("app")
        let attacker = try LocalUser("attacker")
        let handedOver = try runProcess("chown", ["-R", "\(application.uid):\(application.gid)", members.dir])
        try #require(handedOver.status == 0, "\(handedOver.output)")
        let directory = "/tmp/p11ha-\(application.uid)"
        defer { _ = try? runProcess("rm", ["-rf", directory]) }
        var environment = members.environment
        environment["XDG_RUNTIME_DIR"] = nil
        let status = { try application.run(Paths.p11hactl, ["status", "--json"], environment: environment) }

        let made = try status()
        #expect(made.status != 2 && !made.output.contains("lock-dir-refused"), "\(made.output)")
        var info = stat()
        #expect(lstat(directory, &info) == 0 && info.st_mode & S_IFMT == S_IFDIR, "\(directory) was not made")
        #expect(info.st_uid == application.uid && info.st_mode & 0o7777 == 0o700,
                "\(directory): uid \(info.st_uid), mode \(String(info.st_mode & 0o7777, radix: 8))")

        try #require(try runProcess("rm", ["-rf", directory]).status == 0)
        try #require(try attacker.run("mkdir", ["-m", "0777", directory]).status == 0)
        let foreign = try status()
        #expect(foreign.stderr.contains("lock-dir-refused") && foreign.stderr.contains("path=\(directory)")
                && foreign.stderr.contains("owned by uid \(attacker.uid)"), "\(foreign.output)")
        #expect(foreign.status == 1 && foreign.stdout.contains("lock-dir-refused"), "the status file's place is flagged:\n\(foreign.output)")
        #expect(try directoryEntries(directory).isEmpty, "the application put files in another user's directory")

        try #require(try attacker.run("rmdir", [directory]).status == 0)
        try #require(try attacker.run("ln", ["-s", "/tmp", directory]).status == 0)
        let linked = try status()
        #expect(linked.stderr.contains("lock-dir-refused") && linked.stderr.contains("reason=\"a symbolic link\""), "\(linked.output)")
        _ = try? attacker.run("rm", ["-f", directory])

        // root's own default, made by root's first use.
        _ = try p11hactl(["status"], members)
        #expect(lstat("/run/p11ha", &info) == 0 && info.st_mode & S_IFMT == S_IFDIR && info.st_uid == 0 && info.st_mode & 0o022 == 0,
                "/run/p11ha: uid \(info.st_uid), mode \(String(info.st_mode & 0o7777, radix: 8))")
        // Configured for the unprivileged application, a directory of root's it cannot write to is a configuration
        // error, not a lock that never comes.
        let readOnly = try SharedDirectory(mode: 0o755)
        try members.setLockDirectory(readOnly.path)
        let unusable = try application.run(Paths.p11hactl, ["check"], environment: environment)
        #expect(unusable.status == 1 && unusable.stderr.contains("lock-dir-refused: \(readOnly.path): not writable by this process"),
                "\(unusable.output)")
    }
}

func directoryEntries(_ path: String) throws -> [String] {
    try FileManager.default.contentsOfDirectory(atPath: path)
}
