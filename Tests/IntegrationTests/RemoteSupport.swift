// Test support for process faults: each member token served by its own `p11-kit server`, killed, frozen and restarted.
import Foundation

/// The member tokens of a `Members` directory, each served by its own `p11-kit server` process on a unix socket
/// in that directory, and a p11ha.conf that reaches them only through those sockets. Every process started
/// through this object (servers and `start`ed programs) is killed by `stopAll()` or, at the latest, by deinit.
final class MemberServers: @unchecked Sendable {
    let members: Members

    private let lock = NSLock()
    /// Guarded by `lock`: the server now serving each token, if any.
    private var servers: [String: Started] = [:]
    /// Guarded by `lock`: per-connection server children stopped with SIGSTOP, per token.
    private var frozen: [String: [pid_t]] = [:]
    /// Guarded by `lock`: every process started, so that nothing outlives the test.
    private var everything: [Started] = []

    /// Starts a server for every member token and rewrites p11ha.conf to use them. `extraGlobal` lines
    /// (such as "operation-timeout = 500ms") go into [p11ha] after `log = DIR/p11ha.log`.
    init(_ members: Members, extraGlobal: [String] = []) throws {
        self.members = members
        do {
            for label in members.tokenLabels {
                try start(label)
            }
            try members.rewriteConfig(remoteConfig(extraGlobal: extraGlobal))
        } catch {
            stopAll()
            throw error
        }
    }

    deinit {
        stopAll()
    }

    var log: String { members.dir + "/p11ha.log" }

    func socketPath(_ label: String) -> String { members.dir + "/\(label).sock" }

    /// The p11ha.conf text: the group of `members`, every member reached through its server's socket.
    func remoteConfig(extraGlobal: [String] = []) -> String {
        var lines = ["[p11ha]", "log = \(log)"] + extraGlobal
        lines += ["", "[group \(members.group)]", "label = \(members.group)"]
        lines += members.tokenLabels.map { "member = pkcs11:token=\($0) via unix:path=\(socketPath($0))" }
        return lines.joined(separator: "\n") + "\n"
    }

    /// SIGKILL to the server and its per-connection children: the token vanishes mid-call, as when a host dies.
    func kill(_ label: String) throws {
        guard let server = lock.withLock({ servers.removeValue(forKey: label) }) else {
            throw SupportError("no server of \(label) is running")
        }
        lock.withLock { frozen[label] = nil }
        server.killTree()
    }

    /// SIGSTOP to the server's per-connection children (what answers calls), so that calls hang unanswered.
    /// Returns the processes stopped; none when no client is connected.
    @discardableResult
    func freeze(_ label: String) throws -> [pid_t] {
        guard let server = lock.withLock({ servers[label] }) else { throw SupportError("no server of \(label) is running") }
        let children = descendants(of: server.pid)
        for child in children {
            Glibc.kill(child, SIGSTOP)
        }
        lock.withLock { frozen[label, default: []] += children }
        return children
    }

    /// SIGCONT to the processes `freeze` stopped.
    func thaw(_ label: String) {
        let children = lock.withLock { frozen.removeValue(forKey: label) ?? [] }
        for child in children {
            Glibc.kill(child, SIGCONT)
        }
    }

    /// A new server on the same socket path (the killed server's socket file is removed first).
    func restart(_ label: String) throws {
        if lock.withLock({ servers[label] }) != nil {
            try kill(label)
        }
        try start(label)
    }

    /// Kills every process started here, servers with their children; safe to call more than once.
    func stopAll() {
        let all = lock.withLock {
            let all = everything
            everything = []
            servers = [:]
            frozen = [:]
            return all
        }
        for process in all {
            process.killTree()
        }
    }

    /// Runs a program in the background with output to files in the members' directory; it is killed by
    /// stopAll if it is still running then.
    func start(_ executable: String, _ arguments: [String], environment: [String: String], name: String) throws -> Started {
        let started = try Started(executable, arguments, environment: environment,
                                  output: members.dir + "/\(name).out", errors: members.dir + "/\(name).err")
        lock.withLock { everything.append(started) }
        return started
    }

    private func start(_ label: String) throws {
        let socket = socketPath(label)
        if FileManager.default.fileExists(atPath: socket) {
            try FileManager.default.removeItem(atPath: socket)
        }
        // SoftHSM reads SOFTHSM2_CONF in the server; nothing of p11ha's is loaded there.
        let server = try start(
            "p11-kit",
            ["server", "-f", "-n", socket, "--provider", Paths.softhsmModule, "pkcs11:token=\(label)"],
            environment: members.environment, name: "server-\(label)")
        let deadline = Date().addingTimeInterval(10)
        while !FileManager.default.fileExists(atPath: socket) {
            guard server.isRunning else {
                throw SupportError("p11-kit server for \(label) exited before its socket appeared: \(server.errorOutput)")
            }
            guard Date() < deadline else {
                server.killTree()
                throw SupportError("p11-kit server for \(label) made no socket within 10 s")
            }
            usleep(20_000)
        }
        lock.withLock { servers[label] = server }
    }
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
        let path = try locate(executable, searchPath: environment["PATH"])
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
            if processState(pid) == "Z" {
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
        if processGroup(of: pid) == pid {
            Glibc.kill(-pid, SIGKILL)
        }
        Glibc.kill(pid, SIGKILL)
        for child in children {
            Glibc.kill(child, SIGKILL)
        }
        _ = wait(seconds: 10)
    }
}

/// The processes whose parent chain leads to `pid` (children first), from /proc/*/stat.
func descendants(of pid: pid_t) -> [pid_t] {
    var parents: [pid_t: pid_t] = [:]
    let entries = (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []
    for entry in entries {
        guard let child = pid_t(entry), let stat = procStat(child) else { continue }
        parents[child] = stat.parent
    }
    var found: [pid_t] = []
    var frontier: Set<pid_t> = [pid]
    while !frontier.isEmpty {
        let next = parents.filter { frontier.contains($0.value) }.map(\.key).filter { !found.contains($0) }
        found += next
        frontier = Set(next)
    }
    return found
}

private func processGroup(of pid: pid_t) -> pid_t? {
    procStat(pid)?.group
}

/// The state letter of /proc/PID/stat ("R", "S", "Z", ...), nil when there is no such process.
private func processState(_ pid: pid_t) -> Character? {
    guard let text = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
          let close = text.lastIndex(of: ")") else { return nil }
    return text[text.index(after: close)...].split(separator: " ").first?.first
}

/// Fields of /proc/PID/stat: "pid (comm) state ppid pgrp ...", where comm may hold spaces and parentheses.
private func procStat(_ pid: pid_t) -> (parent: pid_t, group: pid_t)? {
    guard let text = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
          let close = text.lastIndex(of: ")") else { return nil }
    let fields = text[text.index(after: close)...].split(separator: " ")
    guard fields.count > 2, let parent = pid_t(fields[1]), let group = pid_t(fields[2]) else { return nil }
    return (parent, group)
}

private func locate(_ name: String, searchPath: String?) throws -> String {
    if name.contains("/") { return name }
    for directory in (searchPath ?? "/usr/local/bin:/usr/bin:/bin").split(separator: ":") {
        let candidate = directory + "/" + name
        if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
    }
    throw SupportError("\(name) not found in PATH (run scripts/install-deps)")
}

// MARK: - Programs and keys for the process-fault tests

/// Compiles Examples/c/NAME.c into `dir` and returns the program's path.
func buildCExample(_ name: String, into dir: String) throws -> String {
    let source = Paths.packageRoot + "/Examples/c/\(name).c"
    let program = dir + "/" + name
    let flags = try runProcess("pkg-config", ["--cflags", "p11-kit-1"])
    guard flags.status == 0 else { throw SupportError("pkg-config p11-kit-1 failed:\n\(flags.output)") }
    let includes = flags.stdout.split(whereSeparator: \.isWhitespace).map(String.init)
    let compiled = try runProcess("cc", ["-Wall", "-Wextra", "-O2"] + includes + ["-o", program, source, "-ldl", "-lpthread"])
    guard compiled.status == 0 else { throw SupportError("cc \(name).c failed:\n\(compiled.output)") }
    return program
}

/// pkcs11-tool through p11ha (the group's one token), logged in.
func throughGroup(_ members: Members, _ arguments: [String], timeout: Double = 60,
                  environment: [String: String]? = nil) throws -> ProcessResult {
    try runProcess("pkcs11-tool", ["--module", Paths.debugModule, "--login", "--pin", members.userPIN] + arguments,
                   environment: environment ?? members.environment, timeout: timeout)
}

/// Generates an EC P-256 key pair through the group, as an application does.
func generateKeyPair(_ members: Members, label: String, id: String) throws -> ProcessResult {
    try throughGroup(members, ["--keypairgen", "--key-type", "EC:prime256v1", "--label", label, "--id", id])
}

/// An object as pkcs11-tool -O shows it.
struct TokenObject: Hashable, CustomStringConvertible {
    /// "private", "public", "secret", "data", or pkcs11-tool's own words for anything else.
    let kind: String
    let label: String
    let id: String
    var description: String { "\(kind) \(label) id=\(id)" }
}

/// The objects one member token holds, read from SoftHSM directly (not through p11ha); its server may be
/// serving the token meanwhile.
func objectsOnMember(_ members: Members, _ token: String) throws -> [TokenObject] {
    let listed = try runProcess(
        "pkcs11-tool",
        ["--module", Paths.softhsmModule, "--token-label", token, "--login", "--pin", members.userPIN, "-O"],
        environment: members.environment)
    guard listed.status == 0 else { throw SupportError("listing \(token) failed:\n\(listed.output)") }
    var objects: [TokenObject] = []
    var kind: String?
    var label = ""
    var id = ""
    func flush() {
        if let kind { objects.append(TokenObject(kind: kind, label: label, id: id)) }
    }
    for line in listed.stdout.split(separator: "\n") {
        if !line.hasPrefix(" ") {
            flush()
            kind = line.hasPrefix("Private Key Object") ? "private"
                : line.hasPrefix("Public Key Object") ? "public"
                : line.hasPrefix("Secret Key Object") ? "secret"
                : line.lowercased().hasPrefix("data object") ? "data"
                : line.contains("Object") ? String(line.prefix(while: { $0 != ";" })) : nil
            label = ""
            id = ""
            continue
        }
        let trimmed = line.trimmingCharacters(in: .whitespaces)
        if trimmed.hasPrefix("label:") {
            label = trimmed.dropFirst("label:".count).trimmingCharacters(in: .whitespaces)
        } else if trimmed.hasPrefix("ID:") {
            id = trimmed.dropFirst("ID:".count).trimmingCharacters(in: .whitespaces)
        }
    }
    flush()
    return objects
}

/// The numbers of a "served=a,b,c" field of one of sign_loop's report lines.
func servedCounts(inLine line: Substring) -> [Int]? {
    guard let field = line.split(separator: " ").first(where: { $0.hasPrefix("served=") }) else { return nil }
    let numbers = field.dropFirst("served=".count).split(separator: ",").compactMap { Int($0) }
    return numbers.isEmpty ? nil : numbers
}

/// A program's output for a failure message: stdout whole, stderr cut to its first and last lines (sign_loop
/// writes a line per failed call).
func shortOutput(_ result: ProcessResult, lines: Int = 20) -> String {
    let errors = result.stderr.split(separator: "\n", omittingEmptySubsequences: false)
    guard errors.count > 2 * lines else { return result.output }
    return result.stdout + errors.prefix(lines).joined(separator: "\n")
        + "\n... (\(errors.count - 2 * lines) more lines)\n" + errors.suffix(lines).joined(separator: "\n")
}

/// The number of an "ops=N" field of one of sign_loop's report lines.
func opsCount(inLine line: Substring) -> Int? {
    line.split(separator: " ").first { $0.hasPrefix("ops=") }.flatMap { Int($0.dropFirst("ops=".count)) }
}

/// sign_loop's report lines ("t=3s ops=... served=..."), in order.
func reportLines(_ output: String) -> [Substring] {
    output.split(separator: "\n").filter { $0.hasPrefix("t=") }
}

/// The p11ha log so far (its last 80 lines), for failure messages.
func logExcerpt(_ servers: MemberServers) -> String {
    let lines = ((try? String(contentsOfFile: servers.log, encoding: .utf8)) ?? "(none)").split(separator: "\n")
    return "p11ha.log\(lines.count > 80 ? " (last 80 lines)" : ""):\n" + lines.suffix(80).joined(separator: "\n")
}

/// Lines of the p11ha log with `event` that concern `token` (member names are "LABEL@ADDRESS").
func logLines(_ log: String, event: String, token: String) -> [Substring] {
    let text = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
    return text.split(separator: "\n").filter { $0.contains(" \(event) ") && $0.contains("member=\(token)@") }
}

/// Follows a log file as it grows: each call returns the lines written since the previous one.
final class LogFollower {
    private let path: String
    private var offset: UInt64 = 0
    private var partial = ""

    init(_ path: String) { self.path = path }

    func newLines() -> [String] {
        guard let handle = FileHandle(forReadingAtPath: path) else { return [] }
        defer { try? handle.close() }
        guard (try? handle.seek(toOffset: offset)) != nil, let data = try? handle.readToEnd(), !data.isEmpty else { return [] }
        offset += UInt64(data.count)
        var lines = (partial + String(decoding: data, as: UTF8.self)).split(separator: "\n", omittingEmptySubsequences: false)
            .map(String.init)
        partial = lines.removeLast()
        return lines
    }
}
