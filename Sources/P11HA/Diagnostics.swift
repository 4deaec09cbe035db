// What an operator's tool needs to know about each member: which token it reached, its mechanisms, its login.
import CInterop

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
            let info = try? member.tokenInfo()
            var login: Result<Void, P11Error>? = nil
            if let pin = member.ownPIN {
                login = Result { () throws(P11Error) in
                    let session = try member.openSession(readWrite: false)
                    defer { member.closeSession(session) }
                    try member.login(session, userType: CK_USER_TYPE(CKU_USER), pin: pin)
                    try? member.logout(session)
                }
            }
            return MemberReport(uri: member.name, line: member.config.line,
                                tokenLabel: info.map { fieldString($0.label) } ?? "?",
                                serial: info.map { fieldString($0.serialNumber) } ?? "?",
                                model: info.map { fieldString($0.model) } ?? "?",
                                manufacturer: info.map { fieldString($0.manufacturerID) } ?? "?",
                                mechanisms: Set((try? member.mechanismList()) ?? []),
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
