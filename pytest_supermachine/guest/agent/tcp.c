/*
 * TCP_CONNECT (docs/agent-protocol.md §4): the host asks for a byte stream to a
 * TCP port of the guest's loopback. The agent connects to 127.0.0.1:port, answers
 * OK (or ERROR with the connect errno) and, after OK, the vsock connection is no
 * longer framed: a child process copies bytes both ways between it and the TCP
 * socket, passing each direction's EOF on as a half-close, until both directions
 * are done or either side fails. The connection leaves the agent's event loop.
 *
 * Why a child process: the relay then costs the agent's loop nothing (a bulk
 * transfer cannot starve EXEC output), and its lifetime is the two sockets'.
 * The child closes every other descriptor first, so it never keeps another
 * connection or a command's pipe open behind the agent's back.
 */
#include "agent.h"

#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef SYS_close_range
#define SYS_close_range 436
#endif

/* How long a connect to the guest's own loopback may take (a full backlog). */
#define TCP_CONNECT_MS 5000
#define RELAY_BUF (64u * 1024)

/* Connect to 127.0.0.1:port within TCP_CONNECT_MS: the socket, or -errno. */
static int tcp_connect_local(uint32_t port)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    struct sockaddr_in sa = {.sin_family = AF_INET,
                             .sin_port = htons((uint16_t)port),
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0)
        return fd;
    int err = errno;
    if (err == EINPROGRESS) {
        struct pollfd p = {.fd = fd, .events = POLLOUT};
        int n;
        do
            n = poll(&p, 1, TCP_CONNECT_MS);
        while (n < 0 && errno == EINTR);
        socklen_t len = sizeof(err);
        if (n == 0)
            err = ETIMEDOUT;
        else if (n < 0 || getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
            err = errno;
        if (!err)
            return fd;
    }
    close(fd);
    return -err;
}

static void close_all_but(int a, int b)
{
    int lo = a < b ? a : b, hi = a < b ? b : a;
    if (lo > 3)
        syscall(SYS_close_range, 3u, (unsigned)lo - 1, 0u);
    if (hi > lo + 1)
        syscall(SYS_close_range, (unsigned)lo + 1, (unsigned)hi - 1, 0u);
    syscall(SYS_close_range, (unsigned)hi + 1, ~0u, 0u);
}

struct direction {
    int from, to;
    uint32_t len, off;
    int eof;
    uint8_t buf[RELAY_BUF];
};

static struct direction dirs[2];

/* The child: copy both ways until both directions reached EOF or a socket failed. */
static void __attribute__((noreturn)) relay(int vs, int tcp)
{
    close_all_but(vs, tcp);
    dirs[0] = (struct direction){.from = vs, .to = tcp};
    dirs[1] = (struct direction){.from = tcp, .to = vs};
    while (!(dirs[0].eof && dirs[1].eof && !dirs[0].len && !dirs[1].len)) {
        struct pollfd p[2] = {{.fd = vs}, {.fd = tcp}};
        for (int i = 0; i < 2; i++) {
            struct direction *d = &dirs[i];
            int from = d->from == vs ? 0 : 1, to = 1 - from;
            if (!d->eof && !d->len)
                p[from].events |= POLLIN;
            if (d->len)
                p[to].events |= POLLOUT;
        }
        if (poll(p, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            _exit(1);
        }
        for (int i = 0; i < 2; i++) {
            struct direction *d = &dirs[i];
            int from = d->from == vs ? 0 : 1, to = 1 - from;
            if (p[to].revents & POLLERR)
                _exit(1); /* a reset: closing both passes it on */
            if (!d->eof && !d->len && (p[from].revents & (POLLIN | POLLHUP | POLLERR))) {
                ssize_t n = recv(d->from, d->buf, RELAY_BUF, MSG_DONTWAIT);
                if (n > 0) {
                    d->len = (uint32_t)n;
                    d->off = 0;
                } else if (n == 0) {
                    d->eof = 1;
                    shutdown(d->to, SHUT_WR); /* EOF onwards, the other way stays open */
                } else if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
                    _exit(1);
                }
            }
            if (d->len && (p[to].revents & (POLLOUT | POLLHUP))) {
                ssize_t w = send(d->to, d->buf + d->off, d->len - d->off,
                                 MSG_DONTWAIT | MSG_NOSIGNAL);
                if (w < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
                    _exit(1);
                if (w > 0 && (d->off += (uint32_t)w) == d->len)
                    d->len = d->off = 0;
            }
            /* a peer that hung up both ways cannot take what the other direction carries */
            if ((p[to].revents & POLLHUP) && !d->len && dirs[1 - i].eof)
                _exit(0);
        }
    }
    _exit(0);
}

int tcp_handoff(struct conn *c, uint32_t rid, uint32_t port)
{
    if (c->open_requests || c->procs || c->gets) {
        conn_send_error(c, rid, EINVAL, "TCP_CONNECT must be the only request on its connection");
        return 0;
    }
    int tcp = tcp_connect_local(port);
    if (tcp < 0) {
        conn_send_error(c, rid, (uint32_t)-tcp, "connect to 127.0.0.1:%u in the guest: %s", port,
                        strerror(-tcp));
        return 0;
    }
    /* OK goes out before any stream byte: write the queue out whole, blocking. */
    conn_queue_frame(c, MSG_OK, rid, NULL, 0, NULL, 0);
    int flags = fcntl(c->w.fd, F_GETFL);
    if (flags < 0 || fcntl(c->w.fd, F_SETFL, flags & ~O_NONBLOCK) < 0 || conn_flush_all(c) < 0) {
        close(tcp);
        return -1; /* the host is gone: drop the connection */
    }
    pid_t pid = fork();
    if (pid == 0)
        relay(c->w.fd, tcp);
    if (pid < 0)
        logmsg("tcp: fork for port %u: %s", port, strerror(errno));
    close(tcp);
    return 1; /* either way the connection is no longer the agent's */
}
