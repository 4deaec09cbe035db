// The multi-writer test's judge: what the writers were told (their records) against what every member holds, read
// directly from SoftHSM (the driver's member-inventory). Lost, resurrected, duplicated and divergent objects.
import Foundation

/// What one or more writers were told, from the records the driver's `writer` scenario appends.
struct WriterHistory {
    /// What a member may hold of one object, after the last write the writer made to it.
    enum Expected: Equatable {
        /// Acknowledged and not destroyed: on every member, under this label.
        case present(label: String)
        /// Destruction acknowledged: on no member.
        case absent
        /// A write failed (or its writer died inside it): under one of these labels, or nowhere if `mayBeAbsent`.
        case uncertain(labels: Set<String>, mayBeAbsent: Bool)
    }

    struct Object {
        let name: String
        let kind: String
        var expected: Expected
        /// The write whose "try" has no outcome yet.
        var pending: [String]?
        /// The member inventory's identity of this object.
        var identity: String { (kind == "data" ? "data:" : "key:") + name }
    }

    private(set) var objects: [String: Object] = [:]
    private(set) var created = 0
    private(set) var renamed = 0
    private(set) var destroyed = 0
    /// Failed writes per CK_RV ("0x30").
    private(set) var failures: [String: Int] = [:]
    /// Lines that are not records (a line cut by a kill is the only expected one).
    private(set) var unreadable: [String] = []

    init(records texts: [String]) {
        for text in texts {
            for line in text.split(separator: "\n").map(String.init) { read(line) }
            // A writer that died inside a call: that write may or may not have happened.
            for name in objects.keys where objects[name]?.pending != nil { settle(name, failed: objects[name]!.pending!) }
        }
    }

    private mutating func read(_ line: String) {
        let words = line.split(separator: " ").map(String.init)
        guard words.count >= 4, let verb = ["try", "ok", "fail"].first(where: { $0 == words[0] }) else {
            unreadable.append(line)
            return
        }
        let write = Array(words.dropFirst())
        let shape = (write[0], write.count - (verb == "fail" ? 1 : 0))
        guard [("create", 4), ("rename", 4), ("destroy", 3)].contains(where: { $0 == shape }) else {
            unreadable.append(line)
            return
        }
        let name = write[1]
        switch verb {
        case "try":
            if write[0] == "create" {
                objects[name] = Object(name: name, kind: write[2], expected: .uncertain(labels: [write[3]], mayBeAbsent: true))
            }
            objects[name]?.pending = write
        case "ok":
            objects[name]?.pending = nil
            switch write[0] {
            case "create":
                created += 1
                objects[name]?.expected = .present(label: write[3])
            case "rename":
                renamed += 1
                objects[name]?.expected = .present(label: write[3])
            default:
                destroyed += 1
                objects[name]?.expected = .absent
            }
        default:
            failures[write.last!, default: 0] += 1
            settle(name, failed: Array(write.dropLast()))
        }
    }

    /// After a failed write the object is in its state before or after it.
    private mutating func settle(_ name: String, failed write: [String]) {
        objects[name]?.pending = nil
        switch write[0] {
        case "create": objects[name]?.expected = .uncertain(labels: [write[3]], mayBeAbsent: true)
        case "rename": objects[name]?.expected = .uncertain(labels: [write[2], write[3]], mayBeAbsent: false)
        default: objects[name]?.expected = .uncertain(labels: [write[2]], mayBeAbsent: true)
        }
    }
}

/// One token object on one member, from a line of the driver's member-inventory scenario.
struct HeldObject {
    let member: String
    let objectClass: UInt?
    let label: String
    let id: [UInt8]?
    let application: [UInt8]?
    let value: [UInt8]?
    let fingerprint: String?

    static let dataClass: UInt = 0
    static let secretKeyClass: UInt = 4

    /// "object MEMBER CLASS KEYTYPE LABEL ID APPLICATION VALUE FINGERPRINT"
    init?(line: Substring) {
        let f = line.split(separator: " ", omittingEmptySubsequences: false).map(String.init)
        guard f.count == 9, f[0] == "object" else { return nil }
        func bytes(_ field: String) -> [UInt8]? {
            if field == "-" { return nil }
            if field == "." { return [] }
            var out: [UInt8] = []
            var index = field.startIndex
            while index < field.endIndex {
                let next = field.index(index, offsetBy: 2, limitedBy: field.endIndex) ?? field.endIndex
                guard let byte = UInt8(field[index..<next], radix: 16) else { return nil }
                out.append(byte)
                index = next
            }
            return out
        }
        member = f[1]
        objectClass = UInt(f[2], radix: 16)
        label = bytes(f[4]).map { String(decoding: $0, as: UTF8.self) } ?? ""
        id = bytes(f[5])
        application = bytes(f[6])
        value = bytes(f[7])
        fingerprint = f[8] == "-" ? nil : f[8]
    }

    /// p11ha's own objects (the replication key, journals and whatever else it keeps on the members) are named so.
    var isP11HAOwn: Bool {
        label.hasPrefix("p11ha ") || application.map { String(decoding: $0, as: UTF8.self) } == "p11ha"
    }

    /// What stays the same through renames: a data object's value, a key's CKA_ID (the writer's NAME).
    var identity: String {
        switch objectClass {
        case Self.dataClass?: "data:" + String(decoding: value ?? [], as: UTF8.self)
        case Self.secretKeyClass?: "key:" + String(decoding: id ?? [], as: UTF8.self)
        default: "class \(objectClass.map { String($0, radix: 16) } ?? "?"):" + label
        }
    }
}

/// Every member's objects from the member-inventory scenario's output.
func readInventory(_ output: String, members: [String]) throws -> [String: [HeldObject]] {
    var byMember = Dictionary(uniqueKeysWithValues: members.map { ($0, [HeldObject]()) })
    var listed = Set<String>()
    for line in output.split(separator: "\n") {
        if line.hasPrefix("object ") {
            guard let object = HeldObject(line: line), byMember[object.member] != nil else {
                throw SupportError("unreadable inventory line: \(line)")
            }
            byMember[object.member]!.append(object)
        } else if line.hasPrefix("member "), let name = line.split(separator: " ").dropFirst().first {
            listed.insert(String(name))
        }
    }
    guard listed == Set(members) else { throw SupportError("the inventory lists \(listed.sorted()), not \(members):\n\(output)") }
    return byMember
}

/// The writers' history against the members' contents. Every list holds one line per object at fault.
struct ConvergenceAudit {
    let history: WriterHistory
    let members: [String]
    /// Objects (not p11ha's own) per member.
    let held: [String: Int]
    /// Acknowledged and not destroyed, missing on some member (a failed rename's object too: a rename cannot
    /// destroy).
    private(set) var lost: [String] = []
    /// On a member under a label it cannot have: neither its last acknowledged one nor a failed rename's.
    private(set) var staleLabels: [String] = []
    /// Destruction acknowledged, present on some member.
    private(set) var resurrected: [String] = []
    /// Two or more objects with one label on one member, or two or more copies of one object on one member.
    private(set) var duplicated: [String] = []
    /// Present on some members and not on others, or under different labels, or as different key values.
    private(set) var divergent: [String] = []
    /// On a member, and no writer ever tried to make it.
    private(set) var unknown: [String] = []

    init(_ history: WriterHistory, _ inventory: [String: [HeldObject]]) {
        self.history = history
        members = inventory.keys.sorted()
        let objects = inventory.mapValues { $0.filter { !$0.isP11HAOwn } }
        held = objects.mapValues(\.count)
        var byIdentity: [String: [String: [HeldObject]]] = [:]  // identity -> member -> copies
        for (member, list) in objects {
            for object in list { byIdentity[object.identity, default: [:]][member, default: []].append(object) }
            for (label, copies) in Dictionary(grouping: list, by: \.label) where copies.count > 1 {
                duplicated.append("\(member) holds \(copies.count) objects labelled \(label)")
            }
            for (identity, copies) in Dictionary(grouping: list, by: \.identity) where copies.count > 1 {
                let labels = Set(copies.map(\.label))
                if labels.count > 1 { duplicated.append("\(member) holds \(copies.count) copies of \(identity), labelled \(labels.sorted())") }
            }
        }

        for object in history.objects.values.sorted(by: { $0.name < $1.name }) {
            let copies = byIdentity[object.identity] ?? [:]
            let missing = members.filter { copies[$0] == nil }
            let what = "\(object.name) (\(object.kind))"
            switch object.expected {
            case .present(let label):
                if !missing.isEmpty { lost.append("\(what), acknowledged as \(label), missing on \(missing.joined(separator: ", "))") }
                checkLabels(what, copies, allowed: [label])
            case .absent:
                if !copies.isEmpty { resurrected.append("\(what), destroyed, is on \(copies.keys.sorted().joined(separator: ", "))") }
            case .uncertain(let labels, let mayBeAbsent):
                if !mayBeAbsent && !missing.isEmpty {
                    lost.append("\(what), acknowledged, a rename failed, missing on \(missing.joined(separator: ", "))")
                }
                checkLabels(what, copies, allowed: labels)
            }
        }

        let named = Set(history.objects.values.map(\.identity))
        for (identity, copies) in byIdentity.sorted(by: { $0.key < $1.key }) {
            let labels = Set(copies.values.flatMap { $0.map(\.label) })
            let fingerprints = Set(copies.values.flatMap { $0.compactMap(\.fingerprint) })
            var why: [String] = []
            if copies.count != members.count { why.append("only on \(copies.keys.sorted().joined(separator: ", "))") }
            if labels.count > 1 {
                why.append("labels " + copies.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value.map(\.label))" }.joined(separator: " "))
            }
            if fingerprints.count > 1 { why.append("\(fingerprints.count) different key values") }
            if !why.isEmpty { divergent.append("\(identity): " + why.joined(separator: "; ")) }
            if !named.contains(identity) { unknown.append("\(identity) labelled \(labels.sorted()) on \(copies.keys.sorted())") }
        }
    }

    private mutating func checkLabels(_ what: String, _ copies: [String: [HeldObject]], allowed: Set<String>) {
        for (member, list) in copies.sorted(by: { $0.key < $1.key }) {
            let wrong = list.map(\.label).filter { !allowed.contains($0) }
            if !wrong.isEmpty { staleLabels.append("\(what) on \(member) labelled \(wrong), expected one of \(allowed.sorted())") }
        }
    }

    var isClean: Bool {
        lost.isEmpty && staleLabels.isEmpty && resurrected.isEmpty && duplicated.isEmpty && divergent.isEmpty && unknown.isEmpty
    }

    /// Objects the writers were told exist and did not touch again.
    var expectedEverywhere: Int {
        history.objects.values.filter { if case .present = $0.expected { true } else { false } }.count
    }

    /// The figures on one line.
    var figures: String {
        let codes = history.failures.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " ")
        return "acknowledged: \(history.created) created, \(history.renamed) renamed, \(history.destroyed) destroyed "
            + "(\(expectedEverywhere) expected on every member); failed writes: \(history.failures.values.reduce(0, +))"
            + (codes.isEmpty ? "" : " [\(codes)]")
            + "; lost \(lost.count), stale labels \(staleLabels.count), resurrected \(resurrected.count), "
            + "duplicated \(duplicated.count), divergent \(divergent.count), unknown \(unknown.count); held: "
            + members.map { "\($0) \(held[$0] ?? 0)" }.joined(separator: ", ")
    }

    /// The figures and the first few objects at fault of each kind.
    var report: String {
        var text = figures
        for (name, list) in [("lost", lost), ("stale labels", staleLabels), ("resurrected", resurrected),
                             ("duplicated", duplicated), ("divergent", divergent), ("unknown", unknown)] where !list.isEmpty {
            text += "\n\(name) (\(list.count)):\n  " + list.prefix(8).joined(separator: "\n  ")
            if list.count > 8 { text += "\n  ..." }
        }
        if !history.unreadable.isEmpty { text += "\nunreadable record lines: \(history.unreadable.prefix(3))" }
        return text
    }
}
