// Deterministic stand-ins for randomness and cryptography: a seeded generator and a keyed hash, nothing secret.
import P11HA

/// SplitMix64: one 64-bit state, so a run replays exactly from its seed. Public for the tests' seeded runs.
public struct SplitMix64: Sendable {
    private var state: UInt64

    public init(seed: UInt64) { state = seed }

    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        return mix64(state)
    }

    mutating func bytes(_ count: Int) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(count + 8)
        while out.count < count { withUnsafeBytes(of: next().littleEndian) { out.append(contentsOf: $0) } }
        return Array(out.prefix(count))
    }

    /// True with probability `p`, drawn from this generator (so the draw is part of the replayed sequence).
    mutating func chance(_ p: Double) -> Bool {
        if p >= 1 { return true }
        if p <= 0 { return false }
        return Double(next() >> 11) / Double(UInt64(1) << 53) < p
    }

    /// Folds bytes into the state (C_SeedRandom): still deterministic, but a different sequence.
    mutating func absorb(_ bytes: [UInt8]) {
        state ^= fakeHashWord([bytes])
    }
}

/// SplitMix64's finalizer: a bijective avalanche of one word.
func mix64(_ x: UInt64) -> UInt64 {
    var z = x
    z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
    z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
    return z ^ (z >> 31)
}

/// Two 64-bit lanes over length-prefixed parts, so ("ab", "c") and ("a", "bc") differ.
/// Written as plain loops over buffers: a simulation hashes every wrapped key, and in a debug build a closure call
/// and an iterator per byte made this a tenth of a run's time.
private func absorbParts(_ parts: [[UInt8]]) -> (UInt64, UInt64) {
    var a: UInt64 = 0xCBF2_9CE4_8422_2325
    var b: UInt64 = 0x6A09_E667_F3BC_C908
    for part in parts {
        // The length first, as its eight little-endian bytes.
        let length = UInt64(part.count)
        var shift: UInt64 = 0
        while shift < 64 {
            a = (a ^ ((length >> shift) & 0xFF)) &* 0x0000_0100_0000_01B3
            b = (b ^ a) &* 0x9E37_79B9_7F4A_7C15
            b = (b << 29) | (b >> 35)
            shift += 8
        }
        part.withUnsafeBufferPointer { bytes in
            var index = 0
            while index < bytes.count {
                a = (a ^ UInt64(bytes[index])) &* 0x0000_0100_0000_01B3
                b = (b ^ a) &* 0x9E37_79B9_7F4A_7C15
                b = (b << 29) | (b >> 35)
                index += 1
            }
        }
    }
    return (a, b)
}

private func fakeHashWord(_ parts: [[UInt8]]) -> UInt64 {
    let (a, b) = absorbParts(parts)
    return mix64(a ^ mix64(b))
}

/// The fake's one "cryptographic" primitive: `length` bytes that depend on every byte of every part.
/// Not secure in any sense; only deterministic and different for different inputs.
func fakeHash(_ parts: [[UInt8]], length: Int) -> [UInt8] {
    let (a, b) = absorbParts(parts)
    var out: [UInt8] = []
    out.reserveCapacity(length + 8)
    var block: UInt64 = 0
    while out.count < length {
        let word = mix64(a ^ mix64(b &+ block &* 0x9E37_79B9_7F4A_7C15))
        withUnsafeBytes(of: word.littleEndian) { out.append(contentsOf: $0) }
        block += 1
    }
    return Array(out.prefix(length))
}

/// Domain-separated hash: `label` keeps a signature from ever equalling a digest or a keystream block.
func fakeHash(_ label: String, _ parts: [UInt8]..., length: Int) -> [UInt8] {
    fakeHash([Array(label.utf8)] + parts, length: length)
}

/// XORs `data` with a keystream of (key, nonce), starting `offset` bytes into the stream: position-wise, so
/// multi-part processing gives the same bytes as single-part.
func keystreamXOR(_ data: [UInt8], key: [UInt8], nonce: [UInt8], offset: Int) -> [UInt8] {
    var out = data
    var blockIndex = -1
    var block: [UInt8] = []
    for i in 0..<data.count {
        let position = offset + i
        if position / 32 != blockIndex {
            blockIndex = position / 32
            block = fakeHash("keystream", key, nonce, u64Bytes(UInt64(blockIndex)), length: 32)
        }
        out[i] ^= block[position % 32]
    }
    return out
}

func u64Bytes(_ value: UInt64) -> [UInt8] { withUnsafeBytes(of: value.littleEndian) { Array($0) } }

func u32Bytes(_ value: Int) -> [UInt8] { bigEndianBytes(UInt32(truncatingIfNeeded: value)) }

func readU32(_ bytes: ArraySlice<UInt8>) -> Int {
    bigEndianValue(bytes.prefix(4))
}
