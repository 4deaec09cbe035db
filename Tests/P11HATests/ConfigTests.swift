// The configuration file: what it accepts, and the file:line it names for what it refuses.
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

    @Test("a file that cannot be read is named")
    func unreadable() {
        #expect {
            _ = try Config.load(path: "/nonexistent/p11ha.conf")
        } throws: { error in
            String(describing: error).hasPrefix("/nonexistent/p11ha.conf: cannot read")
        }
    }
}
