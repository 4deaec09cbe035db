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

/// The PKCS#11 3.0 function list: the 2.40 functions, then 3.0's. C_SessionCancel is p11ha's own; C_LoginUser and
/// the message-based functions answer CKR_FUNCTION_NOT_SUPPORTED (the members are 2.40 tokens).
nonisolated(unsafe) let functionList30: UnsafeMutablePointer<CK_FUNCTION_LIST_3_0> = {
    let list = UnsafeMutablePointer<CK_FUNCTION_LIST_3_0>.allocate(capacity: 1)
    var f = CK_FUNCTION_LIST_3_0()
    f.base = functionList.pointee
    f.base.version = CK_VERSION(major: 3, minor: 0)
    f.C_GetInterfaceList = C_GetInterfaceList
    f.C_GetInterface = C_GetInterface
    f.C_LoginUser = loginUser
    f.C_SessionCancel = sessionCancel
    f.C_MessageEncryptInit = messageInit
    f.C_EncryptMessage = cryptMessage
    f.C_EncryptMessageBegin = cryptMessageBegin
    f.C_EncryptMessageNext = cryptMessageNext
    f.C_MessageEncryptFinal = messageFinal
    f.C_MessageDecryptInit = messageInit
    f.C_DecryptMessage = cryptMessage
    f.C_DecryptMessageBegin = cryptMessageBegin
    f.C_DecryptMessageNext = cryptMessageNext
    f.C_MessageDecryptFinal = messageFinal
    f.C_MessageSignInit = messageInit
    f.C_SignMessage = signMessage
    f.C_SignMessageBegin = messageBegin
    f.C_SignMessageNext = signMessage
    f.C_MessageSignFinal = messageFinal
    f.C_MessageVerifyInit = messageInit
    f.C_VerifyMessage = verifyMessage
    f.C_VerifyMessageBegin = messageBegin
    f.C_VerifyMessageNext = verifyMessage
    f.C_MessageVerifyFinal = messageFinal
    list.initialize(to: f)
    return list
}()

/// The interfaces, "PKCS 11" both: 3.0 first (the default), then 2.40 (the list C_GetFunctionList gives).
nonisolated(unsafe) let interfaces: UnsafeMutablePointer<CK_INTERFACE> = {
    let name = "PKCS 11"
    let cName = UnsafeMutablePointer<CK_CHAR>.allocate(capacity: name.utf8.count + 1)
    cName.initialize(from: Array(name.utf8) + [0], count: name.utf8.count + 1)
    let interfaces = UnsafeMutablePointer<CK_INTERFACE>.allocate(capacity: 2)
    interfaces.initialize(to: CK_INTERFACE(pInterfaceName: cName, pFunctionList: UnsafeMutableRawPointer(functionList30), flags: 0))
    (interfaces + 1).initialize(to: CK_INTERFACE(pInterfaceName: cName, pFunctionList: UnsafeMutableRawPointer(functionList), flags: 0))
    return interfaces
}()

@_cdecl("C_GetInterfaceList")
public func C_GetInterfaceList(_ list: UnsafeMutablePointer<CK_INTERFACE>?, _ count: UnsafeMutablePointer<CK_ULONG>?) -> CK_RV {
    entry { () throws(P11Error) in try fillList([interfaces[0], interfaces[1]], list, count) }
}

/// The interface of that name (NULL: "PKCS 11") and version (NULL: the first, 3.0) whose flags include `flags`.
@_cdecl("C_GetInterface")
public func C_GetInterface(_ name: UnsafeMutablePointer<CK_CHAR>?, _ version: UnsafeMutablePointer<CK_VERSION>?,
                           _ result: UnsafeMutablePointer<UnsafeMutablePointer<CK_INTERFACE>?>?, _ flags: CK_FLAGS) -> CK_RV {
    entry { () throws(P11Error) in
        let result = try required(result)
        if let name, String(cString: name) != "PKCS 11" { throw P11Error.argumentsBad }
        for candidate in [interfaces, interfaces + 1] {
            let listVersion = candidate.pointee.pFunctionList!.load(as: CK_VERSION.self)
            if let version, version.pointee.major != listVersion.major || version.pointee.minor != listVersion.minor { continue }
            if flags & ~candidate.pointee.flags != 0 { continue }
            result.pointee = candidate
            return
        }
        throw P11Error.argumentsBad
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
