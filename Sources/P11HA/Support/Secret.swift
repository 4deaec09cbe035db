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

    /// A PIN file holds a PIN and perhaps a newline: a larger file is not a PIN file.
    public static let pinFileLimit = 4096

    /// The file a pin-source names: `file:PATH` or a plain path, as p11-kit takes it.
    public static func pinSourcePath(_ source: String) -> String {
        source.hasPrefix("file:") ? String(source.dropFirst(5)) : source
    }

    /// Reads a pin-source: a regular file of at most `limit` bytes, read without blocking (a FIFO or a device is
    /// refused, never read); a trailing newline is not part of the PIN. The one buffer that held the file is
    /// zeroed before it is freed. The error says why, never what the file holds.
    public static func reading(pinSource source: String, limit: Int = pinFileLimit) throws(FileReadError) -> Secret {
        let secret = try withRegularFileContents(pinSourcePath(source), limit: limit) { bytes -> Secret? in
            var end = bytes.count
            while end > 0, bytes[end - 1] == 0x0A || bytes[end - 1] == 0x0D { end -= 1 }
            return end == 0 ? nil : Secret(copying: UnsafeRawBufferPointer(rebasing: bytes[0..<end]))
        }
        guard let secret else { throw FileReadError(description: "holds no PIN (it is empty, or only a line end)") }
        return secret
    }

    /// `reading(pinSource:)` for callers that report the failure themselves.
    public static func fromPinSource(_ source: String) -> Secret? {
        try? reading(pinSource: source)
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
