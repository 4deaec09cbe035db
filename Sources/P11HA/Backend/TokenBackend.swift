// The seam between the group core and a token: one protocol for "a token I can call", with member handles
// typed apart from the application's virtual handles.
import CInterop

/// A session handle on one member, as that member's module gave it (never one of p11ha's virtual handles).
public struct MemberSession: Hashable, Sendable, CustomStringConvertible {
    public let raw: CK_SESSION_HANDLE
    public init(_ raw: CK_SESSION_HANDLE) { self.raw = raw }
    public var description: String { "member session \(raw)" }
}

/// An object handle on one member, as that member's module gave it (never one of p11ha's virtual handles).
public struct MemberObject: Hashable, Sendable, CustomStringConvertible {
    public let raw: CK_OBJECT_HANDLE
    public init(_ raw: CK_OBJECT_HANDLE) { self.raw = raw }
    public var description: String { "member object \(raw)" }
}

/// Why a token could not be reached when the group started.
public enum ConnectFailure: Error, CustomStringConvertible, Sendable {
    /// The configuration cannot work (no module there, no token or several match the URI): p11ha refuses to start.
    case configuration(String)
    /// The token does not answer now (server down, slot silent, past the deadline): the member starts failed,
    /// and recovery takes it in when it answers.
    case unreachable(String)

    public var description: String {
        switch self {
        case .configuration(let message), .unreachable(let message): message
        }
    }
}

/// A token p11ha can call: a module's slot (`ModuleBackend`), the same under a deadline (`DeadlineBackend`), or
/// an in-process token for tests. Calls answer with the token's own code as `P11Error.member`; a backend that
/// gives up on a call (its deadline) throws `P11Error.deadlineExceeded`.
///
/// Only `Member` holds a backend; everything above talks to members.
public protocol TokenBackend: AnyObject, Sendable {
    // MARK: life

    /// Loads what the token needs (module, link) and finds the token.
    func connect() throws(ConnectFailure)
    /// Finds the token again after it came back; `restartingModule`: start its module afresh first (a
    /// restarted device, a reconnected server). Sessions and object handles from before are then invalid.
    func reconnect(restartingModule: Bool) throws(P11Error)
    /// Names the module instance the token belongs to: tokens with the same name share its state, its start
    /// and its stop.
    var moduleName: String { get }
    /// Finalizes and initializes the token's module again, when p11ha started it (else CKR_FUNCTION_NOT_SUPPORTED,
    /// not a member fault), and finds the token again. Every token of the module loses its sessions, login and
    /// object handles: the core takes the others out of service first (`Recovery.restartModule`).
    func restartModule() throws(P11Error)
    /// Lets go of the module (the last user finalizes it). Calls after this are not expected.
    func disconnect()
    /// Calls still inside the token (one past its deadline stays inside until the token returns).
    var callsUnderWay: Int { get }
    /// Calls whose caller gave up at the deadline and that are still inside the token: a token with one is
    /// wedged, and gets no more calls that could wait for it (closing sessions, finalizing).
    var callsOverdue: Int { get }

    // MARK: slot, token, mechanisms

    func tokenInfo() throws(P11Error) -> CK_TOKEN_INFO
    func mechanismList() throws(P11Error) -> [CK_MECHANISM_TYPE]
    func mechanismInfo(_ type: CK_MECHANISM_TYPE) throws(P11Error) -> CK_MECHANISM_INFO

    // MARK: sessions and login

    func openSession(readWrite: Bool) throws(P11Error) -> MemberSession
    /// Best effort: a session that cannot be closed is the token's to forget.
    func closeSession(_ session: MemberSession)
    func login(_ session: MemberSession, userType: CK_USER_TYPE, pin: Secret?) throws(P11Error)
    func logout(_ session: MemberSession) throws(P11Error)
    func initPIN(_ session: MemberSession, pin: Secret) throws(P11Error)
    func setPIN(_ session: MemberSession, old: Secret, new: Secret) throws(P11Error)

    // MARK: objects

    func createObject(_ session: MemberSession, _ template: [Attribute]) throws(P11Error) -> MemberObject
    func copyObject(_ session: MemberSession, _ object: MemberObject, _ template: [Attribute]) throws(P11Error) -> MemberObject
    func destroyObject(_ session: MemberSession, _ object: MemberObject) throws(P11Error)
    func objectSize(_ session: MemberSession, _ object: MemberObject) throws(P11Error) -> CK_ULONG
    /// C_GetAttributeValue with the token's answer per attribute. The return value is the token's, including
    /// CKR_ATTRIBUTE_SENSITIVE, CKR_ATTRIBUTE_TYPE_INVALID and CKR_BUFFER_TOO_SMALL, which still fill the
    /// other attributes; only a call that could not be made throws.
    func attributeValues(_ session: MemberSession, _ object: MemberObject,
                         _ queries: [AttributeQuery]) throws(P11Error) -> (rv: CK_RV, answers: [AttributeAnswer])
    func setAttributeValues(_ session: MemberSession, _ object: MemberObject, _ template: [Attribute]) throws(P11Error)
    /// A whole search: init, every match, final.
    func findObjects(_ session: MemberSession, _ template: [Attribute]) throws(P11Error) -> [MemberObject]

    // MARK: keys

    func generateKey(_ session: MemberSession, _ mechanism: Mechanism, _ template: [Attribute]) throws(P11Error) -> MemberObject
    func generateKeyPair(_ session: MemberSession, _ mechanism: Mechanism, publicTemplate: [Attribute],
                         privateTemplate: [Attribute]) throws(P11Error) -> (public: MemberObject, private: MemberObject)
    func wrapKey(_ session: MemberSession, _ mechanism: Mechanism, wrappingKey: MemberObject, key: MemberObject,
                 capacity: Int?) throws(P11Error) -> Output
    func unwrapKey(_ session: MemberSession, _ mechanism: Mechanism, unwrappingKey: MemberObject, wrapped: [UInt8],
                   _ template: [Attribute]) throws(P11Error) -> MemberObject
    func deriveKey(_ session: MemberSession, _ mechanism: Mechanism, baseKey: MemberObject,
                   _ template: [Attribute]) throws(P11Error) -> MemberObject
    func generateRandom(_ session: MemberSession, count: Int) throws(P11Error) -> [UInt8]
    func seedRandom(_ session: MemberSession, _ seed: [UInt8]) throws(P11Error)

    // MARK: cryptographic operations

    /// C_*Init of `kind`; `key` is nil for digest.
    func operationInit(_ kind: OperationKind, _ session: MemberSession, _ mechanism: Mechanism,
                       key: MemberObject?) throws(P11Error)
    /// The single-part call of an operation that produces output (every kind but verify). `capacity` nil asks
    /// for the length (the operation stays active); too small a capacity throws CKR_BUFFER_TOO_SMALL with
    /// `neededLength`.
    func singlePart(_ kind: OperationKind, _ session: MemberSession, _ input: [UInt8], capacity: Int?) throws(P11Error) -> Output
    /// A multi-part update without output (digest, sign, verify).
    func update(_ kind: OperationKind, _ session: MemberSession, _ input: [UInt8]) throws(P11Error)
    /// A multi-part update of encryption or decryption, which may produce output.
    func cipherUpdate(_ kind: OperationKind, _ session: MemberSession, _ input: [UInt8], capacity: Int?) throws(P11Error) -> Output
    /// C_*Final of encrypt, decrypt, digest or sign.
    func final(_ kind: OperationKind, _ session: MemberSession, capacity: Int?) throws(P11Error) -> Output
    func digestKey(_ session: MemberSession, _ key: MemberObject) throws(P11Error)
    func verify(_ session: MemberSession, _ data: [UInt8], signature: [UInt8]) throws(P11Error)
    func verifyFinal(_ session: MemberSession, signature: [UInt8]) throws(P11Error)
    /// C_GetOperationState: the session's operations, in the token's own format.
    func operationState(_ session: MemberSession) throws(P11Error) -> [UInt8]
    /// C_SetOperationState.
    func setOperationState(_ session: MemberSession, _ state: [UInt8], encryptionKey: MemberObject?,
                           authenticationKey: MemberObject?) throws(P11Error)
}

extension TokenBackend {
    /// The values of attributes that are not sensitive (identity, class), or nil for each one refused.
    /// One call with a buffer of `expected` bytes for each reads most attributes (class, label, ID, flags); only
    /// those it does not give (too large, or refused: the answer does not say which) are asked for their lengths
    /// and read again. Two calls for every read made a returning member's enumeration four calls per object.
    public func readAttributes(_ session: MemberSession, _ object: MemberObject,
                               _ types: [CK_ATTRIBUTE_TYPE], expected: Int = 256) throws(P11Error) -> [[UInt8]?] {
        // Attribute arrays hold pointers the member would follow: never a buffer it did not size.
        let direct = types.indices.filter { !attributeArrayTypes.contains(types[$0]) }
        var rest = types.indices.filter { attributeArrayTypes.contains(types[$0]) }
        var result = [[UInt8]?](repeating: nil, count: types.count)
        if !direct.isEmpty {
            let first = try attributeValues(session, object, direct.map { AttributeQuery(types[$0], capacity: expected) })
            if first.rv != CKR_OK && !partialAttributeAnswers.contains(first.rv) { throw P11Error.member(first.rv) }
            for (i, answer) in zip(direct, first.answers) {
                if answer.length == CK_UNAVAILABLE_INFORMATION_VALUE || answer.length > CK_ULONG(expected) {
                    rest.append(i)
                } else {
                    result[i] = answer.value ?? []
                }
            }
            if rest.isEmpty { return result }
            rest.sort()
        }
        let values = try readAttributesInTwoCalls(session, object, rest.map { types[$0] })
        for (i, value) in zip(rest, values) { result[i] = value }
        return result
    }

    /// The lengths, then the values of those that have one (none refused or empty: no second call).
    private func readAttributesInTwoCalls(_ session: MemberSession, _ object: MemberObject,
                                          _ types: [CK_ATTRIBUTE_TYPE]) throws(P11Error) -> [[UInt8]?] {
        let sizes = try attributeValues(session, object, types.map { AttributeQuery($0, capacity: nil) })
        if sizes.rv != CKR_OK && !partialAttributeAnswers.contains(sizes.rv) { throw P11Error.member(sizes.rv) }
        var result: [[UInt8]?] = sizes.answers.map { $0.length == CK_UNAVAILABLE_INFORMATION_VALUE ? nil : [] }
        let needed = types.indices.filter { sizes.answers[$0].length != CK_UNAVAILABLE_INFORMATION_VALUE && sizes.answers[$0].length > 0 }
        if needed.isEmpty { return result }
        let values = try attributeValues(session, object, needed.map { AttributeQuery(types[$0], capacity: Int(sizes.answers[$0].length)) })
        if values.rv != CKR_OK && !partialAttributeAnswers.contains(values.rv) { throw P11Error.member(values.rv) }
        for (i, answer) in zip(needed, values.answers) {
            // Refused now though its length was given (changed meanwhile): as refused.
            result[i] = answer.length == CK_UNAVAILABLE_INFORMATION_VALUE ? nil : (answer.value ?? [])
        }
        return result
    }
}

/// C_GetAttributeValue's answers that still carry the other attributes' values.
let partialAttributeAnswers: Set<CK_RV> = [
    CK_RV(CKR_ATTRIBUTE_SENSITIVE), CK_RV(CKR_ATTRIBUTE_TYPE_INVALID), CK_RV(CKR_BUFFER_TOO_SMALL),
]
