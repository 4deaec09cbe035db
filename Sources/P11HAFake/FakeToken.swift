// One process's connection to a fake token: its sessions, session objects, login state and object handles, and
// the gate every call passes (counters, faults, crash and restart state).
import CInterop
import P11HA
import Synchronization

/// A `TokenBackend` over a `FakeTokenStore`. Several connections to one store model several processes or hosts
/// sharing one HSM: token objects and PINs are shared, everything else is per connection, as in PKCS#11.
public final class FakeToken: TokenBackend {
    public let store: FakeTokenStore
    /// This connection's own faults: one host's link or module failing while others still reach the token.
    public let faults: FakeFaults
    /// Numbers connections of one store from 1; handles of different connections differ by it.
    public let number: Int

    enum Login: Sendable { case none, user, so }

    /// Where a handle points: a token object in the store, or a session object of this connection.
    enum ObjectRef: Hashable, Sendable {
        case token(UInt64)
        case session(UInt64)
    }

    struct Session: Sendable {
        var readWrite: Bool
        var operations: [OperationKind: FakeOperation] = [:]
    }

    struct SessionObject: Sendable {
        var object: FakeObject
        /// PKCS#11: a session object dies with the session that created it, though every session may use it.
        var creator: CK_SESSION_HANDLE
    }

    struct Connection: Sendable {
        var connected = false
        /// The store's and this connection's crash counts when the module was (re)started.
        var crashesSeen = (store: 0, own: 0)
        var sessions: [CK_SESSION_HANDLE: Session] = [:]
        var login = Login.none
        var handles: [CK_OBJECT_HANDLE: ObjectRef] = [:]
        var refHandles: [ObjectRef: CK_OBJECT_HANDLE] = [:]
        var sessionObjects: [UInt64: SessionObject] = [:]
        /// Never reset, not even by a restart: an old handle must never name a new object or session.
        var nextHandle: CK_ULONG
        var nextSession: CK_ULONG
        /// This process's index of the token's objects and the store's generation it last took, with the store's
        /// `staleIndexes` (nil: none built since the module restarted; the next search or write builds it).
        var index: (objects: Set<UInt64>, generation: UInt64)? = nil
    }

    let state: Mutex<Connection>
    private let underWay = Atomic<Int>(0)

    /// The module instance this connection is a token of, shared with other tokens' connections (nil: its own).
    public let module: FakeModule?

    public init(store: FakeTokenStore, module: FakeModule? = nil) {
        self.store = store
        self.module = module
        number = store.newConnectionNumber()
        faults = FakeFaults(seed: mix64(store.seed ^ UInt64(number) &* 0x51ED))
        let base = CK_ULONG(number) << 16
        state = Mutex(Connection(nextHandle: base + 1, nextSession: base + 1))
        module?.add(self)
    }

    // MARK: the gate

    /// Every call: counted, refused while the token or link is down, put through the scripted faults, refused
    /// before connect or after a crash until the module restarts; then `body` runs under both locks.
    /// `ending`: the session whose operation of `kind` this call continues: a scripted error ends that operation,
    /// as any error but CKR_BUFFER_TOO_SMALL does on a real token.
    func gate<T>(_ call: FakeCall, kind: OperationKind? = nil, ending: MemberSession? = nil, needsModule: Bool = true,
                 _ body: (inout Connection, inout FakeTokenStore.State) throws(P11Error) -> T) throws(P11Error) -> T {
        underWay.add(1, ordering: .relaxed)
        defer { underWay.subtract(1, ordering: .relaxed) }
        store.faults.record(call)
        faults.record(call)
        try checkUp()
        do throws(P11Error) {
            try faults.apply(call, kind: kind)
            try store.faults.apply(call, kind: kind)
        } catch {
            if let ending, let kind, error.rv != CKR_BUFFER_TOO_SMALL {
                state.withLock { connection in
                    if connection.sessions[ending.raw] != nil { connection.sessions[ending.raw]!.operations[kind] = nil }
                }
            }
            throw error
        }
        try checkUp()  // the token may have gone down while the call hung or slept
        let crashes = (store: store.faults.crashes, own: faults.crashes)
        return try state.withLock { (connection) throws(P11Error) -> T in
            if needsModule && (!connection.connected || connection.crashesSeen != crashes) {
                throw P11Error.member(CK_RV(CKR_CRYPTOKI_NOT_INITIALIZED))
            }
            return try store.state.withLock { (storeState) throws(P11Error) -> T in try body(&connection, &storeState) }
        }
    }

    private func checkUp() throws(P11Error) {
        if store.faults.isDown || faults.isDown { throw P11Error.member(CK_RV(CKR_DEVICE_ERROR)) }
    }

    // MARK: life

    public func connect() throws(ConnectFailure) {
        do {
            try gate(.connect, needsModule: false) { connection, storeState in
                if connection.connected { return }
                connection.connected = true
                connection.crashesSeen = (store.faults.crashes, faults.crashes)
                // SoftHSM indexes its tokens when it starts.
                if store.staleIndexes { _ = connection.indexed(&storeState) }
            }
        } catch {
            throw ConnectFailure.unreachable("fake token \(store.label): \(error)")
        }
    }

    public func reconnect(restartingModule: Bool) throws(P11Error) {
        try gate(.reconnect, needsModule: false) { connection, _ throws(P11Error) in
            let crashes = (store: store.faults.crashes, own: faults.crashes)
            if restartingModule {
                connection.restart()
                connection.connected = true
                connection.crashesSeen = crashes
            } else if !connection.connected {
                // The module never started (the token did not answer at connect): this is its first start, as
                // ModuleBackend's reconnect starts a module its connect could not.
                connection.connected = true
                connection.crashesSeen = crashes
            } else if connection.crashesSeen != crashes {
                // A crashed module stays uninitialized until it is started afresh.
                throw P11Error.member(CK_RV(CKR_CRYPTOKI_NOT_INITIALIZED))
            }
        }
    }

    public var moduleName: String { module?.name ?? "fake \(store.label) connection \(number)" }

    /// Ends every session, login and handle of every connection in the module (and their wedges), as a real
    /// module's C_Finalize and C_Initialize do.
    public func restartModule() throws(P11Error) {
        store.faults.record(.restartModule)
        faults.record(.restartModule)
        try checkUp()
        for connection in module?.connections ?? [self] { connection.restartedWithModule() }
    }

    private func restartedWithModule() {
        faults.unwedge()
        let crashes = (store: store.faults.crashes, own: faults.crashes)
        state.withLock { connection in
            connection.restart()
            connection.connected = true
            connection.crashesSeen = crashes
        }
    }

    /// Lets go even of a dead token (after any scripted hang or latency): a process can always finalize.
    public func disconnect() {
        _ = try? gate(.disconnect, needsModule: false) { _, _ in }
        state.withLock { connection in
            connection.restart()
            connection.connected = false
        }
    }

    public var callsUnderWay: Int { underWay.load(ordering: .relaxed) }
    /// A fake has no deadline of its own (a `DeadlineBackend` around it counts its overdue calls).
    public var callsOverdue: Int { 0 }

    // MARK: slot, token, mechanisms

    public func tokenInfo() throws(P11Error) -> CK_TOKEN_INFO {
        try gate(.tokenInfo) { connection, storeState in
            var info = CK_TOKEN_INFO()
            setField(&info.label, store.label)
            setField(&info.manufacturerID, "p11ha fake")
            setField(&info.model, "FakeToken")
            setField(&info.serialNumber, store.serial)
            setField(&info.utcTime, "")
            var flags = CKF_RNG | CKF_LOGIN_REQUIRED | CKF_TOKEN_INITIALIZED
            if storeState.userPIN != nil { flags |= CKF_USER_PIN_INITIALIZED }
            info.flags = CK_FLAGS(flags)
            info.ulMaxSessionCount = CK_ULONG(CK_EFFECTIVELY_INFINITE)
            info.ulMaxRwSessionCount = CK_ULONG(CK_EFFECTIVELY_INFINITE)
            info.ulSessionCount = CK_ULONG(connection.sessions.count)
            info.ulRwSessionCount = CK_ULONG(connection.sessions.values.filter(\.readWrite).count)
            info.ulMaxPinLen = 255
            info.ulMinPinLen = 4
            info.ulTotalPublicMemory = CK_UNAVAILABLE_INFORMATION_VALUE
            info.ulFreePublicMemory = CK_UNAVAILABLE_INFORMATION_VALUE
            info.ulTotalPrivateMemory = CK_UNAVAILABLE_INFORMATION_VALUE
            info.ulFreePrivateMemory = CK_UNAVAILABLE_INFORMATION_VALUE
            info.hardwareVersion = CK_VERSION(major: 1, minor: 0)
            info.firmwareVersion = CK_VERSION(major: 1, minor: 0)
            return info
        }
    }

    public func mechanismList() throws(P11Error) -> [CK_MECHANISM_TYPE] {
        try gate(.mechanismList) { _, _ in store.mechanisms }
    }

    public func mechanismInfo(_ type: CK_MECHANISM_TYPE) throws(P11Error) -> CK_MECHANISM_INFO {
        try gate(.mechanismInfo) { _, _ throws(P11Error) in
            guard store.mechanisms.contains(type), let mechanism = FakeMechanisms.named(type) else {
                throw P11Error.member(CK_RV(CKR_MECHANISM_INVALID))
            }
            return mechanism.info
        }
    }

    // MARK: sessions and login

    public func openSession(readWrite: Bool) throws(P11Error) -> MemberSession {
        try gate(.openSession) { connection, _ throws(P11Error) in
            if connection.login == .so && !readWrite { throw P11Error.member(CK_RV(CKR_SESSION_READ_WRITE_SO_EXISTS)) }
            let handle = connection.nextSession
            connection.nextSession += 1
            connection.sessions[handle] = Session(readWrite: readWrite)
            return MemberSession(handle)
        }
    }

    public func closeSession(_ session: MemberSession) {
        _ = try? gate(.closeSession) { connection, _ in connection.close(session.raw) }
    }

    public func login(_ session: MemberSession, userType: CK_USER_TYPE, pin: Secret?) throws(P11Error) {
        try gate(.login) { connection, storeState throws(P11Error) in
            _ = try connection.session(session)
            // This token has no protected authentication path: a PIN must be given.
            guard let pin else { throw P11Error.member(CK_RV(CKR_ARGUMENTS_BAD)) }
            let given = pin.withBytes { Array($0) }
            switch userType {
            case CK_USER_TYPE(CKU_SO):
                if connection.login == .so { throw P11Error.member(CK_RV(CKR_USER_ALREADY_LOGGED_IN)) }
                if connection.login == .user { throw P11Error.member(CK_RV(CKR_USER_ANOTHER_ALREADY_LOGGED_IN)) }
                if connection.sessions.values.contains(where: { !$0.readWrite }) {
                    throw P11Error.member(CK_RV(CKR_SESSION_READ_ONLY_EXISTS))
                }
                guard given == storeState.soPIN else { throw P11Error.member(CK_RV(CKR_PIN_INCORRECT)) }
                connection.login = .so
            case CK_USER_TYPE(CKU_USER):
                if connection.login == .user { throw P11Error.member(CK_RV(CKR_USER_ALREADY_LOGGED_IN)) }
                if connection.login == .so { throw P11Error.member(CK_RV(CKR_USER_ANOTHER_ALREADY_LOGGED_IN)) }
                guard let userPIN = storeState.userPIN else { throw P11Error.member(CK_RV(CKR_USER_PIN_NOT_INITIALIZED)) }
                guard given == userPIN else { throw P11Error.member(CK_RV(CKR_PIN_INCORRECT)) }
                connection.login = .user
            case CK_USER_TYPE(CKU_CONTEXT_SPECIFIC):
                guard connection.login == .user else { throw P11Error.member(CK_RV(CKR_USER_NOT_LOGGED_IN)) }
                guard given == storeState.userPIN else { throw P11Error.member(CK_RV(CKR_PIN_INCORRECT)) }
            default:
                throw P11Error.member(CK_RV(CKR_USER_TYPE_INVALID))
            }
        }
    }

    public func logout(_ session: MemberSession) throws(P11Error) {
        try gate(.logout) { connection, _ throws(P11Error) in
            _ = try connection.session(session)
            guard connection.login != .none else { throw P11Error.member(CK_RV(CKR_USER_NOT_LOGGED_IN)) }
            connection.login = .none
        }
    }

    public func initPIN(_ session: MemberSession, pin: Secret) throws(P11Error) {
        try gate(.initPIN) { connection, storeState throws(P11Error) in
            let s = try connection.session(session)
            guard connection.login == .so else { throw P11Error.member(CK_RV(CKR_USER_NOT_LOGGED_IN)) }
            guard s.readWrite else { throw P11Error.member(CK_RV(CKR_SESSION_READ_ONLY)) }
            storeState.userPIN = try checkedPIN(pin)
        }
    }

    public func setPIN(_ session: MemberSession, old: Secret, new: Secret) throws(P11Error) {
        try gate(.setPIN) { connection, storeState throws(P11Error) in
            let s = try connection.session(session)
            guard s.readWrite else { throw P11Error.member(CK_RV(CKR_SESSION_READ_ONLY)) }
            let oldPIN = old.withBytes { Array($0) }
            if connection.login == .so {
                guard oldPIN == storeState.soPIN else { throw P11Error.member(CK_RV(CKR_PIN_INCORRECT)) }
                storeState.soPIN = try checkedPIN(new)
            } else {
                guard let userPIN = storeState.userPIN else { throw P11Error.member(CK_RV(CKR_USER_PIN_NOT_INITIALIZED)) }
                guard oldPIN == userPIN else { throw P11Error.member(CK_RV(CKR_PIN_INCORRECT)) }
                storeState.userPIN = try checkedPIN(new)
            }
        }
    }

    private func checkedPIN(_ pin: Secret) throws(P11Error) -> [UInt8] {
        guard (4...255).contains(pin.count) else { throw P11Error.member(CK_RV(CKR_PIN_LEN_RANGE)) }
        return pin.withBytes { Array($0) }
    }

    // MARK: inspection, for tests

    /// The token object this connection's handle names, as the test sees the device (sensitive values included);
    /// nil for an unknown handle or a session object.
    public func tokenObject(_ handle: MemberObject) -> [Attribute]? {
        guard case .token(let id) = state.withLock({ $0.handles[handle.raw] }) else { return nil }
        return store.state.withLock { $0.objects[id]?.template }
    }

    /// Whether this connection is logged in as the user (PKCS#11 keeps login per application, not per session).
    public var isUserLoggedIn: Bool { state.withLock { $0.login == .user } }

    public var isSOLoggedIn: Bool { state.withLock { $0.login == .so } }

    public var openSessionCount: Int { state.withLock { $0.sessions.count } }
}

extension FakeToken.Connection {
    func session(_ session: MemberSession) throws(P11Error) -> FakeToken.Session {
        guard let s = sessions[session.raw] else { throw P11Error.member(CK_RV(CKR_SESSION_HANDLE_INVALID)) }
        return s
    }

    /// Closes a session: its session objects go, and the login with the last session.
    mutating func close(_ handle: CK_SESSION_HANDLE) {
        guard sessions.removeValue(forKey: handle) != nil else { return }
        for (id, entry) in sessionObjects where entry.creator == handle { forget(.session(id)) }
        if sessions.isEmpty { login = .none }
    }

    /// What a module restart leaves: nothing of this connection (token objects stay in the store).
    mutating func restart() {
        index = nil
        sessions = [:]
        sessionObjects = [:]
        handles = [:]
        refHandles = [:]
        login = .none
    }

    /// The token objects this process's searches can show (`FakeTokenStore.staleIndexes`): its index, rebuilt
    /// only when the generation moved since this process last took it.
    mutating func indexed(_ store: inout FakeTokenStore.State) -> Set<UInt64> {
        if let index, index.generation == store.generation { return index.objects }
        index = (Set(store.objects.keys), store.generation)
        return index!.objects
    }

    /// A token object created or destroyed by this process, as SoftHSM commits it: the generation moves on and
    /// this process takes the new value along, its index rebuilt only if it had none.
    mutating func committed(_ id: UInt64, created: Bool, in store: inout FakeTokenStore.State) {
        var objects = index?.objects ?? Set(store.objects.keys)
        if created { objects.insert(id) } else { objects.remove(id) }
        store.generation += 1
        index = (objects, store.generation)
    }

    mutating func forget(_ ref: FakeToken.ObjectRef) {
        if case .session(let id) = ref { sessionObjects[id] = nil }
        if let handle = refHandles.removeValue(forKey: ref) { handles[handle] = nil }
    }

    /// This connection's handle for `ref`: the one it already had, or a new one kept for the connection's life.
    mutating func handle(for ref: FakeToken.ObjectRef) -> CK_OBJECT_HANDLE {
        if let handle = refHandles[ref] { return handle }
        let handle = nextHandle
        nextHandle += 1
        handles[handle] = ref
        refHandles[ref] = handle
        return handle
    }

    /// The object behind a handle, if it still exists and this login may see it (private objects: the user's).
    func object(_ handle: MemberObject, in store: FakeTokenStore.State) -> (ref: FakeToken.ObjectRef, object: FakeObject)? {
        guard let ref = handles[handle.raw] else { return nil }
        let object: FakeObject?
        switch ref {
        case .token(let id): object = store.objects[id]
        case .session(let id): object = sessionObjects[id]?.object
        }
        guard let object, !object.isPrivate || login == .user else { return nil }
        return (ref, object)
    }

    /// As `object`, answering `invalid` (CKR_OBJECT_HANDLE_INVALID, CKR_KEY_HANDLE_INVALID...) for none.
    func object(_ handle: MemberObject, in store: FakeTokenStore.State,
                invalid: UInt) throws(P11Error) -> (ref: FakeToken.ObjectRef, object: FakeObject) {
        guard let found = object(handle, in: store) else { throw P11Error.member(CK_RV(invalid)) }
        return found
    }

    /// Whether a session may hold `object`: token objects need a R/W session, private ones the user's login.
    func checkMayHold(_ object: FakeObject, in session: FakeToken.Session) throws(P11Error) {
        if object.isToken && !session.readWrite { throw P11Error.member(CK_RV(CKR_SESSION_READ_ONLY)) }
        if object.isPrivate && login != .user { throw P11Error.member(CK_RV(CKR_USER_NOT_LOGGED_IN)) }
    }

    /// Whether this login may mark a key trusted. Only the SO may on SoftHSM; the fake lets any login, so
    /// that tests can make a replication key from a user session.
    var mayTrust: Bool { login != .none }

    /// Stores a new object (token objects in the store, session objects here) and hands out its handle.
    mutating func insert(_ object: FakeObject, session: MemberSession, in store: inout FakeTokenStore.State,
                         owner: FakeTokenStore) throws(P11Error) -> MemberObject {
        let s = try self.session(session)
        try checkMayHold(object, in: s)
        if object.bool(CKA_TRUSTED) && !mayTrust { throw P11Error.member(CK_RV(CKR_ATTRIBUTE_READ_ONLY)) }
        let id = owner.takeID(&store)
        if object.isToken {
            store.objects[id] = object
            if owner.staleIndexes { committed(id, created: true, in: &store) }
            return MemberObject(handle(for: .token(id)))
        }
        sessionObjects[id] = FakeToken.SessionObject(object: object, creator: session.raw)
        return MemberObject(handle(for: .session(id)))
    }

    /// Replaces an object's attributes where it lives.
    mutating func update(_ ref: FakeToken.ObjectRef, _ object: FakeObject, in store: inout FakeTokenStore.State) {
        switch ref {
        case .token(let id): store.objects[id] = object
        case .session(let id): sessionObjects[id]?.object = object
        }
    }
}

