// One writer of the multi-writer test (several of these run at once, standing for processes on one or more hosts),
// and the members' contents read directly from SoftHSM, for MultiWriterTests to compare with what writers were told.
import CInterop
import Glibc

/// Creates, renames and destroys token objects through the group for P11HA_TEST_WRITER_SECONDS (default 20), and
/// appends every step to P11HA_TEST_WRITER_RECORD, one write(2) per line so that a kill loses nothing acknowledged:
///
///     try create NAME KIND LABEL          before the call
///     ok create NAME KIND LABEL           CKR_OK
///     fail create NAME KIND LABEL 0xRV    anything else: the object may or may not exist
///     (the same for "rename NAME OLD NEW" and "destroy NAME LABEL")
///
/// NAME is WRITER-COUNTER (P11HA_TEST_WRITER_ID, default the pid), unique to the writer and fixed for the object's
/// life: a data object's CKA_VALUE, a key's CKA_ID. Its label starts as NAME and becomes NAME.rN at its Nth rename.
/// KIND is data (a private data object), aes-value (an AES key created by value: replayed on every member) or
/// aes-generated (C_GenerateKey: made on one member and carried wrapped). An object whose write failed is never
/// touched again, so its state is one of at most two. Afterwards it prints its counts, failures per code, and, if
/// P11HA_TEST_WRITER_FINISH is set, the group's member states every 0.5 s ("states 0,0,0") until that file
/// exists (at most 300 s): p11ha's recovery goes on in this process meanwhile. P11HA_TEST_WRITER_SEED fixes the
/// choices, P11HA_TEST_WRITER_PAUSE_MS (default 5) paces the writes.
func writerScenario(_ m: Module) {
    guard let recordPath = env("P11HA_TEST_WRITER_RECORD") else { fatal("P11HA_TEST_WRITER_RECORD is not set") }
    let writer = env("P11HA_TEST_WRITER_ID") ?? "w\(getpid())"
    let seconds = Double(env("P11HA_TEST_WRITER_SECONDS") ?? "") ?? 20
    let pause = UInt32(env("P11HA_TEST_WRITER_PAUSE_MS") ?? "") ?? 5
    let seed = UInt64(env("P11HA_TEST_WRITER_SEED") ?? "") ?? UInt64(getpid()) &* 0x9E37_79B9
    let record = RecordFile(recordPath)
    print("writer \(writer) seed \(seed)")

    let s = initialized(m)
    var w = Writer(m, slot: s, writer: writer, record: record, random: FuzzRandom(seed: seed))
    let start = monotonicSeconds()
    var states = memberStates(m, s)
    print("t=0.0 states \(states.map(String.init).joined(separator: ","))")
    while monotonicSeconds() - start < seconds {
        w.step()
        // Member states as this process sees them, when they change: the story of a failed run.
        let now = memberStates(m, s)
        if now != states {
            states = now
            print("t=\(tenths(monotonicSeconds() - start)) states \(states.map(String.init).joined(separator: ","))")
            fflush(nil)
        }
        if pause > 0 { usleep(pause * 1000) }
    }
    print(w.summary)
    fflush(nil)

    if let finish = env("P11HA_TEST_WRITER_FINISH") {
        let waited = monotonicSeconds()
        while access(finish, F_OK) != 0 && monotonicSeconds() - waited < 300 {
            print("states \(memberStates(m, s).map(String.init).joined(separator: ","))")
            fflush(nil)
            usleep(500_000)
        }
    }
    ok(m.f.C_Finalize!(nil), "C_Finalize")
}

/// The record, appended one line per write(2) (O_APPEND): nothing is buffered in the process.
struct RecordFile {
    let fd: Int32

    init(_ path: String) {
        fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0o600)
        if fd < 0 { fatal("cannot open \(path): errno \(errno)") }
    }

    func append(_ line: String) {
        let bytes = Array((line + "\n").utf8)
        let written = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        if written != bytes.count { fatal("writing the record: errno \(errno)") }
    }
}

private struct Writer {
    enum Kind: String, CaseIterable { case data, aesValue = "aes-value", aesGenerated = "aes-generated" }

    struct Live {
        let name: String
        let kind: Kind
        var label: String
        var renames: Int
        let handle: CK_OBJECT_HANDLE
    }

    let m: Module
    let slot: CK_SLOT_ID
    let writer: String
    let record: RecordFile
    var random: FuzzRandom
    var session: CK_SESSION_HANDLE = 0
    var live: [Live] = []
    var counter = 0
    var created = 0, renamed = 0, destroyed = 0
    var failed: [CK_RV: Int] = [:]
    var reopened = 0

    init(_ m: Module, slot: CK_SLOT_ID, writer: String, record: RecordFile, random: FuzzRandom) {
        self.m = m
        self.slot = slot
        self.writer = writer
        self.record = record
        self.random = random
        session = openLoggedIn(m, slot: slot, pin: userPIN)
    }

    /// One write: creations while few objects live, else renames and destructions too, so that the tokens
    /// neither fill up nor run dry.
    mutating func step() {
        let createChance = live.count < 10 ? 100 : live.count > 40 ? 20 : 45
        if random.percent(createChance) {
            create(random.pick(Kind.allCases))
        } else if random.percent(50) {
            rename(random.below(live.count))
        } else {
            destroy(random.below(live.count))
        }
    }

    mutating func create(_ kind: Kind) {
        counter += 1
        let name = "\(writer)-\(counter)"
        let what = "create \(name) \(kind.rawValue) \(name)"
        record.append("try " + what)
        var handle: CK_OBJECT_HANDLE = 0
        var rv: CK_RV
        switch kind {
        case .data:
            let t = Template().add(CKA_CLASS, ulong: CK_ULONG(CKO_DATA)).add(CKA_TOKEN, bool: true).add(CKA_PRIVATE, bool: true)
                .add(CKA_LABEL, string: name).add(CKA_VALUE, string: name)
            rv = m.f.C_CreateObject!(session, &t.attributes, t.count, &handle)
        case .aesValue:
            let t = Template().add(CKA_CLASS, ulong: CK_ULONG(CKO_SECRET_KEY)).add(CKA_KEY_TYPE, ulong: CK_ULONG(CKK_AES))
                .add(CKA_TOKEN, bool: true).add(CKA_PRIVATE, bool: true).add(CKA_SENSITIVE, bool: true)
                .add(CKA_EXTRACTABLE, bool: true).add(CKA_ENCRYPT, bool: true).add(CKA_DECRYPT, bool: true)
                .add(CKA_LABEL, string: name).add(CKA_ID, string: name).add(CKA_VALUE, random.bytes(32))
            rv = m.f.C_CreateObject!(session, &t.attributes, t.count, &handle)
        case .aesGenerated:
            var generate = mechanism(CKM_AES_KEY_GEN)
            let t = Template().add(CKA_VALUE_LEN, ulong: 32).add(CKA_TOKEN, bool: true).add(CKA_PRIVATE, bool: true)
                .add(CKA_SENSITIVE, bool: true).add(CKA_ENCRYPT, bool: true).add(CKA_DECRYPT, bool: true)
                .add(CKA_LABEL, string: name).add(CKA_ID, string: name)
            rv = m.f.C_GenerateKey!(session, &generate, &t.attributes, t.count, &handle)
        }
        if outcome(rv, what) {
            created += 1
            live.append(Live(name: name, kind: kind, label: name, renames: 0, handle: handle))
        }
    }

    mutating func rename(_ index: Int) {
        var object = live[index]
        let label = "\(object.name).r\(object.renames + 1)"
        let what = "rename \(object.name) \(object.label) \(label)"
        record.append("try " + what)
        let t = Template().add(CKA_LABEL, string: label)
        let rv = m.f.C_SetAttributeValue!(session, object.handle, &t.attributes, t.count)
        if outcome(rv, what) {
            renamed += 1
            object.label = label
            object.renames += 1
            live[index] = object
        } else {
            live.remove(at: index)
        }
    }

    mutating func destroy(_ index: Int) {
        let object = live.remove(at: index)
        let what = "destroy \(object.name) \(object.label)"
        record.append("try " + what)
        if outcome(m.f.C_DestroyObject!(session, object.handle), what) { destroyed += 1 }
    }

    /// Records the outcome; a lost session or login is restored for the next write (the failed one stays failed).
    mutating func outcome(_ rv: CK_RV, _ what: String) -> Bool {
        if rv == CKR_OK {
            record.append("ok " + what)
            return true
        }
        record.append("fail \(what) 0x\(String(rv, radix: 16))")
        failed[rv, default: 0] += 1
        if rv == CKR_SESSION_HANDLE_INVALID || rv == CKR_SESSION_CLOSED || rv == CKR_USER_NOT_LOGGED_IN {
            _ = m.f.C_CloseSession!(session)
            session = openLoggedIn(m, slot: slot, pin: userPIN)
            reopened += 1
        }
        return false
    }

    var summary: String {
        let codes = failed.sorted { $0.key < $1.key }.map { "0x\(String($0.key, radix: 16))=\($0.value)" }
        return "writer \(writer): created \(created), renamed \(renamed), destroyed \(destroyed), live \(live.count), "
            + "failed \(failed.values.reduce(0, +)) [\(codes.joined(separator: " "))], sessions reopened \(reopened)"
    }
}

private func tenths(_ seconds: Double) -> String { String(Double(Int(seconds * 10)) / 10) }

/// Every token object of every member (P11HA_TEST_MEMBERS), read through MODULE, which must be the members' own
/// module (SoftHSM), logged in as the user. One line per object:
///
///     object MEMBER CLASS KEYTYPE LABEL ID APPLICATION VALUE FINGERPRINT
///
/// CLASS and KEYTYPE in hex ("-" when absent), the others hex-encoded bytes ("-" when absent or unreadable, as a
/// sensitive key's CKA_VALUE; "." when empty). FINGERPRINT is an AES key's encryption of one block (equal keys give equal ones).
func memberInventoryScenario(_ m: Module) {
    ok(m.f.C_Initialize!(nil), "C_Initialize")
    for label in memberLabels {
        guard let memberSlot = slot(labelled: label, in: m) else { fatal("no member \(label)") }
        let session = openLoggedIn(m, slot: memberSlot, pin: userPIN, rw: false)
        let objects = find(m, session, Template().add(CKA_TOKEN, bool: true))
        for object in objects {
            let objectClass = attribute(m, session, object, CKA_CLASS).map(ulong)
            let keyType = attribute(m, session, object, CKA_KEY_TYPE).map(ulong)
            let fingerprint = objectClass == CK_ULONG(CKO_SECRET_KEY) && keyType == CK_ULONG(CKK_AES)
                ? encryptBlock(m, session, object) : nil
            let fields = [
                objectClass.map { String($0, radix: 16) } ?? "-", keyType.map { String($0, radix: 16) } ?? "-",
                hexField(attribute(m, session, object, CKA_LABEL)), hexField(attribute(m, session, object, CKA_ID)),
                hexField(attribute(m, session, object, CKA_APPLICATION)), hexField(attribute(m, session, object, CKA_VALUE)),
                hexField(fingerprint),
            ]
            print("object \(label) " + fields.joined(separator: " "))
        }
        print("member \(label) objects \(objects.count)")
        _ = m.f.C_CloseSession!(session)
    }
    ok(m.f.C_Finalize!(nil), "C_Finalize")
}

private func ulong(_ bytes: [UInt8]) -> CK_ULONG {
    var value: CK_ULONG = 0
    withUnsafeMutableBytes(of: &value) { $0.copyBytes(from: bytes.prefix(MemoryLayout<CK_ULONG>.size)) }
    return value
}

private func hexField(_ bytes: [UInt8]?) -> String {
    guard let bytes else { return "-" }
    let digits = Array("0123456789abcdef")
    return bytes.isEmpty ? "." : String(bytes.flatMap { [digits[Int($0 >> 4)], digits[Int($0 & 15)]] })
}
