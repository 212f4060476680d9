// swift-tools-version: 6.0
import PackageDescription

// The target list is the architecture (README.md, "Layout"): lower targets never import higher ones.
let package = Package(
    name: "vdisk",
    platforms: [.macOS(.v15)],
    products: [
        .library(name: "BlockIO", targets: ["BlockIO"]),
        .library(name: "VImage", targets: ["VImage"]),
        .library(name: "ImageFormats", targets: ["ImageFormats"]),
        .library(name: "NBDProtocol", targets: ["NBDProtocol"]),
        .library(name: "NBDServer", targets: ["NBDServer"]),
        .library(name: "NBDClient", targets: ["NBDClient"]),
        .library(name: "RBD", targets: ["RBD"]),
        .library(name: "CrashSim", targets: ["CrashSim"]),
        .executable(name: "vimg", targets: ["vimg"]),
        .executable(name: "vdisk", targets: ["vdisk"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-nio", from: "2.80.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.6.0"),
        .package(url: "https://github.com/apple/swift-nio-ssl", from: "2.27.0"),
    ],
    targets: [
        .target(name: "CBlockIO"),
        // The kernel NBD driver's generic netlink interface (<linux/nbd-netlink.h>), for the bus's /dev/nbdN.
        .target(name: "CNBDLinux"),
        .systemLibrary(name: "CLZ4", pkgConfig: "liblz4", providers: [.apt(["liblz4-dev"])]),
        .systemLibrary(name: "CZlib", pkgConfig: "zlib", providers: [.apt(["zlib1g-dev"])]),
        .systemLibrary(name: "CZstd", pkgConfig: "libzstd", providers: [.apt(["libzstd-dev"])]),
        .systemLibrary(name: "CFUSE", pkgConfig: "fuse3", providers: [.apt(["libfuse3-dev"])]),
        // The NBD client's TLS: it is synchronous, and swift-nio-ssl only works inside NIO.
        .systemLibrary(name: "COpenSSL", pkgConfig: "openssl", providers: [.apt(["libssl-dev"])]),
        // librados + librbd; Debian ships no pkg-config files for them, so the module map links them.
        .systemLibrary(name: "CRBD", providers: [.apt(["librados-dev", "librbd-dev"])]),
        .target(name: "BlockIO", dependencies: ["CBlockIO"]),
        .target(name: "RBD", dependencies: ["BlockIO", "CRBD"]),
        .target(
            name: "VImage",
            dependencies: ["BlockIO", "CLZ4", "CZlib", "CZstd"],
            // Metadata state is only touched under the engine's lock; the runtime exclusivity checks cost
            // about a tenth of a small read in release builds (debug builds keep them).
            swiftSettings: [.unsafeFlags(["-enforce-exclusivity=unchecked"], .when(configuration: .release))]
        ),
        .target(name: "ImageFormats", dependencies: ["BlockIO", "VImage", "RBD", "CZlib", "CZstd"]),
        .target(
            name: "NBDProtocol",
            dependencies: [.product(name: "NIOCore", package: "swift-nio")]
        ),
        .target(
            name: "NBDServer",
            dependencies: [
                "NBDProtocol", "BlockIO", "VImage",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOTLS", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .target(
            name: "NBDClient",
            dependencies: ["NBDProtocol", "BlockIO", "COpenSSL", .product(name: "NIOCore", package: "swift-nio")]
        ),
        .target(name: "FUSEExport", dependencies: ["CFUSE", "BlockIO"]),
        // Power cuts and write logs for plugged disks: BlockDevice wrappers, the log format, replay.
        .target(name: "CCrashSim"),
        .target(name: "CrashSim", dependencies: ["BlockIO", "VImage", "ImageFormats", "CCrashSim"]),
        .target(
            name: "VDiskBus",
            dependencies: [
                "BlockIO", "CBlockIO", "VImage", "ImageFormats", "RBD", "FUSEExport", "CNBDLinux", "CrashSim",
            ]
        ),
        .target(name: "VImageTestSupport", dependencies: ["BlockIO", "VImage"]),
        .executableTarget(
            name: "vimg",
            dependencies: [
                "BlockIO", "VImage", "ImageFormats", "RBD", "CrashSim",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        .executableTarget(
            name: "vdisk",
            dependencies: [
                "CBlockIO", "BlockIO", "VImage", "ImageFormats", "RBD", "NBDServer", "NBDClient", "FUSEExport",
                "VDiskBus", "CrashSim",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .executableTarget(
            name: "vimg-bench",
            dependencies: ["BlockIO", "VImage", "ImageFormats"],
            path: "Benchmarks/vimg-bench"
        ),
        // Writes Fixtures/corrupt and the fuzz seed corpus (Tools/make-fixtures.sh).
        .executableTarget(
            name: "vimg-fixtures",
            dependencies: ["BlockIO", "VImage", "VImageTestSupport"],
            path: "Tools/vimg-fixtures"
        ),
        .testTarget(name: "BlockIOTests", dependencies: ["BlockIO", "VImageTestSupport"]),
        .testTarget(name: "VImageTests", dependencies: ["VImage", "ImageFormats", "BlockIO", "VImageTestSupport"]),
        .testTarget(
            name: "NBDProtocolTests",
            dependencies: [
                "NBDProtocol", "NBDServer", "BlockIO", "VImageTestSupport",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOEmbedded", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOTLS", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
            ]
        ),
        .testTarget(
            name: "NBDClientTests",
            dependencies: [
                "NBDClient", "NBDServer", "NBDProtocol", "BlockIO", "VImageTestSupport",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .testTarget(name: "FUSEExportTests", dependencies: ["FUSEExport", "BlockIO", "VImageTestSupport"]),
        .testTarget(
            name: "ImageFormatsTests",
            dependencies: ["ImageFormats", "VImage", "BlockIO", "VImageTestSupport"]
        ),
        .testTarget(name: "VDiskBusTests", dependencies: ["VDiskBus", "VImageTestSupport"]),
        .testTarget(name: "RBDTests", dependencies: ["RBD", "BlockIO", "VImageTestSupport"]),
        .testTarget(
            name: "CLITests",
            dependencies: ["VImage", "ImageFormats", "RBD", "BlockIO", "VImageTestSupport"]
        ),
        .testTarget(
            name: "CrashSimTests",
            dependencies: ["CrashSim", "CCrashSim", "BlockIO", "VImage", "ImageFormats", "VImageTestSupport"]
        ),
    ],
    swiftLanguageModes: [.v6]
)
