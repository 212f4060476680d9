// Placeholder entry point; replaced by the real vdisk command.
@main struct VdiskPlaceholder { static func main() {} }
