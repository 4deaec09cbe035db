// The installed module (make install into a private root): what it needs at run time, p11-kit's registry, URIs.
import Foundation
import Testing

@Suite("make install gives a module that loads and is found like any PKCS#11 module")
struct InstallTests {
    @Test("the installed module needs nothing outside Debian's base libraries")
    func installedModuleStandsAlone() throws {
        let root = try InstallRoot()
        let module = root.path(root.moduleFile)

        let dynamic = try dynamicSection(of: module)
        let swiftLibraries = dynamic.filter { $0.contains("(NEEDED)") && $0.lowercased().contains("swift") }
        #expect(swiftLibraries.isEmpty, "the installed module still needs the Swift runtime:\n\(dynamic.joined(separator: "\n"))")
        // $ORIGIN (the module's own directory) is harmless; a path would send the loader outside the system's places.
        let searchPaths = dynamic.filter { !$0.contains("(NEEDED)") && !$0.contains("[$ORIGIN]") }
        #expect(searchPaths.isEmpty, "the installed module carries library search paths:\n\(searchPaths.joined(separator: "\n"))")

        // ldd follows libp11-kit's own dependencies too (libffi): those come with p11-kit, not with p11ha.
        let p11kit = try loadedLibraries(of: module).first { $0.name.hasPrefix("libp11-kit.so") }
        let p11kitOwn = try Set(loadedLibraries(of: try #require(p11kit?.path, "libp11-kit is not loaded")).map(\.name))
        let base = ["linux-vdso.so", "libc.so", "libm.so", "libstdc++.so", "libgcc_s.so", "ld-linux", "libp11-kit.so",
                    "libdl.so", "libpthread.so"]
        let libraries = try loadedLibraries(of: module)
        let foreign = libraries.filter { library in
            !base.contains { library.name.hasPrefix($0) } && !p11kitOwn.contains(library.name)
        }
        #expect(foreign.isEmpty, "libraries outside Debian's base: \(foreign.map(\.line))")
        let unresolved = libraries.filter { $0.path == nil && !$0.name.hasPrefix("linux-vdso") }
        #expect(unresolved.isEmpty, "unresolved: \(unresolved.map(\.line))")

        // Loaded with the toolchain out of sight: no LD_LIBRARY_PATH, no /opt/swift in PATH, and the loader's
        // trace (LD_DEBUG=libs) shows every library it searched for and where it found it.
        let members = try Members(group: "ha-installed")
        var environment = members.environment
        environment["LD_LIBRARY_PATH"] = nil
        environment["PATH"] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        environment["LD_DEBUG"] = "libs"
        let listed = try runProcess("pkcs11-tool", ["--module", module, "-L"], environment: environment)

        try #require(listed.status == 0, "pkcs11-tool -L on the installed module failed:\n\(listed.output)")
        #expect(fieldValues("token label", in: listed.stdout) == [members.group], "\(listed.stdout)")
        let toolchainLookups = listed.stderr.split(separator: "\n").filter { $0.contains("swift") }
        #expect(toolchainLookups.isEmpty, "the loader looked into the toolchain:\n\(toolchainLookups.joined(separator: "\n"))")
    }

    @Test("p11-kit lists the installed module and p11tool finds the group's token without --provider")
    func registeredWithP11Kit() throws {
        let root = try InstallRoot()
        let members = try Members(group: "ha-registry")
        let generated = try PKCS11Tool(module: root.path(root.moduleFile), token: members.group, members: members)(
            ["--keypairgen", "--key-type", "EC:prime256v1", "--id", "01", "--label", "registry-key"], login: true)
        try #require(generated.status == 0, "generating a key pair failed:\n\(generated.output)")

        // The installed p11ha.module as it is, but for the module's place under DESTDIR.
        let installed = try String(contentsOfFile: root.path(root.registrationFile), encoding: .utf8)
        let moduleLines = installed.split(separator: "\n").filter { $0.hasPrefix("module:") }
        try #require(moduleLines == ["module: \(root.moduleFile)"], "p11ha.module:\n\(installed)")
        #expect(installed.split(separator: "\n").contains("critical: no"), "p11ha.module:\n\(installed)")
        // A private registry: p11-kit merges ~/.config/pkcs11/modules/*.module into its system registry
        // (pkcs11.conf(5)), except for root, whose user configuration it ignores: root runs the clients as nobody.
        let home = root.path("/home")
        let userModules = home + "/.config/pkcs11/modules"
        try FileManager.default.createDirectory(atPath: userModules, withIntermediateDirectories: true)
        try installed.replacingOccurrences(of: "module: \(root.moduleFile)", with: "module: \(root.path(root.moduleFile))")
            .write(toFile: userModules + "/p11ha.module", atomically: true, encoding: .utf8)
        let client = try Unprivileged(owning: [root.dir, members.dir])
        var environment = members.environment
        environment["HOME"] = home
        environment["GNUTLS_PIN"] = members.userPIN

        let modules = try client.run("p11-kit", ["list-modules"], environment: environment)
        try #require(modules.status == 0, "p11-kit list-modules failed:\n\(modules.output)")
        let p11ha = moduleBlock("p11ha", in: modules.stdout)
        #expect(p11ha.first == "p11ha: \(root.path(root.moduleFile))", "p11ha is not registered:\n\(modules.stdout)")
        #expect(p11ha.contains { $0.trimmingCharacters(in: .whitespaces) == "token: \(members.group)" },
                "p11ha's block shows no token \(members.group):\n\(modules.stdout)")

        let tokens = try client.run("p11tool", ["--list-tokens"], environment: environment)
        try #require(tokens.status == 0, "p11tool --list-tokens failed:\n\(tokens.output)")
        #expect(fieldValues("Label", in: tokens.stdout).contains(members.group), "\(tokens.stdout)")

        let objects = try client.run(
            "p11tool", ["--login", "--list-all", "pkcs11:token=\(members.group)"], environment: environment)
        try #require(objects.status == 0, "p11tool --list-all failed:\n\(objects.output)")
        #expect(fieldValues("Label", in: objects.stdout) == ["registry-key", "registry-key"], "\(objects.stdout)")
        #expect(objects.stdout.contains("Type: Private key (EC"), "\(objects.stdout)")
    }

    @Test("a key in a group is selected by a PKCS#11 URI pkcs11:token=LABEL;object=NAME")
    func keySelectedByURI() throws {
        let root = try InstallRoot()
        let module = root.path(root.moduleFile)
        let members = try Members(group: "ha-uri")
        let tool = try PKCS11Tool(module: module, token: members.group, members: members)
        for (id, label) in [("01", "uri-first"), ("02", "uri-second")] {
            let generated = try tool(
                ["--keypairgen", "--key-type", "EC:prime256v1", "--id", id, "--label", label], login: true)
            try #require(generated.status == 0, "generating \(label) failed:\n\(generated.output)")
        }
        let dir = members.dir
        let config = dir + "/openssl.cnf"
        try writeOpenSSLConfig(module: module, to: config)
        let pinFile = dir + "/user.pin"
        try writeSecret(members.userPIN, to: pinFile)
        let digest = dir + "/digest"
        try Data((0..<32).map { _ in UInt8.random(in: 0...255) }).write(to: URL(fileURLWithPath: digest))

        // The PIN rides in the URI's query (RFC 7512); the path names the token and the key, nothing else.
        var environment = members.environment
        environment["OPENSSL_CONF"] = config
        let uri = "pkcs11:token=\(members.group);object=uri-second?pin-source=file:\(pinFile)"
        let signature = dir + "/signature"
        let signed = try runProcess(
            "openssl", ["pkeyutl", "-engine", "pkcs11", "-keyform", "engine", "-inkey", uri, "-sign",
                        "-in", digest, "-out", signature],
            environment: environment)
        try #require(signed.status == 0, "openssl pkeyutl -sign with \(uri) failed:\n\(signed.output)")

        // The signature is the second key's (found by CKA_ID, not by the URI), and not the first key's.
        for (id, label, verifies) in [("02", "uri-second", true), ("01", "uri-first", false)] {
            let der = dir + "/\(label).der"
            let pem = dir + "/\(label).pem"
            let read = try tool(["--read-object", "--type", "pubkey", "--id", id, "-o", der])
            try #require(read.status == 0, "reading the public key of \(label) failed:\n\(read.output)")
            let converted = try runProcess("openssl", ["pkey", "-pubin", "-inform", "DER", "-in", der, "-out", pem])
            try #require(converted.status == 0, "\(label): not a DER public key:\n\(converted.output)")
            let verified = try runProcess(
                "openssl", ["pkeyutl", "-verify", "-pubin", "-inkey", pem, "-in", digest, "-sigfile", signature])
            #expect((verified.status == 0) == verifies,
                    "\(label): verification \(verifies ? "failed" : "succeeded"):\n\(verified.output)")
        }
    }
}

/// A private installation root: `make install DESTDIR=<temporary directory> PREFIX=/usr`. Removed with the value.
final class InstallRoot {
    let dir: String
    /// The installed paths as the installation names them, without DESTDIR.
    let moduleFile = "/usr/lib/p11ha/libp11ha.so"
    let registrationFile = "/usr/share/p11-kit/modules/p11ha.module"

    init() throws {
        try StaticBuild.done.get()
        dir = try makeTemporaryDirectory("p11ha-install")
        let installed = try runProcess(
            "make", ["-C", Paths.packageRoot, "install", "DESTDIR=\(dir)", "PREFIX=/usr",
                     "P11KIT_MODULES=/usr/share/p11-kit/modules"])
        guard installed.status == 0 else {
            try? FileManager.default.removeItem(atPath: dir)
            throw SupportError("make install failed (status \(installed.status)):\n\(installed.output)")
        }
    }

    deinit {
        try? FileManager.default.removeItem(atPath: dir)
    }

    /// An installed path under this root.
    func path(_ installed: String) -> String { dir + installed }
}

/// `make static` once per test run, before any test installs: parallel tests would otherwise queue on SwiftPM's
/// lock of .build-install. Builds only when a source changed since the last run (then it takes minutes).
private enum StaticBuild {
    static let done: Result<Void, SupportError> = {
        do {
            let built = try runProcess("make", ["-C", Paths.packageRoot, "static"], timeout: 1800)
            return built.status == 0
                ? .success(()) : .failure(SupportError("make static failed (status \(built.status)):\n\(built.output)"))
        } catch {
            return .failure(SupportError("make static: \(error)"))
        }
    }()
}

/// Runs clients as an unprivileged user when the tests run as root (p11-kit reads no user configuration for
/// root); the directories it needs are handed over to that user first.
private struct Unprivileged {
    static let uid = "65534"
    let asRoot: Bool

    init(owning directories: [String]) throws {
        asRoot = geteuid() == 0
        guard asRoot else { return }
        for directory in directories {
            let changed = try runProcess("chown", ["-R", "\(Self.uid):\(Self.uid)", directory])
            try #require(changed.status == 0, "chown \(directory) failed:\n\(changed.output)")
        }
    }

    func run(_ program: String, _ arguments: [String], environment: [String: String]) throws -> ProcessResult {
        guard asRoot else { return try runProcess(program, arguments, environment: environment) }
        return try runProcess(
            "setpriv", ["--reuid=\(Self.uid)", "--regid=\(Self.uid)", "--clear-groups", program] + arguments,
            environment: environment)
    }
}

/// NEEDED, RPATH and RUNPATH entries of an ELF file's dynamic section, as readelf -d shows them.
private func dynamicSection(of file: String) throws -> [String] {
    let result = try runProcess("readelf", ["-d", file])
    try #require(result.status == 0, "readelf -d \(file) failed:\n\(result.output)")
    let entries = result.stdout.split(separator: "\n").filter {
        $0.contains("(NEEDED)") || $0.contains("(RPATH)") || $0.contains("(RUNPATH)")
    }
    return entries.map(String.init)
}

private struct LoadedLibrary {
    let name: String
    let path: String?
    let line: String
}

/// What ldd says `file` loads: "name => path (address)", "name (address)" or "path (address)".
private func loadedLibraries(of file: String) throws -> [LoadedLibrary] {
    let result = try runProcess("ldd", [file])
    try #require(result.status == 0, "ldd \(file) failed:\n\(result.output)")
    return result.stdout.split(separator: "\n").map { raw in
        let line = raw.trimmingCharacters(in: .whitespaces)
        let words = line.split(separator: " ").map(String.init)
        if words.count >= 3, words[1] == "=>" {
            let path = words[2].hasPrefix("/") ? words[2] : nil
            return LoadedLibrary(name: words[0], path: path, line: line)
        }
        let first = words.first ?? ""
        return LoadedLibrary(name: (first as NSString).lastPathComponent, path: first.hasPrefix("/") ? first : nil,
                             line: line)
    }
}

/// The lines of one module's block in `p11-kit list-modules` output: its "name: path" line and the indented ones after it.
private func moduleBlock(_ name: String, in text: String) -> [String] {
    var block: [String] = []
    for line in text.split(separator: "\n").map(String.init) {
        if !line.hasPrefix(" ") && !line.hasPrefix("\t") {
            if !block.isEmpty { break }
            if line.hasPrefix("\(name): ") { block.append(line) }
        } else if !block.isEmpty {
            block.append(line)
        }
    }
    return block
}
