// Slot and token management: one slot per group; mechanisms common to every member; PIN management.
import CInterop
import P11HA

func getSlotList(_ tokenPresent: CK_BBOOL, _ list: UnsafeMutablePointer<CK_SLOT_ID>?, _ count: ULongPtr?) -> CK_RV {
    entry { () throws(P11Error) in try fillList(try runtime().slotIDs, list, count) }
}

func getSlotInfo(_ slot: CK_SLOT_ID, _ info: UnsafeMutablePointer<CK_SLOT_INFO>?) -> CK_RV {
    entry { () throws(P11Error) in
        let value = try runtime().slotInfo(slot)
        try required(info).pointee = value
    }
}

func getTokenInfo(_ slot: CK_SLOT_ID, _ info: UnsafeMutablePointer<CK_TOKEN_INFO>?) -> CK_RV {
    entry { () throws(P11Error) in
        let value = try runtime().tokenInfo(slot)
        try required(info).pointee = value
    }
}

func getMechanismList(_ slot: CK_SLOT_ID, _ list: UnsafeMutablePointer<CK_MECHANISM_TYPE>?, _ count: ULongPtr?) -> CK_RV {
    entry { () throws(P11Error) in try fillList(try runtime().mechanismList(slot), list, count) }
}

func getMechanismInfo(_ slot: CK_SLOT_ID, _ type: CK_MECHANISM_TYPE, _ info: UnsafeMutablePointer<CK_MECHANISM_INFO>?) -> CK_RV {
    entry { () throws(P11Error) in
        let value = try runtime().mechanismInfo(slot, type)
        try required(info).pointee = value
    }
}

/// Re-initializing every member of a group at once would erase every copy of every key: refused.
func initToken(_ slot: CK_SLOT_ID, _ pin: Bytes?, _ pinLength: CK_ULONG, _ label: Bytes?) -> CK_RV {
    entry { () throws(P11Error) in
        _ = try runtime().group(slot)
        throw P11Error.functionNotSupported
    }
}

func initPIN(_ session: CK_SESSION_HANDLE, _ pin: Bytes?, _ pinLength: CK_ULONG) -> CK_RV {
    entry { () throws(P11Error) in
        let rt = try runtime()
        let newPIN = try arguments(rt, session) { () throws(P11Error) -> Secret in
            guard let given = try secret(pin, pinLength) else { throw P11Error.argumentsBad }
            return given
        }
        try rt.initPIN(SessionHandle(session), pin: newPIN)
    }
}

func setPIN(_ session: CK_SESSION_HANDLE, _ old: Bytes?, _ oldLength: CK_ULONG, _ new: Bytes?, _ newLength: CK_ULONG) -> CK_RV {
    entry { () throws(P11Error) in
        let rt = try runtime()
        let (oldPIN, newPIN) = try arguments(rt, session) { () throws(P11Error) -> (Secret, Secret) in
            guard let o = try secret(old, oldLength), let n = try secret(new, newLength) else { throw P11Error.argumentsBad }
            return (o, n)
        }
        try rt.setPIN(SessionHandle(session), old: oldPIN, new: newPIN)
    }
}
