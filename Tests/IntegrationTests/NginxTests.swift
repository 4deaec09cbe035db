// nginx on loopback serving TLS with its key in a group, through OpenSSL's pkcs11 engine and libp11ha.so.
import Foundation
import Testing

@Suite("nginx serves TLS with its key in a group")
struct NginxTests {
    @Test("nginx serves TLS on loopback with its private key in a group of three members, with worker processes")
    func servesTLS() throws {
        let site = try NginxSite.withKey(group: "ha-nginx")

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
        // The key is generated before the servers start (p11-kit 0.24's remote protocol cannot carry generated keys).
        let site = try NginxSite.withKey(group: "ha-nginx-fo")
        let members = site.members
        let servers = try MemberServers(members, extraGlobal: ["operation-timeout = 1s", "recovery-interval = 300ms"])
        defer { servers.stopAll() }
        // The workers (nobody, when the test runs as root) must reach the servers' sockets.
        let openSockets = { for label in members.tokenLabels { chmod(servers.socketPath(label), 0o666) } }
        openSockets()

        let nginx = try site.start()
        defer { nginx.stop() }
        try nginx.waitUntilAccepting(seconds: 30)
        // Requests go on, batch after batch, for 7 s on purpose: from before the kill until well after the restart.
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
        try waitUntil("nginx serves requests before member-b's server is killed:\n\(site.logs)", timeout: 10) {
            !site.accessLog.isEmpty
        }
        try servers.kill("member-b")
        try servers.waitForEvent("member-failed", member: "member-b")
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
        let log = members.log
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

    /// A site of its own group of three members, with its key "nginx-key" generated through the group.
    static func withKey(group: String) throws -> NginxSite {
        let members = try Members(count: 3, group: group)
        let generated = try PKCS11Tool(module: Paths.debugModule, token: members.group, members: members)(
            ["--keypairgen", "--key-type", "EC:prime256v1", "--id", "01", "--label", "nginx-key"], login: true)
        try #require(generated.status == 0, "generating nginx-key failed:\n\(generated.output)")
        return try NginxSite(members: members, keyLabel: "nginx-key")
    }

    init(members: Members, keyLabel: String) throws {
        self.members = members
        dir = members.dir + "/nginx"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let opensslConfig = dir + "/openssl.cnf"
        try writeOpenSSLConfig(module: Paths.debugModule, to: opensslConfig)
        let pinFile = dir + "/user.pin"
        try writeSecret(members.userPIN, to: pinFile)
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
            // The master (root) and its workers coordinate through one directory, shared as README says.
            try members.shareLockDirectory(members.dir + "/locks", withGroup: "nogroup")
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
        let p11ha = members.log
        return "nginx error.log:\n\(error.suffix(4000))\np11ha.log:\n\(p11ha.suffix(4000))"
    }
}

/// nginx's master process (daemon off); its workers are in its process group.
private final class NginxProcess: @unchecked Sendable {
    let dir: String
    let port: Int
    private let process: Started
    private let lock = NSLock()
    /// Guarded by `lock`: set once stop() has run.
    private var stoppedCleanly: Bool?

    init(config: String, dir: String, port: Int, environment: [String: String]) throws {
        self.dir = dir
        self.port = port
        let nginx = try Paths.executable("nginx", searchPath: "/usr/sbin:/usr/local/sbin")
        // Names the site's own prefix so that nginx opens nothing of the system's installation.
        process = try Started(nginx, ["-c", config, "-p", dir + "/"], environment: environment,
                              output: dir + "/nginx.stdout", errors: dir + "/nginx.stderr")
    }

    deinit {
        stop()
    }

    var pid: pid_t { process.pid }

    /// Waits until the port accepts connections (the master has loaded the key by then).
    func waitUntilAccepting(seconds: Double) throws {
        try waitUntil("nginx accepts connections on port \(port):\n\(startupOutput)", timeout: seconds) {
            guard process.isRunning else {
                let status = process.wait(seconds: 5).map { String($0.status) } ?? "unknown"
                throw SupportError("nginx exited with status \(status):\n\(startupOutput)")
            }
            return canConnect(toLoopbackPort: port)
        }
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
        var clean = process.wait(seconds: 20) != nil
        if !clean {
            kill(-pid, SIGKILL)
            _ = process.wait(seconds: 5)
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
