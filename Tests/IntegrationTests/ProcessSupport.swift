// Test support for programs: running them to completion or in the background, reading /proc, compiling C.
import Foundation

struct ProcessResult {
    let status: Int32
    let stdout: String
    let stderr: String

    /// Both streams, for failure messages.
    var output: String { stdout + stderr }
}

/// Runs a program to completion and returns its exit status and output. A bare name is looked up in PATH
/// (of `environment` if given). Killed by signal N, the status is 128 + N, as in a shell. A program still
/// running after `seconds` is killed and the call throws.
func runProcess(
    _ executable: String,
    _ arguments: [String],
    environment: [String: String]? = nil,
    stdin: Data? = nil,
    timeout seconds: Double = 120
) throws -> ProcessResult {
    let environment = environment ?? ProcessInfo.processInfo.environment
    let path = try Paths.executable(executable, searchPath: environment["PATH"])
    let shown = describe(executable, arguments)

    let output = try PipeEnds()
    let errors = try PipeEnds()
    let input = try stdin.map { _ in try PipeEnds() }
    let nullDevice = open("/dev/null", O_RDONLY | O_CLOEXEC)
    defer { close(nullDevice) }
    let child: Child
    do {
        child = try Child(path, arguments, environment: environment,
                          stdin: input?.read ?? nullDevice, stdout: output.write, stderr: errors.write)
    } catch {
        for ends in [output, errors] + (input.map { [$0] } ?? []) { ends.closeBoth() }
        throw error
    }
    // The child has its copies; the test process keeps only its own ends, so that EOF comes when the child ends.
    output.closeWrite()
    errors.closeWrite()
    input?.closeRead()

    // Drain both pipes while the child runs so that neither fills up and blocks it.
    let readers = DispatchGroup()
    let out = Collected()
    let err = Collected()
    for (fd, sink) in [(output.read, out), (errors.read, err)] {
        DispatchQueue.global().async(group: readers) {
            sink.set(readToEnd(fd))
            close(fd)
        }
    }
    if let input, let stdin {
        let fd = input.write
        DispatchQueue.global().async {
            writeAll(stdin, to: fd)
            close(fd)
        }
    }

    guard let status = child.wait(seconds: seconds) else {
        // The child leads its own process group: end the whole group, grandchildren too.
        kill(-child.pid, SIGTERM)
        if child.wait(seconds: 2) == nil {
            kill(-child.pid, SIGKILL)
            _ = child.wait(seconds: 5)
        }
        // A grandchild may still hold the pipes open: do not wait for the readers forever.
        _ = readers.wait(timeout: .now() + 2)
        throw SupportError(
            "\(shown) did not finish within \(seconds) s and was killed\nstdout: \(out.text)\nstderr: \(err.text)")
    }
    if readers.wait(timeout: .now() + 10) == .timedOut {
        throw SupportError("\(shown) exited but its output stayed open (a child process still holds it)")
    }
    return ProcessResult(status: status, stdout: out.text, stderr: err.text)
}

/// A process started in the background, its output going to files.
final class Started: @unchecked Sendable {
    let pid: pid_t
    let outputPath: String
    let errorPath: String
    private let child: Child

    init(_ executable: String, _ arguments: [String], environment: [String: String],
         output: String, errors: String) throws {
        let path = try Paths.executable(executable, searchPath: environment["PATH"])
        outputPath = output
        errorPath = errors
        let nullDevice = open("/dev/null", O_RDONLY | O_CLOEXEC)
        let out = open(output, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        let err = open(errors, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        defer { for fd in [nullDevice, out, err] where fd >= 0 { close(fd) } }
        guard nullDevice >= 0, out >= 0, err >= 0 else {
            throw SupportError("cannot open \(output) or \(errors): \(String(cString: strerror(errno)))")
        }
        child = try Child(path, arguments, environment: environment, stdin: nullDevice, stdout: out, stderr: err)
        pid = child.pid
    }

    var isRunning: Bool { child.status == nil }

    /// What it wrote so far.
    var output: String { (try? String(contentsOfFile: outputPath, encoding: .utf8)) ?? "" }
    var errorOutput: String { (try? String(contentsOfFile: errorPath, encoding: .utf8)) ?? "" }

    /// Waits for the exit; nil if it is still running after `seconds`. Killed by signal N, the status is 128 + N.
    func wait(seconds: Double) -> ProcessResult? {
        child.wait(seconds: seconds).map { ProcessResult(status: $0, stdout: output, stderr: errorOutput) }
    }

    /// SIGKILL to the process and everything it started (found before the process dies and its children are
    /// reparented), then waits for it to be reaped.
    func killTree() {
        guard child.status == nil else { return }
        let children = descendants(of: pid)
        // The child leads its own process group, which its children join unless they leave it.
        if ProcessStat(pid)?.group == pid {
            Glibc.kill(-pid, SIGKILL)
        }
        Glibc.kill(pid, SIGKILL)
        for child in children {
            Glibc.kill(child, SIGKILL)
        }
        _ = wait(seconds: 10)
    }
}

/// A child process started with posix_spawn, reaped by a thread of its own. Foundation's Process is not used:
/// on Linux it keeps every Process and its pipes alive (over 500 descriptors after the integration tests), and
/// its scan of /proc/self/fd copies a whole dirent name past the end of the last entry: with that many
/// descriptors the copy ran off a page, and the test process crashed in Process.run (CI, Nov 30).
/// The child leads its own process group, has only descriptors 0 to 2, and SIGPIPE at its default (the test
/// process ignores it; an application run by the tests should meet the signal as it would outside them).
private final class Child: @unchecked Sendable {
    let pid: pid_t
    private let lock = NSLock()
    private let exited = DispatchSemaphore(value: 0)
    /// Guarded by `lock`: the shell-style status once reaped.
    private var reaped: Int32?

    init(_ path: String, _ arguments: [String], environment: [String: String],
         stdin: Int32, stdout: Int32, stderr: Int32) throws {
        // A child that dies holding the other end of a pipe must not kill the test process with SIGPIPE.
        signal(SIGPIPE, SIG_IGN)

        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        for (source, target) in [(stdin, Int32(0)), (stdout, 1), (stderr, 2)] {
            posix_spawn_file_actions_adddup2(&actions, source, target)
        }
        guard closeFrom(&actions, 3) == 0 else { throw SupportError("posix_spawn_file_actions_addclosefrom_np failed") }

        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        var defaults = sigset_t()
        sigemptyset(&defaults)
        sigaddset(&defaults, SIGPIPE)
        posix_spawnattr_setsigdefault(&attributes, &defaults)
        var unblocked = sigset_t()
        sigemptyset(&unblocked)
        posix_spawnattr_setsigmask(&attributes, &unblocked)
        posix_spawnattr_setpgroup(&attributes, 0)
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETPGROUP | POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK))

        let argv = ([path] + arguments).map { strdup($0) } + [nil]
        let envp = environment.map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer { (argv + envp).forEach { free($0) } }
        var pid: pid_t = 0
        let spawned = posix_spawn(&pid, path, &actions, &attributes, argv, envp)
        guard spawned == 0 else {
            throw SupportError("cannot start \(path): \(String(cString: strerror(spawned)))")
        }
        self.pid = pid

        let reaper = Thread { [self, pid] in
            var raw: Int32 = 0
            while waitpid(pid, &raw, 0) == -1 && errno == EINTR {}
            let signal = raw & 0x7f
            let status = signal == 0 ? (raw >> 8) & 0xff : 128 + signal
            lock.withLock { reaped = status }
            exited.signal()
        }
        reaper.start()
    }

    /// The shell-style status, nil while it runs.
    var status: Int32? { lock.withLock { reaped } }

    /// The status once it exits, nil if it still runs after `seconds`.
    func wait(seconds: Double) -> Int32? {
        if let status { return status }
        guard exited.wait(timeout: .now() + seconds) == .success else { return nil }
        exited.signal()  // for any other waiter
        return status
    }
}

/// glibc's posix_spawn_file_actions_addclosefrom_np (2.34 and later), which Swift's Glibc module does not import.
private let closeFrom: @convention(c) (UnsafeMutablePointer<posix_spawn_file_actions_t>, Int32) -> Int32 = {
    guard let symbol = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "posix_spawn_file_actions_addclosefrom_np") else {
        fatalError("glibc 2.34 or later is needed (posix_spawn_file_actions_addclosefrom_np)")
    }
    return unsafeBitCast(symbol, to: (@convention(c) (UnsafeMutablePointer<posix_spawn_file_actions_t>, Int32) -> Int32).self)
}()

/// Both ends of a pipe, close-on-exec (the child gets its end through dup2, which clears the flag).
private struct PipeEnds {
    let read: Int32
    let write: Int32

    init() throws {
        var ends: [Int32] = [-1, -1]
        guard pipe(&ends) == 0 else {
            throw SupportError("pipe: \(String(cString: strerror(errno)))")
        }
        // For programs the test process starts otherwise (system()); children started here close every descriptor
        // from 3 on anyway, so a spawn between pipe and here does not matter.
        for end in ends { _ = fcntl(end, F_SETFD, FD_CLOEXEC) }
        read = ends[0]
        write = ends[1]
    }

    func closeRead() { close(read) }
    func closeWrite() { close(write) }
    func closeBoth() { closeRead(); closeWrite() }
}

/// Everything `fd` yields until end of file.
private func readToEnd(_ fd: Int32) -> Data {
    var data = Data()
    var buffer = [UInt8](repeating: 0, count: 65_536)
    while true {
        let count = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        if count > 0 {
            data.append(contentsOf: buffer[..<count])
        } else if count == 0 || errno != EINTR {
            return data
        }
    }
}

/// Writes `data` to `fd`, stopping early if the reader has gone (EPIPE; SIGPIPE is ignored in the test process).
private func writeAll(_ data: Data, to fd: Int32) {
    var bytes = [UInt8](data)[...]
    while !bytes.isEmpty {
        let count = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        if count > 0 {
            bytes = bytes.dropFirst(count)
        } else if count < 0 && errno != EINTR {
            return
        }
    }
}

// MARK: - /proc

/// One process's /proc/PID/stat: "pid (comm) state ppid pgrp ...", where comm may hold spaces and parentheses.
struct ProcessStat {
    /// "R", "S", "T" (stopped), "Z" (exited, not reaped), ...
    let state: Character
    let parent: pid_t
    let group: pid_t

    /// nil when there is no such process (any more).
    init?(_ pid: pid_t) {
        guard let text = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
              let close = text.lastIndex(of: ")") else { return nil }
        let fields = text[text.index(after: close)...].split(separator: " ")
        guard fields.count > 2, let state = fields[0].first, let parent = pid_t(fields[1]), let group = pid_t(fields[2])
        else { return nil }
        self.state = state
        self.parent = parent
        self.group = group
    }

    /// Running or able to run: not a zombie, not dead.
    var isAlive: Bool { state != "Z" && state != "X" }

    /// Every process there is now.
    static func all() -> [pid_t: ProcessStat] {
        let entries = (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []
        var stats: [pid_t: ProcessStat] = [:]
        for pid in entries.compactMap(pid_t.init) {
            stats[pid] = ProcessStat(pid)
        }
        return stats
    }
}

/// The processes whose parent chain leads to `pid` (children first).
func descendants(of pid: pid_t) -> [pid_t] {
    let parents = ProcessStat.all().mapValues(\.parent)
    var found: [pid_t] = []
    var frontier: Set<pid_t> = [pid]
    while !frontier.isEmpty {
        let next = parents.filter { frontier.contains($0.value) }.map(\.key).filter { !found.contains($0) }
        found += next
        frontier = Set(next)
    }
    return found
}

/// Processes of process group `group` that have not exited (zombies excluded).
func processesAlive(inGroup group: pid_t) -> [pid_t] {
    ProcessStat.all().filter { $0.value.group == group && $0.value.isAlive }.map(\.key)
}

func isAlive(_ pid: pid_t) -> Bool {
    ProcessStat(pid)?.isAlive ?? false
}

// MARK: - Compiling C

/// A program or shared object the tests compiled, and what cc warned about (empty when warning-free).
struct CompiledC {
    let path: String
    let warnings: String
}

/// The one C build of the tests: `cc -O2 -Wall -Wextra` with p11-kit's PKCS#11 header, linked with libdl and
/// libpthread (the command of Tests/FaultModule/README.md for a shared object). Throws when cc fails.
func compileC(_ source: String, to output: String, sharedObject: Bool = false) throws -> CompiledC {
    let flags = try p11kitCFlags.get()
    let arguments = (sharedObject ? ["-shared", "-fPIC"] : []) + ["-O2", "-Wall", "-Wextra"] + flags
        + ["-o", output, source, "-ldl", "-lpthread"]
    let compiled = try runProcess("cc", arguments)
    guard compiled.status == 0, FileManager.default.fileExists(atPath: output) else {
        throw SupportError("cc \(source) failed (status \(compiled.status)):\n\(compiled.output)")
    }
    return CompiledC(path: output, warnings: compiled.stderr)
}

/// Compiles Examples/c/NAME.c into `dir`.
func buildCExample(_ name: String, into dir: String) throws -> CompiledC {
    try compileC(Paths.packageRoot + "/Examples/c/\(name).c", to: dir + "/" + name)
}

/// `pkg-config --cflags p11-kit-1`, asked once per test process.
private let p11kitCFlags: Result<[String], any Error> = Result {
    let flags = try runProcess("pkg-config", ["--cflags", "p11-kit-1"])
    guard flags.status == 0 else {
        throw SupportError("pkg-config --cflags p11-kit-1 failed (run scripts/install-deps):\n\(flags.output)")
    }
    return flags.stdout.split(whereSeparator: \.isWhitespace).map(String.init)
}

// MARK: - Private

/// The command line for messages, with PINs blanked.
private func describe(_ executable: String, _ arguments: [String]) -> String {
    var shown = [executable]
    var hideNext = false
    for argument in arguments {
        if hideNext {
            shown.append("***")
            hideNext = false
            continue
        }
        hideNext = ["--pin", "--so-pin", "--new-pin", "-p"].contains(argument)
        shown.append(
            argument.replacingOccurrences(
                of: "pin-value=[^;&?]*", with: "pin-value=***", options: .regularExpression))
    }
    return shown.joined(separator: " ")
}

/// Output collected on a reader thread.
private final class Collected: @unchecked Sendable {
    private let lock = NSLock()
    private var data = Data()

    func set(_ data: Data) { lock.withLock { self.data = data } }
    var text: String { lock.withLock { String(decoding: data, as: UTF8.self) } }
}
