// Session management: p11ha's own session handles, login and logout.
import CInterop
import P11HA

func openSession(_ slot: CK_SLOT_ID, _ flags: CK_FLAGS, _ application: UnsafeMutableRawPointer?, _ notify: CK_NOTIFY?,
                 _ session: UnsafeMutablePointer<CK_SESSION_HANDLE>?) -> CK_RV {
    entry { () throws(P11Error) in
        let rt = try runtime()
        let out = try required(session)
        out.pointee = (try rt.openSession(slot, flags: flags)).raw
    }
}

func closeSession(_ session: CK_SESSION_HANDLE) -> CK_RV {
    entry { () throws(P11Error) in try runtime().closeSession(SessionHandle(session)) }
}

func closeAllSessions(_ slot: CK_SLOT_ID) -> CK_RV {
    entry { () throws(P11Error) in try runtime().closeAllSessions(slot) }
}

func getSessionInfo(_ session: CK_SESSION_HANDLE, _ info: UnsafeMutablePointer<CK_SESSION_INFO>?) -> CK_RV {
    entry { () throws(P11Error) in
        let value = try runtime().sessionInfo(SessionHandle(session))
        try required(info).pointee = CK_SESSION_INFO(slotID: value.slotID, state: value.state, flags: value.flags, ulDeviceError: 0)
    }
}

/// CKR_FUNCTION_NOT_SUPPORTED for a valid session (the session's own error otherwise).
func unsupported(_ session: CK_SESSION_HANDLE) -> CK_RV {
    entry { () throws(P11Error) in
        _ = try runtime().sessionInfo(SessionHandle(session))
        throw P11Error.functionNotSupported
    }
}

/// An operation's state is in its member's own format, saved with the member it belongs to
/// (`Runtime.operationState`); a member that cannot save states answers CKR_FUNCTION_NOT_SUPPORTED (SoftHSM).
func getOperationState(_ session: CK_SESSION_HANDLE, _ state: Bytes?, _ length: ULongPtr?) -> CK_RV {
    entry { () throws(P11Error) in
        let rt = try runtime()
        _ = try arguments(rt, session) { () throws(P11Error) in try capacity(state, length) }
        try produce(state, length) { (room) throws(P11Error) -> Output in
            let saved = try rt.operationState(SessionHandle(session))
            guard let room else { return .length(saved.count) }
            if room < saved.count { throw P11Error(CK_RV(CKR_BUFFER_TOO_SMALL), neededLength: saved.count) }
            return .data(saved)
        }
    }
}

func setOperationState(_ session: CK_SESSION_HANDLE, _ state: Bytes?, _ length: CK_ULONG,
                       _ encryptionKey: CK_OBJECT_HANDLE, _ authenticationKey: CK_OBJECT_HANDLE) -> CK_RV {
    entry { () throws(P11Error) in
        let rt = try runtime()
        let saved = try arguments(rt, session) { () throws(P11Error) -> [UInt8] in
            let n = try P11HAModule.length(length)
            guard let state else { throw P11Error.argumentsBad }
            return Array(UnsafeBufferPointer(start: state, count: n))
        }
        let none = CK_OBJECT_HANDLE(CK_INVALID_HANDLE)
        try rt.setOperationState(SessionHandle(session), saved,
                                 encryptionKey: encryptionKey == none ? nil : ObjectHandle(encryptionKey),
                                 authenticationKey: authenticationKey == none ? nil : ObjectHandle(authenticationKey))
    }
}

/// C_LoginUser (3.0): the members are 2.40 tokens, which know no user names (OpenSC's module answers the same).
func loginUser(_ session: CK_SESSION_HANDLE, _ userType: CK_USER_TYPE, _ pin: Bytes?, _ pinLength: CK_ULONG,
               _ username: Bytes?, _ usernameLength: CK_ULONG) -> CK_RV {
    unsupported(session)
}

/// C_SessionCancel (3.0), done by p11ha over its members (`Runtime.cancelOperations`).
func sessionCancel(_ session: CK_SESSION_HANDLE, _ flags: CK_FLAGS) -> CK_RV {
    entry { () throws(P11Error) in try runtime().cancelOperations(SessionHandle(session), flags: flags) }
}

func login(_ session: CK_SESSION_HANDLE, _ userType: CK_USER_TYPE, _ pin: Bytes?, _ pinLength: CK_ULONG) -> CK_RV {
    entry { () throws(P11Error) in
        let rt = try runtime()
        let secretPIN = try arguments(rt, session) { () throws(P11Error) -> Secret? in try secret(pin, pinLength) }
        try rt.login(SessionHandle(session), userType: userType, pin: secretPIN)
    }
}

func logout(_ session: CK_SESSION_HANDLE) -> CK_RV {
    entry { () throws(P11Error) in try runtime().logout(SessionHandle(session)) }
}
