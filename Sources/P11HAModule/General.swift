// General-purpose functions: C_Initialize, C_Finalize, C_GetInfo, and the legacy parallel functions.
import CInterop
import P11HA

func initialize(_ args: UnsafeMutableRawPointer?) -> CK_RV {
    entry { () throws(P11Error) in
        if let args {
            let a = args.loadUnaligned(as: CK_C_INITIALIZE_ARGS.self)
            guard a.pReserved == nil else { throw P11Error.argumentsBad }
            let callbacks = [a.CreateMutex != nil, a.DestroyMutex != nil, a.LockMutex != nil, a.UnlockMutex != nil]
            if callbacks.contains(true) && callbacks.contains(false) { throw P11Error.argumentsBad }
            // p11ha's state is guarded by the operating system's locks. An application that supplies its own
            // mutexes without allowing those gets CKR_CANT_LOCK, as PKCS#11 (C_Initialize, case 3) provides.
            if callbacks.allSatisfy({ $0 }) && a.flags & CK_FLAGS(CKF_OS_LOCKING_OK) == 0 {
                throw P11Error(CK_RV(CKR_CANT_LOCK))
            }
        }
        try Library.initialize()
    }
}

func finalize(_ reserved: UnsafeMutableRawPointer?) -> CK_RV {
    entry { () throws(P11Error) in
        guard reserved == nil else { throw P11Error.argumentsBad }
        try Library.finalize()
    }
}

func getInfo(_ info: UnsafeMutablePointer<CK_INFO>?) -> CK_RV {
    entry { () throws(P11Error) in
        _ = try runtime()
        let info = try required(info)
        var value = CK_INFO()
        value.cryptokiVersion = CK_VERSION(major: 2, minor: 40)
        setField(&value.manufacturerID, "p11ha")
        setField(&value.libraryDescription, "p11ha high-availability module")
        value.libraryVersion = p11haVersion
        info.pointee = value
    }
}

func getFunctionStatus(_ session: CK_SESSION_HANDLE) -> CK_RV {
    entry { () throws(P11Error) in
        _ = try runtime()
        throw P11Error(CK_RV(CKR_FUNCTION_NOT_PARALLEL))
    }
}

func cancelFunction(_ session: CK_SESSION_HANDLE) -> CK_RV { getFunctionStatus(session) }

/// Slot events never happen: a group's token is always present.
func waitForSlotEvent(_ flags: CK_FLAGS, _ slot: UnsafeMutablePointer<CK_SLOT_ID>?, _ reserved: UnsafeMutableRawPointer?) -> CK_RV {
    entry { () throws(P11Error) in
        _ = try runtime()
        guard reserved == nil else { throw P11Error.argumentsBad }
        if flags & CK_FLAGS(CKF_DONT_BLOCK) != 0 { throw P11Error(CK_RV(CKR_NO_EVENT)) }
        throw P11Error.functionNotSupported
    }
}
