// p11ha's cost per call over in-process fake members: what the core adds to a signature, a digest and random
// bytes, with and without the deadline executor (and through one member, where one worker serves every call).
// Not a test: figures for overhead work. The fakes allocate too: compare "deadlines off" with "on" for the executor.
import Benchmark
import CInterop
import Glibc
import P11HA
import P11HAFake

/// A group of three fake members and a logged-in session, as C_Initialize, C_OpenSession and C_Login leave them.
final class Setup {
    let runtime: Runtime
    let session: SessionHandle
    let key: ObjectHandle
    let directory: String

    init(deadlines: Bool, members: Int = 3) throws {
        var template = Array("/tmp/p11ha-overhead.XXXXXX".utf8CString)
        directory = template.withUnsafeMutableBufferPointer { String(cString: mkdtemp($0.baseAddress!)!) }
        let stores = (0..<members).map { FakeTokenStore(label: "member-\($0)", seed: UInt64($0) + 1) }
        let text = """
            [p11ha]
            log = \(directory)/p11ha.log
            lock-dir = \(directory)
            operation-timeout = \(deadlines ? "5s" : "off")
            [group fake]
            label = fake
            \(stores.map { "member = pkcs11:token=\($0.label)?module-path=/fake/\($0.label)" }.joined(separator: "\n"))
            """
        let config = try Config.parse(text, path: directory + "/p11ha.conf")
        let connections = stores.map { $0.connection() }
        runtime = try Runtime.start(config, backends: { member, _, _ in
            let token = connections[stores.firstIndex { $0.label == member.uri.tokenLabel }!]
            return deadlines ? DeadlineBackend(token, timeout: .seconds(5)) : token
        }, backgroundRecovery: false)
        session = try runtime.openSession(0, flags: CK_FLAGS(CKF_SERIAL_SESSION | CKF_RW_SESSION))
        try runtime.login(session, userType: CK_USER_TYPE(CKU_USER), pin: Secret("1234"))
        // A session key: no replication record, so the figures are the call path's alone.
        key = try runtime.createObject(session, [
            Attribute(CKA_CLASS, ulong: CKO_SECRET_KEY), Attribute(CKA_KEY_TYPE, ulong: CKK_GENERIC_SECRET),
            Attribute(CKA_TOKEN, bool: false), Attribute(CKA_SIGN, bool: true), Attribute(CKA_VALUE, [UInt8](repeating: 7, count: 32)),
        ])
    }

    deinit {
        runtime.shutdown()
        _ = system("rm -rf '\(directory)'")
    }
}

let benchmarks: @Sendable () -> Void = {
    Benchmark.defaultConfiguration = .init(metrics: [.wallClock, .mallocCountTotal, .instructions], maxDuration: .seconds(2))
    let single = try! Setup(deadlines: true, members: 1)
    Benchmark("GenerateRandom 32 bytes, one member, deadlines on") { benchmark in
        for _ in benchmark.scaledIterations {
            blackHole(try single.runtime.generateRandom(single.session, count: 32))
        }
    }
    let kilobyte = [UInt8](repeating: 0x5a, count: 1024)
    for deadlines in [false, true] {
        let suffix = deadlines ? "deadlines on" : "deadlines off"
        let setup = try! Setup(deadlines: deadlines)
        Benchmark("HMAC-SHA256 sign of 32 bytes, \(suffix)") { benchmark in
            let data = [UInt8](repeating: 1, count: 32)
            for _ in benchmark.scaledIterations {
                try setup.runtime.operationInit(.sign, setup.session, Mechanism(CK_MECHANISM_TYPE(CKM_SHA256_HMAC)), key: setup.key)
                blackHole(try setup.runtime.singlePart(.sign, setup.session, data, capacity: 64))
            }
        }
        Benchmark("SHA-256 of 1 KiB, \(suffix)") { benchmark in
            for _ in benchmark.scaledIterations {
                try setup.runtime.operationInit(.digest, setup.session, Mechanism(CK_MECHANISM_TYPE(CKM_SHA256)), key: nil)
                blackHole(try setup.runtime.singlePart(.digest, setup.session, kilobyte, capacity: 32))
            }
        }
        Benchmark("GenerateRandom 32 bytes, \(suffix)") { benchmark in
            for _ in benchmark.scaledIterations {
                blackHole(try setup.runtime.generateRandom(setup.session, count: 32))
            }
        }
    }
}
