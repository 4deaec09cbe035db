// Failover, deadlines, recovery and resynchronization, with faults injected in-process through faulty.so.
import Foundation
import Testing

@Suite struct Failover {
    @Test("each member-fault class on two of three members is invisible to every kind of call, and the members return")
    func faultClasses() throws {
        let (members, result) = try runThroughFaults("failover", global: fastRecovery)
        #expect(result.status == 0, "\(result.stdout)\(result.stderr)")
        let log = members.log
        #expect(log.contains("member-failed") && log.contains("member-recovered"), "\(log)")
    }

    @Test("multi-part operations and a search in progress finish on a peer when their member fails")
    func multipart() throws {
        let (members, result) = try runThroughFaults("multipart-failover", global: fastRecovery)
        #expect(result.status == 0, "\(result.stdout)\(result.stderr)")
        #expect(members.log.contains("operation-replayed"), "\(members.log)")
    }

    @Test("the caller's errors come back unchanged and never take a member out of service")
    func callerErrors() throws {
        let (members, result) = try runThroughFaults("caller-errors", global: fastRecovery)
        #expect(result.status == 0, "\(result.stdout)\(result.stderr)")
        #expect(!members.log.contains("member-failed"), "\(members.log)")
    }

    @Test("a member that hangs is failed over after operation-timeout; the call returns")
    func deadline() throws {
        let (members, result) = try runThroughFaults("deadline", global: ["recovery-interval = 100ms", "operation-timeout = 300ms"])
        #expect(result.status == 0, "\(result.stdout)\(result.stderr)")
        #expect(members.log.contains("no answer within the operation-timeout"), "\(members.log)")
    }

    @Test("p11hactl sync brings a member that missed writes to the replication records: an object destroyed meanwhile is destroyed there, never copied back; a renamed one is renamed, never copied under its old label")
    func syncFollowsTheRecords() throws {
        let members = try membersAfterWritesWhileDown()
        let pin = try pinFile(members, "user.pin", members.userPIN)
        let dry = try p11hactl(["sync", "--group", members.group, "--dry-run", "--pin-source", pin], members,
                               environment: members.faultEnvironment)
        #expect(dry.stdout.contains("member-c: would be repaired from the replication records"), "\(dry.output)")
        #expect(!dry.stdout.contains("would copy ["), "objects the records describe are never an operator's copy:\n\(dry.output)")
        let sync = try p11hactl(["sync", "--group", members.group, "--pin-source", pin], members,
                                environment: members.faultEnvironment)
        #expect(sync.status == 0, "\(sync.output)")
        #expect(sync.stdout.contains("member-c: repaired from the replication records"), "\(sync.output)")
        for token in ["member-a", "member-b", "member-c"] {
            let list = try PKCS11Tool(module: Paths.softhsmModule, token: token, members: members)(["-O"], login: true)
            #expect(!list.stdout.contains("resync-doomed"), "\(token) holds the object destroyed while member-c was away:\n\(list.stdout)")
            #expect(!list.stdout.contains("resync-old-name"), "\(token) holds the renamed object under its old label:\n\(list.stdout)")
            #expect(list.stdout.components(separatedBy: "resync-new-name").count == 2, "\(token): the renamed object once:\n\(list.stdout)")
            #expect(list.stdout.contains("'resync-new'"), "\(token) holds the object made while member-c was away:\n\(list.stdout)")
        }
        #expect(!(dry.output + sync.output).contains(members.userPIN))
    }

    @Test("a member that missed writes while another process ran is brought up to date by the next process; destroyed objects stay destroyed")
    func resyncAcrossProcesses() throws {
        let members = try membersAfterWritesWhileDown()
        let text = try String(contentsOfFile: members.p11haConf, encoding: .utf8)
        try members.rewriteConfig(text.replacingOccurrences(of: "recovery-interval = 1m", with: "recovery-interval = 100ms"))
        let check = try faultScenario("resync-check", members)
        #expect(check.status == 0, "\(check.stdout)\(check.stderr)")
        let log = members.log
        #expect(log.contains("member-caught-up") && log.contains("member=member-c"), "\(log)")
    }
}

/// Members behind faulty.so (recovery-interval 1 m) after the writes-while-down scenario: member-c missed writes,
/// a destroy and a rename, and answers again, not yet brought up to date.
private func membersAfterWritesWhileDown() throws -> Members {
    let members = try Members()
    let control = try members.throughFaultModule(extraGlobal: ["recovery-interval = 1m"])
    let writes = try faultScenario("writes-while-down", members)
    try #require(writes.status == 0, "\(writes.stdout)\(writes.stderr)")
    try inject("ok", into: control, member: "member-c")
    return members
}
