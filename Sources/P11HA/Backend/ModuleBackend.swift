// A member reached through a PKCS#11 module: dlopen'd in this process, or p11-kit's client module for a remote
// member (`via`). The only place, with the C ABI face, where raw pointers and CK_FUNCTION_LIST appear.
import CInterop
import Glibc
import Synchronization

public final class ModuleBackend: TokenBackend, @unchecked Sendable {
    let uri: TokenURI
    /// A p11-kit server address: the token is reached through p11-kit's client module.
    let via: String?
    /// This process is a child that inherited modules from its parent.
    let afterFork: Bool
    /// Set once, by the first `connect` or `reconnect` that loads the module.
    private let loaded = AtomicLazyReference<LoadedModule>()
    /// The token's slot; `unlocated` until found (a remote member's slot can change when its server restarts).
    private let slotValue = Atomic<UInt>(ModuleBackend.unlocated)
    /// Whether this member counts as a user of its module (its start succeeded): only then does it release it.
    private let acquired = Atomic<Bool>(false)
    private static let unlocated = UInt.max

    public init(uri: TokenURI, via: String?, afterFork: Bool) {
        self.uri = uri
        self.via = via
        self.afterFork = afterFork
    }

    private var slot: CK_SLOT_ID { CK_SLOT_ID(slotValue.load(ordering: .acquiring)) }
    /// Valid only once connected: the core calls a member only after `connect` or `reconnect` succeeded.
    private var f: UnsafeMutablePointer<CK_FUNCTION_LIST> { loaded.load()!.functions }

    // MARK: life

    public func connect() throws(ConnectFailure) {
        let module = try load()
        try ModuleRegistry.acquire(module, remote: via != nil, afterFork: afterFork)
        acquired.store(true, ordering: .releasing)
        do throws(ConnectFailure) {
            slotValue.store(UInt(try locate(in: module)), ordering: .releasing)
        } catch {
            // A remote member whose server is down, or a slot that does not answer, is a failed member, not a
            // configuration error: the module stays acquired and recovery locates the token later.
            if via != nil, case .configuration(let message) = error { throw .unreachable(message) }
            throw error
        }
    }

    public func reconnect(restartingModule: Bool) throws(P11Error) {
        do throws(ConnectFailure) {
            let module = try load()
            if !acquired.load(ordering: .acquiring) {
                // The first connect never got the module started (its C_Initialize did not answer in time, or
                // is still inside it: then acquire refuses at once).
                try ModuleRegistry.acquire(module, remote: via != nil, afterFork: afterFork)
                acquired.store(true, ordering: .releasing)
            } else if restartingModule {
                guard ModuleRegistry.restart(module, exclusive: via != nil) else { throw ConnectFailure.unreachable("restart") }
            }
            slotValue.store(UInt(try locate(in: module)), ordering: .releasing)
        } catch {
            throw P11Error.member(CK_RV(CKR_DEVICE_ERROR))
        }
    }

    /// Modules are shared by path (and by server address for remote members): see `ModuleRegistry.load`.
    public var moduleName: String { via.map { "\(uri.modulePath) via \($0)" } ?? uri.modulePath }

    public func restartModule() throws(P11Error) {
        let module: LoadedModule
        do throws(ConnectFailure) { module = try load() } catch { throw P11Error.member(CK_RV(CKR_DEVICE_ERROR)) }
        switch ModuleRegistry.restartShared(module) {
        case .restarted: break
        case .notOurs: throw P11Error(CK_RV(CKR_FUNCTION_NOT_SUPPORTED))
        case .busy: throw P11Error.member(CK_RV(CKR_DEVICE_ERROR))
        case .failed(let rv): throw P11Error.member(rv)
        }
        do throws(ConnectFailure) {
            slotValue.store(UInt(try locate(in: module)), ordering: .releasing)
        } catch {
            throw P11Error.member(CK_RV(CKR_DEVICE_ERROR))
        }
    }

    public func disconnect() {
        if let module = loaded.load(), acquired.exchange(false, ordering: .acquiringAndReleasing) {
            ModuleRegistry.release(module)
        }
    }

    public var callsUnderWay: Int { 0 }
    public var callsOverdue: Int { 0 }

    private func load() throws(ConnectFailure) -> LoadedModule {
        if let module = loaded.load() { return module }
        return loaded.storeIfNil(try ModuleRegistry.load(path: uri.modulePath, address: via))
    }

    /// Finds the one slot of `module` whose token `uri` selects.
    private func locate(in module: LoadedModule) throws(ConnectFailure) -> CK_SLOT_ID {
        guard ForkGate.enter(module) else { throw .unreachable("the process is exiting") }
        defer { ForkGate.exit(module) }
        let f = module.functions
        var info = CK_INFO()
        _ = f.pointee.C_GetInfo!(&info)
        var count: CK_ULONG = 0
        var rv = f.pointee.C_GetSlotList!(CK_BBOOL(CK_TRUE), nil, &count)
        var slots = [CK_SLOT_ID](repeating: 0, count: Int(count))
        if rv == CKR_OK && count > 0 { rv = f.pointee.C_GetSlotList!(CK_BBOOL(CK_TRUE), &slots, &count) }
        guard rv == CKR_OK else { throw .unreachable("C_GetSlotList returned \(ckrName(rv))") }
        var matches: [(CK_SLOT_ID, String)] = []
        var silent = 0
        for slot in slots.prefix(Int(count)) {
            var slotInfo = CK_SLOT_INFO()
            var tokenInfo = CK_TOKEN_INFO()
            guard f.pointee.C_GetSlotInfo!(slot, &slotInfo) == CKR_OK, f.pointee.C_GetTokenInfo!(slot, &tokenInfo) == CKR_OK else {
                silent += 1
                continue
            }
            if uri.matches(module: &info, slot: &slotInfo, token: &tokenInfo) {
                matches.append((slot, fieldString(tokenInfo.label)))
            }
        }
        switch matches.count {
        case 1: return matches[0].0
        case 0:
            let message = "no token of \(module.path) matches \(uri.displayText)" + (silent > 0 ? " (\(silent) slots did not answer)" : "")
            throw silent > 0 ? .unreachable(message) : .configuration(message)
        default:
            let labels = matches.map { "'\($0.1)'" }.joined(separator: ", ")
            throw .configuration("\(matches.count) tokens of \(module.path) match \(uri.displayText) (\(labels)); name one")
        }
    }

    /// Every call into the module goes through here (or through `gated`).
    @inline(__always)
    private func call(_ body: () -> CK_RV) throws(P11Error) {
        let rv = gated(body)
        if rv != CKR_OK { throw P11Error.member(rv) }
    }

    /// Counts the call in flight for fork, which waits for it (`ForkGate`).
    @inline(__always)
    private func gated(_ body: () -> CK_RV) -> CK_RV {
        let module = loaded.load()!
        // The process is exiting: the module is left alone (see `ForkGate.exiting`).
        guard ForkGate.enter(module) else { return CK_RV(CKR_DEVICE_ERROR) }
        defer { ForkGate.exit(module) }
        return body()
    }

    // MARK: slot, token, mechanisms (the token's calls: raw pointers stop here)

    public func tokenInfo() throws(P11Error) -> CK_TOKEN_INFO {
        var info = CK_TOKEN_INFO()
        try call { f.pointee.C_GetTokenInfo!(slot, &info) }
        return info
    }

    public func mechanismList() throws(P11Error) -> [CK_MECHANISM_TYPE] {
        var count: CK_ULONG = 0
        try call { f.pointee.C_GetMechanismList!(slot, nil, &count) }
        var list = [CK_MECHANISM_TYPE](repeating: 0, count: Int(count))
        try call { f.pointee.C_GetMechanismList!(slot, &list, &count) }
        return Array(list.prefix(Int(count)))
    }

    public func mechanismInfo(_ type: CK_MECHANISM_TYPE) throws(P11Error) -> CK_MECHANISM_INFO {
        var info = CK_MECHANISM_INFO()
        try call { f.pointee.C_GetMechanismInfo!(slot, type, &info) }
        return info
    }

    // MARK: sessions and login

    public func openSession(readWrite: Bool) throws(P11Error) -> MemberSession {
        var flags = CK_FLAGS(CKF_SERIAL_SESSION)
        if readWrite { flags |= CK_FLAGS(CKF_RW_SESSION) }
        var handle: CK_SESSION_HANDLE = 0
        try call { f.pointee.C_OpenSession!(slot, flags, nil, nil, &handle) }
        return MemberSession(handle)
    }

    public func closeSession(_ session: MemberSession) {
        _ = gated { f.pointee.C_CloseSession!(session.raw) }
    }

    public func login(_ session: MemberSession, userType: CK_USER_TYPE, pin: Secret?) throws(P11Error) {
        if let pin {
            try pin.withBytes { (bytes) throws(P11Error) in
                let base = UnsafeMutablePointer(mutating: bytes.baseAddress?.assumingMemoryBound(to: UInt8.self))
                try call { f.pointee.C_Login!(session.raw, userType, base, CK_ULONG(bytes.count)) }
            }
        } else {
            try call { f.pointee.C_Login!(session.raw, userType, nil, 0) }
        }
    }

    public func logout(_ session: MemberSession) throws(P11Error) {
        try call { f.pointee.C_Logout!(session.raw) }
    }

    public func initPIN(_ session: MemberSession, pin: Secret) throws(P11Error) {
        try pin.withBytes { (bytes) throws(P11Error) in
            let base = UnsafeMutablePointer(mutating: bytes.baseAddress?.assumingMemoryBound(to: UInt8.self))
            try call { f.pointee.C_InitPIN!(session.raw, base, CK_ULONG(bytes.count)) }
        }
    }

    public func setPIN(_ session: MemberSession, old: Secret, new: Secret) throws(P11Error) {
        try old.withBytes { (o) throws(P11Error) in
            try new.withBytes { (n) throws(P11Error) in
                let op = UnsafeMutablePointer(mutating: o.baseAddress?.assumingMemoryBound(to: UInt8.self))
                let np = UnsafeMutablePointer(mutating: n.baseAddress?.assumingMemoryBound(to: UInt8.self))
                try call { f.pointee.C_SetPIN!(session.raw, op, CK_ULONG(o.count), np, CK_ULONG(n.count)) }
            }
        }
    }

    // MARK: objects

    public func createObject(_ session: MemberSession, _ template: [Attribute]) throws(P11Error) -> MemberObject {
        var handle: CK_OBJECT_HANDLE = 0
        try call { withCTemplate(template) { f.pointee.C_CreateObject!(session.raw, $0, $1, &handle) } }
        return MemberObject(handle)
    }

    public func copyObject(_ session: MemberSession, _ object: MemberObject, _ template: [Attribute]) throws(P11Error) -> MemberObject {
        var handle: CK_OBJECT_HANDLE = 0
        try call { withCTemplate(template) { f.pointee.C_CopyObject!(session.raw, object.raw, $0, $1, &handle) } }
        return MemberObject(handle)
    }

    public func destroyObject(_ session: MemberSession, _ object: MemberObject) throws(P11Error) {
        try call { f.pointee.C_DestroyObject!(session.raw, object.raw) }
    }

    public func objectSize(_ session: MemberSession, _ object: MemberObject) throws(P11Error) -> CK_ULONG {
        var size: CK_ULONG = 0
        try call { f.pointee.C_GetObjectSize!(session.raw, object.raw, &size) }
        return size
    }

    /// C_GetAttributeValue with the member's own answer per attribute. The return value is the member's,
    /// including CKR_ATTRIBUTE_SENSITIVE, CKR_ATTRIBUTE_TYPE_INVALID and CKR_BUFFER_TOO_SMALL, which
    /// still fill the other attributes.
    public func attributeValues(_ session: MemberSession, _ object: MemberObject,
                                _ queries: [AttributeQuery]) throws(P11Error) -> (rv: CK_RV, answers: [AttributeAnswer]) {
        rawAttributeValues(session, object, queries)
    }

    private func rawAttributeValues(_ session: MemberSession, _ object: MemberObject,
                                    _ queries: [AttributeQuery]) -> (rv: CK_RV, answers: [AttributeAnswer]) {
        var queries = queries
        if queries.reduce(0, { $0 + ($1.elements == nil ? $1.capacity ?? 0 : 0) }) > Self.claimedBufferLimit {
            // The caller's claims are only claims: the member's lengths first, and no buffer larger than what the
            // member will put in it (none for an attribute it will not reveal). The member still sees every
            // buffer that is too small as too small, and answers it as it would the caller. (Attribute arrays are
            // bounded by their elements.)
            let lengths = rawAttributeValues(session, object, queries.map { AttributeQuery($0.type, capacity: nil) })
            guard lengths.rv == CKR_OK || partialAttributeAnswers.contains(lengths.rv) else { return lengths }
            for (i, answer) in lengths.answers.enumerated() where queries[i].elements == nil {
                guard let claimed = queries[i].capacity else { continue }
                let needed = answer.length == CK_UNAVAILABLE_INFORMATION_VALUE ? 0 : Int(clamping: answer.length)
                queries[i].capacity = min(claimed, needed)
            }
        }
        let memory = TemplateMemory()
        defer { memory.release() }
        var template = [CK_ATTRIBUTE](repeating: CK_ATTRIBUTE(), count: queries.count)
        var arrays: [Int: UnsafeMutablePointer<CK_ATTRIBUTE>] = [:]
        for (i, query) in queries.enumerated() {
            template[i].type = query.type
            guard let capacity = query.capacity else { continue }
            if let rooms = query.elements {
                // An array of attributes with buffers of its own for each element's value (the member reads the
                // elements' pointers from it); its length says how many elements there are, never more.
                let elements = memory.attributes(rooms.count)
                for (j, room) in rooms.enumerated() {
                    let bounded = room.capacity.map { min($0, Self.claimedBufferLimit) }
                    elements[j] = CK_ATTRIBUTE(type: room.type, pValue: bounded.map { memory.bytes($0) }, ulValueLen: CK_ULONG(bounded ?? 0))
                }
                arrays[i] = elements
                template[i].pValue = UnsafeMutableRawPointer(elements)
                template[i].ulValueLen = CK_ULONG(rooms.count * MemoryLayout<CK_ATTRIBUTE>.stride)
            } else {
                template[i].pValue = memory.bytes(capacity)
                template[i].ulValueLen = CK_ULONG(capacity)
            }
        }
        let rv = gated { f.pointee.C_GetAttributeValue!(session.raw, object.raw, &template, CK_ULONG(template.count)) }
        let answers = template.enumerated().map { i, attribute -> AttributeAnswer in
            let length = attribute.ulValueLen
            guard let value = attribute.pValue, length != CK_UNAVAILABLE_INFORMATION_VALUE else {
                return AttributeAnswer(length: length, value: nil)
            }
            if let elements = arrays[i], let rooms = queries[i].elements {
                return AttributeAnswer(length: length, value: nil, elements: rooms.indices.map { j in
                    let element = elements[j]
                    let room = rooms[j].capacity.map { min($0, Self.claimedBufferLimit) } ?? 0
                    let value = element.pValue.flatMap { p -> [UInt8]? in
                        element.ulValueLen == CK_UNAVAILABLE_INFORMATION_VALUE ? nil
                            : Array(UnsafeRawBufferPointer(start: p, count: min(Int(clamping: element.ulValueLen), room)))
                    }
                    return AttributeElement(type: element.type, length: element.ulValueLen, value: value)
                })
            }
            // Never past the buffer, whatever length the member wrote back.
            let count = min(Int(clamping: length), queries[i].capacity ?? 0)
            return AttributeAnswer(length: length, value: Array(UnsafeRawBufferPointer(start: value, count: count)))
        }
        return (rv, answers)
    }

    public func setAttributeValues(_ session: MemberSession, _ object: MemberObject, _ template: [Attribute]) throws(P11Error) {
        try call { withCTemplate(template) { f.pointee.C_SetAttributeValue!(session.raw, object.raw, $0, $1) } }
    }

    /// A whole search: init, every match, final.
    public func findObjects(_ session: MemberSession, _ template: [Attribute]) throws(P11Error) -> [MemberObject] {
        let rv = withCTemplate(template) { t, c in gated { f.pointee.C_FindObjectsInit!(session.raw, t, c) } }
        guard rv == CKR_OK else {
            // SoftHSM can fail C_FindObjectsInit (CKR_GENERAL_ERROR, racing a logout) with the search begun: ended
            // here, or the session would answer CKR_OPERATION_ACTIVE to everything after.
            if rv != CKR_OPERATION_ACTIVE { _ = gated { f.pointee.C_FindObjectsFinal!(session.raw) } }
            throw P11Error.member(rv)
        }
        var found: [CK_OBJECT_HANDLE] = []
        var batch = [CK_OBJECT_HANDLE](repeating: 0, count: 64)
        while true {
            var count: CK_ULONG = 0
            do throws(P11Error) {
                try call { f.pointee.C_FindObjects!(session.raw, &batch, CK_ULONG(batch.count), &count) }
            } catch {
                _ = gated { f.pointee.C_FindObjectsFinal!(session.raw) }
                throw error
            }
            found.append(contentsOf: batch.prefix(Int(count)))
            if Int(count) < batch.count { break }
        }
        try call { f.pointee.C_FindObjectsFinal!(session.raw) }
        return found.map(MemberObject.init)
    }

    // MARK: keys

    public func generateKey(_ session: MemberSession, _ mechanism: Mechanism, _ template: [Attribute]) throws(P11Error) -> MemberObject {
        var handle: CK_OBJECT_HANDLE = 0
        try call { withCMechanism(mechanism) { m in withCTemplate(template) { f.pointee.C_GenerateKey!(session.raw, m, $0, $1, &handle) } } }
        return MemberObject(handle)
    }

    public func generateKeyPair(_ session: MemberSession, _ mechanism: Mechanism, publicTemplate: [Attribute],
                                privateTemplate: [Attribute]) throws(P11Error) -> (public: MemberObject, private: MemberObject) {
        var pub: CK_OBJECT_HANDLE = 0
        var priv: CK_OBJECT_HANDLE = 0
        try call {
            withCMechanism(mechanism) { m in
                withCTemplate(publicTemplate) { pt, pc in
                    withCTemplate(privateTemplate) { f.pointee.C_GenerateKeyPair!(session.raw, m, pt, pc, $0, $1, &pub, &priv) }
                }
            }
        }
        return (MemberObject(pub), MemberObject(priv))
    }

    public func wrapKey(_ session: MemberSession, _ mechanism: Mechanism, wrappingKey: MemberObject,
                        key: MemberObject, capacity: Int?) throws(P11Error) -> Output {
        try output(capacity) { out, len in
            withCMechanism(mechanism) { f.pointee.C_WrapKey!(session.raw, $0, wrappingKey.raw, key.raw, out, len) }
        }
    }

    public func unwrapKey(_ session: MemberSession, _ mechanism: Mechanism, unwrappingKey: MemberObject,
                          wrapped: [UInt8], _ template: [Attribute]) throws(P11Error) -> MemberObject {
        var handle: CK_OBJECT_HANDLE = 0
        var wrapped = wrapped
        try call {
            withCMechanism(mechanism) { m in
                withCTemplate(template) { t, c in
                    f.pointee.C_UnwrapKey!(session.raw, m, unwrappingKey.raw, &wrapped, CK_ULONG(wrapped.count), t, c, &handle)
                }
            }
        }
        return MemberObject(handle)
    }

    public func deriveKey(_ session: MemberSession, _ mechanism: Mechanism, baseKey: MemberObject,
                          _ template: [Attribute]) throws(P11Error) -> MemberObject {
        var handle: CK_OBJECT_HANDLE = 0
        try call { withCMechanism(mechanism) { m in withCTemplate(template) { f.pointee.C_DeriveKey!(session.raw, m, baseKey.raw, $0, $1, &handle) } } }
        return MemberObject(handle)
    }

    public func generateRandom(_ session: MemberSession, count: Int) throws(P11Error) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        try call { f.pointee.C_GenerateRandom!(session.raw, &bytes, CK_ULONG(count)) }
        return bytes
    }

    public func seedRandom(_ session: MemberSession, _ seed: [UInt8]) throws(P11Error) {
        var seed = seed
        try call { f.pointee.C_SeedRandom!(session.raw, &seed, CK_ULONG(seed.count)) }
    }

    // MARK: cryptographic operations

    public func operationInit(_ kind: OperationKind, _ session: MemberSession, _ mechanism: Mechanism,
                              key: MemberObject?) throws(P11Error) {
        try call {
            withCMechanism(mechanism) { m in
                switch kind {
                case .encrypt: f.pointee.C_EncryptInit!(session.raw, m, key?.raw ?? CK_OBJECT_HANDLE(CK_INVALID_HANDLE))
                case .decrypt: f.pointee.C_DecryptInit!(session.raw, m, key?.raw ?? CK_OBJECT_HANDLE(CK_INVALID_HANDLE))
                case .digest: f.pointee.C_DigestInit!(session.raw, m)
                case .sign: f.pointee.C_SignInit!(session.raw, m, key?.raw ?? CK_OBJECT_HANDLE(CK_INVALID_HANDLE))
                case .verify: f.pointee.C_VerifyInit!(session.raw, m, key?.raw ?? CK_OBJECT_HANDLE(CK_INVALID_HANDLE))
                case .signRecover: f.pointee.C_SignRecoverInit!(session.raw, m, key?.raw ?? CK_OBJECT_HANDLE(CK_INVALID_HANDLE))
                case .verifyRecover: f.pointee.C_VerifyRecoverInit!(session.raw, m, key?.raw ?? CK_OBJECT_HANDLE(CK_INVALID_HANDLE))
                }
            }
        }
    }

    /// The single-part call of an operation that produces output (all kinds but verify).
    public func singlePart(_ kind: OperationKind, _ session: MemberSession, _ input: [UInt8], capacity: Int?) throws(P11Error) -> Output {
        var input = input
        let inLen = CK_ULONG(input.count)
        return try output(capacity) { out, len in
            input.withUnsafeMutableBufferPointer { inp in
                let i = inp.baseAddress
                return switch kind {
                case .encrypt: f.pointee.C_Encrypt!(session.raw, i, inLen, out, len)
                case .decrypt: f.pointee.C_Decrypt!(session.raw, i, inLen, out, len)
                case .digest: f.pointee.C_Digest!(session.raw, i, inLen, out, len)
                case .sign: f.pointee.C_Sign!(session.raw, i, inLen, out, len)
                case .signRecover: f.pointee.C_SignRecover!(session.raw, i, inLen, out, len)
                case .verifyRecover: f.pointee.C_VerifyRecover!(session.raw, i, inLen, out, len)
                case .verify: CK_RV(CKR_FUNCTION_NOT_SUPPORTED)
                }
            }
        }
    }

    /// A multi-part update of an operation without output (digest, sign, verify).
    public func update(_ kind: OperationKind, _ session: MemberSession, _ input: [UInt8]) throws(P11Error) {
        var input = input
        let inLen = CK_ULONG(input.count)
        try call {
            switch kind {
            case .digest: f.pointee.C_DigestUpdate!(session.raw, &input, inLen)
            case .sign: f.pointee.C_SignUpdate!(session.raw, &input, inLen)
            case .verify: f.pointee.C_VerifyUpdate!(session.raw, &input, inLen)
            default: CK_RV(CKR_FUNCTION_NOT_SUPPORTED)
            }
        }
    }

    /// A multi-part update of encryption or decryption, which may produce output.
    public func cipherUpdate(_ kind: OperationKind, _ session: MemberSession, _ input: [UInt8], capacity: Int?) throws(P11Error) -> Output {
        var input = input
        let inLen = CK_ULONG(input.count)
        return try output(capacity) { out, len in
            switch kind {
            case .encrypt: f.pointee.C_EncryptUpdate!(session.raw, &input, inLen, out, len)
            case .decrypt: f.pointee.C_DecryptUpdate!(session.raw, &input, inLen, out, len)
            default: CK_RV(CKR_FUNCTION_NOT_SUPPORTED)
            }
        }
    }

    public func final(_ kind: OperationKind, _ session: MemberSession, capacity: Int?) throws(P11Error) -> Output {
        try output(capacity) { out, len in
            switch kind {
            case .encrypt: f.pointee.C_EncryptFinal!(session.raw, out, len)
            case .decrypt: f.pointee.C_DecryptFinal!(session.raw, out, len)
            case .digest: f.pointee.C_DigestFinal!(session.raw, out, len)
            case .sign: f.pointee.C_SignFinal!(session.raw, out, len)
            default: CK_RV(CKR_FUNCTION_NOT_SUPPORTED)
            }
        }
    }

    public func digestKey(_ session: MemberSession, _ key: MemberObject) throws(P11Error) {
        try call { f.pointee.C_DigestKey!(session.raw, key.raw) }
    }

    public func verify(_ session: MemberSession, _ data: [UInt8], signature: [UInt8]) throws(P11Error) {
        var data = data
        var signature = signature
        try call { f.pointee.C_Verify!(session.raw, &data, CK_ULONG(data.count), &signature, CK_ULONG(signature.count)) }
    }

    public func verifyFinal(_ session: MemberSession, signature: [UInt8]) throws(P11Error) {
        var signature = signature
        try call { f.pointee.C_VerifyFinal!(session.raw, &signature, CK_ULONG(signature.count)) }
    }

    public func operationState(_ session: MemberSession) throws(P11Error) -> [UInt8] {
        var length: CK_ULONG = 0
        try call { f.pointee.C_GetOperationState!(session.raw, nil, &length) }
        var state = [UInt8](repeating: 0, count: Int(length))
        try call { f.pointee.C_GetOperationState!(session.raw, &state, &length) }
        return Array(state.prefix(Int(length)))
    }

    public func setOperationState(_ session: MemberSession, _ state: [UInt8], encryptionKey: MemberObject?,
                                  authenticationKey: MemberObject?) throws(P11Error) {
        var state = state
        let none = CK_OBJECT_HANDLE(CK_INVALID_HANDLE)
        try call {
            f.pointee.C_SetOperationState!(session.raw, &state, CK_ULONG(state.count), encryptionKey?.raw ?? none, authenticationKey?.raw ?? none)
        }
    }

    /// Output buffers and attribute buffers up to this size (in all) are given to the member as the caller claimed
    /// them; past it, the member is asked for the length first, so that p11ha's memory follows what the member
    /// answers, never what the caller claims (a claim of 2 GiB cost 2 GiB per attribute).
    static let claimedBufferLimit = 64 << 10

    /// PKCS#11's two-call convention: no buffer asks for the length; a short buffer gets CKR_BUFFER_TOO_SMALL
    /// with the length needed. A claimed capacity past `claimedBufferLimit` is cut to the length the member
    /// says it needs (a length query leaves the operation as it was, PKCS#11 5.2).
    private func output(_ capacity: Int?, _ body: (UnsafeMutablePointer<UInt8>?, UnsafeMutablePointer<CK_ULONG>) -> CK_RV) throws(P11Error) -> Output {
        var length: CK_ULONG = 0
        guard let capacity else {
            try call { body(nil, &length) }
            return .length(Int(clamping: length))
        }
        var room = capacity
        if capacity > Self.claimedBufferLimit {
            try call { body(nil, &length) }
            room = min(capacity, Int(clamping: length))
        }
        while true {
            length = CK_ULONG(room)
            var rv = CK_RV(CKR_OK)
            let result = [UInt8](unsafeUninitializedCapacity: max(room, 1)) { buffer, count in
                rv = gated { body(buffer.baseAddress, &length) }
                count = rv == CKR_OK ? min(Int(clamping: length), room) : 0
            }
            if rv == CKR_OK { return .data(result) }
            let needed = Int(clamping: length)
            // The member's length query said less than it then needed: again, within what the caller has.
            if rv == CKR_BUFFER_TOO_SMALL && room < capacity && needed > room {
                room = min(capacity, needed)
                continue
            }
            throw P11Error.member(rv, neededLength: rv == CKR_BUFFER_TOO_SMALL ? needed : nil)
        }
    }
}

/// Memory for one call's C template: every block zeroed (values may be secret) and freed after the call.
final class TemplateMemory {
    private var blocks: [(UnsafeMutableRawPointer, Int)] = []

    func bytes(_ count: Int) -> UnsafeMutableRawPointer {
        let block = UnsafeMutableRawPointer.allocate(byteCount: max(count, 1), alignment: 16)
        block.initializeMemory(as: UInt8.self, repeating: 0, count: max(count, 1))
        blocks.append((block, max(count, 1)))
        return block
    }

    func attributes(_ count: Int) -> UnsafeMutablePointer<CK_ATTRIBUTE> {
        bytes(count * MemoryLayout<CK_ATTRIBUTE>.stride).bindMemory(to: CK_ATTRIBUTE.self, capacity: max(count, 1))
    }

    func release() {
        for (block, count) in blocks {
            block.initializeMemory(as: UInt8.self, repeating: 0, count: count)
            block.deallocate()
        }
        blocks = []
    }
}

/// Builds a C template over copies of the attribute values (attribute arrays as arrays of their own), zeroed
/// and freed after the call.
func withCTemplate<R>(_ attributes: [Attribute], _ body: (UnsafeMutablePointer<CK_ATTRIBUTE>?, CK_ULONG) -> R) -> R {
    if attributes.isEmpty { return body(nil, 0) }
    let memory = TemplateMemory()
    defer { memory.release() }
    func array(_ attributes: [Attribute]) -> UnsafeMutablePointer<CK_ATTRIBUTE> {
        let template = memory.attributes(attributes.count)
        for (i, attribute) in attributes.enumerated() {
            if let elements = attribute.elements {
                template[i] = CK_ATTRIBUTE(type: attribute.type, pValue: elements.isEmpty ? nil : UnsafeMutableRawPointer(array(elements)),
                                           ulValueLen: CK_ULONG(elements.count * MemoryLayout<CK_ATTRIBUTE>.stride))
                continue
            }
            let count = attribute.value.count
            let value = count == 0 ? nil : memory.bytes(count)
            if let value { attribute.value.withUnsafeBytes { value.copyMemory(from: $0.baseAddress!, byteCount: count) } }
            template[i] = CK_ATTRIBUTE(type: attribute.type, pValue: value, ulValueLen: CK_ULONG(count))
        }
        return template
    }
    return body(array(attributes), CK_ULONG(attributes.count))
}

/// Builds a C mechanism (with its parameter structure) valid for the duration of `body`.
func withCMechanism<R>(_ mechanism: Mechanism, _ body: (UnsafeMutablePointer<CK_MECHANISM>) -> R) -> R {
    var m = CK_MECHANISM(mechanism: mechanism.type, pParameter: nil, ulParameterLen: 0)
    func with<P>(_ param: inout P) -> R {
        withUnsafeMutablePointer(to: &param) { p in
            m.pParameter = UnsafeMutableRawPointer(p)
            m.ulParameterLen = CK_ULONG(MemoryLayout<P>.size)
            return body(&m)
        }
    }
    switch mechanism.parameter {
    case .none:
        return body(&m)
    case .bytes(var bytes), .opaque(var bytes):
        return bytes.withUnsafeMutableBytes { raw in
            m.pParameter = raw.baseAddress
            m.ulParameterLen = CK_ULONG(raw.count)
            return body(&m)
        }
    case .gcm(var iv, let ivBits, var aad, let tagBits):
        return iv.withUnsafeMutableBufferPointer { ivp in
            aad.withUnsafeMutableBufferPointer { aadp in
                var p = CK_GCM_PARAMS(pIv: ivp.baseAddress, ulIvLen: CK_ULONG(ivp.count), ulIvBits: ivBits,
                                      pAAD: aadp.baseAddress, ulAADLen: CK_ULONG(aadp.count), ulTagBits: tagBits)
                return with(&p)
            }
        }
    case .oaep(let hash, let mgf, let source, var data):
        return data.withUnsafeMutableBytes { d in
            var p = CK_RSA_PKCS_OAEP_PARAMS(hashAlg: hash, mgf: mgf, source: source,
                                            pSourceData: d.count == 0 ? nil : d.baseAddress, ulSourceDataLen: CK_ULONG(d.count))
            return with(&p)
        }
    case .ecdh(let kdf, var shared, var pub):
        return shared.withUnsafeMutableBufferPointer { s in
            pub.withUnsafeMutableBufferPointer { q in
                var p = CK_ECDH1_DERIVE_PARAMS(kdf: kdf, ulSharedDataLen: CK_ULONG(s.count), pSharedData: s.count == 0 ? nil : s.baseAddress,
                                               ulPublicDataLen: CK_ULONG(q.count), pPublicData: q.baseAddress)
                return with(&p)
            }
        }
    case .derivationString(var data):
        return data.withUnsafeMutableBufferPointer { d in
            var p = CK_KEY_DERIVATION_STRING_DATA(pData: d.baseAddress, ulLen: CK_ULONG(d.count))
            return with(&p)
        }
    case .aesCBCEncryptData(let iv, var data):
        return data.withUnsafeMutableBufferPointer { d in
            var p = CK_AES_CBC_ENCRYPT_DATA_PARAMS()
            withUnsafeMutableBytes(of: &p.iv) { $0.copyBytes(from: iv.prefix(16)) }
            p.pData = d.baseAddress
            p.length = CK_ULONG(d.count)
            return with(&p)
        }
    case .desCBCEncryptData(let iv, var data):
        return data.withUnsafeMutableBufferPointer { d in
            var p = CK_DES_CBC_ENCRYPT_DATA_PARAMS()
            withUnsafeMutableBytes(of: &p.iv) { $0.copyBytes(from: iv.prefix(8)) }
            p.pData = d.baseAddress
            p.length = CK_ULONG(d.count)
            return with(&p)
        }
    case .eddsa(let prehash, var context):
        return context.withUnsafeMutableBufferPointer { c in
            var p = CK_EDDSA_PARAMS(phFlag: CK_BBOOL(prehash ? 1 : 0), ulContextDataLen: CK_ULONG(c.count),
                                    pContextData: c.count == 0 ? nil : c.baseAddress)
            return with(&p)
        }
    }
}

public let CK_UNAVAILABLE_INFORMATION_VALUE: CK_ULONG = P11HA_CK_UNAVAILABLE_INFORMATION
