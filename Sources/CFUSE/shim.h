// libfuse3's high-level API (Debian libfuse3-dev), reached only through Sources/FUSEExport.
#define FUSE_USE_VERSION 31
#include <fuse.h>

// Loop-device ioctls for FUSEExport's `LoopDevice`. `ioctl` is variadic, which Swift cannot call, so each
// request gets a tiny wrapper. Every function returns 0 (or a result >= 0) on success and -errno on failure.
#include <errno.h>
#include <fcntl.h>
#include <linux/loop.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

/// LOOP_CTL_GET_FREE on /dev/loop-control: the index of a free loop device (created if needed), or -errno.
static inline int cfuse_loop_get_free(void) {
    int control = open("/dev/loop-control", O_RDWR | O_CLOEXEC);
    if (control < 0) return -errno;
    int index = ioctl(control, LOOP_CTL_GET_FREE);
    int error = errno;
    close(control);
    return index < 0 ? -error : index;
}

/// Binds `backing_fd` to the loop device open as `loop_fd` with LOOP_CONFIGURE (Linux 5.8+), falling back
/// to LOOP_SET_FD + LOOP_SET_STATUS64 (+ LOOP_SET_DIRECT_IO) on kernels that do not know it. Autoclear and
/// partition scanning stay off: the caller detaches explicitly. With `read_only`, the backing file should be
/// open read-only too (the fallback derives read-only from the file's mode).
static inline int cfuse_loop_configure(int loop_fd, int backing_fd, int read_only, int direct_io,
                                       int partition_scan, const char *name) {
    struct loop_config config;
    memset(&config, 0, sizeof config);
    config.fd = (__u32)backing_fd;
    config.info.lo_flags = (read_only ? LO_FLAGS_READ_ONLY : 0) | (direct_io ? LO_FLAGS_DIRECT_IO : 0) |
                           (partition_scan ? LO_FLAGS_PARTSCAN : 0);
    strncpy((char *)config.info.lo_file_name, name, LO_NAME_SIZE - 1);
    if (ioctl(loop_fd, LOOP_CONFIGURE, &config) == 0) return 0;
    if (errno != EINVAL && errno != ENOTTY) return -errno;
    // Old kernels answer an unknown loop ioctl with EINVAL (or ENOTTY). A device that is already bound
    // answers LOOP_SET_FD with EBUSY, which the caller retries on another device.
    if (ioctl(loop_fd, LOOP_SET_FD, backing_fd) < 0) return -errno;
    struct loop_info64 info = config.info;
    info.lo_flags = partition_scan ? LO_FLAGS_PARTSCAN : 0;  // the settable flags
    if (ioctl(loop_fd, LOOP_SET_STATUS64, &info) < 0) {
        int error = errno;
        ioctl(loop_fd, LOOP_CLR_FD, 0);
        return -error;
    }
    if (direct_io) ioctl(loop_fd, LOOP_SET_DIRECT_IO, 1UL);  // best effort, as losetup --direct-io does
    return 0;
}

/// LOOP_CLR_FD: unbinds the loop device open as `loop_fd` (deferred by the kernel until its last close).
static inline int cfuse_loop_clear(int loop_fd) {
    return ioctl(loop_fd, LOOP_CLR_FD, 0) < 0 ? -errno : 0;
}
