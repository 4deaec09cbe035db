// Replication: the replication key's set-up, generated keys on every member, and p11hactl sync.
import Foundation
import Testing

@Suite struct Replication {
    @Test("domain create puts one replication key on every member, and domain check proves it")
    func domainCreateAndCheck() throws {
        let members = try Members(replicationKey: false)
        let before = try p11hactl(["domain", "check", "--group", members.group], members)
        #expect(before.status == 1, "no member holds a replication key yet:\n\(before.output)")
        try members.createDomain()
        let after = try p11hactl(["domain", "check", "--group", members.group], members)
        #expect(after.status == 0, "\(after.output)")
        let prints = after.stdout.split(separator: "\n").filter { $0.contains("replication key ") }
            .map { $0.split(separator: " ").last.map(String.init) ?? "" }
        #expect(prints.count == 3 && Set(prints).count == 1, "\(after.stdout)")
        #expect(!after.output.contains(members.soPIN) && !after.output.contains(members.userPIN))
        let again = try p11hactl(["domain", "create", "--group", members.group,
                                  "--so-pin-source", try pinFile(members, "so.pin", members.soPIN)], members)
        #expect(again.status == 0, "domain create is idempotent:\n\(again.output)")
    }

    @Test("domain check detects a member whose replication key differs")
    func domainCheckDetectsDifference() throws {
        let members = try Members()
        // Replace member-c's key: delete it there, then make a group of member-c alone and create a new one.
        let direct = try PKCS11Tool(module: Paths.softhsmModule, token: "member-c", members: members)
        let deleted = try direct(["--so-pin", members.soPIN, "--login", "--login-type", "so", "--delete-object",
                                  "--type", "secrkey", "--label", "p11ha replication key"], login: false)
        try #require(deleted.status == 0, "\(deleted.output)")
        let solo = members.dir + "/solo.conf"
        try "[group solo]\nmember = pkcs11:token=member-c?module-path=\(Paths.softhsmModule)\n".write(toFile: solo, atomically: true, encoding: .utf8)
        let created = try p11hactl(["domain", "create", "--group", "solo", "--config", solo,
                                    "--so-pin-source", try pinFile(members, "so.pin", members.soPIN)], members)
        try #require(created.status == 0, "\(created.output)")
        let check = try p11hactl(["domain", "check", "--group", members.group], members)
        #expect(check.status == 1, "\(check.output)")
        #expect(check.stdout.contains("DIFFERS"), "\(check.stdout)")
        let refused = try p11hactl(["domain", "create", "--group", members.group,
                                    "--so-pin-source", try pinFile(members, "so.pin", members.soPIN)], members)
        #expect(refused.status == 1 && refused.stderr.contains("different replication keys"), "\(refused.output)")
    }

    @Test("replication reads no key value: members see only generate, wrap under the replication key, and unwrap")
    func replicationPathIsWrapOnly() throws {
        let members = try Members()
        let spyLog = members.dir + "/spy.log"
        let spied = try String(contentsOfFile: members.p11haConf, encoding: .utf8)
            .replacingOccurrences(of: Paths.softhsmModule, with: Paths.pkcs11Spy)
        try members.rewriteConfig(spied)
        var environment = members.environment
        environment["PKCS11SPY"] = Paths.softhsmModule
        environment["PKCS11SPY_OUTPUT"] = spyLog
        let result = try scenario("replication", members, base: environment)
        #expect(result.status == 0, "\(result.stdout)\(result.stderr)")
        let calls = try String(contentsOfFile: spyLog, encoding: .utf8).components(separatedBy: "\n\n")
        let wraps = calls.filter { $0.contains(": C_WrapKey\n") }
        let unwraps = calls.filter { $0.contains(": C_UnwrapKey\n") }
        // Three generated keys (EC private, RSA private, AES token) and one session AES key, two other members each.
        #expect(unwraps.count >= 8, "\(unwraps.count) unwraps")
        for call in wraps + unwraps {
            #expect(call.contains("pMechanism->type = 0x0000210A") || call.contains("CKM_AES_KEY_WRAP_PAD"), "\(call)")
        }
        // Every key a member made (generated or unwrapped): none of their secret attributes was ever asked for.
        var keys = Set<String>()
        for call in calls where call.contains(": C_GenerateKey") || call.contains(": C_UnwrapKey\n") {
            for line in call.split(separator: "\n") where line.hasPrefix("[out] hKey = ") || line.hasPrefix("[out] hPrivateKey = ") {
                keys.insert(String(line.split(separator: "=").last!).trimmingCharacters(in: .whitespaces))
            }
        }
        #expect(keys.count >= 4, "the trace shows the keys made: \(keys)")
        let secretParts = ["CKA_VALUE ", "CKA_PRIVATE_EXPONENT", "CKA_PRIME_1", "CKA_PRIME_2", "CKA_EXPONENT_1", "CKA_COEFFICIENT"]
        for call in calls where call.contains(": C_GetAttributeValue\n") {
            let object = call.split(separator: "\n").first { $0.hasPrefix("[in] hObject = ") }
                .map { String($0.split(separator: "=").last!).trimmingCharacters(in: .whitespaces) }
            guard let object, keys.contains(object) else { continue }
            for part in secretParts { #expect(!call.contains(part), "p11ha asked a member for \(part) of a key:\n\(call)") }
        }
    }

    @Test("without a replication key, generating a token key fails with a clear error naming the set-up")
    func noReplicationKey() throws {
        let members = try Members(replicationKey: false)
        let result = try scenario("no-replication-key", members)
        #expect(result.status == 0, "\(result.stdout)\(result.stderr)")
        let log = members.log
        #expect(log.contains("replication-key-missing") && log.contains("p11hactl domain create --group \(members.group)"), "\(log)")
    }

    @Test("sync --dry-run reports what members lack without copying; sync copies it; conflicts are reported")
    func syncDivergentMembers() throws {
        let members = try Members()
        // Objects made directly on member-a only: an extractable key, a non-extractable one, a certificate-less
        // public key and a data object; and on member-b and member-c, two different keys under one label and ID.
        let a = try PKCS11Tool(module: Paths.softhsmModule, token: "member-a", members: members)
        for args in [["--keygen", "--key-type", "AES:32", "--label", "only-a-aes", "--id", "a1", "--extractable"],
                     ["--keygen", "--key-type", "AES:32", "--label", "only-a-stuck", "--id", "a2"],
                     ["--keypairgen", "--key-type", "EC:prime256v1", "--label", "only-a-ec", "--id", "a3"]] {
            let r = try a(args, login: true)
            try #require(r.status == 0, "\(r.output)")
        }
        for token in ["member-b", "member-c"] {
            let r = try PKCS11Tool(module: Paths.softhsmModule, token: token, members: members)(
                ["--keygen", "--key-type", "AES:16", "--label", "clash", "--id", "c1", "--extractable"], login: true)
            try #require(r.status == 0, "\(r.output)")
        }
        let pin = try pinFile(members, "user.pin", members.userPIN)
        let dry = try p11hactl(["sync", "--group", members.group, "--dry-run", "--pin-source", pin], members)
        #expect(dry.stdout.contains("would copy") && dry.stdout.contains("only-a-aes"), "\(dry.output)")
        #expect(dry.stdout.contains("cannot copy: secret key label=\"only-a-stuck\""), "\(dry.stdout)")
        #expect(dry.stdout.contains("conflict: secret key label=\"clash\""), "\(dry.stdout)")
        #expect(dry.status == 1, "conflicts and uncopyable keys make sync exit 1")
        let listB = try PKCS11Tool(module: Paths.softhsmModule, token: "member-b", members: members)(["-O"], login: true)
        #expect(!listB.stdout.contains("only-a-aes"), "--dry-run copied nothing")

        let sync = try p11hactl(["sync", "--group", members.group, "--pin-source", pin], members)
        #expect(sync.status == 1, "\(sync.output)")
        for token in ["member-b", "member-c"] {
            let list = try PKCS11Tool(module: Paths.softhsmModule, token: token, members: members)(["-O"], login: true)
            #expect(list.stdout.contains("only-a-aes"), "\(token) received the extractable key:\n\(list.stdout)")
            #expect(list.stdout.contains("only-a-ec"), "\(token) received the EC public key:\n\(list.stdout)")
            #expect(!list.stdout.contains("only-a-stuck"), "\(token) cannot receive a non-extractable key")
        }
        let again = try p11hactl(["sync", "--group", members.group, "--dry-run", "--pin-source", pin], members)
        #expect(!again.stdout.contains("would copy [") || !again.stdout.contains("only-a-aes"), "nothing left to copy for only-a-aes:\n\(again.stdout)")
        #expect(!(dry.output + sync.output).contains(members.userPIN))
    }
}
