// The HA event log: stable event names, one line each, to stderr, syslog or a file. Never a PIN or key material.
import CInterop
import Glibc
import Synchronization

public enum LogLevel: Int, Sendable, Comparable {
    case debug, info, warning, error

    public init?(name: String) {
        switch name {
        case "debug": self = .debug
        case "info": self = .info
        case "warning", "warn": self = .warning
        case "error": self = .error
        default: return nil
        }
    }

    public var name: String { ["debug", "info", "warning", "error"][rawValue] }
    public static func < (a: LogLevel, b: LogLevel) -> Bool { a.rawValue < b.rawValue }

    var syslogPriority: Int32 { [LOG_DEBUG, LOG_INFO, LOG_WARNING, LOG_ERR][rawValue] }
}

public enum LogDestination: Sendable, Equatable {
    case stderr
    case syslog
    case file(String)

    public init(_ text: String) {
        switch text {
        case "stderr": self = .stderr
        case "syslog": self = .syslog
        default: self = .file(text)
        }
    }
}

/// The process-wide log. Until a configuration is read, errors go to stderr.
/// UTC time with milliseconds, as in 2026-11-29T06:28:18.123Z.
func timestamp() -> String {
    var now = timespec()
    clock_gettime(CLOCK_REALTIME, &now)
    var seconds = now.tv_sec
    var parts = tm()
    gmtime_r(&seconds, &parts)
    func two(_ n: Int32) -> String { n < 10 ? "0\(n)" : "\(n)" }
    let millis = Int(now.tv_nsec) / 1_000_000
    let ms = millis < 10 ? "00\(millis)" : millis < 100 ? "0\(millis)" : "\(millis)"
    return "\(parts.tm_year + 1900)-\(two(parts.tm_mon + 1))-\(two(parts.tm_mday))T\(two(parts.tm_hour)):\(two(parts.tm_min)):\(two(parts.tm_sec)).\(ms)Z"
}

public enum Log {
    struct Sink {
        var destination: LogDestination = .stderr
        var level: LogLevel = .info
        var fd: Int32 = 2
    }

    /// syslog facilities by name, for `log-facility`.
    public static let facilities: [String: Int32] = [
        "user": LOG_USER, "daemon": LOG_DAEMON, "auth": LOG_AUTH, "authpriv": LOG_AUTHPRIV,
        "local0": LOG_LOCAL0, "local1": LOG_LOCAL1, "local2": LOG_LOCAL2, "local3": LOG_LOCAL3,
        "local4": LOG_LOCAL4, "local5": LOG_LOCAL5, "local6": LOG_LOCAL6, "local7": LOG_LOCAL7,
    ]

    /// Process-wide, so a child after fork logs too (see Fork.swift).
    static let sink = ProcessLock(Sink())

    public static func configure(_ destination: LogDestination, level: LogLevel, facility: Int32 = LOG_USER) {
        sink.withLock { sink in
            if case .file = sink.destination, sink.fd > 2 { close(sink.fd) }
            sink.destination = destination
            sink.level = level
            sink.fd = 2
            switch destination {
            case .stderr: break
            case .syslog: openlog("p11ha", LOG_PID, facility)
            case .file(let path):
                // Checked when the configuration was read, but the path may have changed since: a FIFO must not
                // block the open, and only a regular file is written.
                let fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC | O_NONBLOCK | O_NOCTTY, 0o600)
                var info = stat()
                if fd >= 0, fstat(fd, &info) == 0, info.st_mode & S_IFMT == S_IFREG {
                    sink.fd = fd
                } else {
                    if fd >= 0 { close(fd) }
                    sink.destination = .stderr
                }
            }
        }
    }

    /// Writes `event` with its details. `details` must never contain a PIN or key material.
    public static func event(_ level: LogLevel, _ event: String, _ details: String = "") {
        sink.withLock { sink in
            guard level >= sink.level else { return }
            let text = details.isEmpty ? event : "\(event) \(details)"
            if case .syslog = sink.destination {
                text.withCString { withVaList([$0]) { vsyslog(level.syslogPriority, "%s", $0) } }
                return
            }
            let line = "\(timestamp()) p11ha[\(getpid())] \(level.name): \(text)\n"
            var bytes = Array(line.utf8)
            bytes.withUnsafeMutableBytes { raw in
                var offset = 0
                while offset < raw.count {
                    let n = write(sink.fd, raw.baseAddress! + offset, raw.count - offset)
                    if n <= 0 { break }
                    offset += n
                }
            }
        }
    }
}
