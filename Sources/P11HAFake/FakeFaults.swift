// The fault script of a fake token (or of one connection to it): scripted errors, hangs, latency and crashes,
// and how often each call was made.
import CInterop
import Glibc
import P11HA
import Synchronization

/// One case per `TokenBackend` method, to aim faults at and to count calls by.
public enum FakeCall: String, CaseIterable, Sendable {
    case connect, reconnect, restartModule, disconnect
    case tokenInfo, mechanismList, mechanismInfo
    case openSession, closeSession, login, logout, initPIN, setPIN
    case createObject, copyObject, destroyObject, objectSize, attributeValues, setAttributeValues, findObjects
    case generateKey, generateKeyPair, wrapKey, unwrapKey, deriveKey, generateRandom, seedRandom
    case operationInit, singlePart, update, cipherUpdate, final, digestKey, verify, verifyFinal
    case operationState, setOperationState
}

public enum FakeFault: Sendable, Equatable {
    /// The call answers this code and does nothing else.
    case error(CK_RV)
    /// The call blocks until `releaseHangs()` or `clearFaults()`, then answers CKR_DEVICE_ERROR without
    /// doing anything: a device that stopped answering and later reports the failure.
    case hang
    /// The call blocks until released, then does its work: a slow device that completes a call its caller
    /// gave up on (a write the caller believes failed, but which happened).
    case hangThenProceed
    /// The call sleeps this long, then proceeds.
    case latency(Duration)
    /// The token (or connection) goes down: this and every later call answer CKR_DEVICE_ERROR until `revive()`;
    /// then each connection answers CKR_CRYPTOKI_NOT_INITIALIZED until `reconnect(restartingModule: true)`.
    case crash
    /// This call and every later one through the scope answer the code until the module restarts
    /// (`FakeToken.restartModule`) or `clearFaults()`: a module whose own state for the token broke in one
    /// process, as SoftHSM's does after it read a token file while another process rewrote it. The rule fires
    /// once; the scope then stays wedged by its own state.
    case wedge(CK_RV)
}

/// Scripted faults, the down/up state and call counters of one scope: a whole token (`FakeTokenStore.faults`,
/// seen by every connection) or one connection (`FakeToken.faults`, one host's view).
///
/// Several rules may match a call; they are tried in the order injected: latencies add up, and the first
/// other fault that fires decides the call. Probabilities draw from a generator seeded from the store's seed,
/// so a single-threaded run replays exactly.
public final class FakeFaults: Sendable {
    struct Rule {
        var fault: FakeFault
        var calls: Set<FakeCall>?
        var kinds: Set<OperationKind>?
        var remaining: Int?
        var probability: Double
    }

    struct State {
        var rules: [Rule] = []
        var random: SplitMix64
        var counts: [FakeCall: Int] = [:]
        /// Advanced by every release: a hung call waits for it to move past the value it saw.
        var hangGeneration: UInt64 = 0
        var hanging = 0
        var isDown = false
        var crashes = 0
        /// Set by a `.wedge` fault: every call answers it until `unwedge()`.
        var wedgedWith: CK_RV? = nil
    }

    let state: Mutex<State>

    init(seed: UInt64) {
        state = Mutex(State(random: SplitMix64(seed: seed)))
    }

    // MARK: scripting

    /// Makes `calls` (nil: every call) fail with `fault`, `times` times (nil: until cleared), each time with
    /// `probability`. `kinds` narrows operation calls (operationInit, singlePart, update, final...) to those kinds.
    public func inject(_ fault: FakeFault, on calls: Set<FakeCall>? = nil, kinds: Set<OperationKind>? = nil,
                       times: Int? = nil, probability: Double = 1) {
        if let times, times <= 0 { return }
        state.withLock { $0.rules.append(Rule(fault: fault, calls: calls, kinds: kinds, remaining: times, probability: probability)) }
    }

    /// Removes every rule and releases every hung call (it does not revive a crashed token).
    public func clearFaults() {
        state.withLock {
            $0.rules = []
            $0.hangGeneration &+= 1
            $0.wedgedWith = nil
        }
    }

    /// Ends a `.wedge`: the module restarted.
    func unwedge() {
        state.withLock { $0.wedgedWith = nil }
    }

    public var isWedged: Bool { state.withLock { $0.wedgedWith != nil } }

    /// Lets every call hung now go on (new calls matching a `.hang` rule still hang).
    public func releaseHangs() {
        state.withLock { $0.hangGeneration &+= 1 }
    }

    /// Calls blocked in a hang now: lets a test wait until the call it aims at is stuck.
    public var hangingCalls: Int { state.withLock { $0.hanging } }

    /// Takes the scope down now, as a `.crash` fault does.
    public func crash() {
        state.withLock { state in
            if !state.isDown { state.crashes += 1 }
            state.isDown = true
        }
    }

    /// Brings the scope back: connections must now restart their module (`reconnect(restartingModule: true)`).
    public func revive() {
        state.withLock { $0.isDown = false }
    }

    public var isDown: Bool { state.withLock { $0.isDown } }

    /// How many times the scope crashed: a connection made before the latest crash must restart its module.
    public var crashes: Int { state.withLock { $0.crashes } }

    // MARK: counting

    /// How many times `call` was made through this scope (faulted calls included).
    public func count(_ call: FakeCall) -> Int { state.withLock { $0.counts[call] ?? 0 } }

    public var counts: [FakeCall: Int] { state.withLock { $0.counts } }

    public var totalCalls: Int { state.withLock { $0.counts.values.reduce(0, +) } }

    public func resetCounts() { state.withLock { $0.counts = [:] } }

    // MARK: for the fake's calls

    func record(_ call: FakeCall) {
        state.withLock { $0.counts[call, default: 0] += 1 }
    }

    /// Applies the rules matching this call: sleeps through latencies, blocks in hangs, crashes the scope.
    /// Throws what the call must answer instead of doing its work.
    func apply(_ call: FakeCall, kind: OperationKind?) throws(P11Error) {
        if let rv = state.withLock({ $0.wedgedWith }) { throw P11Error.member(rv) }
        let fired = state.withLock { state -> [FakeFault] in
            var fired: [FakeFault] = []
            var index = 0
            while index < state.rules.count {
                let rule = state.rules[index]
                let matches = (rule.calls?.contains(call) ?? true)
                    && (rule.kinds == nil || kind.map { rule.kinds!.contains($0) } == true)
                guard matches, state.random.chance(rule.probability) else {
                    index += 1
                    continue
                }
                fired.append(rule.fault)
                if case .wedge = rule.fault {
                    // Once wedged, the scope stays so by its own state, not by the rule.
                    state.rules.remove(at: index)
                } else if let remaining = rule.remaining {
                    if remaining <= 1 {
                        state.rules.remove(at: index)
                    } else {
                        state.rules[index].remaining = remaining - 1
                        index += 1
                    }
                } else {
                    index += 1
                }
                if case .latency = rule.fault { continue }
                break
            }
            return fired
        }
        for fault in fired {
            switch fault {
            case .latency(let duration):
                sleep(duration)
            case .error(let rv):
                throw P11Error.member(rv)
            case .crash:
                crash()
                throw P11Error.member(CK_RV(CKR_DEVICE_ERROR))
            case .hang:
                waitForRelease()
                throw P11Error.member(CK_RV(CKR_DEVICE_ERROR))
            case .hangThenProceed:
                waitForRelease()
            case .wedge(let rv):
                state.withLock { $0.wedgedWith = rv }
                throw P11Error.member(rv)
            }
        }
    }

    /// Blocks until the next release; polls, since a hang is a test's rare event and a 1 ms nap costs nothing.
    private func waitForRelease() {
        let generation = state.withLock { state -> UInt64 in
            state.hanging += 1
            return state.hangGeneration
        }
        while state.withLock({ $0.hangGeneration }) == generation { sleep(.milliseconds(1)) }
        state.withLock { $0.hanging -= 1 }
    }
}

func sleep(_ duration: Duration) {
    let (seconds, attoseconds) = duration.components
    guard seconds > 0 || attoseconds > 0 else { return }
    var request = timespec(tv_sec: Int(seconds), tv_nsec: Int(attoseconds / 1_000_000_000))
    var remaining = timespec()
    while nanosleep(&request, &remaining) != 0 && errno == EINTR { request = remaining }
}
