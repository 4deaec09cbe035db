// One member: a token in a slot of a loaded module, as a typed Swift API. Raw pointers stop here.
import CInterop
import Glibc
import Synchronization

public enum Health: UInt8, Sendable {
    case inService = 0
    /// Stopped answering (or answered with a device fault): probed in the background.
    case failed = 1
    /// Missed a write: must be brought up to date before it serves again.
    case stale = 2
    /// Answering again; being logged in and brought up to date.
    case recovering = 3

    public var name: String { ["in-service", "failed", "stale", "recovering"][Int(rawValue)] }
}

/// When a member last failed and recovered, and why it failed: for operators.
public struct MemberHistory: Sendable {
    public var lastFailure: Int64? = nil
    public var lastFailureReason: String? = nil
    public var lastRecovery: Int64? = nil
    public var failures = 0
}

/// Seconds since the epoch, for operators' records.
func wallClock() -> Int64 {
    var ts = timespec()
    clock_gettime(CLOCK_REALTIME, &ts)
    return Int64(ts.tv_sec)
}

public final class Member: @unchecked Sendable {
    public let index: Int
    public let config: MemberConfig
    let module: LoadedModule
    private let slot: Atomic<UInt>
    /// Where the token is now: a remote member's slot can change when its server restarts.
    public var slotID: CK_SLOT_ID { CK_SLOT_ID(slot.load(ordering: .acquiring)) }
    /// Counts failures: an operation started before the latest one must be replayed, not continued.
    public let epoch = Atomic<Int>(0)
    /// Operations in progress on this member (from init to their last call): the scheduler's load measure.
    public let inFlight = Atomic<Int>(0)
    /// Operations this member has been given since initialization.
    public let served = Atomic<UInt64>(0)
    private let healthValue = Atomic<UInt8>(Health.inService.rawValue)
    /// The member's own PIN from its URI (pin-value or pin-source), if any.
    let ownPIN: Secret?
    /// The operation-timeout: nil runs calls on the caller's thread, with no deadline.
    let deadline: Duration?
    let executor = Executor()
    /// Set by the group: publishes failures and recoveries for operators.
    nonisolated(unsafe) var onHealthChange: ((Member) -> Void)?

    public let name: String
    public var isStandby: Bool { config.standby }
    public let history = Mutex(MemberHistory())
    public var hasOwnPIN: Bool { ownPIN != nil }
    public var health: Health { Health(rawValue: healthValue.load(ordering: .acquiring)) ?? .failed }
    public var isInService: Bool { health == .inService }

    init(index: Int, name: String, config: MemberConfig, module: LoadedModule, slotID: CK_SLOT_ID, ownPIN: Secret?,
         deadline: Duration?) {
        self.deadline = deadline
        self.index = index
        self.name = name
        self.config = config
        self.module = module
        self.slot = Atomic(UInt(slotID))
        self.ownPIN = ownPIN
    }

    /// Takes the member out of service (failed, or stale when it missed a write), logging why.
    /// Returns whether it was in service.
    @discardableResult
    public func leaveService(_ health: Health, reason: String) -> Bool {
        var old = Health.inService.rawValue
        while true {
            // A stale member stays stale: it missed a write whatever happens next.
            let next = old == Health.stale.rawValue ? old : health.rawValue
            let (exchanged, current) = healthValue.compareExchange(expected: old, desired: next, ordering: .acquiringAndReleasing)
            if exchanged { break }
            old = current
        }
        guard old == Health.inService.rawValue || old == Health.recovering.rawValue else { return false }
        epoch.add(1, ordering: .acquiringAndReleasing)
        history.withLock {
            $0.lastFailure = wallClock()
            $0.lastFailureReason = reason
            $0.failures += 1
        }
        Log.event(.warning, "member-failed", "member=\(name) state=\(health.name) reason=\"\(reason)\"")
        onHealthChange?(self)
        return old == Health.inService.rawValue
    }

    /// Finds the token again after its module was restarted (a remote member's slot may have changed).
    func relocate() throws(ModuleError) {
        slot.store(UInt(try Member.locate(config.uri, in: module)), ordering: .releasing)
    }

    /// Sets the health without the failure bookkeeping (recovery's own steps).
    func setHealth(_ health: Health) {
        healthValue.store(health.rawValue, ordering: .releasing)
    }

    var f: CK_FUNCTION_LIST { module.f }

    /// Runs one member method (the calls it makes into the module, and the memory they use) on the member's
    /// executor within the operation-timeout; past it, the caller gets a member fault and the work goes on
    /// without it. Every public method of Member goes through here.
    func guarded<T>(_ work: @escaping () throws(P11Error) -> T) throws(P11Error) -> T {
        guard let timeout = deadline else { return try work() }
        guard let result = executor.run(timeout: timeout, { () -> Result<T, P11Error> in
            Result { () throws(P11Error) -> T in try work() }
        }) else { throw P11Error.deadlineExceeded }
        return try result.get()
    }

    /// Every call into the module goes through here (inside `guarded`).
    @inline(__always)
    func call(_ body: () -> CK_RV) throws(P11Error) {
        let rv = body()
        if rv != CKR_OK { throw P11Error.member(rv) }
    }

    /// Finds the one slot of `module` whose token `uri` selects.
    static func locate(_ uri: TokenURI, in module: LoadedModule) throws(ModuleError) -> CK_SLOT_ID {
        let f = module.f
        var info = CK_INFO()
        _ = f.C_GetInfo!(&info)
        var count: CK_ULONG = 0
        var rv = f.C_GetSlotList!(CK_BBOOL(CK_TRUE), nil, &count)
        var slots = [CK_SLOT_ID](repeating: 0, count: Int(count))
        if rv == CKR_OK && count > 0 { rv = f.C_GetSlotList!(CK_BBOOL(CK_TRUE), &slots, &count) }
        guard rv == CKR_OK else { throw ModuleError(message: "C_GetSlotList returned \(ckrName(rv))") }
        var matches: [(CK_SLOT_ID, String)] = []
        var silent = 0
        for slot in slots.prefix(Int(count)) {
            var slotInfo = CK_SLOT_INFO()
            var tokenInfo = CK_TOKEN_INFO()
            guard f.C_GetSlotInfo!(slot, &slotInfo) == CKR_OK, f.C_GetTokenInfo!(slot, &tokenInfo) == CKR_OK else {
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
            var error = ModuleError(message: "no token of \(module.path) matches \(uri.displayText)"
                                    + (silent > 0 ? " (\(silent) slots did not answer)" : ""))
            error.unreachable = silent > 0
            throw error
        default:
            let labels = matches.map { "'\($0.1)'" }.joined(separator: ", ")
            throw ModuleError(message: "\(matches.count) tokens of \(module.path) match \(uri.displayText) (\(labels)); name one")
        }
    }

    // MARK: slot, token, mechanisms

    public func tokenInfo() throws(P11Error) -> CK_TOKEN_INFO {
        try guarded { [self] () throws(P11Error) in
            var info = CK_TOKEN_INFO()
            try call { f.C_GetTokenInfo!(slotID, &info) }
            return info
        }
    }

    public func mechanismList() throws(P11Error) -> [CK_MECHANISM_TYPE] {
        try guarded { [self] () throws(P11Error) in
            var count: CK_ULONG = 0
            try call { f.C_GetMechanismList!(slotID, nil, &count) }
            var list = [CK_MECHANISM_TYPE](repeating: 0, count: Int(count))
            try call { f.C_GetMechanismList!(slotID, &list, &count) }
            return Array(list.prefix(Int(count)))
        }
    }

    public func mechanismInfo(_ type: CK_MECHANISM_TYPE) throws(P11Error) -> CK_MECHANISM_INFO {
        try guarded { [self] () throws(P11Error) in
            var info = CK_MECHANISM_INFO()
            try call { f.C_GetMechanismInfo!(slotID, type, &info) }
            return info
        }
    }

    // MARK: sessions and login

    public func openSession(readWrite: Bool) throws(P11Error) -> CK_SESSION_HANDLE {
        try guarded { [self] () throws(P11Error) in
            var flags = CK_FLAGS(CKF_SERIAL_SESSION)
            if readWrite { flags |= CK_FLAGS(CKF_RW_SESSION) }
            var handle: CK_SESSION_HANDLE = 0
            try call { f.C_OpenSession!(slotID, flags, nil, nil, &handle) }
            return handle
        }
    }

    public func closeSession(_ session: CK_SESSION_HANDLE) {
        _ = try? guarded { [self] () throws(P11Error) in _ = f.C_CloseSession!(session) }
    }

    public func login(_ session: CK_SESSION_HANDLE, userType: CK_USER_TYPE, pin: Secret?) throws(P11Error) {
        try guarded { [self] () throws(P11Error) in
            if let pin {
                try pin.withBytes { (bytes) throws(P11Error) in
                    let base = UnsafeMutablePointer(mutating: bytes.baseAddress?.assumingMemoryBound(to: UInt8.self))
                    try call { f.C_Login!(session, userType, base, CK_ULONG(bytes.count)) }
                }
            } else {
                try call { f.C_Login!(session, userType, nil, 0) }
            }
        }
    }

    public func logout(_ session: CK_SESSION_HANDLE) throws(P11Error) {
        try guarded { [self] () throws(P11Error) in
            try call { f.C_Logout!(session) }
        }
    }

    public func initPIN(_ session: CK_SESSION_HANDLE, pin: Secret) throws(P11Error) {
        try guarded { [self] () throws(P11Error) in
            try pin.withBytes { (bytes) throws(P11Error) in
                let base = UnsafeMutablePointer(mutating: bytes.baseAddress?.assumingMemoryBound(to: UInt8.self))
                try call { f.C_InitPIN!(session, base, CK_ULONG(bytes.count)) }
            }
        }
    }

    public func setPIN(_ session: CK_SESSION_HANDLE, old: Secret, new: Secret) throws(P11Error) {
        try guarded { [self] () throws(P11Error) in
            try old.withBytes { (o) throws(P11Error) in
                try new.withBytes { (n) throws(P11Error) in
                    let op = UnsafeMutablePointer(mutating: o.baseAddress?.assumingMemoryBound(to: UInt8.self))
                    let np = UnsafeMutablePointer(mutating: n.baseAddress?.assumingMemoryBound(to: UInt8.self))
                    try call { f.C_SetPIN!(session, op, CK_ULONG(o.count), np, CK_ULONG(n.count)) }
                }
            }
        }
    }

    // MARK: objects

    public func createObject(_ session: CK_SESSION_HANDLE, _ template: [Attribute]) throws(P11Error) -> CK_OBJECT_HANDLE {
        try guarded { [self] () throws(P11Error) in
            var handle: CK_OBJECT_HANDLE = 0
            try call { withCTemplate(template) { f.C_CreateObject!(session, $0, $1, &handle) } }
            return handle
        }
    }

    public func copyObject(_ session: CK_SESSION_HANDLE, _ object: CK_OBJECT_HANDLE, _ template: [Attribute]) throws(P11Error) -> CK_OBJECT_HANDLE {
        try guarded { [self] () throws(P11Error) in
            var handle: CK_OBJECT_HANDLE = 0
            try call { withCTemplate(template) { f.C_CopyObject!(session, object, $0, $1, &handle) } }
            return handle
        }
    }

    public func destroyObject(_ session: CK_SESSION_HANDLE, _ object: CK_OBJECT_HANDLE) throws(P11Error) {
        try guarded { [self] () throws(P11Error) in
            try call { f.C_DestroyObject!(session, object) }
        }
    }

    public func objectSize(_ session: CK_SESSION_HANDLE, _ object: CK_OBJECT_HANDLE) throws(P11Error) -> CK_ULONG {
        try guarded { [self] () throws(P11Error) in
            var size: CK_ULONG = 0
            try call { f.C_GetObjectSize!(session, object, &size) }
            return size
        }
    }

    /// C_GetAttributeValue with the member's own answer per attribute. The return value is the member's,
    /// including CKR_ATTRIBUTE_SENSITIVE, CKR_ATTRIBUTE_TYPE_INVALID and CKR_BUFFER_TOO_SMALL, which
    /// still fill the other attributes.
    public func attributeValues(_ session: CK_SESSION_HANDLE, _ object: CK_OBJECT_HANDLE,
                                _ queries: [AttributeQuery]) throws(P11Error) -> (rv: CK_RV, answers: [AttributeAnswer]) {
        try guarded { [self] () throws(P11Error) in rawAttributeValues(session, object, queries) }
    }

    private func rawAttributeValues(_ session: CK_SESSION_HANDLE, _ object: CK_OBJECT_HANDLE,
                                    _ queries: [AttributeQuery]) -> (rv: CK_RV, answers: [AttributeAnswer]) {
        let total = queries.reduce(0) { $0 + ($1.capacity ?? 0) }
        let storage = UnsafeMutableRawPointer.allocate(byteCount: max(total, 1), alignment: 16)
        defer {
            storage.initializeMemory(as: UInt8.self, repeating: 0, count: max(total, 1))
            storage.deallocate()
        }
        var template = [CK_ATTRIBUTE](repeating: CK_ATTRIBUTE(), count: queries.count)
        var offset = 0
        for (i, query) in queries.enumerated() {
            template[i].type = query.type
            if let capacity = query.capacity {
                template[i].pValue = storage + offset
                template[i].ulValueLen = CK_ULONG(capacity)
                offset += capacity
            }
        }
        let rv = f.C_GetAttributeValue!(session, object, &template, CK_ULONG(template.count))
        let answers = template.map { attribute -> AttributeAnswer in
            let length = attribute.ulValueLen
            guard let value = attribute.pValue, length != CK_UNAVAILABLE_INFORMATION_VALUE else {
                return AttributeAnswer(length: length, value: nil)
            }
            return AttributeAnswer(length: length, value: Array(UnsafeRawBufferPointer(start: value, count: Int(length))))
        }
        return (rv, answers)
    }

    /// The values of attributes that are not sensitive (identity, class), or nil for each one refused.
    public func readAttributes(_ session: CK_SESSION_HANDLE, _ object: CK_OBJECT_HANDLE,
                               _ types: [CK_ATTRIBUTE_TYPE]) throws(P11Error) -> [[UInt8]?] {
        let sizes = try attributeValues(session, object, types.map { AttributeQuery($0, capacity: nil) })
        if sizes.rv != CKR_OK && !Self.partialAnswers.contains(sizes.rv) { throw P11Error.member(sizes.rv) }
        let queries = zip(types, sizes.answers).map { type, answer in
            AttributeQuery(type, capacity: answer.length == CK_UNAVAILABLE_INFORMATION_VALUE ? 0 : Int(answer.length))
        }
        let values = try attributeValues(session, object, queries)
        if values.rv != CKR_OK && !Self.partialAnswers.contains(values.rv) { throw P11Error.member(values.rv) }
        return zip(sizes.answers, values.answers).map { size, answer in
            size.length == CK_UNAVAILABLE_INFORMATION_VALUE ? nil : (answer.value ?? [])
        }
    }

    static let partialAnswers: Set<CK_RV> = [
        CK_RV(CKR_ATTRIBUTE_SENSITIVE), CK_RV(CKR_ATTRIBUTE_TYPE_INVALID), CK_RV(CKR_BUFFER_TOO_SMALL),
    ]

    public func setAttributeValues(_ session: CK_SESSION_HANDLE, _ object: CK_OBJECT_HANDLE, _ template: [Attribute]) throws(P11Error) {
        try guarded { [self] () throws(P11Error) in
            try call { withCTemplate(template) { f.C_SetAttributeValue!(session, object, $0, $1) } }
        }
    }

    /// A whole search: init, every match, final.
    public func findObjects(_ session: CK_SESSION_HANDLE, _ template: [Attribute]) throws(P11Error) -> [CK_OBJECT_HANDLE] {
        try guarded { [self] () throws(P11Error) in
            try call { withCTemplate(template) { f.C_FindObjectsInit!(session, $0, $1) } }
            var found: [CK_OBJECT_HANDLE] = []
            var batch = [CK_OBJECT_HANDLE](repeating: 0, count: 64)
            while true {
                var count: CK_ULONG = 0
                do throws(P11Error) {
                    try call { f.C_FindObjects!(session, &batch, CK_ULONG(batch.count), &count) }
                } catch {
                    _ = f.C_FindObjectsFinal!(session)
                    throw error
                }
                found.append(contentsOf: batch.prefix(Int(count)))
                if Int(count) < batch.count { break }
            }
            try call { f.C_FindObjectsFinal!(session) }
            return found
        }
    }

    // MARK: keys

    public func generateKey(_ session: CK_SESSION_HANDLE, _ mechanism: Mechanism, _ template: [Attribute]) throws(P11Error) -> CK_OBJECT_HANDLE {
        try guarded { [self] () throws(P11Error) in
            var handle: CK_OBJECT_HANDLE = 0
            try call { withCMechanism(mechanism) { m in withCTemplate(template) { f.C_GenerateKey!(session, m, $0, $1, &handle) } } }
            return handle
        }
    }

    public func generateKeyPair(_ session: CK_SESSION_HANDLE, _ mechanism: Mechanism, publicTemplate: [Attribute],
                                privateTemplate: [Attribute]) throws(P11Error) -> (CK_OBJECT_HANDLE, CK_OBJECT_HANDLE) {
        try guarded { [self] () throws(P11Error) in
            var pub: CK_OBJECT_HANDLE = 0
            var priv: CK_OBJECT_HANDLE = 0
            try call {
                withCMechanism(mechanism) { m in
                    withCTemplate(publicTemplate) { pt, pc in
                        withCTemplate(privateTemplate) { f.C_GenerateKeyPair!(session, m, pt, pc, $0, $1, &pub, &priv) }
                    }
                }
            }
            return (pub, priv)
        }
    }

    public func wrapKey(_ session: CK_SESSION_HANDLE, _ mechanism: Mechanism, wrappingKey: CK_OBJECT_HANDLE,
                        key: CK_OBJECT_HANDLE, capacity: Int?) throws(P11Error) -> Output {
        try guarded { [self] () throws(P11Error) in
            try output(capacity) { out, len in
                withCMechanism(mechanism) { f.C_WrapKey!(session, $0, wrappingKey, key, out, len) }
            }
        }
    }

    public func unwrapKey(_ session: CK_SESSION_HANDLE, _ mechanism: Mechanism, unwrappingKey: CK_OBJECT_HANDLE,
                          wrapped: [UInt8], _ template: [Attribute]) throws(P11Error) -> CK_OBJECT_HANDLE {
        try guarded { [self] () throws(P11Error) in
            var handle: CK_OBJECT_HANDLE = 0
            var wrapped = wrapped
            try call {
                withCMechanism(mechanism) { m in
                    withCTemplate(template) { t, c in
                        f.C_UnwrapKey!(session, m, unwrappingKey, &wrapped, CK_ULONG(wrapped.count), t, c, &handle)
                    }
                }
            }
            return handle
        }
    }

    public func deriveKey(_ session: CK_SESSION_HANDLE, _ mechanism: Mechanism, baseKey: CK_OBJECT_HANDLE,
                          _ template: [Attribute]) throws(P11Error) -> CK_OBJECT_HANDLE {
        try guarded { [self] () throws(P11Error) in
            var handle: CK_OBJECT_HANDLE = 0
            try call { withCMechanism(mechanism) { m in withCTemplate(template) { f.C_DeriveKey!(session, m, baseKey, $0, $1, &handle) } } }
            return handle
        }
    }

    public func generateRandom(_ session: CK_SESSION_HANDLE, count: Int) throws(P11Error) -> [UInt8] {
        try guarded { [self] () throws(P11Error) in
            var bytes = [UInt8](repeating: 0, count: count)
            try call { f.C_GenerateRandom!(session, &bytes, CK_ULONG(count)) }
            return bytes
        }
    }

    public func seedRandom(_ session: CK_SESSION_HANDLE, _ seed: [UInt8]) throws(P11Error) {
        try guarded { [self] () throws(P11Error) in
            var seed = seed
            try call { f.C_SeedRandom!(session, &seed, CK_ULONG(seed.count)) }
        }
    }

    // MARK: cryptographic operations

    public func operationInit(_ kind: OperationKind, _ session: CK_SESSION_HANDLE, _ mechanism: Mechanism,
                              key: CK_OBJECT_HANDLE) throws(P11Error) {
        try guarded { [self] () throws(P11Error) in
            try call {
                withCMechanism(mechanism) { m in
                    switch kind {
                    case .encrypt: f.C_EncryptInit!(session, m, key)
                    case .decrypt: f.C_DecryptInit!(session, m, key)
                    case .digest: f.C_DigestInit!(session, m)
                    case .sign: f.C_SignInit!(session, m, key)
                    case .verify: f.C_VerifyInit!(session, m, key)
                    case .signRecover: f.C_SignRecoverInit!(session, m, key)
                    case .verifyRecover: f.C_VerifyRecoverInit!(session, m, key)
                    }
                }
            }
        }
    }

    /// The single-part call of an operation that produces output (all kinds but verify).
    public func singlePart(_ kind: OperationKind, _ session: CK_SESSION_HANDLE, _ input: [UInt8], capacity: Int?) throws(P11Error) -> Output {
        try guarded { [self] () throws(P11Error) in
            var input = input
            let inLen = CK_ULONG(input.count)
            return try output(capacity) { out, len in
                input.withUnsafeMutableBufferPointer { inp in
                    let i = inp.baseAddress
                    return switch kind {
                    case .encrypt: f.C_Encrypt!(session, i, inLen, out, len)
                    case .decrypt: f.C_Decrypt!(session, i, inLen, out, len)
                    case .digest: f.C_Digest!(session, i, inLen, out, len)
                    case .sign: f.C_Sign!(session, i, inLen, out, len)
                    case .signRecover: f.C_SignRecover!(session, i, inLen, out, len)
                    case .verifyRecover: f.C_VerifyRecover!(session, i, inLen, out, len)
                    case .verify: CK_RV(CKR_FUNCTION_NOT_SUPPORTED)
                    }
                }
            }
        }
    }

    /// A multi-part update of an operation without output (digest, sign, verify).
    public func update(_ kind: OperationKind, _ session: CK_SESSION_HANDLE, _ input: [UInt8]) throws(P11Error) {
        try guarded { [self] () throws(P11Error) in
            var input = input
            let inLen = CK_ULONG(input.count)
            try call {
                switch kind {
                case .digest: f.C_DigestUpdate!(session, &input, inLen)
                case .sign: f.C_SignUpdate!(session, &input, inLen)
                case .verify: f.C_VerifyUpdate!(session, &input, inLen)
                default: CK_RV(CKR_FUNCTION_NOT_SUPPORTED)
                }
            }
        }
    }

    /// A multi-part update of encryption or decryption, which may produce output.
    public func cipherUpdate(_ kind: OperationKind, _ session: CK_SESSION_HANDLE, _ input: [UInt8], capacity: Int?) throws(P11Error) -> Output {
        try guarded { [self] () throws(P11Error) in
            var input = input
            let inLen = CK_ULONG(input.count)
            return try output(capacity) { out, len in
                switch kind {
                case .encrypt: f.C_EncryptUpdate!(session, &input, inLen, out, len)
                case .decrypt: f.C_DecryptUpdate!(session, &input, inLen, out, len)
                default: CK_RV(CKR_FUNCTION_NOT_SUPPORTED)
                }
            }
        }
    }

    public func final(_ kind: OperationKind, _ session: CK_SESSION_HANDLE, capacity: Int?) throws(P11Error) -> Output {
        try guarded { [self] () throws(P11Error) in
            try output(capacity) { out, len in
                switch kind {
                case .encrypt: f.C_EncryptFinal!(session, out, len)
                case .decrypt: f.C_DecryptFinal!(session, out, len)
                case .digest: f.C_DigestFinal!(session, out, len)
                case .sign: f.C_SignFinal!(session, out, len)
                default: CK_RV(CKR_FUNCTION_NOT_SUPPORTED)
                }
            }
        }
    }

    public func digestKey(_ session: CK_SESSION_HANDLE, _ key: CK_OBJECT_HANDLE) throws(P11Error) {
        try guarded { [self] () throws(P11Error) in
            try call { f.C_DigestKey!(session, key) }
        }
    }

    public func verify(_ session: CK_SESSION_HANDLE, _ data: [UInt8], signature: [UInt8]) throws(P11Error) {
        try guarded { [self] () throws(P11Error) in
            var data = data
            var signature = signature
            try call { f.C_Verify!(session, &data, CK_ULONG(data.count), &signature, CK_ULONG(signature.count)) }
        }
    }

    public func verifyFinal(_ session: CK_SESSION_HANDLE, signature: [UInt8]) throws(P11Error) {
        try guarded { [self] () throws(P11Error) in
            var signature = signature
            try call { f.C_VerifyFinal!(session, &signature, CK_ULONG(signature.count)) }
        }
    }

    /// PKCS#11's two-call convention: no buffer asks for the length; a short buffer gets CKR_BUFFER_TOO_SMALL
    /// with the length needed.
    func output(_ capacity: Int?, _ body: (UnsafeMutablePointer<UInt8>?, UnsafeMutablePointer<CK_ULONG>) -> CK_RV) throws(P11Error) -> Output {
        var length = CK_ULONG(capacity ?? 0)
        guard let capacity else {
            try call { body(nil, &length) }
            return .length(Int(length))
        }
        var rv = CK_RV(CKR_OK)
        let result = [UInt8](unsafeUninitializedCapacity: max(capacity, 1)) { buffer, count in
            rv = body(buffer.baseAddress, &length)
            count = rv == CKR_OK ? min(Int(length), capacity) : 0
        }
        guard rv == CKR_OK else {
            throw P11Error.member(rv, neededLength: rv == CKR_BUFFER_TOO_SMALL ? Int(length) : nil)
        }
        return .data(result)
    }
}

/// Builds a C template over copies of the attribute values, zeroed and freed after the call.
func withCTemplate<R>(_ attributes: [Attribute], _ body: (UnsafeMutablePointer<CK_ATTRIBUTE>?, CK_ULONG) -> R) -> R {
    if attributes.isEmpty { return body(nil, 0) }
    let total = attributes.reduce(0) { $0 + $1.value.count }
    let storage = UnsafeMutableRawPointer.allocate(byteCount: max(total, 1), alignment: 16)
    let template = UnsafeMutablePointer<CK_ATTRIBUTE>.allocate(capacity: attributes.count)
    defer {
        storage.initializeMemory(as: UInt8.self, repeating: 0, count: max(total, 1))
        storage.deallocate()
        template.deallocate()
    }
    var offset = 0
    for (i, attribute) in attributes.enumerated() {
        let count = attribute.value.count
        attribute.value.withUnsafeBytes { (storage + offset).copyMemory(from: $0.baseAddress!, byteCount: count) }
        template[i] = CK_ATTRIBUTE(type: attribute.type, pValue: count == 0 ? nil : storage + offset, ulValueLen: CK_ULONG(count))
        offset += count
    }
    return body(template, CK_ULONG(attributes.count))
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
    case .bytes(var bytes):
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
    }
}

public let CK_UNAVAILABLE_INFORMATION_VALUE: CK_ULONG = P11HA_CK_UNAVAILABLE_INFORMATION
