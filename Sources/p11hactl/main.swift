// p11hactl: the operator's tool. Reads the same configuration as the module (P11HA_CONF, or --config).
import ArgumentParser
import CInterop
import Foundation
import P11HA

@main
struct P11HACtl: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "p11hactl",
        abstract: "Operate p11ha high-availability groups of PKCS#11 tokens.",
        subcommands: [Check.self])
}

struct ConfigOption: ParsableArguments {
    @Option(name: .long, help: "The configuration file (default: $P11HA_CONF, else /etc/p11ha/p11ha.conf).")
    var config: String?

    var path: String { config ?? Config.pathFromEnvironment() }

    /// The configuration, or exit 1 with the file:line of what is wrong.
    func load() throws -> Config {
        do {
            return try Config.load(path: path)
        } catch {
            printError("p11hactl: \(error)")
            throw ExitCode(1)
        }
    }
}

struct Check: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Validate the configuration and reach every member.",
        discussion: """
            Exits 0 when the file is valid, every member's module loads and every URI selects exactly one token, \
            and every member with a PIN of its own (pin-source or pin-value) accepts it. Otherwise exits 1 and \
            names the file and line.
            """)

    @OptionGroup var options: ConfigOption

    func run() throws {
        var config = try options.load()
        config.log = .stderr
        config.logLevel = .warning
        let runtime: Runtime
        do {
            runtime = try Runtime.start(config)
        } catch {
            printError("p11hactl: \(error)")
            throw ExitCode(1)
        }
        defer { runtime.shutdown() }
        var failed = false
        print("\(config.path): valid")
        for group in runtime.groups {
            print("group \(group.name): slot \(group.slotID), token label \"\(group.label)\", \(group.members.count) members, \(group.mechanisms.count) common mechanisms")
            let reports = runtime.memberReports(group)
            let common = reports.map(\.mechanisms).reduce(reports.first?.mechanisms ?? []) { $0.intersection($1) }
            for report in reports {
                print("  member \(report.uri) (line \(report.line)): token \"\(report.tokenLabel)\" serial \(report.serial), \(report.manufacturer) \(report.model)")
                let extra = report.mechanisms.subtracting(common).sorted()
                if !extra.isEmpty {
                    print("    mechanisms only some members have (not offered by the group): \(extra.map(mechanismName).joined(separator: ", "))")
                }
                switch report.login {
                case .none: break
                case .success: print("    login with its own PIN: ok")
                case .failure(let error):
                    print("    login with its own PIN: FAILED \(error)")
                    failed = true
                }
            }
        }
        if failed { throw ExitCode(1) }
    }
}

func printError(_ text: String) {
    FileHandle.standardError.write(Data((text + "\n").utf8))
}
