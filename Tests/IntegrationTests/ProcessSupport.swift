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

    // A child that exits without reading its input must not kill the test process with SIGPIPE.
    signal(SIGPIPE, SIG_IGN)

    let process = Process()
    process.executableURL = URL(fileURLWithPath: path)
    process.arguments = arguments
    process.environment = environment
    let outPipe = Pipe()
    let errPipe = Pipe()
    process.standardOutput = outPipe
    process.standardError = errPipe
    let inPipe: Pipe? = stdin == nil ? nil : Pipe()
    process.standardInput = inPipe ?? FileHandle.nullDevice

    let exited = DispatchSemaphore(value: 0)
    process.terminationHandler = { _ in exited.signal() }
    try process.run()

    // Drain both pipes while the child runs so that neither fills up and blocks it.
    let readers = DispatchGroup()
    let out = Collected()
    let err = Collected()
    for (handle, sink) in [(outPipe.fileHandleForReading, out), (errPipe.fileHandleForReading, err)] {
        let reader = UncheckedBox(handle)
        DispatchQueue.global().async(group: readers) {
            sink.set(reader.value.readDataToEndOfFile())
        }
    }
    if let inPipe, let stdin {
        let writer = UncheckedBox(inPipe.fileHandleForWriting)
        DispatchQueue.global().async {
            try? writer.value.write(contentsOf: stdin)
            try? writer.value.close()
        }
    }

    if exited.wait(timeout: .now() + seconds) == .timedOut {
        // Foundation starts the child as a process group leader: end the whole group, grandchildren too.
        let group = -process.processIdentifier
        kill(group, SIGTERM)
        if exited.wait(timeout: .now() + 2) == .timedOut {
            kill(group, SIGKILL)
            _ = exited.wait(timeout: .now() + 5)
        }
        // A grandchild may still hold the pipes open: do not wait for the readers forever.
        _ = readers.wait(timeout: .now() + 2)
        throw SupportError(
            "\(shown) did not finish within \(seconds) s and was killed\nstdout: \(out.text)\nstderr: \(err.text)")
    }
    if readers.wait(timeout: .now() + 10) == .timedOut {
        throw SupportError("\(shown) exited but its output stayed open (a child process still holds it)")
    }

    let status: Int32 =
        process.terminationReason == .uncaughtSignal
        ? 128 + process.terminationStatus : process.terminationStatus
    return ProcessResult(status: status, stdout: out.text, stderr: err.text)
}

/// A process started in the background, its output going to files.
final class Started: @unchecked Sendable {
    let pid: pid_t
    let outputPath: String
    let errorPath: String
    private let process: Process
    private let exited = DispatchSemaphore(value: 0)
    private let lock = NSLock()
    /// Guarded by `lock`.
    private var status: Int32?

    init(_ executable: String, _ arguments: [String], environment: [String: String],
         output: String, errors: String) throws {
        // A child that dies holding the other end of a pipe must not kill the test process with SIGPIPE.
        signal(SIGPIPE, SIG_IGN)
        let path = try Paths.executable(executable, searchPath: environment["PATH"])
        outputPath = output
        errorPath = errors
        for file in [output, errors] {
            guard FileManager.default.createFile(atPath: file, contents: nil) else {
                throw SupportError("cannot create \(file)")
            }
        }
        process = Process()
        process.executableURL = URL(fileURLWithPath: path)
        process.arguments = arguments
        process.environment = environment
        process.standardInput = FileHandle.nullDevice
        process.standardOutput = FileHandle(forWritingAtPath: output)
        process.standardError = FileHandle(forWritingAtPath: errors)
        process.terminationHandler = { [exited] _ in exited.signal() }
        try process.run()
        pid = process.processIdentifier
    }

    var isRunning: Bool { lock.withLock { status == nil } && process.isRunning }

    /// What it wrote so far.
    var output: String { (try? String(contentsOfFile: outputPath, encoding: .utf8)) ?? "" }
    var errorOutput: String { (try? String(contentsOfFile: errorPath, encoding: .utf8)) ?? "" }

    /// Waits for the exit; nil if it is still running after `seconds`. Killed by signal N, the status is 128 + N.
    func wait(seconds: Double) -> ProcessResult? {
        let deadline = Date().addingTimeInterval(seconds)
        var zombieSince: Date?
        while lock.withLock({ status == nil }) {
            if exited.wait(timeout: .now() + 0.1) == .success {
                exited.signal()  // for any other waiter
                let code = process.terminationReason == .uncaughtSignal
                    ? 128 + process.terminationStatus : process.terminationStatus
                lock.withLock { status = code }
                break
            }
            // Foundation sometimes never notices a child's death (seen with a child killed by SIGSEGV): a zombie
            // left for a second is reaped here, so that a crash is reported as one and not as a hang.
            if ProcessStat(pid)?.state == "Z" {
                let since = zombieSince ?? Date()
                zombieSince = since
                var raw: Int32 = 0
                if Date().timeIntervalSince(since) > 1, waitpid(pid, &raw, WNOHANG) == pid {
                    let signal = raw & 0x7f
                    let code = signal == 0 ? (raw >> 8) & 0xff : 128 + signal
                    lock.withLock { status = code }
                    break
                }
            }
            if Date() >= deadline { return nil }
        }
        return lock.withLock { status }.map { ProcessResult(status: $0, stdout: output, stderr: errorOutput) }
    }

    /// SIGKILL to the process and everything it started (found before the process dies and its children are
    /// reparented), then waits for it to be reaped.
    func killTree() {
        guard lock.withLock({ status == nil }) else { return }
        let children = descendants(of: pid)
        // Foundation starts a child as the leader of its own process group, which its children join.
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

/// Hands a FileHandle to the one reader or writer thread that uses it.
private struct UncheckedBox<Value>: @unchecked Sendable {
    let value: Value
    init(_ value: Value) { self.value = value }
}
