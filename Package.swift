// swift-tools-version: 6.0
// p11ha: a vendor-neutral high-availability PKCS#11 module.
import PackageDescription

// The module is loaded into nginx and OpenSSL processes: keep it lean.
let leanRuntime: [SwiftSetting] = [
    .unsafeFlags([
        "-Xfrontend", "-disable-implicit-concurrency-module-import",
        "-Xfrontend", "-disable-implicit-string-processing-module-import",
    ]),
]

let package = Package(
    name: "p11ha",
    products: [
        .library(name: "p11ha", type: .dynamic, targets: ["P11HAModule"]),
        .executable(name: "p11hactl", targets: ["p11hactl"]),
        // The core and its fake members, for the benchmark package in Benchmarks/Overhead.
        .library(name: "P11HACore", targets: ["P11HA", "P11HAFake"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
    ],
    targets: [
        .systemLibrary(name: "CInterop", path: "CInterop", pkgConfig: "p11-kit-1"),
        .target(name: "P11HA", dependencies: ["CInterop"], swiftSettings: leanRuntime),
        // -z nodelete: p11ha's threads (deadlines, recovery) may outlive C_Finalize, blocked in a member that
        // never answers; an application's dlclose must not unmap the code they will return to.
        .target(name: "P11HAModule", dependencies: ["P11HA", "CInterop"], swiftSettings: leanRuntime,
                linkerSettings: [.unsafeFlags(["-Xlinker", "-z", "-Xlinker", "nodelete"])]),
        // Operators' work (domain, sync, diagnostics): in p11hactl only, never in libp11ha.so.
        .target(name: "P11HAAdmin", dependencies: ["P11HA", "CInterop"]),
        .executableTarget(
            name: "p11hactl",
            dependencies: ["P11HA", "P11HAAdmin", .product(name: "ArgumentParser", package: "swift-argument-parser")]),
        // Drives the real C ABI of libp11ha.so from a separate process, one scenario per run.
        .executableTarget(name: "p11ha-scenario", dependencies: ["CInterop"], path: "Tests/ScenarioDriver"),
        // An in-process fake token for the core's fast tests and simulations; not part of libp11ha.so.
        .target(name: "P11HAFake", dependencies: ["P11HA", "CInterop"]),
        .testTarget(name: "P11HATests", dependencies: ["P11HA", "P11HAAdmin", "P11HAFake"]),
        .testTarget(name: "IntegrationTests", dependencies: ["p11ha-scenario"]),
    ]
)
