// The configuration file: [p11ha] settings and [group NAME] sections of member URIs, with file:line errors.
import CInterop
import Glibc

public struct ConfigError: Error, CustomStringConvertible, Sendable {
    public let file: String
    public let line: Int
    public let message: String
    public var description: String { line > 0 ? "\(file):\(line): \(message)" : "\(file): \(message)" }
}

public struct MemberConfig: Sendable {
    /// The URI as written, minus any pin-value, for logs.
    public let displayURI: String
    public let uri: TokenURI
    public let line: Int
    /// Gets every write but serves no reads while an active member is in service.
    public var standby = false
    /// A p11-kit remote address (`unix:path=...`): the token is served by `p11-kit server` there.
    public var via: String? = nil
}

public struct GroupConfig: Sendable {
    public let name: String
    public var label: String
    public var members: [MemberConfig] = []
    public let line: Int
}

/// What each setting may be. A value outside these is refused with its file and line: it is a typo or a unit
/// mistake, and the bounds keep the arithmetic done with it (deadlines, buffer sizes) far from overflow.
public enum ConfigBounds {
    /// 1 ms to 60 min, or off. Zero would fail every member at its first call; past an hour the deadline protects
    /// nobody (an application waits that long on a hung member) and `off` says so honestly.
    public static let operationTimeout = Duration.milliseconds(1)...Duration.seconds(3600)
    /// 10 ms to 60 min. Probing a failed member more often than every 10 ms is a busy loop against it; a member
    /// probed less than hourly stays out long after it returned.
    public static let recoveryInterval = Duration.milliseconds(10)...Duration.seconds(3600)
    /// 1 s to 10 years, or forever. A tombstone kept less than that could be forgotten while a member restored from
    /// a backup still holds the object it destroyed.
    public static let recordRetention = Duration.seconds(1)...Duration.seconds(3650 * 86_400)
    /// 1 s to 7 days: how often every object of every member in service is looked at (and the records compacted).
    public static let scrubInterval = Duration.seconds(1)...Duration.seconds(7 * 86_400)
    /// 0 (no replay of multi-part updates) to 1 GiB: the buffer is kept per operation in progress, in the
    /// application's memory.
    public static let replayBuffer = 0...(1 << 30)
    /// The configuration is a few hundred bytes; a megabyte is a wrong file.
    public static let fileSize = 1 << 20
}

public struct Config: Sendable {
    public static let defaultPath = "/etc/p11ha/p11ha.conf"

    public var path: String
    public var log: LogDestination = .syslog
    public var logLevel: LogLevel = .info
    public var generatedKeys: GeneratedKeys = .replicate
    public var logFacility: Int32 = LOG_USER
    /// How long a member may take to answer one call before it is failed over (nil: no deadline).
    public var operationTimeout: Duration? = .seconds(5)
    /// How long p11ha waits, when it must, for a member being brought up to date or for calls to finish: the
    /// operation-timeout, or 2 s without one.
    public var boundedWait: Duration { operationTimeout ?? .seconds(2) }
    /// How often failed members are probed.
    public var recoveryInterval: Duration = .seconds(2)
    /// How long a destroy's tombstone is kept on the members at least (nil: for ever). docs/REPLICATION.md,
    /// "Compaction".
    public var recordRetention: Duration? = .seconds(30 * 86_400)
    /// How often the recovery worker looks at every object of every member in service and compacts the records
    /// (nil: 30 watch intervals, 10 minutes at the default recovery-interval).
    public var scrubInterval: Duration? = nil
    /// How many bytes of a multi-part operation's updates are kept to replay it on a peer.
    public var replayBuffer = 1 << 20
    /// Where processes sharing a group coordinate (the host lock, the status file): by default a directory of this
    /// user's own, /run/p11ha for root and /tmp/p11ha-UID for other users (`HostDirectory`).
    public var lockDirectory = HostDirectory.defaultPath()
    public var groups: [GroupConfig] = []

    /// The file named by P11HA_CONF, else /etc/p11ha/p11ha.conf.
    public static func pathFromEnvironment() -> String {
        if let value = getenv("P11HA_CONF"), value.pointee != 0 { return String(cString: value) }
        return defaultPath
    }

    /// Reads and checks the file: a regular file of at most `ConfigBounds.fileSize` bytes (a FIFO, a device or
    /// a directory is refused at once, never read).
    public static func load(path: String) throws(ConfigError) -> Config {
        let bytes: [UInt8]
        do {
            bytes = try readRegularFile(path, limit: ConfigBounds.fileSize)
        } catch {
            throw ConfigError(file: path, line: 0, message: error.description)
        }
        return try parse(bytes: bytes, path: path)
    }

    /// Where the log goes according to a file that may not parse: so that its own errors reach that log. A
    /// `log` value that would be refused is ignored here too (opening a FIFO to write would block).
    public static func logDestination(inFileAt path: String) -> (LogDestination, LogLevel)? {
        guard let bytes = readFileBytes(path, limit: ConfigBounds.fileSize) else { return nil }
        var inGlobal = false
        var result: (LogDestination, LogLevel)? = nil
        for rawLine in bytes.split(separator: 0x0A) {
            guard !rawLine.contains(0), let text = String(validating: rawLine, as: UTF8.self) else { continue }
            let line = stripComment(text[...]).trimmed
            if line.hasPrefix("[") { inGlobal = line == "[p11ha]" }
            guard inGlobal, let equals = line.firstIndex(of: "=") else { continue }
            let key = String(line[..<equals]).trimmed
            let value = String(line[line.index(after: equals)...]).trimmed
            if key == "log", let destination = try? checkedLogDestination(value) {
                result = (destination, result?.1 ?? .info)
            }
            if key == "log-level", let level = LogLevel(name: value) { result = (result?.0 ?? .syslog, level) }
        }
        return result
    }

    public static func parse(_ text: String, path: String) throws(ConfigError) -> Config {
        try parse(bytes: Array(text.utf8), path: path)
    }

    /// The file's bytes, line by line: each line valid UTF-8 without NUL or control characters (a tab only as
    /// space between words), each value checked against its range.
    static func parse(bytes: [UInt8], path: String) throws(ConfigError) -> Config {
        var config = Config(path: path)
        enum Section { case none, global, group(Int) }
        var section = Section.none
        var groupNames: Set<String> = []
        var lineNumber = 0
        func fail(_ message: String) -> ConfigError { ConfigError(file: path, line: lineNumber, message: message) }

        for var rawLine in bytes.split(separator: 0x0A, omittingEmptySubsequences: false) {
            lineNumber += 1
            if rawLine.last == 0x0D { rawLine = rawLine.dropLast() }
            if rawLine.contains(0) { throw fail("the line holds a NUL byte") }
            guard let text = String(validating: rawLine, as: UTF8.self) else { throw fail("the line is not valid UTF-8") }
            let content = stripComment(text[...])
            if let control = content.unicodeScalars.first(where: { $0 != "\t" && isControl($0) }) {
                throw fail("the line holds a control character (\(codePoint(control)))")
            }
            let line = content.trimmed
            if line.isEmpty { continue }
            if line.hasPrefix("[") {
                guard line.hasSuffix("]") else { throw fail("section header without closing ']'") }
                let words = line.dropFirst().dropLast().split(separator: " ", omittingEmptySubsequences: true)
                switch (words.first.map(String.init), words.count) {
                case ("p11ha", 1):
                    section = .global
                case ("group", 2):
                    let name = String(words[1])
                    guard groupNames.insert(name).inserted else { throw fail("group '\(shortened(name))' is defined twice") }
                    config.groups.append(GroupConfig(name: name, label: name, line: lineNumber))
                    section = .group(config.groups.count - 1)
                default:
                    throw fail("unknown section '\(shortened(line))' (expected [p11ha] or [group NAME])")
                }
                continue
            }
            guard let equals = line.firstIndex(of: "=") else { throw fail("expected 'key = value'") }
            let key = String(line[..<equals]).trimmed
            let value = String(line[line.index(after: equals)...]).trimmed
            if value.isEmpty { throw fail("'\(shortened(key))' has no value") }
            if value.unicodeScalars.contains("\t") { throw fail("'\(shortened(key))': the value holds a control character (U+0009)") }
            switch section {
            case .none:
                throw fail("'\(shortened(key))' appears before any section")
            case .global:
                switch key {
                case "log":
                    do throws(ValueError) {
                        config.log = try checkedLogDestination(value)
                    } catch {
                        throw fail("log: \(error.message)")
                    }
                case "log-level":
                    guard let level = LogLevel(name: value) else { throw fail("log-level must be debug, info, warning or error") }
                    config.logLevel = level
                case "log-facility":
                    guard let facility = Log.facilities[value] else {
                        throw fail("log-facility must be one of \(Log.facilities.keys.sorted().joined(separator: ", "))")
                    }
                    config.logFacility = facility
                case "operation-timeout":
                    config.operationTimeout = try checkedDuration(value, key: key, bounds: ConfigBounds.operationTimeout,
                                                                  example: "250ms, 5s or 1m, or off", or: "off", fail)
                case "recovery-interval":
                    config.recoveryInterval = try checkedDuration(value, key: key, bounds: ConfigBounds.recoveryInterval,
                                                                  example: "500ms, 2s or 1m", fail)
                case "record-retention":
                    config.recordRetention = try checkedDuration(value, key: key, bounds: ConfigBounds.recordRetention,
                                                                 example: "30d, 12h or forever", or: "forever", fail)
                case "scrub-interval":
                    config.scrubInterval = try checkedDuration(value, key: key, bounds: ConfigBounds.scrubInterval,
                                                               example: "10m, 1h or 30s", fail)
                case "replay-buffer":
                    let bounds = ConfigBounds.replayBuffer
                    let range = "from \(sizeSetting(bounds.lowerBound)) to \(sizeSetting(bounds.upperBound))"
                    if value.hasPrefix("-") { throw fail("replay-buffer \(shortened(value)) is negative: it must be \(range)") }
                    guard let n = parseSize(value) else { throw fail("replay-buffer must be a size like 65536, 64k or 1m, \(range)") }
                    guard bounds.contains(n) else { throw fail("replay-buffer \(shortened(value)) is out of range: it must be \(range)") }
                    config.replayBuffer = n
                case "lock-dir":
                    guard value.hasPrefix("/") else { throw fail("lock-dir must be an absolute path") }
                    // Verified as every use will verify it (HostFiles.swift), so that a directory other users can
                    // write to is refused here, naming this line, rather than at the first write.
                    if let problem = HostDirectory(path: value).problem() { throw fail("\(problem.event): \(value): \(problem.reason)") }
                    config.lockDirectory = value
                case "generated-keys":
                    guard let policy = GeneratedKeys(rawValue: value) else { throw fail("generated-keys must be replicate, replicate-or-keep or refuse") }
                    config.generatedKeys = policy
                default: throw fail("unknown key '\(shortened(key))' in [p11ha]")
                }
            case .group(let index):
                switch key {
                case "label":
                    guard value.utf8.count <= 32 else { throw fail("label is longer than 32 bytes") }
                    config.groups[index].label = value
                case "member", "standby":
                    // `URI` or `URI via ADDRESS` (a token served by p11-kit server at ADDRESS).
                    let parts = splitting(value, on: " via ")
                    guard parts.count <= 2 else { throw fail("\(key): more than one 'via'") }
                    do throws(TokenURI.ParseError) {
                        let uri = try TokenURI(parsing: parts[0].trimmed, remote: parts.count == 2)
                        var member = MemberConfig(displayURI: uri.displayText, uri: uri, line: lineNumber)
                        member.standby = key == "standby"
                        if parts.count == 2 { member.via = try checkedAddress(parts[1].trimmed) }
                        try checkMemberFiles(uri, remote: parts.count == 2)
                        config.groups[index].members.append(member)
                    } catch {
                        throw fail("\(key): \(error.message)")
                    }
                default: throw fail("unknown key '\(shortened(key))' in [group \(config.groups[index].name)]")
                }
            }
        }
        lineNumber = 0
        if config.groups.isEmpty { throw fail("no [group NAME] section") }
        for group in config.groups where !group.members.contains(where: { !$0.standby }) {
            throw ConfigError(file: path, line: group.line, message: "group '\(group.name)' has no member (standby members alone do not make a group)")
        }
        // A group without a label is labelled with its name, which must fit the token label too.
        for group in config.groups where group.label.utf8.count > 32 {
            throw ConfigError(file: path, line: group.line, message: "the group's name is longer than 32 bytes: give it a shorter label")
        }
        let labels = config.groups.map(\.label)
        if Set(labels).count != labels.count { throw fail("two groups have the same label") }
        return config
    }

    /// Why a value is refused, without its file and line (the parser adds them).
    struct ValueError: Error { let message: String }

    /// `log`: stderr, syslog, or an absolute path naming a regular file, or nothing yet in an existing
    /// directory (the module creates it). A directory, a FIFO (opening it to write would block), a device or a
    /// socket is refused. Whether this process may write there is not checked: the tools read the file as
    /// other users than the application's.
    static func checkedLogDestination(_ value: String) throws(ValueError) -> LogDestination {
        switch LogDestination(value) {
        case .stderr: return .stderr
        case .syslog: return .syslog
        case .file(let path):
            guard path.hasPrefix("/") else {
                throw ValueError(message: "'\(shortened(value))' must be stderr, syslog or an absolute file path")
            }
            let shown = shortened(path)
            var info = stat()
            if stat(path, &info) == 0 {
                guard isRegularFile(info.st_mode) else {
                    throw ValueError(message: "\(shown) is \(fileKind(info.st_mode)), not a regular file")
                }
                return .file(path)
            }
            // A directory this user may not search (an operator's p11hactl, a root-only log directory): the
            // module, which may, opens the file or falls back to stderr.
            let reason = errno
            if reason == EACCES { return .file(path) }
            guard reason == ENOENT else { throw ValueError(message: "\(shown): \(errorText(reason))") }
            if lstat(path, &info) == 0 { throw ValueError(message: "\(shown) is a symbolic link to nothing") }
            let directory = parentDirectory(path)
            guard stat(directory, &info) == 0, (info.st_mode & S_IFMT) == S_IFDIR else {
                throw ValueError(message: "\(shown) cannot be created: \(shortened(directory)) is not an existing directory")
            }
            return .file(path)
        }
    }

    /// A duration within `bounds`; `off` is handled by the caller.
    static func checkedDuration(_ value: String, key: String, bounds: ClosedRange<Duration>, example: String,
                                _ fail: (String) -> ConfigError) throws(ConfigError) -> Duration {
        let range = "from \(durationText(bounds.lowerBound)) to \(durationText(bounds.upperBound))"
        if value.hasPrefix("-") { throw fail("\(key) \(shortened(value)) is negative: it must be \(range)") }
        guard let duration = parseDuration(value) else { throw fail("\(key) must be a duration like \(example), \(range)") }
        guard bounds.contains(duration) else { throw fail("\(key) \(shortened(value)) is out of range: it must be \(range)") }
        return duration
    }

    /// A duration, or nil for the word that says "none" (`off`, `forever`).
    static func checkedDuration(_ value: String, key: String, bounds: ClosedRange<Duration>, example: String, or none: String,
                                _ fail: (String) -> ConfigError) throws(ConfigError) -> Duration? {
        value == none ? nil : try checkedDuration(value, key: key, bounds: bounds, example: example, fail)
    }

    /// `via ADDRESS`: `unix:path=/absolute/socket` or `tcp:HOST...`, as p11-kit's client takes them.
    static func checkedAddress(_ address: String) throws(TokenURI.ParseError) -> String {
        if address.hasPrefix("unix:path=") {
            guard address.dropFirst("unix:path=".count).hasPrefix("/") else {
                throw TokenURI.ParseError(message: "via: '\(shortened(address))' must name an absolute socket path (unix:path=/...)")
            }
        } else if address.hasPrefix("tcp:") {
            guard address.count > "tcp:".count else { throw TokenURI.ParseError(message: "via: 'tcp:' names no host") }
        } else {
            throw TokenURI.ParseError(message: "via: '\(shortened(address))' is not a p11-kit address (unix:path=... or tcp:...)")
        }
        return address
    }

    /// What a member's URI names on this host: a module path that exists must be a regular file (dlopen would
    /// block on a FIFO), a pin-source a non-empty regular file of at most `Secret.pinFileLimit` bytes. Only
    /// inspected here, never read: the PIN is read when the member starts.
    static func checkMemberFiles(_ uri: TokenURI, remote: Bool) throws(TokenURI.ParseError) {
        if !remote, uri.modulePath.hasPrefix("/") {
            var info = stat()
            if stat(uri.modulePath, &info) == 0, !isRegularFile(info.st_mode) {
                throw TokenURI.ParseError(message: "module \(uri.modulePath) is \(fileKind(info.st_mode)), not a regular file")
            }
        }
        if let source = uri.pinSource {
            let path = Secret.pinSourcePath(source)
            let size: Int
            do throws(FileReadError) {
                size = try inspectRegularFile(path, limit: Secret.pinFileLimit)
            } catch {
                throw TokenURI.ParseError(message: "pin-source \(path): \(error.description)")
            }
            if size == 0 { throw TokenURI.ParseError(message: "pin-source \(path) is empty") }
        }
    }
}

/// A member URI: which module, which token of it, and optionally that member's own PIN.
public struct TokenURI: Sendable {
    public struct ParseError: Error { public let message: String }

    public let text: String
    public let modulePath: String
    public let pinValue: String?
    public let pinSource: String?
    /// The token label the URI names, if it names one.
    public let tokenLabel: String?

    /// The attributes RFC 7512 defines after `?`; p11-kit ignores any other, so a misspelt one would be lost.
    static let queryAttributes: Set<String> = ["module-path", "module-name", "pin-source", "pin-value"]

    /// `remote`: the token is reached through p11-kit's client module, so no module needs to be named.
    public init(parsing text: String, remote: Bool = false) throws(ParseError) {
        let shown = shortened(Self.redacted(text))
        // p11-kit decodes %00 into a C string, which ends there: the module, label or PIN would be cut short.
        guard splitting(text, on: "%00").count == 1 else { throw ParseError(message: "'\(shown)' holds a NUL byte (%00)") }
        try Self.checkQuery(text)
        guard let uri = p11_kit_uri_new() else { throw ParseError(message: "out of memory") }
        defer { p11_kit_uri_free(uri) }
        let rc = p11_kit_uri_parse(text, P11_KIT_URI_FOR_ANY, uri)
        guard rc == P11_KIT_URI_OK.rawValue else {
            throw ParseError(message: "'\(shown)' is not a PKCS#11 URI (\(String(cString: p11_kit_uri_message(rc))))")
        }
        guard p11_kit_uri_any_unrecognized(uri) == 0 else {
            throw ParseError(message: "'\(shown)' has an attribute p11-kit does not know")
        }
        self.text = text
        let path = p11_kit_uri_get_module_path(uri).map { String(cString: $0) }
        let name = p11_kit_uri_get_module_name(uri).map { String(cString: $0) }
        if let path {
            guard path.hasPrefix("/") else {
                throw ParseError(message: "module-path '\(shortened(path))' must be an absolute path (module-name=NAME names a module)")
            }
            try Self.refuseControls(path, "module-path")
        }
        if let name {
            try Self.refuseControls(name, "module-name")
            guard !name.contains("/") else { throw ParseError(message: "module-name '\(shortened(name))' must be a name, not a path (module-path=...)") }
        }
        if remote {
            modulePath = Self.remoteClientModule
        } else if let path {
            modulePath = path
        } else if let name {
            modulePath = Self.resolveModuleName(name)
        } else {
            throw ParseError(message: "'\(shown)' names no module (add ?module-path=... or ?module-name=...)")
        }
        pinValue = p11_kit_uri_get_pin_value(uri).map { String(cString: $0) }
        if pinValue?.isEmpty == true { throw ParseError(message: "'\(shown)': pin-value is empty") }
        let token = p11_kit_uri_get_token_info(uri)!.pointee
        tokenLabel = fieldString(token.label).isEmpty ? nil : fieldString(token.label)
        pinSource = p11_kit_uri_get_pin_source(uri).map { String(cString: $0) }
        if let pinSource {
            try Self.refuseControls(pinSource, "pin-source")
            guard Secret.pinSourcePath(pinSource).hasPrefix("/") else {
                throw ParseError(message: "pin-source '\(shortened(pinSource))' must be an absolute path (file:/...)")
            }
        }
    }

    /// Attributes after `?`: only those RFC 7512 defines, each at most once, none empty.
    static func checkQuery(_ text: String) throws(ParseError) {
        guard let question = text.firstIndex(of: "?") else { return }
        var seen: Set<String> = []
        for pair in text[text.index(after: question)...].split(separator: "&", omittingEmptySubsequences: false) {
            let name = String(pair.prefix(while: { $0 != "=" }))
            guard queryAttributes.contains(name) else {
                let shown = name.unicodeScalars.contains(where: isControl) ? "?" : shortened(name)
                throw ParseError(message: "'\(shortened(redacted(text)))': unknown attribute '\(shown)' after '?' (expected \(queryAttributes.sorted().joined(separator: ", ")))")
            }
            guard seen.insert(name).inserted else { throw ParseError(message: "'\(shortened(redacted(text)))': \(name) is given twice") }
            guard pair.count > name.count + 1 else { throw ParseError(message: "'\(shortened(redacted(text)))': \(name) is empty") }
        }
    }

    /// A decoded value (%0A and the like) with control characters is refused, without showing it.
    static func refuseControls(_ value: String, _ attribute: String) throws(ParseError) {
        if let control = value.unicodeScalars.first(where: isControl) {
            throw ParseError(message: "\(attribute) holds a control character (\(codePoint(control)))")
        }
    }

    /// p11-kit's client for tokens served by `p11-kit server`.
    public static let remoteClientModule = "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so"

    /// The URI as it can be shown in logs: any pin-value replaced.
    public var displayText: String { Self.redacted(text) }

    /// Every `pin-value=...`, after `?`/`&` or in the path after `:`/`;` (p11-kit takes it there too), hidden.
    static func redacted(_ text: String) -> String {
        let marker = Array("pin-value=".utf8)
        let bytes = Array(text.utf8)
        var shown: [UInt8] = []
        var i = 0
        while i < bytes.count {
            let starts = i + marker.count <= bytes.count && Array(bytes[i..<i + marker.count]) == marker
                && (i == 0 || [UInt8(ascii: ":"), UInt8(ascii: ";"), UInt8(ascii: "?"), UInt8(ascii: "&")].contains(bytes[i - 1]))
            guard starts else {
                shown.append(bytes[i])
                i += 1
                continue
            }
            shown += Array("pin-value=(hidden)".utf8)
            i += marker.count
            while i < bytes.count, ![UInt8(ascii: ";"), UInt8(ascii: "?"), UInt8(ascii: "&")].contains(bytes[i]) { i += 1 }
        }
        return String(decoding: shown, as: UTF8.self)
    }

    /// module-name=NAME: p11-kit's registration of NAME if there is one, else NAME.so on the loader's path.
    static func resolveModuleName(_ name: String) -> String {
        for dir in ["/etc/pkcs11/modules", "/usr/share/p11-kit/modules"] {
            if let text = readTextFile("\(dir)/\(name).module") {
                for line in text.split(separator: "\n") {
                    let trimmed = line.trimmed
                    if trimmed.hasPrefix("module:") { return String(trimmed.dropFirst("module:".count)).trimmed }
                }
            }
        }
        return name.hasSuffix(".so") ? name : "\(name).so"
    }

    /// Does this URI select the token behind these infos?
    func matches(module: inout CK_INFO, slot: inout CK_SLOT_INFO, token: inout CK_TOKEN_INFO) -> Bool {
        guard let uri = p11_kit_uri_new() else { return false }
        defer { p11_kit_uri_free(uri) }
        guard p11_kit_uri_parse(text, P11_KIT_URI_FOR_ANY, uri) == P11_KIT_URI_OK.rawValue else { return false }
        return p11_kit_uri_match_module_info(uri, &module) == 1
            && p11_kit_uri_match_slot_info(uri, &slot) == 1
            && p11_kit_uri_match_token_info(uri, &token) == 1
    }
}

/// `text` cut at each occurrence of `separator`.
func splitting(_ text: String, on separator: String) -> [String] {
    let bytes = Array(text.utf8)
    let sep = Array(separator.utf8)
    var parts: [String] = []
    var start = 0
    var i = 0
    while i + sep.count <= bytes.count {
        if Array(bytes[i..<i + sep.count]) == sep {
            parts.append(String(decoding: bytes[start..<i], as: UTF8.self))
            i += sep.count
            start = i
        } else {
            i += 1
        }
    }
    parts.append(String(decoding: bytes[start...], as: UTF8.self))
    return parts
}

/// `250ms`, `2s`, `1m`, `12h`, `30d`, or a bare number of seconds: digits only (no sign). A number too large for the
/// arithmetic saturates, so that the caller's range check refuses it instead of the multiplication trapping.
func parseDuration(_ text: String) -> Duration? {
    let (digits, millisecondsPerUnit): (Substring, Int) =
        text.hasSuffix("ms") ? (text.dropLast(2), 1)
        : text.hasSuffix("s") ? (text.dropLast(1), 1000)
        : text.hasSuffix("m") ? (text.dropLast(1), 60_000)
        : text.hasSuffix("h") ? (text.dropLast(1), 3_600_000)
        : text.hasSuffix("d") ? (text.dropLast(1), 86_400_000)
        : (text[...], 1000)
    guard let n = decimal(digits) else { return nil }
    let (milliseconds, overflow) = n.multipliedReportingOverflow(by: millisecondsPerUnit)
    return .milliseconds(overflow ? Int.max : milliseconds)
}

/// `65536`, `64k`, `1m`, `1g` (binary units): digits only (no sign); saturates like `parseDuration`.
func parseSize(_ text: String) -> Int? {
    let lower = text.lowercased()
    let (digits, scale): (Substring, Int) =
        lower.hasSuffix("k") ? (lower.dropLast(), 1 << 10)
        : lower.hasSuffix("m") ? (lower.dropLast(), 1 << 20)
        : lower.hasSuffix("g") ? (lower.dropLast(), 1 << 30)
        : (lower[...], 1)
    guard let n = decimal(digits) else { return nil }
    let (bytes, overflow) = n.multipliedReportingOverflow(by: scale)
    return overflow ? Int.max : bytes
}

/// ASCII digits only; a number past Int.max is Int.max.
func decimal(_ text: Substring) -> Int? {
    guard !text.isEmpty, text.utf8.allSatisfy({ $0 >= UInt8(ascii: "0") && $0 <= UInt8(ascii: "9") }) else { return nil }
    return Int(text) ?? Int.max
}

/// `1ms`, `10ms`, `60m` for the bounds in messages, in units the file accepts.
func durationText(_ duration: Duration) -> String {
    let milliseconds = duration.components.seconds * 1000 + duration.components.attoseconds / 1_000_000_000_000_000
    if milliseconds % 86_400_000 == 0 { return "\(milliseconds / 86_400_000)d" }
    if milliseconds % 3_600_000 == 0 { return "\(milliseconds / 3_600_000)h" }
    if milliseconds % 60_000 == 0 { return "\(milliseconds / 60_000)m" }
    if milliseconds % 1000 == 0 { return "\(milliseconds / 1000)s" }
    return "\(milliseconds)ms"
}

/// `0`, `64k`, `1g`: a size as the file writes it, for the bounds in messages.
func sizeSetting(_ bytes: Int) -> String {
    for (unit, scale) in [("g", 1 << 30), ("m", 1 << 20), ("k", 1 << 10)] where bytes >= scale && bytes % scale == 0 {
        return "\(bytes / scale)\(unit)"
    }
    return "\(bytes)"
}

/// `0`, `4 KiB`, `1 GiB` for file size limits in messages.
func sizeText(_ bytes: Int) -> String {
    for (unit, scale) in [("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] where bytes >= scale && bytes % scale == 0 {
        return "\(bytes / scale) \(unit)"
    }
    return bytes == 0 ? "0" : bytes == 1 ? "1 byte" : "\(bytes) bytes"
}

/// `text` for a message: at most 100 characters (a value may be a megabyte long).
func shortened(_ text: String) -> String {
    text.count <= 100 ? text : String(text.prefix(100)) + "..."
}

/// C0, DEL and C1 control characters.
func isControl(_ scalar: Unicode.Scalar) -> Bool { scalar.properties.generalCategory == .control }

/// `U+001B`: a character named without writing it (it could be a terminal escape).
func codePoint(_ scalar: Unicode.Scalar) -> String {
    let hex = String(scalar.value, radix: 16, uppercase: true)
    return "U+" + String(repeating: "0", count: max(0, 4 - hex.count)) + hex
}

func stripComment(_ line: Substring) -> Substring {
    guard let hash = line.firstIndex(of: "#") else { return line }
    return line[..<hash]
}

extension StringProtocol {
    var trimmed: String {
        let scalars = unicodeScalars
        guard let first = scalars.firstIndex(where: { !$0.properties.isWhitespace }) else { return "" }
        let last = scalars.lastIndex(where: { !$0.properties.isWhitespace })!
        return String(String.UnicodeScalarView(scalars[first...last]))
    }
}

// MARK: - Reading small files safely

/// Why a file was not read: the system's error, its kind, or its size. Never its contents.
public struct FileReadError: Error, CustomStringConvertible, Sendable {
    public let description: String

    static func system(_ code: Int32) -> FileReadError { FileReadError(description: "cannot read: \(errorText(code))") }
    static func kind(_ mode: mode_t) -> FileReadError {
        FileReadError(description: "cannot read: \(fileKind(mode)), not a regular file")
    }
    static func tooLarge(_ limit: Int) -> FileReadError {
        FileReadError(description: "cannot read: larger than \(sizeText(limit))")
    }
}

/// Files p11ha reads are small (the configuration, PINs, p11-kit module registrations, status files).
public let defaultFileSizeLimit = 1 << 20

/// Opens `path` for reading, refusing at once anything but a regular file of at most `limit` bytes: a FIFO
/// never blocks the open (O_NONBLOCK, and it is refused before it is opened), a device is never read. The
/// caller closes the descriptor.
private func openRegularFile(_ path: String, limit: Int) throws(FileReadError) -> (fd: Int32, size: Int) {
    // Refused before open: opening some devices does something (a tape rewinds).
    var info = stat()
    guard stat(path, &info) == 0 else { throw .system(errno) }
    guard isRegularFile(info.st_mode) else { throw .kind(info.st_mode) }
    let fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC | O_NOCTTY)
    guard fd >= 0 else { throw .system(errno) }
    // What was opened, in case the path changed since stat.
    guard fstat(fd, &info) == 0 else {
        let code = errno
        close(fd)
        throw .system(code)
    }
    guard isRegularFile(info.st_mode) else {
        close(fd)
        throw .kind(info.st_mode)
    }
    guard info.st_size <= limit else {
        close(fd)
        throw .tooLarge(limit)
    }
    return (fd, Int(info.st_size))
}

/// The size of the regular file at `path` (at most `limit`), which is opened but not read.
func inspectRegularFile(_ path: String, limit: Int) throws(FileReadError) -> Int {
    let (fd, size) = try openRegularFile(path, limit: limit)
    close(fd)
    return size
}

/// Reads the regular file at `path` (at most `limit` bytes, else an error) into one buffer and hands it to
/// `body`; the buffer, and any it outgrew, is zeroed before it is freed, so that it can hold a PIN.
func withRegularFileContents<R>(_ path: String, limit: Int,
                                _ body: (UnsafeRawBufferPointer) -> R) throws(FileReadError) -> R {
    let (fd, size) = try openRegularFile(path, limit: limit)
    defer { close(fd) }
    // One byte more than announced, to see the end (or a file that grew, or one like /proc's that says 0).
    var buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: min(size, limit) + 1, alignment: 1)
    defer {
        explicit_bzero(buffer.baseAddress!, buffer.count)
        buffer.deallocate()
    }
    var count = 0
    while true {
        if count == buffer.count {
            guard buffer.count <= limit else { throw .tooLarge(limit) }
            let larger = UnsafeMutableRawBufferPointer.allocate(byteCount: min(buffer.count * 2, limit + 1), alignment: 1)
            larger.baseAddress!.copyMemory(from: buffer.baseAddress!, byteCount: count)
            explicit_bzero(buffer.baseAddress!, buffer.count)
            buffer.deallocate()
            buffer = larger
        }
        let n = read(fd, buffer.baseAddress! + count, buffer.count - count)
        if n < 0 {
            let code = errno
            if code == EINTR { continue }
            throw .system(code)
        }
        if n == 0 { break }
        count += n
    }
    return body(UnsafeRawBufferPointer(rebasing: buffer[0..<count]))
}

/// The bytes of the regular file at `path`, at most `limit` of them.
func readRegularFile(_ path: String, limit: Int = defaultFileSizeLimit) throws(FileReadError) -> [UInt8] {
    try withRegularFileContents(path, limit: limit) { Array($0) }
}

/// Reads a whole regular file of at most `limit` bytes, decoded as UTF-8; nil when it cannot be read.
func readTextFile(_ path: String, limit: Int = defaultFileSizeLimit) -> String? {
    guard let bytes = readFileBytes(path, limit: limit) else { return nil }
    return String(decoding: bytes, as: UTF8.self)
}

/// The bytes of a regular file of at most `limit` bytes; nil when it cannot be read, is not a regular file
/// (a FIFO, a device, a directory), or is larger.
func readFileBytes(_ path: String, limit: Int = defaultFileSizeLimit) -> [UInt8]? {
    try? readRegularFile(path, limit: limit)
}

func isRegularFile(_ mode: mode_t) -> Bool { (mode & S_IFMT) == S_IFREG }

/// "a FIFO", "a directory", ... for messages.
func fileKind(_ mode: mode_t) -> String {
    switch mode & S_IFMT {
    case S_IFREG: return "a regular file"
    case S_IFDIR: return "a directory"
    case S_IFIFO: return "a FIFO"
    case S_IFCHR: return "a character device"
    case S_IFBLK: return "a block device"
    case S_IFSOCK: return "a socket"
    default: return "not a file"
    }
}

/// The directory a path is in: `/var/log` for `/var/log/p11ha.log`, `/` for `/p11ha.log`.
func parentDirectory(_ path: String) -> String {
    guard let slash = path.lastIndex(of: "/"), slash != path.startIndex else { return "/" }
    return String(path[..<slash])
}

func errorText(_ code: Int32) -> String { String(cString: strerror(code)) }
