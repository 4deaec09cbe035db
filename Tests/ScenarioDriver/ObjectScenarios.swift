// Scenarios for objects: created on every member, found once, attributes per the specification.
import CInterop
import Glibc

func objectsScenario(_ m: Module) {
    let s = initialized(m)
    let session = openLoggedIn(m, slot: s, pin: userPIN)
    let run = "\(getpid())"

    let data = Template().add(CKA_CLASS, ulong: CK_ULONG(CKO_DATA)).add(CKA_TOKEN, bool: true)
        .add(CKA_LABEL, string: "obj-a-\(run)").add(CKA_VALUE, string: "hello").add(CKA_PRIVATE, bool: false)
    var object: CK_OBJECT_HANDLE = 0
    ok(m.f.C_CreateObject!(session, &data.attributes, data.count, &object), "C_CreateObject data object")
    let secret = Template().add(CKA_CLASS, ulong: CK_ULONG(CKO_SECRET_KEY)).add(CKA_KEY_TYPE, ulong: CK_ULONG(CKK_AES))
        .add(CKA_TOKEN, bool: true).add(CKA_LABEL, string: "aes-\(run)").add(CKA_VALUE, [UInt8](repeating: 9, count: 32))
        .add(CKA_SENSITIVE, bool: true).add(CKA_ENCRYPT, bool: true)
    var key: CK_OBJECT_HANDLE = 0
    ok(m.f.C_CreateObject!(session, &secret.attributes, secret.count, &key), "C_CreateObject AES key")

    let byLabel = find(m, session, Template().add(CKA_LABEL, string: "obj-a-\(run)"))
    check(byLabel == [object], "C_FindObjects returns the object once, with the handle C_CreateObject gave: \(byLabel)")
    let all = find(m, session, Template())
    check(Set(all).count == all.count, "C_FindObjects returns no handle twice")
    check(all.contains(object) && all.contains(key), "a search of everything finds both objects")

    // C_GetAttributeValue: length query, short buffer, sensitive and invalid attributes (PKCS#11 2.40 5.7).
    var a = CK_ATTRIBUTE(type: CK_ATTRIBUTE_TYPE(CKA_VALUE), pValue: nil, ulValueLen: 0)
    expect(m.f.C_GetAttributeValue!(session, object, &a, 1), CKR_OK, "length query of CKA_VALUE")
    check(a.ulValueLen == 5, "the length of CKA_VALUE is 5")
    var small = [UInt8](repeating: 0, count: 2)
    small.withUnsafeMutableBytes { raw in
        a = CK_ATTRIBUTE(type: CK_ATTRIBUTE_TYPE(CKA_VALUE), pValue: raw.baseAddress, ulValueLen: 2)
        expect(m.f.C_GetAttributeValue!(session, object, &a, 1), CKR_BUFFER_TOO_SMALL, "CKA_VALUE into 2 bytes")
    }
    check(a.ulValueLen == CK_ULONG.max, "a value that does not fit has length CK_UNAVAILABLE_INFORMATION")
    check(attribute(m, session, object, CKA_VALUE) == Array("hello".utf8), "the value reads back")
    var classValue: CK_ULONG = 0
    var pair = [CK_ATTRIBUTE(type: CK_ATTRIBUTE_TYPE(CKA_VALUE), pValue: nil, ulValueLen: 0),
                CK_ATTRIBUTE(type: CK_ATTRIBUTE_TYPE(CKA_CLASS), pValue: nil, ulValueLen: CK_ULONG(MemoryLayout<CK_ULONG>.size))]
    withUnsafeMutablePointer(to: &classValue) { p in
        pair[1].pValue = UnsafeMutableRawPointer(p)
        expect(m.f.C_GetAttributeValue!(session, key, &pair, 2), CKR_ATTRIBUTE_SENSITIVE, "CKA_VALUE of a sensitive key")
    }
    check(pair[0].ulValueLen == CK_ULONG.max, "a sensitive value has length CK_UNAVAILABLE_INFORMATION")
    check(classValue == CK_ULONG(CKO_SECRET_KEY), "the other attributes of the template are still filled")
    var invalid = [CK_ATTRIBUTE(type: 0x7fff_0001, pValue: nil, ulValueLen: 0)]
    expect(m.f.C_GetAttributeValue!(session, object, &invalid, 1), CKR_ATTRIBUTE_TYPE_INVALID, "an attribute the object lacks")
    var size: CK_ULONG = 0
    expect(m.f.C_GetObjectSize!(session, object, &size), CKR_OK, "C_GetObjectSize")

    let rename = Template().add(CKA_LABEL, string: "obj-renamed-\(run)")
    expect(m.f.C_SetAttributeValue!(session, object, &rename.attributes, rename.count), CKR_OK, "C_SetAttributeValue")
    check(attribute(m, session, object, CKA_LABEL) == Array("obj-renamed-\(run)".utf8), "the new label reads back")

    var copy: CK_OBJECT_HANDLE = 0
    let copyLabel = Template().add(CKA_LABEL, string: "obj-copy-\(run)")
    expect(m.f.C_CopyObject!(session, object, &copyLabel.attributes, copyLabel.count, &copy), CKR_OK, "C_CopyObject")

    let doomed = Template().add(CKA_CLASS, ulong: CK_ULONG(CKO_DATA)).add(CKA_TOKEN, bool: true)
        .add(CKA_LABEL, string: "obj-doomed-\(run)").add(CKA_PRIVATE, bool: false)
    var gone: CK_OBJECT_HANDLE = 0
    ok(m.f.C_CreateObject!(session, &doomed.attributes, doomed.count, &gone), "C_CreateObject")
    expect(m.f.C_DestroyObject!(session, gone), CKR_OK, "C_DestroyObject")
    expect(m.f.C_DestroyObject!(session, gone), CKR_OBJECT_HANDLE_INVALID, "C_DestroyObject twice")
    check(find(m, session, Template().add(CKA_LABEL, string: "obj-doomed-\(run)")).isEmpty, "a destroyed object is not found")

    // A session object lives as long as its session.
    var other: CK_SESSION_HANDLE = 0
    ok(m.f.C_OpenSession!(s, CK_FLAGS(CKF_SERIAL_SESSION | CKF_RW_SESSION), nil, nil, &other), "C_OpenSession")
    let ephemeral = Template().add(CKA_CLASS, ulong: CK_ULONG(CKO_DATA)).add(CKA_TOKEN, bool: false)
        .add(CKA_LABEL, string: "session-obj-\(run)")
    var sessionObject: CK_OBJECT_HANDLE = 0
    ok(m.f.C_CreateObject!(other, &ephemeral.attributes, ephemeral.count, &sessionObject), "C_CreateObject session object")
    check(find(m, session, Template().add(CKA_LABEL, string: "session-obj-\(run)")) == [sessionObject],
          "a session object is visible to the application's other sessions, once")
    ok(m.f.C_CloseSession!(other), "C_CloseSession")
    check(find(m, session, Template().add(CKA_LABEL, string: "session-obj-\(run)")).isEmpty,
          "a session object is gone with its session")
    expect(m.f.C_GetObjectSize!(session, sessionObject, &size), CKR_OBJECT_HANDLE_INVALID, "its handle is invalid")

    // A generated key pair (replicated to every member).
    var mech = mechanism(CKM_EC_KEY_PAIR_GEN)
    let pub = Template().add(CKA_EC_PARAMS, p256).add(CKA_TOKEN, bool: true).add(CKA_LABEL, string: "gen-\(run)").add(CKA_VERIFY, bool: true)
    let priv = Template().add(CKA_TOKEN, bool: true).add(CKA_LABEL, string: "gen-\(run)").add(CKA_SIGN, bool: true).add(CKA_PRIVATE, bool: true)
    var pubKey: CK_OBJECT_HANDLE = 0
    var privKey: CK_OBJECT_HANDLE = 0
    ok(m.f.C_GenerateKeyPair!(session, &mech, &pub.attributes, pub.count, &priv.attributes, priv.count, &pubKey, &privKey), "C_GenerateKeyPair")
    check(Set(find(m, session, Template().add(CKA_LABEL, string: "gen-\(run)"))) == [pubKey, privKey], "the generated pair is found once")
    ok(m.f.C_Finalize!(nil), "C_Finalize")

    // Each member, opened directly, holds what the group wrote.
    guard let softhsmPath = env("SOFTHSM_MODULE"), let members = env("P11HA_TEST_MEMBERS")?.split(separator: ",") else {
        fatal("SOFTHSM_MODULE and P11HA_TEST_MEMBERS are needed")
    }
    let direct = Module(path: softhsmPath)
    ok(direct.f.C_Initialize!(nil), "C_Initialize SoftHSM directly")
    var generatedCopies = 0
    for label in members.map(String.init) {
        guard let memberSlot = slot(labelled: label, in: direct) else { fatal("no member token \(label)") }
        let ms = openLoggedIn(direct, slot: memberSlot, pin: userPIN)
        let renamed = find(direct, ms, Template().add(CKA_LABEL, string: "obj-renamed-\(run)"))
        check(renamed.count == 1, "\(label) holds the renamed object once")
        if let first = renamed.first { check(attribute(direct, ms, first, CKA_VALUE) == Array("hello".utf8), "\(label) holds its value") }
        check(find(direct, ms, Template().add(CKA_LABEL, string: "obj-a-\(run)")).isEmpty, "\(label) has no object under the old label")
        check(find(direct, ms, Template().add(CKA_LABEL, string: "aes-\(run)")).count == 1, "\(label) holds the AES key")
        check(find(direct, ms, Template().add(CKA_LABEL, string: "obj-copy-\(run)")).count == 1, "\(label) holds the copy")
        check(find(direct, ms, Template().add(CKA_LABEL, string: "obj-doomed-\(run)")).isEmpty, "\(label) no longer holds the destroyed object")
        check(find(direct, ms, Template().add(CKA_LABEL, string: "session-obj-\(run)")).isEmpty, "\(label) holds no session object")
        generatedCopies += find(direct, ms, Template().add(CKA_LABEL, string: "gen-\(run)")).count
    }
    check(generatedCopies == 2 * members.count, "the generated pair exists on every member: \(generatedCopies) objects")
    ok(direct.f.C_Finalize!(nil), "C_Finalize SoftHSM")
}
