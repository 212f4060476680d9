// Design notes
// ------------
// The layers of a backing chain as the tools that look at them see it (`vimg map`, NBD's
// `qemu:allocation-depth`): each VIMG or qcow2 level reports its own mapping, and what it leaves
// unallocated is answered by the level below; anything else (raw files, RAM disks, remote exports) is one
// layer that holds every byte, as qemu counts a raw file.
//
//   depth 1  clone.vimg   data  zero  unallocated ───────────────┐
//   depth 2  base.qcow2               data   unallocated ──┐     │
//   depth 3  base.raw                                      all   │  (past the end of the level below:
//   depth 0                                                      └─  nothing provides it, reads as zeroes)

import BlockIO
import VImage

extension ImageFormats {
    /// One level of a chain: its own mapping of a range, and the device below it.
    public struct ChainLayer {
        /// How the range maps in this level alone (`.unallocated` runs are the level below's business).
        public var runs: [VImage.MappingExtent]
        /// The backing device, if the level has one.
        public var backing: (any BlockDevice)?
        /// The backing file's path, for messages and `vimg map`.
        public var backingPath: String?
    }

    /// The layer `device` is for `offset ..< offset + count`, or nil for a device that is not a layered
    /// image (raw, RAM, remote): it holds every byte itself.
    public static func layer(of device: any BlockDevice, at offset: UInt64, count: UInt64) throws -> ChainLayer? {
        if let image = device as? VImage {
            return ChainLayer(
                runs: try image.mapping(at: offset, count: count),
                backing: image.backingDevice,
                backingPath: image.backingPath
            )
        }
        if let image = device as? Qcow2Image {
            return ChainLayer(
                runs: try image.mapping(at: offset, count: count),
                backing: image.backing,
                backingPath: image.backingPath
            )
        }
        return nil
    }

    /// A run of a device with the chain level that provides it.
    public struct DepthRun: Sendable, Hashable {
        public var offset: UInt64
        public var length: UInt64
        /// 1 for the device itself, 2 for its backing image, and so on; 0 where no level has the range
        /// (it reads as zeroes).
        public var depth: Int

        public init(offset: UInt64, length: UInt64, depth: Int) {
            self.offset = offset
            self.length = length
            self.depth = depth
        }
    }

    /// Which level of `device`'s backing chain provides each part of `offset ..< offset + count`: what
    /// NBD's `qemu:allocation-depth` context reports (qemu's numbering: zero clusters are allocated in their
    /// level, a device that is not a layered image has every byte at depth 1).
    /// - Returns: contiguous runs covering the range, neighbours with equal depth merged.
    public static func allocationDepth(
        of device: any BlockDevice,
        at offset: UInt64,
        count: UInt64
    ) throws
        -> [DepthRun]
    {
        try device.checkRange(offset: offset, count: count, operation: .extents)
        var result: [DepthRun] = []
        try collectDepth(device, depth: 1, offset: offset, count: count, into: &result)
        return result
    }

    /// Depth of `device` at `depth` in the chain; recursion is bounded by the chain's depth (at most 32).
    private static func collectDepth(
        _ device: any BlockDevice,
        depth: Int,
        offset: UInt64,
        count: UInt64,
        into result: inout [DepthRun]
    ) throws {
        func add(_ offset: UInt64, _ length: UInt64, _ depth: Int) {
            guard length > 0 else { return }
            if var last = result.last, last.depth == depth, last.offset + last.length == offset {
                last.length += length
                result[result.count - 1] = last
            } else {
                result.append(DepthRun(offset: offset, length: length, depth: depth))
            }
        }
        guard count > 0 else { return }
        guard let layer = try layer(of: device, at: offset, count: count) else {
            add(offset, count, depth)
            return
        }
        for run in layer.runs {
            guard run.kind == .unallocated else {
                add(run.offset, run.length, depth)
                continue
            }
            guard let backing = layer.backing else {
                add(run.offset, run.length, 0)
                continue
            }
            // A backing image shorter than this one: what lies past its end is nobody's (zeroes).
            let size = backing.size
            let inside = run.offset < size ? min(run.length, size - run.offset) : 0
            try collectDepth(backing, depth: depth + 1, offset: run.offset, count: inside, into: &result)
            add(run.offset + inside, run.length - inside, 0)
        }
    }
}
