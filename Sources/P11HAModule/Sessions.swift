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

/// An operation's state lives in one member's own format: it cannot move between members.
func getOperationState(_ session: CK_SESSION_HANDLE, _ state: Bytes?, _ length: ULongPtr?) -> CK_RV {
    entry { () throws(P11Error) in
        _ = try runtime().sessionInfo(SessionHandle(session))
        throw P11Error.functionNotSupported
    }
}

func setOperationState(_ session: CK_SESSION_HANDLE, _ state: Bytes?, _ length: CK_ULONG,
                       _ encryptionKey: CK_OBJECT_HANDLE, _ authenticationKey: CK_OBJECT_HANDLE) -> CK_RV {
    getOperationState(session, nil, nil)
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
