// The Linux calls of CBlockIO.h that need _GNU_SOURCE, compiled here so the header need not define it.
#define _GNU_SOURCE
#include "CBlockIO.h"

#include <fcntl.h>
#include <unistd.h>
#include <linux/falloc.h>
#include <malloc.h>
#include <sys/ioctl.h>
#include <sys/sysmacros.h>
#include <linux/fs.h>

const int CBlockIO_FALLOC_KEEP_SIZE = FALLOC_FL_KEEP_SIZE;
const int CBlockIO_FALLOC_PUNCH_HOLE = FALLOC_FL_PUNCH_HOLE;
const int CBlockIO_FALLOC_ZERO_RANGE = FALLOC_FL_ZERO_RANGE;
const int CBlockIO_SEEK_DATA = SEEK_DATA;
const int CBlockIO_SEEK_HOLE = SEEK_HOLE;
const int CBlockIO_O_DIRECT = O_DIRECT;
const int CBlockIO_M_MMAP_THRESHOLD = M_MMAP_THRESHOLD;
const int CBlockIO_M_TRIM_THRESHOLD = M_TRIM_THRESHOLD;

int CBlockIO_fallocate(int fd, int mode, long long offset, long long length) {
    return fallocate(fd, mode, (off_t)offset, (off_t)length);
}

int CBlockIO_mallopt(int parameter, int value) { return mallopt(parameter, value); }

int CBlockIO_freeze(int fd) {
    int unused = 0;
    return ioctl(fd, FIFREEZE, &unused);
}

int CBlockIO_thaw(int fd) {
    int unused = 0;
    return ioctl(fd, FITHAW, &unused);
}

int CBlockIO_syncfs(int fd) { return syncfs(fd); }

unsigned CBlockIO_major(unsigned long long device) { return major(device); }

unsigned CBlockIO_minor(unsigned long long device) { return minor(device); }

int CBlockIO_pipe_cloexec(int fds[2]) { return pipe2(fds, O_CLOEXEC); }

int CBlockIO_spawn_addclosefrom(posix_spawn_file_actions_t *actions, int low) {
    return posix_spawn_file_actions_addclosefrom_np(actions, low);
}

int CBlockIO_ofd_read_lock(int fd, long long byte) {
    struct flock lock = {.l_type = F_RDLCK, .l_whence = SEEK_SET, .l_start = (off_t)byte, .l_len = 1};
    return fcntl(fd, F_OFD_SETLK, &lock);
}

int CBlockIO_ofd_locked_elsewhere(int fd, long long byte) {
    // A write lock conflicts with any lock on the byte; the kernel reports one held through another open file
    // description (ours never conflict with themselves). l_pid must be 0 for the OFD commands.
    struct flock lock = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = (off_t)byte, .l_len = 1};
    if (fcntl(fd, F_OFD_GETLK, &lock) != 0) return -1;
    return lock.l_type != F_UNLCK;
}
