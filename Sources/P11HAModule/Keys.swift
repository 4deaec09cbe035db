// Key management: generate, wrap, unwrap, derive; and random numbers.
import CInterop
import P11HA

func generateKey(_ session: CK_SESSION_HANDLE, _ m: MechanismPtr?, _ attributes: AttributePtr?, _ count: CK_ULONG,
                 _ key: UnsafeMutablePointer<CK_OBJECT_HANDLE>?) -> CK_RV {
    entry { () throws(P11Error) in
        let rt = try runtime()
        let out = try required(key)
        out.pointee = (try rt.generateKey(SessionHandle(session), try mechanism(m), try template(attributes, count))).raw
    }
}

func generateKeyPair(_ session: CK_SESSION_HANDLE, _ m: MechanismPtr?,
                     _ publicAttributes: AttributePtr?, _ publicCount: CK_ULONG,
                     _ privateAttributes: AttributePtr?, _ privateCount: CK_ULONG,
                     _ publicKey: UnsafeMutablePointer<CK_OBJECT_HANDLE>?, _ privateKey: UnsafeMutablePointer<CK_OBJECT_HANDLE>?) -> CK_RV {
    entry { () throws(P11Error) in
        let rt = try runtime()
        let pubOut = try required(publicKey)
        let privOut = try required(privateKey)
        let (pub, priv) = try rt.generateKeyPair(SessionHandle(session), try mechanism(m),
                                                 publicTemplate: try template(publicAttributes, publicCount),
                                                 privateTemplate: try template(privateAttributes, privateCount))
        pubOut.pointee = pub.raw
        privOut.pointee = priv.raw
    }
}

func wrapKey(_ session: CK_SESSION_HANDLE, _ m: MechanismPtr?, _ wrappingKey: CK_OBJECT_HANDLE, _ key: CK_OBJECT_HANDLE,
             _ out: Bytes?, _ outLength: ULongPtr?) -> CK_RV {
    entry { () throws(P11Error) in
        let rt = try runtime()
        let mech = try mechanism(m)
        try produce(out, outLength) { (room) throws(P11Error) in
            try rt.wrapKey(SessionHandle(session), mech, wrappingKey: ObjectHandle(wrappingKey), key: ObjectHandle(key), capacity: room)
        }
    }
}

func unwrapKey(_ session: CK_SESSION_HANDLE, _ m: MechanismPtr?, _ unwrappingKey: CK_OBJECT_HANDLE,
               _ wrapped: Bytes?, _ wrappedLength: CK_ULONG, _ attributes: AttributePtr?, _ count: CK_ULONG,
               _ key: UnsafeMutablePointer<CK_OBJECT_HANDLE>?) -> CK_RV {
    entry { () throws(P11Error) in
        let rt = try runtime()
        let out = try required(key)
        out.pointee = (try rt.unwrapKey(SessionHandle(session), try mechanism(m), unwrappingKey: ObjectHandle(unwrappingKey),
                                        wrapped: try input(wrapped, wrappedLength), try template(attributes, count))).raw
    }
}

func deriveKey(_ session: CK_SESSION_HANDLE, _ m: MechanismPtr?, _ baseKey: CK_OBJECT_HANDLE,
               _ attributes: AttributePtr?, _ count: CK_ULONG, _ key: UnsafeMutablePointer<CK_OBJECT_HANDLE>?) -> CK_RV {
    entry { () throws(P11Error) in
        let rt = try runtime()
        let out = try required(key)
        out.pointee = (try rt.deriveKey(SessionHandle(session), try mechanism(m), baseKey: ObjectHandle(baseKey), try template(attributes, count))).raw
    }
}

func seedRandom(_ session: CK_SESSION_HANDLE, _ seed: Bytes?, _ seedLength: CK_ULONG) -> CK_RV {
    entry { () throws(P11Error) in
        let rt = try runtime()
        try rt.seedRandom(SessionHandle(session), try input(seed, seedLength))
    }
}

func generateRandom(_ session: CK_SESSION_HANDLE, _ out: Bytes?, _ count: CK_ULONG) -> CK_RV {
    entry { () throws(P11Error) in
        let rt = try runtime()
        let n = try length(count)
        if n == 0 { _ = try rt.sessionInfo(SessionHandle(session)); return }
        let buffer = try required(out)
        // In pieces written to the caller's buffer as they come: p11ha holds one piece at a time, whatever the
        // length asked for.
        var done = 0
        while done < n {
            let piece = try rt.generateRandom(SessionHandle(session), count: min(n - done, randomPiece))
            guard !piece.isEmpty else { throw P11Error.generalError }
            (buffer + done).update(from: piece, count: min(piece.count, n - done))
            done += piece.count
        }
    }
}

/// The most random bytes asked of a member in one call.
let randomPiece = 64 << 10
