// The system OpenSSL (Debian libssl-dev), reached only through Sources/NBDClient/TLSSession.swift: the NBD
// client is synchronous, and swift-nio-ssl's BoringSSL works only inside a NIO pipeline. swift-nio-ssl
// prefixes every BoringSSL symbol, so both libraries live in one process without clashing.
#include <errno.h>
#include <stdint.h>
#include <sys/socket.h>

#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

// Macros Swift cannot call.

/// SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION): 1 on success.
static inline int copenssl_ctx_require_tls12(SSL_CTX *ctx) {
    return (int)SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
}

/// SSL_set_tlsext_host_name: the server name (SNI) sent in the ClientHello; 1 on success.
static inline int copenssl_set_server_name(SSL *ssl, const char *name) {
    return (int)SSL_set_tlsext_host_name(ssl, name);
}

// A socket BIO that sends with MSG_NOSIGNAL. OpenSSL's own socket BIO (SSL_set_fd) uses write(2), which
// raises SIGPIPE when the server has gone, killing a process that does not ignore it; the plaintext
// client sends with MSG_NOSIGNAL, and so must this. The socket is blocking, so the BIO never asks OpenSSL
// to retry: a call either moves bytes, sees end of file, or fails, and the state records which.

/// What the BIO reads and writes, owned by the caller for the BIO's lifetime.
typedef struct {
    int fd;
    /// errno of the last failed send or recv (0 if none failed).
    int error;
    /// Set once recv returned 0: the server closed the connection.
    int end_of_file;
} copenssl_socket;

static inline int copenssl_socket_write(BIO *bio, const char *data, int length) {
    copenssl_socket *state = (copenssl_socket *)BIO_get_data(bio);
    BIO_clear_retry_flags(bio);
    if (length <= 0) return 0;
    for (;;) {
        ssize_t n = send(state->fd, data, (size_t)length, MSG_NOSIGNAL);
        if (n >= 0) return (int)n;
        if (errno == EINTR) continue;
        state->error = errno;
        return -1;
    }
}

static inline int copenssl_socket_read(BIO *bio, char *data, int length) {
    copenssl_socket *state = (copenssl_socket *)BIO_get_data(bio);
    BIO_clear_retry_flags(bio);
    if (length <= 0) return 0;
    for (;;) {
        ssize_t n = recv(state->fd, data, (size_t)length, 0);
        if (n > 0) return (int)n;
        if (n == 0) {
            state->end_of_file = 1;
            return 0;
        }
        if (errno == EINTR) continue;
        state->error = errno;  // EAGAIN: SO_RCVTIMEO ran out
        return -1;
    }
}

static inline long copenssl_socket_ctrl(BIO *bio, int command, long number, void *pointer) {
    (void)bio;
    (void)number;
    (void)pointer;
    return command == BIO_CTRL_FLUSH ? 1 : 0;  // nothing is buffered; every other control is unsupported
}

/// The BIO method; make it once per process (it is never freed).
static inline BIO_METHOD *copenssl_socket_method(void) {
    BIO_METHOD *method = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, "vdisk NBD socket");
    if (method == NULL) return NULL;
    if (!BIO_meth_set_write(method, copenssl_socket_write) || !BIO_meth_set_read(method, copenssl_socket_read) ||
        !BIO_meth_set_ctrl(method, copenssl_socket_ctrl)) {
        BIO_meth_free(method);
        return NULL;
    }
    return method;
}

/// A BIO over `state`, ready for SSL_set_bio; NULL if out of memory.
static inline BIO *copenssl_socket_bio(BIO_METHOD *method, copenssl_socket *state) {
    BIO *bio = BIO_new(method);
    if (bio == NULL) return NULL;
    BIO_set_data(bio, state);
    BIO_set_init(bio, 1);
    return bio;
}
