// The library's life over and over: an application that starts p11ha per request, or unloads and loads it again,
// runs for ever without gathering threads or file descriptors.
import CInterop
import Glibc

/// Entries of a /proc/self directory (threads in task, open descriptors in fd).
private func entries(_ directory: String) -> Int {
    guard let dir = opendir(directory) else { return -1 }
    defer { closedir(dir) }
    var count = 0
    while let entry = readdir(dir) {
        let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        if name != "." && name != ".." { count += 1 }
    }
    return count
}

/// P11HA_TEST_CYCLES (default 100) rounds of C_Initialize, log in, generate a session key pair, sign, C_Finalize;
/// every tenth round the module is also dlclosed and dlopened again. Threads and descriptors after the last round
/// may exceed those after the first rounds only by a constant, not by anything that grows with the rounds.
func lifecycleScenario(_ first: Module) {
    let cycles = env("P11HA_TEST_CYCLES").flatMap(Int.init) ?? 100
    let path = CommandLine.arguments[2]
    var m = first
    func round(_ i: Int) {
        let s = initialized(m)
        let session = openLoggedIn(m, slot: s, pin: userPIN)
        let key = ecPair(m, session, label: "cycle-\(i)", token: false)
        expect(signAndVerify(m, session, key, "round \(i)"), CKR_OK, "a signature in round \(i)")
        ok(m.f.C_Finalize!(nil), "C_Finalize (round \(i))")
    }
    for i in 0..<5 { round(i) }
    let threadsBefore = entries("/proc/self/task")
    let descriptorsBefore = entries("/proc/self/fd")
    for i in 5..<(5 + cycles) {
        round(i)
        if i % 10 == 9 {
            dlclose(m.handle)
            m = Module(path: path)
        }
    }
    let threadsAfter = entries("/proc/self/task")
    let descriptorsAfter = entries("/proc/self/fd")
    print("threads \(threadsBefore) -> \(threadsAfter), descriptors \(descriptorsBefore) -> \(descriptorsAfter) over \(cycles) rounds")
    check(threadsAfter <= threadsBefore + 4, "threads do not pile up over \(cycles) rounds: \(threadsBefore) -> \(threadsAfter)")
    check(descriptorsAfter <= descriptorsBefore + 4, "descriptors do not pile up over \(cycles) rounds: \(descriptorsBefore) -> \(descriptorsAfter)")
}
