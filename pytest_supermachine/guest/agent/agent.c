/*
 * sm-agent: options, the event loop, the listener and the ready signal.
 *
 *   sm-agent [--listen ADDR] [--ready ADDR|none] [--port-ready|--no-port-ready]
 *            [--shell PATH] [--cwd DIR] [--init|--no-init] [--cmdline TEXT]
 *
 *   ADDR: vsock:PORT (listen, any CID) / vsock:CID:PORT (ready), unix:PATH
 *         (unix:@NAME: abstract), tcp:HOST:PORT (numeric IPv4; port 0 = any, the log line names it)
 *
 * Defaults: listen on vsock:5253; once listening, write SM_CTL_READY to the
 * supermachine control port and send READY to vsock:2:5254. The port write and
 * the ready connection default to on only when listening on vsock, so the host
 * test suite (unix sockets) never touches a host I/O port. As PID 1 (or with
 * --init) the process first does init's work (init.c), then serves.
 *
 * Event loop: one epoll set, level-triggered. Per wakeup each connection reads
 * a few socket chunks and each pipe a few frames, so no client starves the
 * rest. Timeouts (command deadlines, closing connections, ready retries) set
 * the epoll timeout; there is no timer fd. Objects freed during a batch of
 * events are freed after the batch (defer_free), since later events of the
 * same batch may point at them; closed watches have fd -1 and are skipped.
 */
#include "agent.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/vm_sockets.h>
#include <netinet/in.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/io.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

const char *opt_cwd;
static int epfd = -1;

/* ------------------------------------------------------------ utilities -- */

uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

void logmsg(const char *fmt, ...)
{
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof(buf) - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if ((size_t)n > sizeof(buf) - 2)
        n = sizeof(buf) - 2;
    buf[n++] = '\n';
    /* one write per line: the console (or the test's stderr) never interleaves halves */
    char line[600];
    int m = snprintf(line, sizeof(line), "sm-agent: %.*s", n, buf);
    if (m > 0 && write(2, line, (size_t)MIN(m, (int)sizeof(line) - 1)) < 0) {
        /* nowhere else to report it */
    }
}

void watch_set(struct watch *w, uint32_t events)
{
    if (w->fd < 0 || events == w->events)
        return;
    struct epoll_event ev = {.events = events, .data.ptr = w};
    int op = !w->events ? EPOLL_CTL_ADD : !events ? EPOLL_CTL_DEL : EPOLL_CTL_MOD;
    if (epoll_ctl(epfd, op, w->fd, &ev) < 0)
        logmsg("epoll_ctl(%d, fd %d): %s", op, w->fd, strerror(errno));
    w->events = events;
}

void watch_close(struct watch *w)
{
    if (w->fd < 0)
        return;
    if (w->events)
        epoll_ctl(epfd, EPOLL_CTL_DEL, w->fd, NULL);
    close(w->fd);
    w->fd = -1;
    w->events = 0;
}

/* Freed after the current batch of events: they may still point at it. */
static void **graveyard;
static size_t graves, graves_cap;

void defer_free(void *p)
{
    if (graves == graves_cap) {
        size_t cap = graves_cap ? graves_cap * 2 : 64;
        void **g = realloc(graveyard, cap * sizeof(void *));
        if (!g) {
            /* leaking is safer than a use-after-free */
            return;
        }
        graveyard = g;
        graves_cap = cap;
    }
    graveyard[graves++] = p;
}

static void bury(void)
{
    for (size_t i = 0; i < graves; i++)
        free(graveyard[i]);
    graves = 0;
}

/* ------------------------------------------------------------ addresses -- */

struct addr {
    int family;
    socklen_t len;
    union {
        struct sockaddr sa;
        struct sockaddr_vm vm;
        struct sockaddr_un un;
        struct sockaddr_in in;
    } u;
    char text[128];
};

/* vsock:PORT | vsock:CID:PORT | unix:PATH | tcp:HOST:PORT. 0 on success. */
static int parse_addr(const char *s, int want_cid, struct addr *a)
{
    memset(a, 0, sizeof(*a));
    snprintf(a->text, sizeof(a->text), "%s", s);
    if (strncmp(s, "vsock:", 6) == 0) {
        char *end;
        unsigned long cid = want_cid ? AG_HOST_CID : VMADDR_CID_ANY, port;
        port = strtoul(s + 6, &end, 10);
        if (*end == ':') {
            cid = port;
            port = strtoul(end + 1, &end, 10);
        }
        if (*end || port > 0xffffffffUL || cid > 0xffffffffUL)
            return -1;
        a->family = AF_VSOCK;
        a->u.vm.svm_family = AF_VSOCK;
        a->u.vm.svm_cid = (unsigned)cid;
        a->u.vm.svm_port = (unsigned)port;
        a->len = sizeof(a->u.vm);
        return 0;
    }
    if (strncmp(s, "unix:", 5) == 0) {
        size_t n = strlen(s + 5);
        if (!n || n >= sizeof(a->u.un.sun_path))
            return -1;
        a->family = AF_UNIX;
        a->u.un.sun_family = AF_UNIX;
        memcpy(a->u.un.sun_path, s + 5, n);
        a->len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n + 1);
        if (s[5] == '@') { /* abstract: lives in the network namespace, not in a directory */
            a->u.un.sun_path[0] = 0;
            a->len--;
        }
        return 0;
    }
    if (strncmp(s, "tcp:", 4) == 0) {
        char host[64];
        const char *colon = strrchr(s + 4, ':');
        if (!colon || (size_t)(colon - (s + 4)) >= sizeof(host))
            return -1;
        memcpy(host, s + 4, (size_t)(colon - (s + 4)));
        host[colon - (s + 4)] = 0;
        char *end;
        unsigned long port = strtoul(colon + 1, &end, 10);
        if (*end || port > 65535 || inet_pton(AF_INET, host, &a->u.in.sin_addr) != 1)
            return -1;
        a->family = AF_INET;
        a->u.in.sin_family = AF_INET;
        a->u.in.sin_port = htons((uint16_t)port);
        a->len = sizeof(a->u.in);
        return 0;
    }
    return -1;
}

static int listen_on(struct addr *a)
{
    int fd = socket(a->family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    if (a->family == AF_UNIX && a->u.un.sun_path[0])
        unlink(a->u.un.sun_path); /* a stale socket from an earlier run */
    if (a->family == AF_INET) {
        int one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    }
    if (bind(fd, &a->u.sa, a->len) < 0 || listen(fd, 128) < 0) {
        int err = errno;
        close(fd);
        errno = err;
        return -1;
    }
    if (a->family == AF_INET) { /* port 0: say which one we got */
        socklen_t len = sizeof(a->u.in);
        getsockname(fd, &a->u.sa, &len);
        snprintf(a->text, sizeof(a->text), "tcp:%s:%u", inet_ntoa(a->u.in.sin_addr),
                 ntohs(a->u.in.sin_port));
    }
    return fd;
}

/* ------------------------------------------------------------ ready signal -- */

static sigjmp_buf port_fault;

static void on_port_fault(int sig)
{
    (void)sig;
    siglongjmp(port_fault, 1);
}

/*
 * SM_CTL_READY on the control port: the VMM timestamps it (boot-to-ready).
 * ioperm fails without CONFIG_X86_IOPL_IOPERM or privileges: then nothing.
 * Should the hypervisor fault the access anyway (#GP -> SIGSEGV), the handler
 * catches it: a missing timestamp must never cost the agent.
 * Returns 1 when the write went through (the VMM has seen readiness), else 0.
 */
static int port_ready(void)
{
    int done = 0;
    if (ioperm(SM_CONTROL_PORT, 4, 1) < 0) {
        logmsg("no control port (ioperm: %s): the VMM sees readiness on vsock only",
               strerror(errno));
        return 0;
    }
    struct sigaction sa = {.sa_handler = on_port_fault}, old_segv, old_bus;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &old_segv);
    sigaction(SIGBUS, &sa, &old_bus);
    if (sigsetjmp(port_fault, 1) == 0) {
        outl(SM_CTL_READY, SM_CONTROL_PORT);
        done = 1;
    } else {
        logmsg("the control port write faulted: skipped");
    }
    sigaction(SIGSEGV, &old_segv, NULL);
    sigaction(SIGBUS, &old_bus, NULL);
    ioperm(SM_CONTROL_PORT, 4, 0);
    return done;
}

/*
 * The READY connection (doc §6): connect, one frame, close; retried with backoff.
 * quiet: the VMM already saw readiness on the control port, so a failed READY
 * connection is no problem worth a console line. That is the normal case after a
 * restore: the snapshot was taken once the port said ready, with this connection
 * still in flight to a host listener that the restored machine no longer has.
 */
static struct {
    struct addr addr;
    int enabled;
    int quiet;
    struct watch w;
    int attempts;
    uint64_t retry_at; /* next attempt, or the end of the one in progress; 0 = none */
} ready;

#define READY_ATTEMPTS 12
#define READY_CONNECT_MS 3000

static void ready_try(void);

static void ready_retry(const char *why)
{
    watch_close(&ready.w);
    if (++ready.attempts >= READY_ATTEMPTS) {
        if (!ready.quiet)
            logmsg("READY to %s failed %d times (%s): giving up", ready.addr.text,
                   ready.attempts, why);
        ready.enabled = 0;
        return;
    }
    if (ready.attempts == 1 && !ready.quiet)
        logmsg("READY to %s: %s (retrying)", ready.addr.text, why);
    uint64_t delay_ms = MIN(25u << ready.attempts, 1000u);
    ready.retry_at = now_ns() + delay_ms * 1000000;
}

static void ready_try(void)
{
    ready.retry_at = 0;
    int fd = socket(ready.addr.family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return ready_retry(strerror(errno));
    ready.w = (struct watch){W_READY, fd, 0, NULL};
    if (connect(fd, &ready.addr.u.sa, ready.addr.len) < 0 && errno != EINPROGRESS)
        return ready_retry(strerror(errno));
    watch_set(&ready.w, EPOLLOUT);
    /* a peer that never answers must not stall readiness for good */
    ready.retry_at = now_ns() + (uint64_t)READY_CONNECT_MS * 1000000;
}

static void ready_event(void)
{
    int err = 0;
    socklen_t len = sizeof(err);
    if (getsockopt(ready.w.fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
        err = errno;
    if (err)
        return ready_retry(strerror(err));
    uint8_t f[AG_HDR + AG_HELLO_FIXED + 64];
    uint32_t n = hello_payload(f + AG_HDR);
    ag_header_store(f, MSG_READY, 0, n);
    /* tiny and the first data on a fresh connection: the socket buffer takes it whole */
    ssize_t w = send(ready.w.fd, f, AG_HDR + n, MSG_NOSIGNAL);
    if (w != (ssize_t)(AG_HDR + n))
        return ready_retry(w < 0 ? strerror(errno) : "short write");
    shutdown(ready.w.fd, SHUT_WR);
    watch_close(&ready.w);
    ready.enabled = 0;
    ready.retry_at = 0;
}

static void ready_timer(uint64_t now, int64_t *wait_ms)
{
    if (!ready.enabled || !ready.retry_at)
        return;
    if (now >= ready.retry_at) {
        if (ready.w.fd >= 0)
            ready_retry("connect timed out"); /* still in progress */
        else
            ready_try();
        /* either may have set the next deadline: the loop must wake up for it */
        if (!ready.enabled || !ready.retry_at)
            return;
        now = now_ns();
        if (now >= ready.retry_at) {
            *wait_ms = 0;
            return;
        }
    }
    int64_t ms = (int64_t)((ready.retry_at - now) / 1000000) + 1;
    if (*wait_ms < 0 || ms < *wait_ms)
        *wait_ms = ms;
}

/* ------------------------------------------------------------ main -- */

static void usage(void)
{
    fprintf(stderr,
            "usage: sm-agent [--listen vsock:PORT|unix:PATH|tcp:HOST:PORT]\n"
            "                [--ready vsock:CID:PORT|unix:PATH|tcp:HOST:PORT|none]\n"
            "                [--port-ready|--no-port-ready] [--shell PATH] [--cwd DIR]\n"
            "                [--init|--no-init] [--cmdline TEXT]\n");
}

/* fds 0-2 must be open, or pipes could land there and dup2 onto themselves in a child. */
static void ensure_std_fds(void)
{
    for (int fd = 0; fd < 3; fd++) {
        if (fcntl(fd, F_GETFD) >= 0)
            continue;
        int n = open("/dev/null", O_RDWR);
        if (n < 0) {
            int p[2];
            if (pipe(p) < 0)
                return;
            n = p[0];
        }
        if (n != fd) {
            dup2(n, fd);
            close(n);
        }
    }
}

static void serve_forever(int lfd, int sfd)
{
    struct watch lw = {W_LISTEN, lfd, 0, NULL}, sw = {W_SIGNAL, sfd, 0, NULL};
    watch_set(&lw, EPOLLIN);
    watch_set(&sw, EPOLLIN);
    struct epoll_event evs[64];
    for (;;) {
        int64_t wait_ms = -1;
        uint64_t now = now_ns();
        proc_timers(now, &wait_ms);
        conn_timers(now, &wait_ms);
        ready_timer(now, &wait_ms);
        int n = epoll_wait(epfd, evs, 64, wait_ms > 0x7fffffff ? 0x7fffffff : (int)wait_ms);
        if (n < 0 && errno != EINTR) {
            logmsg("epoll_wait: %s", strerror(errno));
            sleep(1);
        }
        for (int i = 0; i < n; i++) {
            struct watch *w = evs[i].data.ptr;
            if (w->fd < 0)
                continue; /* closed earlier in this batch */
            switch (w->kind) {
            case W_LISTEN:
                conn_accept(w->fd);
                /* the host found us: a READY still being retried says nothing new */
                if (ready.enabled) {
                    watch_close(&ready.w);
                    ready.enabled = 0;
                    ready.retry_at = 0;
                }
                break;
            case W_CONN:
                conn_event(w->obj, evs[i].events);
                break;
            case W_SIGNAL: {
                struct signalfd_siginfo si;
                while (read(w->fd, &si, sizeof(si)) == sizeof(si)) {
                }
                proc_reap();
                break;
            }
            case W_READY:
                ready_event();
                break;
            case W_PIPE_IN:
            case W_PIPE_OUT:
            case W_PIPE_ERR:
                proc_event(w, evs[i].events);
                break;
            }
        }
        bury();
    }
}

int main(int argc, char **argv)
{
    const char *listen_s = NULL, *ready_s = NULL, *cmdline = NULL;
    int port_ready_opt = -1, init_opt = -1;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--listen") && v)
            listen_s = v, i++;
        else if (!strcmp(a, "--ready") && v)
            ready_s = v, i++;
        else if (!strcmp(a, "--shell") && v)
            opt_shell = v, i++;
        else if (!strcmp(a, "--cwd") && v)
            opt_cwd = v, i++;
        else if (!strcmp(a, "--cmdline") && v)
            cmdline = v, i++;
        else if (!strcmp(a, "--port-ready"))
            port_ready_opt = 1;
        else if (!strcmp(a, "--no-port-ready"))
            port_ready_opt = 0;
        else if (!strcmp(a, "--init"))
            init_opt = 1;
        else if (!strcmp(a, "--no-init"))
            init_opt = 0;
        else if (getpid() == 1)
            logmsg("ignoring argument %s", a); /* PID 1 must not exit over a typo */
        else {
            usage();
            return 2;
        }
    }
    int pid1 = getpid() == 1;
    ensure_std_fds();
    /* a vanished host or command is EPIPE, never a signal; children get SIG_DFL back */
    signal(SIGPIPE, SIG_IGN);
    umask(022);
    if (init_opt == 1 || (init_opt == -1 && pid1)) {
        struct init_result r = {0};
        init_system(cmdline, &r);
        if (r.shell)
            opt_shell = r.shell;
    }
    if (!pid1)
        prctl(PR_SET_CHILD_SUBREAPER, 1); /* orphans of commands come to us to be reaped */
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max; /* 64 commands x 3 pipes + connections */
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    if (opt_cwd && chdir(opt_cwd) < 0) {
        logmsg("chdir %s: %s", opt_cwd, strerror(errno));
        if (!pid1)
            return 1;
    }

    struct addr la;
    char dflt_listen[32];
    snprintf(dflt_listen, sizeof(dflt_listen), "vsock:%u", AG_PORT);
    if (parse_addr(listen_s ? listen_s : dflt_listen, 0, &la) < 0) {
        logmsg("bad --listen address %s", listen_s);
        if (!pid1)
            return 2;
        parse_addr(dflt_listen, 0, &la);
    }
    int vsock = la.family == AF_VSOCK;
    char dflt_ready[32];
    snprintf(dflt_ready, sizeof(dflt_ready), "vsock:%u:%u", AG_HOST_CID, AG_READY_PORT);
    if (!ready_s)
        ready_s = vsock ? dflt_ready : "none";
    if (strcmp(ready_s, "none") != 0) {
        if (parse_addr(ready_s, 1, &ready.addr) < 0) {
            logmsg("bad --ready address %s", ready_s);
            if (!pid1)
                return 2;
        } else {
            ready.enabled = 1;
        }
    }
    ready.w.fd = -1;

    epfd = epoll_create1(EPOLL_CLOEXEC);
    int sfd = proc_signal_fd();
    if (epfd < 0 || sfd < 0) {
        logmsg("epoll/signalfd: %s", strerror(errno));
        if (!pid1)
            return 1;
    }
    int lfd;
    /* as PID 1 there is no giving up: exiting would panic the kernel */
    while ((lfd = listen_on(&la)) < 0) {
        logmsg("cannot listen on %s: %s%s", la.text, strerror(errno),
               pid1 ? " (retrying every second)" : "");
        if (!pid1)
            return 1;
        sleep(1);
    }
    struct timespec boot;
    clock_gettime(CLOCK_BOOTTIME, &boot);
    logmsg("listening on %s (%lld ms after boot)", la.text,
           (long long)boot.tv_sec * 1000 + boot.tv_nsec / 1000000);
    if (port_ready_opt == 1 || (port_ready_opt == -1 && vsock))
        ready.quiet = port_ready();
    if (ready.enabled)
        ready_try();
    if (pid1 && init_opt != 0)
        init_debug_shell();
    serve_forever(lfd, sfd);
    return 0;
}
