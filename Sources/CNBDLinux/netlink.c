// Generic netlink for the NBD driver, written against <linux/netlink.h>, <linux/genetlink.h> and
// <linux/nbd-netlink.h>. A message is built in one fixed buffer; a reply is walked message by message and
// attribute by attribute, each length checked against what is left before it is used.
#define _GNU_SOURCE
#include "CNBDLinux.h"

#include <errno.h>
#include <linux/genetlink.h>
#include <linux/nbd-netlink.h>
#include <linux/netlink.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#define BUFFER_SIZE 8192

typedef struct {
    uint8_t bytes[BUFFER_SIZE];
    size_t length;
    int overflow;
} message;

static struct nlmsghdr *header(message *m) { return (struct nlmsghdr *)m->bytes; }

static void start(message *m, uint16_t type, uint8_t command) {
    memset(m->bytes, 0, NLMSG_HDRLEN + GENL_HDRLEN);
    struct nlmsghdr *h = header(m);
    h->nlmsg_type = type;
    h->nlmsg_flags = NLM_F_REQUEST | NLM_F_ACK;
    struct genlmsghdr *g = (struct genlmsghdr *)(m->bytes + NLMSG_HDRLEN);
    g->cmd = command;
    g->version = NBD_GENL_VERSION;
    m->length = NLMSG_HDRLEN + GENL_HDRLEN;
    m->overflow = 0;
}

/// Appends one attribute; returns its offset (for nesting), or 0 when the buffer is full.
static size_t put(message *m, uint16_t type, const void *data, size_t size) {
    size_t total = NLA_HDRLEN + size;
    if (m->length + NLA_ALIGN(total) > BUFFER_SIZE) {
        m->overflow = 1;
        return 0;
    }
    size_t offset = m->length;
    struct nlattr *a = (struct nlattr *)(m->bytes + offset);
    a->nla_type = type;
    a->nla_len = (uint16_t)total;
    if (size) memcpy(m->bytes + offset + NLA_HDRLEN, data, size);
    memset(m->bytes + offset + total, 0, NLA_ALIGN(total) - total);
    m->length += NLA_ALIGN(total);
    return offset;
}

static void put_u32(message *m, uint16_t type, uint32_t value) { put(m, type, &value, sizeof value); }
static void put_u64(message *m, uint16_t type, uint64_t value) { put(m, type, &value, sizeof value); }

static size_t begin_nest(message *m, uint16_t type) { return put(m, type | NLA_F_NESTED, NULL, 0); }

static void end_nest(message *m, size_t offset) {
    if (m->overflow) return;
    struct nlattr *a = (struct nlattr *)(m->bytes + offset);
    a->nla_len = (uint16_t)(m->length - offset);
}

/// Walks the attributes in [data, data + size): calls `visit` with each one whose length is sane.
typedef void (*visitor)(uint16_t type, const uint8_t *payload, size_t size, void *context);

static void each_attribute(const uint8_t *data, size_t size, visitor visit, void *context) {
    size_t offset = 0;
    while (size - offset >= NLA_HDRLEN) {
        const struct nlattr *a = (const struct nlattr *)(data + offset);
        if (a->nla_len < NLA_HDRLEN || a->nla_len > size - offset) return;
        visit(a->nla_type & NLA_TYPE_MASK, data + offset + NLA_HDRLEN, a->nla_len - NLA_HDRLEN, context);
        size_t step = NLA_ALIGN(a->nla_len);
        if (step > size - offset) return;
        offset += step;
    }
}

/// Sends `m`, then reads replies until the kernel's acknowledgement. Each reply of type `family` is
/// handed to `visit` (its attributes). Returns 0 or the kernel's -errno.
static int transact(int fd, message *m, uint16_t family, visitor visit, void *context) {
    if (m->overflow) return -EMSGSIZE;
    static uint32_t next_sequence = 1;
    struct nlmsghdr *h = header(m);
    h->nlmsg_len = (uint32_t)m->length;
    h->nlmsg_seq = __atomic_fetch_add(&next_sequence, 1, __ATOMIC_RELAXED);
    uint32_t sequence = h->nlmsg_seq;
    struct sockaddr_nl kernel = {.nl_family = AF_NETLINK};
    ssize_t sent;
    do {
        sent = sendto(fd, m->bytes, m->length, 0, (struct sockaddr *)&kernel, sizeof kernel);
    } while (sent < 0 && errno == EINTR);
    if (sent < 0) return -errno;
    if ((size_t)sent != m->length) return -EIO;

    static _Thread_local uint8_t reply[BUFFER_SIZE * 4];
    for (;;) {
        ssize_t n = recv(fd, reply, sizeof reply, 0);
        if (n < 0) {
            if (errno == EINTR) continue;
            return errno == EAGAIN || errno == EWOULDBLOCK ? -ETIMEDOUT : -errno;
        }
        size_t left = (size_t)n;
        const uint8_t *p = reply;
        while (left >= NLMSG_HDRLEN) {
            const struct nlmsghdr *r = (const struct nlmsghdr *)p;
            if (r->nlmsg_len < NLMSG_HDRLEN || r->nlmsg_len > left) return -EPROTO;
            if (r->nlmsg_seq == sequence) {
                if (r->nlmsg_type == NLMSG_ERROR) {
                    if (r->nlmsg_len < NLMSG_HDRLEN + sizeof(struct nlmsgerr)) return -EPROTO;
                    const struct nlmsgerr *e = (const struct nlmsgerr *)(p + NLMSG_HDRLEN);
                    return e->error > 0 ? -EPROTO : e->error;  // 0 is the acknowledgement
                }
                if (r->nlmsg_type == NLMSG_DONE) return 0;
                if (r->nlmsg_type == family && visit && r->nlmsg_len >= NLMSG_HDRLEN + GENL_HDRLEN) {
                    size_t body = NLMSG_HDRLEN + GENL_HDRLEN;
                    each_attribute(p + body, r->nlmsg_len - body, visit, context);
                }
            }
            size_t step = NLMSG_ALIGN(r->nlmsg_len);
            if (step >= left) break;
            p += step;
            left -= step;
        }
    }
}

int CNBDLinux_open(int timeout_seconds) {
    int fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_GENERIC);
    if (fd < 0) return -errno;
    struct timeval timeout = {.tv_sec = timeout_seconds > 0 ? timeout_seconds : 10};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof timeout);
    struct sockaddr_nl local = {.nl_family = AF_NETLINK};
    if (bind(fd, (struct sockaddr *)&local, sizeof local) != 0) {
        int e = errno;
        close(fd);
        return -e;
    }
    return fd;
}

static void family_id(uint16_t type, const uint8_t *payload, size_t size, void *context) {
    if (type == CTRL_ATTR_FAMILY_ID && size >= sizeof(uint16_t)) memcpy(context, payload, sizeof(uint16_t));
}

int CNBDLinux_family(int fd) {
    message m;
    start(&m, GENL_ID_CTRL, CTRL_CMD_GETFAMILY);
    ((struct genlmsghdr *)(m.bytes + NLMSG_HDRLEN))->version = 1;
    put(&m, CTRL_ATTR_FAMILY_NAME, NBD_GENL_FAMILY_NAME, sizeof NBD_GENL_FAMILY_NAME);
    uint16_t id = 0;
    int rc = transact(fd, &m, GENL_ID_CTRL, family_id, &id);
    if (rc < 0) return rc;
    return id ? id : -ENOENT;
}

static void put_config(message *m, const CNBDLinux_config *c) {
    if (c->has_index) put_u32(m, NBD_ATTR_INDEX, c->index);
    if (c->size_bytes) put_u64(m, NBD_ATTR_SIZE_BYTES, c->size_bytes);
    if (c->block_size) put_u64(m, NBD_ATTR_BLOCK_SIZE_BYTES, c->block_size);
    if (c->server_flags) put_u64(m, NBD_ATTR_SERVER_FLAGS, c->server_flags);
    if (c->has_timeout) put_u64(m, NBD_ATTR_TIMEOUT, c->timeout);
    if (c->dead_connection_timeout) put_u64(m, NBD_ATTR_DEAD_CONN_TIMEOUT, c->dead_connection_timeout);
    if (c->backend) put(m, NBD_ATTR_BACKEND_IDENTIFIER, c->backend, strlen(c->backend) + 1);
    if (c->socket_count > 0) {
        size_t sockets = begin_nest(m, NBD_ATTR_SOCKETS);
        for (int32_t i = 0; i < c->socket_count; i++) {
            size_t item = begin_nest(m, NBD_SOCK_ITEM);
            put_u32(m, NBD_SOCK_FD, (uint32_t)c->sockets[i]);
            end_nest(m, item);
        }
        end_nest(m, sockets);
    }
}

typedef struct {
    uint32_t index;
    int found;
} index_reply;

static void connected_index(uint16_t type, const uint8_t *payload, size_t size, void *context) {
    index_reply *r = context;
    if (type == NBD_ATTR_INDEX && size >= sizeof(uint32_t)) {
        memcpy(&r->index, payload, sizeof(uint32_t));
        r->found = 1;
    }
}

int CNBDLinux_connect(int fd, int family, const CNBDLinux_config *config, uint32_t *index) {
    if (family <= 0 || family > UINT16_MAX) return -EINVAL;
    message m;
    start(&m, (uint16_t)family, NBD_CMD_CONNECT);
    put_config(&m, config);
    index_reply r = {0, 0};
    int rc = transact(fd, &m, (uint16_t)family, connected_index, &r);
    if (rc < 0) return rc;
    if (!r.found) {
        if (!config->has_index) return -EPROTO;  // connected, but we cannot tell which device
        r.index = config->index;
    }
    *index = r.index;
    return 0;
}

int CNBDLinux_reconfigure(int fd, int family, const CNBDLinux_config *config) {
    if (family <= 0 || family > UINT16_MAX || !config->has_index) return -EINVAL;
    message m;
    start(&m, (uint16_t)family, NBD_CMD_RECONFIGURE);
    put_config(&m, config);
    return transact(fd, &m, (uint16_t)family, NULL, NULL);
}

int CNBDLinux_disconnect(int fd, int family, uint32_t index) {
    if (family <= 0 || family > UINT16_MAX) return -EINVAL;
    message m;
    start(&m, (uint16_t)family, NBD_CMD_DISCONNECT);
    put_u32(&m, NBD_ATTR_INDEX, index);
    return transact(fd, &m, (uint16_t)family, NULL, NULL);
}

typedef struct {
    uint32_t wanted;
    int connected;  // -1 until the device is seen
} status_reply;

static void device_field(uint16_t type, const uint8_t *payload, size_t size, void *context) {
    int64_t *fields = context;  // [index, connected]
    if (type == NBD_DEVICE_INDEX && size >= sizeof(uint32_t)) {
        uint32_t index;
        memcpy(&index, payload, sizeof index);
        fields[0] = index;
    } else if (type == NBD_DEVICE_CONNECTED && size >= 1) {
        fields[1] = payload[0] ? 1 : 0;
    }
}

static void device_item(uint16_t type, const uint8_t *payload, size_t size, void *context) {
    status_reply *r = context;
    if (type != NBD_DEVICE_ITEM) return;
    int64_t fields[2] = {-1, -1};
    each_attribute(payload, size, device_field, fields);
    if (fields[0] == (int64_t)r->wanted && fields[1] >= 0) r->connected = (int)fields[1];
}

static void device_list(uint16_t type, const uint8_t *payload, size_t size, void *context) {
    if (type == NBD_ATTR_DEVICE_LIST) each_attribute(payload, size, device_item, context);
}

int CNBDLinux_status(int fd, int family, uint32_t index) {
    if (family <= 0 || family > UINT16_MAX) return -EINVAL;
    message m;
    start(&m, (uint16_t)family, NBD_CMD_STATUS);
    put_u32(&m, NBD_ATTR_INDEX, index);
    status_reply r = {index, -1};
    int rc = transact(fd, &m, (uint16_t)family, device_list, &r);
    if (rc < 0) return rc;
    return r.connected < 0 ? -ENODEV : r.connected;
}
