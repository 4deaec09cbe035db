// Key management: generate, wrap, unwrap, derive; and random numbers.
import CInterop
import P11HA

func generateKey(_ session: CK_SESSION_HANDLE, _ m: MechanismPtr?, _ attributes: AttributePtr?, _ count: CK_ULONG,
                 _ key: UnsafeMutablePointer<CK_OBJECT_HANDLE>?) -> CK_RV {
    entry { () throws(P11Error) in
        let rt = try runtime()
        let (out, mech, attrs) = try arguments(rt, session) { () throws(P11Error) -> (UnsafeMutablePointer<CK_OBJECT_HANDLE>, Mechanism, [Attribute]) in
            (try required(key), try mechanism(m), try template(attributes, count))
        }
        out.pointee = (try rt.generateKey(SessionHandle(session), mech, attrs)).raw
    }
}

func generateKeyPair(_ session: CK_SESSION_HANDLE, _ m: MechanismPtr?,
                     _ publicAttributes: AttributePtr?, _ publicCount: CK_ULONG,
                     _ privateAttributes: AttributePtr?, _ privateCount: CK_ULONG,
                     _ publicKey: UnsafeMutablePointer<CK_OBJECT_HANDLE>?, _ privateKey: UnsafeMutablePointer<CK_OBJECT_HANDLE>?) -> CK_RV {
    entry { () throws(P11Error) in
        let rt = try runtime()
        typealias Arguments = (UnsafeMutablePointer<CK_OBJECT_HANDLE>, UnsafeMutablePointer<CK_OBJECT_HANDLE>, Mechanism, [Attribute], [Attribute])
        let (pubOut, privOut, mech, publicTemplate, privateTemplate) = try arguments(rt, session) { () throws(P11Error) -> Arguments in
            (try required(publicKey), try required(privateKey), try mechanism(m),
             try template(publicAttributes, publicCount), try template(privateAttributes, privateCount))
        }
        let (pub, priv) = try rt.generateKeyPair(SessionHandle(session), mech,
                                                 publicTemplate: publicTemplate, privateTemplate: privateTemplate)
        pubOut.pointee = pub.raw
        privOut.pointee = priv.raw
    }
}

func wrapKey(_ session: CK_SESSION_HANDLE, _ m: MechanismPtr?, _ wrappingKey: CK_OBJECT_HANDLE, _ key: CK_OBJECT_HANDLE,
             _ out: Bytes?, _ outLength: ULongPtr?) -> CK_RV {
    entry { () throws(P11Error) in
        let rt = try runtime()
        let mech = try arguments(rt, session) { () throws(P11Error) -> Mechanism in
            _ = try capacity(out, outLength)
            return try mechanism(m)
        }
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
        typealias Arguments = (UnsafeMutablePointer<CK_OBJECT_HANDLE>, Mechanism, [UInt8], [Attribute])
        let (out, mech, blob, attrs) = try arguments(rt, session) { () throws(P11Error) -> Arguments in
            (try required(key), try mechanism(m), try input(wrapped, wrappedLength), try template(attributes, count))
        }
        out.pointee = (try rt.unwrapKey(SessionHandle(session), mech, unwrappingKey: ObjectHandle(unwrappingKey),
                                        wrapped: blob, attrs)).raw
    }
}

func deriveKey(_ session: CK_SESSION_HANDLE, _ m: MechanismPtr?, _ baseKey: CK_OBJECT_HANDLE,
               _ attributes: AttributePtr?, _ count: CK_ULONG, _ key: UnsafeMutablePointer<CK_OBJECT_HANDLE>?) -> CK_RV {
    entry { () throws(P11Error) in
        let rt = try runtime()
        let (out, mech, attrs) = try arguments(rt, session) { () throws(P11Error) -> (UnsafeMutablePointer<CK_OBJECT_HANDLE>, Mechanism, [Attribute]) in
            (try required(key), try mechanism(m), try template(attributes, count))
        }
        out.pointee = (try rt.deriveKey(SessionHandle(session), mech, baseKey: ObjectHandle(baseKey), attrs)).raw
    }
}

func seedRandom(_ session: CK_SESSION_HANDLE, _ seed: Bytes?, _ seedLength: CK_ULONG) -> CK_RV {
    entry { () throws(P11Error) in
        let rt = try runtime()
        let bytes = try arguments(rt, session) { () throws(P11Error) -> [UInt8] in try input(seed, seedLength) }
        try rt.seedRandom(SessionHandle(session), bytes)
    }
}

func generateRandom(_ session: CK_SESSION_HANDLE, _ out: Bytes?, _ count: CK_ULONG) -> CK_RV {
    entry { () throws(P11Error) in
        let rt = try runtime()
        let n = try arguments(rt, session) { () throws(P11Error) -> Int in try length(count) }
        if n == 0 { _ = try rt.sessionInfo(SessionHandle(session)); return }
        let buffer = try arguments(rt, session) { () throws(P11Error) -> Bytes in try required(out) }
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
