// Recovery: a background worker probes members out of service; one that answers is logged in, brought up to
// date from the union of the members' replication records, given back its sessions, and only then returned to
// service. The same worker brings members in service up to date after a login or a return (catch-up).
import CInterop
import Glibc
import Synchronization

final class RecoveryWorker: @unchecked Sendable {
    private let signal = Signal()
    private let started = Atomic<Bool>(false)
    private let stopped = Atomic<Bool>(false)
    /// Held for a whole pass, so that shutdown never finalizes a module under a recovery.
    let pass = Mutex(())
    let interval: Duration
    /// False in tests that drive recovery themselves (`Runtime.recoverMembers`), one step at a time, so that a
    /// seeded run replays exactly.
    let background: Bool
    private weak var recovery: Recovery?

    /// How often an idle worker looks for writes of other processes that left members apart.
    var watchInterval: Duration { max(interval * 10, .seconds(1)) }
    /// How often the worker looks at every object of every member in service (a catch-up), whatever the records
    /// say: a member can hold a record whose write it did not complete (a destroy whose tombstone it took but whose
    /// copy it failed to destroy, the process that knew it restarted since: simulation seed 36093), and nothing in
    /// the records tells it apart. 10 minutes at the default recovery-interval.
    var scrubInterval: Duration { scrub ?? watchInterval * 30 }
    /// The configured scrub-interval (nil: 30 watch intervals).
    private let scrub: Duration?

    init(interval: Duration, scrub: Duration? = nil, background: Bool = true) {
        self.interval = interval
        self.scrub = scrub
        self.background = background
    }

    func attach(_ recovery: Recovery) { self.recovery = recovery }

    /// Asks for a pass now (starting the worker the first time a member fails).
    func wake() {
        if stopped.load(ordering: .acquiring) || !background { return }
        if !started.exchange(true, ordering: .acquiringAndReleasing) {
            spawnThread { [self] in loop() }
        }
        signal.raise()
    }

    /// Set once shutdown begins: waits for a host lock end early.
    var stopping: Bool { stopped.load(ordering: .acquiring) }

    func stop() {
        stopped.store(true, ordering: .releasing)
        signal.raise()
        pass.withLock { _ in recovery?.finishHostWork() }
    }

    private func loop() {
        while !stopped.load(ordering: .acquiring) {
            var pending = false
            pass.withLock { _ in
                guard !stopped.load(ordering: .acquiring), let recovery else { return }
                pending = recovery.recoverMembers()
            }
            // A short pause after a wake-up lets a burst of failures settle; then probe every interval. Idle, it
            // looks at the members' records now and then (`Recovery.watch`).
            signal.wait(timeout: pending ? interval : watchInterval)
        }
    }
}

/// Brings members out of service back: probes them, logs them in, brings them up to date from an up-to-date
/// peer, gives the application's sessions a session on them, and returns them to service through the fan-out.
final class Recovery: @unchecked Sendable {
    let worker: RecoveryWorker
    private let groups: [Group]
    private let sessions: SessionTable
    private let fanOut: FanOut
    private let replicas: ReplicaKeeper

    init(worker: RecoveryWorker, groups: [Group], sessions: SessionTable, fanOut: FanOut) {
        self.worker = worker
        self.groups = groups
        self.sessions = sessions
        self.fanOut = fanOut
        self.replicas = ReplicaKeeper(fanOut: fanOut)
        worker.attach(self)
        for group in groups {
            // Work left for the host lock is this worker's: a status update.
            group.hostLock.onDeferredWork { [weak worker] in worker?.wake() }
        }
    }

    /// One pass: every member out of service, then a catch-up of the members in service where one is asked for;
    /// returns whether any work still waits or any member is still out.
    func recoverMembers() -> Bool {
        var pending = false
        for group in groups {
            if !group.statusFile.flush(group, waitingUpTo: Self.statusWait) { pending = true }
            for member in group.members where !member.isInService {
                recover(member, in: group)
                if !member.isInService { pending = true }
            }
            let now = group.replicaClock.milliseconds
            if group.watchWanted.exchange(false, ordering: .acquiringAndReleasing)
                || now &- group.lastWatch.load(ordering: .acquiring) >= UInt64(worker.watchInterval.milliseconds) {
                group.lastWatch.store(now, ordering: .releasing)
                watch(group)
            }
            if now &- group.lastScrub.load(ordering: .acquiring) >= UInt64(worker.scrubInterval.milliseconds) {
                group.lastScrub.store(now, ordering: .releasing)
                group.catchUpWanted.store(true, ordering: .releasing)
            }
            let again = group.catchUpAgainAt.load(ordering: .acquiring)
            if again != 0 && now >= again {
                group.catchUpAgainAt.store(0, ordering: .releasing)
                group.catchUpWanted.store(true, ordering: .releasing)
            }
            if group.catchUpWanted.exchange(false, ordering: .acquiringAndReleasing) {
                if !catchUp(group) {
                    group.catchUpWanted.store(true, ordering: .releasing)
                    pending = true
                }
            }
        }
        return pending
    }

    /// Asks for a catch-up of the members in service.
    func requestCatchUp(_ group: Group) {
        group.catchUpWanted.store(true, ordering: .releasing)
        worker.wake()
    }

    /// Asks for a look at the members' records (after a login, when private records become visible), at the
    /// worker's next pass; the worker is not started for it alone (a login whose members hold different numbers of
    /// records starts a catch-up, which starts it). Started at every login, the worker's calls ran beside every
    /// application's, and the fuzzer's episodes crashed now and then (SIGSEGV, not reproduced on replay).
    func requestWatch(_ group: Group) {
        group.watchWanted.store(true, ordering: .releasing)
    }

    /// Looks at the records of the members in service (reading only those this process has not read) and asks
    /// for a catch-up when they are apart: a member lacks a record another holds (a write of another process or
    /// host that did not reach it), or another process recently changed an attribute (two changes of one
    /// attribute side by side can reach members in different orders; the catch-up applies the greater stamp).
    /// One look proves nothing about a young record: a write writes its record on one member after another, so a
    /// record younger than a write can take (`Group.writeSettles`) that a member lacks is taken for missing only
    /// when the member lacked it at the last watch too. Under a steady stream of writes every watch found some
    /// record on its way, and each catch-up it asked for looked at every object of every member and wrote the
    /// record a second time (`scripts/bench-failover`: a catch-up of member-a or member-b every second while the
    /// application created objects).
    func watch(_ group: Group) {
        let loggedIn = group.login.withLock { $0.userType == CK_USER_TYPE(CKU_USER) }
        var heldBy: [(member: Int, held: Set<Stamp>)] = []
        var recentChange = false
        // Within three watch intervals: every process that watches sees it while it is recent.
        let recent = group.replicaClock.milliseconds &- 3 * UInt64(worker.watchInterval.milliseconds)
        for member in group.membersInService {
            if worker.stopping { return }
            guard let s = reach(member) else { continue }
            guard let (held, new) = try? replicas.refreshLedger(group, from: member, s) else { continue }
            heldBy.append((member.index, held))
            recentChange = recentChange || new.contains { $0.operation == .set && $0.stamp.milliseconds >= recent }
        }
        // Only the records a member must hold: those a compaction removes may be on some members for a while.
        let ledger = group.ledger.withLock { $0 }
        heldBy = heldBy.map { ($0.member, $0.held.filter { ledger.records[$0].map { group.isReplicable($0, in: ledger) } ?? true }) }
        let union = heldBy.reduce(into: Set<Stamp>()) { $0.formUnion($1.held) }
        let lacking = Dictionary(heldBy.map { ($0.member, union.subtracting($0.held)) }) { a, _ in a }
        let lackedBefore = group.lackedAtLastWatch.withLock { last in
            defer { last = lacking }
            return last
        }
        group.recordsDue.withLock { due in due = due.filter { stamp in lacking.values.contains { $0.contains(stamp) } } }
        let now = group.replicaClock.milliseconds
        let missing = lacking.contains { member, stamps in
            stamps.contains { $0.milliseconds &+ group.writeSettles <= now || lackedBefore[member]?.contains($0) == true }
        }
        // Private records are visible only logged in: compared alike, the sets differ only by what a member lacks.
        let apart = loggedIn || group.login.withLock({ $0.userType == nil }) ? missing : false
        if apart || recentChange { group.catchUpWanted.store(true, ordering: .releasing) }
    }


    /// How long the worker waits for the status file's lock: another process updates it in a moment, and an
    /// update that waits longer is tried again at the next pass.
    static let statusWait: Duration = .milliseconds(100)

    /// At shutdown: one more short try at the status file.
    func finishHostWork() {
        for group in groups { _ = group.statusFile.flush(group, waitingUpTo: Self.statusWait) }
    }

    /// How long a lease on a member lasts: a repair that would outlast it stops and is taken up again later.
    static let leaseDuration = Lease.repairDuration

    /// Brings each member in service up to date with the union of the records of all members in service, each
    /// under its lease, while it goes on serving. Returns whether it is done (false: try again at the next pass,
    /// as when another process held a lease, or a pass changed something and must be followed by one that
    /// changes nothing).
    func catchUp(_ group: Group) -> Bool {
        var settled = true
        // A catch-up gives way to another process of this host that waits to bring a member back (`HostLock.isWanted`):
        // it does not start, and stops at its next change.
        func givesWay() -> Bool { worker.stopping || group.hostLock.isWanted }
        if group.hostLock.isWanted { return false }
        let result = group.hostLock.withLock(for: "catching up members in service", waitingUpTo: group.hostLock.wait,
                                             cancelled: givesWay) { () -> Bool in
            let (caughtUp, compaction) = group.loginChanges.withLock { _ -> (Bool, (reached: [ReplicaKeeper.Reached], complete: Bool)?) in
                let loggedIn = group.login.withLock { $0.userType == CK_USER_TYPE(CKU_USER) }
                // With the SO logged in, the user's objects are not visible: nothing is concluded then.
                if group.login.withLock({ $0.userType != nil }) && !loggedIn { return (true, nil) }
                var reached: [ReplicaKeeper.Reached] = []
                var done = true
                // Every member repaired in full (changes made or not): the catch-up looked at every object.
                var complete = true
                for member in group.membersInService {
                    guard let s = reach(member) else {
                        done = false; complete = false
                        continue
                    }
                    reached.append(ReplicaKeeper.Reached(member: member, session: s))
                }
                for target in reached {
                    if givesWay() { return (false, nil) }
                    guard let lease = try? Lease.acquire(target.member, target.session, clock: group.replicaClock, duration: Self.leaseDuration) else {
                        done = false; complete = false
                        continue
                    }
                    defer { lease.release() }
                    do throws(P11Error) {
                        // Members in service: what may be a write on its way to them waits (`settledBefore`).
                        let report = try replicas.repair(target, peers: reached.filter { $0.member !== target.member }, in: group,
                                                         loggedIn: loggedIn, lease: lease,
                                                         settledBefore: group.replicaClock.milliseconds &- group.writeSettles,
                                                         cancelled: givesWay)
                        if report.settlesAt != 0 { group.catchUp(by: report.settlesAt) }
                        if report.changedAnything || !report.complete { done = false }
                        if !report.complete { complete = false }
                        if report.changedAnything || !report.unrepairable.isEmpty || report.waiting > 0 {
                            Log.event(.info, "member-caught-up", "group=\(group.name) member=\(target.member.name) \(report)")
                        }
                        logUnrepairable(report, target.member, group)
                    } catch where error.rv == CKR_USER_NOT_LOGGED_IN && loggedIn {
                        // The member's login ended behind this process (with its last session, or a module restart
                        // the application's calls have not met yet): a catch-up failed so at every pass (seed 12954).
                        // Logged in again for the next pass; only then, since a login is not free (SoftHSM rewrites
                        // the token's file at each one, which other processes can meet mid-rewrite; logging in at every
                        // catch-up, a write of the application's beside it once answered CKR_USER_NOT_LOGGED_IN in the
                        // multi-writer test).
                        done = false; complete = false
                        _ = try? logIn(target.member, target.session, group)
                    } catch where error.isMemberFault {
                        // A fault-class answer alone is no evidence (SoftHSM answers searches CKR_GENERAL_ERROR after a
                        // refused C_CreateObject left a half-made object): the member leaves service only if it fails a
                        // probe too; otherwise the catch-up is tried again.
                        complete = false
                        if !fanOut.failUnlessItAnswersProbe(target.member, error) { done = false }
                    } catch {
                        done = false; complete = false
                        if givesWay() { return (false, nil) }
                        Log.event(.warning, "member-catch-up-failed", "group=\(group.name) member=\(target.member.name) reason=\"\(error)\"")
                    }
                }
                return (done, loggedIn ? (reached, complete) : nil)
            }
            // After the catch-up of every member (changed or not: under a steady stream of writes some pass always
            // changes something), once per scrub interval; outside `loginChanges`, which C_OpenSession waits for
            // (a compaction can take minutes). A logout meanwhile makes it stop or do less, never wrong.
            guard let (reached, complete) = compaction else { return caughtUp }
            return compactIfDue(group, reached, expiring: complete) && caughtUp
        }
        if result != true { settled = false }
        return settled
    }

    /// Compacts the group's records (`ReplicaKeeper.compact`) once per scrub interval, right after a catch-up of
    /// every member of the group, under every member's lease, in rounds of at most `compactionRound`: a round
    /// holds every member's lease and this host's lock, which returning members wait for (removing a few thousand
    /// records from SoftHSM takes longer than a lease lasts, and held that long it kept a member out in the
    /// multi-writer test). Work left waits a watch interval for the next round. Returns whether nothing is left to
    /// do (false asks for one more catch-up: the compaction saw a copy of a destroyed object).
    /// `expiring`: the catch-up repaired every member in full, so tombstones past the retention may go.
    private func compactIfDue(_ group: Group, _ reached: [ReplicaKeeper.Reached], expiring: Bool) -> Bool {
        let now = group.replicaClock.milliseconds
        guard reached.count == group.members.count,
              now &- group.lastCompaction.load(ordering: .acquiring) >= UInt64(worker.scrubInterval.milliseconds) else { return true }
        var leases: [Lease] = []
        defer { for lease in leases { lease.release() } }
        // In member order, as every process takes them. A lease another process holds (its catch-up of that member,
        // a second or so) is asked for again a few times: two hosts that catch up side by side without pause met
        // each other's leases at every try in the multi-writer test.
        for r in reached {
            var lease: Lease? = nil
            // Not when the tests drive recovery themselves: their clock and their other "hosts" do not move while
            // this one sleeps (the simulation slowed to a crawl).
            for attempt in 0..<(worker.background ? Self.leaseAttempts : 1) where !worker.stopping {
                if attempt > 0 { usleep(UInt32(Self.leaseRetry.milliseconds) * 1000) }
                lease = try? Lease.acquire(r.member, r.session, clock: group.replicaClock, duration: Self.leaseDuration)
                if lease != nil { break }
            }
            guard let lease else { return true }
            leases.append(lease)
        }
        let deadline = group.replicaClock.milliseconds + UInt64(min(Self.compactionRound, Self.leaseDuration / 2).milliseconds)
        do throws(P11Error) {
            guard let report = try replicas.compact(reached, in: group, leases: leases, expiring: expiring, deadline: deadline,
                                                    cancelled: { worker.stopping || group.hostLock.isWanted }) else { return true }
            if report.changedAnything || report.copiesSeen { Log.event(.info, "records-compacted", "group=\(group.name) \(report)") }
            if report.more {
                group.catchUpAgainAt.store(now + UInt64(worker.watchInterval.milliseconds), ordering: .releasing)
                return true
            }
            group.lastCompaction.store(now, ordering: .releasing)
            return !report.copiesSeen
        } catch {
            // A compaction that stops leaves nothing wrong. One that gave way to a returning member's repair is taken
            // up again soon; any other, at the next interval.
            if group.hostLock.isWanted {
                group.catchUpAgainAt.store(now + UInt64(worker.watchInterval.milliseconds), ordering: .releasing)
                return false
            }
            group.lastCompaction.store(now, ordering: .releasing)
            // Stopped by C_Finalize: nothing to look into (it was logged as a warning at every multi-writer test's end).
            if worker.stopping {
                Log.event(.info, "records-compaction-stopped", "group=\(group.name) reason=\"the process is finalizing\"")
            } else {
                Log.event(.warning, "records-compaction-stopped", "group=\(group.name) reason=\"\(error)\"")
            }
            return true
        }
    }

    /// How long one round of compaction may hold the leases and the host lock.
    static let compactionRound: Duration = .seconds(5)
    /// How often, and how far apart, a compaction asks for a lease another process holds.
    static let leaseAttempts = 5
    static let leaseRetry: Duration = .milliseconds(200)

    /// The worker's own session on a member in service, opened once per era of the member's handles and kept
    /// (never closed by its users: opening and closing sessions beside the application's calls at every pass
    /// made an application's key handle fail on remote members); a member that cannot open one and fails a probe
    /// too leaves service (the evidence rule: one failed call alone proves nothing).
    private func reach(_ member: Member) -> MemberSession? {
        let era = member.handleEra
        if let kept = workerSessions.withLock({ $0[ObjectIdentifier(member)] }), kept.era == era { return kept.session }
        do throws(P11Error) {
            let session = try member.token.openSession(readWrite: true)
            // One of an older era is not closed: its handle may name another session now.
            workerSessions.withLock { $0[ObjectIdentifier(member)] = (era, session) }
            return session
        } catch {
            if error.isMemberFault { fanOut.failUnlessItAnswersProbe(member, error) }
            return nil
        }
    }

    private let workerSessions = Mutex<[ObjectIdentifier: (era: Int, session: MemberSession)]>([:])

    private func logUnrepairable(_ report: ReplicaKeeper.Repair, _ member: Member, _ group: Group) {
        let now = group.replicaClock.milliseconds
        let interval = UInt64(worker.watchInterval.milliseconds)
        if !report.noHolder.isEmpty {
            // Looked for again a watch interval later, not at once (a truly lost object would keep the worker busy).
            group.catchUpAgainAt.store(now + interval, ordering: .releasing)
        }
        let since = member.history.withLock { history in
            history.unrepairable = report.unrepairable
            history.noHolderSince = Dictionary(uniqueKeysWithValues: report.noHolder.map { ($0, history.noHolderSince[$0] ?? now) })
            return history.noHolderSince
        }
        for name in report.unrepairable {
            // An object no member holds is most often one destroyed by another process whose tombstone this one
            // cannot see yet (SoftHSM hides it from a process that wrote since: REPLICATION.md, "What the stores
            // do"): 287 such warnings in one multi-writer test run, for objects rightly destroyed. A warning once it
            // has lasted a watch interval; the first sighting is information.
            let lasting = since[name].map { now >= $0 + interval } ?? true
            Log.event(lasting ? .warning : .info, "member-resync-incomplete", "group=\(group.name) member=\(member.name) object=\(name)")
        }
        if !report.unrepairable.isEmpty { group.publish(member) }
    }

    private func recover(_ member: Member, in group: Group) {
        guard let restarted = probe(member) else { return }
        let before = fanOut.beginRecovery(member)
        // One session, logged in, stays open until the member is back: the member's login lasts as long as the
        // application has a session there, and the sessions reattach opens must find it logged in.
        let session: MemberSession
        let loggedIn: Bool
        do throws(P11Error) {
            session = try member.token.openSession(readWrite: true)
            loggedIn = try logIn(member, session, group)
        } catch {
            fanOut.abandonRecovery(member, before: before)
            let level: LogLevel = error.rv == CKR_USER_NOT_LOGGED_IN ? .info : .warning
            Log.event(level, "member-resync-failed", "group=\(group.name) member=\(member.name) reason=\"\(error)\"")
            return
        }
        defer { member.token.closeSession(session) }
        destroyOrphans(member, session, in: group)
        let report: ReplicaKeeper.Repair
        do throws(P11Error) {
            // Never without the host lock and the member's lease: when another process holds either, this round is
            // skipped, and the member is tried again at the next probe.
            let repaired = try group.hostLock.withLock(for: "bringing \(member.name) up to date", waitingUpTo: group.hostLock.wait,
                                                       announced: true, cancelled: { worker.stopping }) { () throws(P11Error) -> ReplicaKeeper.Repair? in
                try group.loginChanges.withLock { _ throws(P11Error) -> ReplicaKeeper.Repair? in
                    guard loggedIn == group.login.withLock({ $0.userType == CK_USER_TYPE(CKU_USER) }) else { return nil }
                    return try resynchronize(member, session, loggedIn: loggedIn, in: group)
                }
            }
            guard let attempted = repaired, let repaired = attempted else {
                fanOut.abandonRecovery(member, before: before)
                return
            }
            report = repaired
            // Objects other writers are changing meanwhile do not hold it out: the catch-up after its return brings them.
            guard report.mayReturn else {
                fanOut.abandonRecovery(member, before: before)
                Log.event(.info, "member-resync-deferred", "group=\(group.name) member=\(member.name) \(report)")
                return
            }
            try reattach(member, in: group, restarted: restarted, copies: report.copiesHeld)
        } catch {
            fanOut.abandonRecovery(member, before: before)
            Log.event(.warning, "member-resync-failed", "group=\(group.name) member=\(member.name) reason=\"\(error)\"")
            return
        }
        // It returns in the application's login state of this moment: a login or logout since it was brought up
        // to date (both take this lock) sends it round once more.
        let returned = group.loginChanges.withLock { _ -> Bool in
            guard loggedIn == group.login.withLock({ $0.userType == CK_USER_TYPE(CKU_USER) }) else { return false }
            fanOut.returnToService(member, in: group)
            return true
        }
        guard returned else {
            fanOut.abandonRecovery(member, before: before)
            worker.wake()
            return
        }
        member.restartAfterProbes.store(Member.firstRestartAfter, ordering: .releasing)
        logUnrepairable(report, member, group)
        Log.event(.info, "member-recovered", "group=\(group.name) member=\(member.name) \(report)")
        // What it held that the others lack (written by processes that could reach only it) reaches them now.
        if group.members.count > 1 { group.catchUpWanted.store(true, ordering: .releasing) }
    }

    /// Destroys the half-made objects failed writes left on the member (`Member.orphans`), while its handles are
    /// still those they were noted under (simulation seed 35807: a key generated there, then its carrying failed
    /// with the member; the application got the key a peer generated, and the member held two of that label).
    private func destroyOrphans(_ member: Member, _ session: MemberSession, in group: Group) {
        let era = member.restarts.load(ordering: .acquiring)
        let noted = member.orphans.withLock { orphans in
            defer { orphans = [] }
            return orphans.filter { $0.restarts == era }.map(\.handle)
        }
        var kept: [MemberObject] = []
        for handle in noted {
            do throws(P11Error) {
                try member.token.destroyObject(session, handle)
                Log.event(.info, "repair-destroyed", "group=\(group.name) member=\(member.name) handle=\(handle.raw) reason=\"half-made by a write that failed over\"")
            } catch where error.rv == CKR_OBJECT_HANDLE_INVALID {
            } catch {
                kept.append(handle)
            }
        }
        if !kept.isEmpty { member.orphans.withLock { $0 += kept.map { (era, $0) } } }
    }

    /// Whether the member answers again (restarting its module when it has to); nil while it does not.
    /// Returns whether the module was restarted (its sessions and handles are then new).
    private func probe(_ member: Member) -> Bool? {
        if member.moduleRestarted.exchange(false, ordering: .acquiringAndReleasing) {
            // Restarted for another member: its slot is found again, and it comes back as restarted.
            guard (try? member.token.reconnect(restartingModule: false)) != nil, (try? member.token.tokenInfo()) != nil else {
                member.moduleRestarted.store(true, ordering: .releasing)
                return nil
            }
            member.connected.store(true, ordering: .releasing)
            return true
        }
        if !member.connected.load(ordering: .acquiring) {
            // It did not answer at start: find its token first.
            guard (try? member.token.reconnect(restartingModule: false)) != nil else {
                if member.config.via == nil { return nil }
                return probeRestarting(member)
            }
            member.connected.store(true, ordering: .releasing)
        }
        do throws(P11Error) {
            _ = try member.token.tokenInfo()
            member.brokenProbes.store(0, ordering: .releasing)
            return false
        } catch {
            if error.rv == CKR_GENERAL_ERROR && !error.timedOut && member.config.via == nil { return restartModule(for: member) }
            // A restarted member (CKR_CRYPTOKI_NOT_INITIALIZED) or a dead link: start its module afresh.
            guard error.rv == CKR_CRYPTOKI_NOT_INITIALIZED || member.config.via != nil else { return nil }
            return probeRestarting(member)
        }
    }

    /// An in-process member that answers its probe CKR_GENERAL_ERROR probe after probe: its module's own state is
    /// broken, which only a restart of the module mends (SoftHSM 2.6.1 in a process that read the token's file
    /// while another process rewrote it: every call for that token answers CKR_GENERAL_ERROR until C_Finalize
    /// and C_Initialize; docs/REPLICATION.md, "What the stores do"). The module is usually shared (the tokens of
    /// one SoftHSM configuration, the partitions of one HSM client): its other members leave service for the
    /// restart, counted as returning so that calls wait for them, and come back through recovery with new
    /// sessions and handles. A device that is down answers CKR_DEVICE_ERROR or does not answer: it never
    /// restarts the module. Returns what `probe` does.
    private func restartModule(for member: Member) -> Bool? {
        let broken = member.brokenProbes.add(1, ordering: .acquiringAndReleasing).newValue
        let threshold = member.restartAfterProbes.load(ordering: .acquiring)
        guard broken >= threshold else { return nil }
        member.brokenProbes.store(0, ordering: .releasing)
        member.restartAfterProbes.store(min(threshold * 2, 64 * Member.firstRestartAfter), ordering: .releasing)
        let module = member.token.moduleName
        let sharing = groups.flatMap(\.members).filter { $0 !== member && $0.config.via == nil && $0.token.moduleName == module }
        let reason = "its module restarts: \(member.name) answered \(broken) probes in a row CKR_GENERAL_ERROR"
        for other in sharing where other.isInService { fanOut.holdForModuleRestart(other, reason: reason) }
        do throws(P11Error) {
            try member.token.restartModule()
        } catch {
            Log.event(.warning, "module-restart-failed", "module=\(module) member=\(member.name) reason=\"\(error.rv == CKR_FUNCTION_NOT_SUPPORTED ? "the application started it" : "\(error)")\"")
            return nil
        }
        // Every handle of every member of the module is new.
        for affected in [member] + sharing { affected.restarts.add(1, ordering: .acquiringAndReleasing) }
        for other in sharing { other.moduleRestarted.store(true, ordering: .releasing) }
        member.connected.store(true, ordering: .releasing)
        Log.event(.warning, "module-restarted", "module=\(module) member=\(member.name) probes=\(broken) members=\(([member] + sharing).map(\.name).joined(separator: ","))")
        return (try? member.token.tokenInfo()) != nil ? true : nil
    }

    /// Restarts the member's module, finds its token again and asks it; true when it answers.
    private func probeRestarting(_ member: Member) -> Bool? {
        // Never under a call still inside the module (one past its deadline): p11-kit's client aborts.
        guard member.token.callsUnderWay == 0 else { return nil }
        do throws(P11Error) {
            try member.token.reconnect(restartingModule: true)
            // Every handle of the member is new: what was kept by handle (its replication key, the records read)
            // is dropped.
            member.restarts.add(1, ordering: .acquiringAndReleasing)
            member.connected.store(true, ordering: .releasing)
            _ = try member.token.tokenInfo()
            return true
        } catch {
            return nil
        }
    }

    /// Brings a returning member up to date (see `ReplicaKeeper.repair`) under its lease, from the members in
    /// service; with none in service, from every other member that answers, so that the first to return holds
    /// the union of what they hold. Nil when another claimant holds the lease.
    private func resynchronize(_ member: Member, _ session: MemberSession, loggedIn: Bool,
                               in group: Group) throws(P11Error) -> ReplicaKeeper.Repair? {
        guard let lease = try Lease.acquire(member, session, clock: group.replicaClock, duration: Self.leaseDuration) else {
            Log.event(.info, "member-resync-deferred", "group=\(group.name) member=\(member.name) reason=\"another process holds its lease\"")
            return nil
        }
        defer { lease.release() }
        var peers = group.members.filter { $0.isInService && $0 !== member }
        if peers.isEmpty { peers = group.members.filter { $0 !== member && $0.connected.load(ordering: .acquiring) } }
        var reached: [ReplicaKeeper.Reached] = []
        defer { for r in reached { r.member.token.closeSession(r.session) } }
        for peer in peers.sorted(by: { !$0.isStandby && $1.isStandby }) {
            do throws(P11Error) {
                let s = try peer.token.openSession(readWrite: false)
                reached.append(ReplicaKeeper.Reached(member: peer, session: s))
                guard try logIn(peer, s, group) == loggedIn else { throw P11Error(CK_RV(CKR_USER_NOT_LOGGED_IN)) }
            } catch where error.isMemberFault {
                if peer.isInService { fanOut.failUnlessItAnswersProbe(peer, error) }
            } catch {}
        }
        let report = try replicas.repair(ReplicaKeeper.Reached(member: member, session: session), peers: reached, in: group,
                                         loggedIn: loggedIn, lease: lease, cancelled: { worker.stopping })
        Log.event(.info, "member-resynced", "group=\(group.name) member=\(member.name) \(report)")
        return report
    }

    /// Puts the member in the login state the application has now: logged in as the user (its own PIN, else
    /// the application's, kept since C_Login), or public when nobody is logged in. Returns whether it is logged
    /// in (private records and objects are visible). With the SO logged in (whose PIN p11ha does not keep), it
    /// waits for a user or none.
    private func logIn(_ member: Member, _ session: MemberSession, _ group: Group) throws(P11Error) -> Bool {
        let (userType, appPIN) = group.login.withLock { ($0.userType, $0.pin?.copy()) }
        switch userType {
        case nil:
            return false
        case CK_USER_TYPE(CKU_USER):
            guard let pin = member.ownPIN ?? appPIN else { throw P11Error(CK_RV(CKR_USER_NOT_LOGGED_IN)) }
            do throws(P11Error) {
                try member.token.login(session, userType: CK_USER_TYPE(CKU_USER), pin: pin)
            } catch where error.rv == CKR_USER_ALREADY_LOGGED_IN {}
            return true
        default:
            throw P11Error(CK_RV(CKR_USER_NOT_LOGGED_IN))
        }
    }

    /// Gives every virtual session of the group a session on the returning member, and finds each object's
    /// copy there again (handles change when a module restarts; objects may have been copied or destroyed).
    /// `copies`: the member's copy of each object by replication identity, as the repair just paired or placed
    /// them; an object of known identity takes its handle from there. Found again by a search each, 500 objects
    /// kept a member out 15 s after its repair (each search looks at every object of the token).
    private func reattach(_ member: Member, in group: Group, restarted: Bool,
                          copies: [ObjectUID: MemberObject]) throws(P11Error) {
        let virtualSessions = sessions.all(in: group)
        for session in virtualSessions {
            let fresh = try member.token.openSession(readWrite: session.readWrite)
            session.state.withLock { state in
                // A restarted module's old handles mean nothing any more; others are closed with the session.
                if let old = state.memberSessions[member.index], !restarted { state.retired.append((member.index, old)) }
                state.memberSessions[member.index] = fresh
            }
        }
        guard let probe = try? member.token.openSession(readWrite: false) else { return }
        defer { member.token.closeSession(probe) }
        let records = group.objects.withLock { $0.records }
        let destroyed = group.ledger.withLock { ledger in Set(records.values.compactMap(\.uid).filter { ledger.objects[$0]?.destroyed == true }) }
        for (handle, record) in records {
            if record.owner != nil {
                // Session objects died with the member's sessions.
                group.objects.withLock { $0.setCopy(handle, member: member.index, copy: nil) }
                continue
            }
            if let uid = record.uid, let copy = copies[uid] {
                group.objects.withLock { $0.setCopy(handle, member: member.index, copy: copy) }
                continue
            }
            if let uid = record.uid, destroyed.contains(uid) {
                // Destroyed (by another process, whose tombstone the repair read): no copy to look for. Searched for
                // one by one, such handles kept a member out 2-4 s after its repair in the multi-writer test.
                group.objects.withLock { $0.setCopy(handle, member: member.index, copy: nil) }
                continue
            }
            let identity = group.identity(of: record, except: member) { holder, copy in
                guard let s = try? holder.token.openSession(readWrite: false) else { return nil }
                defer { holder.token.closeSession(s) }
                return try? holder.token.readAttributes(s, copy, ObjectIdentity.attributeTypes)
            }
            guard let identity else {
                // Nobody can say what it was: after a restart the old handle means nothing (forgotten here, the member
                // misses the object's next write and is brought up to date); otherwise it still holds.
                if restarted { group.objects.withLock { $0.setCopy(handle, member: member.index, copy: nil) } }
                continue
            }
            let found = try? member.token.findObjects(probe, identity.template)
            group.objects.withLock {
                $0.setIdentity(handle, identity)
                $0.setCopy(handle, member: member.index, copy: found?.first)
            }
        }
    }
}
