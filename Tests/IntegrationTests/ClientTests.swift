// User stories through real PKCS#11 clients (pkcs11-tool, p11tool, OpenSSL's pkcs11 engine) loading libp11ha.so.
import Foundation
import Testing

@Suite("Real clients see a group as one token")
struct ClientTests {
    @Test("pkcs11-tool -L shows exactly one slot, whose token carries the group's label")
    func listsOneSlot() throws {
        let members = try Members(group: "ha-slots")
        let tool = try PKCS11Tool(module: Paths.debugModule, token: nil, members: members)

        let result = try tool(["-L"])

        try #require(result.status == 0, "pkcs11-tool -L failed:\n\(result.output)")
        let slots = result.stdout.split(separator: "\n").filter { $0.hasPrefix("Slot ") }
        #expect(slots.count == 1, "expected one slot:\n\(result.stdout)")
        // Not one of the members' tokens (member-a, ...): only the group's virtual token.
        #expect(fieldValues("token label", in: result.stdout) == ["ha-slots"], "\(result.stdout)")
    }

    @Test("RSA-2048 and EC P-256 key pairs generated through the group are listed once and sign what openssl verifies")
    func generatedKeysSign() throws {
        let members = try Members(group: "ha-keys")
        let tool = try PKCS11Tool(module: Paths.debugModule, token: members.group, members: members)
        let keys = [KeyPair.rsa, KeyPair.ec]

        for key in keys {
            let generated = try tool(
                ["--keypairgen", "--key-type", key.keyType, "--id", key.id, "--label", key.label], login: true)
            try #require(generated.status == 0, "generating \(key.label) failed:\n\(generated.output)")
        }

        let listing = try tool(["-O"], login: true)
        try #require(listing.status == 0, "pkcs11-tool -O failed:\n\(listing.output)")
        let lines = listing.stdout.split(separator: "\n")
        for key in keys {
            let labelled = fieldValues("label", in: listing.stdout).filter { $0 == key.label }
            #expect(labelled.count == 2, "\(key.label): expected one private and one public key:\n\(listing.stdout)")
            for kind in ["Private Key Object; \(key.kind)", "Public Key Object; \(key.kind)"] {
                #expect(lines.filter { $0.hasPrefix(kind) }.count == 1, "expected one '\(kind)':\n\(listing.stdout)")
            }
        }

        // Every member shows each key alike, as SoftHSM itself lists it (usage, access flags such as "local",
        // public values): whichever member serves, the application sees one key.
        var blocks: [String: [String: String]] = [:]
        for token in members.tokenLabels {
            let listed = try runProcess("pkcs11-tool", ["--module", Paths.softhsmModule, "--token-label", token, "--login",
                                                        "--pin", members.userPIN, "-O"], environment: members.environment)
            try #require(listed.status == 0, "listing \(token) failed:\n\(listed.output)")
            var current: (head: String, lines: [String])? = nil
            func flush() {
                guard let current, let label = keys.map(\.label).first(where: { l in current.lines.contains { $0.contains("label:") && $0.hasSuffix(" " + l) } })
                else { return }
                blocks["\(current.head) \(label)", default: [:]][token] = current.lines.joined(separator: "\n")
            }
            for line in listed.stdout.split(separator: "\n").map(String.init) {
                if line.hasPrefix(" ") { current?.lines.append(line) } else { flush(); current = (line, []) }
            }
            flush()
        }
        #expect(blocks.count == 2 * keys.count, "\(blocks.keys.sorted())")
        for (key, byMember) in blocks.sorted(by: { $0.key < $1.key }) {
            #expect(byMember.count == members.tokenLabels.count && Set(byMember.values).count == 1,
                    "\(key) differs between members:\n\(byMember.sorted { $0.key < $1.key }.map { "\($0.key):\n\($0.value)" }.joined(separator: "\n"))")
        }

        let files = try Files(in: members.dir)
        for key in keys {
            let signature = files.path("\(key.label).sig")
            let input = key.signsDigest ? files.digest : files.message
            let signed = try tool(
                ["--sign", "--mechanism", key.mechanism, "--id", key.id, "--signature-format", "openssl",
                 "-i", input, "-o", signature],
                login: true)
            try #require(signed.status == 0, "signing with \(key.label) failed:\n\(signed.output)")
            let publicKey = try exportPublicKey(tool, id: key.id, to: files.path("\(key.label).pem"))
            try expectVerifies(signature: signature, of: files, publicKey: publicKey, key.label)
        }
    }

    @Test("pkcs11-tool --test passes through the group")
    func selfTestThroughGroup() throws {
        let members = try Members(group: "ha-selftest")
        try runSelfTest(PKCS11Tool(module: Paths.debugModule, token: members.group, members: members))
    }

    @Test("pkcs11-tool --test passes on a SoftHSM token directly, so a failure through the group is p11ha's")
    func selfTestDirect() throws {
        let members = try Members(count: 1, group: "ha-direct")
        try runSelfTest(PKCS11Tool(module: Paths.softhsmModule, token: members.tokenLabels[0], members: members))
    }

    @Test("p11tool --list-all lists each object of the group once, not once per member")
    func p11toolListsEachObjectOnce() throws {
        let members = try Members(group: "ha-p11tool")
        let tool = try PKCS11Tool(module: Paths.debugModule, token: members.group, members: members)
        let files = try Files(in: members.dir)
        // C_CreateObject puts a token object on every member: a module that lists per member shows it three times.
        for (label, extra) in [("obj-public", [String]()), ("obj-private", ["--private"])] {
            let content = files.path(label)
            try Data("content of \(label)\n".utf8).write(to: URL(fileURLWithPath: content))
            let created = try tool(
                ["--write-object", content, "--type", "data", "--label", label] + extra, login: true)
            try #require(created.status == 0, "creating \(label) failed:\n\(created.output)")
        }

        var environment = members.environment
        environment["GNUTLS_PIN"] = members.userPIN
        let result = try runProcess(
            "p11tool",
            ["--provider", Paths.debugModule, "--login", "--list-all", "pkcs11:token=\(members.group)"],
            environment: environment)

        try #require(result.status == 0, "p11tool --list-all failed:\n\(result.output)")
        #expect(fieldValues("Label", in: result.stdout).sorted() == ["obj-private", "obj-public"], "\(result.stdout)")
    }

    @Test("OpenSSL signs with a group key through the pkcs11 engine, and openssl verifies the signature")
    func opensslEngineSigns() throws {
        let members = try Members(group: "ha-openssl")
        let tool = try PKCS11Tool(module: Paths.debugModule, token: members.group, members: members)
        let generated = try tool(
            ["--keypairgen", "--key-type", "EC:prime256v1", "--id", "01", "--label", "engine-key"], login: true)
        try #require(generated.status == 0, "generating engine-key failed:\n\(generated.output)")

        let files = try Files(in: members.dir)
        let config = files.path("openssl.cnf")
        try writeOpenSSLConfig(module: Paths.debugModule, to: config)
        // The engine repeats the key URI in its errors: the PIN comes from a file, not pin-value.
        let pinFile = files.path("user.pin")
        try writeSecret(members.userPIN, to: pinFile)

        var environment = members.environment
        environment["OPENSSL_CONF"] = config
        let uri = "pkcs11:token=\(members.group);object=engine-key;type=private;pin-source=file:\(pinFile)"
        let signature = files.path("engine.sig")
        let signed = try runProcess(
            "openssl",
            ["pkeyutl", "-engine", "pkcs11", "-keyform", "engine", "-inkey", uri,
             "-sign", "-in", files.digest, "-out", signature],
            environment: environment)

        try #require(signed.status == 0, "openssl pkeyutl -sign through the engine failed:\n\(signed.output)")
        let publicKey = try exportPublicKey(tool, id: "01", to: files.path("engine-key.pem"))
        try expectVerifies(signature: signature, of: files, publicKey: publicKey, "engine-key")
    }
}

private struct KeyPair {
    let keyType: String
    let kind: String
    // pkcs11-tool ignores --label when it looks for the key to sign with: keys are told apart by --id.
    let id: String
    let label: String
    let mechanism: String
    /// CKM_ECDSA signs a digest; CKM_SHA256_RSA_PKCS hashes the message itself.
    let signsDigest: Bool

    static let rsa = KeyPair(
        keyType: "rsa:2048", kind: "RSA", id: "02", label: "rsa-key", mechanism: "SHA256-RSA-PKCS",
        signsDigest: false)
    static let ec = KeyPair(
        keyType: "EC:prime256v1", kind: "EC", id: "01", label: "ec-key", mechanism: "ECDSA", signsDigest: true)
}

/// A test's working files, all in its private directory: a random message, its SHA-256, and another message.
private struct Files {
    let dir: String
    var message: String { path("message") }
    var digest: String { path("message.sha256") }
    var otherMessage: String { path("other-message") }

    init(in dir: String) throws {
        self.dir = dir
        for name in ["message", "other-message"] {
            let bytes = (0..<4096).map { _ in UInt8.random(in: 0...255) }
            try Data(bytes).write(to: URL(fileURLWithPath: dir + "/" + name))
        }
        let hashed = try runProcess("openssl", ["dgst", "-sha256", "-binary", "-out", digest, message])
        try #require(hashed.status == 0, "openssl dgst failed:\n\(hashed.output)")
    }

    func path(_ name: String) -> String { dir + "/" + name }
}

/// Reads a public key through the module (DER SubjectPublicKeyInfo) and converts it to PEM for openssl.
private func exportPublicKey(_ tool: PKCS11Tool, id: String, to pem: String) throws -> String {
    let der = pem + ".der"
    let read = try tool(["--read-object", "--type", "pubkey", "--id", id, "-o", der])
    try #require(read.status == 0, "reading public key \(id) failed:\n\(read.output)")
    let converted = try runProcess("openssl", ["pkey", "-pubin", "-inform", "DER", "-in", der, "-out", pem])
    try #require(converted.status == 0, "public key \(id) is not a valid DER key:\n\(converted.output)")
    return pem
}

/// The signature verifies over the message, and (so that this check can fail) not over another message.
private func expectVerifies(signature: String, of files: Files, publicKey: String, _ what: String) throws {
    let verified = try runProcess(
        "openssl", ["dgst", "-sha256", "-verify", publicKey, "-signature", signature, files.message])
    #expect(
        verified.status == 0 && verified.stdout.contains("Verified OK"),
        "\(what): openssl does not verify the signature:\n\(verified.output)")
    let forged = try runProcess(
        "openssl", ["dgst", "-sha256", "-verify", publicKey, "-signature", signature, files.otherMessage])
    #expect(forged.status != 0, "\(what): the signature also verifies over another message")
}

/// OpenSC's self-test, on a token holding an EC key pair and an AES key. No RSA key: with one,
/// SoftHSM 2.6.1 itself fails the RSA-OAEP step (C_DecryptInit: CKR_ARGUMENTS_BAD for an OAEP label).
private func runSelfTest(_ tool: PKCS11Tool) throws {
    let ec = try tool(
        ["--keypairgen", "--key-type", "EC:prime256v1", "--id", "01", "--label", "selftest-ec"], login: true)
    try #require(ec.status == 0, "generating an EC key pair failed:\n\(ec.output)")
    let aes = try tool(["--keygen", "--key-type", "AES:32", "--id", "02", "--label", "selftest-aes"], login: true)
    try #require(aes.status == 0, "generating an AES key failed:\n\(aes.output)")

    let result = try tool(["--test"], login: true)

    #expect(result.status == 0, "pkcs11-tool --test failed:\n\(result.output)")
    #expect(result.stdout.contains("No errors"), "\(result.output)")
}
