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

    public static func load(path: String) throws(ConfigError) -> Config {
        guard let text = readTextFile(path) else {
            throw ConfigError(file: path, line: 0, message: "cannot read: \(String(cString: strerror(errno)))")
        }
        return try parse(text, path: path)
    }

    /// Where the log goes according to a file that may not parse: so that its own errors reach that log.
    public static func logDestination(inFileAt path: String) -> (LogDestination, LogLevel)? {
        guard let text = readTextFile(path) else { return nil }
        var inGlobal = false
        var result: (LogDestination, LogLevel)? = nil
        for rawLine in text.split(separator: "\n") {
            let line = stripComment(rawLine).trimmed
            if line.hasPrefix("[") { inGlobal = line == "[p11ha]" }
            guard inGlobal, let equals = line.firstIndex(of: "=") else { continue }
            let key = String(line[..<equals]).trimmed
            let value = String(line[line.index(after: equals)...]).trimmed
            if key == "log", !value.isEmpty { result = (LogDestination(value), result?.1 ?? .info) }
            if key == "log-level", let level = LogLevel(name: value) { result = (result?.0 ?? .syslog, level) }
        }
        return result
    }

    public static func parse(_ text: String, path: String) throws(ConfigError) -> Config {
        var config = Config(path: path)
        enum Section { case none, global, group(Int) }
        var section = Section.none
        var lineNumber = 0
        func fail(_ message: String) -> ConfigError { ConfigError(file: path, line: lineNumber, message: message) }

        for rawLine in text.split(separator: "\n", omittingEmptySubsequences: false) {
            lineNumber += 1
            let line = stripComment(rawLine).trimmed
            if line.isEmpty { continue }
            if line.hasPrefix("[") {
                guard line.hasSuffix("]") else { throw fail("section header without closing ']'") }
                let words = line.dropFirst().dropLast().split(separator: " ", omittingEmptySubsequences: true)
                switch (words.first.map(String.init), words.count) {
                case ("p11ha", 1):
                    section = .global
                case ("group", 2):
                    let name = String(words[1])
                    if config.groups.contains(where: { $0.name == name }) { throw fail("group '\(name)' is defined twice") }
                    config.groups.append(GroupConfig(name: name, label: name, line: lineNumber))
                    section = .group(config.groups.count - 1)
                default:
                    throw fail("unknown section '\(line)' (expected [p11ha] or [group NAME])")
                }
                continue
            }
            guard let equals = line.firstIndex(of: "=") else { throw fail("expected 'key = value'") }
            let key = String(line[..<equals]).trimmed
            let value = String(line[line.index(after: equals)...]).trimmed
            if value.isEmpty { throw fail("'\(key)' has no value") }
            switch section {
            case .none:
                throw fail("'\(key)' appears before any section")
            case .global:
                switch key {
                case "log": config.log = LogDestination(value)
                case "log-level":
                    guard let level = LogLevel(name: value) else { throw fail("log-level must be debug, info, warning or error") }
                    config.logLevel = level
                case "log-facility":
                    guard let facility = Log.facilities[value] else {
                        throw fail("log-facility must be one of \(Log.facilities.keys.sorted().joined(separator: ", "))")
                    }
                    config.logFacility = facility
                case "operation-timeout":
                    if value == "off" {
                        config.operationTimeout = nil
                    } else {
                        guard let d = parseDuration(value), d > .zero else { throw fail("operation-timeout must be a duration like 250ms, 5s or 1m, or off") }
                        config.operationTimeout = d
                    }
                case "recovery-interval":
                    guard let d = parseDuration(value), d > .zero else { throw fail("recovery-interval must be a duration like 500ms, 2s or 1m") }
                    config.recoveryInterval = d
                case "replay-buffer":
                    guard let n = parseSize(value) else { throw fail("replay-buffer must be a size like 65536, 64k or 1m") }
                    config.replayBuffer = n
                case "lock-dir":
                    guard value.hasPrefix("/") else { throw fail("lock-dir must be an absolute path") }
                    // Verified as every use will verify it (HostFiles.swift), so that a directory other users can
                    // write to is refused here, naming this line, rather than at the first write.
                    if let problem = HostDirectory(path: value).problem() { throw fail("\(problem.event): \(value): \(problem.reason)") }
                    config.lockDirectory = value
                case "generated-keys":
                    guard let policy = GeneratedKeys(rawValue: value) else { throw fail("generated-keys must be replicate or refuse") }
                    config.generatedKeys = policy
                default: throw fail("unknown key '\(key)' in [p11ha]")
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
                        if parts.count == 2 {
                            let address = parts[1].trimmed
                            guard address.hasPrefix("unix:path=") || address.hasPrefix("tcp:") else {
                                throw TokenURI.ParseError(message: "via: '\(address)' is not a p11-kit address (unix:path=... or tcp:...)")
                            }
                            member.via = address
                        }
                        config.groups[index].members.append(member)
                    } catch {
                        throw fail("\(key): \(error.message)")
                    }
                default: throw fail("unknown key '\(key)' in [group \(config.groups[index].name)]")
                }
            }
        }
        lineNumber = 0
        if config.groups.isEmpty { throw fail("no [group NAME] section") }
        for group in config.groups where !group.members.contains(where: { !$0.standby }) {
            throw ConfigError(file: path, line: group.line, message: "group '\(group.name)' has no member (standby members alone do not make a group)")
        }
        let labels = config.groups.map(\.label)
        if Set(labels).count != labels.count { throw fail("two groups have the same label") }
        return config
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

    /// `remote`: the token is reached through p11-kit's client module, so no module needs to be named.
    public init(parsing text: String, remote: Bool = false) throws(ParseError) {
        guard let uri = p11_kit_uri_new() else { throw ParseError(message: "out of memory") }
        defer { p11_kit_uri_free(uri) }
        let rc = p11_kit_uri_parse(text, P11_KIT_URI_FOR_ANY, uri)
        guard rc == P11_KIT_URI_OK.rawValue else {
            throw ParseError(message: "'\(Self.redacted(text))' is not a PKCS#11 URI (\(String(cString: p11_kit_uri_message(rc))))")
        }
        self.text = text
        if remote {
            modulePath = Self.remoteClientModule
        } else if let path = p11_kit_uri_get_module_path(uri) {
            modulePath = String(cString: path)
        } else if let name = p11_kit_uri_get_module_name(uri) {
            modulePath = Self.resolveModuleName(String(cString: name))
        } else {
            throw ParseError(message: "'\(Self.redacted(text))' names no module (add ?module-path=... or ?module-name=...)")
        }
        pinValue = p11_kit_uri_get_pin_value(uri).map { String(cString: $0) }
        let token = p11_kit_uri_get_token_info(uri)!.pointee
        tokenLabel = fieldString(token.label).isEmpty ? nil : fieldString(token.label)
        pinSource = p11_kit_uri_get_pin_source(uri).map { String(cString: $0) }
    }

    /// p11-kit's client for tokens served by `p11-kit server`.
    public static let remoteClientModule = "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so"

    /// The URI as it can be shown in logs: any pin-value replaced.
    public var displayText: String { Self.redacted(text) }

    static func redacted(_ text: String) -> String {
        var parts = text.split(separator: "?", maxSplits: 1).map(String.init)
        guard parts.count == 2 else { return text }
        parts[1] = parts[1].split(separator: "&").map {
            $0.hasPrefix("pin-value=") ? "pin-value=(hidden)" : String($0)
        }.joined(separator: "&")
        return parts.joined(separator: "?")
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

/// `250ms`, `2s`, `1m`, or a bare number of seconds.
func parseDuration(_ text: String) -> Duration? {
    for (suffix, scale) in [("ms", 1), ("s", 1000), ("m", 60_000)] where text.hasSuffix(suffix) {
        guard let n = Int(text.dropLast(suffix.count)), n >= 0 else { return nil }
        return .milliseconds(n * scale)
    }
    return Int(text).map { .seconds($0) }
}

/// `65536`, `64k`, `1m`.
func parseSize(_ text: String) -> Int? {
    let lower = text.lowercased()
    for (suffix, scale) in [("k", 1 << 10), ("m", 1 << 20)] where lower.hasSuffix(suffix) {
        return Int(lower.dropLast()).map { $0 * scale }
    }
    return Int(lower)
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

/// Reads a whole file with read(2); nil when it cannot be opened.
func readTextFile(_ path: String) -> String? {
    guard let bytes = readFileBytes(path) else { return nil }
    return String(decoding: bytes, as: UTF8.self)
}

func readFileBytes(_ path: String) -> [UInt8]? {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { return nil }
    defer { close(fd) }
    var result: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 4096)
    while true {
        let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        if n < 0 { return nil }
        if n == 0 { break }
        result.append(contentsOf: chunk[0..<n])
    }
    return result
}
