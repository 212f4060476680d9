// Linux calls that Swift's Glibc module hides behind _GNU_SOURCE or leaves out, and CRC32C. Imported only by
// Sources/BlockIO/FileDevice.swift, Sources/BlockIO/CRC32C.swift, (mallopt) Sources/vdisk/AllocatorTuning.swift,
// (freeze, syncfs, device numbers) Sources/VDiskBus/Mounts.swift and (spawning) Sources/VDiskBus/Subprocess.swift.
#ifndef CBLOCKIO_H
#define CBLOCKIO_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <fcntl.h>
#include <unistd.h>
#include <linux/falloc.h>
#include <malloc.h>
#include <sys/ioctl.h>
#include <sys/sysmacros.h>
#include <linux/fs.h>
#include <spawn.h>

static const int CBlockIO_FALLOC_KEEP_SIZE = FALLOC_FL_KEEP_SIZE;
static const int CBlockIO_FALLOC_PUNCH_HOLE = FALLOC_FL_PUNCH_HOLE;
static const int CBlockIO_FALLOC_ZERO_RANGE = FALLOC_FL_ZERO_RANGE;
static const int CBlockIO_SEEK_DATA = SEEK_DATA;
static const int CBlockIO_SEEK_HOLE = SEEK_HOLE;
static const int CBlockIO_O_DIRECT = O_DIRECT;

static inline int CBlockIO_fallocate(int fd, int mode, long long offset, long long length) {
    return fallocate(fd, mode, (off_t)offset, (off_t)length);
}

static const int CBlockIO_M_MMAP_THRESHOLD = M_MMAP_THRESHOLD;
static const int CBlockIO_M_TRIM_THRESHOLD = M_TRIM_THRESHOLD;

static inline int CBlockIO_mallopt(int parameter, int value) {
    return mallopt(parameter, value);
}

#include <stddef.h>
#include <stdint.h>

/// Updates a running CRC32C (start with 0xFFFFFFFF, invert at the end) with `length` bytes.
uint32_t CBlockIO_crc32c(uint32_t crc, const void *data, size_t length);
/// The table-driven CRC32C, whatever the CPU (to check the hardware path against).
uint32_t CBlockIO_crc32c_portable(uint32_t crc, const void *data, size_t length);
/// Whether the CPU's crc32 instruction is used.
int CBlockIO_crc32c_is_hardware(void);

/// FIFREEZE / FITHAW on a file of the file system (its mountpoint): what fsfreeze(8) does.
static inline int CBlockIO_freeze(int fd) {
    int unused = 0;
    return ioctl(fd, FIFREEZE, &unused);
}

static inline int CBlockIO_thaw(int fd) {
    int unused = 0;
    return ioctl(fd, FITHAW, &unused);
}

static inline int CBlockIO_syncfs(int fd) {
    return syncfs(fd);
}

static inline unsigned CBlockIO_major(unsigned long long device) {
    return major(device);
}

static inline unsigned CBlockIO_minor(unsigned long long device) {
    return minor(device);
}

/// A pipe whose ends are close-on-exec from the start (no other thread's spawn can inherit them).
static inline int CBlockIO_pipe_cloexec(int fds[2]) {
    return pipe2(fds, O_CLOEXEC);
}

/// Closes every descriptor from `low` up in the spawned child (glibc 2.34+).
static inline int CBlockIO_spawn_addclosefrom(posix_spawn_file_actions_t *actions, int low) {
    return posix_spawn_file_actions_addclosefrom_np(actions, low);
}

#endif
