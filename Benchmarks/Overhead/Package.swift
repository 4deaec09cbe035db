// swift-tools-version: 6.1
// Benchmarks of p11ha's own cost per call (ordo-one/benchmark: time and allocations), over in-process fake members:
// a package of its own, so that the main package's build and CI do not fetch or build the benchmark library.
//   cd Benchmarks/Overhead && swift package benchmark
import PackageDescription

let package = Package(
    name: "p11ha-overhead",
    platforms: [.macOS(.v13)],
    dependencies: [
        .package(name: "p11ha", path: "../.."),
        .package(url: "https://github.com/ordo-one/benchmark", from: "1.38.1", traits: ["MallocInterposer"]),
    ],
    targets: [
        .executableTarget(
            name: "CoreCalls",
            dependencies: [
                .product(name: "Benchmark", package: "benchmark"),
                .product(name: "P11HACore", package: "p11ha"),
            ],
            path: "Benchmarks/CoreCalls",
            plugins: [.plugin(name: "BenchmarkPlugin", package: "benchmark")]
        ),
    ]
)
