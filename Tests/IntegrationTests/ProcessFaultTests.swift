// Process faults: members served by `p11-kit server` processes that are killed, frozen and restarted during work.
import Foundation
import Testing

@Suite("A member process that dies or freezes is invisible to the application", .serialized)
struct ProcessFaults {
    @Test("a member whose server is killed mid-work is failed over; the application sees no error; the restarted member rejoins")
    func killedMember() throws {
        let servers = try MemberServers.withKeyPair(extraGlobal: ["recovery-interval = 300ms"])
        defer { servers.stopAll() }

        let workload = try servers.startSignLoop(seconds: 8, threads: 2)
        try waitForSignatures(workload)
        try servers.kill("member-b")
        try servers.waitForEvent("member-failed", member: "member-b")
        // A report line written after the failure counts what member-b served before it: nothing more until it returns.
        try waitForReports(from: workload)
        let beforeReturn = reportLines(workload.output).last.flatMap(servedCounts(inLine:))
        try servers.restart("member-b")
        let result = try #require(workload.wait(seconds: 30), "sign_loop did not finish within 30 s of its 8:\n\(workload.output)")

        #expect(result.status == 0, "sign_loop saw errors (status \(result.status)):\n\(shortOutput(result))")
        #expect(result.stdout.contains(", 0 errors"), "\(result.stdout)")
        let failed = logLines(servers.log, event: "member-failed", token: "member-b")
        let recovered = logLines(servers.log, event: "member-recovered", token: "member-b")
        #expect(!failed.isEmpty, "no member-failed for member-b in p11ha.log:\n\(logExcerpt(servers))")
        #expect(!recovered.isEmpty, "no member-recovered for member-b in p11ha.log:\n\(logExcerpt(servers))")
        // Back in service means serving again: member-b's count grows after its return.
        let atEnd = reportLines(result.stdout).last.flatMap(servedCounts(inLine:))
        if let beforeReturn, let atEnd, beforeReturn.count == 3, atEnd.count == 3 {
            #expect(atEnd[1] > beforeReturn[1], "member-b served nothing after it returned:\n\(result.stdout)")
        } else {
            Issue.record("no served= counts in sign_loop's output:\n\(shortOutput(result))")
        }
    }

    @Test("a frozen member (SIGSTOP) is failed over within the operation-timeout")
    func frozenMember() throws {
        let servers = try MemberServers.withKeyPair(extraGlobal: ["operation-timeout = 500ms", "recovery-interval = 300ms"])
        defer { servers.stopAll() }

        let workload = try servers.startSignLoop(seconds: 8, threads: 2)
        try waitForSignatures(workload)
        let stopped = try servers.freeze("member-b")
        try servers.waitForEvent("member-failed", member: "member-b")
        // Frozen on purpose for two more of sign_loop's seconds: recovery probes meet the frozen member meanwhile,
        // and the per-second counts show whether anything waits for it.
        try waitForReports(2, from: workload)
        servers.thaw("member-b")
        let result = try #require(workload.wait(seconds: 30), "sign_loop did not finish within 30 s of its 8:\n\(workload.output)")

        #expect(!stopped.isEmpty, "member-b's server had no per-connection child to stop")
        #expect(result.status == 0, "sign_loop saw errors (status \(result.status)):\n\(shortOutput(result))")
        #expect(result.stdout.contains(", 0 errors"), "\(result.stdout)")
        // A 500 ms deadline leaves no second of the run without a signature.
        let ops = reportLines(result.stdout).compactMap(opsCount(inLine:))
        #expect(ops.count >= 7, "too few report lines:\n\(result.stdout)")
        #expect(zip(ops, ops.dropFirst()).allSatisfy { $0 < $1 } && ops.first ?? 0 > 0,
                "a second went by without a signature:\n\(result.stdout)")
        #expect(!logLines(servers.log, event: "member-failed", token: "member-b").isEmpty,
                "no member-failed for member-b in p11ha.log:\n\(logExcerpt(servers))")
        #expect(!logLines(servers.log, event: "member-recovered", token: "member-b").isEmpty,
                "no member-recovered for member-b after SIGCONT:\n\(logExcerpt(servers))")
    }

    @Test("an application that starts while a member's server is down works with the other members")
    func startWhileMemberDown() throws {
        let servers = try MemberServers.withKeyPair(extraGlobal: ["operation-timeout = 1s", "recovery-interval = 300ms"])
        defer { servers.stopAll() }
        let members = servers.members
        let digest = members.dir + "/digest"
        try Data((0..<32).map { UInt8($0) }).write(to: URL(fileURLWithPath: digest))

        try servers.kill("member-b")
        let signed = try throughGroup(members, ["--sign", "--id", "01", "--mechanism", "ECDSA", "--input-file", digest,
                                                "--output-file", members.dir + "/signature"], timeout: 30)
        #expect(signed.status == 0, "signing in a process started while member-b was down failed:\n\(signed.output)\n\(logExcerpt(servers))")
    }

    @Test("all members down: calls fail fast with a member fault and work again when one returns")
    func allMembersDown() throws {
        let servers = try MemberServers.withKeyPair(extraGlobal: ["operation-timeout = 1s", "recovery-interval = 300ms"])
        defer { servers.stopAll() }
        let members = servers.members
        let digest = members.dir + "/digest"
        try Data((0..<32).map { UInt8($0) }).write(to: URL(fileURLWithPath: digest))
        let sign = ["--sign", "--id", "01", "--mechanism", "ECDSA", "--input-file", digest,
                    "--output-file", members.dir + "/signature"]

        for label in members.tokenLabels {
            try servers.kill(label)
        }
        let listed = try runProcess("pkcs11-tool", ["--module", Paths.debugModule, "-L"], environment: members.environment,
                                    timeout: 30)
        #expect(listed.status == 0 && listed.stdout.contains(members.group),
                "with every member down, the group's slot is no longer listed:\n\(listed.output)\n\(logExcerpt(servers))")
        let started = Date()
        let refused = try throughGroup(members, sign, timeout: 30)
        let elapsed = Date().timeIntervalSince(started)
        #expect(refused.status != 0, "signing with every member down succeeded:\n\(refused.output)")
        #expect(elapsed < 10, "signing with every member down took \(elapsed) s to fail")

        for label in members.tokenLabels {
            try servers.restart(label)
        }
        let signed = try throughGroup(members, sign, timeout: 30)
        #expect(signed.status == 0, "signing after the members returned failed:\n\(signed.output)\n\(logExcerpt(servers))")
    }

    @Test("all members down: a running application gets member faults, never a hang, and its sessions and handles work again when the members return")
    func allMembersDownInProcess() throws {
        let servers = try MemberServers.withKeyPair(extraGlobal: ["operation-timeout = 1s", "recovery-interval = 300ms"])
        defer { servers.stopAll() }
        let members = servers.members

        // One thread, one session, one pair of key handles found once at the start, for 9 s.
        let workload = try servers.startSignLoop(seconds: 9, threads: 1)
        try waitForSignatures(workload)
        for label in members.tokenLabels {
            try servers.kill(label)
        }
        try waitUntil("sign_loop's calls fail with every member down:\n\(workload.errorOutput)\n\(logExcerpt(servers))",
                      timeout: 10) { workload.errorOutput.contains(" failed: CK_RV ") }
        // A report line written during the outage: signatures counted after it were made after the members returned.
        try waitForReports(from: workload)
        let duringOutage = reportLines(workload.output).last
        for label in members.tokenLabels {
            try servers.restart(label)
        }
        // sign_loop reports once a second from its own thread: a call that hangs shows as a late exit.
        let result = try #require(workload.wait(seconds: 20), "sign_loop did not finish within 20 s of its 9:\n\(workload.output)")

        let failures = result.stderr.split(separator: "\n").filter { $0.contains(" failed: CK_RV ") }
        #expect(!failures.isEmpty, "no call failed while every member was down:\n\(shortOutput(result))")
        let memberFaults: Set<String> = ["0x00000030", "0x00000031", "0x00000032", "0x000000e0", "0x00000005"]
        let otherErrors = failures.filter { line in !memberFaults.contains(where: { line.hasSuffix($0) }) }
        #expect(otherErrors.isEmpty, "errors other than a member fault (a lost session or handle?):\n\(otherErrors.joined(separator: "\n"))\n\(((try? String(contentsOfFile: servers.log, encoding: .utf8)) ?? "").split(separator: "\n").filter { $0.contains("DEBUG") || $0.contains("warning") }.joined(separator: "\n"))")
        let opsAfter = reportLines(result.stdout).last.flatMap(opsCount(inLine:)) ?? 0
        let opsDuring = duringOutage.flatMap(opsCount(inLine:)) ?? 0
        #expect(opsAfter > opsDuring, "the session signed nothing after the members returned:\n\(shortOutput(result))\n\(logExcerpt(servers))")
    }

    @Test("C_Initialize, C_Login, a signature, a write and C_Finalize return within operation-timeout plus a margin when members' servers accept connections and never answer",
          arguments: [["member-c"], ["member-b", "member-c"]])
    func silentMember(_ silentMembers: [String]) throws {
        let servers = try MemberServers.withKeyPair(extraGlobal: ["operation-timeout = 1s", "recovery-interval = 300ms"])
        defer { servers.stopAll() }
        let members = servers.members
        // Their servers give way to sockets that accept and then say nothing, as a hung host's server does. Two such
        // members cost the application no more time than one: they are waited for side by side.
        var listeners: [SilentListener] = []
        defer { for listener in listeners { listener.stop() } }
        for label in silentMembers {
            try servers.kill(label)
            listeners.append(try SilentListener(path: servers.socketPath(label)))
        }
        var environment = members.environment
        environment["P11HA_TEST_OPERATION_TIMEOUT"] = "1"

        // The driver ends a call that never returns (SIGALRM); the process timeout is the last resort.
        let result = try scenario("silent-member", members, base: environment, timeout: 60)

        let report = "\(result.output)\n\(logExcerpt(servers))"
        #expect(result.status == 0, "silent-member failed (status \(result.status)):\n\(report)")
        for (label, silent) in zip(silentMembers, listeners) {
            #expect(silent.connections > 0, "p11ha never connected to \(label)'s silent socket:\n\(report)")
        }
        var durations: [String: Double] = [:]
        for line in result.stdout.split(separator: "\n") where line.hasPrefix("duration ") {
            let words = line.split(separator: " ")
            if words.count == 4, let seconds = Double(words[2]) { durations[String(words[1])] = seconds }
        }
        for call in ["C_Initialize", "C_GetSlotList", "C_OpenSession", "C_Login", "C_SignInit+C_Sign", "C_CreateObject", "C_Finalize"] {
            let seconds = try #require(durations[call], "no duration for \(call) (it did not return, or was never reached):\n\(report)")
            #expect(seconds <= 2, "\(call) took \(seconds) s, more than operation-timeout (1 s) + 1 s:\n\(report)")
        }
    }
}

@Suite("An application that exits without C_Finalize")
struct ExitWithoutFinalize {
    @Test("an application that exits without C_Finalize while p11ha's recovery works beside it (a member down) never crashes at its exit: 40 pkcs11-tool runs that end at \"object not found\"")
    func exitWhileRecoveryWorks() throws {
        let members = try Members()
        let tool = try PKCS11Tool(module: Paths.debugModule, token: nil, members: members)
        // Records for the recovery worker's watch to read at each run's login, and objects for its repairs.
        for index in 0..<8 {
            let made = try tool(["--keygen", "--key-type", "AES:32", "--label", "exit-\(index)", "--id", String(format: "%02x", index)], login: true)
            try #require(made.status == 0, "\(made.output)")
        }
        // A member whose server is not there: the worker probes it while the application runs.
        let text = try String(contentsOfFile: members.p11haConf, encoding: .utf8)
        try members.rewriteConfig(text + "member = pkcs11:token=member-away via unix:path=\(members.dir)/nobody-listens.sock\n")
        var crashes: [String] = []
        for run in 1...40 {
            // pkcs11-tool ends at "object not found" with exit(1), without C_Finalize.
            let result = try tool(["--delete-object", "--type", "privkey", "--label", "nowhere"], login: true)
            if result.status != 1 || !result.output.contains("object not found") {
                crashes.append("run \(run): status \(result.status)\n\(result.output)")
            }
        }
        #expect(crashes.isEmpty, "\(crashes.count) of 40 runs did not end as pkcs11-tool does (status 139: SIGSEGV):\n\(crashes.joined(separator: "\n"))")
    }
}
