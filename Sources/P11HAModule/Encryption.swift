// Encryption and decryption, single- and multi-part; dual-function updates are not supported.
import CInterop
import P11HA

func encryptInit(_ session: CK_SESSION_HANDLE, _ m: MechanismPtr?, _ key: CK_OBJECT_HANDLE) -> CK_RV {
    operationInit(.encrypt, session, m, key)
}

func encrypt(_ session: CK_SESSION_HANDLE, _ data: Bytes?, _ dataLength: CK_ULONG, _ out: Bytes?, _ outLength: ULongPtr?) -> CK_RV {
    singlePart(.encrypt, session, data, dataLength, out, outLength)
}

func encryptUpdate(_ session: CK_SESSION_HANDLE, _ part: Bytes?, _ partLength: CK_ULONG, _ out: Bytes?, _ outLength: ULongPtr?) -> CK_RV {
    cipherUpdate(.encrypt, session, part, partLength, out, outLength)
}

func encryptFinal(_ session: CK_SESSION_HANDLE, _ out: Bytes?, _ outLength: ULongPtr?) -> CK_RV {
    final(.encrypt, session, out, outLength)
}

func decryptInit(_ session: CK_SESSION_HANDLE, _ m: MechanismPtr?, _ key: CK_OBJECT_HANDLE) -> CK_RV {
    operationInit(.decrypt, session, m, key)
}

func decrypt(_ session: CK_SESSION_HANDLE, _ data: Bytes?, _ dataLength: CK_ULONG, _ out: Bytes?, _ outLength: ULongPtr?) -> CK_RV {
    singlePart(.decrypt, session, data, dataLength, out, outLength)
}

func decryptUpdate(_ session: CK_SESSION_HANDLE, _ part: Bytes?, _ partLength: CK_ULONG, _ out: Bytes?, _ outLength: ULongPtr?) -> CK_RV {
    cipherUpdate(.decrypt, session, part, partLength, out, outLength)
}

func decryptFinal(_ session: CK_SESSION_HANDLE, _ out: Bytes?, _ outLength: ULongPtr?) -> CK_RV {
    final(.decrypt, session, out, outLength)
}

/// Dual-function updates (digest+encrypt, sign+encrypt, ...) would tie two operations to one member:
/// not supported.
func dualUpdate(_ session: CK_SESSION_HANDLE, _ part: Bytes?, _ partLength: CK_ULONG, _ out: Bytes?, _ outLength: ULongPtr?) -> CK_RV {
    entry { () throws(P11Error) in
        _ = try runtime().sessionInfo(SessionHandle(session))
        throw P11Error.functionNotSupported
    }
}

// MARK: shared by every operation kind

func operationInit(_ kind: OperationKind, _ session: CK_SESSION_HANDLE, _ m: MechanismPtr?, _ key: CK_OBJECT_HANDLE?) -> CK_RV {
    entry { () throws(P11Error) in
        let rt = try runtime()
        let mech = try arguments(rt, session) { () throws(P11Error) -> Mechanism in try mechanism(m) }
        try rt.operationInit(kind, SessionHandle(session), mech, key: key.map(ObjectHandle.init))
    }
}

func singlePart(_ kind: OperationKind, _ session: CK_SESSION_HANDLE, _ data: Bytes?, _ dataLength: CK_ULONG,
                _ out: Bytes?, _ outLength: ULongPtr?) -> CK_RV {
    entry { () throws(P11Error) in
        let rt = try runtime()
        let data = try arguments(rt, session) { () throws(P11Error) -> [UInt8] in
            _ = try capacity(out, outLength)
            return try input(data, dataLength)
        }
        try produce(out, outLength) { (room) throws(P11Error) in try rt.singlePart(kind, SessionHandle(session), data, capacity: room) }
    }
}

func cipherUpdate(_ kind: OperationKind, _ session: CK_SESSION_HANDLE, _ part: Bytes?, _ partLength: CK_ULONG,
                  _ out: Bytes?, _ outLength: ULongPtr?) -> CK_RV {
    entry { () throws(P11Error) in
        let rt = try runtime()
        let part = try arguments(rt, session) { () throws(P11Error) -> [UInt8] in
            _ = try capacity(out, outLength)
            return try input(part, partLength)
        }
        try produce(out, outLength) { (room) throws(P11Error) in try rt.cipherUpdate(kind, SessionHandle(session), part, capacity: room) }
    }
}

func update(_ kind: OperationKind, _ session: CK_SESSION_HANDLE, _ part: Bytes?, _ partLength: CK_ULONG) -> CK_RV {
    entry { () throws(P11Error) in
        let rt = try runtime()
        let part = try arguments(rt, session) { () throws(P11Error) -> [UInt8] in try input(part, partLength) }
        try rt.update(kind, SessionHandle(session), part)
    }
}

func final(_ kind: OperationKind, _ session: CK_SESSION_HANDLE, _ out: Bytes?, _ outLength: ULongPtr?) -> CK_RV {
    entry { () throws(P11Error) in
        let rt = try runtime()
        _ = try arguments(rt, session) { () throws(P11Error) -> Int? in try capacity(out, outLength) }
        try produce(out, outLength) { (room) throws(P11Error) in try rt.final(kind, SessionHandle(session), capacity: room) }
    }
}
