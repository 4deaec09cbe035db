// A symbol that marks this library as p11ha: the module registry refuses a member module that exports it (p11ha as
// its own member would call itself under its own locks).
@_cdecl("p11ha_module_identity")
public func p11haModuleIdentity() -> Int32 { 1 }
