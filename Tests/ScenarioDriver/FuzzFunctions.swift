// One builder per PKCS#11 function: the call as a value (its arguments as the generator drew them) and how to
// make it on a module. Output, handle and template arguments are resolved when the call is made.
import CInterop
import Glibc

typealias InOutFunction = @convention(c) (CK_SESSION_HANDLE, UnsafeMutablePointer<UInt8>?, CK_ULONG,
                                          UnsafeMutablePointer<UInt8>?, UnsafeMutablePointer<CK_ULONG>?) -> CK_RV
typealias InFunction = @convention(c) (CK_SESSION_HANDLE, UnsafeMutablePointer<UInt8>?, CK_ULONG) -> CK_RV
typealias OutFunction = @convention(c) (CK_SESSION_HANDLE, UnsafeMutablePointer<UInt8>?, UnsafeMutablePointer<CK_ULONG>?) -> CK_RV
typealias InitFunction = @convention(c) (CK_SESSION_HANDLE, UnsafeMutablePointer<CK_MECHANISM>?, CK_OBJECT_HANDLE) -> CK_RV
typealias SessionFunction = @convention(c) (CK_SESSION_HANDLE) -> CK_RV

/// The return value of a call that was not made (the function is not exported, or not made on the reference).
let notMade = CK_RV.max

/// How C_Initialize's argument is drawn.
enum InitializeArgs: String {
    case none = "NULL", osLocking = "CKF_OS_LOCKING_OK", reserved = "pReserved set", someCallbacks = "one mutex callback"
    case callbacksOnly = "mutex callbacks without CKF_OS_LOCKING_OK"
    case cantCreateThreads = "CKF_LIBRARY_CANT_CREATE_OS_THREADS"
}

extension FuzzEpisode {
    func initialize(args: InitializeArgs) -> FuzzCall {
        FuzzCall(function: "C_Initialize", text: "C_Initialize(\(args.rawValue))") { x, a in
            guard args != .none else { return (x.m.f.C_Initialize!(nil), []) }
            var value = CK_C_INITIALIZE_ARGS()
            let create: CK_CREATEMUTEX = { mutex in
                mutex?.pointee = UnsafeMutableRawPointer(bitPattern: 0x1000)
                return CK_RV(CKR_OK)
            }
            let other: CK_DESTROYMUTEX = { _ in CK_RV(CKR_OK) }
            switch args {
            case .none: break
            case .osLocking: value.flags = CK_FLAGS(CKF_OS_LOCKING_OK)
            case .reserved: value.pReserved = UnsafeMutableRawPointer(bitPattern: 8)
            case .someCallbacks: value.CreateMutex = create
            case .callbacksOnly:
                value.CreateMutex = create
                value.DestroyMutex = other
                value.LockMutex = other
                value.UnlockMutex = other
            case .cantCreateThreads: value.flags = CK_FLAGS(CKF_OS_LOCKING_OK | CKF_LIBRARY_CANT_CREATE_OS_THREADS)
            }
            return (x.m.f.C_Initialize!(a.value(value)), [])
        }
    }

    func finalize(reserved: Int?) -> FuzzCall {
        FuzzCall(function: "C_Finalize", text: "C_Finalize(\(reserved == nil ? "NULL" : "non-NULL"))") { x, _ in
            (x.m.f.C_Finalize!(reserved.flatMap { UnsafeMutableRawPointer(bitPattern: $0) }), [])
        }
    }

    func getInfo(null: Bool) -> FuzzCall {
        FuzzCall(function: "C_GetInfo", text: "C_GetInfo(\(null ? "NULL" : "info"))") { x, a in
            (x.m.f.C_GetInfo!(null ? nil : a.value(CK_INFO()).assumingMemoryBound(to: CK_INFO.self)), [])
        }
    }

    func getFunctionList(null: Bool) -> FuzzCall {
        // SoftHSM 2.6.1 dereferences a NULL argument here (SIGSEGV): not made on the reference.
        FuzzCall(function: "C_GetFunctionList", text: "C_GetFunctionList(\(null ? "NULL" : "list"))", notOnReference: null) { x, a in
            let out = a.zeroed(8).assumingMemoryBound(to: UnsafeMutablePointer<CK_FUNCTION_LIST>?.self)
            return (x.m.f.C_GetFunctionList!(null ? nil : out), [])
        }
    }

    func getSlotList(present: Bool, out: FuzzOut) -> FuzzCall {
        FuzzCall(function: "C_GetSlotList", text: "C_GetSlotList(\(present), \(out))") { x, a in
            (out.run(a, x) { p, n in x.m.f.C_GetSlotList!(CK_BBOOL(present ? CK_TRUE : CK_FALSE), p.map { UnsafeMutableRawPointer($0).assumingMemoryBound(to: CK_SLOT_ID.self) }, n) }, [])
        }
    }

    func getSlotInfo(_ slot: SlotRef, null: Bool) -> FuzzCall {
        FuzzCall(function: "C_GetSlotInfo", text: "C_GetSlotInfo(\(slot)\(null ? ", NULL" : ""))") { x, a in
            (x.m.f.C_GetSlotInfo!(x.slot(slot), null ? nil : a.value(CK_SLOT_INFO()).assumingMemoryBound(to: CK_SLOT_INFO.self)), [])
        }
    }

    func getTokenInfo(_ slot: SlotRef, null: Bool) -> FuzzCall {
        FuzzCall(function: "C_GetTokenInfo", text: "C_GetTokenInfo(\(slot)\(null ? ", NULL" : ""))") { x, a in
            (x.m.f.C_GetTokenInfo!(x.slot(slot), null ? nil : a.value(CK_TOKEN_INFO()).assumingMemoryBound(to: CK_TOKEN_INFO.self)), [])
        }
    }

    func getMechanismList(_ slot: SlotRef, _ out: FuzzOut) -> FuzzCall {
        FuzzCall(function: "C_GetMechanismList", text: "C_GetMechanismList(\(slot), \(out))") { x, a in
            (out.run(a, x) { p, n in x.m.f.C_GetMechanismList!(x.slot(slot), p.map { UnsafeMutableRawPointer($0).assumingMemoryBound(to: CK_MECHANISM_TYPE.self) }, n) }, [])
        }
    }

    func getMechanismInfo(_ slot: SlotRef, _ type: CK_MECHANISM_TYPE, null: Bool) -> FuzzCall {
        FuzzCall(function: "C_GetMechanismInfo", text: "C_GetMechanismInfo(\(slot), 0x\(String(type, radix: 16))\(null ? ", NULL" : ""))") { x, a in
            (x.m.f.C_GetMechanismInfo!(x.slot(slot), type, null ? nil : a.value(CK_MECHANISM_INFO()).assumingMemoryBound(to: CK_MECHANISM_INFO.self)), [])
        }
    }

    /// Never with the SO PIN, and never made on the reference (SoftHSM would initialize its free slot).
    func initToken(_ slot: SlotRef, _ pin: FuzzIn, label: Bool) -> FuzzCall {
        FuzzCall(function: "C_InitToken", text: "C_InitToken(\(slot), a wrong SO PIN, \(label ? "a label" : "NULL label"))", notOnReference: true) { x, a in
            let (p, n) = pin.make(a, x)
            let l = label ? a.bytes(Array(String(repeating: " ", count: 32).utf8)) : nil
            return (x.m.f.C_InitToken!(x.slot(slot), p, n, l), [])
        }
    }

    func initPIN(_ s: HandleRef, _ pin: FuzzIn, _ what: String) -> FuzzCall {
        FuzzCall(function: "C_InitPIN", text: "C_InitPIN(\(s), \(what))") { x, a in
            let (p, n) = pin.make(a, x)
            return (x.m.f.C_InitPIN!(x.handle(s), p, n), [])
        }
    }

    func setPIN(_ s: HandleRef, _ old: FuzzIn, _ new: FuzzIn, _ what: String) -> FuzzCall {
        FuzzCall(function: "C_SetPIN", text: "C_SetPIN(\(s), \(what))") { x, a in
            let (o, on) = old.make(a, x)
            let (p, n) = new.make(a, x)
            return (x.m.f.C_SetPIN!(x.handle(s), o, on, p, n), [])
        }
    }

    func openSession(_ slot: SlotRef, flags: CK_FLAGS) -> FuzzCall {
        FuzzCall(function: "C_OpenSession", text: "C_OpenSession(\(slot), flags 0x\(String(flags, radix: 16)))") { x, a in
            let out = a.value(CK_SESSION_HANDLE(0)).assumingMemoryBound(to: CK_SESSION_HANDLE.self)
            let rv = x.m.f.C_OpenSession!(x.slot(slot), flags, nil, nil, out)
            return (rv, rv == CKR_OK ? [out.pointee] : [])
        }
    }

    func closeSession(_ s: HandleRef) -> FuzzCall {
        FuzzCall(function: "C_CloseSession", text: "C_CloseSession(\(s))") { x, _ in (x.m.f.C_CloseSession!(x.handle(s)), []) }
    }

    func closeAllSessions(_ slot: SlotRef) -> FuzzCall {
        FuzzCall(function: "C_CloseAllSessions", text: "C_CloseAllSessions(\(slot))") { x, _ in (x.m.f.C_CloseAllSessions!(x.slot(slot)), []) }
    }

    func getSessionInfo(_ s: HandleRef, null: Bool) -> FuzzCall {
        FuzzCall(function: "C_GetSessionInfo", text: "C_GetSessionInfo(\(s)\(null ? ", NULL" : ""))") { x, a in
            (x.m.f.C_GetSessionInfo!(x.handle(s), null ? nil : a.value(CK_SESSION_INFO()).assumingMemoryBound(to: CK_SESSION_INFO.self)), [])
        }
    }

    func getOperationState(_ s: HandleRef, _ out: FuzzOut) -> FuzzCall {
        FuzzCall(function: "C_GetOperationState", text: "C_GetOperationState(\(s), \(out))") { x, a in
            (out.run(a, x) { p, n in x.m.f.C_GetOperationState!(x.handle(s), p, n) }, [])
        }
    }

    func setOperationState(_ s: HandleRef, _ state: FuzzIn, _ encryption: HandleRef, _ authentication: HandleRef) -> FuzzCall {
        FuzzCall(function: "C_SetOperationState", text: "C_SetOperationState(\(s), \(state), \(encryption), \(authentication))") { x, a in
            let (p, n) = state.make(a, x)
            return (x.m.f.C_SetOperationState!(x.handle(s), p, n, x.handle(encryption), x.handle(authentication)), [])
        }
    }

    func login(_ s: HandleRef, _ userType: CK_USER_TYPE, _ pin: FuzzIn, pinText: String) -> FuzzCall {
        FuzzCall(function: "C_Login", text: "C_Login(\(s), user type \(userType), \(pinText))") { x, a in
            let (p, n) = pin.make(a, x)
            return (x.m.f.C_Login!(x.handle(s), userType, p, n), [])
        }
    }

    func logout(_ s: HandleRef) -> FuzzCall {
        FuzzCall(function: "C_Logout", text: "C_Logout(\(s))") { x, _ in (x.m.f.C_Logout!(x.handle(s)), []) }
    }

    // MARK: objects

    func createObject(_ s: HandleRef, _ template: TemplateSpec) -> FuzzCall {
        FuzzCall(function: "C_CreateObject", text: "C_CreateObject(\(s), \(template))") { x, a in
            let (t, n) = template.make(a)
            let out = a.value(CK_OBJECT_HANDLE(0)).assumingMemoryBound(to: CK_OBJECT_HANDLE.self)
            let rv = x.m.f.C_CreateObject!(x.handle(s), t, n, out)
            return (rv, rv == CKR_OK ? [out.pointee] : [])
        }
    }

    func copyObject(_ s: HandleRef, _ object: HandleRef, _ template: TemplateSpec) -> FuzzCall {
        FuzzCall(function: "C_CopyObject", text: "C_CopyObject(\(s), \(object), \(template))") { x, a in
            let (t, n) = template.make(a)
            let out = a.value(CK_OBJECT_HANDLE(0)).assumingMemoryBound(to: CK_OBJECT_HANDLE.self)
            let rv = x.m.f.C_CopyObject!(x.handle(s), x.handle(object), t, n, out)
            return (rv, rv == CKR_OK ? [out.pointee] : [])
        }
    }

    func destroyObject(_ s: HandleRef, _ object: HandleRef) -> FuzzCall {
        FuzzCall(function: "C_DestroyObject", text: "C_DestroyObject(\(s), \(object))") { x, _ in
            (x.m.f.C_DestroyObject!(x.handle(s), x.handle(object)), [])
        }
    }

    func getObjectSize(_ s: HandleRef, _ object: HandleRef, nullSize: Bool) -> FuzzCall {
        FuzzCall(function: "C_GetObjectSize", text: "C_GetObjectSize(\(s), \(object)\(nullSize ? ", NULL" : ""))") { x, a in
            (x.m.f.C_GetObjectSize!(x.handle(s), x.handle(object), nullSize ? nil : a.value(CK_ULONG(0)).assumingMemoryBound(to: CK_ULONG.self)), [])
        }
    }

    func getAttributeValue(_ s: HandleRef, _ object: HandleRef, _ queries: QueriesSpec) -> FuzzCall {
        FuzzCall(function: "C_GetAttributeValue", text: "C_GetAttributeValue(\(s), \(object), \(queries))") { x, a in
            let (t, n) = queries.make(a, x)
            return (x.m.f.C_GetAttributeValue!(x.handle(s), x.handle(object), t, n), [])
        }
    }

    func setAttributeValue(_ s: HandleRef, _ object: HandleRef, _ template: TemplateSpec) -> FuzzCall {
        FuzzCall(function: "C_SetAttributeValue", text: "C_SetAttributeValue(\(s), \(object), \(template))") { x, a in
            let (t, n) = template.make(a)
            return (x.m.f.C_SetAttributeValue!(x.handle(s), x.handle(object), t, n), [])
        }
    }

    func findObjectsInit(_ s: HandleRef, _ template: TemplateSpec) -> FuzzCall {
        FuzzCall(function: "C_FindObjectsInit", text: "C_FindObjectsInit(\(s), \(template))") { x, a in
            let (t, n) = template.make(a)
            return (x.m.f.C_FindObjectsInit!(x.handle(s), t, n), [])
        }
    }

    /// Up to `max` handles into an array of 64 (a larger `max` is a claim the module answers within what it has).
    func findObjects(_ s: HandleRef, max: CK_ULONG, array: Bool) -> FuzzCall {
        FuzzCall(function: "C_FindObjects", text: "C_FindObjects(\(s), max \(max)\(array ? "" : ", NULL array"))") { x, a in
            let room = Swift.max(Int(Swift.min(max, 4096)), 1)
            let handles = a.zeroed(room * 8).assumingMemoryBound(to: CK_OBJECT_HANDLE.self)
            let count = a.value(CK_ULONG(0)).assumingMemoryBound(to: CK_ULONG.self)
            let rv = x.m.f.C_FindObjects!(x.handle(s), array ? handles : nil, max, count)
            return (rv, rv == CKR_OK ? Array(UnsafeBufferPointer(start: handles, count: Swift.min(Int(count.pointee), room))) : [])
        }
    }

    func findObjectsFinal(_ s: HandleRef) -> FuzzCall {
        FuzzCall(function: "C_FindObjectsFinal", text: "C_FindObjectsFinal(\(s))") { x, _ in (x.m.f.C_FindObjectsFinal!(x.handle(s)), []) }
    }

    // MARK: operations

    func operationInit(_ name: String, _ path: KeyPath<CK_FUNCTION_LIST, InitFunction?>, _ s: HandleRef, _ mech: MechSpec,
                       _ key: HandleRef) -> FuzzCall {
        FuzzCall(function: name, text: "\(name)(\(s), \(mech), \(key))") { x, a in
            (mech.run(a, x) { m in x.m.f[keyPath: path]!(x.handle(s), m, x.handle(key)) }, [])
        }
    }

    func digestInit(_ s: HandleRef, _ mech: MechSpec) -> FuzzCall {
        FuzzCall(function: "C_DigestInit", text: "C_DigestInit(\(s), \(mech))") { x, a in
            (mech.run(a, x) { m in x.m.f.C_DigestInit!(x.handle(s), m) }, [])
        }
    }

    func singlePart(_ name: String, _ path: KeyPath<CK_FUNCTION_LIST, InOutFunction?>, _ s: HandleRef, _ input: FuzzIn,
                    _ out: FuzzOut) -> FuzzCall {
        FuzzCall(function: name, text: "\(name)(\(s), \(input), \(out))") { x, a in
            let (p, n) = input.make(a, x)
            return (out.run(a, x) { o, l in x.m.f[keyPath: path]!(x.handle(s), p, n, o, l) }, [])
        }
    }

    func update(_ name: String, _ path: KeyPath<CK_FUNCTION_LIST, InFunction?>, _ s: HandleRef, _ input: FuzzIn) -> FuzzCall {
        FuzzCall(function: name, text: "\(name)(\(s), \(input))") { x, a in
            let (p, n) = input.make(a, x)
            return (x.m.f[keyPath: path]!(x.handle(s), p, n), [])
        }
    }

    func final(_ name: String, _ path: KeyPath<CK_FUNCTION_LIST, OutFunction?>, _ s: HandleRef, _ out: FuzzOut) -> FuzzCall {
        FuzzCall(function: name, text: "\(name)(\(s), \(out))") { x, a in
            (out.run(a, x) { o, l in x.m.f[keyPath: path]!(x.handle(s), o, l) }, [])
        }
    }

    func digestKey(_ s: HandleRef, _ key: HandleRef) -> FuzzCall {
        FuzzCall(function: "C_DigestKey", text: "C_DigestKey(\(s), \(key))") { x, _ in (x.m.f.C_DigestKey!(x.handle(s), x.handle(key)), []) }
    }

    func verify(_ s: HandleRef, _ data: FuzzIn, _ signature: FuzzIn) -> FuzzCall {
        FuzzCall(function: "C_Verify", text: "C_Verify(\(s), \(data), signature \(signature))") { x, a in
            let (p, n) = data.make(a, x)
            let (q, m) = signature.make(a, x)
            return (x.m.f.C_Verify!(x.handle(s), p, n, q, m), [])
        }
    }

    func verifyFinal(_ s: HandleRef, _ signature: FuzzIn) -> FuzzCall {
        update("C_VerifyFinal", \.C_VerifyFinal, s, signature)
    }

    func getFunctionStatus(_ name: String, _ path: KeyPath<CK_FUNCTION_LIST, SessionFunction?>, _ s: HandleRef) -> FuzzCall {
        FuzzCall(function: name, text: "\(name)(\(s))") { x, _ in (x.m.f[keyPath: path]!(x.handle(s)), []) }
    }

    func waitForSlotEvent(flags: CK_FLAGS, reserved: Bool) -> FuzzCall {
        FuzzCall(function: "C_WaitForSlotEvent", text: "C_WaitForSlotEvent(flags 0x\(String(flags, radix: 16))\(reserved ? ", pReserved set" : ""))") { x, a in
            let slot = a.value(CK_SLOT_ID(0)).assumingMemoryBound(to: CK_SLOT_ID.self)
            return (x.m.f.C_WaitForSlotEvent!(flags, slot, reserved ? UnsafeMutableRawPointer(bitPattern: 8) : nil), [])
        }
    }

    // MARK: keys and random

    func generateKey(_ s: HandleRef, _ mech: MechSpec, _ template: TemplateSpec) -> FuzzCall {
        FuzzCall(function: "C_GenerateKey", text: "C_GenerateKey(\(s), \(mech), \(template))") { x, a in
            let (t, n) = template.make(a)
            let out = a.value(CK_OBJECT_HANDLE(0)).assumingMemoryBound(to: CK_OBJECT_HANDLE.self)
            let rv = mech.run(a, x) { m in x.m.f.C_GenerateKey!(x.handle(s), m, t, n, out) }
            return (rv, rv == CKR_OK ? [out.pointee] : [])
        }
    }

    func generateKeyPair(_ s: HandleRef, _ mech: MechSpec, _ publicTemplate: TemplateSpec, _ privateTemplate: TemplateSpec) -> FuzzCall {
        FuzzCall(function: "C_GenerateKeyPair", text: "C_GenerateKeyPair(\(s), \(mech), \(publicTemplate), \(privateTemplate))") { x, a in
            let (pt, pn) = publicTemplate.make(a)
            let (qt, qn) = privateTemplate.make(a)
            let pub = a.value(CK_OBJECT_HANDLE(0)).assumingMemoryBound(to: CK_OBJECT_HANDLE.self)
            let priv = a.value(CK_OBJECT_HANDLE(0)).assumingMemoryBound(to: CK_OBJECT_HANDLE.self)
            let rv = mech.run(a, x) { m in x.m.f.C_GenerateKeyPair!(x.handle(s), m, pt, pn, qt, qn, pub, priv) }
            return (rv, rv == CKR_OK ? [pub.pointee, priv.pointee] : [])
        }
    }

    func wrapKey(_ s: HandleRef, _ mech: MechSpec, _ wrapping: HandleRef, _ key: HandleRef, _ out: FuzzOut) -> FuzzCall {
        FuzzCall(function: "C_WrapKey", text: "C_WrapKey(\(s), \(mech), \(wrapping), \(key), \(out))") { x, a in
            (mech.run(a, x) { m in out.run(a, x) { o, l in x.m.f.C_WrapKey!(x.handle(s), m, x.handle(wrapping), x.handle(key), o, l) } }, [])
        }
    }

    func unwrapKey(_ s: HandleRef, _ mech: MechSpec, _ unwrapping: HandleRef, _ wrapped: FuzzIn, _ template: TemplateSpec) -> FuzzCall {
        FuzzCall(function: "C_UnwrapKey", text: "C_UnwrapKey(\(s), \(mech), \(unwrapping), \(wrapped), \(template))") { x, a in
            let (w, wn) = wrapped.make(a, x)
            let (t, n) = template.make(a)
            let out = a.value(CK_OBJECT_HANDLE(0)).assumingMemoryBound(to: CK_OBJECT_HANDLE.self)
            let rv = mech.run(a, x) { m in x.m.f.C_UnwrapKey!(x.handle(s), m, x.handle(unwrapping), w, wn, t, n, out) }
            return (rv, rv == CKR_OK ? [out.pointee] : [])
        }
    }

    func deriveKey(_ s: HandleRef, _ mech: MechSpec, _ base: HandleRef, _ template: TemplateSpec) -> FuzzCall {
        FuzzCall(function: "C_DeriveKey", text: "C_DeriveKey(\(s), \(mech), \(base), \(template))") { x, a in
            let (t, n) = template.make(a)
            let out = a.value(CK_OBJECT_HANDLE(0)).assumingMemoryBound(to: CK_OBJECT_HANDLE.self)
            let rv = mech.run(a, x) { m in x.m.f.C_DeriveKey!(x.handle(s), m, x.handle(base), t, n, out) }
            return (rv, rv == CKR_OK ? [out.pointee] : [])
        }
    }

    /// `buffer`: the caller's buffer, as many bytes as it asks for (or NULL with a length).
    func generateRandom(_ s: HandleRef, _ buffer: FuzzIn) -> FuzzCall {
        FuzzCall(function: "C_GenerateRandom", text: "C_GenerateRandom(\(s), \(buffer))") { x, a in
            let (p, n) = buffer.make(a, x)
            return (x.m.f.C_GenerateRandom!(x.handle(s), p, n), [])
        }
    }

    // MARK: PKCS#11 3.0 interfaces (not every module exports them)

    func interfaceList(_ out: FuzzOut) -> FuzzCall {
        FuzzCall(function: "C_GetInterfaceList", text: "C_GetInterfaceList(\(out))") { x, a in
            typealias GetList = @convention(c) (UnsafeMutablePointer<CK_INTERFACE>?, UnsafeMutablePointer<CK_ULONG>?) -> CK_RV
            guard let symbol = x.m.symbol("C_GetInterfaceList") else { return (notMade, []) }
            let get = unsafeBitCast(symbol, to: GetList.self)
            return (out.run(a, x) { p, n in get(p.map { UnsafeMutableRawPointer($0).assumingMemoryBound(to: CK_INTERFACE.self) }, n) }, [])
        }
    }

    func interface(name: String?, version: (UInt8, UInt8)?, flags: CK_FLAGS, nullResult: Bool) -> FuzzCall {
        let shown = "C_GetInterface(\(name.map { "\"\($0)\"" } ?? "NULL"), \(version.map { "\($0.0).\($0.1)" } ?? "NULL"), flags \(flags)\(nullResult ? ", NULL result" : ""))"
        return FuzzCall(function: "C_GetInterface", text: shown) { x, a in
            typealias Get = @convention(c) (UnsafeMutablePointer<CK_CHAR>?, UnsafeMutablePointer<CK_VERSION>?,
                                            UnsafeMutablePointer<UnsafeMutablePointer<CK_INTERFACE>?>?, CK_FLAGS) -> CK_RV
            guard let symbol = x.m.symbol("C_GetInterface") else { return (notMade, []) }
            let get = unsafeBitCast(symbol, to: Get.self)
            let n = name.map { a.bytes(Array($0.utf8) + [0]) }
            let v = version.map { a.value(CK_VERSION(major: $0.0, minor: $0.1)).assumingMemoryBound(to: CK_VERSION.self) }
            let result = a.zeroed(8).assumingMemoryBound(to: UnsafeMutablePointer<CK_INTERFACE>?.self)
            return (get(n, v, nullResult ? nil : result, flags), [])
        }
    }
}
