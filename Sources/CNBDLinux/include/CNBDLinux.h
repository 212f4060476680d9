// The kernel NBD driver's generic netlink interface (family "nbd", <linux/nbd-netlink.h>): connect a
// device to sockets that are already past the NBD handshake, reconfigure it (new sockets after the old
// ones died), disconnect it, ask whether it is connected. Imported only by Sources/VDiskBus/KernelNBD.swift.
//
// Every function returns 0 (or a non-negative value) on success and -errno on failure. Replies from the
// kernel are checked for length and framing before any field is read.
#ifndef CNBDLINUX_H
#define CNBDLINUX_H

#include <stdint.h>

/// What NBD_CMD_CONNECT and NBD_CMD_RECONFIGURE carry. Zero / NULL fields are left out of the message
/// (except `index` with `has_index`).
typedef struct {
    uint32_t index;
    int has_index;
    uint64_t size_bytes;
    uint64_t block_size;
    uint64_t server_flags;
    /// NBD_ATTR_TIMEOUT in seconds; sent when `has_timeout` (0 turns the I/O timeout off).
    uint64_t timeout;
    int has_timeout;
    /// NBD_ATTR_DEAD_CONN_TIMEOUT in seconds: how long requests wait for a new socket after one died.
    uint64_t dead_connection_timeout;
    const int32_t *sockets;
    int32_t socket_count;
    /// NBD_ATTR_BACKEND_IDENTIFIER (shown in /sys/block/nbdN/backend; RECONFIGURE refuses a mismatch).
    const char *backend;
} CNBDLinux_config;

/// A generic netlink socket (close it with close(2)) with `timeout_seconds` on every reply.
int CNBDLinux_open(int timeout_seconds);

/// The id of the "nbd" family, or -ENOENT where the kernel has no NBD driver.
int CNBDLinux_family(int fd);

/// NBD_CMD_CONNECT; `*index` receives the device the kernel chose (or the one asked for).
int CNBDLinux_connect(int fd, int family, const CNBDLinux_config *config, uint32_t *index);

/// NBD_CMD_RECONFIGURE of `config->index`.
int CNBDLinux_reconfigure(int fd, int family, const CNBDLinux_config *config);

/// NBD_CMD_DISCONNECT of a device.
int CNBDLinux_disconnect(int fd, int family, uint32_t index);

/// NBD_CMD_STATUS of one device: 1 connected, 0 not, or -errno.
int CNBDLinux_status(int fd, int family, uint32_t index);

#endif
