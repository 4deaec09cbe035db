// What SoftHSM's file store shows one process of another's writes, measured by store_probe (Tests/StoreProbe) in
// two processes on one real member: the behaviour `FakeTokenStore.staleIndexes` models for the unit tests and the
// simulation, and the reason for the lease's rules (docs/REPLICATION.md, "What the stores do").
import Foundation
import Testing

@Suite("What SoftHSM's store shows other processes")
struct StoreVisibility {
    @Test("a process finds another's new object at once, but not one made before a create of its own, until another process writes (the model of FakeTokenStore.staleIndexes)")
    func creationsHiddenByOwnWrite() throws {
        let members = try Members(count: 1, replicationKey: false)
        let program = try compileC(Paths.packageRoot + "/Tests/StoreProbe/store_probe.c", to: members.dir + "/store_probe").path
        let pinFile = members.dir + "/probe.pin"
        try (members.userPIN + "\n").write(toFile: pinFile, atomically: true, encoding: .utf8)
        let result = try runProcess(program, [Paths.softhsmModule, members.tokenLabels[0], pinFile, "1"],
                                    environment: members.environment, timeout: 60)
        try #require(result.status == 0, "store_probe failed (status \(result.status)):\n\(result.output)\n\(result.stderr)")
        var steps: [String: String] = [:]
        for line in result.stdout.split(separator: "\n") {
            let words = line.split(separator: " ")
            if words.count == 4 { steps[String(words[0])] = String(words[1]) }
        }
        #expect(steps["idle"] == "seen", "\(result.output)")
        // If this changes (a SoftHSM that reads the token again), the model and the lease's rules deserve a new look.
        #expect(steps["after-own-write"] == "never", "\(result.output)")
        #expect(steps["after-other-write"] == "seen", "\(result.output)")
        #expect(!result.output.contains(members.userPIN))
    }
}
