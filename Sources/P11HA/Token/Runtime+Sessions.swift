// Sessions and login: a virtual session holds a session on every member in service; login acts on every member.
import CInterop

extension Runtime {
    public func openSession(_ slot: CK_SLOT_ID, flags: CK_FLAGS) throws(P11Error) -> SessionHandle {
        let group = try group(slot)
        guard flags & CK_FLAGS(CKF_SERIAL_SESSION) != 0 else { throw P11Error(CK_RV(CKR_SESSION_PARALLEL_NOT_SUPPORTED)) }
        let readWrite = flags & CK_FLAGS(CKF_RW_SESSION) != 0
        return try group.loginChanges.withLock { (_) throws(P11Error) -> SessionHandle in
            try openSessionLocked(group, readWrite: readWrite)
        }
    }

    private func openSessionLocked(_ group: Group, readWrite: Bool) throws(P11Error) -> SessionHandle {
        if !readWrite, group.login.withLock({ $0.userType == CK_USER_TYPE(CKU_SO) }) {
            throw P11Error(CK_RV(CKR_SESSION_READ_WRITE_SO_EXISTS))
        }
        var memberSessions = [MemberSession?](repeating: nil, count: group.members.count)
        let opened = try fanOut.everyMember(of: group, group.membersInService, onFault: .failed) { (member) throws(P11Error) in
            try member.token.openSession(readWrite: readWrite)
        } undo: { member, handle in
            member.token.closeSession(handle)
        }
        for (index, handle) in opened { memberSessions[index] = handle }
        let session = VirtualSession(handle: sessions.newHandle(), group: group, readWrite: readWrite,
                                     memberSessions: memberSessions)
        sessions.insert(session)
        group.login.withLock {
            $0.sessions += 1
            if readWrite { $0.readWriteSessions += 1 }
        }
        return session.handle
    }

    public func closeSession(_ handle: SessionHandle) throws(P11Error) {
        try sessions.resolve(handle).group.changingLogin { () throws(P11Error) in try closeSessionLocked(handle) }
    }

    private func closeSessionLocked(_ handle: SessionHandle) throws(P11Error) {
        let session = try sessions.remove(handle)
        closeMemberSessions(session)
        let group = session.group
        group.objects.withLock { $0.removeObjects(ownedBy: handle) }
        let wasLast = group.login.withLock { login in
            login.sessions -= 1
            if session.readWrite { login.readWriteSessions -= 1 }
            return login.sessions == 0
        }
        // Closing an application's last session with a token logs it out (PKCS#11 5.6).
        if wasLast { group.loginEnded() }
    }

    public func closeAllSessions(_ slot: CK_SLOT_ID) throws(P11Error) {
        let group = try group(slot)
        let handles = sessions.all(in: group).map(\.handle)
        for handle in handles { try? closeSession(handle) }
    }

    public struct SessionInfo: Sendable {
        public let slotID: CK_SLOT_ID
        public let state: CK_STATE
        public let flags: CK_FLAGS
    }

    public func sessionInfo(_ handle: SessionHandle) throws(P11Error) -> SessionInfo {
        let session = try session(handle)
        defer { session.endCall() }
        let userType = session.group.login.withLock { $0.userType }
        let state: CK_STATE = switch (userType, session.readWrite) {
        case (CK_USER_TYPE(CKU_SO), _): CK_STATE(CKS_RW_SO_FUNCTIONS)
        case (CK_USER_TYPE(CKU_USER), true): CK_STATE(CKS_RW_USER_FUNCTIONS)
        case (CK_USER_TYPE(CKU_USER), false): CK_STATE(CKS_RO_USER_FUNCTIONS)
        case (_, true): CK_STATE(CKS_RW_PUBLIC_SESSION)
        default: CK_STATE(CKS_RO_PUBLIC_SESSION)
        }
        var flags = CK_FLAGS(CKF_SERIAL_SESSION)
        if session.readWrite { flags |= CK_FLAGS(CKF_RW_SESSION) }
        return SessionInfo(slotID: session.group.slotID, state: state, flags: flags)
    }

    /// Logs the application in on every member in service, each with its own PIN if its URI gives one.
    public func login(_ handle: SessionHandle, userType: CK_USER_TYPE, pin: Secret?) throws(P11Error) {
        let session = try sessions.resolve(handle)
        let group = session.group
        if userType == CK_USER_TYPE(CKU_CONTEXT_SPECIFIC) {
            // Re-authentication for a key with CKA_ALWAYS_AUTHENTICATE: on the member running the operation.
            // Not replayable elsewhere: the authentication belongs to that member's operation.
            try session.beginCall()
            defer { session.endCall() }
            let running = session.state.withLock { $0.operations.compactMap { $0 }.first }
            guard let running else { throw P11Error.operationNotInitialized }
            let member = group.members[running.member]
            try member.token.login(try session.memberSession(member), userType: userType, pin: member.ownPIN ?? pin)
            return
        }
        guard userType == CK_USER_TYPE(CKU_USER) || userType == CK_USER_TYPE(CKU_SO) else {
            throw P11Error(CK_RV(CKR_USER_TYPE_INVALID))
        }
        try group.changingLogin { () throws(P11Error) in try logInLocked(session, userType: userType, pin: pin) }
    }

    private func logInLocked(_ session: VirtualSession, userType: CK_USER_TYPE, pin: Secret?) throws(P11Error) {
        let group = session.group
        // Counted here, under the lock closing takes too (the session may have been closed meanwhile).
        try session.beginCall()
        defer { session.endCall() }
        if let current = group.login.withLock({ $0.userType }) {
            throw P11Error(CK_RV(current == userType ? CKR_USER_ALREADY_LOGGED_IN : CKR_USER_ANOTHER_ALREADY_LOGGED_IN))
        }
        let targets = group.membersInService
        let loggedIn = try fanOut.everyMember(of: group, targets, onFault: .failed, session: session) { (member) throws(P11Error) in
            // SoftHSM answers C_Login CKR_GENERAL_ERROR for a moment while other processes log in (75% of logins
            // under two other processes' logins: docs/REPLICATION.md, "What the stores do"): tried three times.
            for attempt in 1...3 {
                do throws(P11Error) {
                    try member.token.login(try session.memberSession(member), userType: userType, pin: member.ownPIN ?? pin)
                    return
                } catch where error.rv == CKR_USER_ALREADY_LOGGED_IN {
                    // Already logged in at the member (it shares login state with another user of the module).
                    return
                } catch where error.isMemberFault && !error.timedOut && attempt < 3 {
                    continue
                }
            }
        } undo: { member, _ in
            if let memberSession = try? session.memberSession(member) { try? member.token.logout(memberSession) }
        }
        // A member that answered the login with a fault its probe did not confirm stays in service for the evidence
        // rule, but not logged in it cannot serve the application (its writes would answer CKR_USER_NOT_LOGGED_IN,
        // seen as a writer's first write in the multi-writer test): it goes out, and recovery logs it in and brings
        // it back.
        let loggedInAt = Set(loggedIn.map(\.0))
        for member in targets where member.isInService && !loggedInAt.contains(member.index) {
            fanOut.fail(member, P11Error(CK_RV(CKR_USER_NOT_LOGGED_IN)))
        }
        group.login.withLock {
            $0.userType = userType
            $0.pin = pin?.copy()
        }
        // Records other processes wrote while this one was not logged in (private ones were invisible) are looked
        // at, and the members caught up with each other if they are apart.
        if userType == CK_USER_TYPE(CKU_USER) {
            // Members holding different numbers of records are apart (another process wrote while one of them was
            // away from it): a catch-up starts now, in the background. They stay in service meanwhile: a member
            // with no copy of an object is never asked for it (the object table holds the copies found). Members
            // apart otherwise (as many records, not the same) are the watch's.
            if recordCountsDiffer(group, session) { recovery.requestCatchUp(group) }
            recovery.requestWatch(group)
        }
    }

    private func recordCountsDiffer(_ group: Group, _ session: VirtualSession) -> Bool {
        var counts = Set<Int>()
        for member in group.membersInService {
            guard let s = try? session.memberSession(member),
                  let found = try? member.token.findObjects(s, ReplicaRecord.searchTemplate(isPrivate: nil)) else { continue }
            counts.insert(found.count)
        }
        return counts.count > 1
    }

    public func logout(_ handle: SessionHandle) throws(P11Error) {
        let session = try sessions.resolve(handle)
        try session.group.changingLogin { () throws(P11Error) in try logOutLocked(session) }
    }

    private func logOutLocked(_ session: VirtualSession) throws(P11Error) {
        let group = session.group
        try session.beginCall()
        defer { session.endCall() }
        guard group.login.withLock({ $0.userType }) != nil else { throw P11Error(CK_RV(CKR_USER_NOT_LOGGED_IN)) }
        for member in group.membersInService {
            if let memberSession = try? session.memberSession(member) { try? member.token.logout(memberSession) }
        }
        group.loginEnded()
        forgetDestroyedSessionObjects(session)
    }

    /// C_Logout destroys the application's private session objects and makes their handles invalid (PKCS#11
    /// 2.40 C_Logout; SoftHSM does so). The handles p11ha gave for them are forgotten as well, so that a later call
    /// names them invalid with its own function's code (CKR_KEY_HANDLE_INVALID for a key), not with a member's
    /// answer about a handle of its own (SoftHSM's CKR_OBJECT_HANDLE_INVALID, which no C_*Init lists). A session
    /// object some member in service still holds is kept.
    private func forgetDestroyedSessionObjects(_ session: VirtualSession) {
        let group = session.group
        let sessionObjects = group.objects.withLock { table in table.records.filter { $0.value.owner != nil }.map { ($0.key, $0.value.copies) } }
        for (object, copies) in sessionObjects {
            let holders = group.membersInService.filter { copies[$0.index] != nil }
            let gone = !holders.isEmpty && holders.allSatisfy { member in
                guard let s = try? session.memberSession(member) else { return false }
                do throws(P11Error) {
                    _ = try member.token.readAttributes(s, copies[member.index]!, [CK_ATTRIBUTE_TYPE(CKA_CLASS)])
                    return false
                } catch {
                    return error.fromMember && error.rv == CKR_OBJECT_HANDLE_INVALID
                }
            }
            if gone { group.objects.withLock { _ = $0.remove(object) } }
        }
    }

    public func initPIN(_ handle: SessionHandle, pin: Secret) throws(P11Error) {
        let session = try session(handle)
        defer { session.endCall() }
        _ = try fanOut.everyMember(of: session.group, session.group.membersInService, session: session) { (member) throws(P11Error) in
            try member.token.initPIN(try session.memberSession(member), pin: pin)
        }
    }

    public func setPIN(_ handle: SessionHandle, old: Secret, new: Secret) throws(P11Error) {
        let session = try session(handle)
        defer { session.endCall() }
        _ = try fanOut.everyMember(of: session.group, session.group.membersInService, session: session) { (member) throws(P11Error) in
            try member.token.setPIN(try session.memberSession(member), old: member.ownPIN ?? old, new: new)
        }
        // The PIN kept to log returning members in must be the new one.
        session.group.login.withLock { login in
            if login.userType == CK_USER_TYPE(CKU_USER) { login.pin = new.copy() }
        }
    }
}
