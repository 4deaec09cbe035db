// The C programs of Examples/c, compiled with cc and run against libp11ha.so like any C application.
import Foundation
import Testing

@Suite("The C examples work against the module")
struct ExampleTests {
    @Test("a C example runs against the module and reports success", arguments: [
        CExample(name: "sign_verify", story: "a C program loads the module with dlopen, signs and verifies", group: "ha-example"),
        CExample(name: "fork_sign",
                 story: "a child process forked after C_Initialize signs after calling C_Initialize itself, and the parent's session still works",
                 group: "ha-fork"),
    ])
    func runs(_ example: CExample) throws {
        let members = try Members(group: example.group)
        let program = try compileExample(example.name, into: members.dir)

        let result = try runProcess(
            program, [Paths.debugModule, members.group, members.userPIN], environment: members.environment)

        #expect(result.status == 0, "\(example.name) failed:\n\(result.output)")
        #expect(result.stdout.contains("\(example.name): ok"), "\(result.output)")
    }

    @Test("a workload in one process is spread over every member")
    func workloadSpreads() throws {
        let members = try Members(group: "ha-workload")
        let program = try compileExample("sign_loop", into: members.dir)
        try importKeyPair(label: "K", id: "01", into: members)

        let result = try runProcess(
            program, [Paths.debugModule, members.group, members.userPIN, "K", "2", "2"],
            environment: members.environment)

        #expect(result.status == 0, "sign_loop failed:\n\(result.output)")
        let summary = result.stdout.split(separator: "\n").last { $0.hasPrefix("sign_loop: ") }
        #expect(summary?.hasSuffix(", 0 errors") == true, "\(result.output)")
        let served = try #require(
            lastServedCounts(in: result.stdout), "no served= line with numbers:\n\(result.output)")
        #expect(served.count == members.count, "one count per member expected:\n\(result.stdout)")
        #expect(served.allSatisfy { $0 > 0 }, "a member served nothing:\n\(result.stdout)")
    }
}

/// A program of Examples/c that prints "NAME: ok" when it worked, and the story it tells.
struct CExample: Sendable, CustomTestStringConvertible {
    let name: String
    let story: String
    /// The group's label: each example has its own.
    let group: String

    var testDescription: String { "\(name): \(story)" }
}

/// Compiles Examples/c/NAME.c into `dir`; it must compile without warnings.
private func compileExample(_ name: String, into dir: String) throws -> String {
    let built = try buildCExample(name, into: dir)
    #expect(built.warnings.isEmpty, "\(name).c compiles with warnings:\n\(built.warnings)")
    return built.path
}

/// Makes an EC P-256 key pair with openssl and imports both halves through the group. C_CreateObject
/// writes a token object to every member, so every member can serve the key (a generated key starts out
/// on one member only until it is replicated).
private func importKeyPair(label: String, id: String, into members: Members) throws {
    let privatePEM = members.dir + "/\(label).pem"
    let publicPEM = members.dir + "/\(label)-pub.pem"
    let made = try runProcess(
        "openssl", ["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", privatePEM])
    try #require(made.status == 0, "openssl genpkey failed:\n\(made.output)")
    let exported = try runProcess("openssl", ["pkey", "-in", privatePEM, "-pubout", "-out", publicPEM])
    try #require(exported.status == 0, "openssl pkey -pubout failed:\n\(exported.output)")

    for (file, type) in [(privatePEM, "privkey"), (publicPEM, "pubkey")] {
        let written = try runProcess(
            "pkcs11-tool",
            ["--module", Paths.debugModule, "--token-label", members.group, "--login", "--pin", members.userPIN,
             "--write-object", file, "--type", type, "--label", label, "--id", id],
            environment: members.environment)
        try #require(written.status == 0, "importing the \(type) through the group failed:\n\(written.output)")
    }
}
