// Sizes the caller claims never drive p11ha's memory: output buffers claimed at 2 GB (backed by reserved,
// untouched memory, so the claim is true), huge counts for lists and searches, and a large C_GenerateRandom.
import CInterop
import Glibc

/// The process's peak resident memory so far, in bytes.
func peakResidentBytes() -> Int {
    var usage = rusage()
    getrusage(RUSAGE_SELF.rawValue, &usage)
    return usage.ru_maxrss * 1024
}

/// The process's resident memory now, in bytes (the second field of /proc/self/statm, in pages).
func residentBytes() -> Int {
    let fd = open("/proc/self/statm", O_RDONLY)
    guard fd >= 0 else { return 0 }
    defer { close(fd) }
    var text = [UInt8](repeating: 0, count: 128)
    let n = read(fd, &text, text.count)
    guard n > 0 else { return 0 }
    let fields = String(decoding: text.prefix(n), as: UTF8.self).split(separator: " ")
    guard fields.count >= 2, let pages = Int(fields[1]) else { return 0 }
    return pages * Int(sysconf(Int32(_SC_PAGESIZE)))
}

/// 2 GiB of address space reserved and never touched unless written: a buffer whose claimed length is true.
final class ReservedBuffer: @unchecked Sendable {
    static let size = Int(Int32.max) + 1
    let base: UnsafeMutableRawPointer

    init() {
        let p = mmap(nil, ReservedBuffer.size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        guard let p, p != MAP_FAILED else { fatal("mmap of \(ReservedBuffer.size) bytes failed: errno \(errno)") }
        base = p
    }

    var bytes: UnsafeMutablePointer<UInt8> { base.assumingMemoryBound(to: UInt8.self) }
}

func boundsScenario(_ m: Module) {
    let s = initialized(m)
    let session = openLoggedIn(m, slot: s, pin: userPIN)
    let f = m.f
    let huge = ReservedBuffer()
    let claim = CK_ULONG(Int32.max)
    // Each call: at most 1 s, and the process's memory grows by less than `limit` (the caller's buffers are
    // already counted; 2 GiB claims before the fix took 2 GiB per attribute, and 43 s).
    func bounded(_ what: String, limit: Int = 64 << 20, _ call: () -> Void) {
        let before = residentBytes()
        let start = monotonicSeconds()
        call()
        let seconds = monotonicSeconds() - start
        let grown = peakResidentBytes() - before
        check(seconds < 1, "\(what) returns at once (took \(seconds) s)")
        check(grown < limit, "\(what) does not allocate per the claimed length (peak memory grew \(grown >> 20) MiB)")
    }

    var gen = mechanism(CKM_EC_KEY_PAIR_GEN)
    let label = "bounds-\(getpid())"
    let pub = Template().add(CKA_EC_PARAMS, p256).add(CKA_VERIFY, bool: true).add(CKA_TOKEN, bool: false).add(CKA_LABEL, string: label)
    let priv = Template().add(CKA_SIGN, bool: true).add(CKA_TOKEN, bool: false).add(CKA_SENSITIVE, bool: true).add(CKA_LABEL, string: label)
    var ec: (pub: CK_OBJECT_HANDLE, priv: CK_OBJECT_HANDLE) = (0, 0)
    ok(f.C_GenerateKeyPair!(session, &gen, &pub.attributes, pub.count, &priv.attributes, priv.count, &ec.pub, &ec.priv), "C_GenerateKeyPair")
    bounded("C_GetAttributeValue with two attributes claimed at 2 GiB each") {
        var template = [
            CK_ATTRIBUTE(type: CK_ATTRIBUTE_TYPE(CKA_LABEL), pValue: huge.base, ulValueLen: claim),
            CK_ATTRIBUTE(type: CK_ATTRIBUTE_TYPE(CKA_EC_POINT), pValue: huge.base + (1 << 30), ulValueLen: claim),
        ]
        expect(f.C_GetAttributeValue!(session, ec.pub, &template, 2), CKR_OK, "C_GetAttributeValue into 2 GiB buffers")
        check(template[0].ulValueLen == CK_ULONG(label.utf8.count), "the label's exact length comes back")
        check(template[1].ulValueLen == 67, "the EC point's exact length comes back (\(template[1].ulValueLen))")
        check(Array(UnsafeBufferPointer(start: huge.bytes, count: Int(template[0].ulValueLen))) == Array(label.utf8),
              "the label's value is written")
    }
    bounded("C_GetAttributeValue of a sensitive attribute claimed at 2 GiB") {
        var template = [CK_ATTRIBUTE(type: CK_ATTRIBUTE_TYPE(CKA_VALUE), pValue: huge.base, ulValueLen: claim),
                        CK_ATTRIBUTE(type: CK_ATTRIBUTE_TYPE(CKA_SIGN), pValue: huge.base + 4096, ulValueLen: claim)]
        expect(f.C_GetAttributeValue!(session, ec.priv, &template, 2), CKR_ATTRIBUTE_SENSITIVE, "a private key's CKA_VALUE")
        check(template[0].ulValueLen == P11HA_CK_UNAVAILABLE_INFORMATION, "its length is CK_UNAVAILABLE_INFORMATION")
        check(template[1].ulValueLen == 1 && huge.bytes[4096] == 1, "the other attribute is still returned")
    }
    bounded("C_GetAttributeValue into a buffer too small, claimed with the rest at 2 GiB") {
        var template = [CK_ATTRIBUTE(type: CK_ATTRIBUTE_TYPE(CKA_EC_POINT), pValue: huge.base, ulValueLen: 3),
                        CK_ATTRIBUTE(type: CK_ATTRIBUTE_TYPE(CKA_LABEL), pValue: huge.base + 4096, ulValueLen: claim)]
        expect(f.C_GetAttributeValue!(session, ec.pub, &template, 2), CKR_BUFFER_TOO_SMALL, "a 3-byte buffer for the EC point")
        check(template[0].ulValueLen == P11HA_CK_UNAVAILABLE_INFORMATION, "a buffer too small gets CK_UNAVAILABLE_INFORMATION")
        check(template[1].ulValueLen == CK_ULONG(label.utf8.count), "the label still comes back")
    }
    bounded("C_Sign into a buffer claimed at 2 GiB") {
        var ecdsa = mechanism(CKM_ECDSA)
        var digest = [UInt8](repeating: 5, count: 32)
        var length = claim
        ok(f.C_SignInit!(session, &ecdsa, ec.priv), "C_SignInit")
        expect(f.C_Sign!(session, &digest, 32, huge.bytes, &length), CKR_OK, "C_Sign into 2 GiB")
        check(length == 64, "the signature's length (\(length))")
        ok(f.C_VerifyInit!(session, &ecdsa, ec.pub), "C_VerifyInit")
        expect(f.C_Verify!(session, &digest, 32, huge.bytes, 64), CKR_OK, "the signature written there verifies")
    }
    bounded("C_DigestUpdate and C_DigestFinal into a buffer claimed past 4 GiB") {
        var sha = mechanism(CKM_SHA256)
        var data = [UInt8](repeating: 1, count: 100)
        var length = CK_ULONG.max
        ok(f.C_DigestInit!(session, &sha), "C_DigestInit")
        ok(f.C_DigestUpdate!(session, &data, 100), "C_DigestUpdate")
        expect(f.C_DigestFinal!(session, huge.bytes, &length), CKR_OK, "C_DigestFinal with a length of CK_ULONG max")
        check(length == 32, "the digest's length (\(length))")
    }
    let aes = Template().add(CKA_CLASS, ulong: CK_ULONG(CKO_SECRET_KEY)).add(CKA_KEY_TYPE, ulong: CK_ULONG(CKK_AES))
        .add(CKA_VALUE, [UInt8](repeating: 9, count: 32)).add(CKA_ENCRYPT, bool: true).add(CKA_DECRYPT, bool: true)
        .add(CKA_WRAP, bool: true).add(CKA_EXTRACTABLE, bool: true).add(CKA_TOKEN, bool: false)
    var key: CK_OBJECT_HANDLE = 0
    ok(f.C_CreateObject!(session, &aes.attributes, aes.count, &key), "C_CreateObject AES key")
    bounded("C_Encrypt, C_EncryptUpdate and C_EncryptFinal into buffers claimed at 2 GiB") {
        var ecb = mechanism(CKM_AES_ECB)
        var block = [UInt8](repeating: 2, count: 48)
        var length = claim
        ok(f.C_EncryptInit!(session, &ecb, key), "C_EncryptInit")
        expect(f.C_Encrypt!(session, &block, 48, huge.bytes, &length), CKR_OK, "C_Encrypt into 2 GiB")
        check(length == 48, "the ciphertext's length (\(length))")
        ok(f.C_EncryptInit!(session, &ecb, key), "C_EncryptInit")
        length = claim
        expect(f.C_EncryptUpdate!(session, &block, 40, huge.bytes, &length), CKR_OK, "C_EncryptUpdate into 2 GiB")
        check(length == 32, "the update's output (\(length))")
        length = claim
        expect(f.C_EncryptFinal!(session, huge.bytes, &length), CKR_DATA_LEN_RANGE, "C_EncryptFinal of 8 bytes left over (ECB)")
    }
    bounded("C_DigestInit and C_Digest into a buffer claimed at 2 GiB") {
        var sha = mechanism(CKM_SHA256)
        var data = [UInt8](repeating: 3, count: 10)
        var length = claim
        ok(f.C_DigestInit!(session, &sha), "C_DigestInit")
        expect(f.C_Digest!(session, &data, 10, huge.bytes, &length), CKR_OK, "C_Digest into 2 GiB")
        check(length == 32, "the digest's length (\(length))")
    }
    bounded("C_WrapKey into a buffer claimed at 2 GiB") {
        var wrap = mechanism(CKM_AES_KEY_WRAP)
        var length = claim
        expect(f.C_WrapKey!(session, &wrap, key, key, huge.bytes, &length), CKR_OK, "C_WrapKey into 2 GiB")
        check(length == 40, "the wrapped key's length (\(length))")
    }
    bounded("C_GetSlotList, C_GetMechanismList and C_FindObjects with counts claimed past 4 GiB") {
        var slots = [CK_SLOT_ID](repeating: 0, count: 64)
        var count = CK_ULONG.max
        expect(f.C_GetSlotList!(0, &slots, &count), CKR_OK, "C_GetSlotList with a count of CK_ULONG max")
        check(count >= 1 && count <= 64, "the slot count comes back (\(count))")
        var mechanisms = [CK_MECHANISM_TYPE](repeating: 0, count: 512)
        count = CK_ULONG.max
        expect(f.C_GetMechanismList!(s, &mechanisms, &count), CKR_OK, "C_GetMechanismList with a count of CK_ULONG max")
        check(count >= 1 && count <= 512, "the mechanism count comes back (\(count))")
        ok(f.C_FindObjectsInit!(session, nil, 0), "C_FindObjectsInit")
        var found = [CK_OBJECT_HANDLE](repeating: 0, count: 4096)
        for max in [claim, CK_ULONG.max] {
            expect(f.C_FindObjects!(session, &found, max, &count), CKR_OK, "C_FindObjects with a maximum of \(max)")
        }
        ok(f.C_FindObjectsFinal!(session), "C_FindObjectsFinal")
    }
    // The random bytes must be written to the caller's buffer, 32 MiB of it: p11ha's own memory stays small.
    let randomBytes = 32 << 20
    let randomBuffer = UnsafeMutablePointer<UInt8>.allocate(capacity: randomBytes)
    randomBuffer.initialize(repeating: 0, count: randomBytes)
    bounded("C_GenerateRandom of 32 MiB", limit: 16 << 20) {
        expect(f.C_GenerateRandom!(session, randomBuffer, CK_ULONG(randomBytes)), CKR_OK, "C_GenerateRandom of 32 MiB")
        let tail = UnsafeBufferPointer(start: randomBuffer + randomBytes - 4096, count: 4096)
        check(tail.contains { $0 != 0 }, "the end of the buffer is filled too")
    }
    randomBuffer.deallocate()
    ok(f.C_Finalize!(nil), "C_Finalize")
}
