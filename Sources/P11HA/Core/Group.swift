// A group: its members, their health, the scheduler that picks a member per operation, and the group's login.
import CInterop
import Synchronization

public final class Group: @unchecked Sendable {
    public let slotID: CK_SLOT_ID
    public let config: GroupConfig
    public let members: [Member]
    /// Mechanisms every member supports, with the intersection of their sizes and flags.
    public let mechanisms: [(type: CK_MECHANISM_TYPE, info: CK_MECHANISM_INFO)]
    let objects = Mutex(ObjectTable())
    let login = Mutex(LoginState())
    /// Held across opening and closing sessions, logging in and out, member calls included (bounded each by the
    /// operation-timeout): the group's login state and its members' must change together, or a session closed
    /// on one thread while another opens one leaves the group saying "logged in" over members that logged out
    /// (their last session closed). The one lock p11ha holds while it calls members; nothing else takes it.
    let loginChanges = Mutex(())
    /// Odd while a change of the login state (login, logout, a closed session) is under way, and one more at
    /// each start and end: a peer's success is evidence against a member that failed the same call only when
    /// no such change overlapped them (SoftHSM answers CKR_GENERAL_ERROR to a search under a logout).
    let loginEpoch = Atomic<UInt64>(0)

    /// Runs a change of the login state under `loginChanges`, bracketed by `loginEpoch`.
    func changingLogin<T>(_ body: () throws(P11Error) -> T) throws(P11Error) -> T {
        try loginChanges.withLock { (_) throws(P11Error) -> T in
            loginEpoch.add(1, ordering: .acquiringAndReleasing)
            defer { loginEpoch.add(1, ordering: .acquiringAndReleasing) }
            return try body()
        }
    }
    /// The application's login ended (C_Logout, or its last session closed): the PIN kept for returning members
    /// goes, and token objects are found again by identity at their next use (a module may renumber them).
    func loginEnded() {
        login.withLock {
            $0.userType = nil
            $0.pin = nil
        }
        objects.withLock { $0.forgetCopiesForRefind() }
    }

    private let roundRobin = Atomic<Int>(0)

    struct LoginState {
        var userType: CK_USER_TYPE?
        /// Kept to log members in again after they return (zeroed on logout and finalize).
        var pin: Secret?
        var sessions = 0
        var readWriteSessions = 0
    }

    /// Serializes bringing members up to date among this host's processes (hosts are kept apart by each member's
    /// lease).
    let hostLock: HostLock
    /// What the members' replication records say the token holds, as far as this process has read them.
    let ledger = Mutex(Ledger())
    /// Whether a member lacking `record` must be given it now (`Ledger.isReplicable`).
    func isReplicable(_ record: ReplicaRecord, in ledger: Ledger) -> Bool {
        ledger.isReplicable(record, now: replicaClock.milliseconds, retention: retention)
    }
    /// Set when the members in service should be caught up with each other's records (after a login, or a
    /// member's return); the recovery worker does it.
    let catchUpWanted = Atomic<Bool>(false)
    /// Whether a member of the group has shown its replication key to this process: keys' fingerprints then carry
    /// their wrapped form, and a member where it cannot be found describes none.
    let replicationKeySeen = Atomic<Bool>(false)
    /// When (replica clock, ms) a catch-up is to be made again because objects had no holder in reach (0: none).
    let catchUpAgainAt = Atomic<UInt64>(0)
    /// Set when the members' records should be looked at (after a login).
    let watchWanted = Atomic<Bool>(false)
    /// Attribute values a catch-up found on a member that may be an application's change still under way (see
    /// `settles`), with when each was first seen (replica clock, ms).
    private let valuesInDoubt = Mutex<[ValueInDoubt: UInt64]>([:])
    /// How long an application's attribute change may take from its first member to its record on the last: every
    /// member's set and record within the operation-timeout, and a member that misses its deadline leaves service,
    /// so at most one timeout per member, plus one for the calls that answer (`Config.boundedWait`).
    let writeSettles: UInt64
    /// The records this process has read or written on each member, by handle (so that only new ones are read),
    /// valid while the member's epoch and the object table's generation hold (a restart or a logout renumbers).
    let recordCache = Mutex<[Int: RecordCache]>([:])
    /// When (replica clock, ms) the members' records were last looked at for writes of other processes
    /// (`Recovery.watch`).
    let lastWatch = Atomic<UInt64>(0)
    /// The records each member in service (by index) lacked at the last watch: a record that is young, and that the
    /// member did not lack then, may be a write on its way to it (`Recovery.watch`).
    let lackedAtLastWatch = Mutex<[Int: Set<Stamp>]>([:])
    /// Records this process knows are on no way to the members that lack them, which a catch-up therefore writes
    /// however young they are (`ReplicaKeeper.repair`'s `settledBefore`): those of its writes that a member in
    /// service failed to take (it answered a probe, so it stays), and its adoptions. Each is forgotten at the first
    /// watch where no member in service lacks it (`Recovery.watch`; one a compaction has made needless is lacked by
    /// none).
    let recordsDue = Mutex<Set<Stamp>>([])
    /// When (replica clock, ms) the members in service were last all looked at, object by object (`Recovery`'s
    /// scrub); the first scrub is one interval after start.
    let lastScrub = Atomic<UInt64>(0)
    /// When (replica clock, ms) the records were last compacted (`Recovery.compactIfDue`); the first compaction is
    /// one scrub interval after start.
    let lastCompaction = Atomic<UInt64>(0)
    /// How long tombstones are kept at least, in ms (nil: for ever); `Ledger.isReplicable`.
    let retention: UInt64?
    /// Stamps this process's records.
    package let replicaClock: ReplicaClock
    /// Where processes record their members' failures and recoveries for operators.
    public let statusFile: StatusFile

    /// `lockWait`: how long the host lock is waited for, as long as a member call may take (Config.boundedWait).
    init(slotID: CK_SLOT_ID, config: GroupConfig, members: [Member], lockDirectory: String, lockWait: Duration,
         replicaClock: ReplicaClock = ReplicaClock(), retention: Duration? = nil) {
        self.slotID = slotID
        self.retention = retention.map { UInt64($0.milliseconds) }
        writeSettles = UInt64(members.count + 1) * UInt64(lockWait.milliseconds)
        self.replicaClock = replicaClock
        lastScrub.store(replicaClock.milliseconds, ordering: .relaxed)
        lastCompaction.store(replicaClock.milliseconds, ordering: .relaxed)
        self.config = config
        self.members = members
        self.mechanisms = Self.commonMechanisms(members.filter { $0.isInService && $0.connected.load(ordering: .acquiring) })
        // Named after the configuration, not the tokens' live answers: every process must find the same file,
        // also one that started while a member did not answer.
        let identity = ([config.name] + members.map(\.config.displayURI)).joined(separator: "|")
        let base = "p11ha-\(stableSerial(identity))"
        let directory = HostDirectory(path: lockDirectory)
        self.hostLock = HostLock(file: HostFileLock(directory: directory, name: base + ".lock"), group: config.name, wait: lockWait)
        self.statusFile = StatusFile(directory: directory, name: base + ".status")
        // The default directory is made now, and any directory verified, so that a refusal is in the log from the
        // start. A refused directory leaves the group without coordination: what needs the lock waits (bringing
        // members up to date) and is done once the directory is usable.
        do throws(HostFileProblem) {
            _ = try directory.open()
        } catch {
            Log.event(.error, error.event, "group=\(config.name) path=\(error.path) reason=\"\(error.reason)\" effect=\"no coordination with this host's other processes: returning members wait until it is usable\"")
        }
        for member in members {
            member.onHealthChange = { [unowned self] in self.publish($0) }
            member.group = self
        }
    }

    public var name: String { config.name }
    public var label: String { config.label }

    /// Whether a catch-up may now set back `doubt`, a value that may be an application's change under way: a write
    /// sets the attribute on the members before it writes its record, and until then its value looks like one made
    /// without a record, which a catch-up sets back (the write's CKR_OK then comes with the old value on a member).
    /// Only once the value has been there `writeSettles` can no write of it be under way: such a write has written
    /// its record, or failed and been set back, by then, and the catch-up that finds the value still there read the
    /// records again first. Until then a catch-up is asked for at that time.
    func settles(_ doubt: ValueInDoubt) -> Bool {
        let now = replicaClock.milliseconds
        let firstSeen = valuesInDoubt.withLock { table in
            if let first = table[doubt] { return first }
            table[doubt] = now
            return now
        }
        let due = firstSeen &+ writeSettles
        if now >= due { return true }
        catchUp(by: due)
        return false
    }

    /// Asks for a catch-up at `due` (replica clock, ms) at the latest.
    func catchUp(by due: UInt64) {
        var current = catchUpAgainAt.load(ordering: .acquiring)
        while current == 0 || current > due {
            let (exchanged, original) = catchUpAgainAt.compareExchange(expected: current, desired: due, ordering: .acquiringAndReleasing)
            if exchanged { break }
            current = original
        }
    }

    /// Forgets the values in doubt on `member` that a catch-up of it did not find again (`found`: those it found).
    func keepValuesInDoubt(_ found: Set<ValueInDoubt>, on member: Int) {
        valuesInDoubt.withLock { table in table = table.filter { $0.key.member != member || found.contains($0.key) } }
    }

    /// The member with the fewest operations in flight among the active members in service that hold a copy
    /// (`copies` nil: any), ties broken round-robin; standby members only when no active one can serve.
    func pick(holding copies: [MemberObject?]? = nil, excluding excluded: Set<Int> = []) throws(P11Error) -> Member {
        let start = roundRobin.add(1, ordering: .relaxed).oldValue
        let n = members.count
        var best: Member?
        var bestLoad = Int.max
        var bestIsStandby = true
        for step in 0..<n {
            let member = members[(start &+ step) % n]
            guard member.isInService, !excluded.contains(member.index) else { continue }
            if let copies, copies[member.index] == nil { continue }
            let load = member.inFlight.load(ordering: .relaxed)
            let standby = member.isStandby
            if (bestIsStandby && !standby) || (standby == bestIsStandby && load < bestLoad) {
                best = member
                bestLoad = load
                bestIsStandby = standby
            }
        }
        guard let best else {
            // Held only by members out of service: a member fault for the application, which may retry.
            throw P11Error.deviceError
        }
        return best
    }

    /// The first active member in service (standby ones last) that holds a copy: where reads that must agree
    /// with each other (a length query and its read) and key generation go.
    func first(holding copies: [MemberObject?]? = nil, excluding excluded: Set<Int> = []) throws(P11Error) -> Member {
        let candidates = members.filter { member in
            member.isInService && !excluded.contains(member.index) && (copies == nil || copies![member.index] != nil)
        }
        guard let member = candidates.first(where: { !$0.isStandby }) ?? candidates.first else { throw P11Error.deviceError }
        return member
    }

    /// An object's identity: the one recorded, else read (through `read`) from its copy on a member in service
    /// other than `member`.
    func identity(of record: ObjectTable.Record, except member: Member,
                       read: (Member, MemberObject) -> [[UInt8]?]?) -> ObjectIdentity? {
        if let identity = record.identity { return identity }
        // Members in service first; then any other that may answer (none may be in service while one returns).
        let holders = members.filter { $0.isInService && $0 !== member }
            + members.filter { !$0.isInService && $0 !== member && $0.connected.load(ordering: .acquiring) }
        for holder in holders {
            if let copy = record.copies[holder.index], let values = read(holder, copy) { return ObjectIdentity(reading: values) }
        }
        return nil
    }

    /// p11ha's replication key, records and leases are infrastructure, not the application's: searches through
    /// the group skip them.
    func isInfrastructure(_ object: ObjectHandle) -> Bool {
        guard let identity = objects.withLock({ $0[object]?.identity }) else { return false }
        return identity.isReplicationKey || identity.isInfrastructure
    }

    public var membersInService: [Member] { members.filter(\.isInService) }

    /// A member that cannot tell its mechanisms now (it failed while the group started) counts for nothing,
    /// rather than for an empty list that would leave the group with no mechanism at all.
    private static func commonMechanisms(_ members: [Member]) -> [(type: CK_MECHANISM_TYPE, info: CK_MECHANISM_INFO)] {
        intersect(members.compactMap { member -> [(type: CK_MECHANISM_TYPE, info: CK_MECHANISM_INFO)]? in
            do throws(P11Error) {
                var infos: [(type: CK_MECHANISM_TYPE, info: CK_MECHANISM_INFO)] = []
                for type in try member.token.mechanismList() {
                    do throws(P11Error) {
                        infos.append((type, try member.token.mechanismInfo(type)))
                    } catch where !error.isMemberFault {
                        // Listed without information: the group does not offer it.
                    }
                }
                return infos
            } catch {
                return nil
            }
        })
    }

    /// The mechanisms in every list, in the first list's order: the largest minimum key size, the smallest
    /// maximum, and the flags all share.
    static func intersect(_ lists: [[(type: CK_MECHANISM_TYPE, info: CK_MECHANISM_INFO)]]) -> [(type: CK_MECHANISM_TYPE, info: CK_MECHANISM_INFO)] {
        guard let first = lists.first else { return [] }
        let others = lists.dropFirst().map { Dictionary($0.map { ($0.type, $0.info) }, uniquingKeysWith: { a, _ in a }) }
        return first.compactMap { entry in
            var info = entry.info
            for other in others {
                guard let theirs = other[entry.type] else { return nil }
                info = CK_MECHANISM_INFO(ulMinKeySize: max(info.ulMinKeySize, theirs.ulMinKeySize),
                                         ulMaxKeySize: min(info.ulMaxKeySize, theirs.ulMaxKeySize),
                                         flags: info.flags & theirs.flags)
            }
            return (entry.type, info)
        }
    }
}

/// One member's records as this process knows them.
struct RecordCache {
    var epoch: Int
    var generation: UInt64
    /// The stamps of the records at each handle read: one, or a batch's.
    var stamps: [MemberObject: [Stamp]] = [:]
}

/// The value of one attribute on one member's copy of an object, which a catch-up would set back but which may be an
/// application's change under way (`Group.settles`).
struct ValueInDoubt: Hashable {
    let member: Int
    let object: ObjectUID
    let type: CK_ATTRIBUTE_TYPE
    let value: [UInt8]
}

