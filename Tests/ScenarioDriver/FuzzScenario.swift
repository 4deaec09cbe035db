// The C ABI fuzzer. `fuzz` runs episodes, each in a process of its own (`fuzz-episode`), for
// P11HA_FUZZ_SECONDS, or the one episode P11HA_FUZZ_SEED names, and fails on:
// - a crash or abort (each call is printed before it is made: p11ha's threads, where member calls run, block
//   signals, so a member that crashes there takes the process without a handler; the runner shows the last),
// - a hang: a call that does not return within the operation-timeout plus P11HA_FUZZ_HANG_MARGIN seconds,
// - a member leaving service, or memory past 1 GiB,
// - a return value the specification does not list for the function (SpecReturnValues.swift), unless SoftHSM
//   gives the same code to the same call directly (the same episode run on a token of its own,
//   P11HA_FUZZ_REFERENCE_TOKEN: then it is the member's answer passed through), or `allowedUnlisted` says why,
// - p11ha's own objects (replication key, records) gone or changed on a member after an episode.
// Every failure names its episode's seed; `scripts/fuzz --seed N` replays that episode exactly, call by call.
import CInterop
import Glibc
import Synchronization

/// Codes outside a function's list that p11ha gives on purpose, with the reason. Keep it short.
let allowedUnlisted: [(function: String, rv: CK_RV, reason: String)] = [
    (function: "C_EncryptInit", rv: CK_RV(CKR_ARGUMENTS_BAD),
     reason: "the specification lists it for C_DecryptInit, C_SignInit and C_VerifyInit but not C_EncryptInit; p11ha answers "
        + "it for a NULL mechanism pointer, and passes on SoftHSM's for OAEP parameters it refuses (source not CKZ_DATA_SPECIFIED)"),
    (function: "C_DeriveKey", rv: CK_RV(CKR_KEY_FUNCTION_NOT_PERMITTED),
     reason: "SoftHSM's answer for a base key without CKA_DERIVE, passed through; C_DeriveKey's list lacks it, though the code "
        + "says just that (a key used for a purpose its attributes do not allow)"),
]

struct FuzzSettings {
    let seconds = Double(env("P11HA_FUZZ_SECONDS") ?? "") ?? 60
    let seed = env("P11HA_FUZZ_SEED").flatMap { UInt64($0) }
    let baseSeed = env("P11HA_FUZZ_BASE_SEED").flatMap { UInt64($0) }
    let steps = Int(env("P11HA_FUZZ_STEPS") ?? "") ?? 300
    /// A function episodes call more often (FuzzEpisode's focus).
    let focus = env("P11HA_FUZZ_FOCUS").flatMap { $0.isEmpty ? nil : $0 }
    let referenceToken = env("P11HA_FUZZ_REFERENCE_TOKEN")
    let reference = env("P11HA_FUZZ_REFERENCE") == "1"
    let trace = env("P11HA_FUZZ_TRACE") == "1"
    /// A call is a hang past the operation-timeout plus this margin.
    let hangSeconds = (Double(env("P11HA_TEST_OPERATION_TIMEOUT") ?? "") ?? 5) + (Double(env("P11HA_FUZZ_HANG_MARGIN") ?? "") ?? 10)
    let memoryLimit = 1 << 30
    /// For the fuzzer's own test: the episode kills itself with SIGSEGV before this step, as a crash would.
    let crashAt = env("P11HA_FUZZ_SELF_TEST_CRASH_AT").flatMap { Int($0) }
}

// MARK: one episode

func fuzzEpisodeScenario(_ m: Module) {
    let settings = FuzzSettings()
    guard let seed = settings.seed else { fatal("fuzz-episode needs P11HA_FUZZ_SEED") }
    CrashRecord.install()
    let label = settings.reference ? (settings.referenceToken ?? "") : tokenLabelUnderTest
    guard m.f.C_Initialize!(nil) == CKR_OK, let slot = slot(labelled: label, in: m) else { fatal("no token labelled \(label)") }
    var count: CK_ULONG = 0
    _ = m.f.C_GetSlotList!(CK_BBOOL(CK_FALSE), nil, &count)
    var slots = [CK_SLOT_ID](repeating: 0, count: Int(count))
    _ = m.f.C_GetSlotList!(CK_BBOOL(CK_FALSE), &slots, &count)
    _ = m.f.C_Finalize!(nil)

    let episode = FuzzEpisode(seed: seed, steps: settings.steps, userPIN: userPIN, soPIN: soPIN, focus: settings.focus)
    let x = FuzzExecutor(m, slot: slot, allSlots: Array(slots.prefix(Int(count))), reserved: ReservedBuffer())
    let watchdog = Watchdog(limit: settings.hangSeconds)
    let states = settings.reference ? nil : m.symbol("p11ha_member_states")
    var memberOut = false
    var memoryOver = false
    for (step, call) in episode.calls.enumerated() {
        if settings.reference && call.notOnReference {
            emitLine("RV \(step) \(notMade)")
            continue
        }
        let line = "seed=\(seed) step=\(step) \(call.text)"
        CrashRecord.record(line)
        emitLine("step \(step): \(call.text)")
        if step == settings.crashAt { raise(SIGSEGV) }
        x.step = step
        watchdog.begin(line)
        let (rv, made) = call.run(x, Arena())
        watchdog.end()
        x.record(step, made)
        if settings.trace { emitLine("  -> \(codeName(rv))" + (made.isEmpty ? "" : " \(made)")) }
        if settings.reference {
            emitLine("RV \(step) \(rv)")
            continue
        }
        if rv != notMade && !specificationAllows(call.function, rv) {
            emitLine("UNLISTED \(step) \(call.function) \(rv) \(call.text)")
        }
        if !memoryOver && peakResidentBytes() > settings.memoryLimit {
            memoryOver = true
            check(false, "seed=\(seed) step=\(step): memory passed \(settings.memoryLimit >> 20) MiB after \(call.text)")
        }
        if !memberOut, let states, let figures = memberStates(states, x.slot), figures.contains(where: { $0 != 0 }) {
            memberOut = true
            let broken = figures.indices.filter { figures[$0] != 0 && $0 < memberLabels.count && searchesFailDirectly(on: memberLabels[$0]) }
            if !broken.isEmpty && broken.count == figures.filter({ $0 != 0 }).count {
                emitLine("MEMBER-BUG seed=\(seed) step=\(step): \(broken.map { memberLabels[$0] }) left service, and SoftHSM itself answers a search "
                    + "there CKR_GENERAL_ERROR (the half-made object of a C_CreateObject it refused)")
            } else {
                check(false, "seed=\(seed) step=\(step): a member left service (states \(figures)) after \(call.text) -> \(codeName(rv))")
            }
        }
    }
    _ = m.f.C_Finalize!(nil)
    emitLine("CALLS \(episode.calls.count)")
}

/// Whether SoftHSM, asked directly in this process (the instance p11ha's members use), answers the search
/// p11ha's records make on `label`'s token with CKR_GENERAL_ERROR: SoftHSM 2.6.1 keeps the half-made object of a
/// C_CreateObject it refused (an invalid attribute), and every search of the process's sessions on that token can
/// then fail. A member out of service for that is out for its own bug, not p11ha's.
func searchesFailDirectly(on label: String) -> Bool {
    guard let path = env("SOFTHSM_MODULE") else { return false }
    let direct = Module(path: path)
    guard let memberSlot = slot(labelled: label, in: direct) else { return false }
    var session: CK_SESSION_HANDLE = 0
    guard direct.f.C_OpenSession!(memberSlot, CK_FLAGS(CKF_SERIAL_SESSION), nil, nil, &session) == CKR_OK else { return false }
    defer { _ = direct.f.C_CloseSession!(session) }
    let journal = Template().add(CKA_CLASS, ulong: CKO_DATA).add(CKA_LABEL, string: "p11ha record")
    var rv = direct.f.C_FindObjectsInit!(session, &journal.attributes, journal.count)
    if rv == CKR_OK {
        var handles = [CK_OBJECT_HANDLE](repeating: 0, count: 16)
        var count: CK_ULONG = 0
        rv = direct.f.C_FindObjects!(session, &handles, 16, &count)
        _ = direct.f.C_FindObjectsFinal!(session)
    }
    return rv == CKR_GENERAL_ERROR
}

/// A line of the episode's output, out at once: a crash must not take buffered lines with it.
func emitLine(_ line: String) {
    print(line)
    fflush(nil)
}

/// p11ha_member_states, or nil when the library is not initialized.
private func memberStates(_ symbol: UnsafeMutableRawPointer, _ slot: CK_SLOT_ID) -> [CK_ULONG]? {
    typealias Figures = @convention(c) (CK_SLOT_ID, UnsafeMutablePointer<CK_ULONG>?, UnsafeMutablePointer<CK_ULONG>?) -> CK_RV
    let figures = unsafeBitCast(symbol, to: Figures.self)
    var values = [CK_ULONG](repeating: 0, count: 16)
    var count = CK_ULONG(values.count)
    guard figures(slot, &values, &count) == CKR_OK else { return nil }
    return Array(values.prefix(Int(count)))
}

func codeName(_ rv: CK_RV) -> String {
    if rv == notMade { return "(not made)" }
    let names: [CK_RV: String] = [
        CKR_OK: "CKR_OK", CKR_GENERAL_ERROR: "CKR_GENERAL_ERROR", CKR_ARGUMENTS_BAD: "CKR_ARGUMENTS_BAD",
        CKR_SESSION_HANDLE_INVALID: "CKR_SESSION_HANDLE_INVALID", CKR_OBJECT_HANDLE_INVALID: "CKR_OBJECT_HANDLE_INVALID",
        CKR_KEY_HANDLE_INVALID: "CKR_KEY_HANDLE_INVALID", CKR_DEVICE_ERROR: "CKR_DEVICE_ERROR",
        CKR_CRYPTOKI_NOT_INITIALIZED: "CKR_CRYPTOKI_NOT_INITIALIZED", CKR_OPERATION_NOT_INITIALIZED: "CKR_OPERATION_NOT_INITIALIZED",
        CKR_OPERATION_ACTIVE: "CKR_OPERATION_ACTIVE", CKR_MECHANISM_INVALID: "CKR_MECHANISM_INVALID",
        CKR_MECHANISM_PARAM_INVALID: "CKR_MECHANISM_PARAM_INVALID", CKR_BUFFER_TOO_SMALL: "CKR_BUFFER_TOO_SMALL",
        CKR_FUNCTION_NOT_SUPPORTED: "CKR_FUNCTION_NOT_SUPPORTED", CKR_USER_NOT_LOGGED_IN: "CKR_USER_NOT_LOGGED_IN",
        CKR_ATTRIBUTE_TYPE_INVALID: "CKR_ATTRIBUTE_TYPE_INVALID", CKR_ATTRIBUTE_VALUE_INVALID: "CKR_ATTRIBUTE_VALUE_INVALID",
        CKR_TEMPLATE_INCOMPLETE: "CKR_TEMPLATE_INCOMPLETE", CKR_TEMPLATE_INCONSISTENT: "CKR_TEMPLATE_INCONSISTENT",
        CKR_KEY_TYPE_INCONSISTENT: "CKR_KEY_TYPE_INCONSISTENT", CKR_KEY_FUNCTION_NOT_PERMITTED: "CKR_KEY_FUNCTION_NOT_PERMITTED",
        CKR_DATA_LEN_RANGE: "CKR_DATA_LEN_RANGE", CKR_DATA_INVALID: "CKR_DATA_INVALID", CKR_SIGNATURE_INVALID: "CKR_SIGNATURE_INVALID",
        CKR_SIGNATURE_LEN_RANGE: "CKR_SIGNATURE_LEN_RANGE", CKR_ENCRYPTED_DATA_LEN_RANGE: "CKR_ENCRYPTED_DATA_LEN_RANGE",
        CKR_ENCRYPTED_DATA_INVALID: "CKR_ENCRYPTED_DATA_INVALID", CKR_ATTRIBUTE_SENSITIVE: "CKR_ATTRIBUTE_SENSITIVE",
        CKR_ATTRIBUTE_READ_ONLY: "CKR_ATTRIBUTE_READ_ONLY", CKR_KEY_SIZE_RANGE: "CKR_KEY_SIZE_RANGE",
        CKR_USER_ALREADY_LOGGED_IN: "CKR_USER_ALREADY_LOGGED_IN", CKR_PIN_INCORRECT: "CKR_PIN_INCORRECT",
        CKR_PIN_LEN_RANGE: "CKR_PIN_LEN_RANGE", CKR_SESSION_READ_ONLY: "CKR_SESSION_READ_ONLY",
        CKR_SESSION_READ_ONLY_EXISTS: "CKR_SESSION_READ_ONLY_EXISTS", CKR_USER_TYPE_INVALID: "CKR_USER_TYPE_INVALID",
        CKR_SLOT_ID_INVALID: "CKR_SLOT_ID_INVALID", CKR_CRYPTOKI_ALREADY_INITIALIZED: "CKR_CRYPTOKI_ALREADY_INITIALIZED",
        CKR_KEY_NOT_WRAPPABLE: "CKR_KEY_NOT_WRAPPABLE", CKR_KEY_UNEXTRACTABLE: "CKR_KEY_UNEXTRACTABLE",
        CKR_WRAPPED_KEY_INVALID: "CKR_WRAPPED_KEY_INVALID", CKR_WRAPPED_KEY_LEN_RANGE: "CKR_WRAPPED_KEY_LEN_RANGE",
        CKR_FUNCTION_FAILED: "CKR_FUNCTION_FAILED", CKR_HOST_MEMORY: "CKR_HOST_MEMORY",
    ]
    return names[rv] ?? "0x\(String(rv, radix: 16))"
}

/// Brings the group's members back into agreement after an episode that failed (a member left behind, a process
/// that died in a write): a login compares their journals, and members behind are brought up to date. The next
/// episode then starts from members that agree, as every episode must for its seed to replay.
func fuzzSettleScenario(_ m: Module) {
    guard m.f.C_Initialize!(nil) == CKR_OK, let slot = slot(labelled: tokenLabelUnderTest, in: m) else { fatal("no group") }
    let session = openLoggedIn(m, slot: slot, pin: userPIN)
    check(waitInService(m, slot, seconds: 30), "every member back in service")
    _ = m.f.C_Logout!(session)
    _ = m.f.C_Finalize!(nil)
}

/// What the fuzzer found crashing the process through a member, made on purpose: an RSA verification with a
/// generic secret key and an empty signature (SoftHSM 2.6.1 directly dies of SIGSEGV in C_VerifyFinal; seed
/// 7202067731235806811). Through the group it is refused at C_VerifyInit.
func memberCrashScenario(_ m: Module) {
    let s = initialized(m)
    let session = openLoggedIn(m, slot: s, pin: userPIN)
    let secret = Template().add(CKA_CLASS, ulong: CKO_SECRET_KEY).add(CKA_KEY_TYPE, ulong: CKK_GENERIC_SECRET)
        .add(CKA_VALUE, [UInt8](repeating: 1, count: 32)).add(CKA_TOKEN, bool: false).add(CKA_VERIFY, bool: true)
    var key: CK_OBJECT_HANDLE = 0
    ok(m.f.C_CreateObject!(session, &secret.attributes, secret.count, &key), "C_CreateObject generic secret")
    var rsa = mechanism(CKM_SHA1_RSA_PKCS)
    expect(m.f.C_VerifyInit!(session, &rsa, key), CKR_KEY_TYPE_INCONSISTENT, "C_VerifyInit of SHA1-RSA-PKCS with a generic secret key")
    var data = [UInt8](repeating: 0, count: 64)
    expect(m.f.C_VerifyUpdate!(session, &data, 64), CKR_OPERATION_NOT_INITIALIZED, "no verification under way")
    expect(m.f.C_VerifyFinal!(session, &data, 0), CKR_OPERATION_NOT_INITIALIZED, "C_VerifyFinal with an empty signature reaches no member")
    ok(m.f.C_Finalize!(nil), "C_Finalize")
}

// MARK: hangs and crashes

/// Fails the episode (exit 3) when a call has not returned within `limit` seconds, naming the call and the last
/// ones before it.
final class Watchdog: @unchecked Sendable {
    private let limit: Double
    /// When the call under way began (monotonic nanoseconds), 0 between calls.
    private let started = Atomic<Int>(0)

    init(limit: Double) {
        self.limit = limit
        let context = Unmanaged.passRetained(self).toOpaque()
        var thread = pthread_t()
        guard pthread_create(&thread, nil, { raw in
            Unmanaged<Watchdog>.fromOpaque(raw!).takeUnretainedValue().watch()
            return nil
        }, context) == 0 else { fatal("pthread_create") }
        pthread_detach(thread)
    }

    func begin(_ call: String) { started.store(Int(monotonicSeconds() * 1e9), ordering: .releasing) }
    func end() { started.store(0, ordering: .releasing) }

    private func watch() {
        while true {
            usleep(50_000)
            let since = started.load(ordering: .acquiring)
            guard since != 0, monotonicSeconds() - Double(since) / 1e9 > limit else { continue }
            CrashRecord.report("HANG: a call did not return within \(limit) s (operation-timeout + margin)")
            _exit(3)
        }
    }
}

/// The episode's last calls, kept in memory a signal handler can write out without allocating.
enum CrashRecord {
    static let slots = 12
    static let slotSize = 512
    nonisolated(unsafe) static let ring = UnsafeMutablePointer<UInt8>.allocate(capacity: slots * slotSize)
    nonisolated(unsafe) static var next = 0
    nonisolated(unsafe) static let altStack = UnsafeMutableRawPointer.allocate(byteCount: 1 << 16, alignment: 16)

    static func install() {
        ring.initialize(repeating: 0, count: slots * slotSize)
        var stack = stack_t(ss_sp: altStack, ss_flags: 0, ss_size: 1 << 16)
        sigaltstack(&stack, nil)
        for signal in [SIGSEGV, SIGBUS, SIGILL, SIGTRAP, SIGABRT, SIGFPE] {
            var action = sigaction()
            action.__sigaction_handler.sa_handler = { signal in
                CrashRecord.write("CRASH: signal \(signal)")
                Glibc.signal(signal, SIG_DFL)
                raise(signal)
            }
            action.sa_flags = Int32(SA_ONSTACK)
            sigaction(signal, &action, nil)
        }
    }

    static func record(_ line: String) {
        let slot = ring + (next % slots) * slotSize
        let bytes = Array(line.utf8.prefix(slotSize - 1))
        slot.update(from: bytes, count: bytes.count)
        slot[bytes.count] = 0
        next += 1
    }

    /// Outside a signal handler.
    static func report(_ headline: String) { write(headline) }

    /// write(2) only, from the memory already there (the headline's interpolation aside, which is done before).
    private static func write(_ headline: String) {
        var text = Array((headline + "\nlast calls, oldest first:\n").utf8)
        _ = Glibc.write(1, &text, text.count)
        for i in 0..<slots {
            let index = next - slots + i
            guard index >= 0 else { continue }
            let slot = ring + (index % slots) * slotSize
            _ = Glibc.write(1, "  ", 2)
            _ = Glibc.write(1, slot, strlen(slot.withMemoryRebound(to: CChar.self, capacity: slotSize) { $0 }))
            _ = Glibc.write(1, "\n", 1)
        }
    }
}

// MARK: the runner

func fuzzScenario(_ m: Module) {
    let settings = FuzzSettings()
    guard let softhsmPath = env("SOFTHSM_MODULE") else { fatal("fuzz needs SOFTHSM_MODULE") }
    let softhsm = Module(path: softhsmPath)
    let tokens = memberLabels + (settings.referenceToken.map { [$0] } ?? [])
    let base = settings.baseSeed ?? UInt64(monotonicSeconds() * 1e6) ^ UInt64(getpid()) << 40
    var seeds = FuzzRandom(seed: base)
    if let seed = settings.seed {
        emitLine("fuzz: episode seed \(seed), \(settings.steps) calls (the prologue included)")
    } else {
        emitLine("fuzz: base seed \(base) (P11HA_FUZZ_BASE_SEED=\(base) repeats this run), \(settings.seconds) s, "
            + "\(settings.steps) calls per episode, " + (settings.focus.map { "more calls of \($0), " } ?? "")
            + "hang past \(settings.hangSeconds) s, "
            + (settings.referenceToken == nil ? "no reference token" : "reference token \(settings.referenceToken!)"))
    }
    let start = monotonicSeconds()
    var episodes = 0
    var calls = 0
    var passedThrough: [String: String] = [:]
    var memberBugs: [String] = []
    var reported = 0
    func report(_ seed: UInt64, _ what: String) {
        reported += 1
        check(false, "episode seed \(seed): \(what)\n  replay: scripts/fuzz --seed \(seed)"
              + (settings.steps == 300 ? "" : " --steps \(settings.steps)") + (settings.focus.map { " --focus \($0)" } ?? ""))
        fflush(nil)
    }
    repeat {
        let seed = settings.seed ?? seeds.next()
        let before = cleanTokens(softhsm, tokens)
        for problem in before.problems { report(seed, "before the episode: \(problem)") }
        var environment = ["P11HA_FUZZ_SEED": "\(seed)"]
        if settings.seed != nil { environment["P11HA_FUZZ_TRACE"] = "1" }
        let run = spawnSelf(["fuzz-episode", CommandLine.arguments[2]], environment, timeout: 600)
        episodes += 1
        let lines = run.output.split(separator: "\n").map(String.init)
        if settings.seed != nil { print(run.output, terminator: "") }
        calls += lines.first { $0.hasPrefix("CALLS ") }.flatMap { Int($0.dropFirst(6)) } ?? 0
        if run.timedOut {
            report(seed, "the episode did not end within 600 s and was killed\n" + tail(lines))
        } else if run.status == 3 || run.status > 128 || run.status == 2 {
            var what = run.status == 3 ? "hang" : run.status > 128 ? "crash (signal \(run.status - 128))" : "the episode could not run"
            if run.status > 128, settings.referenceToken != nil {
                // Whose crash: the same episode on SoftHSM directly.
                let last = lines.last { $0.hasPrefix("step ") }?.split(separator: ":").first.map(String.init) ?? ""
                let direct = referenceRun(softhsm, softhsmPath, seed, tokens)
                let directLast = direct.output.split(separator: "\n").last { $0.hasPrefix("step ") }?.split(separator: ":").first.map(String.init) ?? ""
                if direct.status > 128 && directLast == last { what += "; SoftHSM directly dies at \(last) too (the member's bug, reaching the process)" }
            }
            report(seed, "\(what)\n" + tail(lines))
        }
        // p11ha's own objects on each member are still there, as they were (a record may be new): an application
        // cannot reach them.
        let after = cleanTokens(softhsm, tokens)
        var lost = false
        for (token, objects) in before.infrastructure {
            let gone = objects.subtracting(after.infrastructure[token] ?? [])
            if !gone.isEmpty {
                lost = true
                report(seed, "p11ha's own objects on \(token) were destroyed or changed by the episode: \(gone.sorted())")
            }
        }
        if lost {
            report(seed, "stopping: the next episodes would start from a group without its own objects")
            break
        }
        // After a failure, or a member's own bug, members are brought back into agreement before the next episode.
        let failed = lines.contains { $0.hasPrefix("FAIL") || $0.hasPrefix("MEMBER-BUG ") } || run.status != 0
        for failure in lines where failure.hasPrefix("FAIL") { report(seed, failure) }
        for bug in lines where bug.hasPrefix("MEMBER-BUG ") { memberBugs.append(String(bug.dropFirst(11))) }
        let unlisted = lines.filter { $0.hasPrefix("UNLISTED ") }.map { $0.split(separator: " ", maxSplits: 4).map(String.init) }
        if !unlisted.isEmpty {
            let (direct, stopped) = settings.referenceToken == nil ? ([:], "no reference token") : referenceCodes(softhsm, softhsmPath, seed, tokens)
            for entry in unlisted {
                guard entry.count == 5, let step = Int(entry[1]), let rv = CK_RV(entry[3]) else { continue }
                let function = entry[2]
                let name = "\(function) \(codeName(rv))"
                if direct[step] == rv {
                    if passedThrough[name] == nil { passedThrough[name] = "seed \(seed) step \(step)" }
                } else if let allowed = allowedUnlisted.first(where: { $0.function == function && $0.rv == rv }) {
                    if passedThrough[name] == nil { passedThrough[name] = "allowed: \(allowed.reason)" }
                } else {
                    let reference = direct[step].map { "SoftHSM directly: \(codeName($0))" } ?? stopped
                    report(seed, "step \(step): \(function) returned \(codeName(rv)), which the specification does not list for it (\(reference))\n  call: \(entry[4])")
                }
            }
        }
        if failed && settings.seed == nil {
            let settled = spawnSelf(["fuzz-settle", CommandLine.arguments[2]], [:], timeout: 120)
            if settled.status != 0 {
                report(seed, "after it the members could not be brought back into agreement; stopping\n" + tail(settled.output.split(separator: "\n").map(String.init)))
                break
            }
        }
    } while settings.seed == nil && monotonicSeconds() - start < settings.seconds && reported < 20
    for problem in cleanTokens(softhsm, tokens).problems { check(false, "after the last episode: \(problem)") }
    for bug in memberBugs.prefix(5) { emitLine("a member's own bug took it out of service (not p11ha's; see the report): \(bug)") }
    if memberBugs.count > 5 { emitLine("... and \(memberBugs.count - 5) more such") }
    for (code, example) in passedThrough.sorted(by: { $0.key < $1.key }) {
        emitLine("passed through from the member (SoftHSM gives it directly too): \(code) (\(example))")
    }
    emitLine("fuzz: \(episodes) episodes, \(calls) calls in \(Int(monotonicSeconds() - start)) s, base seed \(base)")
}

private func tail(_ lines: [String]) -> String {
    lines.suffix(40).map { "  | " + $0 }.joined(separator: "\n")
}

/// The same episode on SoftHSM directly, on the reference token.
private func referenceRun(_ softhsm: Module, _ path: String, _ seed: UInt64, _ tokens: [String]) -> (status: Int32, output: String, timedOut: Bool) {
    _ = cleanTokens(softhsm, tokens)
    return spawnSelf(["fuzz-episode", path], ["P11HA_FUZZ_SEED": "\(seed)", "P11HA_FUZZ_REFERENCE": "1"], timeout: 600)
}

/// Each step's code on SoftHSM directly, and why steps are missing.
private func referenceCodes(_ softhsm: Module, _ path: String, _ seed: UInt64, _ tokens: [String]) -> ([Int: CK_RV], String) {
    let run = referenceRun(softhsm, path, seed, tokens)
    var codes: [Int: CK_RV] = [:]
    for line in run.output.split(separator: "\n") where line.hasPrefix("RV ") {
        let fields = line.split(separator: " ")
        if fields.count == 3, let step = Int(fields[1]), let rv = CK_RV(fields[2]) { codes[step] = rv }
    }
    let last = codes.keys.max() ?? -1
    let ended = run.status > 128 ? "SoftHSM directly died of signal \(run.status - 128) after step \(last)" : "the reference run ended after step \(last)"
    return (codes, ended)
}

/// Destroys, on each token, the objects episodes left (everything but p11ha's own), so every episode starts from
/// the same tokens; returns what is wrong (a member without its replication key, a login refused), and p11ha's own
/// objects on each token (their labels and classes). Every object is
/// looked at, not only those with CKA_TOKEN true: the half-made object SoftHSM keeps after a C_CreateObject it
/// refused (an invalid attribute value) is stored on the token but matches no such search.
func cleanTokens(_ softhsm: Module, _ labels: [String]) -> (problems: [String], infrastructure: [String: Set<String>]) {
    var problems: [String] = []
    var infrastructure: [String: Set<String>] = [:]
    guard softhsm.f.C_Initialize!(nil) == CKR_OK else { return (["C_Initialize of SoftHSM failed"], [:]) }
    defer { _ = softhsm.f.C_Finalize!(nil) }
    for label in labels {
        guard let slot = slot(labelled: label, in: softhsm) else {
            problems.append("no token \(label)")
            continue
        }
        var session: CK_SESSION_HANDLE = 0
        guard softhsm.f.C_OpenSession!(slot, CK_FLAGS(CKF_SERIAL_SESSION | CKF_RW_SESSION), nil, nil, &session) == CKR_OK else {
            problems.append("\(label): C_OpenSession failed")
            continue
        }
        defer { _ = softhsm.f.C_CloseSession!(session) }
        var pin = Array(userPIN.utf8)
        let login = softhsm.f.C_Login!(session, CK_USER_TYPE(CKU_USER), &pin, CK_ULONG(pin.count))
        if login != CKR_OK && login != CKR_USER_ALREADY_LOGGED_IN { problems.append("\(label): the user PIN no longer logs in (\(codeName(login)))") }
        var replicationKey = false
        guard softhsm.f.C_FindObjectsInit!(session, nil, 0) == CKR_OK else {
            problems.append("\(label): C_FindObjectsInit failed")
            continue
        }
        var handles = [CK_OBJECT_HANDLE](repeating: 0, count: 4096)
        var count: CK_ULONG = 0
        _ = softhsm.f.C_FindObjects!(session, &handles, CK_ULONG(handles.count), &count)
        _ = softhsm.f.C_FindObjectsFinal!(session)
        for handle in handles.prefix(Int(count)) {
            let name = attribute(softhsm, session, handle, CK_ATTRIBUTE_TYPE(CKA_LABEL)).map { String(decoding: $0, as: UTF8.self) } ?? ""
            if name == "p11ha replication key" { replicationKey = true }
            // A lease claim comes and goes with each repair (p11ha's, transient): not a lasting object.
            if name == "p11ha lease" { continue }
            if name.hasPrefix("p11ha") {
                let objectClass = attribute(softhsm, session, handle, CK_ATTRIBUTE_TYPE(CKA_CLASS)).map { "\($0.first ?? 0)" } ?? "?"
                infrastructure[label, default: []].insert("\(name) (class \(objectClass))")
                continue
            }
            let rv = softhsm.f.C_DestroyObject!(session, handle)
            if rv != CKR_OK { problems.append("\(label): an object an episode left cannot be destroyed (\(codeName(rv)))") }
        }
        if memberLabels.contains(label) && !replicationKey { problems.append("\(label): p11ha's replication key is gone") }
        _ = softhsm.f.C_Logout!(session)
    }
    return (problems, infrastructure)
}

// MARK: child processes

/// Runs this program with `arguments` and the environment plus `extra`; its output (stdout and stderr), and its
/// exit status (128 + N when killed by signal N).
func spawnSelf(_ arguments: [String], _ extra: [String: String], timeout: Double) -> (status: Int32, output: String, timedOut: Bool) {
    var pipeEnds: [Int32] = [0, 0]
    guard pipe(&pipeEnds) == 0 else { fatal("pipe") }
    var actions = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&actions)
    posix_spawn_file_actions_adddup2(&actions, pipeEnds[1], 1)
    posix_spawn_file_actions_adddup2(&actions, pipeEnds[1], 2)
    posix_spawn_file_actions_addclose(&actions, pipeEnds[0])
    defer { posix_spawn_file_actions_destroy(&actions) }
    var environment: [String] = []
    var index = 0
    while let entry = environ[index] {
        let text = String(cString: entry)
        if !extra.keys.contains(where: { text.hasPrefix($0 + "=") }) { environment.append(text) }
        index += 1
    }
    environment += extra.map { "\($0)=\($1)" }
    let path = "/proc/self/exe"
    let argv = ([CommandLine.arguments[0]] + arguments).map { strdup($0) } + [nil]
    let envp = environment.map { strdup($0) } + [nil]
    defer { for p in argv + envp { free(p) } }
    var pid: pid_t = 0
    guard posix_spawn(&pid, path, &actions, nil, argv, envp) == 0 else { fatal("posix_spawn") }
    close(pipeEnds[1])
    var output: [UInt8] = []
    var buffer = [UInt8](repeating: 0, count: 65536)
    let deadline = monotonicSeconds() + timeout
    var timedOut = false
    while true {
        var poller = pollfd(fd: pipeEnds[0], events: Int16(POLLIN), revents: 0)
        let left = deadline - monotonicSeconds()
        if left <= 0 {
            timedOut = true
            kill(pid, SIGKILL)
            break
        }
        if poll(&poller, 1, Int32(min(left, 1) * 1000)) > 0 {
            let n = read(pipeEnds[0], &buffer, buffer.count)
            if n <= 0 { break }
            output += buffer.prefix(n)
        }
    }
    close(pipeEnds[0])
    var status: Int32 = 0
    waitpid(pid, &status, 0)
    let code: Int32 = (status & 0x7f) == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f)
    return (code, String(decoding: output, as: UTF8.self), timedOut)
}
