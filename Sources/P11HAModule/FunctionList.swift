// The exported entry points: C_GetFunctionList, the PKCS#11 3.0 interface functions, and p11ha's counters.
import CInterop
import P11HA

/// Filled once, completely, before anyone can see it: p11-kit copies the pointers when it loads a module.
nonisolated(unsafe) let functionList: UnsafeMutablePointer<CK_FUNCTION_LIST> = {
    let list = UnsafeMutablePointer<CK_FUNCTION_LIST>.allocate(capacity: 1)
    var f = CK_FUNCTION_LIST()
    f.version = CK_VERSION(major: 2, minor: 40)
    f.C_Initialize = initialize
    f.C_Finalize = finalize
    f.C_GetInfo = getInfo
    f.C_GetFunctionList = C_GetFunctionList
    f.C_GetSlotList = getSlotList
    f.C_GetSlotInfo = getSlotInfo
    f.C_GetTokenInfo = getTokenInfo
    f.C_GetMechanismList = getMechanismList
    f.C_GetMechanismInfo = getMechanismInfo
    f.C_InitToken = initToken
    f.C_InitPIN = initPIN
    f.C_SetPIN = setPIN
    f.C_OpenSession = openSession
    f.C_CloseSession = closeSession
    f.C_CloseAllSessions = closeAllSessions
    f.C_GetSessionInfo = getSessionInfo
    f.C_GetOperationState = getOperationState
    f.C_SetOperationState = setOperationState
    f.C_Login = login
    f.C_Logout = logout
    f.C_CreateObject = createObject
    f.C_CopyObject = copyObject
    f.C_DestroyObject = destroyObject
    f.C_GetObjectSize = getObjectSize
    f.C_GetAttributeValue = getAttributeValue
    f.C_SetAttributeValue = setAttributeValue
    f.C_FindObjectsInit = findObjectsInit
    f.C_FindObjects = findObjects
    f.C_FindObjectsFinal = findObjectsFinal
    f.C_EncryptInit = encryptInit
    f.C_Encrypt = encrypt
    f.C_EncryptUpdate = encryptUpdate
    f.C_EncryptFinal = encryptFinal
    f.C_DecryptInit = decryptInit
    f.C_Decrypt = decrypt
    f.C_DecryptUpdate = decryptUpdate
    f.C_DecryptFinal = decryptFinal
    f.C_DigestInit = digestInit
    f.C_Digest = digest
    f.C_DigestUpdate = digestUpdate
    f.C_DigestKey = digestKey
    f.C_DigestFinal = digestFinal
    f.C_SignInit = signInit
    f.C_Sign = sign
    f.C_SignUpdate = signUpdate
    f.C_SignFinal = signFinal
    f.C_SignRecoverInit = signRecoverInit
    f.C_SignRecover = signRecover
    f.C_VerifyInit = verifyInit
    f.C_Verify = verify
    f.C_VerifyUpdate = verifyUpdate
    f.C_VerifyFinal = verifyFinal
    f.C_VerifyRecoverInit = verifyRecoverInit
    f.C_VerifyRecover = verifyRecover
    f.C_DigestEncryptUpdate = dualUpdate
    f.C_DecryptDigestUpdate = dualUpdate
    f.C_SignEncryptUpdate = dualUpdate
    f.C_DecryptVerifyUpdate = dualUpdate
    f.C_GenerateKey = generateKey
    f.C_GenerateKeyPair = generateKeyPair
    f.C_WrapKey = wrapKey
    f.C_UnwrapKey = unwrapKey
    f.C_DeriveKey = deriveKey
    f.C_SeedRandom = seedRandom
    f.C_GenerateRandom = generateRandom
    f.C_GetFunctionStatus = getFunctionStatus
    f.C_CancelFunction = cancelFunction
    f.C_WaitForSlotEvent = waitForSlotEvent
    list.initialize(to: f)
    return list
}()

@_cdecl("C_GetFunctionList")
public func C_GetFunctionList(_ list: UnsafeMutablePointer<UnsafeMutablePointer<CK_FUNCTION_LIST>?>?) -> CK_RV {
    guard let list else { return CK_RV(CKR_ARGUMENTS_BAD) }
    list.pointee = functionList
    return CKR_OK_RV
}

/// The one interface, "PKCS 11", whose function list is the 2.40 one (its version says so).
nonisolated(unsafe) let interface: UnsafeMutablePointer<CK_INTERFACE> = {
    let name = "PKCS 11"
    let cName = UnsafeMutablePointer<CK_CHAR>.allocate(capacity: name.utf8.count + 1)
    cName.initialize(from: Array(name.utf8) + [0], count: name.utf8.count + 1)
    let interface = UnsafeMutablePointer<CK_INTERFACE>.allocate(capacity: 1)
    interface.initialize(to: CK_INTERFACE(pInterfaceName: cName, pFunctionList: UnsafeMutableRawPointer(functionList), flags: 0))
    return interface
}()

@_cdecl("C_GetInterfaceList")
public func C_GetInterfaceList(_ list: UnsafeMutablePointer<CK_INTERFACE>?, _ count: UnsafeMutablePointer<CK_ULONG>?) -> CK_RV {
    entry { () throws(P11Error) in try fillList([interface.pointee], list, count) }
}

@_cdecl("C_GetInterface")
public func C_GetInterface(_ name: UnsafeMutablePointer<CK_CHAR>?, _ version: UnsafeMutablePointer<CK_VERSION>?,
                           _ result: UnsafeMutablePointer<UnsafeMutablePointer<CK_INTERFACE>?>?, _ flags: CK_FLAGS) -> CK_RV {
    entry { () throws(P11Error) in
        let result = try required(result)
        if let name, String(cString: name) != "PKCS 11" { throw P11Error.argumentsBad }
        if let version, version.pointee.major != 2 || version.pointee.minor != 40 { throw P11Error.argumentsBad }
        if flags & ~interface.pointee.flags != 0 { throw P11Error.argumentsBad }
        result.pointee = interface
    }
}

/// p11ha's extension: how many operations each member of a slot's group has served, in member order.
/// Two-call convention on `count`.
@_cdecl("p11ha_member_counters")
public func p11ha_member_counters(_ slot: CK_SLOT_ID, _ served: UnsafeMutablePointer<CK_ULONG>?, _ count: UnsafeMutablePointer<CK_ULONG>?) -> CK_RV {
    entry { () throws(P11Error) in
        let figures = try runtime().figures(slot: slot)
        try fillList(figures.map { CK_ULONG($0.served) }, served, count)
    }
}

/// p11ha's extension: each member's health, in member order (0 in service, 1 failed, 2 stale, 3 recovering).
/// Two-call convention on `count`.
@_cdecl("p11ha_member_states")
public func p11ha_member_states(_ slot: CK_SLOT_ID, _ states: UnsafeMutablePointer<CK_ULONG>?, _ count: UnsafeMutablePointer<CK_ULONG>?) -> CK_RV {
    entry { () throws(P11Error) in
        let figures = try runtime().figures(slot: slot)
        try fillList(figures.map { CK_ULONG($0.health.rawValue) }, states, count)
    }
}
