// The C programs of Examples/c, compiled with cc and run against libp11ha.so like any C application.
import Foundation
import Testing

@Suite("The C examples work against the module")
struct ExampleTests {
    @Test("a C program loads the module with dlopen, signs and verifies")
    func signVerify() throws {
        let members = try Members(group: "ha-example")
        let program = try compileExample("sign_verify", into: members.dir)

        let result = try runProcess(
            program, [Paths.debugModule, members.group, members.userPIN], environment: members.environment)

        #expect(result.status == 0, "sign_verify failed:\n\(result.output)")
        #expect(result.stdout.contains("sign_verify: ok"), "\(result.output)")
    }

    @Test("a child process forked after C_Initialize signs after calling C_Initialize itself, and the parent's session still works")
    func forkSign() throws {
        let members = try Members(group: "ha-fork")
        let program = try compileExample("fork_sign", into: members.dir)

        let result = try runProcess(
            program, [Paths.debugModule, members.group, members.userPIN], environment: members.environment)

        #expect(result.status == 0, "fork_sign failed:\n\(result.output)")
        #expect(result.stdout.contains("fork_sign: ok"), "\(result.output)")
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

/// Compiles Examples/c/NAME.c warning-free into `dir` and returns the program's path.
private func compileExample(_ name: String, into dir: String) throws -> String {
    let source = Paths.packageRoot + "/Examples/c/\(name).c"
    let program = dir + "/" + name
    let flags = try runProcess("pkg-config", ["--cflags", "p11-kit-1"])
    try #require(flags.status == 0, "pkg-config p11-kit-1 failed:\n\(flags.output)")
    let includes = flags.stdout.split(whereSeparator: \.isWhitespace).map(String.init)

    let compiled = try runProcess(
        "cc", ["-Wall", "-Wextra", "-O2"] + includes + ["-o", program, source, "-ldl", "-lpthread"])

    try #require(compiled.status == 0, "cc \(name).c failed:\n\(compiled.output)")
    #expect(compiled.stderr.isEmpty, "\(name).c compiles with warnings:\n\(compiled.stderr)")
    return program
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

/// The numbers of the last "served=a,b,c" of sign_loop's report lines, or nil if there is none.
private func lastServedCounts(in output: String) -> [Int]? {
    let fields = output.split(separator: "\n").flatMap { $0.split(separator: " ") }
    guard let field = fields.last(where: { $0.hasPrefix("served=") }) else { return nil }
    let numbers = field.dropFirst("served=".count).split(separator: ",", omittingEmptySubsequences: false)
    let counts = numbers.compactMap { Int($0) }
    return counts.count == numbers.count && !counts.isEmpty ? counts : nil
}
