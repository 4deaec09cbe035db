// Scenarios for the library's life, slots, sessions and login, and bad input.
import CInterop
import Glibc

let tokenLabelUnderTest = env("P11HA_TEST_TOKEN") ?? "ha-test"
let userPIN = env("P11HA_TEST_PIN") ?? ""
let soPIN = env("P11HA_TEST_SO_PIN") ?? ""

func initialized(_ m: Module) -> CK_SLOT_ID {
    ok(m.f.C_Initialize!(nil), "C_Initialize")
    guard let s = slot(labelled: tokenLabelUnderTest, in: m) else { fatal("no token labelled \(tokenLabelUnderTest)") }
    return s
}

/// C_Initialize and C_Finalize per PKCS#11 2.40 5.4, and the 3.0 interface functions.
func initializeScenario(_ m: Module) {
    var info = CK_INFO()
    expect(m.f.C_GetInfo!(&info), CKR_CRYPTOKI_NOT_INITIALIZED, "C_GetInfo before C_Initialize")
    expect(m.f.C_Finalize!(nil), CKR_CRYPTOKI_NOT_INITIALIZED, "C_Finalize before C_Initialize")

    var args = CK_C_INITIALIZE_ARGS()
    args.pReserved = UnsafeMutableRawPointer(bitPattern: 8)
    expect(m.f.C_Initialize!(&args), CKR_ARGUMENTS_BAD, "C_Initialize with pReserved set")

    let create: CK_CREATEMUTEX = { _ in CK_RV(CKR_OK) }
    let other: CK_DESTROYMUTEX = { _ in CK_RV(CKR_OK) }
    args = CK_C_INITIALIZE_ARGS()
    args.CreateMutex = create
    expect(m.f.C_Initialize!(&args), CKR_ARGUMENTS_BAD, "C_Initialize with some mutex callbacks only")
    args.DestroyMutex = other
    args.LockMutex = other
    args.UnlockMutex = other
    expect(m.f.C_Initialize!(&args), CKR_CANT_LOCK, "C_Initialize with application mutexes and no OS locking")
    args.flags = CK_FLAGS(CKF_OS_LOCKING_OK)
    expect(m.f.C_Initialize!(&args), CKR_OK, "C_Initialize with application mutexes and CKF_OS_LOCKING_OK")
    expect(m.f.C_Initialize!(nil), CKR_CRYPTOKI_ALREADY_INITIALIZED, "second C_Initialize")
    expect(m.f.C_GetInfo!(&info), CKR_OK, "C_GetInfo")
    check(info.cryptokiVersion.major == 2 && info.cryptokiVersion.minor == 40, "cryptoki version 2.40")
    expect(m.f.C_GetInfo!(nil), CKR_ARGUMENTS_BAD, "C_GetInfo(NULL)")
    expect(m.f.C_Finalize!(UnsafeMutableRawPointer(bitPattern: 8)), CKR_ARGUMENTS_BAD, "C_Finalize with a non-NULL argument")
    expect(m.f.C_Finalize!(nil), CKR_OK, "C_Finalize")
    var count: CK_ULONG = 0
    expect(m.f.C_GetSlotList!(0, nil, &count), CKR_CRYPTOKI_NOT_INITIALIZED, "C_GetSlotList after C_Finalize")

    args = CK_C_INITIALIZE_ARGS()
    args.flags = CK_FLAGS(CKF_OS_LOCKING_OK)
    expect(m.f.C_Initialize!(&args), CKR_OK, "C_Initialize again after C_Finalize, CKF_OS_LOCKING_OK")
    expect(m.f.C_Finalize!(nil), CKR_OK, "C_Finalize again")

    // PKCS#11 3.0 interface discovery.
    typealias GetList = @convention(c) (UnsafeMutablePointer<CK_INTERFACE>?, UnsafeMutablePointer<CK_ULONG>?) -> CK_RV
    typealias Get = @convention(c) (UnsafeMutablePointer<CK_CHAR>?, UnsafeMutablePointer<CK_VERSION>?,
                                    UnsafeMutablePointer<UnsafeMutablePointer<CK_INTERFACE>?>?, CK_FLAGS) -> CK_RV
    guard let listSymbol = m.symbol("C_GetInterfaceList"), let getSymbol = m.symbol("C_GetInterface") else {
        check(false, "C_GetInterfaceList and C_GetInterface are exported")
        return
    }
    let getList = unsafeBitCast(listSymbol, to: GetList.self)
    let get = unsafeBitCast(getSymbol, to: Get.self)
    count = 0
    expect(getList(nil, &count), CKR_OK, "C_GetInterfaceList length query")
    check(count == 2, "two interfaces (\(count))")
    var interfaces = [CK_INTERFACE](repeating: CK_INTERFACE(), count: 2)
    count = 1
    expect(getList(&interfaces, &count), CKR_BUFFER_TOO_SMALL, "C_GetInterfaceList with a short buffer")
    count = 2
    expect(getList(&interfaces, &count), CKR_OK, "C_GetInterfaceList")
    let versions = interfaces.map { $0.pFunctionList?.load(as: CK_VERSION.self) }
    check(interfaces.allSatisfy { String(cString: $0.pInterfaceName) == "PKCS 11" && $0.flags == 0 }, "both interfaces are \"PKCS 11\", flags 0")
    check(versions[0]?.major == 3 && versions[0]?.minor == 0, "the first interface is 3.0")
    check(versions[1]?.major == 2 && versions[1]?.minor == 40, "the second interface is 2.40")
    var list240: UnsafeMutablePointer<CK_FUNCTION_LIST>? = nil
    typealias GetFunctionList = @convention(c) (UnsafeMutablePointer<UnsafeMutablePointer<CK_FUNCTION_LIST>?>?) -> CK_RV
    ok(unsafeBitCast(m.symbol("C_GetFunctionList")!, to: GetFunctionList.self)(&list240), "C_GetFunctionList")
    check(interfaces[1].pFunctionList == list240.map { UnsafeMutableRawPointer($0) }, "the 2.40 interface's list is C_GetFunctionList's")
    var name = Array("PKCS 11".utf8) + [0]
    var found: UnsafeMutablePointer<CK_INTERFACE>? = nil
    expect(get(&name, nil, &found, 0), CKR_OK, "C_GetInterface(\"PKCS 11\")")
    check(found?.pointee.pFunctionList == interfaces[0].pFunctionList, "without a version, the first (3.0)")
    expect(get(nil, nil, &found, 0), CKR_OK, "C_GetInterface(NULL)")
    check(found?.pointee.pFunctionList == interfaces[0].pFunctionList, "without a name, the default (3.0)")
    var three = CK_VERSION(major: 3, minor: 0)
    expect(get(&name, &three, &found, 0), CKR_OK, "C_GetInterface asking for version 3.0")
    check(found?.pointee.pFunctionList == interfaces[0].pFunctionList, "version 3.0 is the 3.0 list")
    var twoForty = CK_VERSION(major: 2, minor: 40)
    expect(get(&name, &twoForty, &found, 0), CKR_OK, "C_GetInterface asking for version 2.40")
    check(found?.pointee.pFunctionList == interfaces[1].pFunctionList, "version 2.40 is the 2.40 list")
    var wrongName = Array("Vendor X".utf8) + [0]
    expect(get(&wrongName, nil, &found, 0), CKR_ARGUMENTS_BAD, "C_GetInterface of an unknown interface")
    var twoFifty = CK_VERSION(major: 2, minor: 50)
    expect(get(nil, &twoFifty, &found, 0), CKR_ARGUMENTS_BAD, "C_GetInterface asking for version 2.50")
    expect(get(nil, nil, &found, 2), CKR_ARGUMENTS_BAD, "C_GetInterface with a flag no interface has")
    expect(get(nil, nil, nil, 0), CKR_ARGUMENTS_BAD, "C_GetInterface(NULL result)")
}

/// One slot per group; session handles, states, login and logout.
func sessionsScenario(_ m: Module) {
    let s = initialized(m)
    var count: CK_ULONG = 0
    expect(m.f.C_GetSlotList!(0, nil, &count), CKR_OK, "C_GetSlotList length query")
    var slots = [CK_SLOT_ID](repeating: 0, count: 4)
    var short: CK_ULONG = 0
    if count > 0 { expect(m.f.C_GetSlotList!(0, &slots, &short), CKR_BUFFER_TOO_SMALL, "C_GetSlotList into a buffer too small") }
    check(short == count, "the needed count is returned with CKR_BUFFER_TOO_SMALL")
    expect(m.f.C_GetSlotList!(0, nil, nil), CKR_ARGUMENTS_BAD, "C_GetSlotList(NULL count)")

    var tokenInfo = CK_TOKEN_INFO()
    expect(m.f.C_GetTokenInfo!(s, &tokenInfo), CKR_OK, "C_GetTokenInfo")
    print("serial=\(withUnsafeBytes(of: tokenInfo.serialNumber) { String(decoding: $0, as: UTF8.self) })")
    expect(m.f.C_GetTokenInfo!(9999, &tokenInfo), CKR_SLOT_ID_INVALID, "C_GetTokenInfo of an unknown slot")
    var slotInfo = CK_SLOT_INFO()
    expect(m.f.C_GetSlotInfo!(s, &slotInfo), CKR_OK, "C_GetSlotInfo")
    check(slotInfo.flags & CK_FLAGS(CKF_TOKEN_PRESENT) != 0, "the group's token is present")

    var session: CK_SESSION_HANDLE = 0
    expect(m.f.C_OpenSession!(s, 0, nil, nil, &session), CKR_SESSION_PARALLEL_NOT_SUPPORTED, "C_OpenSession without CKF_SERIAL_SESSION")
    expect(m.f.C_OpenSession!(s, CK_FLAGS(CKF_SERIAL_SESSION), nil, nil, nil), CKR_ARGUMENTS_BAD, "C_OpenSession(NULL handle)")
    var ro: CK_SESSION_HANDLE = 0
    var rw: CK_SESSION_HANDLE = 0
    ok(m.f.C_OpenSession!(s, CK_FLAGS(CKF_SERIAL_SESSION), nil, nil, &ro), "C_OpenSession read-only")
    ok(m.f.C_OpenSession!(s, CK_FLAGS(CKF_SERIAL_SESSION | CKF_RW_SESSION), nil, nil, &rw), "C_OpenSession read-write")
    check(ro != rw, "distinct session handles")
    var info = CK_SESSION_INFO()
    expect(m.f.C_GetSessionInfo!(ro, &info), CKR_OK, "C_GetSessionInfo")
    check(info.state == CK_STATE(CKS_RO_PUBLIC_SESSION) && info.slotID == s, "a new read-only session is public, on the group's slot")
    expect(m.f.C_GetSessionInfo!(rw, &info), CKR_OK, "C_GetSessionInfo")
    check(info.state == CK_STATE(CKS_RW_PUBLIC_SESSION), "a new read-write session is public")

    var wrong = Array("not-the-pin".utf8)
    expect(m.f.C_Login!(rw, CK_USER_TYPE(CKU_USER), &wrong, CK_ULONG(wrong.count)), CKR_PIN_INCORRECT, "C_Login with a wrong PIN")
    expect(m.f.C_Login!(rw, 77, &wrong, CK_ULONG(wrong.count)), CKR_USER_TYPE_INVALID, "C_Login with an unknown user type")
    expect(m.f.C_Logout!(rw), CKR_USER_NOT_LOGGED_IN, "C_Logout while not logged in")
    var pin = Array(userPIN.utf8)
    expect(m.f.C_Login!(rw, CK_USER_TYPE(CKU_USER), &pin, CK_ULONG(pin.count)), CKR_OK, "C_Login")
    expect(m.f.C_Login!(ro, CK_USER_TYPE(CKU_USER), &pin, CK_ULONG(pin.count)), CKR_USER_ALREADY_LOGGED_IN, "C_Login again, other session")
    var so = Array(soPIN.utf8)
    expect(m.f.C_Login!(rw, CK_USER_TYPE(CKU_SO), &so, CK_ULONG(so.count)), CKR_USER_ANOTHER_ALREADY_LOGGED_IN, "SO login while the user is")
    expect(m.f.C_GetSessionInfo!(ro, &info), CKR_OK, "C_GetSessionInfo")
    check(info.state == CK_STATE(CKS_RO_USER_FUNCTIONS), "login applies to every session of the application")
    var late: CK_SESSION_HANDLE = 0
    ok(m.f.C_OpenSession!(s, CK_FLAGS(CKF_SERIAL_SESSION | CKF_RW_SESSION), nil, nil, &late), "C_OpenSession after login")
    expect(m.f.C_GetSessionInfo!(late, &info), CKR_OK, "C_GetSessionInfo")
    check(info.state == CK_STATE(CKS_RW_USER_FUNCTIONS), "a session opened after login is logged in")
    var random = [UInt8](repeating: 0, count: 32)
    expect(m.f.C_GenerateRandom!(late, &random, 32), CKR_OK, "C_GenerateRandom in the new session")
    expect(m.f.C_Logout!(rw), CKR_OK, "C_Logout")
    expect(m.f.C_GetSessionInfo!(late, &info), CKR_OK, "C_GetSessionInfo")
    check(info.state == CK_STATE(CKS_RW_PUBLIC_SESSION), "logout applies to every session")

    expect(m.f.C_CloseSession!(ro), CKR_OK, "C_CloseSession")
    expect(m.f.C_CloseSession!(ro), CKR_SESSION_HANDLE_INVALID, "C_CloseSession twice")
    expect(m.f.C_GetSessionInfo!(ro, &info), CKR_SESSION_HANDLE_INVALID, "C_GetSessionInfo of a closed session")
    expect(m.f.C_CloseAllSessions!(s), CKR_OK, "C_CloseAllSessions")
    expect(m.f.C_GetSessionInfo!(rw, &info), CKR_SESSION_HANDLE_INVALID, "sessions are gone after C_CloseAllSessions")

    // SO login needs no read-only session open; then the user logs in again after the SO leaves.
    ok(m.f.C_OpenSession!(s, CK_FLAGS(CKF_SERIAL_SESSION | CKF_RW_SESSION), nil, nil, &rw), "C_OpenSession")
    expect(m.f.C_Login!(rw, CK_USER_TYPE(CKU_SO), &so, CK_ULONG(so.count)), CKR_OK, "SO C_Login")
    expect(m.f.C_OpenSession!(s, CK_FLAGS(CKF_SERIAL_SESSION), nil, nil, &ro), CKR_SESSION_READ_WRITE_SO_EXISTS, "read-only session while the SO is logged in")
    expect(m.f.C_Logout!(rw), CKR_OK, "SO C_Logout")
    expect(m.f.C_Login!(rw, CK_USER_TYPE(CKU_USER), &pin, CK_ULONG(pin.count)), CKR_OK, "user C_Login after the SO")
    expect(m.f.C_CloseSession!(rw), CKR_OK, "C_CloseSession of the last session")
    ok(m.f.C_OpenSession!(s, CK_FLAGS(CKF_SERIAL_SESSION), nil, nil, &ro), "C_OpenSession")
    expect(m.f.C_GetSessionInfo!(ro, &info), CKR_OK, "C_GetSessionInfo")
    check(info.state == CK_STATE(CKS_RO_PUBLIC_SESSION), "closing the last session logged the application out")
    ok(m.f.C_Finalize!(nil), "C_Finalize")
}

/// NULL pointers, unknown handles and lengths: exactly the specification's codes, and no crash.
func badInputScenario(_ m: Module) {
    let s = initialized(m)
    let session = openLoggedIn(m, slot: s, pin: userPIN)
    var data = [UInt8](repeating: 0, count: 64)
    var out = [UInt8](repeating: 0, count: 64)
    var outLen: CK_ULONG = 64
    var mech = mechanism(CKM_SHA256)
    expect(m.f.C_DigestInit!(session, nil), CKR_ARGUMENTS_BAD, "C_DigestInit(NULL mechanism)")
    expect(m.f.C_DigestInit!(4242, &mech), CKR_SESSION_HANDLE_INVALID, "C_DigestInit on an unknown session")
    expect(m.f.C_Digest!(session, &data, 1, &out, &outLen), CKR_OPERATION_NOT_INITIALIZED, "C_Digest without C_DigestInit")
    ok(m.f.C_DigestInit!(session, &mech), "C_DigestInit")
    expect(m.f.C_DigestInit!(session, &mech), CKR_OPERATION_ACTIVE, "C_DigestInit twice")
    expect(m.f.C_Digest!(session, nil, 5, &out, &outLen), CKR_ARGUMENTS_BAD, "C_Digest(NULL data, length 5)")
    expect(m.f.C_Digest!(session, &data, 1, &out, nil), CKR_ARGUMENTS_BAD, "C_Digest(NULL length)")
    expect(m.f.C_Digest!(session, &data, CK_ULONG.max, &out, &outLen), CKR_ARGUMENTS_BAD, "C_Digest with an impossible length")
    var bad = mechanism(0x7fff_fff0)
    var other: CK_SESSION_HANDLE = 0
    ok(m.f.C_OpenSession!(s, CK_FLAGS(CKF_SERIAL_SESSION), nil, nil, &other), "C_OpenSession")
    expect(m.f.C_DigestInit!(other, &bad), CKR_MECHANISM_INVALID, "C_DigestInit with an unknown mechanism")
    var sign = mechanism(CKM_ECDSA)
    expect(m.f.C_SignInit!(other, &sign, 987_654), CKR_KEY_HANDLE_INVALID, "C_SignInit with an unknown key")
    var size: CK_ULONG = 0
    expect(m.f.C_GetObjectSize!(other, 987_654, &size), CKR_OBJECT_HANDLE_INVALID, "C_GetObjectSize of an unknown object")
    expect(m.f.C_DestroyObject!(other, 987_654), CKR_OBJECT_HANDLE_INVALID, "C_DestroyObject of an unknown object")
    var a = CK_ATTRIBUTE(type: CK_ATTRIBUTE_TYPE(CKA_LABEL), pValue: nil, ulValueLen: 0)
    expect(m.f.C_GetAttributeValue!(other, 987_654, &a, 1), CKR_OBJECT_HANDLE_INVALID, "C_GetAttributeValue of an unknown object")
    expect(m.f.C_GetAttributeValue!(other, 987_654, nil, 1), CKR_ARGUMENTS_BAD, "C_GetAttributeValue(NULL template)")
    let t = Template().add(CKA_CLASS, ulong: CK_ULONG(CKO_DATA))
    expect(m.f.C_CreateObject!(other, &t.attributes, t.count, nil), CKR_ARGUMENTS_BAD, "C_CreateObject(NULL handle)")
    var h: CK_OBJECT_HANDLE = 0
    var broken = CK_ATTRIBUTE(type: CK_ATTRIBUTE_TYPE(CKA_LABEL), pValue: nil, ulValueLen: 5)
    expect(m.f.C_CreateObject!(other, &broken, 1, &h), CKR_ARGUMENTS_BAD, "C_CreateObject with a NULL value of length 5")
    expect(m.f.C_FindObjects!(other, &h, 1, &size), CKR_OPERATION_NOT_INITIALIZED, "C_FindObjects without C_FindObjectsInit")
    expect(m.f.C_FindObjectsFinal!(other), CKR_OPERATION_NOT_INITIALIZED, "C_FindObjectsFinal without C_FindObjectsInit")
    ok(m.f.C_FindObjectsInit!(other, nil, 0), "C_FindObjectsInit with an empty template")
    expect(m.f.C_FindObjectsInit!(other, nil, 0), CKR_OPERATION_ACTIVE, "C_FindObjectsInit twice")
    expect(m.f.C_FindObjects!(other, nil, 1, &size), CKR_ARGUMENTS_BAD, "C_FindObjects(NULL array)")
    ok(m.f.C_FindObjectsFinal!(other), "C_FindObjectsFinal")
    expect(m.f.C_GenerateRandom!(other, nil, 16), CKR_ARGUMENTS_BAD, "C_GenerateRandom(NULL buffer)")
    expect(m.f.C_Login!(other, CK_USER_TYPE(CKU_USER), nil, 4), CKR_ARGUMENTS_BAD, "C_Login(NULL PIN, length 4)")
    expect(m.f.C_InitToken!(s, nil, 0, nil), CKR_FUNCTION_NOT_SUPPORTED, "C_InitToken is refused for a group")
    expect(m.f.C_GetOperationState!(other, nil, &size), CKR_FUNCTION_NOT_SUPPORTED, "C_GetOperationState")
    expect(m.f.C_WaitForSlotEvent!(CK_FLAGS(CKF_DONT_BLOCK), nil, nil), CKR_NO_EVENT, "C_WaitForSlotEvent(CKF_DONT_BLOCK)")
    ok(m.f.C_Finalize!(nil), "C_Finalize")
    expect(m.f.C_CloseSession!(session), CKR_CRYPTOKI_NOT_INITIALIZED, "C_CloseSession after C_Finalize")
}

/// Operations through one group are served by every member (p11ha's per-member counters).
func spreadScenario(_ m: Module) {
    let s = initialized(m)
    let session = openLoggedIn(m, slot: s, pin: userPIN)
    // An AES key created by value exists on every member, so any member may serve it.
    let t = Template().add(CKA_CLASS, ulong: CK_ULONG(CKO_SECRET_KEY)).add(CKA_KEY_TYPE, ulong: CK_ULONG(CKK_AES))
        .add(CKA_VALUE, [UInt8](repeating: 7, count: 32)).add(CKA_ENCRYPT, bool: true).add(CKA_TOKEN, bool: false)
    var key: CK_OBJECT_HANDLE = 0
    ok(m.f.C_CreateObject!(session, &t.attributes, t.count, &key), "C_CreateObject AES key")
    var block = [UInt8](repeating: 1, count: 16)
    var out = [UInt8](repeating: 0, count: 16)
    var first: [UInt8]? = nil
    for _ in 0..<300 {
        var mech = mechanism(CKM_AES_ECB)
        ok(m.f.C_EncryptInit!(session, &mech, key), "C_EncryptInit")
        var len: CK_ULONG = 16
        ok(m.f.C_Encrypt!(session, &block, 16, &out, &len), "C_Encrypt")
        if let first { check(first == out, "every member encrypts alike") } else { first = out }
    }
    let served = memberCounters(m, s)
    print("served=\(served.map { String($0) }.joined(separator: ","))")
    check(served.count >= 2, "the group has several members")
    check(served.allSatisfy { $0 >= 50 }, "every member served a share of 300 operations: \(served)")
    check(served.reduce(0, +) >= 300, "every operation was counted: \(served)")
    ok(m.f.C_Finalize!(nil), "C_Finalize")
}

/// C_SetPIN and C_InitPIN act on every member.
func pinScenario(_ m: Module) {
    let s = initialized(m)
    var session: CK_SESSION_HANDLE = 0
    ok(m.f.C_OpenSession!(s, CK_FLAGS(CKF_SERIAL_SESSION | CKF_RW_SESSION), nil, nil, &session), "C_OpenSession")
    var pin = Array(userPIN.utf8)
    var changed = Array("changed-\(userPIN)".utf8)
    var so = Array(soPIN.utf8)
    ok(m.f.C_Login!(session, CK_USER_TYPE(CKU_USER), &pin, CK_ULONG(pin.count)), "C_Login")
    expect(m.f.C_SetPIN!(session, &pin, CK_ULONG(pin.count), &changed, CK_ULONG(changed.count)), CKR_OK, "C_SetPIN through the group")
    ok(m.f.C_Logout!(session), "C_Logout")
    expect(m.f.C_Login!(session, CK_USER_TYPE(CKU_USER), &pin, CK_ULONG(pin.count)), CKR_PIN_INCORRECT, "the old PIN no longer works")
    expect(m.f.C_Login!(session, CK_USER_TYPE(CKU_USER), &changed, CK_ULONG(changed.count)), CKR_OK, "the new PIN works")
    ok(m.f.C_Logout!(session), "C_Logout")
    ok(m.f.C_Finalize!(nil), "C_Finalize")

    // Every member, opened directly, has the new PIN; then the SO sets the original back on every member.
    let direct = Module(path: env("SOFTHSM_MODULE") ?? "")
    ok(direct.f.C_Initialize!(nil), "C_Initialize SoftHSM directly")
    for label in (env("P11HA_TEST_MEMBERS") ?? "").split(separator: ",").map(String.init) {
        guard let memberSlot = slot(labelled: label, in: direct) else { fatal("no member \(label)") }
        var ms: CK_SESSION_HANDLE = 0
        ok(direct.f.C_OpenSession!(memberSlot, CK_FLAGS(CKF_SERIAL_SESSION | CKF_RW_SESSION), nil, nil, &ms), "C_OpenSession")
        expect(direct.f.C_Login!(ms, CK_USER_TYPE(CKU_USER), &changed, CK_ULONG(changed.count)), CKR_OK, "\(label) took the new PIN")
        _ = direct.f.C_Logout!(ms)
        _ = direct.f.C_CloseSession!(ms)
    }
    ok(direct.f.C_Finalize!(nil), "C_Finalize SoftHSM")

    let s2 = initialized(m)
    ok(m.f.C_OpenSession!(s2, CK_FLAGS(CKF_SERIAL_SESSION | CKF_RW_SESSION), nil, nil, &session), "C_OpenSession")
    ok(m.f.C_Login!(session, CK_USER_TYPE(CKU_SO), &so, CK_ULONG(so.count)), "SO C_Login")
    expect(m.f.C_InitPIN!(session, &pin, CK_ULONG(pin.count)), CKR_OK, "C_InitPIN through the group")
    ok(m.f.C_Logout!(session), "C_Logout")
    expect(m.f.C_Login!(session, CK_USER_TYPE(CKU_USER), &pin, CK_ULONG(pin.count)), CKR_OK, "the PIN the SO set works on every member")
    ok(m.f.C_Finalize!(nil), "C_Finalize")
}

/// The PKCS#11 3.0 function list: its 2.40 part works as the 2.40 list; C_SessionCancel ends the operations its
/// flags name (the next C_*Init starts afresh, and a digest cancelled after an update leaves no trace of it);
/// C_LoginUser and the message-based functions answer CKR_FUNCTION_NOT_SUPPORTED.
func interface30Scenario(_ m: Module) {
    typealias Get = @convention(c) (UnsafeMutablePointer<CK_CHAR>?, UnsafeMutablePointer<CK_VERSION>?,
                                    UnsafeMutablePointer<UnsafeMutablePointer<CK_INTERFACE>?>?, CK_FLAGS) -> CK_RV
    guard let symbol = m.symbol("C_GetInterface") else { fatal("no C_GetInterface") }
    var three = CK_VERSION(major: 3, minor: 0)
    var found: UnsafeMutablePointer<CK_INTERFACE>? = nil
    ok(unsafeBitCast(symbol, to: Get.self)(nil, &three, &found, 0), "C_GetInterface 3.0")
    guard let f = found?.pointee.pFunctionList?.assumingMemoryBound(to: CK_FUNCTION_LIST_3_0.self).pointee else { fatal("no 3.0 list") }
    let base = f.base
    check(base.version.major == 3 && base.version.minor == 0, "the 3.0 list says 3.0")
    ok(base.C_Initialize!(nil), "C_Initialize through the 3.0 list")
    var info = CK_INFO()
    ok(base.C_GetInfo!(&info), "C_GetInfo through the 3.0 list")
    guard let s = slot(labelled: tokenLabelUnderTest, in: m) else { fatal("no slot") }
    let session = openLoggedIn(m, slot: s, pin: userPIN)

    // Encryption: a second C_EncryptInit is refused while one is active, and works after C_SessionCancel.
    var generate = mechanism(CKM_AES_KEY_GEN)
    let aes = Template().add(CKA_VALUE_LEN, ulong: 16).add(CKA_ENCRYPT, bool: true).add(CKA_SIGN, bool: true).add(CKA_TOKEN, bool: false)
    var key: CK_OBJECT_HANDLE = 0
    ok(base.C_GenerateKey!(session, &generate, &aes.attributes, aes.count, &key), "C_GenerateKey AES")
    var ecb = mechanism(CKM_AES_ECB)
    ok(base.C_EncryptInit!(session, &ecb, key), "C_EncryptInit")
    expect(base.C_EncryptInit!(session, &ecb, key), CKR_OPERATION_ACTIVE, "C_EncryptInit while one is active")
    expect(f.C_SessionCancel!(session, 0), CKR_OK, "C_SessionCancel with no flag")
    expect(base.C_EncryptInit!(session, &ecb, key), CKR_OPERATION_ACTIVE, "no flag cancels nothing")
    expect(f.C_SessionCancel!(session, CK_FLAGS(CKF_DECRYPT | CKF_VERIFY)), CKR_OK, "C_SessionCancel of operations not under way")
    expect(f.C_SessionCancel!(session, CK_FLAGS(CKF_ENCRYPT)), CKR_OK, "C_SessionCancel(CKF_ENCRYPT)")
    var block = [UInt8](repeating: 0x42, count: 16)
    var out = [UInt8](repeating: 0, count: 16)
    var length: CK_ULONG = 16
    expect(base.C_Encrypt!(session, &block, 16, &out, &length), CKR_OPERATION_NOT_INITIALIZED, "C_Encrypt after the cancel")
    for round in 0..<5 {
        ok(base.C_EncryptInit!(session, &ecb, key), "C_EncryptInit after a cancel (round \(round))")
        expect(f.C_SessionCancel!(session, CK_FLAGS(CKF_ENCRYPT | CKF_SIGN)), CKR_OK, "C_SessionCancel(CKF_ENCRYPT | CKF_SIGN)")
    }
    ok(base.C_EncryptInit!(session, &ecb, key), "C_EncryptInit")
    length = 16
    expect(base.C_Encrypt!(session, &block, 16, &out, &length), CKR_OK, "C_Encrypt")
    check(Optional(out) == encryptBlock(m, session, key), "the encryption after the cancels is the key's")

    // A digest cancelled after an update: the next one is of its own input only.
    var sha256 = mechanism(CKM_SHA256)
    var junk = Array("not part of it".utf8)
    ok(base.C_DigestInit!(session, &sha256), "C_DigestInit")
    expect(base.C_DigestUpdate!(session, &junk, CK_ULONG(junk.count)), CKR_OK, "C_DigestUpdate")
    expect(f.C_SessionCancel!(session, CK_FLAGS(CKF_DIGEST)), CKR_OK, "C_SessionCancel(CKF_DIGEST)")
    ok(base.C_DigestInit!(session, &sha256), "C_DigestInit after the cancel")
    var abc = Array("abc".utf8)
    var digest = [UInt8](repeating: 0, count: 32)
    length = 32
    expect(base.C_Digest!(session, &abc, 3, &digest, &length), CKR_OK, "C_Digest")
    check(digest == hexBytes("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"), "SHA-256 of \"abc\" alone")

    // A search.
    let all = Template()
    ok(base.C_FindObjectsInit!(session, &all.attributes, 0), "C_FindObjectsInit")
    expect(f.C_SessionCancel!(session, CK_FLAGS(0x40)), CKR_OK, "C_SessionCancel(CKF_FIND_OBJECTS)")
    var handles = [CK_OBJECT_HANDLE](repeating: 0, count: 4)
    var n: CK_ULONG = 0
    expect(base.C_FindObjects!(session, &handles, 4, &n), CKR_OPERATION_NOT_INITIALIZED, "C_FindObjects after the cancel")
    ok(base.C_FindObjectsInit!(session, &all.attributes, 0), "C_FindObjectsInit after the cancel")
    ok(base.C_FindObjectsFinal!(session), "C_FindObjectsFinal")
    expect(f.C_SessionCancel!(9999, CK_FLAGS(CKF_ENCRYPT)), CKR_SESSION_HANDLE_INVALID, "C_SessionCancel of an unknown session")

    // Operation state: SoftHSM 2.6.1 saves none, and the group answers as it does, leaving the operation be.
    var stateLength: CK_ULONG = 0
    expect(base.C_GetOperationState!(session, nil, &stateLength), CKR_FUNCTION_NOT_SUPPORTED, "C_GetOperationState, no operation")
    ok(base.C_DigestInit!(session, &sha256), "C_DigestInit")
    expect(base.C_DigestUpdate!(session, &abc, 1), CKR_OK, "C_DigestUpdate")
    expect(base.C_GetOperationState!(session, nil, &stateLength), CKR_FUNCTION_NOT_SUPPORTED, "C_GetOperationState of a digest")
    var rest = Array("bc".utf8)
    expect(base.C_DigestUpdate!(session, &rest, 2), CKR_OK, "C_DigestUpdate after it")
    length = 32
    expect(base.C_DigestFinal!(session, &digest, &length), CKR_OK, "C_DigestFinal")
    check(digest == hexBytes("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"), "the digest went on")
    var foreign = Array("a state from elsewhere".utf8)
    expect(base.C_SetOperationState!(session, &foreign, CK_ULONG(foreign.count), 0, 0), CKR_FUNCTION_NOT_SUPPORTED, "C_SetOperationState")

    // What the members (2.40 tokens) cannot do.
    var pin = Array(userPIN.utf8)
    var user = Array("alice".utf8)
    expect(f.C_LoginUser!(session, CK_USER_TYPE(CKU_USER), &pin, CK_ULONG(pin.count), &user, 5), CKR_FUNCTION_NOT_SUPPORTED, "C_LoginUser")
    expect(f.C_LoginUser!(9999, CK_USER_TYPE(CKU_USER), &pin, CK_ULONG(pin.count), &user, 5), CKR_SESSION_HANDLE_INVALID, "C_LoginUser, unknown session")
    var gcm = mechanism(CKM_AES_GCM)
    expect(f.C_MessageEncryptInit!(session, &gcm, key), CKR_FUNCTION_NOT_SUPPORTED, "C_MessageEncryptInit")
    expect(f.C_EncryptMessage!(session, nil, 0, nil, 0, &block, 16, &out, &length), CKR_FUNCTION_NOT_SUPPORTED, "C_EncryptMessage")
    expect(f.C_EncryptMessageBegin!(session, nil, 0, nil, 0), CKR_FUNCTION_NOT_SUPPORTED, "C_EncryptMessageBegin")
    expect(f.C_EncryptMessageNext!(session, nil, 0, &block, 16, &out, &length, 0), CKR_FUNCTION_NOT_SUPPORTED, "C_EncryptMessageNext")
    expect(f.C_MessageEncryptFinal!(session), CKR_FUNCTION_NOT_SUPPORTED, "C_MessageEncryptFinal")
    expect(f.C_MessageDecryptInit!(session, &gcm, key), CKR_FUNCTION_NOT_SUPPORTED, "C_MessageDecryptInit")
    expect(f.C_DecryptMessage!(session, nil, 0, nil, 0, &block, 16, &out, &length), CKR_FUNCTION_NOT_SUPPORTED, "C_DecryptMessage")
    expect(f.C_DecryptMessageBegin!(session, nil, 0, nil, 0), CKR_FUNCTION_NOT_SUPPORTED, "C_DecryptMessageBegin")
    expect(f.C_DecryptMessageNext!(session, nil, 0, &block, 16, &out, &length, 0), CKR_FUNCTION_NOT_SUPPORTED, "C_DecryptMessageNext")
    expect(f.C_MessageDecryptFinal!(session), CKR_FUNCTION_NOT_SUPPORTED, "C_MessageDecryptFinal")
    var cmac = mechanism(CKM_AES_CMAC)
    expect(f.C_MessageSignInit!(session, &cmac, key), CKR_FUNCTION_NOT_SUPPORTED, "C_MessageSignInit")
    expect(f.C_SignMessage!(session, nil, 0, &block, 16, &out, &length), CKR_FUNCTION_NOT_SUPPORTED, "C_SignMessage")
    expect(f.C_SignMessageBegin!(session, nil, 0), CKR_FUNCTION_NOT_SUPPORTED, "C_SignMessageBegin")
    expect(f.C_SignMessageNext!(session, nil, 0, &block, 16, &out, &length), CKR_FUNCTION_NOT_SUPPORTED, "C_SignMessageNext")
    expect(f.C_MessageSignFinal!(session), CKR_FUNCTION_NOT_SUPPORTED, "C_MessageSignFinal")
    expect(f.C_MessageVerifyInit!(session, &cmac, key), CKR_FUNCTION_NOT_SUPPORTED, "C_MessageVerifyInit")
    expect(f.C_VerifyMessage!(session, nil, 0, &block, 16, &out, 16), CKR_FUNCTION_NOT_SUPPORTED, "C_VerifyMessage")
    expect(f.C_VerifyMessageBegin!(session, nil, 0), CKR_FUNCTION_NOT_SUPPORTED, "C_VerifyMessageBegin")
    expect(f.C_VerifyMessageNext!(session, nil, 0, &block, 16, &out, 16), CKR_FUNCTION_NOT_SUPPORTED, "C_VerifyMessageNext")
    expect(f.C_MessageVerifyFinal!(session), CKR_FUNCTION_NOT_SUPPORTED, "C_MessageVerifyFinal")
    ok(base.C_Finalize!(nil), "C_Finalize through the 3.0 list")
}
