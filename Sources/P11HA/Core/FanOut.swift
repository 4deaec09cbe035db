// The fan-out: runs work on one member, on every member or on every holder of an object, with undo; and the one
// place where a member's health changes (leaving service, recovery's steps, returning to service).
import CInterop
import Glibc

final class FanOut: @unchecked Sendable {
    private let recovery: RecoveryWorker
    /// How long a call waits for a member being brought up to date when none is in service.
    private let recoveryWait: Duration

    init(recovery: RecoveryWorker, recoveryWait: Duration) {
        self.recovery = recovery
        self.recoveryWait = recoveryWait
    }

    // MARK: health

    /// Takes a member that faulted out of service; the recovery worker will probe it.
    func fail(_ member: Member, _ error: P11Error) {
        let reason = error.timedOut ? "no answer within the operation-timeout" : "\(error)"
        if member.leaveService(.failed, reason: reason) { recovery.wake() }
    }

    /// A member whose module restarts for another member's sake (`Recovery.restartModule`): its sessions and
    /// handles end with the module, and it returns through recovery at once; meanwhile it counts as returning,
    /// so calls wait for it (`awaitingRecovery`) rather than fail.
    func holdForModuleRestart(_ member: Member, reason: String) {
        if member.leaveService(.recovering, reason: reason) { recovery.wake() }
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
            waitWhile({ group.members.contains(where: returning) && !group.members.contains(where: \.isInService) },
                      upTo: recoveryWait, polling: .milliseconds(2))
            return try choose()
        }
    }

    /// Runs `body` on one member that holds `copies` (nil: any), moving to a peer on each fault-class answer.
    /// A member that answered one leaves service only on evidence (see `Suspects`); when the members agree on
    /// it, the request is at fault and gets their code. `session`: the application's session the call is for.
    func onOneMember<T>(_ group: Group, holding copies: [MemberObject?]? = nil, choice: Choice = .scheduler,
                        session: VirtualSession? = nil, _ body: (Member) throws(P11Error) -> T) throws(P11Error) -> T {
        var suspects = Suspects()
        var excluded = Set<Int>()
        while true {
            let member: Member
            do {
                member = try awaitingRecovery(group) { () throws(P11Error) in
                    choice == .first ? try group.first(holding: copies, excluding: excluded)
                                     : try group.pick(holding: copies, excluding: excluded)
                }
            } catch {
                throw verdict(on: suspects, otherwise: error)
            }
            do {
                let result = try body(member)
                convict(suspects)
                return result
            } catch where error.isMemberFault {
                if let session, session.isClosed, error.isSessionLoss { throw P11Error.sessionHandleInvalid }
                excluded.insert(member.index)
                accuse(member, error, &suspects)
            }
        }
    }

    /// Runs `write` on each of `targets` in turn: the one way p11ha acts on several members.
    /// - A caller's error on the first member returns at once, with nothing changed anywhere.
    /// - A caller's error on a later member (the members disagree) undoes the write where it succeeded,
    ///   and returns that error: the group never holds an object some members refused.
    /// - A fault-class answer is judged once every target has answered: where others succeeded, that member
    ///   leaves service (`onFault`: stale when it missed a write to the token, failed otherwise); where none did,
    ///   the members that answer a probe say the request is at fault, and their code is the answer. The write
    ///   succeeds when it holds on every member still in service; with none it fails, unless `othersHoldIt`
    ///   (copies of what a member already holds: a generated key carried from its source, valid there alone).
    /// - `refusals`: which caller-class answers are asked once more before they count (see `Refusals`).
    func everyMember<T>(of group: Group, _ targets: [Member], onFault: Health = .stale, othersHoldIt: Bool = false,
                        refusals: Refusals = .final, session: VirtualSession? = nil,
                        _ write: (Member) throws(P11Error) -> T,
                        undo: (Member, T) -> Void = { _, _ in }) throws(P11Error) -> [(Int, T)] {
        var done: [(Int, T)] = []
        var suspects = Suspects()
        let leave = { [self] (member: Member, error: P11Error) in
            if onFault == .stale { markStale(member, reason: "missed a write: \(error)") } else { fail(member, error) }
        }
        for member in targets {
            do {
                done.append((member.index, try refusals.askingAgain(member, in: group, peersTookIt: !done.isEmpty) { () throws(P11Error) in
                    try write(member)
                }))
            } catch where error.isMemberFault {
                if let session, session.isClosed, error.isSessionLoss {
                    for (index, value) in done { undo(group.members[index], value) }
                    throw P11Error.sessionHandleInvalid
                }
                if error.timedOut { leave(member, error) } else { suspects.add(member, error) }
            } catch {
                // The members disagree (the refusal held when asked again): named in the log.
                if !done.isEmpty {
                    Log.event(.warning, "members-disagree", "group=\(group.name) member=\(member.name) rv=\(ckrName(error.rv)) took-it=\(done.map { group.members[$0.0].name }.joined(separator: ","))")
                }
                for (index, value) in done { undo(group.members[index], value) }
                throw error
            }
        }
        if !done.isEmpty || othersHoldIt {
            // Peers did what the suspects could not (or the source holds it): a suspect of a write missed it and is
            // stale whatever the cause; one of a read is at fault only if the login held still meanwhile.
            for suspect in suspects.entries where onFault == .stale || peerSuccessConvicts(suspect) {
                leave(suspect.member, suspect.error)
            }
            return done
        }
        throw verdict(on: suspects, otherwise: .deviceError, leave: leave)
    }

    /// Runs a write on every member in service that holds a copy of an object, with that member's copy.
    func everyHolder<T>(_ copies: [MemberObject?], in session: VirtualSession, refusals: Refusals = .final,
                        _ write: (Member, MemberSession, MemberObject) throws(P11Error) -> T,
                        undo: (Member, MemberSession, T) -> Void = { _, _, _ in }) throws(P11Error) -> [(Int, T)] {
        let group = session.group
        let holders = group.membersInService.filter { copies[$0.index] != nil }
        return try everyMember(of: group, holders, refusals: refusals, session: session) { (member) throws(P11Error) in
            try write(member, try session.memberSession(member), copies[member.index]!)
        } undo: { member, value in
            if let s = try? session.memberSession(member) { undo(member, s, value) }
        }
    }

    /// Which caller-class answers of a write (CKR_TEMPLATE_INCONSISTENT, CKR_ATTRIBUTE_VALUE_INVALID...) are asked
    /// once more before they count. SoftHSM answers such a code for a moment to a write it takes a moment later: a
    /// token object's file read back while the store is being looked through (the chaos test, rarely:
    /// CKR_TEMPLATE_INCONSISTENT from a C_GenerateKeyPair whose every member was in service). Taken as the
    /// members disagreeing, that refusal failed the application's write; a refusal that holds when asked again
    /// still does.
    enum Refusals {
        /// Every answer counts at once: writes whose repetition is not harmless (a login counts a wrong PIN, a
        /// destroy may have happened).
        case final
        /// A refusal of a write a peer took (the members would disagree) is asked again once: writes that make or
        /// change an object, where the failed attempt made nothing.
        case askedAgainAfterPeers
        /// Any refusal is asked again once, the first member's too: the template is p11ha's own, read from the
        /// member that made the key (a generated key carried to the members).
        case askedAgain

        /// The answers asked again: those about the template or the object being made, which SoftHSM gives when it
        /// misreads the object's file, and CKR_GENERAL_ERROR, which it gives for a moment while other processes
        /// rewrite the token's file (a peer that answered it to a generated key's unwrap left service stale, the key
        /// on its maker alone, and the maker failed next: the chaos test, once). Not the session's or the login's
        /// state (CKR_SESSION_READ_ONLY, CKR_USER_NOT_LOGGED_IN), which no second look changes, nor
        /// CKR_DEVICE_ERROR, a member gone.
        static let passing: Set<CK_RV> = [CK_RV(CKR_TEMPLATE_INCONSISTENT), CK_RV(CKR_TEMPLATE_INCOMPLETE), CK_RV(CKR_ATTRIBUTE_VALUE_INVALID),
                                          CK_RV(CKR_ATTRIBUTE_TYPE_INVALID), CK_RV(CKR_ATTRIBUTE_READ_ONLY), CK_RV(CKR_FUNCTION_FAILED),
                                          CK_RV(CKR_GENERAL_ERROR)]

        func askingAgain<T>(_ member: Member, in group: Group, peersTookIt: Bool,
                            _ write: () throws(P11Error) -> T) throws(P11Error) -> T {
            do {
                return try write()
            } catch where error.fromMember && Self.passing.contains(error.rv) && (self == .askedAgain || (self == .askedAgainAfterPeers && peersTookIt)) {
                Log.event(.warning, "write-asked-again", "group=\(group.name) member=\(member.name) rv=\(ckrName(error.rv))")
                usleep(10_000)  // SoftHSM's misread lasts while another thread or process looks through the store
                return try write()
            }
        }
    }

    // MARK: evidence

    /// Members that answered a fault-class code (CKR_DEVICE_ERROR, CKR_GENERAL_ERROR, ...) to one request, until
    /// the evidence says whose fault it was. Such a code alone proves nothing: SoftHSM answers CKR_GENERAL_ERROR
    /// to a badly padded ciphertext, and to a search or a signature that races a logout in another thread. A
    /// member leaves service when a peer succeeds at the same call with the login state unchanged meanwhile
    /// (`convict`; for CKR_GENERAL_ERROR, only if the member then fails a probe too; a member that missed a write
    /// is stale whatever the code),
    /// when it fails a probe (`verdict`), or at once when it missed its deadline. When the members that pass a
    /// probe gave the request the same code, the request is at fault: that code is the caller's answer and every
    /// member stays in service; so the last member in service never leaves because of one request.
    struct Suspects {
        struct Entry {
            let member: Member
            let error: P11Error
            /// The group's login epoch when it answered.
            let epoch: UInt64
        }
        private(set) var entries: [Entry] = []
        var indices: Set<Int> { Set(entries.map(\.member.index)) }
        var count: Int { entries.count }
        mutating func add(_ member: Member, _ error: P11Error) {
            entries.append(Entry(member: member, error: error, epoch: member.group?.loginEpoch.load(ordering: .acquiring) ?? 0))
        }
    }

    /// A member answered a fault-class code: past its deadline it leaves service at once; otherwise it is a
    /// suspect, and the call goes on to the next member. Every member that can is tried before the request is
    /// blamed: two members whose engines failed alike must not keep a third, good one from serving.
    func accuse(_ member: Member, _ error: P11Error, _ suspects: inout Suspects) {
        if error.timedOut {
            fail(member, error)
        } else {
            suspects.add(member, error)
        }
    }

    /// A peer did what the suspects could not (those from `start` on): they are at fault, unless the login
    /// changed since they failed (then the peer did not do the same call).
    func convict(_ suspects: Suspects, from start: Int = 0) {
        for suspect in suspects.entries.dropFirst(start) where peerSuccessConvicts(suspect) {
            fail(suspect.member, suspect.error)
        }
    }

    /// Whether a peer's success at the call is evidence against this suspect: only if the group's login state held
    /// still since it answered (and was not changing then), and, for CKR_GENERAL_ERROR, if it also fails a probe.
    private func peerSuccessConvicts(_ suspect: Suspects.Entry) -> Bool {
        let steady = suspect.epoch % 2 == 0 && suspect.epoch == suspect.member.group?.loginEpoch.load(ordering: .acquiring) ?? 0
        return steady && (suspect.error.rv != CKR_GENERAL_ERROR || !answersProbe(suspect.member))
    }

    /// No member succeeded: each suspect is probed, and one that fails leaves service; if any passes, the
    /// request is at fault and its code is the answer; else `otherwise`.
    func verdict(on suspects: Suspects, otherwise: P11Error, leave: ((Member, P11Error) -> Void)? = nil) -> P11Error {
        var answer: P11Error? = nil
        for suspect in suspects.entries {
            if answersProbe(suspect.member) {
                answer = answer ?? P11Error(suspect.error.rv)
            } else if let leave {
                leave(suspect.member, suspect.error)
            } else {
                fail(suspect.member, suspect.error)
            }
        }
        return answer ?? otherwise
    }

    /// A cheap call any working member answers.
    func answersProbe(_ member: Member) -> Bool {
        (try? member.token.tokenInfo()) != nil
    }

    /// The evidence rule for work beside the application's calls (repairs, catch-ups): a member that answered a
    /// fault-class code leaves service only when it fails a probe too. Returns whether it left.
    @discardableResult
    func failUnlessItAnswersProbe(_ member: Member, _ error: P11Error) -> Bool {
        if answersProbe(member) { return false }
        fail(member, error)
        return true
    }
}

/// A member's health moves only here: nothing outside this file can take a member out of service or return it.
extension Member {
    /// Takes the member out of service (failed, or stale when it missed a write), logging why.
    /// Returns whether it was in service.
    @discardableResult
    fileprivate func leaveService(_ health: Health, reason: String) -> Bool {
        // At the process's exit, member calls are refused (`ForkGate.exiting`): that says nothing of the member.
        if ForkGate.exiting.load(ordering: .relaxed) { return false }
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
