import BlockIO
import NBDProtocol

// Design notes
// ------------
// Validate first, then execute: every request is checked against the negotiated session before any device
// call, so a device only ever sees in-range, well-formed work and the error a client gets does not depend
// on which device sits behind the export. The order of the checks decides which error wins when several
// apply; it follows nbdkit's `validate_request`:
//
//   1. unknown command                          EINVAL
//   2. flag not allowed for the command         EINVAL   (FAST_ZERO also needs the export to offer it)
//   3. write-side command on a read-only export EPERM
//   4. READ/WRITE longer than 32 MiB            EOVERFLOW (the WRITE payload was skipped by the decoder)
//   5. zero length (not FLUSH)                  EINVAL
//   6. range past the end                       ENOSPC for writes, EINVAL otherwise
//   7. BLOCK_STATUS without base:allocation     EINVAL
//
// Device failures are translated by `nbdErrorCode(for:)`, the one place where errors become NBD codes.

/// Why a request is refused before it reaches the device.
public struct NBDRequestRejection: Error, Sendable, Hashable {
    public var code: NBDErrorCode
    public var message: String
}

/// Checks a request against the session; nil means it may run.
/// - Parameters:
///   - request: the decoded request.
///   - session: what the handshake negotiated (export size and flags, structured replies, contexts).
/// - Returns: the rejection to send, or nil.
public func validate(_ request: NBDRequest, in session: NBDSession) -> NBDRequestRejection? {
    func reject(_ code: NBDErrorCode, _ message: String) -> NBDRequestRejection {
        NBDRequestRejection(code: code, message: message)
    }
    let exportFlags = session.export.flags
    let allowed: NBDCommandFlags
    let writes: Bool
    switch request.command {
    case .read:
        allowed = []
        writes = false
    case .write:
        allowed = [.fua]
        writes = true
    case .trim:
        allowed = [.fua]
        writes = true
    case .writeZeroes:
        allowed = exportFlags.contains(.sendFastZero) ? [.fua, .noHole, .fastZero] : [.fua, .noHole]
        writes = true
    case .flush, .cache:
        allowed = []
        writes = false
    case .blockStatus:
        allowed = [.reqOne]
        writes = false
    case .disconnect:
        return nil
    default:
        return reject(.EINVAL, "unknown command \(request.command.rawValue)")
    }
    let unexpected = request.flags.subtracting(allowed)
    if !unexpected.isEmpty {
        return reject(.EINVAL, "flags 0x\(String(unexpected.rawValue, radix: 16)) are not valid for \(request.command)")
    }
    if writes && exportFlags.contains(.readOnly) {
        return reject(.EPERM, "the export is read-only")
    }
    if (request.command == .read || request.command == .write)
        && (request.length > NBDLimits.maximumPayload || request.payloadDiscarded)
    {
        return reject(.EOVERFLOW, "\(request.command) of \(request.length) bytes is over the 32 MiB limit")
    }
    if request.command == .flush { return nil }
    if request.length == 0 {
        return reject(.EINVAL, "\(request.command) with zero length")
    }
    let (end, overflow) = request.offset.addingReportingOverflow(UInt64(request.length))
    if overflow || end > session.export.size {
        return reject(writes ? .ENOSPC : .EINVAL, "\(request.command) past the end of the export")
    }
    if request.command == .blockStatus && (session.baseAllocationContextID == nil || !session.structuredReplies) {
        return reject(.EINVAL, "BLOCK_STATUS needs the base:allocation context")
    }
    return nil
}

/// The one translation from a failure to the NBD error a client sees: errors that carry an errno go
/// through `NBDErrorCode(errno:)`; anything else is `EIO`.
public func nbdErrorCode(for error: any Error) -> NBDErrorCode {
    if let rejection = error as? NBDRequestRejection { return rejection.code }
    if let error = error as? any ErrnoConvertible { return NBDErrorCode(errno: error.errnoCode) }
    return .EIO
}
