import ArgumentParser
import BlockIO
import ImageFormats
import VImage

extension Vimg {
    struct Check: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Check an image's metadata for leaks and corruption.",
            discussion: """
                Exit codes (as qemu-img check): 0 no problems, 1 the check could not complete,
                2 corruptions found, 3 only leaked clusters found. With -r, the codes describe the image
                after the repair.

                -r leaks frees leaked clusters. -r all also drops references that cannot be trusted and
                rebuilds every refcount from the references; it clears the corrupt and dirty bits.
                --dry-run prints what -r would do and changes nothing.

                With checksums (-o checksums=on) the check also verifies every metadata block. --repair-from OTHER
                first scrubs the data and rewrites each block that fails its checksum from OTHER (a replica or
                backup of the same disk, any format) when OTHER's copy matches the checksum; blocks it cannot
                repair are listed and the exit code is 2.
                """.reflowedHelp
        )

        @OptionGroup var output: OutputOptions

        @Option(name: .customShort("r"), help: "Repair: leaks or all.")
        var repair: RepairMode?

        @Flag(help: "With -r: print the repair plan, change nothing.")
        var dryRun = false

        @Option(help: "Rewrite blocks that fail their checksum from this image of the same disk.")
        var repairFrom: String?

        @Argument(help: "The image file.")
        var file: String

        func run() throws {
            var code: Int32 = 0
            try runReportingErrors {
                var report: CheckReport
                var repairActions: [String]? = nil
                let kind = try ImageFormats.probe(path: file)
                var unrepaired = 0
                if let repairFrom {
                    unrepaired = try repairBlocks(from: repairFrom)
                }
                if kind == .qcow2 && repair == nil {
                    report = try ImageFormats.check(path: file)
                } else if let repair {
                    let result = try ImageFormats.repair(path: file, mode: repair, dryRun: dryRun)
                    repairActions = result.actions
                    report = result.after
                    if output.format == .human {
                        for action in result.actions { print(dryRun ? "Plan: \(action)" : "Repaired: \(action)") }
                        if !result.actions.isEmpty { print("") }
                        if !dryRun && result.before.corruptions + result.before.leaks > 0 {
                            print("The following inconsistencies were found and repaired:\n")
                            print("    \(result.before.leaks) leaked clusters")
                            print("    \(result.before.corruptions) corruptions\n")
                            print("Double checking the fixed image now...")
                        }
                    }
                } else {
                    report = try ImageFormats.check(path: file)
                }
                if output.format == .json {
                    var fields: [(String, JSON)] = [
                        ("image-end-offset", .uint(report.imageEndOffset)),
                        ("total-clusters", .uint(report.totalClusters)),
                        ("check-errors", .int(Int64(report.checkErrors))),
                    ]
                    if report.leaks > 0 { fields.append(("leaks", .int(Int64(report.leaks)))) }
                    if report.corruptions > 0 { fields.append(("corruptions", .int(Int64(report.corruptions)))) }
                    fields += [
                        ("allocated-clusters", .uint(report.allocatedClusters)),
                        ("filename", .string(file)), ("format", .string(kind.rawValue)),
                        ("fragmented-clusters", .uint(report.fragmentedClusters)),
                        ("compressed-clusters", .uint(report.compressedClusters)),
                        ("dirty-flag", .bool(report.isDirty)),
                        (
                            "findings",
                            .array(
                                report.findings.map { f in
                                    var item: [(String, JSON)] = [
                                        ("kind", .string(f.kind)), ("severity", .string(f.severity.rawValue)),
                                        ("message", .string(f.message)),
                                    ]
                                    if let offset = f.hostOffset { item.append(("offset", .uint(offset))) }
                                    return .object(item)
                                }
                            )
                        ),
                    ]
                    if let reason = report.incompleteReason { fields.append(("error", .string(reason))) }
                    if let repairActions {
                        fields.append((dryRun ? "repair-plan" : "repairs", .array(repairActions.map { .string($0) })))
                    }
                    print(JSON.object(fields).render())
                } else {
                    printHuman(report)
                }
                code = report.exitCode == 0 && unrepaired > 0 ? 2 : report.exitCode
            }
            if code != 0 { throw ExitCode(code) }
        }

        func validate() throws {
            if dryRun && repair == nil { throw ValidationError("--dry-run goes with -r leaks or -r all") }
            if dryRun && repairFrom != nil { throw ValidationError("--dry-run does not go with --repair-from") }
        }

        /// Scrubs the image and rewrites bad data blocks from `other`; returns the blocks left bad.
        func repairBlocks(from other: String) throws -> Int {
            let image = try ImageFormats.openVImage(path: file, readOnly: false)
            defer { try? image.close() }
            guard image.hasChecksums else {
                throw VImageError(
                    .unsupportedFeature,
                    path: file,
                    message: "--repair-from needs an image with checksums"
                )
            }
            let source = try ImageFormats.open(path: other, readOnly: true)
            defer { try? source.close() }
            guard source.size == image.size else {
                throw VImageError(
                    .invalidArgument,
                    path: other,
                    message: "the image to repair from is \(source.size) bytes, not \(image.size): not the same disk"
                )
            }
            let scrub = try image.scrub()
            let results = try image.repair(scrub.findings, from: source)
            try image.close()
            var left = 0
            for result in results {
                let what = Scrub.describe(result.finding)
                if let failure = result.failure {
                    left += 1
                    if output.format == .human { print("Cannot repair: \(what): \(failure)") }
                } else if output.format == .human {
                    print("Repaired from \(other): \(what)")
                }
            }
            if output.format == .human && !results.isEmpty { print("") }
            return left
        }

        func printHuman(_ r: CheckReport) {
            for f in r.findings {
                switch f.severity {
                case .corruption: print("ERROR \(f.message)")
                case .leak: print("Leaked: \(f.message)")
                case .info: print("Note: \(f.message)")
                }
            }
            if r.findings.count < r.corruptions + r.leaks {
                print("(\(r.corruptions + r.leaks - r.findings.count) more findings not shown)")
            }
            if let reason = r.incompleteReason {
                print("\nThe check could not complete: \(reason)")
                return
            }
            if r.corruptions > 0 {
                print("\n\(r.corruptions) errors were found on the image.")
                print("Data may be corrupted, or further writes to the image may corrupt it.")
            }
            if r.leaks > 0 {
                print("\n\(r.leaks) leaked clusters were found on the image.")
                print("This means waste of disk space, but no harm to data.")
            }
            if r.corruptions == 0 && r.leaks == 0 { print("No errors were found on the image.") }
            // As qemu-img prints them: fragmented and compressed are shares of the allocated clusters.
            func pct(_ n: UInt64, of total: UInt64) -> String {
                guard total > 0 else { return "0.00" }
                let hundredths = (n * 10000 + total / 2) / total
                let frac = hundredths % 100
                return "\(hundredths / 100).\(frac < 10 ? "0" : "")\(frac)"
            }
            let allocated = pct(r.allocatedClusters, of: r.totalClusters)
            let fragmented = pct(r.fragmentedClusters, of: r.allocatedClusters)
            let compressed = pct(r.compressedClusters, of: r.allocatedClusters)
            if r.totalClusters > 0 && r.allocatedClusters > 0 {
                print(
                    "\(r.allocatedClusters)/\(r.totalClusters) = \(allocated)% allocated, \(fragmented)% fragmented, \(compressed)% compressed clusters"
                )
            }
            if r.imageEndOffset > 0 { print("Image end offset: \(r.imageEndOffset)") }
        }
    }
}
