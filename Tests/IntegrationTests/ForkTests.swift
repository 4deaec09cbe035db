// Fork: children of a busy process (threads signing, members failing and hanging, recovery at work) start p11ha
// afresh and sign, hundreds of times in a row: no crash, no hang.
import Foundation
import Testing

@Suite("fork never takes an application down", .serialized)
struct ForkTests {
    /// How many children each storm forks (P11HA_TEST_FORKS overrides; the issue asks for at least 500).
    static let children = ProcessInfo.processInfo.environment["P11HA_TEST_FORKS"].flatMap(Int.init) ?? 500

    @Test("children forked one after another from a process whose threads sign while one member is down and one hangs each start p11ha, sign and exit",
          arguments: ["sequential", "daemon"])
    func forkStorm(_ mode: String) throws {
        let servers = try MemberServers.withKeyPair(extraGlobal: ["operation-timeout = 2s", "recovery-interval = 100ms"])
        defer { servers.stopAll() }
        let members = servers.members
        // member-a in this process (SoftHSM dlopened: a child inherits it with whatever locks the parent's threads
        // held in it at fork); member-b and member-c through p11-kit's client, as network HSMs.
        let remoteA = "member = pkcs11:token=member-a via unix:path=\(servers.socketPath("member-a"))"
        // 2 s: a deadline short enough to matter, long enough that a loaded machine (tests side by side) does not miss it.
        let config = servers.remoteConfig(extraGlobal: ["operation-timeout = 2s", "recovery-interval = 100ms"])
        try #require(config.contains(remoteA), "unexpected configuration:\n\(config)")
        try members.rewriteConfig(config.replacingOccurrences(
            of: remoteA, with: "member = pkcs11:token=member-a?module-path=\(Paths.softhsmModule)"))
        let program = try compileC(Paths.packageRoot + "/Tests/ForkStorm/fork_storm.c", to: members.dir + "/fork_storm")
        let go = members.dir + "/go"
        var environment = members.environment
        environment["FORK_STORM_GO"] = go
        // fork_storm's SoftHSM gets a token store of its own, a copy made while no process writes: SoftHSM's
        // C_Initialize takes a file lock on every token of its store, and member-c's server, frozen below, may be
        // stopped holding one on member-c's files. Sharing the store, every child's C_Initialize of member-a then
        // waited for that lock for ever (seen with gdb: a child in SoftHSM's C_Initialize, in fcntl, and
        // /proc/locks showing the stopped server's read lock on member-c's `generation` file); the children found
        // member-a unreachable and failed, and the parent's own calls into SoftHSM could stop there too. That is
        // SoftHSM's doing, which p11ha bounds by the operation-timeout; the test is about fork.
        let ownStore = members.dir + "/fork-storm-tokens"
        let copied = try runProcess("/bin/cp", ["-a", members.dir + "/tokens", ownStore])
        try #require(copied.status == 0, "cannot copy the token store: \(copied.stderr)")
        let ownConf = members.dir + "/fork-storm-softhsm2.conf"
        let conf = try String(contentsOfFile: members.softhsmConf, encoding: .utf8)
            .replacingOccurrences(of: members.dir + "/tokens", with: ownStore)
        try #require(conf.contains(ownStore), "no token directory to replace in \(members.softhsmConf):\n\(conf)")
        try conf.write(toFile: ownConf, atomically: true, encoding: .utf8)
        environment["SOFTHSM2_CONF"] = ownConf
        // A child gets 10 s: far beyond what one needs (C_Initialize within one operation-timeout, then a signature).
        let storm = try servers.start(program.path, [Paths.debugModule, members.group, members.userPIN, "K", String(Self.children),
                                                     "2", mode, "10"], environment: environment, name: "fork_storm")
        var daemon: pid_t? = nil
        defer { if let daemon { kill(-daemon, SIGKILL); kill(daemon, SIGKILL) } }

        try waitUntil("fork_storm signs:\n\(storm.output)\(storm.errorOutput)", timeout: 30) {
            guard storm.isRunning else { throw SupportError("fork_storm exited early:\n\(storm.output)\(storm.errorOutput)") }
            return storm.output.contains("threads signing")
        }
        // member-b's server dies (its calls fail at once, recovery restarts its module again and again); member-c's
        // freezes (calls into it hang past the deadline, threads of p11ha's stay inside p11-kit's client).
        try servers.kill("member-b")
        let frozen = try servers.freeze("member-c")
        try #require(!frozen.isEmpty, "member-c's server had no connection to freeze")
        try servers.waitForEvent("member-failed", member: "member-b")
        try servers.waitForEvent("member-failed", member: "member-c", timeout: 20)
        try #require(FileManager.default.createFile(atPath: go, contents: nil), "cannot create \(go)")

        let seconds = Double(Self.children) * 2 + 60
        let parent = try #require(storm.wait(seconds: seconds), "fork_storm still running after \(seconds) s:\n\(storm.output)\(storm.errorOutput)")
        if mode == "daemon" {
            #expect(parent.status == 0, "the parent crashed or failed on exit (status \(parent.status)):\n\(parent.stderr)")
            daemon = parent.stdout.split(separator: "\n").first { $0.contains("daemon") }
                .flatMap { $0.split(separator: " ").compactMap { Int32($0) }.first }
            try waitUntil("the daemon reports its workers:\n\(storm.output)\(storm.errorOutput)", timeout: seconds) {
                storm.output.contains("fork_storm: children=")
            }
        }
        let output = storm.output
        let summary = try #require(output.split(separator: "\n").last { $0.hasPrefix("fork_storm: children=") },
                                   "no summary from fork_storm:\n\(output)\(storm.errorOutput)")
        let figures = Dictionary(summary.dropFirst("fork_storm: ".count).split(separator: " ").compactMap { pair -> (String, Int)? in
            let parts = pair.split(separator: "=")
            guard parts.count == 2, let value = Int(parts[1]) else { return nil }
            return (String(parts[0]), value)
        }, uniquingKeysWith: { $1 })
        let problems = String(storm.errorOutput.split(separator: "\n").prefix(20).joined(separator: "\n"))
        #expect(figures["children"] == Self.children, "\(summary)")
        #expect(figures["crashes"] == 0, "children crashed: \(summary)\n\(problems)")
        #expect(figures["hangs"] == 0, "children hung: \(summary)\n\(problems)")
        #expect(figures["failures"] == 0, "children failed a step: \(summary)\n\(problems)\n\(logExcerpt(servers))")
        if mode == "sequential" {
            #expect(parent.status == 0, "fork_storm failed (status \(parent.status)):\n\(summary)\n\(problems)")
            #expect((figures["parent_signatures"] ?? 0) > 0, "the parent's threads signed nothing: \(summary)")
            // Only member-a serves the parent: an error means it left service, and its log lines say why.
            let memberA = ((try? String(contentsOfFile: servers.log, encoding: .utf8)) ?? "").split(separator: "\n")
                .filter { $0.contains("member=member-a") }.prefix(20).joined(separator: "\n")
            #expect(figures["parent_errors"] == 0,
                    "the parent's threads saw errors while members failed: \(summary)\n\(problems)\nmember-a in p11ha.log:\n\(memberA)")
        }
        servers.thaw("member-c")
    }
}
