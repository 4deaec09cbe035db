// The journal on each member: the group's write generation and its recent attribute changes, kept on the
// members themselves so that whichever process sees a member return knows what it missed.
import CInterop
import Glibc

public struct Journal: Equatable, Sendable {
    /// Counts the writes to token objects the member has received (a resynchronized member takes its source's
    /// count); members at the highest count are up to date.
    public var generation: UInt64 = 0
    /// Recent attribute changes (renames above all), to apply to a returning member's copies before comparing.
    public var changes: [Change] = []

    public struct Change: Equatable, Sendable {
        public let generation: UInt64
        /// The object's identity before the change.
        public let identity: [Attribute]
        public let template: [Attribute]
    }

    static let application = "p11ha"
    static let keptChanges = 128

    /// Which journal counts a write: one made with the user logged in, the private journal (its changes name
    /// private objects); one made in a public session (public objects only), the public journal, which any
    /// session can read and write. A member's count of writes is the sum of the journals it can be read from.
    public enum Kind: CaseIterable, Sendable {
        case `private`, `public`

        var label: String { self == .private ? "p11ha journal" : "p11ha public journal" }
        var searchTemplate: [Attribute] {
            [Attribute(CKA_CLASS, ulong: CKO_DATA), Attribute(CKA_LABEL, Array(label.utf8))]
        }
    }

    static let labels = Set(Kind.allCases.map(\.label))

    func encoded() -> [UInt8] {
        var text = "p11ha-journal 1 \(generation)\n"
        for change in changes {
            text += "\(change.generation) \(hexEncode(encode(change.identity))) \(hexEncode(encode(change.template)))\n"
        }
        return Array(text.utf8)
    }

    init() {}

    init?(decoding bytes: [UInt8]) {
        let lines = String(decoding: bytes, as: UTF8.self).split(separator: "\n")
        guard let head = lines.first?.split(separator: " "), head.count == 3, head[0] == "p11ha-journal", head[1] == "1",
              let generation = UInt64(head[2]) else { return nil }
        self.generation = generation
        for line in lines.dropFirst() {
            let fields = line.split(separator: " ")
            guard fields.count == 3, let g = UInt64(fields[0]), let identity = hexDecode(fields[1]).flatMap(decode),
                  let template = hexDecode(fields[2]).flatMap(decode) else { return nil }
            changes.append(Change(generation: g, identity: identity, template: template))
        }
    }
}

private func encode(_ attributes: [Attribute]) -> [UInt8] {
    var out: [UInt8] = []
    for a in attributes {
        out += withUnsafeBytes(of: UInt64(a.type).bigEndian) { Array($0) }
        out += withUnsafeBytes(of: UInt32(a.value.count).bigEndian) { Array($0) }
        out += a.value
    }
    return out
}

private func decode(_ bytes: [UInt8]) -> [Attribute]? {
    var result: [Attribute] = []
    var i = 0
    while i < bytes.count {
        guard i + 12 <= bytes.count else { return nil }
        let type = bytes[i..<i + 8].reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
        let length = Int(bytes[i + 8..<i + 12].reduce(UInt32(0)) { $0 << 8 | UInt32($1) })
        i += 12
        guard i + length <= bytes.count else { return nil }
        result.append(Attribute(CK_ATTRIBUTE_TYPE(type), Array(bytes[i..<i + length])))
        i += length
    }
    return result
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
    var i = 0
    while i < chars.count {
        guard let hi = value(chars[i]), let lo = value(chars[i + 1]) else { return nil }
        out.append(hi << 4 | lo)
        i += 2
    }
    return out
}

extension Journal {
    /// Every journal object of `kind` on the member with its content (normally one; two for a moment while it is
    /// replaced).
    private static func all(on token: any TokenBackend, _ session: MemberSession, _ kind: Kind) throws(P11Error) -> [(MemberObject, Journal)] {
        var result: [(MemberObject, Journal)] = []
        for handle in try token.findObjects(session, kind.searchTemplate) {
            let bytes = try token.readAttributes(session, handle, [CKA_VALUE])[0] ?? []
            result.append((handle, Journal(decoding: bytes) ?? Journal()))
        }
        return result
    }

    /// The member's journal of `kind`; an empty one (generation 0) when it has none yet.
    package static func read(on token: any TokenBackend, _ session: MemberSession, _ kind: Kind) throws(P11Error) -> Journal {
        try all(on: token, session, kind).map(\.1).max { $0.generation < $1.generation } ?? Journal()
    }

    /// Replaces the journal of `kind`: the new one is created before the old one goes (SoftHSM refuses to change a
    /// data object's CKA_VALUE), so a member always has one; an interruption leaves two, and the newer counts.
    static func write(on token: any TokenBackend, _ session: MemberSession, _ journal: Journal, _ kind: Kind) throws(P11Error) {
        let old = try all(on: token, session, kind)
        _ = try token.createObject(session, kind.searchTemplate + [
            Attribute(CKA_APPLICATION, Array(application.utf8)), Attribute(CKA_TOKEN, bool: true),
            Attribute(CKA_PRIVATE, bool: kind == .private), Attribute(CKA_VALUE, journal.encoded()),
        ])
        for (handle, _) in old { try? token.destroyObject(session, handle) }
    }
}

/// A member's journals of the kinds a session can read (both once the user is logged in, the public one before).
struct Journals {
    var byKind: [Journal.Kind: Journal]

    /// The writes the member received, as far as these journals tell.
    var generation: UInt64 { byKind.values.reduce(0) { $0 + $1.generation } }

    static func read(on token: any TokenBackend, _ session: MemberSession, _ kinds: [Journal.Kind]) throws(P11Error) -> Journals {
        var byKind: [Journal.Kind: Journal] = [:]
        for kind in kinds { byKind[kind] = try Journal.read(on: token, session, kind) }
        return Journals(byKind: byKind)
    }

    func write(on token: any TokenBackend, _ session: MemberSession) throws(P11Error) {
        for (kind, journal) in byKind { try Journal.write(on: token, session, journal, kind) }
    }
}

/// An exclusive lock shared by the processes of this host that use a group (nginx workers): held while a
/// journal is updated or a member is brought up to date.
struct HostLock {
    let path: String

    func withLock<T, E: Error>(_ body: () throws(E) -> T) throws(E) -> T {
        let fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o666)
        if fd >= 0 {
            fchmod(fd, 0o666)
            flock(fd, LOCK_EX)
        }
        defer {
            if fd >= 0 {
                flock(fd, LOCK_UN)
                close(fd)
            }
        }
        return try body()
    }
}

/// Keeps the members' journals: a write to token objects counted on every member that received it, and the
/// generations compared after a login.
final class JournalKeeper: Sendable {
    private let fanOut: FanOut

    init(fanOut: FanOut) { self.fanOut = fanOut }

    /// Records a write to token objects that succeeded on `members`: each gets the next generation (and the
    /// change, for attribute changes). A member that cannot record it is marked stale.
    func record(_ session: VirtualSession, on members: [Int], change: (identity: [Attribute], template: [Attribute])? = nil) {
        let group = session.group
        // Without the user's login only public objects can be written, and only the public journal.
        let kind: Journal.Kind = group.login.withLock { $0.userType == CK_USER_TYPE(CKU_USER) } ? .private : .public
        group.hostLock.withLock {
            var journals: [Int: Journal] = [:]
            var unrecorded: [(Member, P11Error)] = []
            for index in members {
                let member = group.members[index]
                guard let s = try? session.memberSession(member) else { continue }
                do throws(P11Error) { journals[index] = try Journal.read(on: member.token, s, kind) } catch { unrecorded.append((member, error)) }
            }
            // Each member counts the writes it received: one that is behind (it missed writes, or lacks objects it
            // could not be given) stays behind by as much, and is never taken for an up-to-date member.
            for (index, var journal) in journals {
                let member = group.members[index]
                journal.generation += 1
                if let change {
                    journal.changes.append(Journal.Change(generation: journal.generation, identity: change.identity, template: change.template))
                    journal.changes.removeFirst(max(0, journal.changes.count - Journal.keptChanges))
                }
                do throws(P11Error) {
                    try Journal.write(on: member.token, try session.memberSession(member), journal, kind)
                } catch {
                    unrecorded.append((member, error))
                }
            }
            if unrecorded.count < members.count {
                // Others recorded the write: these are behind by one, and must be brought up to date.
                for (member, error) in unrecorded { fanOut.markStale(member, reason: "journal not updated: \(error)") }
            } else if let (_, error) = unrecorded.first {
                // None could record it (the request's doing, as a write the session may not journal): the members
                // still agree with each other, and none is behind.
                Log.event(.warning, "journal-not-updated", "group=\(group.name) reason=\"\(error)\"")
            }
            // A member that came into service while the write was under way did not get it.
            for member in group.membersInService where !members.contains(member.index) {
                fanOut.markStale(member, reason: "missed a write made while it was returning")
            }
        }
    }

    /// After a login (when journals become readable): a member whose journal is behind the others' missed
    /// writes, perhaps made by another process while it was away. It leaves service to be brought up to date.
    func checkGenerations(_ group: Group, _ session: VirtualSession) {
        var generations: [(Member, UInt64)] = []
        for member in group.membersInService {
            guard let s = try? session.memberSession(member) else { continue }
            do throws(P11Error) {
                generations.append((member, try Journals.read(on: member.token, s, Journal.Kind.allCases).generation))
            } catch where error.isMemberFault {
                fanOut.fail(member, error)
            } catch {}
        }
        guard let newest = generations.map(\.1).max() else { return }
        for (member, generation) in generations where generation < newest {
            fanOut.markStale(member, reason: "journal generation \(generation) behind \(newest)")
        }
    }
}
