// One member of a group: its token (a backend), its health and its load. The token's calls are the backend's.
import CInterop
import Glibc
import Synchronization

public enum Health: UInt8, Sendable {
    case inService = 0
    /// Stopped answering (or answered with a device fault): probed in the background.
    case failed = 1
    /// Missed a write: must be brought up to date before it serves again.
    case stale = 2
    /// Answering again; being logged in and brought up to date.
    case recovering = 3

    public var name: String { ["in-service", "failed", "stale", "recovering"][Int(rawValue)] }
}

/// When a member last failed and recovered, and why it failed: for operators.
public struct MemberHistory: Sendable {
    public var lastFailure: Int64? = nil
    public var lastFailureReason: String? = nil
    public var lastRecovery: Int64? = nil
    public var failures = 0
    /// Objects the last repair could not give the member (named; see `ReplicaKeeper.Repair`).
    public var unrepairable: [String] = []
    /// When (replica clock, ms) each object of `unrepairable` was first found with no holder in reach, as long
    /// as every repair since found it so.
    var noHolderSince: [String: UInt64] = [:]
}

/// Seconds since the epoch, for operators' records.
func wallClock() -> Int64 {
    var ts = timespec()
    clock_gettime(CLOCK_REALTIME, &ts)
    return Int64(ts.tv_sec)
}

public final class Member: @unchecked Sendable {
    public let index: Int
    public let config: MemberConfig
    /// The token: every call to it goes through here (under the deadline when there is one).
    public let token: any TokenBackend
    /// Whether the token has been found since the group started (one that did not answer at start has not).
    let connected = Atomic<Bool>(false)
    /// Counts failures: an operation started before the latest one must be replayed, not continued.
    public let epoch = Atomic<Int>(0)
    /// Moves when recovery restarts the member's module (its handles are all new), and with the epoch: what is
    /// kept by member handle is valid for one value of `handleEra`.
    let restarts = Atomic<Int>(0)
    package var handleEra: Int { epoch.load(ordering: .acquiring) &* 65_536 &+ restarts.load(ordering: .acquiring) }
    /// Probes in a row that answered CKR_GENERAL_ERROR: at `restartAfterProbes`, recovery restarts the module
    /// (`Recovery.restartModule`).
    let brokenProbes = Atomic<Int>(0)
    /// Doubles with each restart until the member serves again: one that stays broken restarts its module, and
    /// so interrupts the members that share it, ever more rarely.
    let restartAfterProbes = Atomic<Int>(Member.firstRestartAfter)
    static let firstRestartAfter = 3
    /// Its module was restarted for another member: its next recovery finds its token and objects again.
    let moduleRestarted = Atomic<Bool>(false)
    /// Half-made objects left here by a write that failed over to a peer (a generated key whose carrying failed
    /// with the member), with the module's restart count they belong to: destroyed when it returns, before it is
    /// brought up to date (`Recovery`). No record describes them, so no repair would.
    let orphans = Mutex<[(restarts: Int, handle: MemberObject)]>([])

    /// Destroys what a failed write made here, or keeps it for recovery when the member cannot do it now.
    func discardHalfMade(_ session: MemberSession, _ objects: [MemberObject]) {
        for object in objects where (try? token.destroyObject(session, object)) == nil {
            let era = restarts.load(ordering: .acquiring)
            orphans.withLock { $0.append((era, object)) }
        }
    }
    /// The replication key's handle here, once found, with the epoch it was found in (a public object: its handle
    /// holds until the member leaves service). Looked up once, so that a search that briefly misses it (another
    /// process rewriting objects) never makes a key's fingerprint weaker than its copies'.
    let replicationKeyCache = Mutex<(epoch: Int, generation: UInt64, handle: MemberObject)?>(nil)
    /// Operations in progress on this member (from init to their last call): the scheduler's load measure.
    public let inFlight = Atomic<Int>(0)
    /// Operations this member has been given since initialization.
    public let served = Atomic<UInt64>(0)
    /// Changed only by the fan-out (FanOut.swift), the one place that decides a member's health.
    let healthValue = Atomic<UInt8>(Health.inService.rawValue)
    /// The member's own PIN from its URI (pin-value or pin-source), if any.
    package let ownPIN: Secret?
    /// Set by the group: publishes failures and recoveries for operators.
    nonisolated(unsafe) var onHealthChange: ((Member) -> Void)?
    /// Set once by its group.
    nonisolated(unsafe) weak var group: Group?

    public let name: String
    public var isStandby: Bool { config.standby }
    let history = Mutex(MemberHistory())
    public var hasOwnPIN: Bool { ownPIN != nil }
    public var health: Health { Health(rawValue: healthValue.load(ordering: .acquiring)) ?? .failed }
    public var isInService: Bool { health == .inService }

    init(index: Int, name: String, config: MemberConfig, token: any TokenBackend, connected: Bool, ownPIN: Secret?) {
        self.index = index
        self.name = name
        self.config = config
        self.token = token
        self.connected.store(connected, ordering: .releasing)
        self.ownPIN = ownPIN
    }
}
