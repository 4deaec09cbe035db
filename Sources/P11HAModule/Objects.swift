// Object management: create, copy, destroy, attributes, search.
import CInterop
import P11HA

func createObject(_ session: CK_SESSION_HANDLE, _ attributes: AttributePtr?, _ count: CK_ULONG,
                  _ object: UnsafeMutablePointer<CK_OBJECT_HANDLE>?) -> CK_RV {
    entry { () throws(P11Error) in
        let rt = try runtime()
        let (out, attrs) = try arguments(rt, session) { () throws(P11Error) -> (UnsafeMutablePointer<CK_OBJECT_HANDLE>, [Attribute]) in
            (try required(object), try template(attributes, count))
        }
        out.pointee = (try rt.createObject(SessionHandle(session), attrs)).raw
    }
}

func copyObject(_ session: CK_SESSION_HANDLE, _ object: CK_OBJECT_HANDLE, _ attributes: AttributePtr?, _ count: CK_ULONG,
                _ newObject: UnsafeMutablePointer<CK_OBJECT_HANDLE>?) -> CK_RV {
    entry { () throws(P11Error) in
        let rt = try runtime()
        let (out, attrs) = try arguments(rt, session) { () throws(P11Error) -> (UnsafeMutablePointer<CK_OBJECT_HANDLE>, [Attribute]) in
            (try required(newObject), try template(attributes, count))
        }
        out.pointee = (try rt.copyObject(SessionHandle(session), ObjectHandle(object), attrs)).raw
    }
}

func destroyObject(_ session: CK_SESSION_HANDLE, _ object: CK_OBJECT_HANDLE) -> CK_RV {
    entry { () throws(P11Error) in try runtime().destroyObject(SessionHandle(session), ObjectHandle(object)) }
}

func getObjectSize(_ session: CK_SESSION_HANDLE, _ object: CK_OBJECT_HANDLE, _ size: ULongPtr?) -> CK_RV {
    entry { () throws(P11Error) in
        let rt = try runtime()
        let out = try arguments(rt, session) { () throws(P11Error) -> ULongPtr in try required(size) }
        out.pointee = try rt.objectSize(SessionHandle(session), ObjectHandle(object))
    }
}

/// The member's own answer is passed through attribute by attribute, so CKR_ATTRIBUTE_SENSITIVE,
/// CKR_ATTRIBUTE_TYPE_INVALID, CKR_BUFFER_TOO_SMALL and length queries behave exactly as PKCS#11 says.
func getAttributeValue(_ session: CK_SESSION_HANDLE, _ object: CK_OBJECT_HANDLE, _ attributes: AttributePtr?, _ count: CK_ULONG) -> CK_RV {
    var result = CKR_OK_RV
    let rv = entry { () throws(P11Error) in
        let rt = try runtime()
        let slots = try arguments(rt, session) { () throws(P11Error) -> UnsafeMutableBufferPointer<CK_ATTRIBUTE> in
            let n = try length(count)
            guard n > 0 else { throw P11Error.argumentsBad }
            return UnsafeMutableBufferPointer(start: try required(attributes), count: n)
        }
        var queries: [AttributeQuery] = []
        queries.reserveCapacity(slots.count)
        for attribute in slots {
            queries.append(AttributeQuery(attribute.type, capacity: attribute.pValue == nil ? nil : room(attribute.ulValueLen),
                                          elements: try elementRooms(attribute)))
        }
        let (memberRV, answers) = try rt.attributeValues(SessionHandle(session), ObjectHandle(object), queries)
        for (i, answer) in answers.enumerated() {
            slots[i].ulValueLen = answer.length
            if let elements = answer.elements, let array = slots[i].pValue {
                writeElements(elements, into: array)
            } else if let destination = slots[i].pValue, let value = answer.value, let room = queries[i].capacity {
                value.withUnsafeBytes { destination.copyMemory(from: $0.baseAddress!, byteCount: min(value.count, room)) }
            }
        }
        result = memberRV
    }
    return rv == CKR_OK_RV ? result : rv
}

/// For an attribute array read into the caller's array (CKA_WRAP_TEMPLATE with a buffer): its elements' types
/// and the room of their values, as far as its length says there are elements (at most `attributeArrayLimit`).
private func elementRooms(_ attribute: CK_ATTRIBUTE) throws(P11Error) -> [AttributeQuery]? {
    guard attributeArrayTypes.contains(attribute.type), let array = attribute.pValue else { return nil }
    let count = min(room(attribute.ulValueLen) / MemoryLayout<CK_ATTRIBUTE>.stride, attributeArrayLimit)
    return (0..<count).map { i in
        let element = array.loadUnaligned(fromByteOffset: i * MemoryLayout<CK_ATTRIBUTE>.stride, as: CK_ATTRIBUTE.self)
        return AttributeQuery(element.type, capacity: element.pValue == nil ? nil : room(element.ulValueLen))
    }
}

/// Writes what the member answered for each element into the caller's array: type, length, and the value into
/// the element's own buffer.
private func writeElements(_ elements: [AttributeElement], into array: UnsafeMutableRawPointer) {
    for (i, answer) in elements.enumerated() {
        let offset = i * MemoryLayout<CK_ATTRIBUTE>.stride
        var element = array.loadUnaligned(fromByteOffset: offset, as: CK_ATTRIBUTE.self)
        if let destination = element.pValue, let value = answer.value {
            value.withUnsafeBytes { destination.copyMemory(from: $0.baseAddress!, byteCount: min(value.count, room(element.ulValueLen))) }
        }
        element.type = answer.type
        element.ulValueLen = answer.length
        array.storeBytes(of: element, toByteOffset: offset, as: CK_ATTRIBUTE.self)
    }
}

func setAttributeValue(_ session: CK_SESSION_HANDLE, _ object: CK_OBJECT_HANDLE, _ attributes: AttributePtr?, _ count: CK_ULONG) -> CK_RV {
    entry { () throws(P11Error) in
        let rt = try runtime()
        let attrs = try arguments(rt, session) { () throws(P11Error) -> [Attribute] in try template(attributes, count) }
        try rt.setAttributeValues(SessionHandle(session), ObjectHandle(object), attrs)
    }
}

func findObjectsInit(_ session: CK_SESSION_HANDLE, _ attributes: AttributePtr?, _ count: CK_ULONG) -> CK_RV {
    entry { () throws(P11Error) in
        let rt = try runtime()
        let attrs = try arguments(rt, session) { () throws(P11Error) -> [Attribute] in try template(attributes, count) }
        try rt.findObjectsInit(SessionHandle(session), attrs)
    }
}

func findObjects(_ session: CK_SESSION_HANDLE, _ objects: UnsafeMutablePointer<CK_OBJECT_HANDLE>?, _ max: CK_ULONG,
                 _ found: ULongPtr?) -> CK_RV {
    entry { () throws(P11Error) in
        let rt = try runtime()
        let most = room(max)
        let found = try arguments(rt, session) { () throws(P11Error) -> ULongPtr in
            guard objects != nil || most == 0 else { throw P11Error.argumentsBad }
            return try required(found)
        }
        let batch = try rt.findObjects(SessionHandle(session), max: most)
        if let objects, !batch.isEmpty { objects.update(from: batch.map(\.raw), count: batch.count) }
        found.pointee = CK_ULONG(batch.count)
    }
}

func findObjectsFinal(_ session: CK_SESSION_HANDLE) -> CK_RV {
    entry { () throws(P11Error) in try runtime().findObjectsFinal(SessionHandle(session)) }
}
