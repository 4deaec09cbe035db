// The driver's harness: loads a PKCS#11 module by dlopen, as any C application would, and records checks.
import CInterop
import Glibc

typealias FL = CK_FUNCTION_LIST

struct Module {
    let f: FL
    let handle: UnsafeMutableRawPointer

    init(path: String) {
        guard let handle = dlopen(path, RTLD_NOW | RTLD_LOCAL) else { fatal("dlopen \(path): \(String(cString: dlerror()))") }
        guard let symbol = dlsym(handle, "C_GetFunctionList") else { fatal("no C_GetFunctionList in \(path)") }
        typealias Get = @convention(c) (UnsafeMutablePointer<UnsafeMutablePointer<CK_FUNCTION_LIST>?>?) -> CK_RV
        var list: UnsafeMutablePointer<CK_FUNCTION_LIST>? = nil
        let rv = unsafeBitCast(symbol, to: Get.self)(&list)
        guard rv == CKR_OK, let list else { fatal("C_GetFunctionList: \(rv)") }
        self.f = list.pointee
        self.handle = handle
    }

    func symbol(_ name: String) -> UnsafeMutableRawPointer? { dlsym(handle, name) }
}

/// One number per member of a slot's group from one of p11ha's extensions (p11ha_member_states,
/// p11ha_member_counters), which follow the two-call convention on their count.
func memberFigures(_ m: Module, _ s: CK_SLOT_ID, _ name: String) -> [CK_ULONG] {
    typealias Figures = @convention(c) (CK_SLOT_ID, UnsafeMutablePointer<CK_ULONG>?, UnsafeMutablePointer<CK_ULONG>?) -> CK_RV
    guard let symbol = m.symbol(name) else { fatal("\(name) is not exported") }
    let figures = unsafeBitCast(symbol, to: Figures.self)
    var count: CK_ULONG = 0
    ok(figures(s, nil, &count), "\(name) length")
    var values = [CK_ULONG](repeating: 0, count: Int(count))
    ok(figures(s, &values, &count), name)
    return values
}

func monotonicSeconds() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
}

/// Polls `condition` every 50 ms for at most `seconds`; whether it came to hold.
func pollUntil(seconds: Double, _ condition: () -> Bool) -> Bool {
    let start = monotonicSeconds()
    while monotonicSeconds() - start < seconds {
        if condition() { return true }
        usleep(50_000)
    }
    return condition()
}

func fatal(_ message: String) -> Never {
    print("FATAL \(message)")
    exit(2)
}

nonisolated(unsafe) var failures = 0
nonisolated(unsafe) var checks = 0

/// Checks one return value against the one the specification requires.
@discardableResult
func expect(_ rv: CK_RV, _ expected: CK_RV, _ what: String, line: Int = #line) -> Bool {
    checks += 1
    if rv == expected { return true }
    failures += 1
    print("FAIL line \(line): \(what): got 0x\(String(rv, radix: 16)), expected 0x\(String(expected, radix: 16))")
    return false
}

@discardableResult
func check(_ condition: Bool, _ what: String, line: Int = #line) -> Bool {
    checks += 1
    if condition { return true }
    failures += 1
    print("FAIL line \(line): \(what)")
    return false
}

func ok(_ rv: CK_RV, _ what: String, line: Int = #line) {
    if !expect(rv, CK_RV(CKR_OK), what, line: line) { fatal("cannot go on after \(what)") }
}

func env(_ name: String) -> String? { getenv(name).map { String(cString: $0) } }

/// Attribute templates whose values stay alive for the duration of a call.
final class Template {
    private var buffers: [UnsafeMutableRawBufferPointer] = []
    var attributes: [CK_ATTRIBUTE] = []

    init() {}

    deinit { for b in buffers { b.deallocate() } }

    @discardableResult
    func add(_ type: CK_ATTRIBUTE_TYPE, _ bytes: [UInt8]) -> Template {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: max(bytes.count, 1), alignment: 8)
        buffer.copyBytes(from: bytes)
        buffers.append(buffer)
        attributes.append(CK_ATTRIBUTE(type: type, pValue: buffer.baseAddress, ulValueLen: CK_ULONG(bytes.count)))
        return self
    }

    @discardableResult
    func add(_ type: CK_ATTRIBUTE_TYPE, ulong: CK_ULONG) -> Template { add(type, withUnsafeBytes(of: ulong) { Array($0) }) }
    @discardableResult
    func add(_ type: CK_ATTRIBUTE_TYPE, bool: Bool) -> Template { add(type, [bool ? 1 : 0]) }
    @discardableResult
    func add(_ type: CK_ATTRIBUTE_TYPE, string: String) -> Template { add(type, Array(string.utf8)) }

    var count: CK_ULONG { CK_ULONG(attributes.count) }
}

/// A plain session on a slot, logged in as the user.
func openLoggedIn(_ m: Module, slot: CK_SLOT_ID, pin: String, rw: Bool = true) -> CK_SESSION_HANDLE {
    var session: CK_SESSION_HANDLE = 0
    ok(m.f.C_OpenSession!(slot, CK_FLAGS(CKF_SERIAL_SESSION) | (rw ? CK_FLAGS(CKF_RW_SESSION) : 0), nil, nil, &session), "C_OpenSession")
    var p = Array(pin.utf8)
    let rv = m.f.C_Login!(session, CK_USER_TYPE(CKU_USER), &p, CK_ULONG(p.count))
    if rv != CKR_USER_ALREADY_LOGGED_IN { ok(rv, "C_Login") }
    return session
}

/// Every object handle matching a template.
func find(_ m: Module, _ session: CK_SESSION_HANDLE, _ t: Template) -> [CK_OBJECT_HANDLE] {
    ok(m.f.C_FindObjectsInit!(session, &t.attributes, t.count), "C_FindObjectsInit")
    var all: [CK_OBJECT_HANDLE] = []
    var batch = [CK_OBJECT_HANDLE](repeating: 0, count: 3)
    while true {
        var n: CK_ULONG = 0
        ok(m.f.C_FindObjects!(session, &batch, CK_ULONG(batch.count), &n), "C_FindObjects")
        if n == 0 { break }
        all += batch.prefix(Int(n))
    }
    ok(m.f.C_FindObjectsFinal!(session), "C_FindObjectsFinal")
    return all
}

func attribute(_ m: Module, _ session: CK_SESSION_HANDLE, _ object: CK_OBJECT_HANDLE, _ type: CK_ATTRIBUTE_TYPE) -> [UInt8]? {
    var a = CK_ATTRIBUTE(type: CK_ATTRIBUTE_TYPE(type), pValue: nil, ulValueLen: 0)
    guard m.f.C_GetAttributeValue!(session, object, &a, 1) == CKR_OK, a.ulValueLen != CK_ULONG.max else { return nil }
    var value = [UInt8](repeating: 0, count: Int(a.ulValueLen))
    return value.withUnsafeMutableBytes { raw -> [UInt8]? in
        a.pValue = raw.baseAddress
        guard m.f.C_GetAttributeValue!(session, object, &a, 1) == CKR_OK else { return nil }
        return Array(raw.prefix(Int(a.ulValueLen)))
    }
}

/// The slot whose token has this label.
func slot(labelled label: String, in m: Module) -> CK_SLOT_ID? {
    var count: CK_ULONG = 0
    guard m.f.C_GetSlotList!(CK_BBOOL(CK_TRUE), nil, &count) == CKR_OK else { return nil }
    var slots = [CK_SLOT_ID](repeating: 0, count: Int(count))
    guard m.f.C_GetSlotList!(CK_BBOOL(CK_TRUE), &slots, &count) == CKR_OK else { return nil }
    for s in slots.prefix(Int(count)) {
        var info = CK_TOKEN_INFO()
        if m.f.C_GetTokenInfo!(s, &info) == CKR_OK, tokenLabel(info) == label { return s }
    }
    return nil
}

func tokenLabel(_ info: CK_TOKEN_INFO) -> String {
    withUnsafeBytes(of: info.label) { String(decoding: $0, as: UTF8.self) }.trimmingSpaces
}

extension String {
    var trimmingSpaces: String {
        var s = Substring(self)
        while s.last == " " || s.last == "\0" { s.removeLast() }
        return String(s)
    }
}

func mechanism(_ type: CK_MECHANISM_TYPE) -> CK_MECHANISM { CK_MECHANISM(mechanism: type, pParameter: nil, ulParameterLen: 0) }

/// EC P-256 parameters (the curve's OID, DER).
let p256: [UInt8] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07]
