// Recovery: a background worker probes members out of service; one that answers is logged in, brought up to
// date from an up-to-date peer (its journal says what it missed), given back its sessions, and only then
// returned to service.
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

    init(interval: Duration, background: Bool = true) {
        self.interval = interval
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
            // A short pause after a wake-up lets a burst of failures settle; then probe every interval.
            signal.wait(timeout: pending ? interval : nil)
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
    /// Writes the journal records that waited for the host lock.
    private let journal: JournalKeeper

    init(worker: RecoveryWorker, groups: [Group], sessions: SessionTable, fanOut: FanOut) {
        self.worker = worker
        self.groups = groups
        self.sessions = sessions
        self.fanOut = fanOut
        self.journal = JournalKeeper(fanOut: fanOut)
        worker.attach(self)
        for group in groups {
            // Work left for the host lock is this worker's: a write's journal record, a status update.
            group.hostLock.onDeferredWork { [weak worker] in worker?.wake() }
        }
    }

    /// One pass: the work that waited for the host lock, then every member out of service; returns whether any
    /// work still waits or any member is still out.
    func recoverMembers() -> Bool {
        var pending = false
        for group in groups {
            // Journal records first: a member compared with journals that lack them could be taken for up to date.
            // While they wait (the lock is still busy), no member of the group returns.
            if journal.writeDeferred(group, waitingUpTo: group.hostLock.wait, cancelled: { worker.stopping }) { pending = true }
            if !group.statusFile.flush(group, waitingUpTo: Self.statusWait) { pending = true }
            if group.hostLock.hasDeferredWork {
                if group.members.contains(where: { !$0.isInService }) { pending = true }
                continue
            }
            for member in group.members where !member.isInService {
                recover(member, in: group)
                if !member.isInService { pending = true }
            }
        }
        return pending
    }

    /// How long the worker waits for the status file's lock: another process updates it in a moment, and an
    /// update that waits longer is tried again at the next pass.
    static let statusWait: Duration = .milliseconds(100)

    /// At shutdown: one more short try at what waits for the host lock; what still cannot be written is logged.
    func finishHostWork() {
        for group in groups {
            let lock = group.hostLock
            if journal.writeDeferred(group, waitingUpTo: min(lock.wait, .milliseconds(250))) {
                let left = lock.takeDeferred(Journal.Kind.allCases).count
                Log.event(.warning, "journal-not-updated", "group=\(group.name) writes=\(left) reason=\"the host lock \(lock.path) could not be had before C_Finalize\"")
            }
            _ = group.statusFile.flush(group, waitingUpTo: Self.statusWait)
        }
    }

    private func recover(_ member: Member, in group: Group) {
        guard let restarted = probe(member) else { return }
        let before = fanOut.beginRecovery(member)
        let outcome: Resync
        // One session, logged in, stays open until the member is back: the member's login lasts as long as the
        // application has a session there, and the sessions reattach opens must find it logged in.
        let session: MemberSession
        let kinds: [Journal.Kind]
        do throws(P11Error) {
            session = try member.token.openSession(readWrite: true)
            kinds = try logIn(member, session, group)
        } catch {
            fanOut.abandonRecovery(member, before: before)
            let level: LogLevel = error.rv == CKR_USER_NOT_LOGGED_IN ? .info : .warning
            Log.event(level, "member-resync-failed", "group=\(group.name) member=\(member.name) reason=\"\(error)\"")
            return
        }
        defer { member.token.closeSession(session) }
        do throws(P11Error) {
            // Never without the lock: when another process holds it past the wait (or it is refused), this round is
            // skipped, logged once, and the member is tried again at the next probe.
            guard let resynced = try group.hostLock.withLock(for: "bringing \(member.name) up to date", waitingUpTo: group.hostLock.wait,
                                                             cancelled: { worker.stopping },
                                                             { () throws(P11Error) -> Resync in try resynchronize(member, session, kinds, in: group) }) else {
                fanOut.abandonRecovery(member, before: before)
                return
            }
            outcome = resynced
            if case .waitFor(let ahead) = outcome {
                fanOut.abandonRecovery(member, before: before)
                Log.event(.info, "member-resync-deferred", "group=\(group.name) member=\(member.name) reason=\"\(ahead) is ahead of it and not in service yet\"")
                return
            }
            try reattach(member, in: group, restarted: restarted)
        } catch {
            fanOut.abandonRecovery(member, before: before)
            Log.event(.warning, "member-resync-failed", "group=\(group.name) member=\(member.name) reason=\"\(error)\"")
            return
        }
        // It returns in the application's login state of this moment: a login or logout since it was brought up
        // to date (both take this lock) sends it round once more.
        let returned = group.loginChanges.withLock { _ -> Bool in
            let loggedIn = group.login.withLock { $0.userType == CK_USER_TYPE(CKU_USER) }
            guard loggedIn == kinds.contains(.private) else { return false }
            // A write made meanwhile whose record waits for the host lock: the member may lack it, and its journal
            // would not say so; it returns after the record is written (the next pass).
            guard !group.hostLock.hasDeferredWork else { return false }
            fanOut.returnToService(member, in: group)
            return true
        }
        guard returned else {
            fanOut.abandonRecovery(member, before: before)
            worker.wake()
            return
        }
        Log.event(.info, "member-recovered", "group=\(group.name) member=\(member.name) \(outcome.text)")
        if case .ahead(_, let behind) = outcome {
            // It holds writes they missed: they leave service to be brought up to date from it (it serves now, so
            // the group is never left without a member).
            for (peer, generation) in behind {
                fanOut.markStale(peer, reason: "journal generation \(generation) behind \(member.name)'s")
            }
        }
    }

    /// Whether the member answers again (restarting its module when it has to); nil while it does not.
    /// Returns whether the module was restarted (its sessions and handles are then new).
    private func probe(_ member: Member) -> Bool? {
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
            return false
        } catch {
            // A restarted member (CKR_CRYPTOKI_NOT_INITIALIZED) or a dead link: start its module afresh.
            guard error.rv == CKR_CRYPTOKI_NOT_INITIALIZED || member.config.via != nil else { return nil }
            return probeRestarting(member)
        }
    }

    /// Restarts the member's module, finds its token again and asks it; true when it answers.
    private func probeRestarting(_ member: Member) -> Bool? {
        // Never under a call still inside the module (one past its deadline): p11-kit's client aborts.
        guard member.token.callsUnderWay == 0 else { return nil }
        do throws(P11Error) {
            try member.token.reconnect(restartingModule: true)
            member.connected.store(true, ordering: .releasing)
            _ = try member.token.tokenInfo()
            return true
        } catch {
            return nil
        }
    }

    /// What bringing a member up to date came to.
    enum Resync {
        case done(String)
        /// It holds writes its peers in service missed: it serves as it is, and they must be brought up to date.
        case ahead(String, behind: [(Member, UInt64)])
        /// No member is in service, and one that answers is ahead of it: that one must return first.
        case waitFor(String)

        var text: String {
            switch self {
            case .done(let text), .ahead(let text, _), .waitFor(let text): text
            }
        }
    }

    /// Brings a returning member up to date from the up-to-date peer; returns what was done, for the log.
    /// `kinds`: the journals the application's login state lets it read (the public one alone before a login: a
    /// member returned so is compared again after the login, which reads them all).
    private func resynchronize(_ member: Member, _ session: MemberSession, _ kinds: [Journal.Kind],
                               in group: Group) throws(P11Error) -> Resync {
        var peers = group.members.filter { $0.isInService && $0 !== member }
        let journal = try Journals.read(on: member.token, session, kinds)
        if peers.isEmpty {
            // None in service: of the members that answer, the one with the highest generation returns first, as it
            // is; the others are then brought up to date from it. Returning any other would lose what it lacks.
            peers = group.members.filter { $0 !== member && $0.connected.load(ordering: .acquiring) }
            var newest: (Member, UInt64)? = nil
            for peer in peers {
                guard let s = try? peer.token.openSession(readWrite: false) else { continue }
                defer { peer.token.closeSession(s) }
                guard (try? logIn(peer, s, group)) != nil, let j = try? Journals.read(on: peer.token, s, kinds) else { continue }
                if j.generation > (newest?.1 ?? 0) { newest = (peer, j.generation) }
            }
            if let (peer, generation) = newest, generation > journal.generation { return .waitFor(peer.name) }
            return .done("resynced=no reason=\"no member in service; newest of those that answer\" generation=\(journal.generation)")
        }
        // The up-to-date peer: the highest generation, active members first.
        var best: (Member, MemberSession, Journals)? = nil
        var generations: [(Member, UInt64)] = []
        var opened: [(Member, MemberSession)] = []
        defer { for (peer, s) in opened { peer.token.closeSession(s) } }
        for peer in peers.sorted(by: { !$0.isStandby && $1.isStandby }) {
            do throws(P11Error) {
                let s = try peer.token.openSession(readWrite: false)
                opened.append((peer, s))
                _ = try logIn(peer, s, group)
                let j = try Journals.read(on: peer.token, s, kinds)
                generations.append((peer, j.generation))
                if best == nil || j.generation > best!.2.generation { best = (peer, s, j) }
            } catch where error.isMemberFault {
                fanOut.fail(peer, error)
            }
        }
        guard let (source, sourceSession, sourceJournal) = best else { return .done("resynced=no reason=\"no peer answered\"") }
        if journal.generation > sourceJournal.generation {
            // It holds writes the others missed (made while they were away, by this process or another).
            let behind = generations.filter { $0.1 < journal.generation }
            return .ahead("resynced=no reason=\"ahead of its peers\" generation=\(journal.generation)", behind: behind)
        }
        if journal.generation == sourceJournal.generation {
            return .done("resynced=no reason=\"missed no write\" generation=\(journal.generation)")
        }
        var changed = 0
        for kind in kinds {
            let mine = journal.byKind[kind]?.generation ?? 0
            for change in sourceJournal.byKind[kind]?.changes ?? [] where change.generation > mine {
                for object in try member.token.findObjects(session, change.identity) {
                    if (try? member.token.setAttributeValues(session, object, change.template)) != nil { changed += 1 }
                }
            }
        }
        let keyHere = try ReplicationKey.find(on: member.token, session)
        let keyThere = try ReplicationKey.find(on: source.token, sourceSession)
        let mine = try ObjectCopy.inventory(member, session, replicationKey: keyHere)
        let theirs = try ObjectCopy.inventory(source, sourceSession, replicationKey: keyThere)
        var copied = 0, destroyed = 0, uncopyable = 0
        let theirMaterial = Dictionary(theirs.map { ($0.identity, $0.material) }, uniquingKeysWith: { a, _ in a })
        for object in mine where theirMaterial[object.identity] == nil
            || (theirMaterial[object.identity]! != nil && object.material != nil && theirMaterial[object.identity]! != object.material) {
            // Destroyed while it was away (or a different key under the same name): it must not come back.
            try member.token.destroyObject(session, object.handle)
            destroyed += 1
        }
        let kept = Set(mine.filter { o in theirMaterial[o.identity].map { $0 == nil || o.material == nil || $0 == o.material } ?? false }.map(\.identity))
        for object in theirs where !kept.contains(object.identity) {
            let isKey = object.identity.isKey
            if isKey && (!object.extractable || keyHere == nil || keyThere == nil) {
                uncopyable += 1
                Log.event(.warning, "member-resync-incomplete", "group=\(group.name) member=\(member.name) object=\"\(object.identity)\" reason=\"not extractable, or no replication key\"")
                continue
            }
            var replicationKeys: [Int: MemberObject] = [:]
            replicationKeys[member.index] = keyHere
            replicationKeys[source.index] = keyThere
            try ObjectCopy.copy(object.handle, from: source, sourceSession, to: member, session, wrapped: isKey, replicationKeys: replicationKeys)
            copied += 1
        }
        // Only a complete copy takes the source's generation: one that lacks objects stays behind, so that it is
        // never the source another member is made identical to (which would destroy what it lacks there).
        if uncopyable == 0 { try sourceJournal.write(on: member.token, session) }
        Log.event(.info, "member-resynced", "group=\(group.name) member=\(member.name) from=\(source.name) copied=\(copied) destroyed=\(destroyed) changed=\(changed) uncopyable=\(uncopyable) generation=\(sourceJournal.generation)")
        return .done(uncopyable == 0 ? "resynced=yes generation=\(sourceJournal.generation)"
                                     : "resynced=partly uncopyable=\(uncopyable) generation=\(journal.generation)")
    }

    /// Puts the member in the login state the application has now: logged in as the user (its own PIN, else
    /// the application's, kept since C_Login), or public when nobody is logged in. Returns the journals that
    /// state can read. With the SO logged in (whose PIN p11ha does not keep), it waits for a user or none.
    private func logIn(_ member: Member, _ session: MemberSession, _ group: Group) throws(P11Error) -> [Journal.Kind] {
        let (userType, appPIN) = group.login.withLock { ($0.userType, $0.pin?.copy()) }
        switch userType {
        case nil:
            return [.public]
        case CK_USER_TYPE(CKU_USER):
            guard let pin = member.ownPIN ?? appPIN else { throw P11Error(CK_RV(CKR_USER_NOT_LOGGED_IN)) }
            do throws(P11Error) {
                try member.token.login(session, userType: CK_USER_TYPE(CKU_USER), pin: pin)
            } catch where error.rv == CKR_USER_ALREADY_LOGGED_IN {}
            return Journal.Kind.allCases
        default:
            throw P11Error(CK_RV(CKR_USER_NOT_LOGGED_IN))
        }
    }

    /// Gives every virtual session of the group a session on the returning member, and finds each object's
    /// copy there again (handles change when a module restarts; objects may have been copied or destroyed).
    private func reattach(_ member: Member, in group: Group, restarted: Bool) throws(P11Error) {
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
        for (handle, record) in records {
            if record.owner != nil {
                // Session objects died with the member's sessions.
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
