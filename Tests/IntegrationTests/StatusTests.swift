// p11hactl status: what an operator sees, as text and as JSON a script parses back.
import Foundation
import Testing

@Suite struct OperatorStatus {
    struct Report: Decodable {
        struct Group: Decodable {
            let name: String
            let healthy: Bool
            let membersAgree: Bool
            let members: [Member]
        }
        struct Member: Decodable {
            let name: String
            let reachable: Bool
            let replicationKey: Bool
            let objects: Int?
            let records: Int?
            let lastFailure: Int64?
            let lastFailureReason: String?
            let lastRecovery: Int64?
        }
        let groups: [Group]
    }

    @Test("status is degraded, naming the process, while a member is out of service in a running application, even though its own probe reaches every member")
    func outOfServiceInAnApplication() throws {
        let members = try Members()
        let control = try members.throughFaultModule(extraGlobal: fastRecovery)
        let generated = try throughGroup(members, ["--keypairgen", "--key-type", "EC:prime256v1", "--label", "K", "--id", "01"])
        try #require(generated.status == 0, "generating a key pair through the group failed:\n\(generated.output)")
        let signLoop = try buildCExample("sign_loop", into: members.dir).path
        let application = try Started(signLoop, [Paths.debugModule, members.group, members.userPIN, "K", "60", "1"],
                                      environment: members.faultEnvironment, output: members.dir + "/app.out", errors: members.dir + "/app.err")
        defer { application.killTree() }
        try waitUntil("the application signs (it prints a report line)", timeout: 20) {
            ((try? String(contentsOfFile: members.dir + "/app.out", encoding: .utf8)) ?? "").contains("t=")
        }
        try inject("fail 0x30", into: control, member: "member-b")
        // p11hactl gets a fault directory of its own, where nothing fails: its probe reaches every member.
        var unfaulted = members.faultEnvironment
        unfaulted["FAULTY_CONTROL"] = members.dir + "/no-faults"
        try FileManager.default.createDirectory(atPath: members.dir + "/no-faults", withIntermediateDirectories: true)
        let pin = try pinFile(members, "user.pin", members.userPIN)
        var last = ""
        try waitUntil("status reports member-b out of service in process \(application.pid):\n\(last)", timeout: 30, interval: 0.5) {
            let result = try p11hactl(["status", "--pin-source", pin], members, environment: unfaulted)
            last = result.output
            return result.status == 1 && result.stdout.contains("OUT OF SERVICE in process \(application.pid)")
        }
        #expect(last.contains("members agree"), "the probe itself finds the members in agreement:\n\(last)")
        let json = try p11hactl(["status", "--json", "--pin-source", pin], members, environment: unfaulted)
        #expect(json.stdout.contains("\"pid\" : \(application.pid)"), "\(json.stdout)")
        try inject("ok", into: control, member: "member-b")
        try waitUntil("status is healthy once the application has member-b back:\n\(last)", timeout: 30, interval: 0.5) {
            let result = try p11hactl(["status", "--pin-source", pin], members, environment: unfaulted)
            last = result.output
            return result.status == 0
        }
    }

    @Test("status --json shows a healthy group, and members' last failure and recovery after a failover")
    func afterFailover() throws {
        let members = try Members()
        _ = try members.throughFaultModule(extraGlobal: fastRecovery)
        let scenarioRun = try faultScenario("all-down", members)
        try #require(scenarioRun.status == 0, "\(scenarioRun.stdout)")
        let pin = try pinFile(members, "user.pin", members.userPIN)
        let result = try p11hactl(["status", "--json", "--pin-source", pin], members, environment: members.faultEnvironment)
        #expect(result.status == 0, "\(result.output)")
        let report = try JSONDecoder().decode(Report.self, from: Data(result.stdout.utf8))
        let group = try #require(report.groups.first)
        #expect(group.name == members.group && group.healthy && group.membersAgree)
        #expect(group.members.map(\.name) == members.tokenLabels)
        for member in group.members {
            #expect(member.reachable && member.replicationKey && member.records != nil, "\(member)")
            #expect(member.lastFailure != nil && member.lastRecovery != nil, "\(member.name) failed and recovered: \(member)")
        }
        #expect(!result.output.contains(members.userPIN))
        let text = try p11hactl(["status"], members, environment: members.faultEnvironment)
        #expect(text.status == 0 && text.stdout.contains("healthy, members agree") && text.stdout.contains("last recovered"), "\(text.output)")
    }

    @Test("status exits 1 and names the member when one is unreachable or members disagree")
    func degraded() throws {
        let members = try Members()
        let control = try members.throughFaultModule()
        try inject("fail 0x30 C_OpenSession", into: control, member: "member-b")
        let down = try p11hactl(["status"], members, environment: members.faultEnvironment)
        #expect(down.status == 1 && down.stdout.contains("member-b: UNREACHABLE") && down.stdout.contains("DEGRADED"), "\(down.output)")
        try inject("ok", into: control, member: "member-b")
        let direct = try PKCS11Tool(module: Paths.softhsmModule, token: "member-a", members: members)
        let made = try direct(["--keygen", "--key-type", "AES:16", "--label", "only-on-a", "--extractable"], login: true)
        try #require(made.status == 0, "\(made.output)")
        let pin = try pinFile(members, "user.pin", members.userPIN)
        let split = try p11hactl(["status", "--json", "--pin-source", pin], members, environment: members.faultEnvironment)
        #expect(split.status == 1, "\(split.output)")
        let report = try JSONDecoder().decode(Report.self, from: Data(split.stdout.utf8))
        #expect(report.groups.first?.membersAgree == false)
    }
}

@Suite struct OperatorBench {
    @Test("p11hactl bench measures the group against its first member and prints the ratio")
    func bench() throws {
        let members = try Members()
        let program = try compileC(Paths.packageRoot + "/Benchmarks/p11bench.c", to: members.dir + "/p11bench").path
        let pin = try pinFile(members, "user.pin", members.userPIN)
        let result = try p11hactl(["bench", "--pin-source", pin, "--p11bench", program, "--module", Paths.debugModule,
                                     "--seconds", "0.3", "--threads", "2", "--ops", "ecdsa,random"], members, environment: members.environment)
        #expect(result.status == 0, "\(result.output)")
        let rows = result.stdout.split(separator: "\n").filter { $0.hasPrefix("ecdsa-p256-sign") || $0.hasPrefix("random-32") }
        #expect(rows.count == 4, "one row per op and thread count:\n\(result.stdout)")
        #expect(!result.output.contains(members.userPIN))
    }
}
