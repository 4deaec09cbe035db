// Failover, deadlines, recovery and resynchronization, with faults injected in-process through faulty.so.
import Foundation
import Testing

/// Runs one p11ha-scenario scenario against members routed through the fault module.
func faultScenario(_ name: String, _ members: Members) throws -> ProcessResult {
    try scenario(name, members, base: members.faultEnvironment, timeout: 180)
}

let fastRecovery = ["recovery-interval = 100ms", "operation-timeout = 2s"]

@Suite struct Failover {
    @Test("each member-fault class on two of three members is invisible to every kind of call, and the members return")
    func faultClasses() throws {
        let members = try Members()
        _ = try members.throughFaultModule(extraGlobal: fastRecovery)
        let result = try faultScenario("failover", members)
        #expect(result.status == 0, "\(result.stdout)\(result.stderr)")
        let log = try String(contentsOfFile: members.dir + "/p11ha.log", encoding: .utf8)
        #expect(log.contains("member-failed") && log.contains("member-recovered"), "\(log)")
    }

    @Test("multi-part operations and a search in progress finish on a peer when their member fails")
    func multipart() throws {
        let members = try Members()
        _ = try members.throughFaultModule(extraGlobal: fastRecovery)
        let result = try faultScenario("multipart-failover", members)
        #expect(result.status == 0, "\(result.stdout)\(result.stderr)")
        let log = try String(contentsOfFile: members.dir + "/p11ha.log", encoding: .utf8)
        #expect(log.contains("operation-replayed"), "\(log)")
    }

    @Test("past replay-buffer, a member fault mid-operation is reported as CKR_DEVICE_ERROR")
    func replayLimit() throws {
        let members = try Members()
        _ = try members.throughFaultModule(extraGlobal: fastRecovery + ["replay-buffer = 16"])
        let result = try faultScenario("replay-limit", members)
        #expect(result.status == 0, "\(result.stdout)\(result.stderr)")
    }

    @Test("the caller's errors come back unchanged and never take a member out of service")
    func callerErrors() throws {
        let members = try Members()
        _ = try members.throughFaultModule(extraGlobal: fastRecovery)
        let result = try faultScenario("caller-errors", members)
        #expect(result.status == 0, "\(result.stdout)\(result.stderr)")
        let log = (try? String(contentsOfFile: members.dir + "/p11ha.log", encoding: .utf8)) ?? ""
        #expect(!log.contains("member-failed"), "\(log)")
    }

    @Test("a member that hangs is failed over after operation-timeout; the call returns")
    func deadline() throws {
        let members = try Members()
        _ = try members.throughFaultModule(extraGlobal: ["recovery-interval = 100ms", "operation-timeout = 300ms"])
        let result = try faultScenario("deadline", members)
        #expect(result.status == 0, "\(result.stdout)\(result.stderr)")
        let log = try String(contentsOfFile: members.dir + "/p11ha.log", encoding: .utf8)
        #expect(log.contains("no answer within the operation-timeout"), "\(log)")
    }

    @Test("with every member down calls fail fast; sessions and handles work again when members return")
    func allDown() throws {
        let members = try Members()
        _ = try members.throughFaultModule(extraGlobal: fastRecovery)
        let result = try faultScenario("all-down", members)
        #expect(result.status == 0, "\(result.stdout)\(result.stderr)")
    }

    @Test("a standby member gets no reads while an active member is in service, and takes over when none is")
    func standby() throws {
        let members = try Members()
        _ = try members.throughFaultModule(extraGlobal: fastRecovery)
        let text = try String(contentsOfFile: members.p11haConf, encoding: .utf8)
        let lines = text.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
        let last = try #require(lines.lastIndex { $0.hasPrefix("member = ") && $0.contains("member-c") })
        var edited = lines
        edited[last] = edited[last].replacingOccurrences(of: "member = ", with: "standby = ")
        try members.rewriteConfig(edited.joined(separator: "\n"))
        let result = try faultScenario("standby", members)
        #expect(result.status == 0, "\(result.stdout)\(result.stderr)")
    }

    @Test("a member that missed writes while another process ran is brought up to date by the next process; destroyed objects stay destroyed")
    func resyncAcrossProcesses() throws {
        let members = try Members()
        let control = try members.throughFaultModule(extraGlobal: ["recovery-interval = 1m"])
        let writes = try faultScenario("writes-while-down", members)
        try #require(writes.status == 0, "\(writes.stdout)\(writes.stderr)")
        try inject("ok", into: control, member: "member-c")
        let text = try String(contentsOfFile: members.p11haConf, encoding: .utf8)
        try members.rewriteConfig(text.replacingOccurrences(of: "recovery-interval = 1m", with: "recovery-interval = 100ms"))
        let check = try faultScenario("resync-check", members)
        #expect(check.status == 0, "\(check.stdout)\(check.stderr)")
        let log = try String(contentsOfFile: members.dir + "/p11ha.log", encoding: .utf8)
        #expect(log.contains("member-resynced") && log.contains("member=member-c"), "\(log)")
    }

    @Test("a child process forked after C_Initialize fails over as its parent does")
    func forkedChild() throws {
        let members = try Members()
        _ = try members.throughFaultModule(extraGlobal: fastRecovery)
        let result = try faultScenario("fork-failover", members)
        #expect(result.status == 0, "\(result.stdout)\(result.stderr)")
    }
}
