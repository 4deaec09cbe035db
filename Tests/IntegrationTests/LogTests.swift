// The log never holds a PIN or key material, whatever happens.
import Foundation
import Testing

@Suite struct LogHygiene {
    @Test("no PIN and no key value appears in the log or output of scenarios with failures, recoveries and imported keys")
    func noSecretsInLogs() throws {
        let members = try Members()
        _ = try members.throughFaultModule(extraGlobal: fastRecovery + ["log-level = debug"])
        var output = ""
        for name in ["objects", "spread", "failover", "all-down"] {
            let result = try faultScenario(name, members)
            #expect(result.status == 0, "\(name): \(result.stdout)\(result.stderr)")
            output += result.stdout + result.stderr
        }
        let pin = try pinFile(members, "user.pin", members.userPIN)
        for arguments in [["status", "--pin-source", pin], ["check"], ["sync", "--group", members.group, "--dry-run", "--pin-source", pin]] {
            let result = try p11hactl(arguments, members, environment: members.faultEnvironment)
            output += result.stdout + result.stderr
        }
        let log = members.log
        #expect(log.contains("member-failed") && log.contains("member-recovered"), "the log saw failures and recoveries")
        let everything = log + output
        for secret in [members.userPIN, members.soPIN] {
            #expect(!everything.contains(secret), "a PIN appears in the log or output")
        }
        // Key values the scenarios imported: 32 bytes of 7 (spread) and of 9 (objects), as text or hex.
        for byte in [UInt8(7), UInt8(9)] {
            let raw = String(decoding: [UInt8](repeating: byte, count: 8), as: UTF8.self)
            let hex = String(repeating: String(format: "%02x", byte), count: 8)
            #expect(!everything.contains(raw) && !everything.lowercased().contains(hex), "key material appears in the log")
        }
    }
}
