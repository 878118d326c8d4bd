/*
 * Connections: framing, the handshake, request dispatch, the send queue with
 * backpressure, and the file requests (PUT_FILE, GET_FILE).
 *
 * Rules from docs/agent-protocol.md this file enforces:
 *   - a header is checked as soon as its 12 bytes are in (length against our
 *     max_frame, reserved flags, known type); a bad one is a protocol error,
 *     answered with one ERROR on request 0, then the connection closes;
 *   - nothing but HELLO before the handshake, nothing A->H from the host;
 *   - a bad payload of a request (EXEC, PUT_FILE, GET_FILE, PING) is answered
 *     with ERROR EINVAL on that request and the connection lives on, like the
 *     microguest; a bad STDIN/STDIN_EOF/KILL frame is a protocol error;
 *   - ids 0 or still open for a new request are a protocol error; STDIN,
 *     STDIN_EOF and KILL for unknown ids are ignored.
 */
#include "agent.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

struct conn *conns;

/* Chunks read from the socket at once: several small frames per syscall. */
static uint8_t rbuf[256 * 1024];
/* Bytes read from a file per FILE_DATA frame (bounded by the host's max_frame). */
#define FILE_CHUNK (256u * 1024)

static void conn_fail(struct conn *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void get_pump(struct conn *c);

/* ------------------------------------------------------------ send queue -- */

struct chunk *conn_frame_alloc(uint32_t room)
{
    struct chunk *ch = malloc(sizeof(*ch) + AG_HDR + room);
    if (!ch) {
        logmsg("out of memory for a %u-byte frame", room);
        abort(); /* nothing sane to do: the host sees the connection drop */
    }
    ch->next = NULL;
    ch->off = 0;
    ch->len = 0;
    return ch;
}

void conn_frame_push(struct conn *c, struct chunk *ch, uint16_t type, uint32_t rid, uint32_t plen)
{
    ag_header_store(ch->data, type, rid, plen);
    ch->len = AG_HDR + plen;
    if (c->out_tail)
        c->out_tail->next = ch;
    else
        c->out_head = ch;
    c->out_tail = ch;
    c->out_bytes += ch->len;
}

void conn_queue_frame(struct conn *c, uint16_t type, uint32_t rid, const void *a, uint32_t alen,
                      const void *b, uint32_t blen)
{
    struct chunk *ch = conn_frame_alloc(alen + blen);
    if (alen)
        memcpy(ch->data + AG_HDR, a, alen);
    if (blen)
        memcpy(ch->data + AG_HDR + alen, b, blen);
    conn_frame_push(c, ch, type, rid, alen + blen);
}

void conn_send_error(struct conn *c, uint32_t rid, uint32_t err, const char *fmt, ...)
{
    uint8_t buf[4 + 300];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf((char *)buf + 4, sizeof(buf) - 4, fmt, ap);
    va_end(ap);
    if (n < 0)
        n = 0;
    if ((size_t)n > sizeof(buf) - 5)
        n = (int)(sizeof(buf) - 5);
    st32(buf, err);
    conn_queue_frame(c, MSG_ERROR, rid, buf, 4 + (uint32_t)n, NULL, 0);
}

uint32_t conn_out_room(const struct conn *c) { return MIN(c->host_max_frame, OUT_CHUNK); }

uint32_t hello_payload(uint8_t *p)
{
    return ag_hello_store(p, AG_CAP_ALL | AG_CAP_USER | AG_CAP_SEED | AG_CAP_TCP, AG_MAX_FRAME,
                          AG_MAX_INFLIGHT, AGENT_SOFTWARE);
}

/* Write as much of the queue as the socket takes. -1: the peer is gone. */
static int flush(struct conn *c)
{
    while (c->out_head) {
        struct iovec iov[64];
        int n = 0;
        for (struct chunk *ch = c->out_head; ch && n < 64; ch = ch->next, n++) {
            iov[n].iov_base = ch->data + ch->off;
            iov[n].iov_len = ch->len - ch->off;
        }
        struct msghdr mh = {.msg_iov = iov, .msg_iovlen = (size_t)n};
        /* MSG_NOSIGNAL: a vanished host is EPIPE here, not a SIGPIPE for PID 1 */
        ssize_t w = sendmsg(c->w.fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return 0;
            return -1;
        }
        c->out_bytes -= (size_t)w;
        while (w > 0) {
            struct chunk *ch = c->out_head;
            uint32_t left = ch->len - ch->off;
            if ((size_t)w < left) {
                ch->off += (uint32_t)w;
                break;
            }
            w -= left;
            c->out_head = ch->next;
            if (!c->out_head)
                c->out_tail = NULL;
            free(ch);
        }
    }
    return 0;
}

int conn_flush_all(struct conn *c)
{
    return flush(c); /* on a blocking socket it returns only when the queue is out, or -1 */
}

/* ------------------------------------------------------------ lifecycle -- */

void conn_accept(int listen_fd)
{
    for (;;) {
        int fd = accept4(listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK)
                logmsg("accept: %s", strerror(errno));
            return;
        }
        struct conn *c = calloc(1, sizeof(*c));
        if (!c) {
            close(fd);
            return;
        }
        c->w = (struct watch){W_CONN, fd, 0, c};
        c->state = CONN_HELLO;
        c->host_max_frame = AG_MIN_FRAME;
        c->next = conns;
        conns = c;
        watch_set(&c->w, EPOLLIN);
    }
}

static void get_free(struct fileget *g)
{
    if (g->fd >= 0)
        close(g->fd);
    free(g);
}

/* Stop everything the connection started; keep only its send queue. */
static void conn_drop_requests(struct conn *c)
{
    proc_detach_all(c);
    while (c->gets) {
        struct fileget *g = c->gets;
        c->gets = g->next;
        get_free(g);
    }
    c->open_requests = 0;
}

static void conn_destroy(struct conn *c)
{
    conn_drop_requests(c);
    while (c->out_head) {
        struct chunk *ch = c->out_head;
        c->out_head = ch->next;
        free(ch);
    }
    free(c->payload);
    watch_close(&c->w);
    for (struct conn **pp = &conns; *pp; pp = &(*pp)->next)
        if (*pp == c) {
            *pp = c->next;
            break;
        }
    defer_free(c); /* later events of this batch may still point at it */
}

/* A protocol error: one ERROR on request 0, flush it, close (doc §2). */
static void conn_fail(struct conn *c, const char *fmt, ...)
{
    if (c->state == CONN_CLOSING)
        return;
    char msg[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    conn_send_error(c, 0, EPROTO, "%s", msg);
    conn_drop_requests(c);
    c->state = CONN_CLOSING;
    c->close_deadline = now_ns() + (uint64_t)CLOSE_LINGER_MS * 1000000;
}

static void conn_fail_for(struct conn *c, const struct ag_problem *why)
{
    conn_fail(c, why->fmt, why->a, why->b, why->c);
}

/* ------------------------------------------------------------ requests -- */

static int request_in_use(struct conn *c, uint32_t rid)
{
    if (proc_find(c, rid))
        return 1;
    for (struct fileget *g = c->gets; g; g = g->next)
        if (g->rid == rid)
            return 1;
    return 0;
}

static int too_busy(struct conn *c, uint32_t rid)
{
    if (c->open_requests < AG_MAX_INFLIGHT)
        return 0;
    conn_send_error(c, rid, EBUSY, "too many requests (at most %u at once)", AG_MAX_INFLIGHT);
    return 1;
}

/*
 * EXEC: every string is copied into one allocation (argv, env, cwd, NUL-
 * terminated) that lives only until posix_spawn returns.
 */
static void handle_exec(struct conn *c, uint32_t rid, struct ag_exec *x)
{
    uint32_t argc = x->argc, envc = x->envc, len = x->r.len;
    int shell = x->shell;
    if (too_busy(c, rid))
        return;
    /* pointers: argv (+2 for "sh -c") and env, each NULL-terminated; strings: at most len */
    size_t ptrs = (size_t)argc + 3 + envc + 1;
    char *block = malloc(ptrs * sizeof(char *) + len + argc + envc + 1);
    if (!block) {
        conn_send_error(c, rid, ENOMEM, "no memory for the command");
        return;
    }
    char **argv = (char **)block, **env = argv + argc + 3;
    char *s = block + ptrs * sizeof(char *);
    uint32_t groups[AG_MAX_GROUPS];
    struct exec_req req = {x->flags, x->timeout_ms, NULL, argv, env, 0, 0, 0, 0, groups};
    if (x->cwd_len) {
        memcpy(s, x->cwd, x->cwd_len);
        s[x->cwd_len] = 0;
        req.cwd = s;
        s += x->cwd_len + 1;
    }
    const char *why = NULL;
    char **a = argv;
    if (shell) {
        *a++ = (char *)opt_shell;
        *a++ = "-c";
    }
    for (uint32_t i = 0; i < argc && !why; i++) {
        uint32_t n;
        const uint8_t *arg;
        if (!(why = ag_exec_arg(x, &arg, &n))) {
            memcpy(s, arg, n);
            s[n] = 0;
            *a++ = s;
            s += n + 1;
        }
    }
    *a = NULL;
    char **e = env;
    for (uint32_t i = 0; i < envc && !why; i++) {
        uint32_t n;
        const uint8_t *ent;
        if (!(why = ag_exec_env(x, &ent, &n))) {
            memcpy(s, ent, n);
            s[n] = 0;
            *e++ = s;
            s += n + 1;
        }
    }
    *e = NULL;
    if (!why && x->user) {
        req.user = 1;
        why = ag_exec_user(x, &req.uid, &req.gid, &req.ngroups, groups);
    }
    if (!why)
        why = ag_exec_end(x);
    if (why) {
        conn_send_error(c, rid, EINVAL, "EXEC: %s", why);
        free(block);
        return;
    }
    seed_before_exec();
    int err = proc_spawn(c, rid, &req);
    if (err) {
        const char *what = req.cwd && err == ENOENT ? "cannot start (command or cwd missing)"
                                                     : "cannot start";
        conn_send_error(c, rid, (uint32_t)err, "%s: %s: %s", what, strerror(err),
                        shell ? argv[2] : argv[0]);
    }
    free(block);
}

static void handle_put(struct conn *c, uint32_t rid, const struct ag_put_file *f)
{
    uint32_t plen = f->path_len, mode = f->mode;
    char name[4096];
    if (plen >= sizeof(name)) {
        conn_send_error(c, rid, ENAMETOOLONG, "path of %u bytes", plen);
        return;
    }
    memcpy(name, f->path, plen);
    name[plen] = 0;
    int fd;
    if (f->flags & PUT_APPEND) {
        fd = open(name, O_WRONLY | O_APPEND | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
    } else {
        /* created by us: the requested mode exactly (fchmod, not subject to umask);
           an existing file keeps its mode, like the reference agent */
        /* O_NONBLOCK: a FIFO without a reader is ENXIO, not a hung agent */
        fd = open(name, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOCTTY | O_NONBLOCK, mode);
        if (fd >= 0) {
            if (fchmod(fd, mode) < 0) {
                int err = errno;
                close(fd);
                conn_send_error(c, rid, (uint32_t)err, "chmod %s: %s", name, strerror(err));
                return;
            }
        } else if (errno == EEXIST) {
            fd = open(name, O_WRONLY | O_TRUNC | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
        }
    }
    if (fd < 0) {
        int err = errno;
        conn_send_error(c, rid, (uint32_t)err, "open %s: %s", name, strerror(err));
        return;
    }
    const uint8_t *data = f->data;
    uint32_t left = f->data_len;
    while (left) {
        ssize_t w = write(fd, data, left);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0) {
            int err = w < 0 ? errno : EIO;
            close(fd);
            conn_send_error(c, rid, (uint32_t)err, "write %s: %s", name, strerror(err));
            return;
        }
        data += w;
        left -= (uint32_t)w;
    }
    if (close(fd) < 0 && errno != EINTR) {
        int err = errno;
        conn_send_error(c, rid, (uint32_t)err, "close %s: %s", name, strerror(err));
        return;
    }
    conn_queue_frame(c, MSG_OK, rid, NULL, 0, NULL, 0);
}

static void handle_get(struct conn *c, uint32_t rid, const uint8_t *p, uint32_t len)
{
    char name[4096];
    if (len >= sizeof(name)) {
        conn_send_error(c, rid, ENAMETOOLONG, "path of %u bytes", len);
        return;
    }
    if (too_busy(c, rid))
        return;
    memcpy(name, p, len);
    name[len] = 0;
    /* O_NONBLOCK: a FIFO must not hang the loop on open (its reads then give EAGAIN: an error) */
    int fd = open(name, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
    struct stat st;
    int err = fd < 0 ? errno : fstat(fd, &st) < 0 ? errno : S_ISDIR(st.st_mode) ? EISDIR : 0;
    if (err) {
        if (fd >= 0)
            close(fd);
        conn_send_error(c, rid, (uint32_t)err, "%s: %s", name, strerror(err));
        return;
    }
    struct fileget *g = calloc(1, sizeof(*g));
    if (!g) {
        close(fd);
        conn_send_error(c, rid, ENOMEM, "no memory");
        return;
    }
    g->rid = rid;
    g->fd = fd;
    g->regular = S_ISREG(st.st_mode);
    g->next = c->gets;
    c->gets = g;
    c->open_requests++;
    get_pump(c); /* a small file is answered right here */
}

/*
 * Stream every open GET_FILE while the send queue has room, one FILE_DATA per
 * read. A regular file ends at its first short read (that frame goes without
 * FILE_MORE); anything else (procfs, devices) ends at an empty read, which
 * sends an empty last frame.
 */
static void get_pump(struct conn *c)
{
    struct fileget **pp = &c->gets;
    while (*pp) {
        struct fileget *g = *pp;
        uint32_t room = MIN(c->host_max_frame - 4, FILE_CHUNK);
        int done = 0;
        while (!done && c->out_bytes <= OUT_HIGH) {
            struct chunk *ch = conn_frame_alloc(4 + room);
            ssize_t n;
            do
                n = read(g->fd, ch->data + AG_HDR + 4, room);
            while (n < 0 && errno == EINTR);
            if (n < 0) {
                int err = errno;
                free(ch);
                conn_send_error(c, g->rid, (uint32_t)err, "read: %s", strerror(err));
                done = 1;
                break;
            }
            if (n == 0) {
                free(ch);
                /* the end, found by an empty read: an empty last frame */
                uint8_t fl[4] = {0, 0, 0, 0};
                conn_queue_frame(c, MSG_FILE_DATA, g->rid, fl, 4, NULL, 0);
                done = 1;
                break;
            }
            /* A short read of a regular file is its end: no extra read, no empty
               trailing frame. Other files (proc, devices) are read until 0. */
            if ((uint32_t)n < room && g->regular) {
                st32(ch->data + AG_HDR, 0);
                conn_frame_push(c, ch, MSG_FILE_DATA, g->rid, 4 + (uint32_t)n);
                done = 1;
                break;
            }
            st32(ch->data + AG_HDR, FILE_MORE);
            conn_frame_push(c, ch, MSG_FILE_DATA, g->rid, 4 + (uint32_t)n);
        }
        if (done) {
            *pp = g->next;
            get_free(g);
            c->open_requests--;
        } else {
            pp = &g->next;
        }
        if (c->out_bytes > OUT_HIGH)
            break;
    }
}

/* ------------------------------------------------------------ frames -- */

static void handle_hello(struct conn *c, const struct ag_header *h, const uint8_t *p)
{
    struct ag_problem bad;
    if (ag_host_hello_bad(h, p, &c->host_max_frame, &bad))
        return conn_fail_for(c, &bad);
    c->state = CONN_OPEN;
    uint8_t hello[AG_HELLO_FIXED + 64];
    conn_queue_frame(c, MSG_HELLO, 0, hello, hello_payload(hello), NULL, 0);
}

static void handle_frame(struct conn *c, const struct ag_header *h, const uint8_t *p)
{
    if (c->state == CONN_HELLO)
        return handle_hello(c, h, p);
    struct ag_problem bad;
    if (ag_host_frame_bad(h, p, request_in_use(c, h->request_id), &bad))
        return conn_fail_for(c, &bad);
    uint32_t rid = h->request_id, len = h->len;
    struct ag_request req;
    if (ag_request_bad(h, p, &req, &bad))
        return conn_send_error(c, rid, EINVAL, bad.fmt, bad.a, bad.b, bad.c);
    struct proc *pr;
    switch (h->type) {
    case MSG_PING:
        return conn_queue_frame(c, MSG_PONG, rid, p, len, NULL, 0);
    case MSG_EXEC:
        return handle_exec(c, rid, &req.exec);
    case MSG_PUT_FILE:
        return handle_put(c, rid, &req.put);
    case MSG_GET_FILE:
        return handle_get(c, rid, req.path, len);
    case MSG_SEED: {
        int err = seed_apply(&req.seed);
        if (err)
            return conn_send_error(c, rid, (uint32_t)err, "SEED: %s", strerror(err));
        return conn_queue_frame(c, MSG_OK, rid, NULL, 0, NULL, 0);
    }
    case MSG_TCP_CONNECT:
        if (tcp_handoff(c, rid, req.port) != 0)
            c->state = CONN_HANDED; /* no more frames: conn_event drops it from the loop */
        return;
    case MSG_STDIN:
        if ((pr = proc_find(c, rid)))
            proc_stdin(pr, p, len);
        return;
    case MSG_STDIN_EOF:
        if ((pr = proc_find(c, rid)))
            proc_stdin_eof(pr);
        return;
    case MSG_KILL:
        if ((pr = proc_find(c, rid)))
            proc_kill(pr, (int)ag_kill_signal(p, len));
        return;
    }
}

/* Feed received bytes through the frame parser. Stops early if the connection fails. */
static void parse(struct conn *c, const uint8_t *data, size_t n)
{
    size_t pos = 0;
    while (pos < n && c->state != CONN_CLOSING && c->state != CONN_HANDED) {
        if (c->hdr_have < AG_HDR) {
            size_t take = MIN(AG_HDR - c->hdr_have, n - pos);
            memcpy(c->hdr + c->hdr_have, data + pos, take);
            c->hdr_have += (uint32_t)take;
            pos += take;
            if (c->hdr_have < AG_HDR)
                return;
            struct ag_header h = ag_header_load(c->hdr);
            struct ag_problem bad;
            if (ag_header_bad(&h, AG_MAX_FRAME, &bad)) /* before waiting for the payload */
                return conn_fail_for(c, &bad);
            uint32_t len = h.len;
            c->need = len;
            c->have = 0;
            if (len && n - pos < len) { /* the payload spans reads: gather it */
                c->payload = malloc(len);
                if (!c->payload)
                    return conn_fail(c, "no memory for a %u-byte frame", len);
            }
        }
        struct ag_header h = ag_header_load(c->hdr);
        if (!c->payload) { /* whole payload in this read: no copy */
            const uint8_t *pl = data + pos;
            pos += c->need;
            c->hdr_have = 0;
            handle_frame(c, &h, pl);
            continue;
        }
        size_t take = MIN(c->need - c->have, n - pos);
        memcpy(c->payload + c->have, data + pos, take);
        c->have += (uint32_t)take;
        pos += take;
        if (c->have < c->need)
            return;
        uint8_t *pl = c->payload;
        c->payload = NULL;
        c->hdr_have = 0;
        handle_frame(c, &h, pl);
        free(pl);
    }
}

/* ------------------------------------------------------------ events -- */

static int input_wanted(const struct conn *c)
{
    if (c->state == CONN_HANDED)
        return 0; /* its bytes are the relay's */
    if (c->state == CONN_CLOSING)
        return 1; /* read and discard until the host closes too */
    return !c->paused && c->stdin_bytes <= STDIN_HIGH;
}

void conn_update(struct conn *c)
{
    int was = c->paused;
    if (c->out_bytes > OUT_HIGH)
        c->paused = 1;
    else if (c->out_bytes < OUT_LOW)
        c->paused = 0;
    if (!c->paused && c->gets)
        get_pump(c);
    if (c->out_bytes > OUT_HIGH)
        c->paused = 1;
    if (was != c->paused)
        proc_update_interest(c);
    /* write now rather than after another epoll round trip: an EXIT or PONG usually
       fits the socket buffer at once. A dead peer shows up as EPOLLERR/HUP later. */
    if (c->out_head && c->state != CONN_CLOSING && flush(c) == 0 && c->paused &&
        c->out_bytes < OUT_LOW)
        return conn_update(c);
    uint32_t ev = 0;
    if (input_wanted(c))
        ev |= EPOLLIN;
    if (c->out_head)
        ev |= EPOLLOUT;
    watch_set(&c->w, ev);
}

void conn_event(struct conn *c, uint32_t events)
{
    int dead = 0;
    if (c->out_head && flush(c) < 0)
        dead = 1;
    if (!dead && (events & (EPOLLIN | EPOLLHUP | EPOLLERR))) {
        /* a few reads per wakeup: other connections and pipes get their turn */
        for (int i = 0; i < 4 && input_wanted(c); i++) {
            ssize_t n = recv(c->w.fd, rbuf, sizeof(rbuf), MSG_DONTWAIT);
            if (n < 0 && errno == EINTR)
                continue;
            if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
                break;
            if (n <= 0) {
                dead = 1; /* the host closed or reset the connection */
                break;
            }
            if (c->state != CONN_CLOSING)
                parse(c, rbuf, (size_t)n);
        }
        if (!dead && c->out_head && flush(c) < 0)
            dead = 1;
    }
    if (c->state == CONN_HANDED)
        dead = 1; /* the relay child has its own copy of the socket */
    if (!dead && c->state == CONN_CLOSING && !c->out_head && !c->shut_wr) {
        /* our last word is out: EOF to the host, then wait for its close */
        shutdown(c->w.fd, SHUT_WR);
        c->shut_wr = 1;
    }
    if (dead) {
        conn_destroy(c);
        return;
    }
    conn_update(c);
}

void conn_timers(uint64_t now, int64_t *wait_ms)
{
    struct conn *c = conns;
    while (c) {
        struct conn *next = c->next;
        if (c->state == CONN_CLOSING) {
            if (now >= c->close_deadline) {
                conn_destroy(c);
            } else {
                int64_t ms = (int64_t)((c->close_deadline - now) / 1000000) + 1;
                if (*wait_ms < 0 || ms < *wait_ms)
                    *wait_ms = ms;
            }
        }
        c = next;
    }
}
