// What an operator's tool needs to know about each member: which token it reached, its mechanisms, its login.
import CInterop
import P11HA

public struct MemberReport: Sendable {
    public let uri: String
    public let line: Int
    public let tokenLabel: String
    public let serial: String
    public let model: String
    public let manufacturer: String
    public let mechanisms: Set<CK_MECHANISM_TYPE>
    public let health: Health
    /// nil when the member has no PIN of its own; otherwise whether logging in with it worked.
    public let login: Result<Void, P11Error>?
}

extension Runtime {
    /// Reaches every member of a group: its token, mechanisms and, where its URI gives a PIN, a login.
    public func memberReports(_ group: Group) -> [MemberReport] {
        group.members.map { member in
            let info = try? member.token.tokenInfo()
            var login: Result<Void, P11Error>? = nil
            if let pin = member.ownPIN {
                login = Result { () throws(P11Error) in
                    let session = try member.token.openSession(readWrite: false)
                    defer { member.token.closeSession(session) }
                    try member.token.login(session, userType: CK_USER_TYPE(CKU_USER), pin: pin)
                    try? member.token.logout(session)
                }
            }
            return MemberReport(uri: member.name, line: member.config.line,
                                tokenLabel: info.map { fieldString($0.label) } ?? "?",
                                serial: info.map { fieldString($0.serialNumber) } ?? "?",
                                model: info.map { fieldString($0.model) } ?? "?",
                                manufacturer: info.map { fieldString($0.manufacturerID) } ?? "?",
                                mechanisms: Set((try? member.token.mechanismList()) ?? []),
                                health: member.health, login: login)
        }
    }
}

/// The PKCS#11 name of a mechanism, for operators (the common ones; others in hex).
public func mechanismName(_ type: CK_MECHANISM_TYPE) -> String {
    let names: [CK_MECHANISM_TYPE: String] = [
        CK_MECHANISM_TYPE(CKM_RSA_PKCS_KEY_PAIR_GEN): "CKM_RSA_PKCS_KEY_PAIR_GEN", CK_MECHANISM_TYPE(CKM_RSA_PKCS): "CKM_RSA_PKCS",
        CK_MECHANISM_TYPE(CKM_RSA_PKCS_OAEP): "CKM_RSA_PKCS_OAEP", CK_MECHANISM_TYPE(CKM_RSA_PKCS_PSS): "CKM_RSA_PKCS_PSS",
        CK_MECHANISM_TYPE(CKM_SHA256_RSA_PKCS): "CKM_SHA256_RSA_PKCS", CK_MECHANISM_TYPE(CKM_EC_KEY_PAIR_GEN): "CKM_EC_KEY_PAIR_GEN",
        CK_MECHANISM_TYPE(CKM_ECDSA): "CKM_ECDSA", CK_MECHANISM_TYPE(CKM_ECDH1_DERIVE): "CKM_ECDH1_DERIVE",
        CK_MECHANISM_TYPE(CKM_AES_KEY_GEN): "CKM_AES_KEY_GEN", CK_MECHANISM_TYPE(CKM_AES_GCM): "CKM_AES_GCM",
        CK_MECHANISM_TYPE(CKM_AES_CBC_PAD): "CKM_AES_CBC_PAD", CK_MECHANISM_TYPE(CKM_AES_KEY_WRAP_PAD): "CKM_AES_KEY_WRAP_PAD",
        CK_MECHANISM_TYPE(CKM_SHA256): "CKM_SHA256",
    ]
    return names[type] ?? "0x\(String(type, radix: 16))"
}

/// What `p11hactl status` reports of one member, probed now.
public struct MemberSurvey: Sendable {
    public let name: String
    public let uri: String
    public let standby: Bool
    public let reachable: Bool
    public let problem: String?
    public let replicationKey: Bool
    /// Token objects p11ha manages (without its own); private ones only counted when logged in.
    public let objectCount: Int?
    /// The replication records it holds (private ones counted only when logged in); nil when unknown.
    public let records: Int?
    /// Against the union of every reachable member's records: whether it holds what they say, and the objects it
    /// lacks that no reachable member can give it.
    public let agrees: Bool
    public let missing: [String]
    public let unrepairable: [String]
    public let unrecorded: Int
    /// Objects no record describes are not alike on every reachable member.
    public let unrecordedDiffer: Bool
}

extension Runtime {
    /// Probes every member of a group: reachable, replication key, objects, and how it stands against the union of
    /// the members' replication records (private objects only with a PIN).
    public func survey(_ group: Group, userPIN: Secret?) -> [MemberSurvey] {
        var reached: [ReplicaKeeper.Reached] = []
        var loggedIn: [Int: Bool] = [:]
        var problems: [Int: String] = [:]
        var keys: [Int: Bool] = [:]
        var counts: [Int: Int] = [:]
        defer { for r in reached { r.member.token.closeSession(r.session) } }
        for member in group.members {
            do throws(P11Error) {
                let session = try member.token.openSession(readWrite: false)
                reached.append(ReplicaKeeper.Reached(member: member, session: session))
                if let pin = member.ownPIN ?? userPIN {
                    do throws(P11Error) {
                        try member.token.login(session, userType: CK_USER_TYPE(CKU_USER), pin: pin)
                    } catch where error.rv == CKR_USER_ALREADY_LOGGED_IN {}
                    loggedIn[member.index] = true
                }
                keys[member.index] = try ReplicationKey.find(on: member.token, session) != nil
                counts[member.index] = try ObjectCopy.inventory(member, session, replicationKey: nil).filter { !$0.identity.isReplicationKey }.count
            } catch {
                problems[member.index] = "\(error)"
                reached.removeAll { $0.member === member }
            }
        }
        // Members compared alike: with a PIN every one is logged in, without none is.
        let allLoggedIn = reached.allSatisfy { loggedIn[$0.member.index] == true }
        let standings = (try? replicas.standings(reached, in: group, loggedIn: allLoggedIn)) ?? [:]
        return group.members.map { member in
            if let problem = problems[member.index] {
                return MemberSurvey(name: member.name, uri: member.config.displayURI, standby: member.isStandby, reachable: false,
                                    problem: problem, replicationKey: false, objectCount: nil, records: nil, agrees: false,
                                    missing: [], unrepairable: [], unrecorded: 0, unrecordedDiffer: false)
            }
            let standing = standings[member.index]
            return MemberSurvey(name: member.name, uri: member.config.displayURI, standby: member.isStandby, reachable: true,
                                problem: standing == nil ? "could not be compared" : nil, replicationKey: keys[member.index] ?? false,
                                objectCount: counts[member.index], records: standing?.records, agrees: standing?.agrees ?? false,
                                missing: standing?.missing ?? [], unrepairable: standing?.unrepairable ?? [],
                                unrecorded: standing?.unrecorded ?? 0, unrecordedDiffer: standing?.unrecordedDiffer ?? false)
        }
    }

    /// Whether every reachable member holds what the records say (no object missing, none to destroy, no
    /// attribute differing) and nothing is left that cannot be repaired.
    public func membersAgree(_ surveys: [MemberSurvey]) -> Bool {
        surveys.filter(\.reachable).allSatisfy { $0.agrees && $0.unrepairable.isEmpty }
    }
}
