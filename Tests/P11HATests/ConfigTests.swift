// The configuration file: what it accepts, and the file:line it names for what it refuses.
import Dispatch
import Foundation
@testable import P11HA
import Testing

private let member = "pkcs11:token=hsm-a?module-path=/usr/lib/softhsm/libsofthsm2.so"

@Suite struct TheConfigurationFile {
    @Test("a group with a label, members and global settings is read in file order")
    func readsGroups() throws {
        let text = """
        # comment line
        [p11ha]
        log = stderr          # where events go
        log-level = debug

        [group prod]
        label = prod-ha
        member = \(member)
        member = pkcs11:token=hsm-b?module-path=/usr/lib/softhsm/libsofthsm2.so

        [group test]
        member = \(member)
        """
        let config = try Config.parse(text, path: "p.conf")
        #expect(config.log == .stderr)
        #expect(config.logLevel == .debug)
        #expect(config.groups.map(\.name) == ["prod", "test"])
        #expect(config.groups[0].label == "prod-ha")
        #expect(config.groups[1].label == "test", "the label defaults to the group's name")
        #expect(config.groups[0].members.count == 2)
        #expect(config.groups[0].members[1].line == 9)
        #expect(config.groups[0].members[0].uri.modulePath == "/usr/lib/softhsm/libsofthsm2.so")
        #expect(try Config.parse("[group g]\nmember = \(member)\n", path: "x").log == .syslog, "log defaults to syslog")
    }

    @Test("every mistake is reported with the file and line", arguments: [
        ("[p11ha]\nfoo = 1\n", 2, "unknown key 'foo'"),
        ("[weird]\n", 1, "unknown section"),
        ("[group g]\nmember = not a uri\n", 2, "is not a PKCS#11 URI"),
        ("[group g]\nmember = pkcs11:token=x\n", 2, "names no module"),
        ("[group g]\nlabel\n", 2, "expected 'key = value'"),
        ("[group g]\nlabel = \n", 2, "has no value"),
        ("member = \(member)\n", 1, "before any section"),
        ("[group g]\n\n", 1, "has no member"),
        ("[group g]\nmember = \(member)\n[group g]\n", 3, "defined twice"),
        ("[p11ha]\nlog-level = loud\n[group g]\nmember = \(member)\n", 2, "log-level must be"),
        ("[group g]\nlabel = \(String(repeating: "x", count: 33))\nmember = \(member)\n", 2, "longer than 32"),
        ("[p11ha\n", 1, "without closing"),
        ("[group \(String(repeating: "n", count: 33))]\nmember = \(member)\n", 1, "give it a shorter label"),
    ])
    func reportsFileAndLine(text: String, line: Int, message: String) {
        #expect {
            _ = try Config.parse(text, path: "/etc/p11ha/p11ha.conf")
        } throws: { error in
            guard let error = error as? ConfigError else { return false }
            return error.line == line && error.description.hasPrefix("/etc/p11ha/p11ha.conf:\(line): ")
                && error.description.contains(message)
        }
    }

    @Test("a file with no group says so")
    func noGroup() {
        #expect(throws: ConfigError.self) { try Config.parse("[p11ha]\nlog = stderr\n", path: "x") }
    }

    @Test("a member's pin-value never appears in what p11ha shows")
    func pinValueHidden() throws {
        let uri = try TokenURI(parsing: "pkcs11:token=a?module-path=/x.so&pin-value=s3cr3t-value")
        #expect(uri.pinValue == "s3cr3t-value")
        #expect(!uri.displayText.contains("s3cr3t-value"))
        #expect {
            _ = try Config.parse("[group g]\nmember = pkcs11:token=a;bad?pin-value=s3cr3t-value\n", path: "x")
        } throws: { error in
            !String(describing: error).contains("s3cr3t-value")
        }
    }

    @Test("a pin-value written in the URI's path, where p11-kit takes it too, is hidden as well")
    func pinValueInPathHidden() throws {
        let uri = try TokenURI(parsing: "pkcs11:token=a;pin-value=s3cr3t-value?module-path=/x.so")
        #expect(uri.pinValue == "s3cr3t-value")
        #expect(!uri.displayText.contains("s3cr3t-value"), "\(uri.displayText)")
        #expect(uri.displayText.contains("pin-value=(hidden)"), "\(uri.displayText)")
        #expect {
            _ = try Config.parse("[group g]\nmember = pkcs11:pin-value=s3cr3t-value;token=a?module-pth=/x.so\n", path: "x")
        } throws: { error in
            let text = String(describing: error)
            return !text.contains("s3cr3t-value") && text.contains("module-pth")
        }
    }

    @Test("a file that cannot be read is named")
    func unreadable() {
        #expect {
            _ = try Config.load(path: "/nonexistent/p11ha.conf")
        } throws: { error in
            String(describing: error).hasPrefix("/nonexistent/p11ha.conf: cannot read")
        }
    }
}

// MARK: - Values out of range or malformed

/// A value an operator (or a fuzzer) might put after `key =`, and what the error must say about it.
struct BadValue: Sendable, CustomTestStringConvertible {
    let key: String
    let value: [UInt8]
    /// A fragment of the reason the error must give.
    let why: String

    init(_ key: String, _ value: String, _ why: String) {
        self.init(key, bytes: Array(value.utf8), why)
    }

    init(_ key: String, bytes: [UInt8], _ why: String) {
        self.key = key
        self.value = bytes
        self.why = why
    }

    var inGroup: Bool { ["label", "member", "standby"].contains(key) }

    /// Printable: control characters and bytes that are not UTF-8 spelled out, long values cut.
    var testDescription: String {
        let shown = value.prefix(40).map { byte -> String in
            (0x20..<0x7F).contains(byte) ? String(UnicodeScalar(byte)) : "\\x" + String(byte, radix: 16)
        }.joined()
        return "\(key) = \(shown)\(value.count > 40 ? "... (\(value.count) bytes)" : "")"
    }

    /// A whole file with this value on line 3 ([p11ha]) or line 4 ([group g]), everything else good.
    var file: (bytes: [UInt8], line: Int) {
        let line = Array("\(key) = ".utf8) + value + [0x0A]
        if inGroup {
            return (Array("[p11ha]\n[group g]\nmember = \(member)\n".utf8) + line, 4)
        }
        return (Array("[p11ha]\nlog-level = info\n".utf8) + line + Array("[group g]\nmember = \(member)\n".utf8), 3)
    }

    static let everyKey = ["log", "log-level", "log-facility", "operation-timeout", "recovery-interval", "replay-buffer",
                           "lock-dir", "generated-keys", "label", "member", "standby"]

    /// What any key refuses: nothing, NUL, control characters, bytes that are not UTF-8.
    static let anyKey: [BadValue] = everyKey.flatMap { key in
        [
            BadValue(key, "", "has no value"),
            BadValue(key, "   ", "has no value"),
            BadValue(key, bytes: [0x61, 0x00, 0x62], "NUL byte"),
            BadValue(key, bytes: [0x00], "NUL byte"),
            BadValue(key, "a\u{1B}[31mb", "control character (U+001B)"),
            BadValue(key, "a\tb", "control character (U+0009)"),
            BadValue(key, "a\u{7F}b", "control character (U+007F)"),
            BadValue(key, "a\u{85}b", "control character (U+0085)"),
            BadValue(key, "a\rb", "control character (U+000D)"),
            BadValue(key, bytes: [0x63, 0x61, 0x66, 0xE9], "not valid UTF-8"),  // café in Latin-1
            BadValue(key, bytes: [0xFF, 0xFE, 0x31], "not valid UTF-8"),
            BadValue(key, bytes: [0xC3], "not valid UTF-8"),  // a truncated sequence
            BadValue(key, bytes: [0xED, 0xA0, 0x80], "not valid UTF-8"),  // a UTF-16 surrogate
        ]
    }

    /// A value far too long for each key (lock-dir's checks are not this file's).
    static let huge: [BadValue] = {
        let long = String(repeating: "x", count: 100_000)
        return [
            BadValue("log", long, "must be stderr, syslog or an absolute file path"),
            BadValue("log-level", long, "log-level must be"),
            BadValue("log-facility", long, "log-facility must be one of"),
            BadValue("operation-timeout", long, "must be a duration"),
            BadValue("recovery-interval", long, "must be a duration"),
            BadValue("replay-buffer", long, "must be a size"),
            BadValue("generated-keys", long, "generated-keys must be"),
            BadValue("label", long, "longer than 32 bytes"),
            BadValue("member", long, "is not a PKCS#11 URI"),
            BadValue("operation-timeout", String(repeating: "9", count: 400) + "ms", "out of range"),
            BadValue("replay-buffer", String(repeating: "9", count: 400), "out of range"),
        ]
    }()

    /// Durations and sizes: overflowing, negative, zero, past the bounds, not numbers.
    static let numbers: [BadValue] = [
        BadValue("operation-timeout", "999999999999999m", "out of range"),
        BadValue("operation-timeout", "9223372036854775807", "out of range"),
        BadValue("operation-timeout", "9223372036854775807ms", "out of range"),
        BadValue("operation-timeout", "9223372036854775808", "out of range"),
        BadValue("operation-timeout", "153722867280912931m", "out of range"),
        BadValue("operation-timeout", "-5", "negative"),
        BadValue("operation-timeout", "-1ms", "negative"),
        BadValue("operation-timeout", "0", "out of range"),
        BadValue("operation-timeout", "0ms", "out of range"),
        BadValue("operation-timeout", "3601s", "out of range"),
        BadValue("operation-timeout", "61m", "out of range"),
        BadValue("operation-timeout", "+5s", "must be a duration"),
        BadValue("operation-timeout", "1.5s", "must be a duration"),
        BadValue("operation-timeout", "5 s", "must be a duration"),
        BadValue("operation-timeout", "5w", "must be a duration"),
        BadValue("operation-timeout", "2h", "out of range"),
        BadValue("record-retention", "0", "out of range"),
        BadValue("record-retention", "3651d", "out of range"),
        BadValue("record-retention", "always", "must be a duration"),
        BadValue("scrub-interval", "8d", "out of range"),
        BadValue("scrub-interval", "500ms", "out of range"),
        BadValue("operation-timeout", "0x10", "must be a duration"),
        BadValue("operation-timeout", "ms", "must be a duration"),
        BadValue("operation-timeout", "OFF", "must be a duration"),
        BadValue("operation-timeout", "５s", "must be a duration"),  // a full-width digit
        BadValue("recovery-interval", "9ms", "out of range"),
        BadValue("recovery-interval", "0", "out of range"),
        BadValue("recovery-interval", "9223372036854775807m", "out of range"),
        BadValue("recovery-interval", "-2s", "negative"),
        BadValue("recovery-interval", "61m", "out of range"),
        BadValue("recovery-interval", "off", "must be a duration"),
        BadValue("replay-buffer", "9223372036854775k", "out of range"),
        BadValue("replay-buffer", "9223372036854775807", "out of range"),
        BadValue("replay-buffer", "99999999999999999999g", "out of range"),
        BadValue("replay-buffer", "-5", "negative"),
        BadValue("replay-buffer", "-0", "negative"),
        BadValue("replay-buffer", "1073741825", "out of range"),
        BadValue("replay-buffer", "1048577k", "out of range"),
        BadValue("replay-buffer", "2g", "out of range"),
        BadValue("replay-buffer", "1.5m", "must be a size"),
        BadValue("replay-buffer", "0x100", "must be a size"),
        BadValue("replay-buffer", "64kb", "must be a size"),
        BadValue("replay-buffer", "k", "must be a size"),
        BadValue("label", String(repeating: "é", count: 17), "longer than 32 bytes"),
        BadValue("log", "p11ha.log", "absolute file path"),
        BadValue("log", "/nonexistent-p11ha-dir/p11ha.log", "is not an existing directory"),
        BadValue("log", "/", "a directory, not a regular file"),
        BadValue("log", "/dev/null", "a character device, not a regular file"),
        BadValue("log-level", "DEBUG", "log-level must be"),
        BadValue("generated-keys", "replicate refuse", "generated-keys must be"),
    ]

    /// Member URIs: parts p11-kit would cut short or ignore.
    static let uris: [BadValue] = [
        BadValue("member", "pkcs11:token=a?module-path=/usr/lib/softhsm/libsofthsm2.so%00.evil", "NUL byte (%00)"),
        BadValue("member", "pkcs11:token=a%00b?module-path=/usr/lib/softhsm/libsofthsm2.so", "NUL byte (%00)"),
        BadValue("member", "pkcs11:token=a?module-path=/x.so&pin-value=12%0034", "NUL byte (%00)"),
        BadValue("member", "pkcs11:token=a?module-path=/x%0A.so", "control character (U+000A)"),
        BadValue("member", "pkcs11:token=a?module-path=/x%1B.so", "control character (U+001B)"),
        BadValue("member", "pkcs11:token=a?module-name=soft%0Ahsm2", "control character (U+000A)"),
        BadValue("member", "pkcs11:token=a?module-path=/x.so&pin-source=/p%07in", "control character (U+0007)"),
        BadValue("member", "pkcs11:token=a?module-path=libsofthsm2.so", "must be an absolute path"),
        BadValue("member", "pkcs11:token=a?module-name=../../tmp/evil", "must be a name, not a path"),
        BadValue("member", "pkcs11:token=a?module-path=/x.so&pin-sourse=file:/etc/pin", "unknown attribute 'pin-sourse'"),
        BadValue("member", "pkcs11:token=a?module-path=/x.so&module-path=/y.so", "module-path is given twice"),
        BadValue("member", "pkcs11:token=a?module-path=", "module-path is empty"),
        BadValue("member", "pkcs11:token=a?module-path=/x.so&pin-value=", "pin-value is empty"),
        BadValue("member", "pkcs11:token=a?module-path=/x.so&pin-source=", "pin-source is empty"),
        BadValue("member", "pkcs11:token=a?module-path=/x.so&", "unknown attribute ''"),
        BadValue("member", "pkcs11:token=a;tokn=b?module-path=/x.so", "attribute p11-kit does not know"),
        BadValue("member", "pkcs11:token=a?module-path=/x.so&pin-source=file:relative.pin", "must be an absolute path"),
        BadValue("member", "pkcs11:token=a?module-path=/dev/zero", "a character device, not a regular file"),
        BadValue("member", "pkcs11:token=a?module-path=/tmp", "a directory, not a regular file"),
        BadValue("member", "pkcs11:token=a?module-path=/x.so&pin-source=file:/dev/zero", "a character device, not a regular file"),
        BadValue("member", "pkcs11:token=a?module-path=/x.so&pin-source=file:/tmp", "a directory, not a regular file"),
        BadValue("member", "pkcs11:token=a?module-path=/x.so&pin-source=/nonexistent/pin", "No such file"),
        BadValue("member", "pkcs11:token=a via unix:path=relative.sock", "absolute socket path"),
        BadValue("member", "pkcs11:token=a via unix:path=", "absolute socket path"),
        BadValue("member", "pkcs11:token=a via tcp:", "names no host"),
        BadValue("member", "pkcs11:token=a via udp:x", "not a p11-kit address"),
        BadValue("standby", "pkcs11:token=a?module-path=/x.so&pin-value=%00", "NUL byte (%00)"),
    ]
}

@Suite struct ConfigurationValues {
    @Test("every key refuses an empty value, NUL, control characters and bytes that are not UTF-8, naming the file and line",
          arguments: BadValue.anyKey)
    func anyKeyRefuses(_ bad: BadValue) throws { try expectRefused(bad) }

    @Test("a value far too long for its key is refused, naming the file and line", arguments: BadValue.huge)
    func hugeRefused(_ bad: BadValue) throws { try expectRefused(bad) }

    @Test("durations and sizes that overflow, are negative, or fall outside their bounds are refused, never a trap",
          arguments: BadValue.numbers)
    func numbersRefused(_ bad: BadValue) throws { try expectRefused(bad) }

    @Test("a member URI p11-kit would cut short (a NUL) or partly ignore (an unknown attribute) is refused",
          arguments: BadValue.uris)
    func urisRefused(_ bad: BadValue) throws { try expectRefused(bad) }

    /// What a setting was read as.
    enum Reading: Sendable, Equatable {
        case timeout(Duration?), interval(Duration), replayBuffer(Int), retention(Duration?), scrub(Duration?)
    }

    static let bounds: [(String, Reading)] = [
        ("operation-timeout = 1ms", .timeout(.milliseconds(1))),
        ("operation-timeout = 3600", .timeout(.seconds(3600))),
        ("operation-timeout = 60m", .timeout(.seconds(3600))),
        ("operation-timeout = 3600000ms", .timeout(.seconds(3600))),
        ("operation-timeout = 0001s", .timeout(.seconds(1))),
        ("operation-timeout = off", .timeout(nil)),
        ("recovery-interval = 10ms", .interval(.milliseconds(10))),
        ("recovery-interval = 3600s", .interval(.seconds(3600))),
        ("replay-buffer = 0", .replayBuffer(0)),
        ("replay-buffer = 1g", .replayBuffer(1 << 30)),
        ("replay-buffer = 1024M", .replayBuffer(1 << 30)),
        ("replay-buffer = 1073741824", .replayBuffer(1 << 30)),
        ("replay-buffer = 64k", .replayBuffer(65536)),
        ("record-retention = 1s", .retention(.seconds(1))),
        ("record-retention = 3650d", .retention(.seconds(3650 * 86_400))),
        ("record-retention = 12h", .retention(.seconds(12 * 3600))),
        ("record-retention = forever", .retention(nil)),
        ("scrub-interval = 1s", .scrub(.seconds(1))),
        ("scrub-interval = 7d", .scrub(.seconds(7 * 86_400))),
    ]

    @Test("the bounds themselves are accepted, with the values they say", arguments: bounds)
    func boundsAccepted(_ line: String, _ expected: Reading) throws {
        let config = try Config.parse("[p11ha]\n\(line)\n[group g]\nmember = \(member)\n", path: "p11ha.conf")
        let read: Reading = switch expected {
        case .timeout: .timeout(config.operationTimeout)
        case .interval: .interval(config.recoveryInterval)
        case .replayBuffer: .replayBuffer(config.replayBuffer)
        case .retention: .retention(config.recordRetention)
        case .scrub: .scrub(config.scrubInterval)
        }
        #expect(read == expected)
    }

    @Test("the range an error gives is written as the file takes it: its bounds, copied back, are accepted", arguments: [
        "operation-timeout = 61m", "operation-timeout = 0", "recovery-interval = 1ms", "recovery-interval = 61m",
        "replay-buffer = 2g", "replay-buffer = -1", "record-retention = 0", "record-retention = 4000d", "scrub-interval = 8d",
    ])
    func rangeInMessageAccepted(_ line: String) throws {
        let key = String(line.prefix(while: { $0 != " " }))
        var message = ""
        do {
            _ = try Config.parse("[p11ha]\n\(line)\n[group g]\nmember = \(member)\n", path: "p11ha.conf")
        } catch {
            message = error.description
        }
        let words = message.split(separator: " ").map(String.init)
        guard let from = words.firstIndex(of: "from"), from + 3 < words.count, words[from + 2] == "to" else {
            Issue.record("no 'from X to Y' in: \(message)")
            return
        }
        for bound in [words[from + 1], words[from + 3]] {
            #expect(throws: Never.self, "\(key) = \(bound), from: \(message)") {
                _ = try Config.parse("[p11ha]\n\(key) = \(bound)\n[group g]\nmember = \(member)\n", path: "p11ha.conf")
            }
        }
    }

    @Test("a label may be any UTF-8 text of up to 32 bytes; a file with CRLF line ends reads as one with LF")
    func labelsAndLineEnds() throws {
        let config = try Config.parse("[p11ha]\r\nlog-level = debug\r\n[group g]\r\nlabel = Prüfung HA-1\r\nmember = \(member)\r\n",
                                      path: "p11ha.conf")
        #expect(config.groups.first?.label == "Prüfung HA-1")
        #expect(config.logLevel == .debug)
    }

    @Test("a comment holding bytes that are not UTF-8 is refused too: the file is text", arguments: [
        [0x23, 0x20, 0xE9, 0x74, 0xE9] as [UInt8],  // "# été" in Latin-1
        [0x23, 0x00] as [UInt8],
    ])
    func commentBytes(_ comment: [UInt8]) throws {
        let directory = try TemporaryDirectory()
        let path = directory.path + "/p11ha.conf"
        try write(Array("[p11ha]\n".utf8) + comment + Array("\n[group g]\nmember = \(member)\n".utf8), to: path)
        #expect {
            _ = try Config.load(path: path)
        } throws: { error in
            (error as? ConfigError)?.line == 2 && String(describing: error).hasPrefix("\(path):2: ")
        }
    }

    @Test("a log file that exists, or that can be created in an existing directory, is accepted")
    func logFileAccepted() throws {
        let directory = try TemporaryDirectory()
        let existing = directory.path + "/existing.log"
        try write([], to: existing)
        for path in [existing, directory.path + "/new.log"] {
            let config = try Config.parse("[p11ha]\nlog = \(path)\n[group g]\nmember = \(member)\n", path: "p11ha.conf")
            #expect(config.log == .file(path))
        }
    }

    @Test("a log that names a FIFO, or a link to nothing, is refused (writing to a FIFO would block)")
    func logSpecialFiles() throws {
        let directory = try TemporaryDirectory()
        let fifo = directory.path + "/log.fifo"
        #expect(mkfifo(fifo, 0o600) == 0)
        let dangling = directory.path + "/dangling.log"
        #expect(symlink(directory.path + "/nowhere/x.log", dangling) == 0)
        for (path, why) in [(fifo, "a FIFO, not a regular file"), (dangling, "symbolic link to nothing")] {
            let text = "[p11ha]\nlog = \(path)\n[group g]\nmember = \(member)\n"
            #expect {
                _ = try returnsPromptly { try Config.parse(text, path: "p11ha.conf") }
            } throws: { error in
                (error as? ConfigError)?.line == 2 && String(describing: error).contains(why)
            }
            // The log destination read from a file that does not parse must not name it either.
            let file = directory.path + "/with-bad-log.conf"
            try write(Array(text.utf8), to: file)
            let destination = try returnsPromptly { Config.logDestination(inFileAt: file) }
            #expect(destination?.0 == nil, "\(path) would be opened as the log")
        }
    }

    /// Writes the bad value's file into a private directory and loads it: a ConfigError naming that file, the
    /// value's line and the reason.
    private func expectRefused(_ bad: BadValue, sourceLocation: SourceLocation = #_sourceLocation) throws {
        let directory = try TemporaryDirectory()
        let path = directory.path + "/p11ha.conf"
        let (bytes, line) = bad.file
        try write(bytes, to: path)
        do {
            let config = try returnsPromptly { try Config.load(path: path) }
            Issue.record("accepted: \(bad.testDescription) (groups \(config.groups.map(\.label)))", sourceLocation: sourceLocation)
        } catch let error as ConfigError {
            #expect(error.file == path && error.line == line, "\(error)", sourceLocation: sourceLocation)
            #expect(error.description.hasPrefix("\(path):\(line): "), "\(error)", sourceLocation: sourceLocation)
            #expect(error.description.contains(bad.why), "\(error) does not say \(bad.why)", sourceLocation: sourceLocation)
            #expect(error.description.utf8.count < 1000, "the message quotes too much: \(error.description.utf8.count) bytes",
                    sourceLocation: sourceLocation)
            #expect(!error.description.unicodeScalars.contains { $0.properties.generalCategory == .control },
                    "the message holds a control character", sourceLocation: sourceLocation)
        }
    }
}

// MARK: - Files that are not small regular files

@Suite struct ConfigurationFiles {
    /// What an operator might point P11HA_CONF at by mistake, made in `directory`; nil when the test cannot
    /// make it here.
    enum Kind: String, CaseIterable, Sendable {
        case fifo = "a FIFO with no writer"
        case directory = "a directory"
        case devZero = "/dev/zero"
        case linkToDevZero = "a symbolic link to /dev/zero"
        case tooLarge = "a file of 1 MiB and one byte"

        func make(in directory: String) throws -> String {
            switch self {
            case .fifo:
                let path = directory + "/p11ha.conf"
                guard mkfifo(path, 0o600) == 0 else { throw TestFailure("mkfifo: errno \(errno)") }
                return path
            case .directory:
                let path = directory + "/p11ha.conf"
                guard mkdir(path, 0o700) == 0 else { throw TestFailure("mkdir: errno \(errno)") }
                return path
            case .devZero:
                return "/dev/zero"
            case .linkToDevZero:
                let path = directory + "/p11ha.conf"
                guard symlink("/dev/zero", path) == 0 else { throw TestFailure("symlink: errno \(errno)") }
                return path
            case .tooLarge:
                let path = directory + "/p11ha.conf"
                let good = Array("[group g]\nmember = \(member)\n".utf8)
                try write(good + [UInt8](repeating: UInt8(ascii: "\n"), count: (1 << 20) + 1 - good.count), to: path)
                return path
            }
        }

        var why: String {
            switch self {
            case .fifo: "a FIFO, not a regular file"
            case .directory: "a directory, not a regular file"
            case .devZero, .linkToDevZero: "a character device, not a regular file"
            case .tooLarge: "larger than 1 MiB"
            }
        }
    }

    @Test("a configuration that is not a small regular file is refused at once, naming the file", arguments: Kind.allCases)
    func refusedPromptly(_ kind: Kind) throws {
        let directory = try TemporaryDirectory()
        let path = try kind.make(in: directory.path)
        #expect {
            _ = try returnsPromptly { try Config.load(path: path) }
        } throws: { error in
            guard let error = error as? ConfigError else { return false }
            return error.file == path && error.description == "\(path): cannot read: \(kind.why)"
        }
        #expect(try returnsPromptly { Config.logDestination(inFileAt: path) } == nil)
    }

    @Test("a file of exactly 1 MiB is still read")
    func largestAccepted() throws {
        let directory = try TemporaryDirectory()
        let path = directory.path + "/p11ha.conf"
        let good = Array("[group g]\nmember = \(member)\n".utf8)
        try write(good + [UInt8](repeating: UInt8(ascii: "\n"), count: (1 << 20) - good.count), to: path)
        #expect(try Config.load(path: path).groups.count == 1)
    }

    @Test("a member's pin-source that is not a small regular file is refused when the file loads, naming the member's line and never the PIN",
          arguments: Kind.allCases + [nil])
    func pinSourceRefused(_ kind: Kind?) throws {
        let directory = try TemporaryDirectory()
        let pin: String
        let why: String
        if let kind {
            pin = try kind.make(in: directory.path)
            why = kind == .tooLarge ? "larger than 4 KiB" : kind.why
        } else {
            pin = directory.path + "/empty.pin"
            try write([], to: pin)
            why = "is empty"
        }
        let path = directory.path + "/member.conf"
        try write(Array("[p11ha]\n[group g]\nmember = \(member)\nmember = \(member)&pin-source=file:\(pin)\n".utf8), to: path)
        #expect {
            _ = try returnsPromptly { try Config.load(path: path) }
        } throws: { error in
            guard let error = error as? ConfigError else { return false }
            return error.line == 4 && error.description.hasPrefix("\(path):4: member: pin-source \(pin)")
                && error.description.contains(why)
        }
    }
}

// MARK: - PIN files and the small-file reader

@Suite struct PINFiles {
    @Test("a PIN file's PIN is read without its trailing newline")
    func readsPIN() throws {
        let directory = try TemporaryDirectory()
        let path = directory.path + "/user.pin"
        try write(Array("4711-pin\r\n".utf8), to: path)
        let pin = try Secret.reading(pinSource: "file:" + path)
        #expect(pin.withBytes { Array($0) } == Array("4711-pin".utf8))
        #expect(Secret.fromPinSource(path)?.withBytes { Array($0) } == Array("4711-pin".utf8), "a plain path is a pin-source too")
    }

    @Test("a PIN file that is a FIFO, a device, a directory, too large or empty is refused at once, and the error never shows its content",
          arguments: ConfigurationFiles.Kind.allCases + [nil])
    func refused(_ kind: ConfigurationFiles.Kind?) throws {
        let directory = try TemporaryDirectory()
        let path: String
        if let kind, kind != .tooLarge {
            path = try kind.make(in: directory.path)
        } else {
            // Too large for a PIN file (4 KiB), or holding only a newline: a recognisable secret would show.
            path = directory.path + "/user.pin"
            let content = kind == nil ? "\n" : String(repeating: "SECRET-PIN-", count: 400)
            try write(Array(content.utf8), to: path)
        }
        #expect {
            _ = try returnsPromptly { try Secret.reading(pinSource: "file:" + path) }
        } throws: { error in
            let text = String(describing: error)
            return text.hasPrefix("cannot read: ") || text.hasPrefix("holds no PIN") ? !text.contains("SECRET") : false
        }
        #expect(try returnsPromptly { Secret.fromPinSource("file:" + path) } == nil)
    }

    @Test("the small-file reader every caller uses refuses what is not a regular file, and honours its limit")
    func smallFileReader() throws {
        let directory = try TemporaryDirectory()
        let fifo = try ConfigurationFiles.Kind.fifo.make(in: directory.path)
        #expect(try returnsPromptly { readFileBytes(fifo) } == nil)
        #expect(try returnsPromptly { readTextFile("/dev/zero") } == nil)
        #expect(readFileBytes(directory.path) == nil)
        let path = directory.path + "/status"
        try write([UInt8](repeating: 0x41, count: 100), to: path)
        #expect(readFileBytes(path, limit: 100)?.count == 100)
        #expect(readFileBytes(path, limit: 99) == nil)
        #expect(readTextFile(path) == String(repeating: "A", count: 100))
    }
}

// MARK: - Support

/// Creates (or replaces) a regular file holding exactly `bytes`.
func write(_ bytes: [UInt8], to path: String) throws {
    guard FileManager.default.createFile(atPath: path, contents: Data(bytes)) else { throw TestFailure("cannot write \(path)") }
}

/// Runs `body` on a thread of its own and waits for it at most `seconds`: a call that blocks (a FIFO opened for
/// reading with no writer, /dev/zero read to its end) fails the test instead of hanging the run.
func returnsPromptly<T>(within seconds: Double = 5, _ body: @escaping () throws -> T) throws -> T {
    let box = PromptResult(body)
    let done = DispatchSemaphore(value: 0)
    Thread.detachNewThread {
        box.result = Result { try box.body() }
        done.signal()
    }
    guard done.wait(timeout: .now() + seconds) == .success, let result = box.result else {
        throw TestFailure("did not return within \(seconds) s")
    }
    return try result.get()
}

/// The call `returnsPromptly` runs, and its result once it returned (read only after the semaphore).
private final class PromptResult<T>: @unchecked Sendable {
    var result: Result<T, any Error>?
    let body: () throws -> T
    init(_ body: @escaping () throws -> T) { self.body = body }
}
