// Chaos: signing, verifying, creating and destroying keys while members die and return at random.
//
// Members die through the fault-injecting module (every call answers CKR_DEVICE_ERROR, as a dead HSM's
// client does) rather than by killing p11-kit server processes: Debian 12's p11-kit 0.24 cannot carry the key
// wrap that copies keys created meanwhile to a returning member. Process deaths are ProcessFaultTests' subject.
import Foundation
import Testing

@Suite("Chaos", .serialized)
struct Chaos {
    @Test("chaos: four threads sign and verify for 30 s while members die and return at random; no error, every signature verifies, no key lost or resurrected")
    func killAndRestartAtRandom() throws {
        let signing = try SigningGroup()
        let members = signing.members, control = signing.control
        let environment = members.faultEnvironment
        let kill = { (label: String) throws in try inject("fail 0x30", into: control, member: label) }
        let restart = { (label: String) throws in try inject("ok", into: control, member: label) }
        let start = signing.start

        let timeline = Timeline()
        let log = LogFollower(members.dir + "/p11ha.log")
        _ = log.newLines()
        let workload = try start("sign_loop", "30", "4")
        defer { workload.killTree() }
        let keys = KeyChurn(members, timeline, environment: environment)
        let churn = Thread { keys.run() }
        churn.start()
        defer { keys.finish() }

        // Every 2-4 s a member that is not the only one up is killed; it returns 1.5-3 s later.
        var rng = SystemRandomNumberGenerator()
        var returns: [String: Date] = [:]
        var nextKill = Date().addingTimeInterval(.random(in: 2...4, using: &rng))
        while workload.isRunning {
            let now = Date()
            for (label, due) in returns where due <= now {
                try restart(label)
                returns[label] = nil
                timeline.note("restart \(label)")
            }
            if now >= nextKill {
                let up = members.tokenLabels.filter { returns[$0] == nil }
                if up.count >= 2, let victim = up.randomElement(using: &rng) {
                    try kill(victim)
                    returns[victim] = now.addingTimeInterval(.random(in: 1.5...3, using: &rng))
                    timeline.note("kill \(victim)")
                }
                nextKill = now.addingTimeInterval(.random(in: 2...4, using: &rng))
            }
            for line in log.newLines() { timeline.note("log: " + line) }
            // Bounded: sign_loop runs 30 s, and a minute is enough to see that it hangs.
            if timeline.elapsed > 60 { break }
            // The chaos's clock: kills and restarts are due at random times, checked ten times a second.
            usleep(100_000)
        }
        let result = workload.wait(seconds: 5)
        keys.finish()
        for label in returns.keys {
            try restart(label)
            timeline.note("restart \(label)")
        }

        // One more process with every member up: it finds whoever missed writes and brings it up to date.
        // It runs until the members agree (p11hactl status), at most 30 s: bringing two members up to date with
        // the keys of a 30 s churn takes a few seconds.
        let settle = try start("settle", "30", "1")
        defer { settle.killTree() }
        let pin = try pinFile(members, "user.pin", members.userPIN)
        // Each check runs p11hactl, which logs in to every member: twice a second is often enough.
        var agreed = true
        do {
            try waitUntil("the members agree (p11hactl status exits 0)", timeout: 30, interval: 0.5) {
                try p11hactl(["status", "--pin-source", pin], members, environment: environment).status == 0
            }
        } catch {
            agreed = false
            timeline.note("\(error)")
        }
        timeline.note("members agree after the chaos: \(agreed)")
        settle.killTree()
        let settled = settle.wait(seconds: 5)
        for line in log.newLines() { timeline.note("log: " + line) }
        let history = "timeline (s since sign_loop started):\n" + timeline.text
        #expect(agreed, "the members did not come to agree within 30 s of the chaos:\n\(history)")

        let finished = try #require(result, "sign_loop did not finish within 65 s of its 30:\n\(workload.output)\n\(history)")
        #expect(finished.status == 0, "sign_loop saw errors (status \(finished.status)):\n\(shortOutput(finished))\n\(history)")
        #expect(finished.stdout.contains(", 0 errors"), "\(finished.stdout)")
        #expect(keys.failures.isEmpty, "creating and destroying keys failed:\n\(keys.failures.joined(separator: "\n"))\n\(history)")
        if let afterwards = settled, afterwards.stdout.contains(" errors") {
            #expect(afterwards.stdout.contains(", 0 errors") || !afterwards.stdout.contains("sign_loop:"),
                    "signing after the chaos failed:\n\(shortOutput(afterwards))")
        }
        #expect(!(settled?.stdout ?? "").split(separator: "\n").contains { $0.hasPrefix("t=") && !$0.contains("errors=0") },
                "signing after the chaos saw errors:\n\(settled.map { shortOutput($0) } ?? "")")

        // Key halves, as "private chaos-3": a destroy can succeed for one half and fail for the other.
        let kept = ["private K", "public K"] + keys.kept
        let destroyed = keys.destroyed
        try #require(kept.count > 2, "no key was created during the chaos")
        for token in members.tokenLabels {
            let objects = try objectsOnMember(members, token)
            let halves = objects.map { "\($0.kind) \($0.label)" }
            for half in kept {
                let count = halves.filter { $0 == half }.count
                #expect(count == 1, "\(token) holds \(count) copies of \(half), expected 1\n\(history)")
            }
            let resurrected = halves.filter { destroyed.contains($0) }
            #expect(resurrected.isEmpty, "\(token) holds keys destroyed during the chaos: \(resurrected)\n\(history)")
            let unknown = halves.filter { $0.contains(" chaos-") && !kept.contains($0) && !destroyed.contains($0) }
            #expect(unknown.isEmpty, "\(token) holds keys whose creation failed: \(unknown)")
        }
        // A member's passing refusal of a write (asked again) is worth seeing in a passing run too.
        for line in history.split(separator: "\n") where line.contains(" write-asked-again ") || line.contains(" members-disagree ") {
            print("chaos: \(line)")
        }
    }
}

@Suite("A broken module", .serialized)
struct BrokenModule {
    @Test("a member whose module answers CKR_GENERAL_ERROR to every call in one process (as SoftHSM 2.6.1 does once it read a token file mid-rewrite) comes back by a restart of the module, and four signing threads see no error, while the members sharing the module restart with it")
    func wedgedMemberComesBack() throws {
        let signing = try SigningGroup()
        let members = signing.members, control = signing.control
        let log = members.dir + "/p11ha.log"
        let workload = try signing.start("sign_loop", "10", "4")
        defer { workload.killTree() }
        try waitForSignatures(workload)
        // Only this process's module is wedged: the line holds until the process initializes faulty.so again.
        try inject("wedge CKR_GENERAL_ERROR", into: control, member: "member-b")
        let text = { (try? String(contentsOfFile: log, encoding: .utf8)) ?? "" }
        try waitUntil("p11ha restarts the module (module-restarted in p11ha.log):\n\(text())", timeout: 8) {
            text().contains(" module-restarted ")
        }
        let restartedAt = reportLines(workload.output).count
        let result = try #require(workload.wait(seconds: 30), "sign_loop did not finish within 30 s of its 10:\n\(workload.output)")
        #expect(result.status == 0, "sign_loop saw errors (status \(result.status)):\n\(shortOutput(result))\n\(text())")
        #expect(result.stdout.contains(", 0 errors"), "\(result.stdout)")
        let events = { (event: String) in text().split(separator: "\n").filter { $0.contains(" \(event) ") && $0.contains(" member=member-b ") } }
        #expect(events("member-failed").contains { $0.contains("CKR_GENERAL_ERROR") }, "\(text())")
        #expect(!events("member-recovered").isEmpty, "\(text())")
        // Every member serves after the restart, member-b included.
        let lines = reportLines(result.stdout)
        if restartedAt < lines.count, let before = servedCounts(inLine: lines[restartedAt]), let after = lines.last.flatMap(servedCounts(inLine:)),
           before.count == 3, after.count == 3 {
            #expect((0..<3).allSatisfy { after[$0] > before[$0] }, "a member served nothing after the restart:\n\(result.stdout)\n\(text())")
        } else {
            Issue.record("no served= counts after the restart in sign_loop's output:\n\(shortOutput(result))")
        }
    }
}

/// Three members behind faulty.so (operation-timeout 2 s, recovery-interval 300 ms), an EC key pair "K" generated
/// through the group, and sign_loop built to sign with it: the chaos tests' stage.
private struct SigningGroup {
    let members: Members
    /// faulty.so's control directory.
    let control: String
    let signLoop: String

    init() throws {
        members = try Members()
        control = try members.throughFaultModule(extraGlobal: ["operation-timeout = 2s", "recovery-interval = 300ms"])
        let generated = try throughGroup(members, ["--keypairgen", "--key-type", "EC:prime256v1", "--label", "K", "--id", "01"])
        try #require(generated.status == 0, "generating a key pair through the group failed:\n\(generated.output)")
        signLoop = try buildCExample("sign_loop", into: members.dir).path
    }

    /// sign_loop signing with "K" for `seconds` on `threads` threads, its output in `name`.out and `name`.err.
    func start(_ name: String, _ seconds: String, _ threads: String) throws -> Started {
        try Started(signLoop, [Paths.debugModule, members.group, members.userPIN, "K", seconds, threads],
                    environment: members.faultEnvironment, output: members.dir + "/\(name).out", errors: members.dir + "/\(name).err")
    }
}

/// What happened when, for failure messages: kills, restarts, key steps and p11ha's log lines (also the
/// multi-writer test's fault schedule).
final class Timeline: @unchecked Sendable {
    private let start = Date()
    private let lock = NSLock()
    /// Guarded by `lock`.
    private var entries: [String] = []

    var elapsed: Double { Date().timeIntervalSince(start) }

    func note(_ what: String) {
        let tenths = (elapsed * 10).rounded() / 10
        // Member names carry their socket's path: shorter without it.
        let short = what.replacingOccurrences(of: "@unix:path=[^ ]*", with: "", options: .regularExpression)
        lock.withLock { entries.append("\(tenths) \(short)") }
    }

    var text: String { lock.withLock { entries.joined(separator: "\n") } }
}

/// A second process's work during the chaos: key pairs created and destroyed through the group, one
/// pkcs11-tool run each, on a thread of its own. Every failed run is a failure: one member is always up.
private final class KeyChurn: @unchecked Sendable {
    private let members: Members
    private let timeline: Timeline
    private let lock = NSLock()
    /// Guarded by `lock`.
    private var stopping = false
    /// "private chaos-3", "public chaos-3": what exists and what was destroyed, according to the answers.
    private var keptHalves: [String] = []
    private var destroyedHalves: [String] = []
    private var failureLines: [String] = []
    private let done = DispatchSemaphore(value: 0)

    private let environment: [String: String]

    init(_ members: Members, _ timeline: Timeline, environment: [String: String]) {
        self.members = members
        self.timeline = timeline
        self.environment = environment
    }

    var kept: [String] { lock.withLock { keptHalves } }
    var destroyed: [String] { lock.withLock { destroyedHalves } }
    var failures: [String] { lock.withLock { failureLines } }

    /// Creates chaos-1, chaos-2, ...; every odd one is destroyed once the next one exists.
    func run() {
        defer { done.signal() }
        var index = 1
        while !lock.withLock({ stopping }) {
            let label = "chaos-\(index)"
            let id = String(format: "%04x", 0x100 + index)
            if step("create \(label)", ["--keypairgen", "--key-type", "EC:prime256v1", "--label", label, "--id", id]) {
                lock.withLock { keptHalves += ["private \(label)", "public \(label)"] }
            }
            if index % 2 == 0 {
                let previous = "chaos-\(index - 1)"
                let previousID = String(format: "%04x", 0x100 + index - 1)
                for (kind, type) in [("private", "privkey"), ("public", "pubkey")]
                where lock.withLock({ keptHalves.contains("\(kind) \(previous)") }) {
                    if step("destroy \(kind) \(previous)", ["--delete-object", "--type", type, "--id", previousID]) {
                        lock.withLock {
                            keptHalves.removeAll { $0 == "\(kind) \(previous)" }
                            destroyedHalves.append("\(kind) \(previous)")
                        }
                    }
                }
            }
            index += 1
            // Paces the churn on purpose: a key every 0.3-1 s, at random against the kills.
            usleep(UInt32.random(in: 300_000...1_000_000))
        }
    }

    /// Stops after the step in progress; waits for it. Safe to call more than once.
    func finish() {
        let first = lock.withLock { () -> Bool in
            defer { stopping = true }
            return !stopping
        }
        if first {
            _ = done.wait(timeout: .now() + 120)
        }
    }

    private func step(_ what: String, _ arguments: [String]) -> Bool {
        timeline.note("\(what) starts")
        do {
            let result = try throughGroup(members, arguments, timeout: 60, environment: environment)
            timeline.note("\(what) \(result.status == 0 ? "ok" : "FAILED")")
            if result.status == 0 { return true }
            let said = result.output.split(separator: "\n").filter { $0.contains("rv") || $0.contains("error") }
            lock.withLock { failureLines.append("\(what): status \(result.status): \(said.joined(separator: " | "))") }
        } catch {
            timeline.note("\(what) FAILED")
            lock.withLock { failureLines.append("\(what): \(error)") }
        }
        return false
    }
}
