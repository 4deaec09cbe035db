// Test support: where things are, private SoftHSM member directories, waiting for a condition, and the clients
// the tests run (the scenario driver, p11hactl, pkcs11-tool, OpenSSL's engine configuration).
import Foundation
import Testing

enum Paths {
    /// The repository root, found from this file's place in it (Tests/IntegrationTests/Support.swift).
    static let packageRoot: String = {
        var url = URL(fileURLWithPath: #filePath)
        for _ in 0..<3 { url.deleteLastPathComponent() }
        return url.path
    }()
    static let debugModule = packageRoot + "/.build/debug/libp11ha.so"
    static let p11hactl = packageRoot + "/.build/debug/p11hactl"
    static let scenarioDriver = packageRoot + "/.build/debug/p11ha-scenario"
    static let makeMembers = packageRoot + "/scripts/make-members"
    static let softhsmModule = "/usr/lib/softhsm/libsofthsm2.so"
    /// OpenSC's call tracer, which passes every call on to the module named by PKCS11SPY.
    static let pkcs11Spy = "/usr/lib/x86_64-linux-gnu/pkcs11/pkcs11-spy.so"
    /// libengine-pkcs11-openssl's engine for OpenSSL 3.
    static let opensslPKCS11Engine = "/usr/lib/x86_64-linux-gnu/engines-3/pkcs11.so"

    /// The program to run for `name`: a path as it is, a bare name looked up in `searchPath` (a PATH value).
    static func executable(_ name: String, searchPath: String?) throws -> String {
        if name.contains("/") { return name }
        for directory in (searchPath ?? "/usr/local/bin:/usr/bin:/bin").split(separator: ":") {
            let candidate = directory + "/" + name
            if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
        }
        throw SupportError("\(name) not found in \(searchPath ?? "PATH") (run scripts/install-deps)")
    }
}

/// A private SoftHSM token directory with `count` member tokens (member-a, member-b, ...) and a p11ha.conf
/// that groups them; the directory is removed when the last reference goes away.
final class Members {
    let dir: String
    /// The `lock-dir` of the configurations written for these members: `dir` itself, as make-members writes it,
    /// unless a test shares coordination between users (nginx's workers) through a directory of its own; nil for
    /// the default directory.
    private(set) var lockDirectory: String?
    let softhsmConf: String
    let p11haConf: String
    let group: String
    let count: Int
    let userPIN = "246810"
    let soPIN = "135790"

    /// `replicationKey`: also run `p11hactl domain create`, as an operator sets a group up (generated keys need it).
    init(count: Int = 3, group: String = "ha-test", replicationKey: Bool = true) throws {
        self.dir = try makeTemporaryDirectory("p11ha-test")
        self.lockDirectory = dir
        self.softhsmConf = dir + "/softhsm2.conf"
        self.p11haConf = dir + "/p11ha.conf"
        self.group = group
        self.count = count

        // deinit does not run when init throws: clean up here.
        do {
            var environment = ProcessInfo.processInfo.environment
            environment["USER_PIN"] = userPIN
            environment["SO_PIN"] = soPIN
            let result = try runProcess(Paths.makeMembers, [dir, String(count), group], environment: environment)
            guard result.status == 0 else {
                throw SupportError("make-members failed (status \(result.status)): \(result.stderr)")
            }
            if replicationKey && count > 1 {
                try createDomain()
            }
        } catch {
            try? FileManager.default.removeItem(atPath: dir)
            throw error
        }
    }

    deinit {
        try? FileManager.default.removeItem(atPath: dir)
    }

    var tokenLabels: [String] {
        (0..<count).map { index in
            "member-" + String(Character(UnicodeScalar(UInt8(ascii: "a") + UInt8(index))))
        }
    }

    /// The test process's environment plus the two variables that point SoftHSM and p11ha at this directory.
    var environment: [String: String] {
        var environment = ProcessInfo.processInfo.environment
        environment["SOFTHSM2_CONF"] = softhsmConf
        environment["P11HA_CONF"] = p11haConf
        return environment
    }

    /// Where the configurations the tests write send p11ha's log.
    var logPath: String { dir + "/p11ha.log" }

    /// p11ha's log so far; empty when nothing was logged yet.
    var log: String { (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "" }

    /// Replaces p11ha.conf, for tests of configuration handling.
    func rewriteConfig(_ text: String) throws {
        try text.write(toFile: p11haConf, atomically: true, encoding: .utf8)
    }

    /// Makes `path` the lock directory shared by the processes of the root user and of `group` (root:GROUP, mode
    /// 2770, as README's tmpfiles.d line), and points p11ha.conf at it.
    func shareLockDirectory(_ path: String, withGroup group: String) throws {
        guard mkdir(path, 0o700) == 0 else { throw SupportError("mkdir \(path): errno \(errno)") }
        let owned = try runProcess("chown", ["root:\(group)", path])
        guard owned.status == 0 else { throw SupportError("chown root:\(group) \(path) failed:\n\(owned.output)") }
        guard chmod(path, 0o2770) == 0 else { throw SupportError("chmod \(path): errno \(errno)") }
        try setLockDirectory(path)
    }

    /// Points p11ha.conf's `lock-dir` at `path`, or (nil) removes it, for the default directory.
    func setLockDirectory(_ path: String?) throws {
        if let current = lockDirectory {
            let text = try String(contentsOfFile: p11haConf, encoding: .utf8)
            let line = "lock-dir = \(current)\n"
            guard text.contains(line) else { throw SupportError("p11ha.conf has no \(line):\n\(text)") }
            try rewriteConfig(text.replacingOccurrences(of: line, with: path.map { "lock-dir = \($0)\n" } ?? ""))
        } else if let path {
            try addGlobal(["lock-dir = \(path)"])
        }
        lockDirectory = path
    }

    /// Adds lines to [p11ha] of p11ha.conf, right after its header.
    func addGlobal(_ lines: [String]) throws {
        let text = try String(contentsOfFile: p11haConf, encoding: .utf8)
        guard text.contains("[p11ha]\n") else { throw SupportError("p11ha.conf has no [p11ha] section:\n\(text)") }
        try rewriteConfig(text.replacingOccurrences(of: "[p11ha]\n", with: (["[p11ha]"] + lines).joined(separator: "\n") + "\n"))
    }

    /// `p11hactl domain create` for the group, with the SO PIN from a file, as an operator sets a group up.
    func createDomain() throws {
        let created = try p11hactl(["domain", "create", "--group", group, "--so-pin-source", pinFile(self, "so.pin", soPIN)], self)
        guard created.status == 0 else {
            throw SupportError("p11hactl domain create failed (status \(created.status)): \(created.output)")
        }
    }
}

struct SupportError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// mkdtemp under /tmp.
func makeTemporaryDirectory(_ prefix: String) throws -> String {
    var template = Array("/tmp/\(prefix).XXXXXX".utf8CString)
    let made: String? = template.withUnsafeMutableBufferPointer { buffer in
        mkdtemp(buffer.baseAddress!).map { String(cString: $0) }
    }
    guard let made else { throw SupportError("mkdtemp failed: errno \(errno)") }
    return made
}

/// Polls `condition` every `interval` seconds until it holds; throws when `timeout` seconds pass first, with
/// `what` (evaluated then, so that it can carry the latest log) in the message. For waiting on something a test
/// set off (a member failing or returning, a server starting); a sleep that paces a workload stays a sleep.
func waitUntil(_ what: @autoclosure () -> String, timeout: Double, interval: Double = 0.05,
               _ condition: () throws -> Bool) throws {
    let deadline = DispatchTime.now() + timeout
    while try !condition() {
        guard DispatchTime.now() < deadline else {
            throw SupportError("timed out after \(timeout) s waiting until \(what())")
        }
        Thread.sleep(forTimeInterval: interval)
    }
}

/// Writes `text` to a file readable only by its owner (PINs).
func writeSecret(_ text: String, to path: String) throws {
    guard FileManager.default.createFile(atPath: path, contents: Data(text.utf8), attributes: [.posixPermissions: 0o600])
    else { throw SupportError("cannot create \(path)") }
}

/// Writes a PIN file in the members' directory, for pin-source options; returns "file:PATH".
func pinFile(_ members: Members, _ name: String, _ pin: String) throws -> String {
    let path = members.dir + "/" + name
    try writeSecret(pin + "\n", to: path)
    return "file:" + path
}

// MARK: - Clients the tests run

/// Runs one scenario of p11ha-scenario against the group of `members` and returns its output. `base` is the
/// environment to start from (the members' own by default).
func scenario(_ name: String, _ members: Members, module: String = Paths.debugModule,
              base: [String: String]? = nil, timeout: Double = 120) throws -> ProcessResult {
    try runProcess(Paths.scenarioDriver, [name, module], environment: scenarioEnvironment(members, base: base), timeout: timeout)
}

/// `base` (the members' own environment by default) with what p11ha-scenario reads: the group's token, PINs, the
/// member tokens' labels and SoftHSM's module.
func scenarioEnvironment(_ members: Members, base: [String: String]? = nil) -> [String: String] {
    var environment = base ?? members.environment
    environment["P11HA_TEST_TOKEN"] = members.group
    environment["P11HA_TEST_PIN"] = members.userPIN
    environment["P11HA_TEST_SO_PIN"] = members.soPIN
    environment["P11HA_TEST_MEMBERS"] = members.tokenLabels.joined(separator: ",")
    environment["SOFTHSM_MODULE"] = Paths.softhsmModule
    return environment
}

/// p11hactl from the debug build, with the members' environment unless another is given.
func p11hactl(_ arguments: [String], _ members: Members, environment: [String: String]? = nil) throws -> ProcessResult {
    try runProcess(Paths.p11hactl, arguments, environment: environment ?? members.environment)
}

/// pkcs11-tool on one module, optionally one token, in a Members environment.
struct PKCS11Tool {
    let module: String
    let token: String?
    let members: Members

    init(module: String, token: String?, members: Members) throws {
        try #require(
            FileManager.default.fileExists(atPath: module), "\(module) is missing: run swift build first")
        self.module = module
        self.token = token
        self.members = members
    }

    func callAsFunction(_ arguments: [String], login: Bool = false) throws -> ProcessResult {
        var full = ["--module", module]
        if let token { full += ["--token-label", token] }
        if login { full += ["--login", "--pin", members.userPIN] }
        return try runProcess("pkcs11-tool", full + arguments, environment: members.environment)
    }
}

/// The values of "name: value" lines, in order (pkcs11-tool and p11tool pad the name with spaces before the colon).
func fieldValues(_ name: String, in text: String) -> [String] {
    text.split(separator: "\n").compactMap { line in
        guard let colon = line.firstIndex(of: ":"),
              line[..<colon].trimmingCharacters(in: .whitespaces) == name
        else { return nil }
        return line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces)
    }
}

/// Examples/openssl/openssl.cnf filled in for the engine and `module`, written to `path`.
func writeOpenSSLConfig(module: String, to path: String) throws {
    let template = try String(contentsOfFile: Paths.packageRoot + "/Examples/openssl/openssl.cnf", encoding: .utf8)
    guard template.contains("@ENGINE_PATH@") && template.contains("@MODULE_PATH@") else {
        throw SupportError("Examples/openssl/openssl.cnf lacks @ENGINE_PATH@ or @MODULE_PATH@:\n\(template)")
    }
    try template
        .replacingOccurrences(of: "@ENGINE_PATH@", with: Paths.opensslPKCS11Engine)
        .replacingOccurrences(of: "@MODULE_PATH@", with: module)
        .write(toFile: path, atomically: true, encoding: .utf8)
}
