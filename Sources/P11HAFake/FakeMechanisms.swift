// The mechanisms the fake implements, with the CK_MECHANISM_INFO it reports for each.
import CInterop
import P11HA

public struct FakeMechanism: Sendable {
    public let type: CK_MECHANISM_TYPE
    public let info: CK_MECHANISM_INFO

    init(_ type: UInt, min: Int, max: Int, _ flags: UInt) {
        self.type = CK_MECHANISM_TYPE(type)
        info = CK_MECHANISM_INFO(ulMinKeySize: CK_ULONG(min), ulMaxKeySize: CK_ULONG(max), flags: CK_FLAGS(flags))
    }

    func allows(_ kind: OperationKind) -> Bool {
        let flag: UInt = switch kind {
        case .encrypt: CKF_ENCRYPT
        case .decrypt: CKF_DECRYPT
        case .digest: CKF_DIGEST
        case .sign: CKF_SIGN
        case .verify: CKF_VERIFY
        case .signRecover: CKF_SIGN_RECOVER
        case .verifyRecover: CKF_VERIFY_RECOVER
        }
        return info.flags & CK_FLAGS(flag) != 0
    }
}

public enum FakeMechanisms {
    private static let ec: UInt = CKF_EC_F_P | CKF_EC_NAMEDCURVE | CKF_EC_UNCOMPRESS

    /// Key sizes in bytes for AES and HMAC, in bits for EC and RSA, as SoftHSM reports them.
    public static let all: [FakeMechanism] = [
        FakeMechanism(CKM_AES_KEY_GEN, min: 16, max: 32, CKF_GENERATE),
        FakeMechanism(CKM_GENERIC_SECRET_KEY_GEN, min: 1, max: 512, CKF_GENERATE),
        FakeMechanism(CKM_EC_KEY_PAIR_GEN, min: 256, max: 521, CKF_GENERATE_KEY_PAIR | ec),
        FakeMechanism(CKM_RSA_PKCS_KEY_PAIR_GEN, min: 1024, max: 4096, CKF_GENERATE_KEY_PAIR),
        FakeMechanism(CKM_SHA256, min: 0, max: 0, CKF_DIGEST),
        FakeMechanism(CKM_SHA384, min: 0, max: 0, CKF_DIGEST),
        FakeMechanism(CKM_SHA512, min: 0, max: 0, CKF_DIGEST),
        FakeMechanism(CKM_SHA256_HMAC, min: 32, max: 512, CKF_SIGN | CKF_VERIFY),
        FakeMechanism(CKM_ECDSA, min: 256, max: 521, CKF_SIGN | CKF_VERIFY | ec),
        FakeMechanism(CKM_ECDSA_SHA256, min: 256, max: 521, CKF_SIGN | CKF_VERIFY | ec),
        FakeMechanism(CKM_RSA_PKCS, min: 1024, max: 4096, CKF_SIGN | CKF_VERIFY | CKF_WRAP | CKF_UNWRAP),
        FakeMechanism(CKM_SHA256_RSA_PKCS, min: 1024, max: 4096, CKF_SIGN | CKF_VERIFY),
        FakeMechanism(CKM_AES_ECB, min: 16, max: 32, CKF_ENCRYPT | CKF_DECRYPT),
        FakeMechanism(CKM_AES_CBC, min: 16, max: 32, CKF_ENCRYPT | CKF_DECRYPT),
        FakeMechanism(CKM_AES_CBC_PAD, min: 16, max: 32, CKF_ENCRYPT | CKF_DECRYPT),
        FakeMechanism(CKM_AES_GCM, min: 16, max: 32, CKF_ENCRYPT | CKF_DECRYPT),
        FakeMechanism(CKM_AES_KEY_WRAP, min: 16, max: 32, CKF_WRAP | CKF_UNWRAP),
        FakeMechanism(CKM_AES_KEY_WRAP_PAD, min: 16, max: 32, CKF_WRAP | CKF_UNWRAP),
        FakeMechanism(CKM_ECDH1_DERIVE, min: 256, max: 521, CKF_DERIVE | ec),
        FakeMechanism(CKM_SHA256_KEY_DERIVATION, min: 0, max: 0, CKF_DERIVE),
        FakeMechanism(CKM_CONCATENATE_BASE_AND_DATA, min: 0, max: 0, CKF_DERIVE),
        FakeMechanism(CKM_CONCATENATE_DATA_AND_BASE, min: 0, max: 0, CKF_DERIVE),
    ]

    static func named(_ type: CK_MECHANISM_TYPE) -> FakeMechanism? { all.first { $0.type == type } }
}
