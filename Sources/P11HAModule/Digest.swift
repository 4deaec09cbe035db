// Message digesting.
import CInterop
import P11HA

func digestInit(_ session: CK_SESSION_HANDLE, _ m: MechanismPtr?) -> CK_RV {
    operationInit(.digest, session, m, nil)
}

func digest(_ session: CK_SESSION_HANDLE, _ data: Bytes?, _ dataLength: CK_ULONG, _ out: Bytes?, _ outLength: ULongPtr?) -> CK_RV {
    singlePart(.digest, session, data, dataLength, out, outLength)
}

func digestUpdate(_ session: CK_SESSION_HANDLE, _ part: Bytes?, _ partLength: CK_ULONG) -> CK_RV {
    update(.digest, session, part, partLength)
}

func digestKey(_ session: CK_SESSION_HANDLE, _ key: CK_OBJECT_HANDLE) -> CK_RV {
    entry { () throws(P11Error) in try runtime().digestKey(SessionHandle(session), ObjectHandle(key)) }
}

func digestFinal(_ session: CK_SESSION_HANDLE, _ out: Bytes?, _ outLength: ULongPtr?) -> CK_RV {
    final(.digest, session, out, outLength)
}
