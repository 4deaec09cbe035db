// Key management: generation on one member; unwrap, derive and copy replayed on every member holding the inputs.
import CInterop

extension Runtime {
    /// Generates a key on the group's first member in service and carries it, wrapped under the replication
    /// key, to every other member in service (see Replication.swift). A token key is made there as a session
    /// object first, and every member, its maker included, gets its token copy by the same unwrap: a generation
    /// that fails halfway (its member failing with it) leaves no token object behind. One left there could not be
    /// destroyed until the member returns, and a process that ends first (pkcs11-tool) would leave it for good: a
    /// second key of the application's label beside the one the group carries (the chaos test, member-a).
    public func generateKey(_ handle: SessionHandle, _ mechanism: Mechanism, _ template: [Attribute]) throws(P11Error) -> ObjectHandle {
        let session = try session(handle)
        defer { session.endCall() }
        let isToken = template[CK_ATTRIBUTE_TYPE(CKA_TOKEN)]?.boolValue ?? false
        if makesDomainParameters(mechanism, template) {
            return try generateDomainParameters(session, mechanism, template, isToken: isToken)
        }
        return try fanOut.onOneMember(session.group, choice: .first, session: session) { (source) throws(P11Error) in
            let sourceSession = try session.memberSession(source)
            guard let plan = try replicator.plan(session, source: source, isToken: isToken) else {
                // Alone in service now, it must still be able to travel to the others when they return.
                let key = try source.token.generateKey(sourceSession, mechanism, session.group.members.count > 1 ? wrappableTemplate(lastExtractable(template)) : template)
                return try record([(source.index, key)], in: session, isToken: isToken)
            }
            let wrappable = wrappableTemplate(lastExtractable(template))
            let key = try source.token.generateKey(sourceSession, mechanism, staged(wrappable, isToken))
            do throws(P11Error) {
                let copies = try replicator.carry(session, source: source, key: key, plan: plan, tokenCopies: isToken)
                if isToken { source.discardHalfMade(sourceSession, [key]) }
                return try record((isToken ? [] : [(source.index, key)]) + copies, in: session, isToken: isToken)
            } catch {
                source.discardHalfMade(sourceSession, [key])
                guard error == Replicator.cannotTravel else { throw error }
                // generated-keys = replicate-or-keep, and a key type the members cannot wrap: made again, on this
                // member only, with the attributes of any generated key (carried once the members can wrap its type);
                // its record goes to every member in service.
                let kept = try source.token.generateKey(sourceSession, mechanism, wrappable)
                return try record([(source.index, kept)], in: session, isToken: isToken, withoutSource: plan.others.map(\.index))
            }
        }
    }

    /// Domain parameters (DSA, DH) are public values: made on the first member in service, and created by value on
    /// every other one, and on their maker too for a token object, as a generated key is carried.
    private func generateDomainParameters(_ session: VirtualSession, _ mechanism: Mechanism, _ template: [Attribute],
                                          isToken: Bool) throws(P11Error) -> ObjectHandle {
        try fanOut.onOneMember(session.group, choice: .first, session: session) { (source) throws(P11Error) in
            let sourceSession = try session.memberSession(source)
            let others = session.group.membersInService.filter { $0 !== source }
            if others.isEmpty {
                return try record([(source.index, try source.token.generateKey(sourceSession, mechanism, template))], in: session, isToken: isToken)
            }
            let made = try source.token.generateKey(sourceSession, mechanism, staged(template, isToken))
            do throws(P11Error) {
                var values = try ReplicaAttributes.byValueTemplate(on: source.token, sourceSession, made)
                if isToken { values = values.setting(CK_ATTRIBUTE_TYPE(CKA_TOKEN), true) }
                let copies = try createByValue(values, on: (isToken ? [source] : []) + others, othersHoldIt: !isToken, in: session)
                if isToken { source.discardHalfMade(sourceSession, [made]) }
                return try record((isToken ? [] : [(source.index, made)]) + copies, in: session, isToken: isToken)
            } catch {
                source.discardHalfMade(sourceSession, [made])
                throw error
            }
        }
    }

    /// Generates a key pair on the group's first member in service; the private key travels wrapped under the
    /// replication key, the public key is created on each other member from its public values. A token half is
    /// made as a session object first, and every member gets its token copy from it (see `generateKey`).
    public func generateKeyPair(_ handle: SessionHandle, _ mechanism: Mechanism, publicTemplate: [Attribute],
                                privateTemplate: [Attribute]) throws(P11Error) -> (ObjectHandle, ObjectHandle) {
        let session = try session(handle)
        defer { session.endCall() }
        let tokenFlag = CK_ATTRIBUTE_TYPE(CKA_TOKEN)
        let publicIsToken = publicTemplate[tokenFlag]?.boolValue ?? false
        let privateIsToken = privateTemplate[tokenFlag]?.boolValue ?? false
        return try fanOut.onOneMember(session.group, choice: .first, session: session) { (source) throws(P11Error) in
            let sourceSession = try session.memberSession(source)
            guard let plan = try replicator.plan(session, source: source, isToken: publicIsToken || privateIsToken) else {
                let (pub, priv) = try source.token.generateKeyPair(sourceSession, mechanism, publicTemplate: publicTemplate,
                                                             privateTemplate: session.group.members.count > 1 ? wrappableTemplate(lastExtractable(privateTemplate)) : privateTemplate)
                return try recordPair([(source.index, pub)], [(source.index, priv)], in: session,
                                      publicIsToken: publicIsToken, privateIsToken: privateIsToken, handle: handle)
            }
            let wrappable = wrappableTemplate(lastExtractable(privateTemplate))
            let (pub, priv) = try source.token.generateKeyPair(sourceSession, mechanism, publicTemplate: staged(publicTemplate, publicIsToken),
                                                         privateTemplate: staged(wrappable, privateIsToken))
            // The source's own halves where they are what the application asked for (session objects); token
            // halves reach the source as they reach the others.
            let sourcePublic = publicIsToken ? [] : [(source.index, pub)]
            let sourcePrivate = privateIsToken ? [] : [(source.index, priv)]
            var privateCopies: [(Int, MemberObject)] = []
            do throws(P11Error) {
                // Everything read from the source before any token copy is made: a source that fails after its own
                // token copy exists leaves that copy there, and the generation, failed over, makes another key.
                var publicTemplate = try ReplicaAttributes.template(on: source.token, sourceSession, pub)
                if publicIsToken { publicTemplate = publicTemplate.setting(tokenFlag, true) }
                privateCopies = try replicator.carry(session, source: source, key: priv, plan: plan, tokenCopies: privateIsToken)
                let holders = (publicIsToken ? [source] : []) + privateCopies.map { session.group.members[$0.0] }.filter { $0 !== source }
                let publicCopies = try createByValue(publicTemplate, on: holders, othersHoldIt: !publicIsToken, in: session)
                // A member that failed the public half holds a private key the group no longer counts on it.
                let withPublic = Set((sourcePublic + publicCopies).map(\.0))
                for (index, copy) in privateCopies where !withPublic.contains(index) {
                    let member = session.group.members[index]
                    if let s = try? session.memberSession(member) { try? member.token.destroyObject(s, copy) }
                }
                privateCopies = privateCopies.filter { withPublic.contains($0.0) }
                source.discardHalfMade(sourceSession, (publicIsToken ? [pub] : []) + (privateIsToken ? [priv] : []))
                return try recordPair(sourcePublic + publicCopies, sourcePrivate + privateCopies, in: session,
                                      publicIsToken: publicIsToken, privateIsToken: privateIsToken, handle: handle)
            } catch {
                for (index, copy) in privateCopies {
                    let member = session.group.members[index]
                    if let s = try? session.memberSession(member) { try? member.token.destroyObject(s, copy) }
                }
                source.discardHalfMade(sourceSession, [pub, priv])
                guard error == Replicator.cannotTravel else { throw error }
                // Kept on this member (see `generateKey`); the public half reaches the others at their next repair.
                let (keptPublic, keptPrivate) = try source.token.generateKeyPair(sourceSession, mechanism, publicTemplate: publicTemplate,
                                                                                 privateTemplate: wrappable)
                return try recordPair([(source.index, keptPublic)], [(source.index, keptPrivate)], in: session, publicIsToken: publicIsToken,
                                      privateIsToken: privateIsToken, handle: handle, withoutSource: plan.others.map(\.index))
            }
        }
    }

    /// Creates public values read from the member that made them (a generated pair's public half, domain
    /// parameters) on each of `targets`; where a member refuses them, they are destroyed where they were made. The
    /// template is p11ha's own, so a refusal is asked again (`FanOut.Refusals.askedAgain`).
    private func createByValue(_ template: [Attribute], on targets: [Member], othersHoldIt: Bool,
                               in session: VirtualSession) throws(P11Error) -> [(Int, MemberObject)] {
        try fanOut.everyMember(of: session.group, targets, othersHoldIt: othersHoldIt, refusals: .askedAgain, session: session) { (member) throws(P11Error) in
            try member.token.createObject(try session.memberSession(member), template)
        } undo: { member, copy in
            if let s = try? session.memberSession(member) { try? member.token.destroyObject(s, copy) }
        }
    }

    /// Records both halves of a generated pair: when the private half cannot be recorded (its copies are then
    /// destroyed), the public half goes too, so that the application is never left with half a pair.
    private func recordPair(_ pub: [(Int, MemberObject)], _ priv: [(Int, MemberObject)], in session: VirtualSession,
                            publicIsToken: Bool, privateIsToken: Bool, handle: SessionHandle,
                            withoutSource: [Int] = []) throws(P11Error) -> (ObjectHandle, ObjectHandle) {
        let publicHandle = try record(pub, in: session, isToken: publicIsToken, withoutSource: withoutSource)
        do throws(P11Error) {
            return (publicHandle, try record(priv, in: session, isToken: privateIsToken, withoutSource: withoutSource))
        } catch {
            try? destroyObject(handle, publicHandle)
            throw error
        }
    }

    /// Wraps on a member that holds both keys.
    public func wrapKey(_ handle: SessionHandle, _ mechanism: Mechanism, wrappingKey: ObjectHandle,
                        key: ObjectHandle, capacity: Int?) throws(P11Error) -> Output {
        let session = try session(handle)
        defer { session.endCall() }
        let group = session.group
        let wrapping = try copies(of: wrappingKey, in: session, invalid: P11Error(CK_RV(CKR_WRAPPING_KEY_HANDLE_INVALID)))
        let wrapped = try copies(of: key, in: session, invalid: .keyHandleInvalid)
        let both = zip(wrapping, wrapped).map { $0 != nil && $1 != nil ? $0 : nil }
        return try fanOut.onOneMember(group, holding: both, session: session) { (member) throws(P11Error) in
            member.served.add(1, ordering: .relaxed)
            return try member.token.wrapKey(try session.memberSession(member), mechanism, wrappingKey: wrapping[member.index]!,
                                      key: wrapped[member.index]!, capacity: capacity)
        }
    }

    /// Unwrapping is deterministic: it is replayed on every member that holds the unwrapping key.
    public func unwrapKey(_ handle: SessionHandle, _ mechanism: Mechanism, unwrappingKey: ObjectHandle,
                          wrapped: [UInt8], _ template: [Attribute]) throws(P11Error) -> ObjectHandle {
        let session = try session(handle)
        defer { session.endCall() }
        let source = try copies(of: unwrappingKey, in: session, invalid: P11Error(CK_RV(CKR_UNWRAPPING_KEY_HANDLE_INVALID)))
        let made = try fanOut.everyHolder(source, in: session, refusals: .askedAgainAfterPeers) { (member, s, key) throws(P11Error) in
            try member.token.unwrapKey(s, mechanism, unwrappingKey: key, wrapped: wrapped, template)
        }
        return try record(made, in: session, isToken: template[CK_ATTRIBUTE_TYPE(CKA_TOKEN)]?.boolValue ?? false,
                      withoutSource: membersWithoutCopy(source, in: session.group))
    }

    /// Derivation is deterministic: it is replayed on every member that holds the base key.
    public func deriveKey(_ handle: SessionHandle, _ mechanism: Mechanism, baseKey: ObjectHandle,
                          _ template: [Attribute]) throws(P11Error) -> ObjectHandle {
        let session = try session(handle)
        defer { session.endCall() }
        let source = try copies(of: baseKey, in: session, invalid: .keyHandleInvalid)
        let made = try fanOut.everyHolder(source, in: session, refusals: .askedAgainAfterPeers) { (member, s, key) throws(P11Error) in
            try member.token.deriveKey(s, mechanism, baseKey: key, template)
        }
        return try record(made, in: session, isToken: template[CK_ATTRIBUTE_TYPE(CKA_TOKEN)]?.boolValue ?? false,
                      withoutSource: membersWithoutCopy(source, in: session.group))
    }
}

/// Whether a C_GenerateKey makes domain parameters (CKO_DOMAIN_PARAMETERS): by its template's class, or by its
/// mechanism (CKM_DSA_PARAMETER_GEN, CKM_DH_PKCS_PARAMETER_GEN, CKM_X9_42_DH_PARAMETER_GEN, and PKCS#11 3.0's DSA
/// probabilistic, Shawe-Taylor and FIPS G generation, 0x2000-0x2005).
private func makesDomainParameters(_ mechanism: Mechanism, _ template: [Attribute]) -> Bool {
    template[CK_ATTRIBUTE_TYPE(CKA_CLASS)]?.ulongValue == CK_ULONG(CKO_DOMAIN_PARAMETERS) || (0x2000...0x2005).contains(mechanism.type)
}

/// A token key's template as the session object that stands in for it on the member that makes it, until every
/// member in service holds its token copy (`generateKey`).
private func staged(_ template: [Attribute], _ isToken: Bool) -> [Attribute] {
    isToken ? template.setting(CK_ATTRIBUTE_TYPE(CKA_TOKEN), false) : template
}

/// A template with CKA_EXTRACTABLE given more than once, reduced to its last value, the one the member keeps
/// (SoftHSM reads a template in order): `wrappableTemplate` reads one value, and a template saying true, then
/// false, made a key that could not be carried (CKR_KEY_UNEXTRACTABLE where SoftHSM directly generates it; found by
/// the fuzzer, seed 2230139601011550791).
private func lastExtractable(_ template: [Attribute]) -> [Attribute] {
    let type = CK_ATTRIBUTE_TYPE(CKA_EXTRACTABLE)
    guard let last = template.lastIndex(where: { $0.type == type }) else { return template }
    return template.enumerated().filter { $0.element.type != type || $0.offset == last }.map(\.element)
}
