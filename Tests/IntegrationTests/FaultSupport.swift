// Test support for fault injection: builds Tests/FaultModule/faulty.c and routes a group's members through it.
import Foundation

/// Lines for [p11ha] that make failed members return quickly.
let fastRecovery = ["recovery-interval = 100ms", "operation-timeout = 2s"]

/// Runs one p11ha-scenario scenario against members routed through the fault module.
func faultScenario(_ name: String, _ members: Members) throws -> ProcessResult {
    try scenario(name, members, base: members.faultEnvironment, timeout: 180)
}

/// Three members through the fault module with `global` lines in [p11ha], and a run of scenario `name` against
/// them: the members, for their log, and the run.
func runThroughFaults(_ name: String, global: [String]) throws -> (Members, ProcessResult) {
    let members = try Members()
    _ = try members.throughFaultModule(extraGlobal: global)
    return (members, try faultScenario(name, members))
}

/// Builds faulty.so once per test process (into a temp dir, cached; thread-safe), returns its path.
func faultyModule() throws -> String {
    try FaultyBuild.shared.path()
}

extension Members {
    /// Rewrites p11ha.conf so every member goes through faulty.so; returns the control directory (created, empty).
    /// `extraGlobal` lines (such as "operation-timeout = 500ms") go into [p11ha], replacing lines with the same key.
    func throughFaultModule(extraGlobal: [String] = []) throws -> String {
        let module = try faultyModule()
        let control = faultControl
        let files = FileManager.default
        if files.fileExists(atPath: control) {
            try files.removeItem(atPath: control)
        }
        try files.createDirectory(atPath: control, withIntermediateDirectories: true)
        let text = try String(contentsOfFile: p11haConf, encoding: .utf8)
        try rewriteConfig(routeConfig(text, through: module, log: logPath, extraGlobal: extraGlobal))
        return control
    }

    /// The environment for processes: members.environment + FAULTY_CONTROL (+ FAULTY_TARGET).
    var faultEnvironment: [String: String] {
        var environment = self.environment
        environment["FAULTY_CONTROL"] = faultControl
        environment["FAULTY_TARGET"] = Paths.softhsmModule
        return environment
    }

    /// Fixed, so that `faultEnvironment` needs no state beyond the directory.
    private var faultControl: String { dir + "/faults" }
}

/// Writes a fault command for one member token (atomic: write temp file then rename).
/// The command is checked first: a typo would otherwise mean "ok" and a test that passes for the wrong reason.
func inject(_ command: String, into control: String, member: String) throws {
    try checkFaultCommand(command)
    guard !member.isEmpty, !member.contains("/"), !member.hasPrefix(".") else {
        throw SupportError("'\(member)' cannot name a token's control file")
    }
    let line = command.hasSuffix("\n") ? command : command + "\n"
    let temporary = control + "/.\(member).\(getpid()).\(UUID().uuidString).tmp"
    guard FileManager.default.createFile(atPath: temporary, contents: Data(line.utf8)) else {
        throw SupportError("cannot write \(temporary)")
    }
    guard rename(temporary, control + "/" + member) == 0 else {
        let error = errno
        try? FileManager.default.removeItem(atPath: temporary)
        throw SupportError("cannot rename \(temporary) into place: errno \(error)")
    }
}

/// One line of a FAULTY_LOG file: a call that concerned `label`'s token, and what it returned.
struct FaultLogEntry: Equatable {
    let label: String
    let function: String
    let rv: UInt

    /// Every entry of the log at `path` so far; none when the file does not exist yet.
    static func read(from path: String) throws -> [FaultLogEntry] {
        guard FileManager.default.fileExists(atPath: path) else { return [] }
        return try String(contentsOfFile: path, encoding: .utf8)
            .split(separator: "\n")
            .compactMap { line in
                let words = line.split(separator: " ")
                guard words.count == 3, words[2].hasPrefix("0x"), let rv = UInt(words[2].dropFirst(2), radix: 16)
                else { return nil }
                return FaultLogEntry(label: String(words[0]), function: String(words[1]), rv: rv)
            }
    }
}

// MARK: - Building faulty.so

private final class FaultyBuild: @unchecked Sendable {
    static let shared = FaultyBuild()

    private let lock = NSLock()
    /// Guarded by `lock`; a failed build is kept too, so that every test reports it without recompiling.
    private var built: Result<String, any Error>?
    private var directory: String?

    func path() throws -> String {
        try lock.withLock {
            if built == nil {
                built = Result(catching: build)
            }
            return try built!.get()
        }
    }

    /// Called with `lock` held.
    private func build() throws -> String {
        let directory = try makeTemporaryDirectory("p11ha-faulty")
        self.directory = directory
        atexit { FaultyBuild.shared.removeDirectory() }
        return try compileC(Paths.packageRoot + "/Tests/FaultModule/faulty.c", to: directory + "/faulty.so",
                            sharedObject: true).path
    }

    /// At exit; skipped if a build is still running on another thread.
    fileprivate func removeDirectory() {
        guard lock.try() else { return }
        defer { lock.unlock() }
        if let directory {
            try? FileManager.default.removeItem(atPath: directory)
        }
    }
}

// MARK: - p11ha.conf and the command language

/// `text` with every in-process member (`member =` and `standby =`) loading `module`, and [p11ha] holding
/// `log = LOG` (unless it names a log already) and the `extraGlobal` lines. Remote members (`... via ADDRESS`)
/// are left alone: faulty.so cannot stand in for p11-kit's client.
private func routeConfig(_ text: String, through module: String, log: String, extraGlobal: [String]) -> String {
    func key(_ line: String) -> String? {
        guard let equals = line.firstIndex(of: "="), !line.trimmingCharacters(in: .whitespaces).hasPrefix("#")
        else { return nil }
        return line[..<equals].trimmingCharacters(in: .whitespaces)
    }

    var preamble: [String] = []
    var global: [String] = []
    var rest: [String] = []
    var section: String?
    for line in text.split(separator: "\n", omittingEmptySubsequences: false).map(String.init) {
        let trimmed = line.trimmingCharacters(in: .whitespaces)
        if trimmed.hasPrefix("[") {
            section = trimmed
            if trimmed == "[p11ha]" { continue }
        }
        switch section {
        case nil: preamble.append(line)
        case "[p11ha]": global.append(line)
        default: rest.append(routeMember(line, through: module))
        }
    }

    let replaced = Set(extraGlobal.compactMap(key))
    global.removeAll { line in key(line).map(replaced.contains) ?? false }
    while global.last?.trimmingCharacters(in: .whitespaces).isEmpty == true { global.removeLast() }
    if !global.contains(where: { key($0) == "log" }) {
        global.insert("log = \(log)", at: 0)
    }
    global += extraGlobal

    while preamble.last?.trimmingCharacters(in: .whitespaces).isEmpty == true { preamble.removeLast() }
    var lines = preamble + ["[p11ha]"] + global + [""] + rest
    while lines.last?.isEmpty == true { lines.removeLast() }
    return lines.joined(separator: "\n") + "\n"
}

private func routeMember(_ line: String, through module: String) -> String {
    guard let equals = line.firstIndex(of: "=") else { return line }
    let key = line[..<equals].trimmingCharacters(in: .whitespaces)
    guard key == "member" || key == "standby" else { return line }
    let uri = line[line.index(after: equals)...].trimmingCharacters(in: .whitespaces)
    guard uri.hasPrefix("pkcs11:"), !uri.contains(" via ") else { return line }

    // Keep the path and every query attribute except the module's; then name faulty.so.
    let parts = uri.split(separator: "?", maxSplits: 1).map(String.init)
    var query = parts.count > 1 ? parts[1].split(separator: "&").map(String.init) : []
    query.removeAll { $0.hasPrefix("module-path=") || $0.hasPrefix("module-name=") }
    query.append("module-path=" + module)
    return "\(key) = \(parts[0])?\(query.joined(separator: "&"))"
}

/// Checks a command against faulty.c's language: ok | fail CODE [F...] | fail-after N CODE [F...] | wedge CODE [F...] |
/// hang [F...].
private func checkFaultCommand(_ command: String) throws {
    let lines = command.split(separator: "\n")
    guard lines.count <= 1 else { throw SupportError("a fault command is one line: '\(command)'") }
    let words = command.split(whereSeparator: \.isWhitespace).map(String.init)
    guard let verb = words.first else { return }

    func isNumber(_ word: String) -> Bool {
        word.hasPrefix("0x") || word.hasPrefix("0X")
            ? !word.dropFirst(2).isEmpty && UInt(word.dropFirst(2), radix: 16) != nil
            : UInt(word) != nil
    }
    func isCode(_ word: String) -> Bool { isNumber(word) || faultCodeNames.contains(word) }

    let functions: ArraySlice<String>
    switch verb {
    case "ok" where words.count == 1:
        return
    case "fail" where words.count >= 2 && isCode(words[1]), "wedge" where words.count >= 2 && isCode(words[1]):
        functions = words.dropFirst(2)
    case "fail-after" where words.count >= 3 && isNumber(words[1]) && isCode(words[2]):
        functions = words.dropFirst(3)
    case "hang":
        functions = words.dropFirst(1)
    default:
        throw SupportError(
            "'\(command)' is not a fault command (ok | fail CODE [C_Function ...] | fail-after N CODE [C_Function ...] | wedge CODE [C_Function ...] | hang [C_Function ...])")
    }
    if let unknown = functions.first(where: { !pkcs11FunctionNames.contains($0) }) {
        throw SupportError("'\(unknown)' in '\(command)' is not a PKCS#11 2.40 function name")
    }
}

/// The CKR_ names faulty.c accepts as a CODE besides numbers.
private let faultCodeNames: Set<String> = [
    "CKR_GENERAL_ERROR", "CKR_FUNCTION_FAILED", "CKR_DEVICE_ERROR", "CKR_DEVICE_MEMORY", "CKR_DEVICE_REMOVED",
    "CKR_TOKEN_NOT_PRESENT", "CKR_SESSION_CLOSED", "CKR_SESSION_HANDLE_INVALID", "CKR_CRYPTOKI_NOT_INITIALIZED",
    "CKR_HOST_MEMORY",
]

/// The functions of the PKCS#11 2.40 function list, as faulty.c names them.
private let pkcs11FunctionNames: Set<String> = [
    "C_Initialize", "C_Finalize", "C_GetInfo", "C_GetFunctionList", "C_GetSlotList", "C_GetSlotInfo",
    "C_GetTokenInfo", "C_GetMechanismList", "C_GetMechanismInfo", "C_InitToken", "C_InitPIN", "C_SetPIN",
    "C_OpenSession", "C_CloseSession", "C_CloseAllSessions", "C_GetSessionInfo", "C_GetOperationState",
    "C_SetOperationState", "C_Login", "C_Logout", "C_CreateObject", "C_CopyObject", "C_DestroyObject",
    "C_GetObjectSize", "C_GetAttributeValue", "C_SetAttributeValue", "C_FindObjectsInit", "C_FindObjects",
    "C_FindObjectsFinal", "C_EncryptInit", "C_Encrypt", "C_EncryptUpdate", "C_EncryptFinal", "C_DecryptInit",
    "C_Decrypt", "C_DecryptUpdate", "C_DecryptFinal", "C_DigestInit", "C_Digest", "C_DigestUpdate",
    "C_DigestKey", "C_DigestFinal", "C_SignInit", "C_Sign", "C_SignUpdate", "C_SignFinal",
    "C_SignRecoverInit", "C_SignRecover", "C_VerifyInit", "C_Verify", "C_VerifyUpdate", "C_VerifyFinal",
    "C_VerifyRecoverInit", "C_VerifyRecover", "C_DigestEncryptUpdate", "C_DecryptDigestUpdate",
    "C_SignEncryptUpdate", "C_DecryptVerifyUpdate", "C_GenerateKey", "C_GenerateKeyPair", "C_WrapKey",
    "C_UnwrapKey", "C_DeriveKey", "C_SeedRandom", "C_GenerateRandom", "C_GetFunctionStatus",
    "C_CancelFunction", "C_WaitForSlotEvent",
]
