// Signing and verification, with recovery where the members support it.
import CInterop
import P11HA

func signInit(_ session: CK_SESSION_HANDLE, _ m: MechanismPtr?, _ key: CK_OBJECT_HANDLE) -> CK_RV {
    operationInit(.sign, session, m, key)
}

func sign(_ session: CK_SESSION_HANDLE, _ data: Bytes?, _ dataLength: CK_ULONG, _ out: Bytes?, _ outLength: ULongPtr?) -> CK_RV {
    singlePart(.sign, session, data, dataLength, out, outLength)
}

func signUpdate(_ session: CK_SESSION_HANDLE, _ part: Bytes?, _ partLength: CK_ULONG) -> CK_RV {
    update(.sign, session, part, partLength)
}

func signFinal(_ session: CK_SESSION_HANDLE, _ out: Bytes?, _ outLength: ULongPtr?) -> CK_RV {
    final(.sign, session, out, outLength)
}

func signRecoverInit(_ session: CK_SESSION_HANDLE, _ m: MechanismPtr?, _ key: CK_OBJECT_HANDLE) -> CK_RV {
    operationInit(.signRecover, session, m, key)
}

func signRecover(_ session: CK_SESSION_HANDLE, _ data: Bytes?, _ dataLength: CK_ULONG, _ out: Bytes?, _ outLength: ULongPtr?) -> CK_RV {
    singlePart(.signRecover, session, data, dataLength, out, outLength)
}

func verifyInit(_ session: CK_SESSION_HANDLE, _ m: MechanismPtr?, _ key: CK_OBJECT_HANDLE) -> CK_RV {
    operationInit(.verify, session, m, key)
}

func verify(_ session: CK_SESSION_HANDLE, _ data: Bytes?, _ dataLength: CK_ULONG, _ signature: Bytes?, _ signatureLength: CK_ULONG) -> CK_RV {
    entry { () throws(P11Error) in
        let rt = try runtime()
        let (data, signature) = try arguments(rt, session) { () throws(P11Error) -> ([UInt8], [UInt8]) in
            (try input(data, dataLength), try input(signature, signatureLength))
        }
        try rt.verify(SessionHandle(session), data, signature: signature)
    }
}

func verifyUpdate(_ session: CK_SESSION_HANDLE, _ part: Bytes?, _ partLength: CK_ULONG) -> CK_RV {
    update(.verify, session, part, partLength)
}

func verifyFinal(_ session: CK_SESSION_HANDLE, _ signature: Bytes?, _ signatureLength: CK_ULONG) -> CK_RV {
    entry { () throws(P11Error) in
        let rt = try runtime()
        let signature = try arguments(rt, session) { () throws(P11Error) -> [UInt8] in try input(signature, signatureLength) }
        try rt.verifyFinal(SessionHandle(session), signature: signature)
    }
}

func verifyRecoverInit(_ session: CK_SESSION_HANDLE, _ m: MechanismPtr?, _ key: CK_OBJECT_HANDLE) -> CK_RV {
    operationInit(.verifyRecover, session, m, key)
}

func verifyRecover(_ session: CK_SESSION_HANDLE, _ signature: Bytes?, _ signatureLength: CK_ULONG, _ out: Bytes?, _ outLength: ULongPtr?) -> CK_RV {
    singlePart(.verifyRecover, session, signature, signatureLength, out, outLength)
}
