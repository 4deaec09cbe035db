// The journal on each member: the group's write generation and its recent attribute changes, kept on the
// members themselves so that whichever process sees a member return knows what it missed.
import CInterop
import Glibc
import Synchronization

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
/// journal is updated or a member is brought up to date. Never waited for beyond `wait`: whoever holds it (another
/// local user can hold a lock file of a shared directory, or plant one) delays the application by at most that,
/// and what needs the lock then waits in the background (`deferred`), never done without it.
final class HostLock: Sendable {
    let file: HostFileLock
    let group: String
    /// How long a write waits for the lock before its journal record is left to the recovery worker: the
    /// operation-timeout.
    let wait: Duration
    /// Journal records of writes made while the lock could not be had, in order, for the recovery worker.
    private let deferred = Mutex(DeferredJournal())
    /// Wakes the worker that does what waits for the lock (set by `Recovery`).
    private let wakeHook = Mutex<(@Sendable () -> Void)?>(nil)
    private let problems = ProblemReport()

    init(file: HostFileLock, group: String, wait: Duration) {
        self.file = file
        self.group = group
        self.wait = wait
    }

    var path: String { file.path }

    /// Runs `body` holding the lock, or returns nil when it could not be had within `wait` (held elsewhere, or a
    /// directory or file that failed verification), which is logged once per problem (`host-lock-busy`).
    /// `cancelled` ends the wait early.
    func withLock<T, E: Error>(for work: String, waitingUpTo wait: Duration, cancelled: () -> Bool = { false },
                               _ body: () throws(E) -> T) throws(E) -> T? {
        switch try file.withLock(waitingUpTo: wait, cancelled: cancelled, body) {
        case .success(let value):
            problems.clear { Log.event(.info, "host-lock-available", "group=\(group) lock=\(path)") }
            return value
        case .failure(.busy(let waited)):
            problems.report("busy") {
                Log.event(.warning, "host-lock-busy", "group=\(group) lock=\(path) work=\"\(work)\" reason=\"held by another process for \(waited.milliseconds) ms\" deferred=yes")
            }
            return nil
        case .failure(.refused(let problem)):
            problems.report(problem.description) {
                Log.event(.error, problem.event, "group=\(group) path=\(problem.path) reason=\"\(problem.reason)\"")
                Log.event(.warning, "host-lock-busy", "group=\(group) lock=\(path) work=\"\(work)\" reason=\"\(problem.event): \(problem.reason)\" deferred=yes")
            }
            return nil
        }
    }

    /// Whether journal records wait for the lock: until they are written, no member of the group returns to
    /// service in this process (compared with journals that lack them, one could be taken for up to date).
    var hasDeferredWork: Bool { deferred.withLock { !$0.isEmpty } }

    /// Adds a record behind those waiting; `onlyIfOthersWait`: only when records already wait (so that a write
    /// never overtakes an earlier one). Returns whether it was added.
    func deferRecord(_ record: DeferredJournal.Record, onlyIfOthersWait: Bool = false) -> Bool {
        let added = deferred.withLock { pending -> Bool in
            if onlyIfOthersWait && pending.isEmpty { return false }
            pending.append(record)
            return true
        }
        if added { wakeWorker() }
        return added
    }

    /// Takes the waiting records of `kinds` (to write them, holding the lock).
    func takeDeferred(_ kinds: [Journal.Kind]) -> DeferredJournal {
        deferred.withLock { $0.take(kinds) }
    }

    func onDeferredWork(_ wake: @escaping @Sendable () -> Void) {
        wakeHook.withLock { $0 = wake }
    }

    /// Asks the recovery worker to do what waits for the host files (a journal record, a status update).
    func wakeWorker() {
        wakeHook.withLock { $0 }?()
    }
}

/// Journal records waiting to be written, per kind: for each member the writes it received, in segments that each
/// end with an attribute change (whose order and generation matter); bounded like the journal itself (the changes
/// beyond `Journal.keptChanges` are kept as plain counts).
struct DeferredJournal: Sendable {
    struct Record: Sendable {
        let kind: Journal.Kind
        let members: [Int]
        let change: (identity: [Attribute], template: [Attribute])?
    }

    struct Segment: Sendable {
        /// Writes without a change, per member index.
        var writes: [Int: UInt64] = [:]
        /// The write that ends the segment, and the members that received it.
        var change: (members: [Int], identity: [Attribute], template: [Attribute])? = nil
    }

    private(set) var segments: [Journal.Kind: [Segment]] = [:]
    /// Writes recorded, per kind: a member in service that received fewer missed some.
    private(set) var writes: [Journal.Kind: UInt64] = [:]

    var isEmpty: Bool { writes.values.allSatisfy { $0 == 0 } }
    var count: UInt64 { writes.values.reduce(0, +) }

    init() {}

    init(_ record: Record) { append(record) }

    mutating func append(_ record: Record) {
        var list = segments[record.kind] ?? []
        if list.isEmpty || list[list.count - 1].change != nil { list.append(Segment()) }
        if let change = record.change {
            list[list.count - 1].change = (record.members, change.identity, change.template)
        } else {
            for index in record.members { list[list.count - 1].writes[index, default: 0] += 1 }
        }
        // Past the journal's own bound the oldest change becomes a plain count in the next segment.
        while list.filter({ $0.change != nil }).count > Journal.keptChanges, let oldest = list.first?.change {
            var merged = list[1]
            for (index, n) in list[0].writes { merged.writes[index, default: 0] += n }
            for index in oldest.members { merged.writes[index, default: 0] += 1 }
            list[1] = merged
            list.removeFirst()
        }
        segments[record.kind] = list
        writes[record.kind, default: 0] += 1
    }

    mutating func take(_ kinds: [Journal.Kind]) -> DeferredJournal {
        var taken = DeferredJournal()
        for kind in kinds {
            taken.segments[kind] = segments.removeValue(forKey: kind)
            taken.writes[kind] = writes.removeValue(forKey: kind)
        }
        return taken
    }

    /// How many of the writes of `kind` member `index` received.
    func received(_ kind: Journal.Kind, by index: Int) -> UInt64 {
        (segments[kind] ?? []).reduce(0) { sum, segment in
            sum + (segment.writes[index] ?? 0) + (segment.change?.members.contains(index) == true ? 1 : 0)
        }
    }

    /// `journal` with this member's writes of `kind` counted, as if each had been recorded in turn.
    func applied(to journal: Journal, _ kind: Journal.Kind, member index: Int) -> Journal {
        var journal = journal
        for segment in segments[kind] ?? [] {
            journal.generation += segment.writes[index] ?? 0
            if let change = segment.change, change.members.contains(index) {
                journal.generation += 1
                journal.changes.append(Journal.Change(generation: journal.generation, identity: change.identity, template: change.template))
            }
        }
        journal.changes.removeFirst(max(0, journal.changes.count - Journal.keptChanges))
        return journal
    }
}

/// Keeps the members' journals: a write to token objects counted on every member that received it, and the
/// generations compared after a login.
final class JournalKeeper: Sendable {
    private let fanOut: FanOut

    init(fanOut: FanOut) { self.fanOut = fanOut }

    /// Records a write to token objects that succeeded on `members`: each gets the next generation (and the
    /// change, for attribute changes). A member that cannot record it is marked stale. Under the host lock; when
    /// the lock cannot be had within its wait (held by another process, or refused), the record is left to the
    /// recovery worker and the application's call goes on.
    func record(_ session: VirtualSession, on members: [Int], change: (identity: [Attribute], template: [Attribute])? = nil) {
        let group = session.group
        // Without the user's login only public objects can be written, and only the public journal.
        let kind: Journal.Kind = group.login.withLock { $0.userType == CK_USER_TYPE(CKU_USER) } ? .private : .public
        let record = DeferredJournal.Record(kind: kind, members: members, change: change)
        let lock = group.hostLock
        // Records already wait (the lock was busy a moment ago): this one joins them at once rather than waiting
        // for the lock again at every write.
        if lock.deferRecord(record, onlyIfOthersWait: true) { return markMissed(group, members) }
        let written = lock.withLock(for: "journal record", waitingUpTo: lock.wait) { () -> Bool in
            // Records deferred while this one waited go first.
            if lock.deferRecord(record, onlyIfOthersWait: true) { return false }
            write(DeferredJournal(record), to: group) { member in try? session.memberSession(member) }
            return true
        }
        if written == nil { _ = lock.deferRecord(record) }
        markMissed(group, members)
    }

    /// A member that came into service while the write was under way did not get it.
    private func markMissed(_ group: Group, _ members: [Int]) {
        for member in group.membersInService where !members.contains(member.index) {
            fanOut.markStale(member, reason: "missed a write made while it was returning")
        }
    }

    /// Writes the journal records that waited for the host lock, for the recovery worker: private ones only while
    /// the user is logged in (their journal is readable only then). Returns whether records still wait.
    func writeDeferred(_ group: Group, waitingUpTo wait: Duration, cancelled: () -> Bool = { false }) -> Bool {
        let lock = group.hostLock
        guard lock.hasDeferredWork else { return false }
        let written = lock.withLock(for: "deferred journal records", waitingUpTo: wait, cancelled: cancelled) { () -> UInt64 in
            // The login state holds still while they are written (a logout would hide the private journal midway).
            group.loginChanges.withLock { _ -> UInt64 in
                let loggedIn = group.login.withLock { $0.userType == CK_USER_TYPE(CKU_USER) }
                let taken = lock.takeDeferred(loggedIn ? Journal.Kind.allCases : [.public])
                guard !taken.isEmpty else { return 0 }
                var opened: [Int: MemberSession] = [:]
                defer { for (index, s) in opened { group.members[index].token.closeSession(s) } }
                write(taken, to: group) { member in
                    // Members out of service meanwhile are compared when they return; they are not asked now.
                    guard member.isInService else { return nil }
                    if let s = opened[member.index] { return s }
                    guard let s = try? member.token.openSession(readWrite: true) else { return nil }
                    opened[member.index] = s
                    return s
                }
                for member in group.membersInService {
                    if Journal.Kind.allCases.contains(where: { taken.received($0, by: member.index) < taken.writes[$0] ?? 0 }) {
                        fanOut.markStale(member, reason: "missed a write made while it was returning")
                    }
                }
                return taken.count
            }
        }
        if let written, written > 0 {
            Log.event(.info, "journal-recorded-late", "group=\(group.name) writes=\(written) lock=\(lock.path)")
        }
        return lock.hasDeferredWork
    }

    /// Writes `records` to the journals of the members that received them (`session`: the member session to use,
    /// nil to skip that member). A member that cannot record them is marked stale when others could.
    private func write(_ records: DeferredJournal, to group: Group, session: (Member) -> MemberSession?) {
        for kind in Journal.Kind.allCases where (records.writes[kind] ?? 0) > 0 {
            var journals: [Int: Journal] = [:]
            var unrecorded: [(Member, P11Error)] = []
            var asked = 0
            for member in group.members where records.received(kind, by: member.index) > 0 {
                guard let s = session(member) else { continue }
                asked += 1
                do throws(P11Error) { journals[member.index] = try Journal.read(on: member.token, s, kind) } catch { unrecorded.append((member, error)) }
            }
            // Each member counts the writes it received: one that is behind (it missed writes, or lacks objects it
            // could not be given) stays behind by as much, and is never taken for an up-to-date member.
            for (index, journal) in journals {
                let member = group.members[index]
                do throws(P11Error) {
                    guard let s = session(member) else { continue }
                    try Journal.write(on: member.token, s, records.applied(to: journal, kind, member: index), kind)
                } catch {
                    unrecorded.append((member, error))
                }
            }
            if unrecorded.count < asked {
                // Others recorded the write: these are behind, and must be brought up to date.
                for (member, error) in unrecorded { fanOut.markStale(member, reason: "journal not updated: \(error)") }
            } else if let (_, error) = unrecorded.first {
                // None could record it (the request's doing, as a write the session may not journal): the members
                // still agree with each other, and none is behind.
                Log.event(.warning, "journal-not-updated", "group=\(group.name) reason=\"\(error)\"")
            }
        }
    }

    /// After a login (when journals become readable): a member whose journal is behind the others' missed
    /// writes, perhaps made by another process while it was away. It leaves service to be brought up to date.
    func checkGenerations(_ group: Group, _ session: VirtualSession) {
        var generations: [(Member, UInt64)] = []
        var suspects = FanOut.Suspects()
        for member in group.membersInService {
            guard let s = try? session.memberSession(member) else { continue }
            do throws(P11Error) {
                generations.append((member, try Journals.read(on: member.token, s, Journal.Kind.allCases).generation))
            } catch where error.isMemberFault {
                // A fault-class answer alone is no evidence (SoftHSM answers searches CKR_GENERAL_ERROR for reasons
                // of its own): the evidence rule decides, as for the application's calls.
                fanOut.accuse(member, error, &suspects)
            } catch {}
        }
        if generations.isEmpty {
            _ = fanOut.verdict(on: suspects, otherwise: .deviceError)
        } else {
            fanOut.convict(suspects)
        }
        guard let newest = generations.map(\.1).max() else { return }
        for (member, generation) in generations where generation < newest {
            fanOut.markStale(member, reason: "journal generation \(generation) behind \(newest)")
        }
    }
}
