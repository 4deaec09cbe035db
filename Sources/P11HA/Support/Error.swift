// The one error type of p11ha: a CK_RV, and whose fault it is (the caller's or a member's).
import CInterop

public struct P11Error: Error, Equatable, Sendable, CustomStringConvertible {
    public let rv: CK_RV
    /// For CKR_BUFFER_TOO_SMALL: the length the caller's buffer needs.
    public let neededLength: Int?
    /// Whether a member answered this (or failed to answer in time), rather than p11ha's own checks.
    public let fromMember: Bool
    /// The member did not answer before the operation's deadline.
    public let timedOut: Bool

    public init(_ rv: CK_RV, neededLength: Int? = nil) {
        self.init(rv, neededLength: neededLength, fromMember: false, timedOut: false)
    }

    private init(_ rv: CK_RV, neededLength: Int?, fromMember: Bool, timedOut: Bool) {
        self.rv = rv
        self.neededLength = neededLength
        self.fromMember = fromMember
        self.timedOut = timedOut
    }

    /// What a member's module returned.
    public static func member(_ rv: CK_RV, neededLength: Int? = nil) -> P11Error {
        P11Error(rv, neededLength: neededLength, fromMember: true, timedOut: false)
    }

    /// A member call past its deadline: reported to the application, if no peer can finish, as CKR_DEVICE_ERROR.
    public static let deadlineExceeded = P11Error(CK_RV(CKR_DEVICE_ERROR), neededLength: nil, fromMember: true, timedOut: true)

    /// True when a member (device, link, module) failed rather than the request: the one place that decides
    /// failover. Errors of p11ha's own checks are never member faults, whatever their code; a member's
    /// CKR_SESSION_HANDLE_INVALID is, since p11ha only ever passes a member its own valid session handles.
    public var isMemberFault: Bool { fromMember && Self.memberFaults.contains(rv) }

    /// The member says our session there is gone.
    public var isSessionLoss: Bool { rv == CKR_SESSION_HANDLE_INVALID || rv == CKR_SESSION_CLOSED }

    static let memberFaults: Set<CK_RV> = [
        CK_RV(CKR_DEVICE_ERROR), CK_RV(CKR_DEVICE_REMOVED), CK_RV(CKR_DEVICE_MEMORY),
        CK_RV(CKR_TOKEN_NOT_PRESENT), CK_RV(CKR_TOKEN_NOT_RECOGNIZED),
        CK_RV(CKR_CRYPTOKI_NOT_INITIALIZED), CK_RV(CKR_GENERAL_ERROR),
        CK_RV(CKR_SESSION_CLOSED), CK_RV(CKR_SESSION_HANDLE_INVALID),
    ]

    public var description: String {
        timedOut ? "no answer before the deadline" : "\(ckrName(rv)) (0x\(String(rv, radix: 16)))"
    }

    public static let generalError = P11Error(CK_RV(CKR_GENERAL_ERROR))
    public static let argumentsBad = P11Error(CK_RV(CKR_ARGUMENTS_BAD))
    public static let sessionHandleInvalid = P11Error(CK_RV(CKR_SESSION_HANDLE_INVALID))
    public static let objectHandleInvalid = P11Error(CK_RV(CKR_OBJECT_HANDLE_INVALID))
    public static let keyHandleInvalid = P11Error(CK_RV(CKR_KEY_HANDLE_INVALID))
    public static let slotIDInvalid = P11Error(CK_RV(CKR_SLOT_ID_INVALID))
    public static let notInitialized = P11Error(CK_RV(CKR_CRYPTOKI_NOT_INITIALIZED))
    public static let operationNotInitialized = P11Error(CK_RV(CKR_OPERATION_NOT_INITIALIZED))
    public static let operationActive = P11Error(CK_RV(CKR_OPERATION_ACTIVE))
    public static let functionNotSupported = P11Error(CK_RV(CKR_FUNCTION_NOT_SUPPORTED))
    public static let deviceError = P11Error(CK_RV(CKR_DEVICE_ERROR))
    public static let mechanismParamInvalid = P11Error(CK_RV(CKR_MECHANISM_PARAM_INVALID))
}

/// The PKCS#11 name of a return value, for logs and messages.
public func ckrName(_ rv: CK_RV) -> String {
    switch rv {
    case CKR_OK: "CKR_OK"
    case CKR_CANCEL: "CKR_CANCEL"
    case CKR_HOST_MEMORY: "CKR_HOST_MEMORY"
    case CKR_SLOT_ID_INVALID: "CKR_SLOT_ID_INVALID"
    case CKR_GENERAL_ERROR: "CKR_GENERAL_ERROR"
    case CKR_FUNCTION_FAILED: "CKR_FUNCTION_FAILED"
    case CKR_ARGUMENTS_BAD: "CKR_ARGUMENTS_BAD"
    case CKR_CANT_LOCK: "CKR_CANT_LOCK"
    case CKR_ATTRIBUTE_SENSITIVE: "CKR_ATTRIBUTE_SENSITIVE"
    case CKR_ATTRIBUTE_TYPE_INVALID: "CKR_ATTRIBUTE_TYPE_INVALID"
    case CKR_ATTRIBUTE_VALUE_INVALID: "CKR_ATTRIBUTE_VALUE_INVALID"
    case CKR_DATA_INVALID: "CKR_DATA_INVALID"
    case CKR_DATA_LEN_RANGE: "CKR_DATA_LEN_RANGE"
    case CKR_DEVICE_ERROR: "CKR_DEVICE_ERROR"
    case CKR_DEVICE_MEMORY: "CKR_DEVICE_MEMORY"
    case CKR_DEVICE_REMOVED: "CKR_DEVICE_REMOVED"
    case CKR_FUNCTION_NOT_SUPPORTED: "CKR_FUNCTION_NOT_SUPPORTED"
    case CKR_FUNCTION_CANCELED: "CKR_FUNCTION_CANCELED"
    case CKR_KEY_HANDLE_INVALID: "CKR_KEY_HANDLE_INVALID"
    case CKR_KEY_TYPE_INCONSISTENT: "CKR_KEY_TYPE_INCONSISTENT"
    case CKR_KEY_FUNCTION_NOT_PERMITTED: "CKR_KEY_FUNCTION_NOT_PERMITTED"
    case CKR_MECHANISM_INVALID: "CKR_MECHANISM_INVALID"
    case CKR_MECHANISM_PARAM_INVALID: "CKR_MECHANISM_PARAM_INVALID"
    case CKR_OBJECT_HANDLE_INVALID: "CKR_OBJECT_HANDLE_INVALID"
    case CKR_OPERATION_ACTIVE: "CKR_OPERATION_ACTIVE"
    case CKR_OPERATION_NOT_INITIALIZED: "CKR_OPERATION_NOT_INITIALIZED"
    case CKR_PIN_INCORRECT: "CKR_PIN_INCORRECT"
    case CKR_PIN_LOCKED: "CKR_PIN_LOCKED"
    case CKR_SESSION_CLOSED: "CKR_SESSION_CLOSED"
    case CKR_SESSION_HANDLE_INVALID: "CKR_SESSION_HANDLE_INVALID"
    case CKR_SESSION_READ_ONLY: "CKR_SESSION_READ_ONLY"
    case CKR_SESSION_PARALLEL_NOT_SUPPORTED: "CKR_SESSION_PARALLEL_NOT_SUPPORTED"
    case CKR_SIGNATURE_INVALID: "CKR_SIGNATURE_INVALID"
    case CKR_SIGNATURE_LEN_RANGE: "CKR_SIGNATURE_LEN_RANGE"
    case CKR_TEMPLATE_INCOMPLETE: "CKR_TEMPLATE_INCOMPLETE"
    case CKR_TEMPLATE_INCONSISTENT: "CKR_TEMPLATE_INCONSISTENT"
    case CKR_TOKEN_NOT_PRESENT: "CKR_TOKEN_NOT_PRESENT"
    case CKR_TOKEN_NOT_RECOGNIZED: "CKR_TOKEN_NOT_RECOGNIZED"
    case CKR_TOKEN_WRITE_PROTECTED: "CKR_TOKEN_WRITE_PROTECTED"
    case CKR_USER_ALREADY_LOGGED_IN: "CKR_USER_ALREADY_LOGGED_IN"
    case CKR_USER_NOT_LOGGED_IN: "CKR_USER_NOT_LOGGED_IN"
    case CKR_USER_TYPE_INVALID: "CKR_USER_TYPE_INVALID"
    case CKR_USER_ANOTHER_ALREADY_LOGGED_IN: "CKR_USER_ANOTHER_ALREADY_LOGGED_IN"
    case CKR_KEY_NOT_WRAPPABLE: "CKR_KEY_NOT_WRAPPABLE"
    case CKR_KEY_UNEXTRACTABLE: "CKR_KEY_UNEXTRACTABLE"
    case CKR_BUFFER_TOO_SMALL: "CKR_BUFFER_TOO_SMALL"
    case CKR_CRYPTOKI_NOT_INITIALIZED: "CKR_CRYPTOKI_NOT_INITIALIZED"
    case CKR_CRYPTOKI_ALREADY_INITIALIZED: "CKR_CRYPTOKI_ALREADY_INITIALIZED"
    default: "CKR_0x\(String(rv, radix: 16))"
    }
}
