// p11ha-scenario SCENARIO MODULE: runs one scenario against a PKCS#11 module through its C ABI and prints
// each failed check; exits 0 only when every check held. Environment: P11HA_TEST_TOKEN (the token label),
// P11HA_TEST_PIN (the user PIN), P11HA_TEST_SO_PIN, P11HA_TEST_MEMBERS (member token labels, comma-separated,
// for scenarios that look at members directly through SOFTHSM_MODULE), P11HA_TEST_OPERATION_TIMEOUT (seconds, the
// operation-timeout configured, for scenarios that time calls).
import CInterop
import Glibc

let arguments = CommandLine.arguments
guard arguments.count == 3 else { fatal("usage: p11ha-scenario SCENARIO MODULE") }
let scenarios: [String: (Module) -> Void] = [
    "initialize": initializeScenario,
    "sessions": sessionsScenario,
    "objects": objectsScenario,
    "crypto": cryptoScenario,
    "bad-input": badInputScenario,
    "spread": spreadScenario,
    "pins": pinScenario,
    "replication": replicationScenario,
    "no-replication-key": noReplicationKeyScenario,
    "refused-generation": refusedGenerationScenario,
    "domain-parameters": domainParametersScenario,
    "uncarried-key": uncarriedKeyScenario,
    "kept-key": keptKeyScenario,
    "value-length": valueLengthScenario,
    "generated-keys": generatedKeysScenario,
    "interface-30": interface30Scenario,
    "mechanism-table": mechanismTableScenario,
    "failover": failoverScenario,
    "multipart-failover": multipartFailoverScenario,
    "replay-limit": replayLimitScenario,
    "caller-errors": callerErrorScenario,
    "deadline": deadlineScenario,
    "all-down": allDownScenario,
    "standby": standbyScenario,
    "writes-while-down": writesWhileDownScenario,
    "resync-check": resyncCheckScenario,
    "fork-failover": forkFailoverScenario,
    "failover-figures": failoverFiguresScenario,
    "silent-member": silentMemberScenario,
    "hostile": hostileScenario,
    "no-login": noLoginScenario,
    "churn": churnScenario,
    "bounds": boundsScenario,
    "fuzz": fuzzScenario,
    "fuzz-episode": fuzzEpisodeScenario,
    "fuzz-settle": fuzzSettleScenario,
    "member-crash": memberCrashScenario,
    "lifecycle": lifecycleScenario,
    "writer": writerScenario,
    "member-inventory": memberInventoryScenario,
]
guard let scenario = scenarios[arguments[1]] else { fatal("unknown scenario \(arguments[1])") }
scenario(Module(path: arguments[2]))
print("\(arguments[1]): \(checks - failures) passed, \(failures) failed")
exit(failures == 0 ? 0 : 1)
