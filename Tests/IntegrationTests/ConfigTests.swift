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
