// Configuration mistakes as an operator meets them: through a client's C_Initialize, the log, and p11hactl check.
import Foundation
import Testing

@Suite("A configuration mistake is named by file and line")
struct ConfigTests {
    @Test(
        "a mistake in the configuration fails C_Initialize, and the log names the file and line",
        arguments: ConfigMistake.all)
    func mistakeFailsInitialize(_ mistake: ConfigMistake) throws {
        let members = try Members(group: "ha-config")
        let config = mistake.config(for: members)
        try members.rewriteConfig(config.text)

        let result = try runProcess(
            "pkcs11-tool", ["--module", Paths.debugModule, "-L"], environment: members.environment)

        #expect(result.status != 0, "pkcs11-tool -L succeeded despite \(mistake):\n\(result.output)")
        #expect(
            result.output.contains("C_Initialize") && result.output.contains("CKR_GENERAL_ERROR"),
            "C_Initialize should fail with CKR_GENERAL_ERROR:\n\(result.output)")
        let log = members.log
        #expect(log.contains("config-error"), "p11ha.log has no config-error event:\n\(log)\n\(result.output)")
        let place = "\(members.p11haConf):\(config.line):"
        #expect(log.contains(place), "p11ha.log does not name \(place):\n\(log)")
        #expect(log.contains(mistake.culprit), "p11ha.log does not mention \(mistake.culprit):\n\(log)")
    }

    @Test("p11hactl check accepts a good configuration and reaches every member")
    func checkAcceptsGoodConfig() throws {
        let members = try Members(group: "ha-check")

        let result = try runProcess(Paths.p11hactl, ["check"], environment: members.environment)

        #expect(result.status == 0, "p11hactl check failed:\n\(result.output)")
        for label in members.tokenLabels {
            #expect(result.stdout.contains("\"\(label)\""), "\(label) is not listed:\n\(result.stdout)")
        }
    }

    @Test(
        "p11hactl check names the file and line of a mistake and exits non-zero",
        arguments: ConfigMistake.all, ConfigSource.allCases)
    func checkNamesMistake(_ mistake: ConfigMistake, _ source: ConfigSource) throws {
        let members = try Members(group: "ha-check")
        let config = mistake.config(for: members)
        // Beside the good p11ha.conf, so that reading the wrong file shows as a pass.
        let path = members.dir + "/mistaken.conf"
        try config.text.write(toFile: path, atomically: true, encoding: .utf8)
        var environment = members.environment
        var arguments = ["check"]
        switch source {
        case .option: arguments += ["--config", path]
        case .environment: environment["P11HA_CONF"] = path
        }

        let result = try runProcess(Paths.p11hactl, arguments, environment: environment)

        #expect(result.status == 1, "p11hactl check should exit 1 for \(mistake):\n\(result.output)")
        #expect(
            result.stderr.contains("\(path):\(config.line):"),
            "stderr does not name \(path):\(config.line):\n\(result.output)")
        #expect(result.stderr.contains(mistake.culprit), "stderr does not mention \(mistake.culprit):\n\(result.output)")
    }

    @Test("a member whose own PIN is wrong fails p11hactl check", arguments: [false, true])
    func checkLogsInWithMemberPIN(_ rightPIN: Bool) throws {
        let members = try Members(group: "ha-pin")
        let wrongPIN = "975319"
        let pinFile = members.dir + (rightPIN ? "/right.pin" : "/wrong.pin")
        try writeSecret(rightPIN ? members.userPIN : wrongPIN, to: pinFile)
        let memberB = "pkcs11:token=member-b?module-path=\(Paths.softhsmModule)"
        let config = try String(contentsOfFile: members.p11haConf, encoding: .utf8)
        try #require(config.contains(memberB + "\n"), "make-members wrote an unexpected p11ha.conf:\n\(config)")
        try members.rewriteConfig(
            config.replacingOccurrences(of: memberB + "\n", with: memberB + "&pin-source=file:\(pinFile)\n"))

        let result = try runProcess(Paths.p11hactl, ["check"], environment: members.environment)

        let loginLines = result.stdout.split(separator: "\n").filter { $0.contains("login with its own PIN") }
        if rightPIN {
            #expect(result.status == 0, "p11hactl check failed with the right PIN:\n\(result.output)")
            #expect(loginLines.map { $0.trimmingCharacters(in: .whitespaces) } == ["login with its own PIN: ok"],
                    "\(result.output)")
        } else {
            #expect(result.status == 1, "p11hactl check should exit 1 with a wrong PIN:\n\(result.output)")
            #expect(loginLines.count == 1, "expected one login line:\n\(result.output)")
            #expect(
                loginLines.allSatisfy { $0.contains("FAILED") && $0.contains("CKR_PIN_INCORRECT") },
                "the failed login is not reported:\n\(result.output)")
        }
        for pin in [members.userPIN, wrongPIN] {
            #expect(!result.output.contains(pin), "p11hactl check shows a PIN:\n\(result.output)")
        }
    }
}

/// Where p11hactl is told to find the configuration.
enum ConfigSource: CaseIterable, Sendable, CustomTestStringConvertible {
    case option, environment
    var testDescription: String { self == .option ? "--config PATH" : "P11HA_CONF" }
}

/// One mistake an operator makes in p11ha.conf, placed in an otherwise good file for a Members directory.
struct ConfigMistake: Sendable, CustomTestStringConvertible, CustomStringConvertible {
    enum Place: Sendable {
        /// An extra line in [p11ha], right after `log = ...`.
        case global
        /// Instead of the member line of this index.
        case member(Int)
        /// A member line after all the good ones.
        case extraMember
    }

    let name: String
    let line: String
    let place: Place
    /// What the error message must mention so that the operator sees which setting is meant.
    let culprit: String

    var testDescription: String { name }
    var description: String { name }

    static let all: [ConfigMistake] = [
        ConfigMistake(name: "an unknown key", line: "colour = blue", place: .global, culprit: "colour"),
        ConfigMistake(
            name: "a member URI matching no token",
            line: "member = pkcs11:token=nope?module-path=\(Paths.softhsmModule)", place: .member(1),
            culprit: "token=nope"),
        ConfigMistake(
            name: "a module path that does not exist",
            line: "member = pkcs11:token=member-a?module-path=/nonexistent/libpkcs11.so", place: .member(0),
            culprit: "/nonexistent/libpkcs11.so"),
        // Matches member-a, member-b, member-c and SoftHSM's free slot.
        ConfigMistake(
            name: "a member URI matching several tokens",
            line: "member = pkcs11:manufacturer=SoftHSM%20project?module-path=\(Paths.softhsmModule)",
            place: .extraMember, culprit: "manufacturer=SoftHSM%20project"),
        // p11ha as its own member would call itself under its own locks: a deadlock at the first call.
        ConfigMistake(
            name: "a member module that is p11ha itself",
            line: "member = pkcs11:token=member-a?module-path=\(Paths.debugModule)", place: .member(0),
            culprit: "is p11ha itself"),
    ]

    /// The whole file, `log` first in [p11ha], and the 1-based number of the mistaken line.
    func config(for members: Members) -> (text: String, line: Int) {
        var lines = ["[p11ha]", "log = \(members.dir)/p11ha.log"]
        var mistakeLine = 0
        func add(_ text: String, mistaken: Bool = false) {
            lines.append(text)
            if mistaken { mistakeLine = lines.count }
        }
        if case .global = place { add(line, mistaken: true) }
        add("")
        add("[group \(members.group)]")
        add("label = \(members.group)")
        for (index, label) in members.tokenLabels.enumerated() {
            if case .member(index) = place {
                add(line, mistaken: true)
            } else {
                add("member = pkcs11:token=\(label)?module-path=\(Paths.softhsmModule)")
            }
        }
        if case .extraMember = place { add(line, mistaken: true) }
        return (lines.joined(separator: "\n") + "\n", mistakeLine)
    }
}

// MARK: - Config fuzz: bad values and bad files, through p11hactl check and the real C ABI

/// How long a refused configuration may take to be refused: far more than it takes (well under a second),
/// so that a hang (a FIFO read with no writer, /dev/zero read to its end) fails the test instead of stalling it.
private let refusalLimit: Double = 20

@Suite("A bad value or a bad file is refused at once, by file and line, never a crash or a hang")
struct ConfigFuzzTests {
    @Test("p11hactl check exits 1 naming the file and line of a bad value, and C_Initialize fails with CKR_GENERAL_ERROR",
          arguments: BadSetting.all)
    func badValueRefused(_ bad: BadSetting) throws {
        let members = try Members(count: 2, group: "ha-fuzz", replicationKey: false)
        let (bytes, line) = try bad.config(for: members)
        try write(bytes, to: members.p11haConf)
        let place = "\(members.p11haConf):\(line):"

        let check = try runProcess(Paths.p11hactl, ["check"], environment: members.environment, timeout: refusalLimit)
        #expect(check.status == 1, "p11hactl check should exit 1 for \(bad):\n\(check.output)")
        #expect(check.stderr.contains(place), "stderr does not name \(place):\n\(check.output)")
        #expect(check.stderr.contains(bad.why), "stderr does not say \(bad.why):\n\(check.output)")

        let initialize = try runProcess("pkcs11-tool", ["--module", Paths.debugModule, "-L"],
                                        environment: members.environment, timeout: refusalLimit)
        #expect(initialize.status != 0 && initialize.status < 128, "pkcs11-tool -L should fail, not crash:\n\(initialize.output)")
        #expect(initialize.output.contains("C_Initialize") && initialize.output.contains("CKR_GENERAL_ERROR"),
                "C_Initialize should fail with CKR_GENERAL_ERROR:\n\(initialize.output)")
        // The log named in the file when that line is good, else stderr.
        let said = members.log + initialize.stderr
        #expect(said.contains("config-error") && said.contains(place) && said.contains(bad.why),
                "neither p11ha.log nor stderr has the config-error naming \(place) (\(bad.why)):\n\(said)")
    }

    @Test("a configuration that is a FIFO, a directory, /dev/zero or too large is refused at once, naming the file",
          arguments: BadFile.allCases)
    func badFileRefused(_ bad: BadFile) throws {
        let members = try Members(count: 2, group: "ha-fuzz", replicationKey: false)
        let path = try bad.make(in: members.dir)
        var environment = members.environment
        environment["P11HA_CONF"] = path

        for arguments in [["check"], ["check", "--config", path]] {
            let check = try runProcess(Paths.p11hactl, arguments, environment: environment, timeout: refusalLimit)
            #expect(check.status == 1, "p11hactl \(arguments) should exit 1 for \(bad):\n\(check.output)")
            #expect(check.stderr.contains("\(path): cannot read: \(bad.why)"), "stderr does not name \(path):\n\(check.output)")
        }

        let initialize = try runProcess("pkcs11-tool", ["--module", Paths.debugModule, "-L"],
                                        environment: environment, timeout: refusalLimit)
        #expect(initialize.status != 0 && initialize.status < 128, "pkcs11-tool -L should fail, not crash:\n\(initialize.output)")
        #expect(initialize.output.contains("C_Initialize") && initialize.output.contains("CKR_GENERAL_ERROR"),
                "C_Initialize should fail with CKR_GENERAL_ERROR:\n\(initialize.output)")
        #expect(initialize.stderr.contains("config-error") && initialize.stderr.contains(path),
                "stderr has no config-error naming \(path):\n\(initialize.output)")
    }

    @Test("the bounds of each setting are accepted by p11hactl check with real members")
    func boundsAccepted() throws {
        let members = try Members(count: 2, group: "ha-bounds", replicationKey: false)
        try members.addGlobal(["operation-timeout = 60m", "recovery-interval = 10ms", "replay-buffer = 1g"])

        let check = try runProcess(Paths.p11hactl, ["check"], environment: members.environment, timeout: 60)

        #expect(check.status == 0, "p11hactl check refused the bounds:\n\(check.output)")
    }
}

/// A bad setting placed in an otherwise good p11ha.conf for a Members directory (`log` first in [p11ha], then
/// the group with its label and members).
struct BadSetting: Sendable, CustomTestStringConvertible, CustomStringConvertible {
    enum Place: Sendable {
        /// An extra line in [p11ha], after `log = ...` (line 3).
        case global
        /// Instead of the group's `label` line.
        case label
        /// Instead of the member line of this index.
        case member(Int)
    }

    let name: String
    let place: Place
    /// What the error must say.
    let why: String
    /// The line's bytes; it may make files in the members' directory first (a FIFO).
    let line: @Sendable (Members) throws -> [UInt8]

    var testDescription: String { name }
    var description: String { name }

    init(_ name: String, _ place: Place, why: String, _ text: String) {
        self.init(name, place, why: why) { _ in Array(text.utf8) }
    }

    init(_ name: String, _ place: Place, why: String, line: @escaping @Sendable (Members) throws -> [UInt8]) {
        self.name = name
        self.place = place
        self.why = why
        self.line = line
    }

    /// A member line for member-b with `query` after its module path.
    static func memberB(_ query: String) -> String {
        "member = pkcs11:token=member-b?module-path=\(Paths.softhsmModule)\(query)"
    }

    static let all: [BadSetting] = [
        BadSetting("an operation-timeout that overflows in minutes", .global, why: "out of range",
                   "operation-timeout = 999999999999999m"),
        BadSetting("an operation-timeout of Int.max seconds", .global, why: "out of range",
                   "operation-timeout = 9223372036854775807"),
        BadSetting("a recovery-interval of zero", .global, why: "out of range", "recovery-interval = 0"),
        BadSetting("a replay-buffer that overflows in KiB", .global, why: "out of range", "replay-buffer = 9223372036854775k"),
        BadSetting("a negative replay-buffer", .global, why: "negative", "replay-buffer = -5"),
        BadSetting("a log naming a directory", .global, why: "a directory, not a regular file") { members in
            Array("log = \(members.dir)".utf8)
        },
        BadSetting("a log naming a FIFO", .global, why: "a FIFO, not a regular file") { members in
            let fifo = members.dir + "/log.fifo"
            guard mkfifo(fifo, 0o600) == 0 else { throw SupportError("mkfifo \(fifo): errno \(errno)") }
            return Array("log = \(fifo)".utf8)
        },
        BadSetting("a label with a NUL byte", .label, why: "NUL byte") { _ in Array("label = ha".utf8) + [0] + Array("fuzz".utf8) },
        BadSetting("a label with a terminal escape", .label, why: "control character (U+001B)", "label = ha\u{1B}[2Jfuzz"),
        BadSetting("a label in Latin-1", .label, why: "not valid UTF-8") { _ in Array("label = caf".utf8) + [0xE9] },
        BadSetting("a module path cut short by %00", .member(0), why: "NUL byte (%00)",
                   "member = pkcs11:token=member-a?module-path=\(Paths.softhsmModule)%00.evil"),
        BadSetting("a misspelt pin-source", .member(1), why: "unknown attribute 'pin-sourse'", memberB("&pin-sourse=file:/etc/pin")),
        BadSetting("a pin-source that is a FIFO", .member(1), why: "a FIFO, not a regular file") { members in
            let fifo = members.dir + "/pin.fifo"
            guard mkfifo(fifo, 0o600) == 0 else { throw SupportError("mkfifo \(fifo): errno \(errno)") }
            return Array(memberB("&pin-source=file:\(fifo)").utf8)
        },
        BadSetting("a pin-source that is /dev/zero", .member(1), why: "a character device, not a regular file",
                   memberB("&pin-source=file:/dev/zero")),
        BadSetting("a pin-source larger than 4 KiB", .member(1), why: "larger than 4 KiB") { members in
            let pin = members.dir + "/large.pin"
            try writeSecret(String(repeating: "1", count: 4097), to: pin)
            return Array(memberB("&pin-source=file:\(pin)").utf8)
        },
    ]

    /// The whole file and the 1-based number of the bad line.
    func config(for members: Members) throws -> (bytes: [UInt8], line: Int) {
        let bad = try line(members)
        var lines: [[UInt8]] = [Array("[p11ha]".utf8), Array("log = \(members.logPath)".utf8)]
        var badLine = 0
        func add(_ text: String) { lines.append(Array(text.utf8)) }
        func addBad() {
            lines.append(bad)
            badLine = lines.count
        }
        if case .global = place { addBad() }
        add("[group \(members.group)]")
        if case .label = place { addBad() } else { add("label = \(members.group)") }
        for (index, label) in members.tokenLabels.enumerated() {
            if case .member(index) = place { addBad() } else { add("member = pkcs11:token=\(label)?module-path=\(Paths.softhsmModule)") }
        }
        return (Array(lines.joined(separator: [0x0A])) + [0x0A], badLine)
    }
}

/// A configuration path naming something that is not a small regular file.
enum BadFile: String, CaseIterable, Sendable, CustomTestStringConvertible {
    case fifo = "a FIFO with no writer"
    case directory = "a directory"
    case devZero = "/dev/zero"
    case tooLarge = "a file larger than 1 MiB"

    var testDescription: String { rawValue }

    func make(in directory: String) throws -> String {
        let path = directory + "/bad.conf"
        switch self {
        case .fifo:
            guard mkfifo(path, 0o600) == 0 else { throw SupportError("mkfifo \(path): errno \(errno)") }
        case .directory:
            try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: false)
        case .devZero:
            return "/dev/zero"
        case .tooLarge:
            try write([UInt8](repeating: UInt8(ascii: "#"), count: (1 << 20) + 1), to: path)
        }
        return path
    }

    var why: String {
        switch self {
        case .fifo: "a FIFO, not a regular file"
        case .directory: "a directory, not a regular file"
        case .devZero: "a character device, not a regular file"
        case .tooLarge: "larger than 1 MiB"
        }
    }
}

/// Replaces the file at `path` with exactly `bytes`.
private func write(_ bytes: [UInt8], to path: String) throws {
    guard FileManager.default.createFile(atPath: path, contents: Data(bytes)) else { throw SupportError("cannot write \(path)") }
}
