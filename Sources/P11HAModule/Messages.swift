// Message-based encryption and signing (PKCS#11 3.0): no member lists a mechanism for them (no CKF_MESSAGE_*
// flag in their mechanism info; they are 2.40 tokens), so each answers CKR_FUNCTION_NOT_SUPPORTED for a valid session.
import CInterop
import P11HA

typealias VoidPtr = UnsafeMutableRawPointer

func messageInit(_ session: CK_SESSION_HANDLE, _ mechanism: MechanismPtr?, _ key: CK_OBJECT_HANDLE) -> CK_RV {
    unsupported(session)
}

func messageFinal(_ session: CK_SESSION_HANDLE) -> CK_RV { unsupported(session) }

func cryptMessage(_ session: CK_SESSION_HANDLE, _ parameter: VoidPtr?, _ parameterLength: CK_ULONG, _ associated: Bytes?,
                  _ associatedLength: CK_ULONG, _ input: Bytes?, _ inputLength: CK_ULONG, _ output: Bytes?,
                  _ outputLength: ULongPtr?) -> CK_RV {
    unsupported(session)
}

func cryptMessageBegin(_ session: CK_SESSION_HANDLE, _ parameter: VoidPtr?, _ parameterLength: CK_ULONG, _ associated: Bytes?,
                       _ associatedLength: CK_ULONG) -> CK_RV {
    unsupported(session)
}

func cryptMessageNext(_ session: CK_SESSION_HANDLE, _ parameter: VoidPtr?, _ parameterLength: CK_ULONG, _ input: Bytes?,
                      _ inputLength: CK_ULONG, _ output: Bytes?, _ outputLength: ULongPtr?, _ flags: CK_FLAGS) -> CK_RV {
    unsupported(session)
}

func signMessage(_ session: CK_SESSION_HANDLE, _ parameter: VoidPtr?, _ parameterLength: CK_ULONG, _ data: Bytes?,
                 _ dataLength: CK_ULONG, _ signature: Bytes?, _ signatureLength: ULongPtr?) -> CK_RV {
    unsupported(session)
}

func messageBegin(_ session: CK_SESSION_HANDLE, _ parameter: VoidPtr?, _ parameterLength: CK_ULONG) -> CK_RV {
    unsupported(session)
}

func verifyMessage(_ session: CK_SESSION_HANDLE, _ parameter: VoidPtr?, _ parameterLength: CK_ULONG, _ data: Bytes?,
                   _ dataLength: CK_ULONG, _ signature: Bytes?, _ signatureLength: CK_ULONG) -> CK_RV {
    unsupported(session)
}
