// Replication records: one small immutable token object per write on each member, never replaced in place, so
// that writers on any number of hosts never overwrite each other and members merge by union.
import CInterop
import Glibc
import Synchronization

/// An object's identity, the same on every member and across restarts: drawn from what the object is (its
/// fingerprint and the attributes it was made with), so two hosts that name one object name it alike.
package struct ObjectUID: Hashable, Comparable, Sendable, CustomStringConvertible {
    package let high: UInt64
    package let low: UInt64

    package static func < (a: ObjectUID, b: ObjectUID) -> Bool { (a.high, a.low) < (b.high, b.low) }
    package var description: String { hex64(high) + hex64(low) }

    /// `occurrence` tells apart objects made alike on purpose (the n-th live one with the same fingerprint and
    /// attributes); identical objects found on members before p11ha (or copied twice by an older version) are
    /// merged into one.
    package init(fingerprint: Fingerprint, attributes: [Attribute], occurrence: Int) {
        let bytes = encodeAttributes(fingerprint.attributes) + [0xFF] + encodeAttributes(attributes.sorted { $0.type < $1.type })
            + bigEndianBytes(UInt64(occurrence))
        high = digest64(bytes, seed: 0x7031_3168_6121_0001)
        low = digest64(bytes, seed: 0x7031_3168_6121_0002)
    }

    init(high: UInt64, low: UInt64) {
        self.high = high
        self.low = low
    }

    init?(parsing text: Substring) {
        guard text.count == 32, let high = UInt64(text.prefix(16), radix: 16), let low = UInt64(text.suffix(16), radix: 16) else { return nil }
        self.init(high: high, low: low)
    }
}

/// When a record was written, as a hybrid logical clock: wall-clock milliseconds, a counter that keeps one
/// writer's records in order when its clock stands still or steps back, and the writer. Totally ordered: the
/// rule for concurrent changes of one attribute is "the greatest stamp wins", the same on every member.
package struct Stamp: Hashable, Comparable, Sendable, CustomStringConvertible {
    package let milliseconds: UInt64
    package let counter: UInt64
    package let writer: UInt64

    package static func < (a: Stamp, b: Stamp) -> Bool {
        (a.milliseconds, a.counter, a.writer) < (b.milliseconds, b.counter, b.writer)
    }

    package var description: String { encoded }
}

/// What an object is, whatever it is called: class and type, and its material as far as it can be compared
/// without leaving the member in clear (public values, a data object's or certificate's value, the digest of a
/// key's wrapped form under the replication key). Copies of one object on different members have the same one.
package struct Fingerprint: Hashable, Sendable {
    /// Sorted by type.
    package let attributes: [Attribute]
    private let encoded: [UInt8]

    package init(_ attributes: [Attribute]) {
        self.attributes = attributes.sorted { $0.type < $1.type }
        encoded = encodeAttributes(self.attributes)
    }

    package static func == (a: Fingerprint, b: Fingerprint) -> Bool { a.encoded == b.encoded }
    package func hash(into hasher: inout Hasher) { hasher.combine(encoded) }

    /// A pseudo-attribute (vendor-defined range) holding the digest of a key's wrapped form.
    static let wrappedDigest = CK_ATTRIBUTE_TYPE(0x8000_0000) | 0x7068_6100

    package var objectClass: CK_OBJECT_CLASS { attributes[CKA_CLASS]?.ulongValue ?? CK_OBJECT_CLASS.max }

    /// A key told apart by nothing but its class, type and parameters (no public value, no wrapped form): two
    /// different keys can have it, so copies are paired with such a key by their attributes alone.
    package var isWeak: Bool {
        isKey && attributes[Self.wrappedDigest] == nil && attributes[CKA_MODULUS] == nil && attributes[CKA_CHECK_VALUE] == nil
    }

    /// Whether this is `other` without its wrapped form: the same key read where the replication key could not
    /// be found or used.
    package func isWeakForm(of other: Fingerprint) -> Bool {
        attributes[Self.wrappedDigest] == nil && other.attributes[Self.wrappedDigest] != nil
            && attributes == other.attributes.filter { $0.type != Self.wrappedDigest }
    }
    package var isKey: Bool { objectClass == CKO_SECRET_KEY || objectClass == CKO_PRIVATE_KEY }

    /// The material attributes read per class (never a secret or private key's value).
    static func materialTypes(_ objectClass: CK_OBJECT_CLASS) -> [CK_ATTRIBUTE_TYPE] {
        switch objectClass {
        case CK_OBJECT_CLASS(CKO_DATA): [CKA_APPLICATION, CKA_OBJECT_ID, CKA_VALUE]
        case CK_OBJECT_CLASS(CKO_CERTIFICATE): [CKA_CERTIFICATE_TYPE, CKA_VALUE]
        case CK_OBJECT_CLASS(CKO_PUBLIC_KEY): [CKA_KEY_TYPE, CKA_MODULUS, CKA_PUBLIC_EXPONENT, CKA_EC_PARAMS, CKA_EC_POINT,
                                               CKA_PRIME, CKA_SUBPRIME, CKA_BASE, CKA_VALUE]
        case CK_OBJECT_CLASS(CKO_DOMAIN_PARAMETERS): [CKA_KEY_TYPE, CKA_PRIME, CKA_SUBPRIME, CKA_BASE]
        case CK_OBJECT_CLASS(CKO_PRIVATE_KEY): [CKA_KEY_TYPE, CKA_MODULUS, CKA_PUBLIC_EXPONENT, CKA_EC_PARAMS, CKA_EXTRACTABLE]
        case CK_OBJECT_CLASS(CKO_SECRET_KEY): [CKA_KEY_TYPE, CKA_CHECK_VALUE, CKA_EXTRACTABLE]
        default: []
        }
    }

    /// The object's fingerprint, read on the member that holds it. A key with no public value is wrapped under the
    /// replication key (`replicationKey`), and only the digest of the wrapped form is kept.
    package static func read(on token: any TokenBackend, _ session: MemberSession, _ object: MemberObject,
                             replicationKey: MemberObject?) throws(P11Error) -> Fingerprint {
        guard let classBytes = try token.readAttributes(session, object, [CKA_CLASS])[0],
              let objectClass = Attribute(CKA_CLASS, classBytes).ulongValue else {
            throw P11Error.generalError
        }
        var attributes = [Attribute(CKA_CLASS, classBytes)]
        let types = materialTypes(objectClass)
        var extractable = false
        for (type, value) in zip(types, try token.readAttributes(session, object, types)) {
            guard let value else { continue }
            if type == CKA_EXTRACTABLE { extractable = value == [1]; continue }
            if type == CKA_CHECK_VALUE, value.isEmpty { continue }
            attributes.append(Attribute(type, value))
        }
        let hasPublicValue = attributes[CKA_MODULUS] != nil
        var wrapped: [UInt8]? = nil
        if (objectClass == CKO_SECRET_KEY || objectClass == CKO_PRIVATE_KEY), !hasPublicValue, extractable, let replicationKey,
           object != replicationKey {
            do throws(P11Error) {
                wrapped = try ReplicationKey.wrap(on: token, session, replicationKey: replicationKey, key: object)
            } catch where ReplicationKey.wrapRefusals.contains(error.rv) {
                // The key's own doing, on every copy alike, or a member that cannot wrap this way (p11-kit 0.24's client
                // refuses AES key wrap): told apart without its wrapped form (see `isWeakForm`).
            } catch {
                // Anything else (a fault, a handle gone stale, a busy session) is not the key's: no fingerprint now
                // rather than a weaker one than its copies have.
                throw error
            }
        }
        if var blob = wrapped {
            // RFC 5649 is deterministic: copies of one key wrap alike under the shared key. Only a digest is kept.
            let digest = bigEndianBytes(digest64(blob, seed: 1)) + bigEndianBytes(digest64(blob, seed: 2))
            for i in blob.indices { blob[i] = 0 }
            // The check value is not kept beside it: SoftHSM sets one on made keys, not on unwrapped copies.
            attributes.removeAll { $0.type == CKA_CHECK_VALUE }
            attributes.append(Attribute(wrappedDigest, digest))
        } else if objectClass == CKO_SECRET_KEY {
            // Without the wrapped form, no check value either (see above): copies must compare alike.
            attributes.removeAll { $0.type == CKA_CHECK_VALUE }
        }
        return Fingerprint(attributes)
    }
}

/// One write, as recorded on the members.
package struct ReplicaRecord: Sendable {
    package enum Operation: String, Sendable {
        /// The object was made through p11ha, with these attributes.
        case create
        /// The object was found on a member at its first sync, made outside p11ha (its identity is drawn from what it
        /// is, occurrence 0: a host that adopts it too, or a write that records it as created meanwhile, names it
        /// alike).
        case adopt
        /// These attributes were set.
        case set
        /// The object was destroyed: it never exists again (a tombstone).
        case destroy
        /// The object's state folded from the records it supersedes (`Folded`), written by a compaction: the fold of
        /// this record is the fold of those, whatever other records come with it.
        case snapshot
    }

    /// What a snapshot carries beside its attributes: each attribute's own stamp (a change made beside the
    /// compaction, with a stamp between two of the folded ones, must still win or lose as it would have against
    /// them), the creation's stamp and the fingerprint's, and the records it stands for.
    package struct Folded: Sendable, Equatable {
        /// Whether a creation through p11ha (not only an adoption) is among the folded records.
        package var written: Bool
        /// The greatest stamp of a creation among them (a tombstone older than it ends an earlier incarnation).
        package var bornStamp: Stamp?
        package var fingerprintStamp: Stamp
        /// One per attribute of the record, in order.
        package var attributeStamps: [Stamp]
        /// The records it supersedes: never written to a member again, and removed by a compaction.
        package var supersedes: [Stamp]
    }

    package let stamp: Stamp
    package let operation: Operation
    package let object: ObjectUID
    package let fingerprint: Fingerprint
    /// create: the replicated attributes; set: the template set; destroy: none.
    package let attributes: [Attribute]
    /// Records of private objects are private objects themselves (they name labels and IDs).
    package let isPrivate: Bool
    /// A snapshot's stamps and the records it supersedes (nil for every other operation).
    package let folded: Folded?

    static let label = "p11ha record"
    static let application = "p11ha"

    /// The attributes a create records, and that members are made to agree on.
    static let replicatedTypes: [CK_ATTRIBUTE_TYPE] = [CKA_LABEL, CKA_ID]

    /// A snapshot's fourth line: `written born fingerprint-stamp attribute-stamps supersedes`, stamps as
    /// `ms.counter.writer`, lists comma-separated, "-" for none. Readers of the first version of the format skip a
    /// snapshot as unreadable (its operation is unknown to them).
    func encoded() -> [UInt8] {
        let head = "p11ha-record 1 \(operation.rawValue) \(object) \(stamp.milliseconds) \(stamp.counter) \(hex64(stamp.writer)) \(isPrivate ? 1 : 0)\n"
        var text = head + hexEncode(encodeAttributes(fingerprint.attributes)) + "\n" + hexEncode(encodeAttributes(attributes)) + "\n"
        if let folded {
            func list(_ stamps: [Stamp]) -> String { stamps.isEmpty ? "-" : stamps.map(\.encoded).joined(separator: ",") }
            text += "\(folded.written ? 1 : 0) \(folded.bornStamp?.encoded ?? "-") \(folded.fingerprintStamp.encoded) "
                + "\(list(folded.attributeStamps)) \(list(folded.supersedes))\n"
        }
        return Array(text.utf8)
    }

    package init(stamp: Stamp, operation: Operation, object: ObjectUID, fingerprint: Fingerprint, attributes: [Attribute], isPrivate: Bool,
                 folded: Folded? = nil) {
        self.stamp = stamp
        self.operation = operation
        self.object = object
        self.fingerprint = fingerprint
        self.attributes = attributes
        self.isPrivate = isPrivate
        self.folded = operation == .snapshot ? folded : nil
    }

    init?(decoding bytes: [UInt8]) {
        let lines = String(decoding: bytes, as: UTF8.self).split(separator: "\n", omittingEmptySubsequences: false)
        guard lines.count >= 3 else { return nil }
        let head = lines[0].split(separator: " ")
        guard head.count == 8, head[0] == "p11ha-record", head[1] == "1", let operation = Operation(rawValue: String(head[2])),
              let object = ObjectUID(parsing: head[3]), let ms = UInt64(head[4]), let counter = UInt64(head[5]),
              let writer = UInt64(head[6], radix: 16), head[7] == "0" || head[7] == "1",
              let fingerprint = hexDecode(lines[1]).flatMap(decodeAttributes), let attributes = hexDecode(lines[2]).flatMap(decodeAttributes)
        else { return nil }
        var folded: Folded? = nil
        if operation == .snapshot {
            guard lines.count >= 4, let decoded = Folded(decoding: lines[3]), decoded.attributeStamps.count == attributes.count else { return nil }
            folded = decoded
        }
        self.init(stamp: Stamp(milliseconds: ms, counter: counter, writer: writer), operation: operation, object: object,
                  fingerprint: Fingerprint(fingerprint), attributes: attributes, isPrivate: head[7] == "1", folded: folded)
    }

    static func searchTemplate(isPrivate: Bool?) -> [Attribute] {
        var template = [Attribute(CKA_CLASS, ulong: CKO_DATA), Attribute(CKA_TOKEN, bool: true), Attribute(CKA_LABEL, Array(label.utf8))]
        if let isPrivate { template.append(Attribute(CKA_PRIVATE, bool: isPrivate)) }
        return template
    }
}

extension ReplicaRecord.Folded {
    init?(decoding line: Substring) {
        let fields = line.split(separator: " ", omittingEmptySubsequences: false)
        func list(_ text: Substring) -> [Stamp]? {
            if text == "-" { return [] }
            var stamps: [Stamp] = []
            for part in text.split(separator: ",", omittingEmptySubsequences: false) {
                guard let stamp = Stamp(decoding: part) else { return nil }
                stamps.append(stamp)
            }
            return stamps
        }
        guard fields.count == 5, fields[0] == "0" || fields[0] == "1", let fingerprintStamp = Stamp(decoding: fields[2]),
              let attributeStamps = list(fields[3]), let supersedes = list(fields[4]) else { return nil }
        var born: Stamp? = nil
        if fields[1] != "-" {
            guard let stamp = Stamp(decoding: fields[1]) else { return nil }
            born = stamp
        }
        self.init(written: fields[0] == "1", bornStamp: born, fingerprintStamp: fingerprintStamp, attributeStamps: attributeStamps,
                  supersedes: supersedes)
    }
}

extension Stamp {
    /// `ms.counter.writer` (the writer in hex), as a snapshot names stamps.
    var encoded: String { "\(milliseconds).\(counter).\(hex64(writer))" }

    init?(decoding text: Substring) {
        let parts = text.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 3, let ms = UInt64(parts[0]), let counter = UInt64(parts[1]), parts[2].count == 16,
              let writer = UInt64(parts[2], radix: 16) else { return nil }
        self.init(milliseconds: ms, counter: counter, writer: writer)
    }
}

extension ReplicaRecord {
    /// Writes the record on a member: one new token object.
    @discardableResult
    func write(on token: any TokenBackend, _ session: MemberSession) throws(P11Error) -> MemberObject {
        try Self.writeObject(encoded(), isPrivate: isPrivate, on: token, session)
    }

    private static func writeObject(_ value: [UInt8], isPrivate: Bool, on token: any TokenBackend,
                                    _ session: MemberSession) throws(P11Error) -> MemberObject {
        try token.createObject(session, searchTemplate(isPrivate: isPrivate) + [
            Attribute(CKA_APPLICATION, Array(application.utf8)), Attribute(CKA_VALUE, value),
        ])
    }

    /// A batch: several records in one token object, for a repair that gives a member the records it lacks (one
    /// object per record made a returning member's resync write two objects per missed one, the copy and its
    /// record). Its value is `p11ha-records 1 COUNT` and then, per record, a line with its length and the record as
    /// one record object holds it. Every record in it is held by the member as if it stood alone; the batch is
    /// never changed, and goes only when every record in it may go (`ReplicaKeeper.compact`). Readers of the
    /// single-record format skip a batch as unreadable, and write its records again alone.
    static let batchHead = "p11ha-records 1 "
    /// At most this many records, and this many bytes of them, in one batch (HSMs limit an object's size; a record
    /// larger than the limit goes alone).
    static let batchCount = 64
    static let batchBytes = 16 * 1024

    /// `records` (all private, or all public) in one token object; one record is written as itself.
    static func writeBatch(_ records: [ReplicaRecord], on token: any TokenBackend,
                           _ session: MemberSession) throws(P11Error) -> MemberObject {
        guard records.count > 1 else { return try records[0].write(on: token, session) }
        return try writeObject(encodedBatch(records), isPrivate: records[0].isPrivate, on: token, session)
    }

    static func encodedBatch(_ records: [ReplicaRecord]) -> [UInt8] {
        var value = Array((batchHead + "\(records.count)\n").utf8)
        for record in records {
            let encoded = record.encoded()
            value += Array("\(encoded.count)\n".utf8) + encoded
        }
        return value
    }

    /// `records` cut into batches of one privacy each, within `batchCount` and `batchBytes`, in their order.
    static func batches(_ records: [ReplicaRecord]) -> [[ReplicaRecord]] {
        var result: [[ReplicaRecord]] = []
        for isPrivate in [false, true] {
            var batch: [ReplicaRecord] = [], bytes = 0
            for record in records where record.isPrivate == isPrivate {
                let size = record.encoded().count
                if !batch.isEmpty && (batch.count == batchCount || bytes + size > batchBytes) {
                    result.append(batch)
                    batch = []
                    bytes = 0
                }
                batch.append(record)
                bytes += size
            }
            if !batch.isEmpty { result.append(batch) }
        }
        return result
    }

    /// The records a record object holds: itself, or a batch's; nil when any part cannot be decoded.
    static func decodeAll(_ bytes: [UInt8]) -> [ReplicaRecord]? {
        let head = Array(batchHead.utf8)
        guard bytes.count > head.count, Array(bytes[..<head.count]) == head else { return ReplicaRecord(decoding: bytes).map { [$0] } }
        var position = head.count
        func line() -> Int? {
            guard let end = bytes[position...].firstIndex(of: 10), end - position <= 9,
                  let number = Int(String(decoding: bytes[position..<end], as: UTF8.self)), number >= 0 else { return nil }
            position = end + 1
            return number
        }
        guard let count = line(), count > 1 else { return nil }
        var records: [ReplicaRecord] = []
        for _ in 0..<count {
            guard let length = line(), length <= bytes.count - position,
                  let record = ReplicaRecord(decoding: Array(bytes[position..<(position + length)])) else { return nil }
            records.append(record)
            position += length
        }
        guard position == bytes.count else { return nil }
        return records
    }

    /// The records at `handles` (those of one search: a second search may answer differently for a moment), with
    /// their handles (a batch's records share one); one gone meanwhile is left out. A record that cannot be decoded
    /// is skipped (logged once per reading): it cannot be what any writer of this format made.
    /// A record's value is a few hundred bytes (a batch's, up to `batchBytes`): read in one call when it fits.
    static let expectedSize = 2048

    static func read(on token: any TokenBackend, _ session: MemberSession,
                     handles: [MemberObject]) throws(P11Error) -> [(MemberObject, ReplicaRecord)] {
        var result: [(MemberObject, ReplicaRecord)] = []
        var unreadable = 0
        for handle in handles {
            let value: [UInt8]
            do throws(P11Error) {
                value = try token.readAttributes(session, handle, [CKA_VALUE], expected: expectedSize)[0] ?? []
            } catch where error.rv == CKR_OBJECT_HANDLE_INVALID {
                // Removed since the search by a compaction: as if the search had not found it (an application's write
                // that read records failed so once in the multi-writer test).
                continue
            }
            if let records = decodeAll(value) { result += records.map { (handle, $0) } } else { unreadable += 1 }
        }
        if unreadable > 0 { Log.event(.warning, "replication-record-unreadable", "count=\(unreadable)") }
        return result
    }
}

/// Makes the stamps of one process's writes: after every stamp it has made or seen, and never twice the same.
public final class ReplicaClock: Sendable {
    public let writer: UInt64
    private let now: @Sendable () -> UInt64
    private let last = Mutex<(milliseconds: UInt64, counter: UInt64)>((0, 0))

    /// `now`: milliseconds of the wall clock (tests give a clock of their own, so that a seed replays exactly).
    public init(writer: UInt64? = nil, now: (@Sendable () -> UInt64)? = nil) {
        self.writer = writer ?? randomUInt64()
        self.now = now ?? {
            var ts = timespec()
            clock_gettime(CLOCK_REALTIME, &ts)
            return UInt64(max(0, ts.tv_sec)) * 1_000 + UInt64(max(0, ts.tv_nsec)) / 1_000_000
        }
    }

    package func next() -> Stamp {
        let wall = now()
        let (ms, counter) = last.withLock { last -> (UInt64, UInt64) in
            if wall > last.milliseconds { last = (wall, 0) } else { last.counter += 1 }
            return last
        }
        return Stamp(milliseconds: ms, counter: counter, writer: writer)
    }

    /// Keeps later stamps after one seen on a member (another writer's clock may be ahead).
    package func witness(_ stamp: Stamp) {
        last.withLock { last in
            if stamp.milliseconds > last.milliseconds || (stamp.milliseconds == last.milliseconds && stamp.counter > last.counter) {
                last = (stamp.milliseconds, stamp.counter)
            }
        }
    }

    /// Wall-clock milliseconds as this clock reads them (leases expire by it).
    package var milliseconds: UInt64 { now() }
}

func hex64(_ value: UInt64) -> String {
    let text = String(value, radix: 16)
    return String(repeating: "0", count: 16 - text.count) + text
}

/// A 64-bit digest (FNV-1a, then a SplitMix64 finalizer): tells copies apart, not a cryptographic hash.
func digest64(_ bytes: [UInt8], seed: UInt64) -> UInt64 {
    var h: UInt64 = 0xcbf2_9ce4_8422_2325 ^ seed
    for b in bytes { h = (h ^ UInt64(b)) &* 0x0000_0100_0000_01B3 }
    h ^= h >> 30; h = h &* 0xBF58_476D_1CE4_E5B9
    h ^= h >> 27; h = h &* 0x94D0_49BB_1331_11EB
    return h ^ (h >> 31)
}

func randomUInt64() -> UInt64 { UInt64.random(in: .min ... .max) }

func encodeAttributes(_ attributes: [Attribute]) -> [UInt8] {
    var out: [UInt8] = []
    for a in attributes {
        out += bigEndianBytes(UInt64(a.type))
        out += bigEndianBytes(UInt32(a.value.count))
        out += a.value
    }
    return out
}

func decodeAttributes(_ bytes: [UInt8]) -> [Attribute]? {
    var result: [Attribute] = []
    var i = 0
    while i < bytes.count {
        guard i + 12 <= bytes.count else { return nil }
        let type: UInt64 = bigEndianValue(bytes[i..<i + 8])
        let length = Int(bigEndianValue(bytes[i + 8..<i + 12]) as UInt32)
        i += 12
        guard i + length <= bytes.count else { return nil }
        result.append(Attribute(CK_ATTRIBUTE_TYPE(type), Array(bytes[i..<i + length])))
        i += length
    }
    return result
}

/// The previous format's journals (a write count per member, replaced in place): found on a member at its first
/// sync, they are removed once what the member holds is adopted.
enum Journal {
    static let labels: Set<String> = ["p11ha journal", "p11ha public journal"]
}

func hexEncode(_ bytes: [UInt8]) -> String {
    let digits = Array("0123456789abcdef".utf8)
    var out: [UInt8] = []
    out.reserveCapacity(bytes.count * 2)
    for b in bytes { out.append(digits[Int(b >> 4)]); out.append(digits[Int(b & 15)]) }
    return String(decoding: out.isEmpty ? Array("-".utf8) : out, as: UTF8.self)
}

func hexDecode(_ text: Substring) -> [UInt8]? {
    if text == "-" { return [] }
    let chars = Array(text.utf8)
    guard chars.count % 2 == 0 else { return nil }
    func value(_ c: UInt8) -> UInt8? {
        switch c {
        case 48...57: c - 48
        case 97...102: c - 87
        default: nil
        }
    }
    var out: [UInt8] = []
    out.reserveCapacity(chars.count / 2)
    var i = 0
    while i < chars.count {
        guard let hi = value(chars[i]), let lo = value(chars[i + 1]) else { return nil }
        out.append(hi << 4 | lo)
        i += 2
    }
    return out
}
