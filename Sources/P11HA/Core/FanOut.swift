// The fan-out: runs work on one member, on every member or on every holder of an object, with undo; and the one
// place where a member's health changes (leaving service, recovery's steps, returning to service).
import CInterop
import Glibc

final class FanOut: @unchecked Sendable {
    private let recovery: RecoveryWorker
    /// How long a call waits for a member being brought up to date when none is in service.
    private let recoveryWait: Duration

    init(recovery: RecoveryWorker, operationTimeout: Duration?) {
        self.recovery = recovery
        self.recoveryWait = operationTimeout ?? .seconds(2)
    }

    // MARK: health

    /// Takes a member that faulted out of service; the recovery worker will probe it.
    func fail(_ member: Member, _ error: P11Error) {
        let reason = error.timedOut ? "no answer within the operation-timeout" : "\(error)"
        if member.leaveService(.failed, reason: reason) { recovery.wake() }
    }

    /// A member that did not answer when the group started.
    func startFailed(_ member: Member, reason: String) {
        member.leaveService(.failed, reason: reason)
    }

    /// Takes a member that missed a write out of service: it must be brought up to date before it serves again.
    func markStale(_ member: Member, reason: String) {
        if member.leaveService(.stale, reason: reason) { recovery.wake() }
    }

    /// Recovery begins with a member that answers again; returns its health before, to go back to on failure.
    func beginRecovery(_ member: Member) -> Health {
        let before = member.health
        member.setHealth(.recovering)
        return before
    }

    /// Recovery could not finish: the member stays out (stale stays stale: it still misses writes).
    func abandonRecovery(_ member: Member, before: Health) {
        member.setHealth(before == .stale ? .stale : .failed)
    }

    /// Recovery finished: the member serves again.
    func returnToService(_ member: Member, in group: Group) {
        member.history.withLock { $0.lastRecovery = wallClock() }
        member.setHealth(.inService)
        group.publish(member)
    }

    // MARK: where work runs

    enum Choice { case scheduler, first }

    /// Chooses a member; when none is in service but one answers and is being brought up to date (stale or
    /// recovering), waits for it, up to the operation-timeout (2 s without one), rather than fail a call that a
    /// moment later would succeed. With every member down, it fails at once.
    func awaitingRecovery(_ group: Group, _ choose: () throws(P11Error) -> Member) throws(P11Error) -> Member {
        do {
            return try choose()
        } catch {
            let returning: (Member) -> Bool = { $0.health == .stale || $0.health == .recovering }
            // (A test driving recovery itself has nothing to wait for.)
            guard recovery.background, group.members.contains(where: returning) else { throw error }
            recovery.wake()
            let deadline = monotonicNanos() + recoveryWait.nanoseconds
            while monotonicNanos() < deadline, group.members.contains(where: returning),
                  !group.members.contains(where: \.isInService) {
                usleep(2_000)
            }
            return try choose()
        }
    }

    /// Runs `body` on one member that holds `copies` (nil: any), moving to a peer on each member fault.
    func onOneMember<T>(_ group: Group, holding copies: [MemberObject?]? = nil, choice: Choice = .scheduler,
                        _ body: (Member) throws(P11Error) -> T) throws(P11Error) -> T {
        var excluded = Set<Int>()
        while true {
            let member = try awaitingRecovery(group) { () throws(P11Error) in
                choice == .first ? try group.first(holding: copies, excluding: excluded)
                                 : try group.pick(holding: copies, excluding: excluded)
            }
            do {
                return try body(member)
            } catch where error.isMemberFault {
                fail(member, error)
                excluded.insert(member.index)
            }
        }
    }

    /// Runs `write` on each of `targets` in turn: the one way p11ha acts on several members.
    /// - A caller's error on the first member returns at once, with nothing changed anywhere.
    /// - A caller's error on a later member (the members disagree) undoes the write where it succeeded,
    ///   and returns that error: the group never holds an object some members refused.
    /// - A member fault takes that member out of service (`onFault`: stale when it missed a write to the
    ///   token, failed otherwise); the others go on. The write succeeds when it holds on every member
    ///   still in service; with none left it fails, unless `othersHoldIt` (copies of what a member already
    ///   holds: a generated key carried from its source, which stays valid there alone).
    func everyMember<T>(of group: Group, _ targets: [Member], onFault: Health = .stale, othersHoldIt: Bool = false,
                        _ write: (Member) throws(P11Error) -> T,
                        undo: (Member, T) -> Void = { _, _ in }) throws(P11Error) -> [(Int, T)] {
        var done: [(Int, T)] = []
        for member in targets {
            do {
                done.append((member.index, try write(member)))
            } catch where error.isMemberFault {
                if onFault == .stale {
                    markStale(member, reason: "missed a write: \(error)")
                } else {
                    fail(member, error)
                }
            } catch {
                for (index, value) in done { undo(group.members[index], value) }
                throw error
            }
        }
        // Every member failed: the application is told of a device fault, never a member's own code (its
        // CKR_CRYPTOKI_NOT_INITIALIZED would say the application's library is not initialized).
        if done.isEmpty && !othersHoldIt { throw P11Error.deviceError }
        return done
    }

    /// Runs a write on every member in service that holds a copy of an object, with that member's copy.
    func everyHolder<T>(_ copies: [MemberObject?], in session: VirtualSession,
                        _ write: (Member, MemberSession, MemberObject) throws(P11Error) -> T) throws(P11Error) -> [(Int, T)] {
        let group = session.group
        let holders = group.membersInService.filter { copies[$0.index] != nil }
        return try everyMember(of: group, holders) { (member) throws(P11Error) in
            try write(member, try session.memberSession(member), copies[member.index]!)
        }
    }
}

/// A member's health moves only here: nothing outside this file can take a member out of service or return it.
extension Member {
    /// Takes the member out of service (failed, or stale when it missed a write), logging why.
    /// Returns whether it was in service.
    @discardableResult
    fileprivate func leaveService(_ health: Health, reason: String) -> Bool {
        var old = Health.inService.rawValue
        while true {
            // A stale member stays stale: it missed a write whatever happens next.
            let next = old == Health.stale.rawValue ? old : health.rawValue
            let (exchanged, current) = healthValue.compareExchange(expected: old, desired: next, ordering: .acquiringAndReleasing)
            if exchanged { break }
            old = current
        }
        guard old == Health.inService.rawValue || old == Health.recovering.rawValue else { return false }
        epoch.add(1, ordering: .acquiringAndReleasing)
        history.withLock {
            $0.lastFailure = wallClock()
            $0.lastFailureReason = reason
            $0.failures += 1
        }
        Log.event(.warning, "member-failed", "member=\(name) state=\(health.name) reason=\"\(reason)\"")
        onHealthChange?(self)
        return old == Health.inService.rawValue
    }

    fileprivate func setHealth(_ health: Health) {
        healthValue.store(health.rawValue, ordering: .releasing)
    }
}

extension Duration {
    var nanoseconds: UInt64 {
        UInt64(max(0, components.seconds)) * 1_000_000_000 + UInt64(max(0, components.attoseconds) / 1_000_000_000)
    }
}
