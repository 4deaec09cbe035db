// The fake token itself, shared by every connection to it (as one HSM is shared by processes and hosts): token
// objects, PINs, mechanisms, a seeded generator, the token-wide fault script and cross-process inconsistency.
import CInterop
import P11HA
import Synchronization

public final class FakeTokenStore: Sendable {
    public let label: String
    public let serial: String
    public let seed: UInt64
    /// The mechanisms this token offers (a subset of `FakeMechanisms.all`): a member lacking one can be modelled.
    public let mechanisms: [CK_MECHANISM_TYPE]
    /// SoftHSM's rule: a session runs one operation at a time, of any kind (CKR_OPERATION_ACTIVE otherwise).
    /// Off: one of each kind at a time, as `OperationKind` allows.
    public let oneOperationPerSession: Bool
    /// C_GetOperationState and C_SetOperationState work (for digests, the operations without a key); off, they
    /// answer CKR_FUNCTION_NOT_SUPPORTED, as SoftHSM 2.6.1 does.
    public let savesOperationState: Bool
    /// Token-wide faults: every connection sees them (a dead device, a slow HSM).
    public let faults: FakeFaults
    /// SoftHSM 2.6.1's file store, as it behaves across processes: each process keeps an index of the token's
    /// objects, rebuilt at a search only when the token's generation has moved since the process last wrote or
    /// rebuilt it. A process's own create or destroy moves the generation and takes the new value along without
    /// rebuilding (`Generation::commit`), so objects another process created before that write stay out of its
    /// searches until some other process creates or destroys one. Destroyed objects drop out at once, and
    /// attribute changes show at once (each object file is read again when it changed).
    public let staleIndexes: Bool

    struct Hiding {
        var template: [Attribute]
        var remaining: Int?
        var probability: Double
    }

    struct State {
        var objects: [UInt64: FakeObject] = [:]
        var nextID: UInt64 = 1
        var userPIN: [UInt8]?
        var soPIN: [UInt8]
        var random: SplitMix64
        var hidings: [Hiding] = []
        var hidingRandom: SplitMix64
        var connections = 0
        /// Moved by every create and destroy of a token object (with `staleIndexes`).
        var generation: UInt64 = 0
    }

    let state: Mutex<State>

    /// - Parameters:
    ///   - userPIN: nil for a token whose user PIN is not initialized yet (C_InitPIN sets it).
    ///   - seed: every random byte, generated key and probabilistic fault follows from it.
    ///   - mechanisms: nil offers every mechanism the fake implements.
    public init(label: String = "fake token", serial: String? = nil, userPIN: String? = "1234", soPIN: String = "5678",
                seed: UInt64 = 0, mechanisms: [CK_MECHANISM_TYPE]? = nil, oneOperationPerSession: Bool = false,
                savesOperationState: Bool = false, staleIndexes: Bool = false) {
        self.label = label
        self.seed = seed
        let hex = String(mix64(seed ^ 0x5E41_A100), radix: 16, uppercase: true)
        self.serial = serial ?? String(repeating: "0", count: max(0, 16 - hex.count)) + hex
        self.mechanisms = mechanisms ?? FakeMechanisms.all.map(\.type)
        self.oneOperationPerSession = oneOperationPerSession
        self.savesOperationState = savesOperationState
        self.staleIndexes = staleIndexes
        self.faults = FakeFaults(seed: mix64(seed ^ 0xFA17_0000))
        state = Mutex(State(userPIN: userPIN.map { Array($0.utf8) }, soPIN: Array(soPIN.utf8),
                            random: SplitMix64(seed: seed), hidingRandom: SplitMix64(seed: mix64(seed ^ 0x41DE))))
    }

    /// A new connection to this token: one process (or host) using it.
    public func connection(module: FakeModule? = nil) -> FakeToken { FakeToken(store: self, module: module) }

    // MARK: cross-process inconsistency

    /// Makes token objects matching `template` missing from the next `searches` C_FindObjects results that
    /// would have held them, in any connection (nil: until cleared), each such search with `probability`: as
    /// SoftHSM's file store shows another process's object while that process rewrites it. The objects stay
    /// usable by handle.
    public func hideObjects(matching template: [Attribute], forSearches searches: Int? = 1, probability: Double = 1) {
        if let searches, searches <= 0 { return }
        state.withLock { $0.hidings.append(Hiding(template: template, remaining: searches, probability: probability)) }
    }

    public func clearHiddenObjects() { state.withLock { $0.hidings = [] } }

    // MARK: inspection, for tests

    /// Every token object's attributes (sensitive values included: this is the test's view of the device).
    public func tokenObjects(matching template: [Attribute] = []) -> [[Attribute]] {
        state.withLock { state in
            state.objects.keys.sorted().compactMap { state.objects[$0] }.filter { $0.matches(template) }.map(\.template)
        }
    }

    public var tokenObjectCount: Int { state.withLock { $0.objects.count } }

    // MARK: for connections

    func newConnectionNumber() -> Int {
        state.withLock { state in
            state.connections += 1
            return state.connections
        }
    }

    /// Drops from `found` (ids in search order) the objects a hiding rule hides from this search.
    static func unhidden(_ found: [UInt64], in state: inout State) -> [UInt64] {
        var result = found
        var index = 0
        while index < state.hidings.count {
            let hiding = state.hidings[index]
            let hidden = Set(result.filter { state.objects[$0]?.matches(hiding.template) == true })
            guard !hidden.isEmpty, state.hidingRandom.chance(hiding.probability) else {
                index += 1
                continue
            }
            result.removeAll { hidden.contains($0) }
            if let remaining = hiding.remaining {
                if remaining <= 1 {
                    state.hidings.remove(at: index)
                    continue
                }
                state.hidings[index].remaining = remaining - 1
            }
            index += 1
        }
        return result
    }

    func takeID(_ state: inout State) -> UInt64 {
        defer { state.nextID += 1 }
        return state.nextID
    }
}

/// One module instance in one process whose tokens are several fake tokens (as the tokens of one SoftHSM
/// configuration are slots of one module): restarting it restarts every connection in it.
public final class FakeModule: Sendable {
    public let name: String
    private struct Weak: @unchecked Sendable { weak var token: FakeToken? }
    private let members = Mutex<[Weak]>([])

    public init(name: String) { self.name = name }

    func add(_ token: FakeToken) { members.withLock { $0.append(Weak(token: token)) } }

    var connections: [FakeToken] { members.withLock { $0.compactMap(\.token) } }
}
