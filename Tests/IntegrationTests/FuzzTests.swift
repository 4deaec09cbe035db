// The C ABI fuzzer (Tests/ScenarioDriver/FuzzScenario.swift) for a bounded time, each of its detectors shown to
// fire, its replay shown exact, and sizes the caller claims shown not to drive p11ha's memory.
import Foundation
import Testing

@Suite(.serialized) struct FuzzTests {
    @Test("random calls through the C ABI for about a minute: no crash, hang, member out of service, or code the specification does not list")
    func fuzzForAMinute() throws {
        let members = try Members()
        try members.addReferenceToken()
        let seconds = Double(ProcessInfo.processInfo.environment["P11HA_TEST_FUZZ_SECONDS"] ?? "") ?? 60
        let result = try fuzz(members, ["P11HA_FUZZ_SECONDS": "\(seconds)"], reference: true, timeout: seconds + 600)
        #expect(result.status == 0, "\(result.output)")
        let summary = result.stdout.split(separator: "\n").last { $0.hasPrefix("fuzz: ") && $0.contains("episodes") }
        #expect(summary != nil, "the fuzzer printed no summary:\n\(result.output)")
        print(result.stdout.split(separator: "\n").filter { $0.hasPrefix("fuzz: ") || $0.hasPrefix("passed through") }.joined(separator: "\n"))
    }

    @Test("a code outside a function's list is reported with the seed that replays it, and the replay reports it again")
    func unlistedCodeIsReported() throws {
        let members = try Members()
        try members.addReferenceToken()
        let control = try members.throughFaultModule()
        // Every member answers C_GetObjectSize with a code PKCS#11 does not have; SoftHSM directly does not. The
        // episodes call it often (without the focus, 10 s of episodes made no call of it with a valid handle now and then).
        for label in members.tokenLabels { try inject("fail 0x7777 C_GetObjectSize", into: control, member: label) }
        let focus = ["P11HA_FUZZ_FOCUS": "C_GetObjectSize"]
        let result = try fuzz(members, focus.merging(["P11HA_FUZZ_SECONDS": "10"]) { $1 }, base: members.faultEnvironment, reference: true, timeout: 600)
        #expect(result.status != 0)
        let report = result.stdout.split(separator: "\n").first { $0.contains("C_GetObjectSize returned 0x7777") }
        #expect(report != nil, "no report of C_GetObjectSize's 0x7777:\n\(result.output)")
        let seed = try #require(seedReported(in: result.stdout), "no seed in:\n\(result.output)")
        #expect(result.stdout.contains("replay: scripts/fuzz --seed \(seed) --focus C_GetObjectSize"), "\(result.output)")
        let replay = try fuzz(members, focus.merging(["P11HA_FUZZ_SEED": seed]) { $1 }, base: members.faultEnvironment, reference: true, timeout: 600)
        #expect(replay.status != 0)
        #expect(replay.stdout.contains("C_GetObjectSize returned 0x7777"), "the replay of seed \(seed):\n\(replay.output)")
    }

    @Test("a call that does not return within operation-timeout + margin is reported as a hang, with the call and its seed")
    func hangIsReported() throws {
        let members = try Members()
        let control = try members.throughFaultModule(extraGlobal: ["operation-timeout = 2s"])
        // The prologue's first key generation waits on every member: p11ha gives up on each at its deadline,
        // so the call lasts past the 1 s this run allows it.
        for label in members.tokenLabels { try inject("hang C_GenerateKeyPair", into: control, member: label) }
        let started = Date()
        let result = try fuzz(members, ["P11HA_FUZZ_SEED": "1", "P11HA_TEST_OPERATION_TIMEOUT": "0.5", "P11HA_FUZZ_HANG_MARGIN": "0.5"],
                              base: members.faultEnvironment, timeout: 120)
        for label in members.tokenLabels { try inject("ok", into: control, member: label) }
        #expect(result.status != 0)
        #expect(result.stdout.contains("HANG: a call did not return within 1.0 s"), "\(result.output)")
        #expect(result.stdout.contains("seed=1 step=3 C_GenerateKeyPair"), "the hung call is named:\n\(result.output)")
        #expect(result.stdout.contains("replay: scripts/fuzz --seed 1"), "\(result.output)")
        #expect(Date().timeIntervalSince(started) < 60, "the hang was reported at once")
    }

    @Test("a crash of the process under test is reported with its seed and its last calls")
    func crashIsReported() throws {
        let members = try Members()
        let result = try fuzz(members, ["P11HA_FUZZ_SEED": "7", "P11HA_FUZZ_SELF_TEST_CRASH_AT": "20"], timeout: 120)
        #expect(result.status != 0)
        #expect(result.stdout.contains("episode seed 7: crash (signal 11)"), "\(result.output)")
        #expect(result.stdout.contains("step 20: "), "the last call is shown:\n\(result.output)")
    }

    @Test("an episode replays exactly: the same seed makes the same calls with the same results")
    func replayIsExact() throws {
        let members = try Members()
        let first = try fuzz(members, ["P11HA_FUZZ_SEED": "424242", "P11HA_FUZZ_STEPS": "150"], timeout: 300)
        let again = try fuzz(members, ["P11HA_FUZZ_SEED": "424242", "P11HA_FUZZ_STEPS": "150"], timeout: 300)
        let trace = { (r: ProcessResult) in r.stdout.split(separator: "\n").filter { $0.hasPrefix("step ") || $0.hasPrefix("  -> ") } }
        #expect(trace(first).count >= 300, "150 calls and their results:\n\(first.output)")
        #expect(trace(first) == trace(again), "two runs of seed 424242 differ:\n\(first.stdout)\n---\n\(again.stdout)")
    }

    @Test("a request that crashes SoftHSM directly (RSA verification with a generic secret key) is refused before it reaches a member")
    func memberCrashIsRefused() throws {
        let members = try Members()
        let result = try scenario("member-crash", members)
        #expect(result.status == 0, "\(result.output)")
    }

    @Test("sizes the caller claims (2 GiB output buffers, counts past 4 GiB, 32 MiB of random) never drive p11ha's memory")
    func claimedSizesAreBounded() throws {
        let members = try Members()
        let result = try scenario("bounds", members)
        #expect(result.status == 0, "\(result.output)")
    }
}

/// Runs the fuzzer (p11ha-scenario fuzz) against `members`' group with the settings in `settings`.
/// `reference`: the members' directory has the reference token (`addReferenceToken`).
private func fuzz(_ members: Members, _ settings: [String: String], base: [String: String]? = nil, reference: Bool = false,
                  timeout: Double) throws -> ProcessResult {
    var environment = base ?? members.environment
    if reference { environment["P11HA_FUZZ_REFERENCE_TOKEN"] = Members.referenceToken }
    for (key, value) in settings { environment[key] = value }
    return try scenario("fuzz", members, base: environment, timeout: timeout)
}

/// N of the first "replay: scripts/fuzz --seed N" in a fuzzer's output.
private func seedReported(in output: String) -> String? {
    guard let line = output.split(separator: "\n").first(where: { $0.contains("replay: scripts/fuzz --seed ") }) else { return nil }
    let words = line.split(separator: " ")
    return words.firstIndex(of: "--seed").flatMap { words.index(after: $0) < words.endIndex ? String(words[words.index(after: $0)]) : nil }
}

extension Members {
    /// A token beside the members, not in the group: the fuzzer runs the same episode on it through SoftHSM
    /// directly, to tell a member's own answer from p11ha's.
    static let referenceToken = "fuzz-reference"

    func addReferenceToken() throws {
        let result = try runProcess("softhsm2-util", ["--init-token", "--free", "--label", Members.referenceToken,
                                                      "--so-pin", soPIN, "--pin", userPIN], environment: environment)
        guard result.status == 0 else { throw SupportError("softhsm2-util --init-token failed: \(result.output)") }
    }
}
