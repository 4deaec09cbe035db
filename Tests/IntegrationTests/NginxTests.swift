// nginx on loopback serving TLS with its key in a group, through OpenSSL's pkcs11 engine and libp11ha.so.
import Foundation
import Testing

@Suite("nginx serves TLS with its key in a group")
struct NginxTests {
    @Test("nginx serves TLS on loopback with its private key in a group of three members, with worker processes")
    func servesTLS() throws {
        let members = try Members(count: 3, group: "ha-nginx")
        let generated = try PKCS11Tool(module: Paths.debugModule, token: members.group, members: members)(
            ["--keypairgen", "--key-type", "EC:prime256v1", "--id", "01", "--label", "nginx-key"], login: true)
        try #require(generated.status == 0, "generating nginx-key failed:\n\(generated.output)")
        let site = try NginxSite(members: members, keyLabel: "nginx-key")

        let nginx = try site.start()
        defer { nginx.stop() }
        try nginx.waitUntilAccepting(seconds: 30)
        #expect(nginx.pidFromFile == nginx.pid, "nginx.pid does not name the master \(nginx.pid)")
        // Four clients at once, 50 requests each, a new connection and a full handshake (a signature) for each.
        let batches = try site.requestBatches(clients: 4, requestsEach: 50)
        let stopped = nginx.stop()

        let statuses = batches.flatMap { $0.stdout.split(separator: "\n").filter { $0.hasPrefix("status=") } }
        let failed = statuses.filter { $0 != "status=200" }.count + (200 - statuses.count)
        #expect(failed == 0, "\(failed) of 200 requests failed:\n\(batches.map(\.stderr).joined())\n\(site.logs)")
        let served = site.accessLog
        #expect(served.count == statuses.filter { $0 == "status=200" }.count, "access log:\n\(served)")
        // Resumed sessions would skip the key: every request must have made nginx sign.
        #expect(served.allSatisfy { $0.sessionReused == "." }, "sessions were resumed:\n\(served)")
        let workers = Set(served.map(\.pid))
        #expect(workers.count > 1, "one worker served everything (\(workers)):\n\(site.logs)")
        #expect(!workers.contains(nginx.pid), "the master served requests itself")
        #expect(stopped, "nginx did not quit within 20 s of SIGQUIT and was killed")
        let left = processesAlive(inGroup: nginx.pid) + workers.filter(isAlive)
        #expect(left.isEmpty, "still running after nginx quit: \(left)")
    }
}

extension NginxTests {
    @Test("nginx keeps serving, with zero failed requests, while a member's process is killed and later restarted")
    func survivesMemberFailure() throws {
        let members = try Members(count: 3, group: "ha-nginx-fo")
        // Keys are generated through the members' module (p11-kit 0.24's remote protocol cannot carry them).
        let generated = try PKCS11Tool(module: Paths.debugModule, token: members.group, members: members)(
            ["--keypairgen", "--key-type", "EC:prime256v1", "--id", "01", "--label", "nginx-key"], login: true)
        try #require(generated.status == 0, "generating nginx-key failed:\n\(generated.output)")
        let site = try NginxSite(members: members, keyLabel: "nginx-key")
        let servers = try MemberServers(members, extraGlobal: ["operation-timeout = 1s", "recovery-interval = 300ms"])
        defer { servers.stopAll() }
        // The workers (nobody, when the test runs as root) must reach the servers' sockets.
        let openSockets = { for label in members.tokenLabels { chmod(servers.socketPath(label), 0o666) } }
        openSockets()

        let nginx = try site.start()
        defer { nginx.stop() }
        try nginx.waitUntilAccepting(seconds: 30)
        // Requests go on, batch after batch, from before the kill until well after the restart.
        let started = Date()
        let requests = DispatchGroup()
        let outcome = Outcomes()
        requests.enter()
        DispatchQueue.global().async {
            while Date().timeIntervalSince(started) < 7 {
                outcome.add(Result { try site.requestBatches(clients: 3, requestsEach: 50) }.map { batches in
                    ProcessResult(status: batches.map(\.status).max() ?? 0, stdout: batches.map(\.stdout).joined(),
                                  stderr: batches.map(\.stderr).joined())
                })
            }
            requests.leave()
        }
        usleep(1_000_000)
        try servers.kill("member-b")
        usleep(2_000_000)
        try servers.restart("member-b")
        openSockets()
        requests.wait()
        _ = nginx.stop()

        let results = try outcome.all.map { try $0.get() }
        let expected = results.count * 150
        let statuses = results.flatMap { $0.stdout.split(separator: "\n").filter { $0.hasPrefix("status=") } }
        let failed = statuses.filter { $0 != "status=200" }.count + (expected - statuses.count)
        #expect(expected >= 600, "the request stream spanned the failure: \(expected) requests")
        #expect(failed == 0, "\(failed) of \(expected) requests failed:\n\(results.map(\.stderr).joined())\n\(site.logs)")
        #expect(Set(site.accessLog.map(\.pid)).count > 1, "more than one worker served")
        let log = (try? String(contentsOfFile: servers.log, encoding: .utf8)) ?? ""
        #expect(log.contains("member-failed") && log.contains("member-b"), "member-b's death was seen:\n\(log)")
        #expect(log.contains("member-recovered"), "member-b came back while nginx served:\n\(log)")
    }
}

/// An nginx site in a Members directory: the engine's openssl.cnf, the PIN file, a certificate made through the
/// engine, and Examples/nginx/nginx.conf filled in.
private struct NginxSite: @unchecked Sendable {
    let members: Members
    let dir: String
    let port: Int
    let environment: [String: String]
    var certificate: String { dir + "/cert.pem" }
    var config: String { dir + "/nginx.conf" }

    init(members: Members, keyLabel: String) throws {
        self.members = members
        dir = members.dir + "/nginx"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let opensslConfig = dir + "/openssl.cnf"
        try String(contentsOfFile: Paths.packageRoot + "/Examples/openssl/openssl.cnf", encoding: .utf8)
            .replacingOccurrences(of: "@ENGINE_PATH@", with: Paths.opensslPKCS11Engine)
            .replacingOccurrences(of: "@MODULE_PATH@", with: Paths.debugModule)
            .write(toFile: opensslConfig, atomically: true, encoding: .utf8)
        let pinFile = dir + "/user.pin"
        try #require(FileManager.default.createFile(
            atPath: pinFile, contents: Data(members.userPIN.utf8), attributes: [.posixPermissions: 0o600]))
        var environment = members.environment
        environment["OPENSSL_CONF"] = opensslConfig
        self.environment = environment

        let keyURI = "pkcs11:token=\(members.group);object=\(keyLabel);type=private;pin-source=file:\(pinFile)"
        let certified = try runProcess(
            "openssl",
            ["req", "-new", "-x509", "-engine", "pkcs11", "-keyform", "engine", "-key", keyURI, "-subj", "/CN=localhost",
             "-addext", "subjectAltName=DNS:localhost", "-days", "2", "-out", dir + "/cert.pem"],
            environment: environment)
        try #require(certified.status == 0, "openssl req through the engine failed:\n\(certified.output)")

        // Started as root, nginx runs its workers as nobody unless told otherwise: they get the tokens, p11ha's
        // log and the PIN file, as a real deployment gives them to www-data.
        let workerUser: String
        if geteuid() == 0 {
            let handedOver = try runProcess("chown", ["-R", "nobody:nogroup", members.dir])
            try #require(handedOver.status == 0, "chown failed:\n\(handedOver.output)")
            workerUser = "nobody nogroup"
        } else {
            workerUser = String(cString: getpwuid(geteuid()).pointee.pw_name)
        }
        port = try freeLoopbackPort()
        try String(contentsOfFile: Paths.packageRoot + "/Examples/nginx/nginx.conf", encoding: .utf8)
            .replacingOccurrences(of: "@DIR@", with: dir)
            .replacingOccurrences(of: "@USER@", with: workerUser)
            .replacingOccurrences(of: "@PORT@", with: String(port))
            .replacingOccurrences(of: "@CERT@", with: dir + "/cert.pem")
            .replacingOccurrences(of: "@KEY_URI@", with: keyURI)
            // A failed handshake is logged at level info only.
            .replacingOccurrences(of: "error.log notice;", with: "error.log info;")
            .write(toFile: dir + "/nginx.conf", atomically: true, encoding: .utf8)
    }

    func start() throws -> NginxProcess {
        try NginxProcess(config: config, dir: dir, port: port, environment: environment)
    }

    /// `clients` curl processes at once, each fetching the page `requestsEach` times on a new connection.
    func requestBatches(clients: Int, requestsEach: Int) throws -> [ProcessResult] {
        let url = "https://localhost:\(port)/"
        let arguments = ["-sS", "--max-time", "20", "--cacert", certificate, "--resolve", "localhost:\(port):127.0.0.1",
                         "-H", "Connection: close", "-w", "status=%{http_code}\\n"]
            + Array(repeating: url, count: requestsEach)
        let results = Outcomes()
        DispatchQueue.concurrentPerform(iterations: clients) { _ in
            results.add(Result { try runProcess("curl", arguments, timeout: 300) })
        }
        return try results.all.map { try $0.get() }
    }

    struct Served: CustomStringConvertible {
        let pid: pid_t
        let sessionReused: String
        let line: String
        var description: String { line }
    }

    /// The access log's requests (log_format workers: ... $status $pid, then $ssl_session_reused here).
    var accessLog: [Served] {
        let text = (try? String(contentsOfFile: dir + "/access.log", encoding: .utf8)) ?? ""
        return text.split(separator: "\n").compactMap { line in
            let words = line.split(separator: " ")
            guard words.count >= 2, let pid = pid_t(words[words.count - 2]) else { return nil }
            return Served(pid: pid, sessionReused: String(words[words.count - 1]), line: String(line))
        }
    }

    /// nginx's error log and p11ha's log, for failure messages.
    var logs: String {
        let error = (try? String(contentsOfFile: dir + "/error.log", encoding: .utf8)) ?? ""
        let p11ha = (try? String(contentsOfFile: members.dir + "/p11ha.log", encoding: .utf8)) ?? ""
        return "nginx error.log:\n\(error.suffix(4000))\np11ha.log:\n\(p11ha.suffix(4000))"
    }
}

/// nginx's master process (daemon off), started with Process; its workers are in its process group.
private final class NginxProcess: @unchecked Sendable {
    let pid: pid_t
    let dir: String
    let port: Int
    private let process: Process
    private let exited = DispatchSemaphore(value: 0)
    private let lock = NSLock()
    /// Guarded by `lock`: set once stop() has run.
    private var stoppedCleanly: Bool?

    init(config: String, dir: String, port: Int, environment: [String: String]) throws {
        self.dir = dir
        self.port = port
        let nginx = ["/usr/sbin/nginx", "/usr/local/sbin/nginx"].first { FileManager.default.isExecutableFile(atPath: $0) }
        process = Process()
        process.executableURL = URL(fileURLWithPath: try #require(nginx, "nginx is not installed (scripts/install-deps)"))
        // Names the site's own prefix so that nginx opens nothing of the system's installation.
        process.arguments = ["-c", config, "-p", dir + "/"]
        process.environment = environment
        process.standardInput = FileHandle.nullDevice
        for name in ["stdout", "stderr"] {
            _ = FileManager.default.createFile(atPath: dir + "/nginx.\(name)", contents: nil)
        }
        process.standardOutput = FileHandle(forWritingAtPath: dir + "/nginx.stdout")
        process.standardError = FileHandle(forWritingAtPath: dir + "/nginx.stderr")
        process.terminationHandler = { [exited] _ in exited.signal() }
        try process.run()
        pid = process.processIdentifier
    }

    deinit {
        stop()
    }

    /// Waits until the port accepts connections (the master has loaded the key by then).
    func waitUntilAccepting(seconds: Double) throws {
        let deadline = Date().addingTimeInterval(seconds)
        while Date() < deadline {
            guard process.isRunning else {
                throw SupportError("nginx exited with status \(process.terminationStatus):\n\(startupOutput)")
            }
            if canConnect(toLoopbackPort: port) { return }
            Thread.sleep(forTimeInterval: 0.1)
        }
        throw SupportError("nginx did not accept connections on port \(port) within \(seconds) s:\n\(startupOutput)")
    }

    /// The PID in nginx's pid file.
    var pidFromFile: pid_t? {
        (try? String(contentsOfFile: dir + "/nginx.pid", encoding: .utf8))
            .flatMap { pid_t($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
    }

    /// SIGQUIT to the master (graceful: the workers finish, then the master exits); SIGKILL to the whole process
    /// group if that takes more than 20 s. Returns whether it quit in time.
    @discardableResult
    func stop() -> Bool {
        lock.lock()
        defer { lock.unlock() }
        if let stoppedCleanly { return stoppedCleanly }
        kill(pid, SIGQUIT)
        var clean = exited.wait(timeout: .now() + 20) == .success
        if !clean {
            kill(-pid, SIGKILL)
            _ = exited.wait(timeout: .now() + 5)
        }
        // Workers left behind by a master that died first are still in its process group.
        if !processesAlive(inGroup: pid).isEmpty {
            kill(-pid, SIGKILL)
            clean = false
        }
        stoppedCleanly = clean
        return clean
    }

    private var startupOutput: String {
        ["nginx.stderr", "error.log"].map { name in
            "\(name): " + ((try? String(contentsOfFile: dir + "/" + name, encoding: .utf8)) ?? "")
        }.joined(separator: "\n")
    }
}

/// Results collected from concurrent threads.
private final class Outcomes: @unchecked Sendable {
    private let lock = NSLock()
    private var results: [Result<ProcessResult, Error>] = []

    func add(_ result: Result<ProcessResult, Error>) { lock.withLock { results.append(result) } }
    var all: [Result<ProcessResult, Error>] { lock.withLock { results } }
}

/// A port on 127.0.0.1 that was free a moment ago: bound with port 0, read back, closed.
private func freeLoopbackPort() throws -> Int {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    guard fd >= 0 else { throw SupportError("socket failed: errno \(errno)") }
    defer { close(fd) }
    var address = loopbackAddress(port: 0)
    var length = socklen_t(MemoryLayout<sockaddr_in>.size)
    let bound = withUnsafeMutablePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) == 0 && getsockname(fd, $0, &length) == 0 }
    }
    guard bound else { throw SupportError("bind to 127.0.0.1:0 failed: errno \(errno)") }
    return Int(UInt16(bigEndian: address.sin_port))
}

private func canConnect(toLoopbackPort port: Int) -> Bool {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    guard fd >= 0 else { return false }
    defer { close(fd) }
    var address = loopbackAddress(port: port)
    return withUnsafePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) == 0 }
    }
}

private func loopbackAddress(port: Int) -> sockaddr_in {
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_port = UInt16(port).bigEndian
    address.sin_addr.s_addr = UInt32(0x7f00_0001).bigEndian
    return address
}

/// Processes of process group `group` that have not exited (zombies excluded), from /proc.
private func processesAlive(inGroup group: pid_t) -> [pid_t] {
    let entries = (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []
    return entries.compactMap(pid_t.init).filter { pid in
        guard let stat = processStat(pid) else { return false }
        return stat.group == group && stat.state != "Z" && stat.state != "X"
    }
}

private func isAlive(_ pid: pid_t) -> Bool {
    guard let stat = processStat(pid) else { return false }
    return stat.state != "Z" && stat.state != "X"
}

/// State and process group from /proc/PID/stat ("pid (comm) state ppid pgrp ..."; comm may hold spaces).
private func processStat(_ pid: pid_t) -> (state: String, group: pid_t)? {
    guard let text = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
          let close = text.lastIndex(of: ")")
    else { return nil }
    let fields = text[text.index(after: close)...].split(separator: " ")
    guard fields.count > 2, let group = pid_t(fields[2]) else { return nil }
    return (String(fields[0]), group)
}
