// Slots, tokens and mechanisms as the application sees them: one slot and one token per group.
import CInterop

public let p11haVersion = CK_VERSION(major: 0, minor: 1)

extension Runtime {
    public var slotIDs: [CK_SLOT_ID] { groups.map(\.slotID) }

    public func slotInfo(_ slot: CK_SLOT_ID) throws(P11Error) -> CK_SLOT_INFO {
        let group = try group(slot)
        var info = CK_SLOT_INFO()
        setField(&info.slotDescription, "p11ha group \(group.name)")
        setField(&info.manufacturerID, "p11ha")
        // The token stays present while members come and go: sessions and handles outlive member failures.
        info.flags = CK_FLAGS(CKF_TOKEN_PRESENT | CKF_HW_SLOT)
        info.hardwareVersion = p11haVersion
        info.firmwareVersion = p11haVersion
        return info
    }

    public func tokenInfo(_ slot: CK_SLOT_ID) throws(P11Error) -> CK_TOKEN_INFO {
        let group = try group(slot)
        var info = CK_TOKEN_INFO()
        setField(&info.label, group.label)
        setField(&info.manufacturerID, "p11ha")
        setField(&info.model, "HA group")
        setField(&info.serialNumber, stableSerial(group.name))
        setField(&info.utcTime, "")
        let memberInfos = group.members.filter(\.isInService).compactMap { try? $0.token.tokenInfo() }
        let allOf = CK_FLAGS(CKF_RNG | CKF_USER_PIN_INITIALIZED)
        let anyOf = CK_FLAGS(CKF_LOGIN_REQUIRED | CKF_WRITE_PROTECTED | CKF_USER_PIN_COUNT_LOW | CKF_USER_PIN_FINAL_TRY
            | CKF_USER_PIN_LOCKED | CKF_USER_PIN_TO_BE_CHANGED | CKF_SO_PIN_COUNT_LOW | CKF_SO_PIN_FINAL_TRY
            | CKF_SO_PIN_LOCKED | CKF_SO_PIN_TO_BE_CHANGED)
        var flags = CK_FLAGS(CKF_TOKEN_INITIALIZED) | allOf
        var maxSessions = CK_ULONG.max
        var maxRWSessions = CK_ULONG.max
        var maxPin = CK_ULONG.max
        var minPin: CK_ULONG = 0
        for member in memberInfos {
            flags &= ~allOf | member.flags
            flags |= member.flags & anyOf
            maxSessions = min(maxSessions, limit(member.ulMaxSessionCount))
            maxRWSessions = min(maxRWSessions, limit(member.ulMaxRwSessionCount))
            maxPin = min(maxPin, member.ulMaxPinLen)
            minPin = max(minPin, member.ulMinPinLen)
        }
        if memberInfos.isEmpty { flags &= ~allOf }
        info.flags = flags
        info.ulMaxSessionCount = maxSessions == CK_ULONG.max ? CK_ULONG(CK_EFFECTIVELY_INFINITE) : maxSessions
        info.ulMaxRwSessionCount = maxRWSessions == CK_ULONG.max ? CK_ULONG(CK_EFFECTIVELY_INFINITE) : maxRWSessions
        let counts = group.login.withLock { ($0.sessions, $0.readWriteSessions) }
        info.ulSessionCount = CK_ULONG(counts.0)
        info.ulRwSessionCount = CK_ULONG(counts.1)
        info.ulMaxPinLen = maxPin == CK_ULONG.max ? 255 : maxPin
        info.ulMinPinLen = minPin
        info.ulTotalPublicMemory = CK_UNAVAILABLE_INFORMATION_VALUE
        info.ulFreePublicMemory = CK_UNAVAILABLE_INFORMATION_VALUE
        info.ulTotalPrivateMemory = CK_UNAVAILABLE_INFORMATION_VALUE
        info.ulFreePrivateMemory = CK_UNAVAILABLE_INFORMATION_VALUE
        info.hardwareVersion = p11haVersion
        info.firmwareVersion = p11haVersion
        return info
    }

    public func mechanismList(_ slot: CK_SLOT_ID) throws(P11Error) -> [CK_MECHANISM_TYPE] {
        try group(slot).mechanisms.map(\.type)
    }

    public func mechanismInfo(_ slot: CK_SLOT_ID, _ type: CK_MECHANISM_TYPE) throws(P11Error) -> CK_MECHANISM_INFO {
        guard let entry = try group(slot).mechanisms.first(where: { $0.type == type }) else {
            throw P11Error(CK_RV(CKR_MECHANISM_INVALID))
        }
        return entry.info
    }
}

/// A member's session limit as a number to take the minimum of (unknown or infinite: no limit).
private func limit(_ value: CK_ULONG) -> CK_ULONG {
    value == CK_ULONG(CK_EFFECTIVELY_INFINITE) || value == CK_UNAVAILABLE_INFORMATION_VALUE ? CK_ULONG.max : value
}

/// A 16-character serial number derived from the group's name: the same on every run, different per group.
func stableSerial(_ name: String) -> String {
    var hash: UInt64 = 0xcbf2_9ce4_8422_2325
    for byte in name.utf8 {
        hash ^= UInt64(byte)
        hash = hash &* 0x0000_0100_0000_01b3
    }
    let hex = String(hash, radix: 16, uppercase: true)
    return String(repeating: "0", count: 16 - hex.count) + hex
}

/// Writes `text` blank-padded into a fixed PKCS#11 character field (a C array imported as a tuple).
public func setField<T>(_ field: inout T, _ text: String) {
    withUnsafeMutableBytes(of: &field) { raw in
        let bytes = paddedField(text, length: raw.count)
        raw.copyBytes(from: bytes)
    }
}
