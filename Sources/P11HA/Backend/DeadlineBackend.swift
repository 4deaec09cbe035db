// Any backend under the operation-timeout: every call, its module's start and stop and the token's location
// included, runs on a worker thread, and the caller waits no longer than the deadline.
import CInterop
import Synchronization

public final class DeadlineBackend: TokenBackend, @unchecked Sendable {
    let base: any TokenBackend
    let timeout: Duration
    private let executor = Executor()

    public init(_ base: any TokenBackend, timeout: Duration) {
        self.base = base
        self.timeout = timeout
    }

    /// Runs `work` within the deadline; past it, the caller gets `late` (a member fault) and the work goes on
    /// without it.
    @inline(__always)
    private func run<T, E: Error>(late: E, _ work: @escaping () throws(E) -> T) throws(E) -> T {
        guard let result = executor.run(timeout: timeout, work) else { throw late }
        return try result.get()
    }

    /// A member call within the deadline: past it, `P11Error.deadlineExceeded`.
    @inline(__always)
    private func run<T>(_ work: @escaping () throws(P11Error) -> T) throws(P11Error) -> T {
        try run(late: P11Error.deadlineExceeded, work)
    }

    // MARK: life

    public func connect() throws(ConnectFailure) {
        try run(late: .unreachable("no answer within the operation-timeout")) { [base] () throws(ConnectFailure) in try base.connect() }
    }

    public func reconnect(restartingModule: Bool) throws(P11Error) {
        try run { [base] () throws(P11Error) in try base.reconnect(restartingModule: restartingModule) }
    }

    public var moduleName: String { base.moduleName }

    public func restartModule() throws(P11Error) {
        try run { [base] () throws(P11Error) in try base.restartModule() }
    }

    /// A token with a call still inside it (past its deadline) is left as it is: finalizing a module under a
    /// call in flight can crash it (p11-kit's client aborts), and waiting for it could be for ever.
    public func disconnect() {
        if callsOverdue == 0 {
            _ = try? run { [base] () throws(P11Error) in base.disconnect() }
        }
    }

    public var callsUnderWay: Int { executor.busy + base.callsUnderWay }
    public var callsOverdue: Int { executor.overdue + base.callsOverdue }

    // MARK: slot, token, mechanisms

    public func tokenInfo() throws(P11Error) -> CK_TOKEN_INFO {
        try run { [base] () throws(P11Error) in try base.tokenInfo() }
    }

    public func mechanismList() throws(P11Error) -> [CK_MECHANISM_TYPE] {
        try run { [base] () throws(P11Error) in try base.mechanismList() }
    }

    public func mechanismInfo(_ type: CK_MECHANISM_TYPE) throws(P11Error) -> CK_MECHANISM_INFO {
        try run { [base] () throws(P11Error) in try base.mechanismInfo(type) }
    }

    // MARK: sessions and login

    public func openSession(readWrite: Bool) throws(P11Error) -> MemberSession {
        try run { [base] () throws(P11Error) in try base.openSession(readWrite: readWrite) }
    }

    public func closeSession(_ session: MemberSession) {
        _ = try? run { [base] () throws(P11Error) in base.closeSession(session) }
    }

    public func login(_ session: MemberSession, userType: CK_USER_TYPE, pin: Secret?) throws(P11Error) {
        try run { [base] () throws(P11Error) in try base.login(session, userType: userType, pin: pin) }
    }

    public func logout(_ session: MemberSession) throws(P11Error) {
        try run { [base] () throws(P11Error) in try base.logout(session) }
    }

    public func initPIN(_ session: MemberSession, pin: Secret) throws(P11Error) {
        try run { [base] () throws(P11Error) in try base.initPIN(session, pin: pin) }
    }

    public func setPIN(_ session: MemberSession, old: Secret, new: Secret) throws(P11Error) {
        try run { [base] () throws(P11Error) in try base.setPIN(session, old: old, new: new) }
    }

    // MARK: objects

    public func createObject(_ session: MemberSession, _ template: [Attribute]) throws(P11Error) -> MemberObject {
        try run { [base] () throws(P11Error) in try base.createObject(session, template) }
    }

    public func copyObject(_ session: MemberSession, _ object: MemberObject, _ template: [Attribute]) throws(P11Error) -> MemberObject {
        try run { [base] () throws(P11Error) in try base.copyObject(session, object, template) }
    }

    public func destroyObject(_ session: MemberSession, _ object: MemberObject) throws(P11Error) {
        try run { [base] () throws(P11Error) in try base.destroyObject(session, object) }
    }

    public func objectSize(_ session: MemberSession, _ object: MemberObject) throws(P11Error) -> CK_ULONG {
        try run { [base] () throws(P11Error) in try base.objectSize(session, object) }
    }

    public func attributeValues(_ session: MemberSession, _ object: MemberObject,
                                _ queries: [AttributeQuery]) throws(P11Error) -> (rv: CK_RV, answers: [AttributeAnswer]) {
        try run { [base] () throws(P11Error) in try base.attributeValues(session, object, queries) }
    }

    public func setAttributeValues(_ session: MemberSession, _ object: MemberObject, _ template: [Attribute]) throws(P11Error) {
        try run { [base] () throws(P11Error) in try base.setAttributeValues(session, object, template) }
    }

    public func findObjects(_ session: MemberSession, _ template: [Attribute]) throws(P11Error) -> [MemberObject] {
        try run { [base] () throws(P11Error) in try base.findObjects(session, template) }
    }

    // MARK: keys

    public func generateKey(_ session: MemberSession, _ mechanism: Mechanism, _ template: [Attribute]) throws(P11Error) -> MemberObject {
        try run { [base] () throws(P11Error) in try base.generateKey(session, mechanism, template) }
    }

    public func generateKeyPair(_ session: MemberSession, _ mechanism: Mechanism, publicTemplate: [Attribute],
                                privateTemplate: [Attribute]) throws(P11Error) -> (public: MemberObject, private: MemberObject) {
        try run { [base] () throws(P11Error) in
            try base.generateKeyPair(session, mechanism, publicTemplate: publicTemplate, privateTemplate: privateTemplate)
        }
    }

    public func wrapKey(_ session: MemberSession, _ mechanism: Mechanism, wrappingKey: MemberObject, key: MemberObject,
                        capacity: Int?) throws(P11Error) -> Output {
        try run { [base] () throws(P11Error) in
            try base.wrapKey(session, mechanism, wrappingKey: wrappingKey, key: key, capacity: capacity)
        }
    }

    public func unwrapKey(_ session: MemberSession, _ mechanism: Mechanism, unwrappingKey: MemberObject, wrapped: [UInt8],
                          _ template: [Attribute]) throws(P11Error) -> MemberObject {
        try run { [base] () throws(P11Error) in
            try base.unwrapKey(session, mechanism, unwrappingKey: unwrappingKey, wrapped: wrapped, template)
        }
    }

    public func deriveKey(_ session: MemberSession, _ mechanism: Mechanism, baseKey: MemberObject,
                          _ template: [Attribute]) throws(P11Error) -> MemberObject {
        try run { [base] () throws(P11Error) in try base.deriveKey(session, mechanism, baseKey: baseKey, template) }
    }

    public func generateRandom(_ session: MemberSession, count: Int) throws(P11Error) -> [UInt8] {
        try run { [base] () throws(P11Error) in try base.generateRandom(session, count: count) }
    }

    public func seedRandom(_ session: MemberSession, _ seed: [UInt8]) throws(P11Error) {
        try run { [base] () throws(P11Error) in try base.seedRandom(session, seed) }
    }

    // MARK: cryptographic operations

    public func operationInit(_ kind: OperationKind, _ session: MemberSession, _ mechanism: Mechanism,
                              key: MemberObject?) throws(P11Error) {
        try run { [base] () throws(P11Error) in try base.operationInit(kind, session, mechanism, key: key) }
    }

    public func singlePart(_ kind: OperationKind, _ session: MemberSession, _ input: [UInt8], capacity: Int?) throws(P11Error) -> Output {
        try run { [base] () throws(P11Error) in try base.singlePart(kind, session, input, capacity: capacity) }
    }

    public func update(_ kind: OperationKind, _ session: MemberSession, _ input: [UInt8]) throws(P11Error) {
        try run { [base] () throws(P11Error) in try base.update(kind, session, input) }
    }

    public func cipherUpdate(_ kind: OperationKind, _ session: MemberSession, _ input: [UInt8], capacity: Int?) throws(P11Error) -> Output {
        try run { [base] () throws(P11Error) in try base.cipherUpdate(kind, session, input, capacity: capacity) }
    }

    public func final(_ kind: OperationKind, _ session: MemberSession, capacity: Int?) throws(P11Error) -> Output {
        try run { [base] () throws(P11Error) in try base.final(kind, session, capacity: capacity) }
    }

    public func digestKey(_ session: MemberSession, _ key: MemberObject) throws(P11Error) {
        try run { [base] () throws(P11Error) in try base.digestKey(session, key) }
    }

    public func verify(_ session: MemberSession, _ data: [UInt8], signature: [UInt8]) throws(P11Error) {
        try run { [base] () throws(P11Error) in try base.verify(session, data, signature: signature) }
    }

    public func verifyFinal(_ session: MemberSession, signature: [UInt8]) throws(P11Error) {
        try run { [base] () throws(P11Error) in try base.verifyFinal(session, signature: signature) }
    }

    public func operationState(_ session: MemberSession) throws(P11Error) -> [UInt8] {
        try run { [base] () throws(P11Error) in try base.operationState(session) }
    }

    public func setOperationState(_ session: MemberSession, _ state: [UInt8], encryptionKey: MemberObject?,
                                  authenticationKey: MemberObject?) throws(P11Error) {
        try run { [base] () throws(P11Error) in
            try base.setOperationState(session, state, encryptionKey: encryptionKey, authenticationKey: authenticationKey)
        }
    }
}
