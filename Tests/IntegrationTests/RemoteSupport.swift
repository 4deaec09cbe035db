// Test support for process faults: each member token served by its own `p11-kit server`, killed, frozen and restarted;
// a socket that never answers; reading sign_loop's reports and p11ha's log while they are written.
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

    /// p11ha's log file.
    var log: String { members.logPath }

    func socketPath(_ label: String) -> String { members.dir + "/\(label).sock" }

    /// The p11ha.conf text: the group of `members`, every member reached through its server's socket.
    func remoteConfig(extraGlobal: [String] = []) -> String {
        var lines = ["[p11ha]", "log = \(log)"] + (members.lockDirectory.map { ["lock-dir = \($0)"] } ?? []) + extraGlobal
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
        do {
            try waitUntil("p11-kit server for \(label) makes its socket \(socket)", timeout: 10) {
                guard server.isRunning else {
                    throw SupportError("p11-kit server for \(label) exited before its socket appeared: \(server.errorOutput)")
                }
                return FileManager.default.fileExists(atPath: socket)
            }
        } catch {
            server.killTree()
            throw error
        }
        lock.withLock { servers[label] = server }
    }
}

// MARK: - Programs and keys for the process-fault tests

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

/// The numbers of a "served=a,b,c" field of one of sign_loop's report lines; nil unless every one is a number.
func servedCounts(inLine line: Substring) -> [Int]? {
    guard let field = line.split(separator: " ").last(where: { $0.hasPrefix("served=") }) else { return nil }
    let numbers = field.dropFirst("served=".count).split(separator: ",", omittingEmptySubsequences: false)
    let counts = numbers.compactMap { Int($0) }
    return counts.count == numbers.count && !counts.isEmpty ? counts : nil
}

/// The numbers of the last "served=a,b,c" in sign_loop's output, or nil if there is none.
func lastServedCounts(in output: String) -> [Int]? {
    output.split(separator: "\n").last { $0.split(separator: " ").contains { $0.hasPrefix("served=") } }
        .flatMap(servedCounts(inLine:))
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

// MARK: - Waiting on a running workload and on p11ha's log

extension MemberServers {
    /// A group of three members holding an EC P-256 key pair "K" (ID 01), then served by p11-kit servers. The
    /// key is made through the members' module first: p11-kit 0.24's remote protocol cannot carry generated keys.
    static func withKeyPair(extraGlobal: [String]) throws -> MemberServers {
        let members = try Members()
        let generated = try generateKeyPair(members, label: "K", id: "01")
        guard generated.status == 0 else {
            throw SupportError("generating a key pair through the group failed:\n\(generated.output)")
        }
        return try MemberServers(members, extraGlobal: extraGlobal)
    }

    /// Compiles Examples/c/sign_loop.c and starts it on the group's key "K": `threads` threads sign for `seconds`.
    func startSignLoop(seconds: Int, threads: Int) throws -> Started {
        let signLoop = try buildCExample("sign_loop", into: members.dir).path
        return try start(signLoop, [Paths.debugModule, members.group, members.userPIN, "K", String(seconds), String(threads)],
                         environment: members.environment, name: "sign_loop")
    }

    /// Waits until p11ha's log holds more than `count` lines of `event` (member-failed, member-recovered, ...)
    /// for `token`, written by any process of the group.
    func waitForEvent(_ event: String, member token: String, beyond count: Int = 0, timeout: Double = 10) throws {
        try waitUntil("p11ha.log has \(event) for \(token):\n\(logExcerpt(self))", timeout: timeout) {
            logLines(log, event: event, token: token).count > count
        }
    }
}

/// Waits until sign_loop, running in the background, has reported signatures.
func waitForSignatures(_ workload: Started, timeout: Double = 10) throws {
    try waitUntil("sign_loop reports signatures:\n\(workload.output)", timeout: timeout) {
        guard workload.isRunning else { throw SupportError("sign_loop exited early:\n\(workload.output)\(workload.errorOutput)") }
        return reportLines(workload.output).contains { (opsCount(inLine: $0) ?? 0) > 0 }
    }
}

/// Waits until sign_loop writes `count` more report lines (it writes one a second), so that the last one
/// counts what happened up to now.
func waitForReports(_ count: Int = 1, from workload: Started, timeout: Double = 10) throws {
    let seen = reportLines(workload.output).count
    try waitUntil("sign_loop writes \(count) more report line(s):\n\(workload.output)", timeout: timeout) {
        guard workload.isRunning else { throw SupportError("sign_loop exited early:\n\(workload.output)\(workload.errorOutput)") }
        return reportLines(workload.output).count >= seen + count
    }
}

// MARK: - A member that never answers

/// A unix socket that accepts connections and never reads from them nor answers: a member's server that hangs
/// before it says anything. Accepted connections stay open until `stop()` (or deinit).
final class SilentListener: @unchecked Sendable {
    let path: String
    private let listening: Int32
    private let state = AcceptState()

    init(path: String) throws {
        self.path = path
        if FileManager.default.fileExists(atPath: path) {
            try FileManager.default.removeItem(atPath: path)
        }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: address.sun_path) else {
            throw SupportError("socket path too long: \(path)")
        }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            raw.copyBytes(from: bytes)
            raw[bytes.count] = 0
        }
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw SupportError("socket failed: errno \(errno)") }
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard bound == 0, listen(fd, 64) == 0 else {
            let error = errno
            close(fd)
            throw SupportError("bind or listen on \(path) failed: errno \(error)")
        }
        listening = fd
        // The thread holds the state, not the listener, so that deinit can stop it.
        let state = self.state
        let thread = Thread { state.acceptForever(fd) }
        thread.name = "silent listener"
        thread.start()
    }

    deinit {
        stop()
    }

    /// How many connections were accepted so far.
    var connections: Int { state.connections }

    /// Stops accepting and closes every connection; safe to call more than once.
    func stop() {
        guard state.stop() else { return }
        close(listening)
        try? FileManager.default.removeItem(atPath: path)
    }
}

/// What SilentListener's accepting thread shares with it.
private final class AcceptState: @unchecked Sendable {
    private let lock = NSLock()
    /// Guarded by `lock`.
    private var stopping = false
    private var accepted: [Int32] = []
    private let finished = DispatchSemaphore(value: 0)

    var connections: Int { lock.withLock { accepted.count } }

    func acceptForever(_ listening: Int32) {
        defer { finished.signal() }
        while !lock.withLock({ stopping }) {
            var ready = pollfd(fd: listening, events: Int16(POLLIN), revents: 0)
            // Wakes every 50 ms to see whether stop() was called.
            guard poll(&ready, 1, 50) > 0 else { continue }
            let connection = accept(listening, nil, nil)
            if connection >= 0 {
                lock.withLock { accepted.append(connection) }
            }
        }
    }

    /// Ends the accepting thread and closes the accepted connections; false when that was done already.
    func stop() -> Bool {
        let first = lock.withLock { () -> Bool in
            defer { stopping = true }
            return !stopping
        }
        guard first else { return false }
        finished.wait()
        for fd in lock.withLock({ accepted }) {
            close(fd)
        }
        return true
    }
}
