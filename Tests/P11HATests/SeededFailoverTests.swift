// Randomized runs of one process's group through member faults, each from a seed: single-threaded (no deadline
// workers, recovery driven by the test), so a failing seed replays exactly: P11HA_SEED=N swift test --filter Seeded.
import CInterop
import Glibc
@testable import P11HA
import P11HAFake
import Synchronization
import Testing

/// The seeds to run: P11HA_SEED=N runs that one; P11HA_SEEDS=N runs 1...N (default 300).
let failoverSeeds: [UInt64] = {
    if let one = getenv("P11HA_SEED").flatMap({ UInt64(String(cString: $0)) }) { return [one] }
    let count = getenv("P11HA_SEEDS").flatMap { UInt64(String(cString: $0)) } ?? 300
    return Array(1...max(1, count))
}()

/// The fake's generator (the same SplitMix64 as before, so a seed means the same run), with draws below a bound.
extension SplitMix64 {
    mutating func below(_ n: Int) -> Int { Int(next() % UInt64(n)) }
}

@Suite struct SeededFailover {
    @Test("one member at a time crashing or faulting, and recovering: every object whose write returned CKR_OK is on every member once, every destroyed one on none, and signing fails only with no member in service")
    func randomRuns() throws {
        for seed in failoverSeeds {
            var failure = try run(seed: seed)
            // Replaying one seed: tell the whole story (the steps and p11ha's log).
            if failoverSeeds.count == 1, let told = failure { failure = told + "\n" + lastTrace.withLock { $0 } }
            #expect(failure == nil, "seed \(seed) (replay: P11HA_SEED=\(seed) swift test --filter SeededFailover): \(failure ?? "")")
            if failure != nil { break }
        }
    }

    /// One run; the first broken promise, or nil.
    func run(seed: UInt64) throws -> String? {
        var random = SplitMix64(seed: seed)
        let fake = try FakeGroup(members: 3, seed: seed)
        let runtime = fake.runtime
        let session = try fake.userSession()
        let key = try runtime.createObject(session, hmacKey("signing key"))
        var live: [String: ObjectHandle] = [:]   // created with CKR_OK, not destroyed
        var destroyed = Set<String>()                // destroyed with CKR_OK
        var uncertain = Set<String>()                // a write that failed with a member fault: either outcome
        var down = Set<Int>()
        var counter = 0
        // One-off faults hit the signing path; writes meet whole-member crashes, which fall between steps. A fault
        // between a write and its journal record (the journal's own calls) can leave members whose write counts tie
        // while their objects differ: per-member counts cannot order such histories. That is the convergent
        // replication issue's (immutable per-write records); P11HA_JOURNAL_FAULTS=1 puts those faults in to show it.
        let journalFaults = getenv("P11HA_JOURNAL_FAULTS") != nil
        // By default one member at a time is out (crashed, or out after a fault), the failure p11ha promises to
        // hide today; P11HA_MULTI_FAULTS=1 lets several be out at once, where a member that missed writes can
        // return while the only holders of those writes are down, and what it lacks is then lost: again the
        // convergent replication issue's (merge by union with tombstones, not "newest member wins").
        let multipleFaults = getenv("P11HA_MULTI_FAULTS") != nil
        // A member hit since the last recovery that left every member in service (perhaps not noticed yet).
        var unsettled = Set<Int>()
        let faultAllowed = { multipleFaults || (unsettled.isEmpty && down.isEmpty && fake.members.allSatisfy { $0.isInService }) }
        let faultable: [FakeCall] = journalFaults ? [.createObject, .destroyObject, .findObjects, .operationInit, .singlePart, .attributeValues]
                                                  : [.operationInit, .singlePart]

        var trace: [String] = []
        defer {
            let log = (try? readWholeFile(fake.directory + "/p11ha.log")).map { String(decoding: $0, as: UTF8.self) } ?? ""
            lastTrace.withLock { $0 = trace.joined(separator: "\n") + "\n--- p11ha log ---\n" + log }
        }
        for step in 0..<60 {
            let roll = random.below(100)
            trace.append("step \(step) roll \(roll) members \(fake.members.map(\.health.name)) down \(down.sorted())")
            switch roll {
            case 0..<30:
                counter += 1
                let label = "object-\(counter)"
                trace.append("  create \(label)")
                do {
                    live[label] = try runtime.createObject(session, dataObject(label))
                } catch where error.rv == CKR_DEVICE_ERROR {
                    uncertain.insert(label)
                } catch {
                    return "step \(step): create \(label) answered \(error)"
                }
            case 30..<45:
                guard let label = live.keys.sorted().randomElement(using: &random) else { continue }
                trace.append("  destroy \(label)")
                do {
                    try runtime.destroyObject(session, live[label]!)
                    live[label] = nil
                    destroyed.insert(label)
                } catch where error.rv == CKR_DEVICE_ERROR {
                    live[label] = nil
                    uncertain.insert(label)
                } catch {
                    return "step \(step): destroy \(label) answered \(error)"
                }
            case 45..<65:
                do {
                    try runtime.operationInit(.sign, session, hmac, key: key)
                    _ = try runtime.singlePart(.sign, session, Array("step \(step)".utf8), capacity: 64)
                } catch where error.rv == CKR_DEVICE_ERROR && !fake.members.contains(where: { $0.isInService }) {
                    // Every member tried and out of service: a member fault is the honest answer.
                } catch {
                    return "step \(step): sign answered \(error) with members \(fake.members.map(\.health.name))"
                }
            case 65..<75:
                let member = random.below(3)
                if faultAllowed(), down.count < 2, down.insert(member).inserted {
                    unsettled.insert(member)
                    trace.append("  crash \(member)")
                    fake.stores[member].faults.crash()
                }
            case 75..<85:
                guard let member = down.sorted().randomElement(using: &random) else { continue }
                down.remove(member)
                trace.append("  revive \(member)")
                fake.stores[member].faults.revive()
            case 85..<93:
                let member = random.below(3)
                let call = faultable[random.below(faultable.count)]
                guard faultAllowed() else { continue }
                unsettled.insert(member)
                trace.append("  one fault on \(member) \(call)")
                fake.stores[member].faults.inject(.error(CK_RV(CKR_DEVICE_ERROR)), on: [call], times: 1)
            default:
                trace.append("  recover")
                fake.recover()
                if !multipleFaults && down.isEmpty && fake.members.allSatisfy({ $0.isInService }) {
                    // Settled: a one-off fault no call met yet is dropped, so that the next one is the only one
                    // (three members each failing one call would be three failures at once, and the request
                    // blamed: see the fan-out's evidence rule).
                    for store in fake.stores { store.faults.clearFaults() }
                    unsettled = []
                }
            }
        }

        for member in down { fake.stores[member].faults.revive() }
        for store in fake.stores { store.faults.clearFaults() }
        for _ in 0..<5 where !fake.members.allSatisfy({ $0.isInService }) { fake.recover() }
        let states = fake.members.map(\.health.name)
        guard fake.members.allSatisfy({ $0.isInService }) else { return "members not back in service: \(states)" }
        for store in 0..<3 {
            for label in live.keys.sorted() where fake.objects(labelled: label, on: store) != 1 {
                return "\(label) (created with CKR_OK) is on member \(store) \(fake.objects(labelled: label, on: store)) times"
            }
            for label in destroyed.sorted() where fake.objects(labelled: label, on: store) != 0 {
                return "\(label) (destroyed with CKR_OK) is back on member \(store)"
            }
        }
        for label in uncertain.sorted() {
            let counts = (0..<3).map { fake.objects(labelled: label, on: $0) }
            if Set(counts).count != 1 || counts[0] > 1 { return "\(label) (a write that failed) differs across members: \(counts)" }
        }
        return nil
    }
}

/// The story of the last run, for a replayed seed.
let lastTrace = Mutex("")

func readWholeFile(_ path: String) throws -> [UInt8] {
    let fd = open(path, O_RDONLY)
    guard fd >= 0 else { throw TestFailure("cannot open \(path)") }
    defer { close(fd) }
    var out: [UInt8] = []
    var buffer = [UInt8](repeating: 0, count: 65536)
    while true {
        let n = read(fd, &buffer, buffer.count)
        if n <= 0 { break }
        out += buffer[0..<n]
    }
    return out
}

extension Array {
    func randomElement(using random: inout SplitMix64) -> Element? {
        isEmpty ? nil : self[random.below(count)]
    }
}
