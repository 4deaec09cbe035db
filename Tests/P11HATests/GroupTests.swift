// The group's own logic: mechanism intersection, serial numbers, the object table.
import CInterop
@testable import P11HA
import Testing

@Suite struct TheGroupCore {
    @Test("the mechanism list is what every member supports, with the intersection of sizes and flags")
    func mechanismIntersection() {
        let a: [(type: CK_MECHANISM_TYPE, info: CK_MECHANISM_INFO)] = [
            (1, CK_MECHANISM_INFO(ulMinKeySize: 1024, ulMaxKeySize: 4096, flags: 0b111)),
            (2, CK_MECHANISM_INFO(ulMinKeySize: 16, ulMaxKeySize: 32, flags: 0b1)),
            (3, CK_MECHANISM_INFO(ulMinKeySize: 0, ulMaxKeySize: 0, flags: 0b1)),
        ]
        let b: [(type: CK_MECHANISM_TYPE, info: CK_MECHANISM_INFO)] = [
            (2, CK_MECHANISM_INFO(ulMinKeySize: 24, ulMaxKeySize: 64, flags: 0b11)),
            (1, CK_MECHANISM_INFO(ulMinKeySize: 2048, ulMaxKeySize: 3072, flags: 0b101)),
        ]
        let common = Group.intersect([a, b])
        #expect(common.map(\.type) == [1, 2])
        #expect(common[0].info.ulMinKeySize == 2048 && common[0].info.ulMaxKeySize == 3072 && common[0].info.flags == 0b101)
        #expect(common[1].info.ulMinKeySize == 24 && common[1].info.ulMaxKeySize == 32 && common[1].info.flags == 0b1)
    }

    @Test("serial numbers are 16 characters, stable, and differ between groups")
    func serials() {
        #expect(stableSerial("prod").count == 16)
        #expect(stableSerial("prod") == stableSerial("prod"))
        #expect(stableSerial("prod") != stableSerial("test"))
    }

    @Test("copies of one object found on several members get one handle; two objects never share one")
    func objectTable() {
        var table = ObjectTable()
        let identity = ObjectIdentity(objectClass: [1], id: [2])
        let first = table.attach(member: 0, copy: MemberObject(100), identity: identity, memberCount: 3)
        let again = table.attach(member: 1, copy: MemberObject(200), identity: identity, memberCount: 3)
        #expect(first == again)
        #expect(table[first]?.copies == [MemberObject(100), MemberObject(200), nil])
        let twin = table.attach(member: 0, copy: MemberObject(101), identity: identity, memberCount: 3)
        #expect(twin != first, "a second object with the same identity on the same member is another object")
        #expect(table.handle(member: 1, copy: MemberObject(200)) == first)
        table.removeCopy(first, member: 0)
        #expect(table[first]?.copies == [nil, MemberObject(200), nil])
        table.removeCopy(first, member: 1)
        #expect(table[first] == nil)
        #expect(table.handle(member: 1, copy: MemberObject(200)) == nil)
    }
}
