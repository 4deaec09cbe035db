// A PIN held in memory only as long as needed, in storage of its own that is zeroed when released.
import Glibc

public final class Secret: @unchecked Sendable {
    // Not an Array: copy-on-write could leave an unzeroed copy behind.
    private let storage: UnsafeMutableRawBufferPointer

    public init(copying bytes: UnsafeRawBufferPointer) {
        storage = .allocate(byteCount: max(bytes.count, 1), alignment: 1)
        if bytes.count > 0 { storage.baseAddress!.copyMemory(from: bytes.baseAddress!, byteCount: bytes.count) }
        count = bytes.count
    }

    public init(_ text: String) {
        // Copied byte by byte: withUTF8's pointer must not outlive its closure (a small string's bytes live in a
        // temporary there).
        let utf8 = text.utf8
        storage = .allocate(byteCount: max(utf8.count, 1), alignment: 1)
        for (i, byte) in utf8.enumerated() { storage[i] = byte }
        count = utf8.count
    }

    public let count: Int

    /// Reads a pin-source: `file:PATH` or a plain path, as p11-kit does; a trailing newline is not part of the PIN.
    public static func fromPinSource(_ source: String) -> Secret? {
        let path = source.hasPrefix("file:") ? String(source.dropFirst(5)) : source
        guard var data = readFileBytes(path) else { return nil }
        defer { data.withUnsafeMutableBytes { if let b = $0.baseAddress { explicit_bzero(b, $0.count) } } }
        var end = data.count
        while end > 0, data[end - 1] == 0x0A || data[end - 1] == 0x0D { end -= 1 }
        return data.withUnsafeBytes { Secret(copying: UnsafeRawBufferPointer(rebasing: $0[0..<end])) }
    }

    public func withBytes<R, E: Error>(_ body: (UnsafeRawBufferPointer) throws(E) -> R) throws(E) -> R {
        try body(UnsafeRawBufferPointer(rebasing: UnsafeRawBufferPointer(storage)[0..<count]))
    }

    public func copy() -> Secret { withBytes { Secret(copying: $0) } }

    deinit {
        explicit_bzero(storage.baseAddress!, storage.count)
        storage.deallocate()
    }
}
