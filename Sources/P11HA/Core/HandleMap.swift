// The handle map: p11ha's own session and object handles, and what each stands for on the members. Each table
// resolves a handle in one critical section and records a change in another; no member is called under its lock.
import CInterop
import Synchronization

/// A session handle p11ha gave the application (never a member's: see `MemberSession`).
public struct SessionHandle: Hashable, Sendable, CustomStringConvertible {
    public let raw: CK_SESSION_HANDLE
    public init(_ raw: CK_SESSION_HANDLE) { self.raw = raw }
    public var description: String { "session \(raw)" }
}

/// An object handle p11ha gave the application (never a member's: see `MemberObject`).
public struct ObjectHandle: Hashable, Sendable, CustomStringConvertible {
    public let raw: CK_OBJECT_HANDLE
    public init(_ raw: CK_OBJECT_HANDLE) { self.raw = raw }
    public var description: String { "object \(raw)" }
}

/// The virtual sessions of one initialization, by handle.
final class SessionTable: Sendable {
    private let table = Mutex<[SessionHandle: VirtualSession]>([:])
    private let nextHandle = Atomic<UInt>(1)

    /// A handle no session had in this initialization.
    func newHandle() -> SessionHandle {
        SessionHandle(CK_SESSION_HANDLE(nextHandle.add(1, ordering: .relaxed).oldValue))
    }

    @inline(__always)
    func resolve(_ handle: SessionHandle) throws(P11Error) -> VirtualSession {
        guard let session = table.withLock({ $0[handle] }) else { throw P11Error.sessionHandleInvalid }
        return session
    }

    func insert(_ session: VirtualSession) {
        table.withLock { $0[session.handle] = session }
    }

    func remove(_ handle: SessionHandle) throws(P11Error) -> VirtualSession {
        guard let session = table.withLock({ $0.removeValue(forKey: handle) }) else { throw P11Error.sessionHandleInvalid }
        return session
    }

    func all(in group: Group) -> [VirtualSession] {
        table.withLock { $0.values.filter { $0.group === group } }
    }

    func removeAll() -> [VirtualSession] {
        table.withLock { table in
            defer { table.removeAll() }
            return Array(table.values)
        }
    }
}

/// Virtual object handles and, for each, the handle of its copy on each member.
struct ObjectTable {
    struct Record {
        var copies: [MemberObject?]
        var identity: ObjectIdentity?
        /// For a session object: the virtual session that owns it.
        var owner: SessionHandle?
        /// Its copies are to be found again by identity (handles a module may have renumbered: SoftHSM gives
        /// private objects new handles after a logout).
        var refind = false
        /// Its replication identity, once known (made here, or named at a first write): the records of its later
        /// writes name it by this, whatever it has been renamed to since.
        var uid: ObjectUID? = nil
    }

    struct CopyKey: Hashable {
        let member: Int
        let handle: MemberObject
    }

    private(set) var records: [ObjectHandle: Record] = [:]
    private var byCopy: [CopyKey: ObjectHandle] = [:]
    private var byIdentity: [ObjectIdentity: [ObjectHandle]] = [:]

    static let nextHandle = Atomic<UInt>(1)

    subscript(handle: ObjectHandle) -> Record? { records[handle] }

    func handle(member: Int, copy: MemberObject) -> ObjectHandle? {
        byCopy[CopyKey(member: member, handle: copy)]
    }

    mutating func insert(_ record: Record) -> ObjectHandle {
        let handle = ObjectHandle(CK_OBJECT_HANDLE(Self.nextHandle.add(1, ordering: .relaxed).oldValue))
        records[handle] = record
        for (member, copy) in record.copies.enumerated() {
            if let copy { byCopy[CopyKey(member: member, handle: copy)] = handle }
        }
        if let identity = record.identity { byIdentity[identity, default: []].append(handle) }
        return handle
    }

    /// Attaches a member's copy, found by search, to the object with the same identity that lacks one there.
    /// Counts the ends of the application's login (`forgetCopiesForRefind`). A member handle asked for before one
    /// and recorded after it would be stale (a logout renumbers private objects in SoftHSM): it would name another
    /// object, or give one object a second virtual handle at the next search. Handles are recorded only if this
    /// has not moved since they were asked for, read under the same lock as the recording.
    private(set) var generation: UInt64 = 0

    /// The first object known by `identity`, without recording anything.
    func object(identity: ObjectIdentity) -> ObjectHandle? {
        byIdentity[identity]?.first
    }

    mutating func attach(member: Int, copy: MemberObject, identity: ObjectIdentity, memberCount: Int) -> ObjectHandle {
        for handle in byIdentity[identity] ?? [] where records[handle]?.copies[member] == nil {
            records[handle]!.copies[member] = copy
            byCopy[CopyKey(member: member, handle: copy)] = handle
            return handle
        }
        var copies = [MemberObject?](repeating: nil, count: memberCount)
        copies[member] = copy
        return insert(Record(copies: copies, identity: identity, owner: nil))
    }

    @discardableResult
    mutating func remove(_ handle: ObjectHandle) -> Record? {
        guard let record = records.removeValue(forKey: handle) else { return nil }
        for (member, copy) in record.copies.enumerated() {
            if let copy { byCopy[CopyKey(member: member, handle: copy)] = nil }
        }
        if let identity = record.identity {
            byIdentity[identity]?.removeAll { $0 == handle }
            if byIdentity[identity]?.isEmpty == true { byIdentity[identity] = nil }
        }
        return record
    }

    /// Forgets the copy on one member (destroyed there); the object goes when no copy is left.
    mutating func removeCopy(_ handle: ObjectHandle, member: Int) {
        guard let copy = records[handle]?.copies[member] else { return }
        records[handle]!.copies[member] = nil
        byCopy[CopyKey(member: member, handle: copy)] = nil
        if records[handle]!.copies.allSatisfy({ $0 == nil }) { remove(handle) }
    }

    mutating func setUID(_ handle: ObjectHandle, _ uid: ObjectUID) {
        if records[handle] != nil { records[handle]!.uid = uid }
    }

    /// Sets (or clears) the copy of an object on one member, as found again after the member returned.
    mutating func setCopy(_ handle: ObjectHandle, member: Int, copy: MemberObject?) {
        guard records[handle] != nil else { return }
        if let old = records[handle]!.copies[member], byCopy[CopyKey(member: member, handle: old)] == handle {
            byCopy[CopyKey(member: member, handle: old)] = nil
        }
        records[handle]!.copies[member] = copy
        if let copy { byCopy[CopyKey(member: member, handle: copy)] = handle }
    }

    /// Forgets (or replaces) an object's identity after its attributes changed.
    mutating func replaceIdentity(_ handle: ObjectHandle, _ identity: ObjectIdentity?) {
        guard let old = records[handle]?.identity else {
            if let identity { setIdentity(handle, identity) }
            return
        }
        byIdentity[old]?.removeAll { $0 == handle }
        if byIdentity[old]?.isEmpty == true { byIdentity[old] = nil }
        records[handle]!.identity = nil
        if let identity { setIdentity(handle, identity) }
    }

    mutating func setIdentity(_ handle: ObjectHandle, _ identity: ObjectIdentity) {
        guard records[handle] != nil, records[handle]!.identity == nil else { return }
        records[handle]!.identity = identity
        byIdentity[identity, default: []].append(handle)
    }

    /// After the application's login ended: token objects whose identity is known are found again by it at
    /// their next use; the members' old handles are dropped.
    mutating func forgetCopiesForRefind() {
        generation += 1
        for (handle, record) in records where record.owner == nil && record.identity != nil {
            for (member, copy) in record.copies.enumerated() {
                if let copy, byCopy[CopyKey(member: member, handle: copy)] == handle { byCopy[CopyKey(member: member, handle: copy)] = nil }
            }
            records[handle]!.copies = record.copies.map { _ in nil }
            records[handle]!.refind = true
        }
    }

    mutating func removeObjects(ownedBy session: SessionHandle) {
        for (handle, record) in records where record.owner == session { remove(handle) }
    }
}
