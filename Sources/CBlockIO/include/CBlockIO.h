// Linux calls that Swift's Glibc module hides behind _GNU_SOURCE or leaves out, and CRC32C. Imported only by
// Sources/BlockIO/FileDevice.swift, Sources/BlockIO/CRC32C.swift, (mallopt) Sources/vdisk/AllocatorTuning.swift,
// (freeze, syncfs, device numbers) Sources/VDiskBus/Mounts.swift and (spawning) Sources/VDiskBus/Subprocess.swift.
//
// This header includes system headers under the default feature macros only, as Swift's Glibc module does:
// a module that sees them with _GNU_SOURCE gets other definitions of the same structs (fd_set), which clang
// refuses wherever both modules meet (nondeterministically, with a shared module cache). The calls that
// need _GNU_SOURCE are defined in linux.c.
#ifndef CBLOCKIO_H
#define CBLOCKIO_H

#include <stddef.h>
#include <stdint.h>
#include <spawn.h>

extern const int CBlockIO_FALLOC_KEEP_SIZE;
extern const int CBlockIO_FALLOC_PUNCH_HOLE;
extern const int CBlockIO_FALLOC_ZERO_RANGE;
extern const int CBlockIO_SEEK_DATA;
extern const int CBlockIO_SEEK_HOLE;
extern const int CBlockIO_O_DIRECT;
extern const int CBlockIO_M_MMAP_THRESHOLD;
extern const int CBlockIO_M_TRIM_THRESHOLD;

int CBlockIO_fallocate(int fd, int mode, long long offset, long long length);
int CBlockIO_mallopt(int parameter, int value);

/// Updates a running CRC32C (start with 0xFFFFFFFF, invert at the end) with `length` bytes.
uint32_t CBlockIO_crc32c(uint32_t crc, const void *data, size_t length);
/// The table-driven CRC32C, whatever the CPU (to check the hardware path against).
uint32_t CBlockIO_crc32c_portable(uint32_t crc, const void *data, size_t length);
/// Whether the CPU's crc32 instruction is used.
int CBlockIO_crc32c_is_hardware(void);

/// FIFREEZE / FITHAW on a file of the file system (its mountpoint): what fsfreeze(8) does.
int CBlockIO_freeze(int fd);
int CBlockIO_thaw(int fd);
int CBlockIO_syncfs(int fd);
unsigned CBlockIO_major(unsigned long long device);
unsigned CBlockIO_minor(unsigned long long device);

/// A pipe whose ends are close-on-exec from the start (no other thread's spawn can inherit them).
int CBlockIO_pipe_cloexec(int fds[2]);

/// Closes every descriptor from `low` up in the spawned child (glibc 2.34+).
int CBlockIO_spawn_addclosefrom(posix_spawn_file_actions_t *actions, int low);

/// Takes a shared open-file-description lock on one byte (F_OFD_SETLK, F_RDLCK), as qemu's image locking does.
int CBlockIO_ofd_read_lock(int fd, long long byte);
/// 1 when another open file description holds a lock on `byte`, 0 when none does, -1 on error (errno).
int CBlockIO_ofd_locked_elsewhere(int fd, long long byte);

#endif
