import BlockIO
import NBDProtocol

// Design notes
// ------------
// Validate first, then execute: every request is checked against the negotiated session before any device
// call, so a device only ever sees in-range, well-formed work and the error a client gets does not depend
// on which device sits behind the export. The order of the checks decides which error wins when several
// apply (after nbdkit's `validate_request`, with the codes of proto.md's "Error values"):
//
//   1. unknown command                                  EINVAL
//   2. write-side command on a read-only export         EPERM
//   3. flag not allowed for the command                 EINVAL  (FUA is allowed on every command once
//                                                                 SEND_FUA is offered; FAST_ZERO needs
//                                                                 SEND_FAST_ZERO)
//   4. command the export did not offer                 EINVAL  (TRIM, WRITE_ZEROES, FLUSH)
//   5. READ longer than 32 MiB                          EOVERFLOW
//      WRITE longer than 32 MiB                         EINVAL  (the payload was skipped by the decoder;
//                                                                 EOVERFLOW is only for payload-less
//                                                                 commands and DF reads)
//   6. zero length (not FLUSH)                          EINVAL
//   7. range past the end                               ENOSPC for WRITE and WRITE_ZEROES, EINVAL otherwise
//   8. BLOCK_STATUS without a metadata context          EINVAL
//
// Device failures are translated by `nbdErrorCode(for:in:)`, the one place where errors become NBD codes.

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
    let command = request.command
    var allowed: NBDCommandFlags
    let writes: Bool
    /// The transmission flag that offers the command, if it needs one.
    let offeredBy: NBDTransmissionFlags?
    switch command {
    case .read:
        (allowed, writes, offeredBy) = ([], false, nil)
    case .write:
        (allowed, writes, offeredBy) = ([], true, nil)
    case .trim:
        (allowed, writes, offeredBy) = ([], true, .sendTrim)
    case .writeZeroes:
        allowed = exportFlags.contains(.sendFastZero) ? [.noHole, .fastZero] : [.noHole]
        (writes, offeredBy) = (true, .sendWriteZeroes)
    case .flush:
        (allowed, writes, offeredBy) = ([], false, .sendFlush)
    case .cache:
        // Always offered; the spec also asks servers to accept it from clients that did not look.
        (allowed, writes, offeredBy) = ([], false, nil)
    case .blockStatus:
        (allowed, writes, offeredBy) = ([.reqOne], false, nil)
    case .disconnect:
        return nil
    default:
        return reject(.EINVAL, "unknown command \(command.rawValue)")
    }
    if writes && exportFlags.contains(.readOnly) {
        return reject(.EPERM, "the export is read-only")
    }
    // "NBD_CMD_FLAG_FUA ... is valid for all commands, provided NBD_FLAG_SEND_FUA has been negotiated, in
    // which case the server MUST accept all commands with this bit set" (proto.md, "Command flags").
    if exportFlags.contains(.sendFUA) { allowed.insert(.fua) }
    let unexpected = request.flags.subtracting(allowed)
    if !unexpected.isEmpty {
        return reject(.EINVAL, "flags 0x\(String(unexpected.rawValue, radix: 16)) are not valid for \(command)")
    }
    if let offeredBy, !exportFlags.contains(offeredBy) {
        return reject(.EINVAL, "the export does not offer \(command)")
    }
    if command == .read && request.length > NBDLimits.maximumPayload {
        return reject(.EOVERFLOW, "READ of \(request.length) bytes is over the 32 MiB limit")
    }
    if command == .write && (request.length > NBDLimits.maximumPayload || request.payloadDiscarded) {
        return reject(.EINVAL, "WRITE of \(request.length) bytes is over the 32 MiB limit")
    }
    if command == .flush { return nil }
    if request.length == 0 {
        return reject(.EINVAL, "\(command) with zero length")
    }
    let (end, overflow) = request.offset.addingReportingOverflow(UInt64(request.length))
    if overflow || end > session.export.size {
        // ENOSPC says "the disk is full" and is only right for commands that write data.
        let code: NBDErrorCode = command == .write || command == .writeZeroes ? .ENOSPC : .EINVAL
        return reject(code, "\(command) past the end of the export")
    }
    if command == .blockStatus && (session.metaContextIDs.isEmpty || !session.structuredReplies) {
        return reject(.EINVAL, "BLOCK_STATUS needs a metadata context (NBD_OPT_SET_META_CONTEXT)")
    }
    return nil
}

/// The one translation from a failure to the NBD error a client sees: errors that carry an errno go
/// through `NBDErrorCode(errno:)`; anything else is `EIO`. Two codes are narrowed to the commands the
/// spec reserves them for ("Error values"): `ENOTSUP` only answers a FAST_ZERO write-zeroes, and
/// `EOVERFLOW` only rejections made here (no device error is about a DF read); otherwise both are `EINVAL`.
/// - Parameters:
///   - error: what the device (or validation) threw.
///   - request: the request that failed.
public func nbdErrorCode(for error: any Error, in request: NBDRequest) -> NBDErrorCode {
    if let rejection = error as? NBDRequestRejection { return rejection.code }
    guard let error = error as? any ErrnoConvertible else { return .EIO }
    let code = NBDErrorCode(errno: error.errnoCode)
    switch code {
    case .ENOTSUP where !(request.command == .writeZeroes && request.flags.contains(.fastZero)): return .EINVAL
    case .EOVERFLOW: return .EINVAL
    default: return code
    }
}
