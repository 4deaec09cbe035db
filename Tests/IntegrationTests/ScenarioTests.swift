// The module's C ABI, driven from a separate process (p11ha-scenario) against private SoftHSM members.
import Foundation
import Testing

@Suite struct TheModuleThroughItsCABI {
    @Test("a scenario of the driver holds through the group", arguments: ScenarioStory.all)
    func scenarioHolds(_ story: ScenarioStory) throws {
        let members = try Members()
        let result = try story.run(members)
        #expect(result.status == 0, "scenario \(story.scenario): \(story.story)\n\(result.stdout)\(result.stderr)")
    }

    @Test("the token's serial number is stable across runs and distinct per group")
    func stableSerial() throws {
        let first = try scenario("sessions", try Members(group: "alpha"))
        let again = try scenario("sessions", try Members(group: "alpha"))
        let other = try scenario("sessions", try Members(group: "beta"))
        let serial = { (r: ProcessResult) in r.stdout.split(separator: "\n").first { $0.hasPrefix("serial=") } }
        #expect(serial(first) != nil)
        #expect(serial(first) == serial(again))
        #expect(serial(first) != serial(other))
    }

    @Test("many operations through one group are served by every member")
    func everyMemberServes() throws {
        let members = try Members()
        let result = try scenario("spread", members)
        #expect(result.status == 0, "\(result.stdout)\(result.stderr)")
        let served = result.stdout.split(separator: "\n").first { $0.hasPrefix("served=") }
        #expect(served?.split(separator: "=").last?.split(separator: ",").count == 3)
    }

    @Test("generated-keys = replicate-or-keep keeps a key the members cannot carry on the member that made it, where it signs, and p11hactl status names it as CANNOT BE REPAIRED on the others")
    func keptKeyIsReported() throws {
        let members = try Members()
        try members.addGlobal(["generated-keys = replicate-or-keep"])
        let result = try scenario("kept-key", members)
        #expect(result.status == 0, "\(result.stdout)\(result.stderr)")
        let keeper = try #require(result.stdout.split(separator: "\n").first { $0.hasPrefix("kept-on=") }?.dropFirst("kept-on=".count))
        #expect(members.log.contains(" generated-key-kept ") && members.log.contains("key-type=CKK_EC_EDWARDS"), "\(members.log)")
        let pin = try pinFile(members, "user.pin", members.userPIN)
        let status = try p11hactl(["status", "--pin-source", pin], members)
        #expect(status.status == 1, "a group with a key on one member only is degraded:\n\(status.output)")
        let unrepairable = status.stdout.split(separator: "\n").filter { $0.contains("CANNOT BE REPAIRED") && $0.contains("kept-") }
        #expect(unrepairable.count == members.count - 1, "each member but \(keeper) is named as lacking the kept private key:\n\(status.output)")
    }

    @Test("the cryptography scenario holds on a SoftHSM token directly, so a failure through the group is p11ha's")
    func cryptographyHoldsOnSoftHSM() throws {
        let members = try Members(count: 1)
        var environment = members.environment
        environment["P11HA_TEST_TOKEN"] = members.tokenLabels[0]
        environment["P11HA_TEST_PIN"] = members.userPIN
        let result = try runProcess(Paths.scenarioDriver, ["crypto", Paths.softhsmModule], environment: environment)
        #expect(result.status == 0, "\(result.stdout)\(result.stderr)")
    }
}

/// A scenario of p11ha-scenario whose exit status says it all: the story it tells and how its members are set up.
/// Scenarios whose tests also read the log or the output have tests of their own.
struct ScenarioStory: Sendable, CustomTestStringConvertible {
    /// How the three members (a replication key on each) are set up before the scenario runs.
    enum Setup: Sendable {
        /// SoftHSM tokens loaded directly, with these lines added to [p11ha].
        case direct(global: [String] = [])
        /// Every member through the fault module, with these lines in [p11ha]; `lastIsStandby` makes the last
        /// member a standby.
        case faults(global: [String], lastIsStandby: Bool = false)
    }

    let scenario: String
    let story: String
    let setup: Setup

    var testDescription: String { "\(scenario): \(story)" }

    static let all: [ScenarioStory] = [
        ScenarioStory(scenario: "initialize", story: "C_Initialize, C_Finalize and the 3.0 interface functions behave as the specification says",
                      setup: .direct()),
        ScenarioStory(scenario: "sessions", story: "one slot per group; sessions, login and logout act on the group as one token",
                      setup: .direct()),
        ScenarioStory(scenario: "pins", story: "C_SetPIN and C_InitPIN change the PIN on every member", setup: .direct()),
        ScenarioStory(scenario: "bad-input", story: "bad pointers, handles and lengths get the specification's codes, never a crash",
                      setup: .direct()),
        ScenarioStory(scenario: "objects", story: "an object written through the group exists on every member; a search returns it once",
                      setup: .direct()),
        ScenarioStory(scenario: "crypto", story: "sign, verify, encrypt, decrypt, digest, wrap, unwrap and derive work through the group",
                      setup: .direct()),
        ScenarioStory(scenario: "replication", story: "a generated key pair and secret key exist on every member as the same key, with equal attributes",
                      setup: .direct()),
        ScenarioStory(scenario: "hostile", story: "hostile requests (garbage ciphertexts, oversize input, wrong keys and parameters) get the code SoftHSM gives directly, while three threads sign beside them without an error, and every member stays in service",
                      setup: .direct()),
        ScenarioStory(scenario: "no-login", story: "a process that never logs in creates and destroys public objects while a member fails and returns: members stay in service, the objects reach every member, a login afterwards works",
                      setup: .faults(global: fastRecovery)),
        ScenarioStory(scenario: "churn", story: "16 threads sign for 60 s while others close all sessions, log out and in, and close sessions at random: only the codes a single token gives such races, a session that says it is logged in always finds its key, and afterwards every member is in service",
                      setup: .direct()),
        ScenarioStory(scenario: "lifecycle", story: "100 rounds of C_Initialize, a signature and C_Finalize, with the module unloaded and loaded again every tenth, leave no thread or descriptor piling up",
                      setup: .direct()),
        ScenarioStory(scenario: "refused-generation", story: "generated-keys = refuse refuses key generation in a group",
                      setup: .direct(global: ["generated-keys = refuse"])),
        ScenarioStory(scenario: "domain-parameters", story: "DSA and DH domain parameters and key pairs generated through the group are on every member with the same values; signatures and agreements work across members",
                      setup: .direct()),
        ScenarioStory(scenario: "uncarried-key", story: "a token key type the members cannot carry (Ed25519 on SoftHSM 2.6.1) fails its generation with CKR_FUNCTION_FAILED and leaves nothing behind; a session key pair of that type stays on its maker and signs",
                      setup: .direct()),
        ScenarioStory(scenario: "value-length", story: "AES and generic secret keys generated through the group answer their CKA_VALUE_LEN as one token does, though the members' unwrapped copies answer 0",
                      setup: .direct()),
        ScenarioStory(scenario: "mechanism-table", story: "every mechanism the group lists, with a valid parameter and invalid ones, gives through the group the codes a member gives directly, and the same output (or one the member accepts)",
                      setup: .direct()),
        ScenarioStory(scenario: "interface-30", story: "the PKCS#11 3.0 function list works as the 2.40 one; C_SessionCancel ends the operations its flags name, so that the next C_*Init starts afresh; C_LoginUser and the message-based functions answer CKR_FUNCTION_NOT_SUPPORTED",
                      setup: .direct()),
        ScenarioStory(scenario: "generated-keys", story: "every generation mechanism the group lists makes a token object that every member holds once and that is the same key everywhere (secret keys digest alike, signatures verify across members, DH copies agree), or the policy refuses it with CKR_FUNCTION_FAILED and leaves nothing (Ed25519)",
                      setup: .direct()),
        ScenarioStory(scenario: "replay-limit", story: "past replay-buffer, a member fault mid-operation is reported as CKR_DEVICE_ERROR",
                      setup: .faults(global: fastRecovery + ["replay-buffer = 16"])),
        ScenarioStory(scenario: "all-down", story: "with every member down calls fail fast; sessions and handles work again when members return",
                      setup: .faults(global: fastRecovery)),
        ScenarioStory(scenario: "standby", story: "a standby member gets no reads while an active member is in service, and takes over when none is",
                      setup: .faults(global: fastRecovery, lastIsStandby: true)),
        ScenarioStory(scenario: "fork-failover", story: "a child process forked after C_Initialize fails over as its parent does",
                      setup: .faults(global: fastRecovery)),
    ]

    /// Sets `members` up and runs the scenario against their group.
    func run(_ members: Members) throws -> ProcessResult {
        switch setup {
        case .direct(let global):
            if !global.isEmpty { try members.addGlobal(global) }
            return try IntegrationTests.scenario(self.scenario, members)
        case .faults(let global, let lastIsStandby):
            _ = try members.throughFaultModule(extraGlobal: global)
            if lastIsStandby { try members.makeLastMemberStandby() }
            return try faultScenario(self.scenario, members)
        }
    }
}

extension Members {
    /// Turns the last `member =` line of p11ha.conf into `standby =`.
    func makeLastMemberStandby() throws {
        let text = try String(contentsOfFile: p11haConf, encoding: .utf8)
        var lines = text.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
        let last = tokenLabels[count - 1]
        guard let index = lines.lastIndex(where: { $0.hasPrefix("member = ") && $0.contains(last) }) else {
            throw SupportError("p11ha.conf has no member line for \(last):\n\(text)")
        }
        lines[index] = lines[index].replacingOccurrences(of: "member = ", with: "standby = ")
        try rewriteConfig(lines.joined(separator: "\n"))
    }
}
