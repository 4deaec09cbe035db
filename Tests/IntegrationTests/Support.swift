// Test support: where things are, private SoftHSM member directories, and running client programs.
import Foundation

enum Paths {
    /// The repository root, found from this file's place in it (Tests/IntegrationTests/Support.swift).
    static let packageRoot: String = {
        var url = URL(fileURLWithPath: #filePath)
        for _ in 0..<3 { url.deleteLastPathComponent() }
        return url.path
    }()
    static let debugModule = packageRoot + "/.build/debug/libp11ha.so"
    static let softhsmModule = "/usr/lib/softhsm/libsofthsm2.so"
    /// libengine-pkcs11-openssl's engine for OpenSSL 3.
    static let opensslPKCS11Engine = "/usr/lib/x86_64-linux-gnu/engines-3/pkcs11.so"
    static let makeMembers = packageRoot + "/scripts/make-members"
}

/// A private SoftHSM token directory with `count` member tokens (member-a, member-b, ...) and a p11ha.conf
/// that groups them; the directory is removed when the last reference goes away.
final class Members {
    let dir: String
    let softhsmConf: String
    let p11haConf: String
    let group: String
    let count: Int
    let userPIN = "246810"
    let soPIN = "135790"

    /// `replicationKey`: also run `p11hactl domain create`, as an operator sets a group up (generated keys need it).
    init(count: Int = 3, group: String = "ha-test", replicationKey: Bool = true) throws {
        var template = Array("/tmp/p11ha-test.XXXXXX".utf8CString)
        let made: String? = template.withUnsafeMutableBufferPointer { buffer in
            mkdtemp(buffer.baseAddress!).map { String(cString: $0) }
        }
        guard let dir = made else { throw SupportError("mkdtemp failed: errno \(errno)") }
        self.dir = dir
        self.softhsmConf = dir + "/softhsm2.conf"
        self.p11haConf = dir + "/p11ha.conf"
        self.group = group
        self.count = count

        var environment = ProcessInfo.processInfo.environment
        environment["USER_PIN"] = userPIN
        environment["SO_PIN"] = soPIN
        let result = try runProcess(Paths.makeMembers, [dir, String(count), group], environment: environment)
        guard result.status == 0 else {
            // deinit does not run when init throws: clean up here.
            try? FileManager.default.removeItem(atPath: dir)
            throw SupportError("make-members failed (status \(result.status)): \(result.stderr)")
        }
        if replicationKey && count > 1 {
            let pinPath = dir + "/so.pin"
            _ = FileManager.default.createFile(atPath: pinPath, contents: Data((soPIN + "\n").utf8),
                                               attributes: [.posixPermissions: 0o600])
            var domainEnvironment = ProcessInfo.processInfo.environment
            domainEnvironment["SOFTHSM2_CONF"] = softhsmConf
            domainEnvironment["P11HA_CONF"] = p11haConf
            let domain = try runProcess(Paths.packageRoot + "/.build/debug/p11hactl",
                                        ["domain", "create", "--group", group, "--so-pin-source", "file:" + pinPath],
                                        environment: domainEnvironment)
            guard domain.status == 0 else {
                try? FileManager.default.removeItem(atPath: dir)
                throw SupportError("p11hactl domain create failed (status \(domain.status)): \(domain.stdout)\(domain.stderr)")
            }
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

    /// Replaces p11ha.conf, for tests of configuration handling.
    func rewriteConfig(_ text: String) throws {
        try text.write(toFile: p11haConf, atomically: true, encoding: .utf8)
    }
}

struct ProcessResult {
    let status: Int32
    let stdout: String
    let stderr: String

    /// Both streams, for failure messages.
    var output: String { stdout + stderr }
}

struct SupportError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
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
    let path = try resolveExecutable(executable, searchPath: environment["PATH"])
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

private func resolveExecutable(_ name: String, searchPath: String?) throws -> String {
    if name.contains("/") { return name }
    for directory in (searchPath ?? "/usr/local/bin:/usr/bin:/bin").split(separator: ":") {
        let candidate = directory + "/" + name
        if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
    }
    throw SupportError("\(name) not found in PATH (run scripts/install-deps)")
}

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
