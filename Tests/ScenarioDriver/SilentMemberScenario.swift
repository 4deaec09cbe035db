// A member whose server accepts connections and never answers: every call through the group returns in time.
import CInterop
import Glibc
import Synchronization

/// C_Initialize, finding the slot, C_OpenSession, C_Login, a signature with the key "K" (made before the test
/// started), C_CreateObject of a data object and C_Finalize, each timed: each must return, served by the other
/// members, within the operation-timeout (P11HA_TEST_OPERATION_TIMEOUT seconds) plus one second. A call that
/// does not return at all ends the run five seconds after that, with its name, rather than hanging.
func silentMemberScenario(_ m: Module) {
    guard let timeout = env("P11HA_TEST_OPERATION_TIMEOUT").flatMap(Double.init) else {
        fatal("P11HA_TEST_OPERATION_TIMEOUT is not set")
    }
    let bound = timeout + 1
    let f = m.f

    func timed<T>(_ name: String, _ call: () -> T) -> T {
        say("calling \(name)")
        watch(name, seconds: bound + 5)
        let start = monotonicSeconds()
        let result = call()
        let elapsed = monotonicSeconds() - start
        unwatch()
        say("duration \(name) \(Double(Int(elapsed * 1000)) / 1000) s")
        check(elapsed <= bound, "\(name) returns within operation-timeout + 1 s (\(bound) s): it took \(elapsed) s")
        return result
    }

    ok(timed("C_Initialize") { f.C_Initialize!(nil) }, "C_Initialize")
    guard let s = timed("C_GetSlotList", { slot(labelled: tokenLabelUnderTest, in: m) }) else {
        fatal("no token labelled \(tokenLabelUnderTest)")
    }
    var session: CK_SESSION_HANDLE = 0
    ok(timed("C_OpenSession") { f.C_OpenSession!(s, CK_FLAGS(CKF_SERIAL_SESSION | CKF_RW_SESSION), nil, nil, &session) },
       "C_OpenSession")
    var pin = Array(userPIN.utf8)
    ok(timed("C_Login") { f.C_Login!(session, CK_USER_TYPE(CKU_USER), &pin, CK_ULONG(pin.count)) }, "C_Login")

    let keys = timed("C_FindObjects") {
        find(m, session, Template().add(CKA_LABEL, string: "K").add(CKA_CLASS, ulong: CK_ULONG(CKO_PRIVATE_KEY)))
    }
    guard keys.count == 1 else { fatal("\(keys.count) private keys labelled K, expected 1") }
    var digest = [UInt8](repeating: 7, count: 32)
    var signature = [UInt8](repeating: 0, count: 64)
    var length = CK_ULONG(signature.count)
    var ecdsa = mechanism(CKM_ECDSA)
    let signed = timed("C_SignInit+C_Sign") { () -> CK_RV in
        let rv = f.C_SignInit!(session, &ecdsa, keys[0])
        return rv == CKR_OK ? f.C_Sign!(session, &digest, CK_ULONG(digest.count), &signature, &length) : rv
    }
    expect(signed, CKR_OK, "a signature with one member silent")

    let data = Template().add(CKA_CLASS, ulong: CK_ULONG(CKO_DATA)).add(CKA_TOKEN, bool: true)
        .add(CKA_LABEL, string: "silent-\(getpid())").add(CKA_VALUE, string: "written while a member is silent")
    var object: CK_OBJECT_HANDLE = 0
    expect(timed("C_CreateObject") { f.C_CreateObject!(session, &data.attributes, data.count, &object) }, CKR_OK,
           "a token object written with one member silent")

    expect(timed("C_Finalize") { f.C_Finalize!(nil) }, CKR_OK, "C_Finalize")
}

/// Prints a line and flushes it, so that a test that kills a hung run still sees how far it got.
private func say(_ line: String) {
    print(line)
    fflush(nil)
}

/// The call being timed and when it is given up for hung; nil between calls.
private let watched = Mutex<(name: String, started: Double, seconds: Double)?>(nil)

/// Gives `name` `seconds` to return: after that, "FAIL NAME did not return within N s (hung)" on stdout and exit
/// status 1. A watchdog thread does it: a signal would not do, the thread inside the call may block signals.
private func watch(_ name: String, seconds: Double) {
    startWatchdog
    watched.withLock { $0 = (name, monotonicSeconds(), seconds) }
}

private func unwatch() {
    watched.withLock { $0 = nil }
}

private let startWatchdog: Void = {
    var thread = pthread_t()
    let rc = pthread_create(&thread, nil, { _ in
        while true {
            usleep(50_000)
            if let (name, started, seconds) = watched.withLock({ $0 }), monotonicSeconds() - started > seconds {
                print("FAIL \(name) did not return within \(seconds) s (hung)")
                fflush(nil)
                _exit(1)
            }
        }
    }, nil)
    if rc != 0 { fatal("pthread_create: \(rc)") }
}()
