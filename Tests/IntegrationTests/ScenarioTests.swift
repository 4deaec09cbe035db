// The module's C ABI, driven from a separate process (p11ha-scenario) against private SoftHSM members.
import Foundation
import Testing

/// Runs one scenario of p11ha-scenario against the group of `members` and returns its output. `base` is the
/// environment to start from (the members' own by default).
func scenario(_ name: String, _ members: Members, module: String = Paths.debugModule,
              base: [String: String]? = nil, timeout: Double = 120) throws -> ProcessResult {
    var environment = base ?? members.environment
    environment["P11HA_TEST_TOKEN"] = members.group
    environment["P11HA_TEST_PIN"] = members.userPIN
    environment["P11HA_TEST_SO_PIN"] = members.soPIN
    environment["P11HA_TEST_MEMBERS"] = members.tokenLabels.joined(separator: ",")
    environment["SOFTHSM_MODULE"] = Paths.softhsmModule
    return try runProcess(Paths.packageRoot + "/.build/debug/p11ha-scenario", [name, module], environment: environment,
                          timeout: timeout)
}

@Suite struct TheModuleThroughItsCABI {
    @Test("C_Initialize, C_Finalize and the 3.0 interface functions behave as the specification says")
    func initializeAndFinalize() throws {
        let members = try Members()
        let result = try scenario("initialize", members)
        #expect(result.status == 0, "\(result.stdout)\(result.stderr)")
    }

    @Test("one slot per group; sessions, login and logout act on the group as one token")
    func sessionsAndLogin() throws {
        let members = try Members()
        let result = try scenario("sessions", members)
        #expect(result.status == 0, "\(result.stdout)\(result.stderr)")
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

    @Test("C_SetPIN and C_InitPIN change the PIN on every member")
    func pins() throws {
        let members = try Members()
        let result = try scenario("pins", members)
        #expect(result.status == 0, "\(result.stdout)\(result.stderr)")
    }

    @Test("bad pointers, handles and lengths get the specification's codes, never a crash")
    func badInput() throws {
        let members = try Members()
        let result = try scenario("bad-input", members)
        #expect(result.status == 0, "\(result.stdout)\(result.stderr)")
    }

    @Test("an object written through the group exists on every member; a search returns it once")
    func objectsOnEveryMember() throws {
        let members = try Members()
        let result = try scenario("objects", members)
        #expect(result.status == 0, "\(result.stdout)\(result.stderr)")
    }

    @Test("sign, verify, encrypt, decrypt, digest, wrap, unwrap and derive work through the group")
    func cryptography() throws {
        let members = try Members()
        let result = try scenario("crypto", members)
        #expect(result.status == 0, "\(result.stdout)\(result.stderr)")
    }

    @Test("many operations through one group are served by every member")
    func everyMemberServes() throws {
        let members = try Members()
        let result = try scenario("spread", members)
        #expect(result.status == 0, "\(result.stdout)\(result.stderr)")
        let served = result.stdout.split(separator: "\n").first { $0.hasPrefix("served=") }
        #expect(served?.split(separator: "=").last?.split(separator: ",").count == 3)
    }

    @Test("the cryptography scenario holds on a SoftHSM token directly, so a failure through the group is p11ha's")
    func cryptographyHoldsOnSoftHSM() throws {
        let members = try Members(count: 1)
        var environment = members.environment
        environment["P11HA_TEST_TOKEN"] = members.tokenLabels[0]
        environment["P11HA_TEST_PIN"] = members.userPIN
        let result = try runProcess(Paths.packageRoot + "/.build/debug/p11ha-scenario", ["crypto", Paths.softhsmModule],
                                    environment: environment)
        #expect(result.status == 0, "\(result.stdout)\(result.stderr)")
    }
}
