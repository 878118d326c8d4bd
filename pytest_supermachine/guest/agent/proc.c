/*
 * Commands: posix_spawn with three pipes, output streamed as frames, stdin
 * queued, timeouts and KILL as signals to the command's process group, exit
 * reported once the leader is reaped.
 *
 * Why posix_spawn: glibc implements it with clone(CLONE_VM|CLONE_VFORK), so the
 * agent's page tables are never copied. Under nested PVM every page-table
 * update of the guest kernel is emulated, which makes fork the most expensive
 * part of an exec; vfork-style spawning avoids it. It also reports a failed
 * execve (or chdir) as an errno, which becomes the request's ERROR.
 *
 * Why a session (POSIX_SPAWN_SETSID): the command gets its own process group
 * (pgid = pid) to kill as a whole on timeout, and no controlling terminal
 * inherited from PID 1's console.
 *
 * When a command ends: the leader's exit is what counts (like `docker exec`,
 * unlike waiting for EOF): once it is reaped its pipes are drained of what is
 * already in them, then EXIT is sent. So `run("server &")` returns at once;
 * output a background process writes after that is dropped.
 */
#include "agent.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

extern char **environ;

const char *opt_shell = "/bin/sh";

static struct proc *all_procs;

/* Upper bound on env entries per EXEC: merging is quadratic in them. */
#define MAX_ENV 1024

#define DEFAULT_PATH "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

/* ------------------------------------------------------------ lookup -- */

struct proc *proc_find(struct conn *c, uint32_t rid)
{
    for (struct proc *p = c->procs; p; p = p->next)
        if (p->rid == rid)
            return p;
    return NULL;
}

static size_t name_len(const char *entry)
{
    const char *eq = strchr(entry, '=');
    return eq ? (size_t)(eq - entry) : strlen(entry);
}

static int same_name(const char *a, const char *b)
{
    size_t n = name_len(a);
    return n == name_len(b) && memcmp(a, b, n) == 0;
}

/* The agent's environment with the request's entries added or overriding. */
static char **merge_env(char **add)
{
    size_t nbase = 0, nadd = 0;
    while (environ && environ[nbase])
        nbase++;
    while (add[nadd])
        nadd++;
    char **env = malloc((nbase + nadd + 1) * sizeof(char *));
    if (!env)
        return NULL;
    size_t n = 0;
    for (size_t i = 0; i < nbase; i++) {
        size_t k = 0;
        while (k < nadd && !same_name(environ[i], add[k]))
            k++;
        if (k == nadd)
            env[n++] = environ[i];
    }
    for (size_t i = 0; i < nadd; i++) { /* a later duplicate wins, like a dict */
        size_t k = i + 1;
        while (k < nadd && !same_name(add[i], add[k]))
            k++;
        if (k == nadd)
            env[n++] = add[i];
    }
    env[n] = NULL;
    return env;
}

/*
 * execvp's search, but over the PATH the command will see (the request's env
 * may set one), as Python's subprocess does. Returns 0 and the path in `out`,
 * or an errno.
 */
static int find_program(const char *file, char **env, char *out, size_t outsz)
{
    if (strchr(file, '/')) {
        if (strlen(file) >= outsz)
            return ENAMETOOLONG;
        strcpy(out, file);
        return 0;
    }
    if (!*file)
        return ENOENT;
    const char *path = DEFAULT_PATH;
    for (char **e = env; *e; e++)
        if (strncmp(*e, "PATH=", 5) == 0) {
            path = *e + 5;
            break;
        }
    int err = ENOENT;
    for (const char *dir = path;;) {
        const char *end = strchrnul(dir, ':');
        size_t dn = (size_t)(end - dir);
        if (dn + 1 + strlen(file) < outsz) {
            if (dn) {
                memcpy(out, dir, dn);
                out[dn] = '/';
                strcpy(out + dn + 1, file);
            } else {
                strcpy(out, file); /* an empty PATH entry is the cwd */
            }
            struct stat st;
            if (stat(out, &st) == 0 && S_ISREG(st.st_mode)) {
                if (access(out, X_OK) == 0)
                    return 0;
                err = EACCES; /* keep looking, but remember why this one failed */
            }
        }
        if (!*end)
            return err;
        dir = end + 1;
    }
}

/* ------------------------------------------------------------ spawn -- */

static int set_nonblock(int fd)
{
    int fl = fcntl(fd, F_GETFL);
    return fl < 0 ? -1 : fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

static void close_pair(int p[2])
{
    if (p[0] >= 0)
        close(p[0]);
    if (p[1] >= 0)
        close(p[1]);
    p[0] = p[1] = -1;
}

/*
 * Signals a command must get back at SIG_DFL: only ignored ones survive execve (handlers
 * are reset by it), and glibc's posix_spawn child makes one rt_sigaction call per signal
 * named, each an emulated kernel entry under nested PVM (the full set was 64 calls per
 * command). So: SIGPIPE (the agent ignores it) and whatever the agent's parent left
 * ignored, found once here (as the guest's PID 1 nothing is).
 */
static sigset_t spawn_sigdefault;

static void find_spawn_sigdefault(void)
{
    sigemptyset(&spawn_sigdefault);
    sigaddset(&spawn_sigdefault, SIGPIPE);
    for (int sig = 1; sig < NSIG; sig++) {
        struct sigaction sa;
        if (sigaction(sig, NULL, &sa) == 0 && sa.sa_handler == SIG_IGN)
            sigaddset(&spawn_sigdefault, sig);
    }
}

/*
 * A command run as another user (EXEC_USER). posix_spawn cannot change
 * credentials, so this is its vfork-style equivalent for that case: the child
 * shares the agent's memory until it execs (no page-table copy, see the top of
 * this file), does what the posix_spawn call below is told to (new session,
 * stdio, cwd, default signal dispositions, empty mask), then drops to the user:
 * supplementary groups, gid, uid, in that order (after setuid it could not).
 * The cwd is entered as root, so a directory the user may not search still
 * works as a WorkingDir. A failed step leaves its errno in shared memory and the
 * child exits; the parent reaps it and returns the errno, as posix_spawn does.
 * Raw syscalls: no libc wrapper bookkeeping runs in the borrowed address space.
 */
static int spawn_as_user(pid_t *pidp, const char *prog, const int fds[3],
                         const struct exec_req *req, char **env)
{
    gid_t groups[AG_MAX_GROUPS];
    for (uint32_t i = 0; i < req->ngroups; i++)
        groups[i] = req->groups[i];
    volatile int failed = 0;
    sigset_t all, old, none;
    sigfillset(&all);
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &all, &old); /* no handler may run in the child on our stack */
    pid_t pid = vfork();
    if (pid == 0) {
        struct sigaction dfl;
        memset(&dfl, 0, sizeof(dfl));
        dfl.sa_handler = SIG_DFL;
        for (int sig = 1; sig < NSIG; sig++) /* the child's own copy of the dispositions; */
            if (sigismember(&spawn_sigdefault, sig)) /* handlers are reset by execve */
                sigaction(sig, &dfl, NULL);
        int step = setsid() < 0;
        for (int i = 0; i < 3 && !step; i++)
            step = dup2(fds[i], i) < 0;
        if (!step && req->cwd)
            step = chdir(req->cwd) < 0;
        if (!step)
            step = syscall(SYS_setgroups, (size_t)req->ngroups, groups) < 0 ||
                   syscall(SYS_setresgid, req->gid, req->gid, req->gid) < 0 ||
                   syscall(SYS_setresuid, req->uid, req->uid, req->uid) < 0;
        if (!step) {
            sigprocmask(SIG_SETMASK, &none, NULL);
            execve(prog, req->argv, env);
        }
        failed = errno ? errno : EINVAL;
        _exit(127);
    }
    int err = pid < 0 ? errno : failed;
    sigprocmask(SIG_SETMASK, &old, NULL);
    if (pid > 0 && err)
        waitpid(pid, NULL, 0); /* it never ran the command: reap it here, report the errno */
    *pidp = pid;
    return err;
}

int proc_spawn(struct conn *c, uint32_t rid, const struct exec_req *req)
{
    size_t nenv = 0;
    while (req->env[nenv])
        nenv++;
    if (nenv > MAX_ENV)
        return E2BIG;
    char **env = merge_env(req->env);
    if (!env)
        return ENOMEM;
    char prog[4096];
    int err = find_program(req->argv[0], env, prog, sizeof(prog));
    if (err) {
        free(env);
        return err;
    }
    int in[2] = {-1, -1}, out[2] = {-1, -1}, errp[2] = {-1, -1};
    posix_spawn_file_actions_t fa;
    posix_spawnattr_t attr;
    int have_fa = 0, have_attr = 0;
    pid_t pid = -1;
    /* O_CLOEXEC on all: dup2 onto 0-2 clears it in the child, nothing else leaks */
    if (pipe2(in, O_CLOEXEC) < 0 || pipe2(out, O_CLOEXEC) < 0 || pipe2(errp, O_CLOEXEC) < 0) {
        err = errno;
        goto fail;
    }
    if (!(req->flags & EXEC_STDIN)) { /* empty stdin: a pipe already at EOF, no /dev/null needed */
        close(in[1]);
        in[1] = -1;
    }
    if ((err = posix_spawn_file_actions_init(&fa)))
        goto fail;
    have_fa = 1;
    if ((err = posix_spawn_file_actions_adddup2(&fa, in[0], 0)) ||
        (err = posix_spawn_file_actions_adddup2(&fa, out[1], 1)) ||
        (err = posix_spawn_file_actions_adddup2(&fa, errp[1], 2)))
        goto fail;
    if (req->cwd && (err = posix_spawn_file_actions_addchdir_np(&fa, req->cwd)))
        goto fail;
    if ((err = posix_spawnattr_init(&attr)))
        goto fail;
    have_attr = 1;
    sigset_t none;
    sigemptyset(&none);
    /* the agent blocks SIGCHLD (signalfd) and ignores SIGPIPE: give the command defaults */
    posix_spawnattr_setsigmask(&attr, &none);
    posix_spawnattr_setsigdefault(&attr, &spawn_sigdefault);
    posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSID | POSIX_SPAWN_SETSIGMASK |
                                        POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_USEVFORK);
    uint64_t start = now_ns();
    if (req->user) {
        const int fds[3] = {in[0], out[1], errp[1]};
        err = spawn_as_user(&pid, prog, fds, req, env);
    } else {
        err = posix_spawn(&pid, prog, &fa, &attr, req->argv, env);
    }
    if (err)
        goto fail;
    posix_spawn_file_actions_destroy(&fa);
    posix_spawnattr_destroy(&attr);
    free(env);
    close(in[0]);
    close(out[1]);
    close(errp[1]);
    if ((in[1] >= 0 && set_nonblock(in[1]) < 0) || set_nonblock(out[0]) < 0 ||
        set_nonblock(errp[0]) < 0)
        logmsg("fcntl O_NONBLOCK: %s", strerror(errno)); /* cannot happen on a pipe */

    struct proc *p = calloc(1, sizeof(*p));
    if (!p) { /* too late to refuse: kill it, the EXIT reports the signal */
        kill(-pid, SIGKILL);
        close(out[0]), close(errp[0]);
        if (in[1] >= 0)
            close(in[1]);
        logmsg("out of memory tracking pid %d", (int)pid);
        return 0;
    }
    p->conn = c;
    p->rid = rid;
    p->pid = pid;
    p->start_ns = start;
    p->deadline_ns = req->timeout_ms ? start + (uint64_t)req->timeout_ms * 1000000 : 0;
    p->in = (struct watch){W_PIPE_IN, in[1], 0, p};
    p->out = (struct watch){W_PIPE_OUT, out[0], 0, p};
    p->err = (struct watch){W_PIPE_ERR, errp[0], 0, p};
    p->stdin_eof = in[1] < 0;
    p->next = c->procs;
    c->procs = p;
    p->all_next = all_procs;
    all_procs = p;
    c->open_requests++;
    if (!c->paused) {
        watch_set(&p->out, EPOLLIN);
        watch_set(&p->err, EPOLLIN);
    }
    return 0;

fail:
    if (have_fa)
        posix_spawn_file_actions_destroy(&fa);
    if (have_attr)
        posix_spawnattr_destroy(&attr);
    close_pair(in);
    close_pair(out);
    close_pair(errp);
    free(env);
    return err;
}

/* ------------------------------------------------------------ stdin -- */

static void stdin_drop(struct proc *p)
{
    while (p->stdin_head) {
        struct outbuf *b = p->stdin_head;
        p->stdin_head = b->next;
        if (p->conn)
            p->conn->stdin_bytes -= b->len - b->off;
        free(b);
    }
    p->stdin_tail = NULL;
}

static void stdin_close(struct proc *p)
{
    stdin_drop(p);
    if (p->in.fd >= 0)
        watch_close(&p->in);
    p->stdin_eof = 1;
}

/* Write queued stdin while the pipe takes it; close it after EOF once empty. */
static void stdin_flush(struct proc *p)
{
    while (p->stdin_head) {
        struct outbuf *b = p->stdin_head;
        ssize_t w = write(p->in.fd, b->data + b->off, b->len - b->off);
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0 && errno == EAGAIN)
            break;
        if (w < 0) { /* EPIPE: the command closed its stdin; the rest is dropped */
            stdin_close(p);
            return;
        }
        b->off += (uint32_t)w;
        p->conn->stdin_bytes -= (size_t)w;
        if (b->off == b->len) {
            p->stdin_head = b->next;
            if (!p->stdin_head)
                p->stdin_tail = NULL;
            free(b);
        }
    }
    if (!p->stdin_head && p->stdin_eof)
        stdin_close(p);
    else
        watch_set(&p->in, p->stdin_head ? EPOLLOUT : 0);
}

void proc_stdin(struct proc *p, const uint8_t *data, uint32_t len)
{
    if (p->stdin_eof || p->in.fd < 0)
        return; /* after EOF, or the command closed its stdin: ignored */
    struct outbuf *b = malloc(sizeof(*b) + len);
    if (!b) {
        logmsg("out of memory queueing %u stdin bytes", len);
        return;
    }
    b->next = NULL;
    b->len = len;
    b->off = 0;
    memcpy(b->data, data, len);
    if (p->stdin_tail)
        p->stdin_tail->next = b;
    else
        p->stdin_head = b;
    p->stdin_tail = b;
    p->conn->stdin_bytes += len;
    stdin_flush(p);
}

void proc_stdin_eof(struct proc *p)
{
    if (p->in.fd < 0)
        return;
    p->stdin_eof = 1;
    stdin_flush(p);
}

/* ------------------------------------------------------------ output -- */

/* One read of a pipe into one frame. 1 = data, 0 = EOF (pipe closed), -1 = nothing now. */
static int pipe_read(struct proc *p, struct watch *w)
{
    struct conn *c = p->conn;
    uint32_t room = conn_out_room(c);
    struct chunk *ch = conn_frame_alloc(room);
    ssize_t n;
    do
        n = read(w->fd, ch->data + AG_HDR, room);
    while (n < 0 && errno == EINTR);
    if (n > 0) {
        conn_frame_push(c, ch, w->kind == W_PIPE_OUT ? MSG_STDOUT : MSG_STDERR, p->rid,
                        (uint32_t)n);
        return 1;
    }
    free(ch);
    if (n < 0 && errno == EAGAIN)
        return -1;
    watch_close(w); /* EOF (or an error, which a pipe does not have) */
    return 0;
}

void proc_event(struct watch *w, uint32_t events)
{
    struct proc *p = w->obj;
    if (!p->conn)
        return;
    if (w->kind == W_PIPE_IN) {
        if (events & EPOLLERR)
            stdin_close(p); /* the reader is gone */
        else
            stdin_flush(p);
        conn_update(p->conn);
        return;
    }
    /* a few frames per wakeup, fewer if the connection's queue fills up */
    for (int i = 0; i < 4 && w->fd >= 0 && p->conn->out_bytes <= OUT_HIGH; i++)
        if (pipe_read(p, w) <= 0)
            break;
    conn_update(p->conn);
}

void proc_update_interest(struct conn *c)
{
    /* paused: out of epoll entirely, since a pipe's HUP is reported even with no events */
    uint32_t ev = c->paused ? 0 : EPOLLIN;
    for (struct proc *p = c->procs; p; p = p->next) {
        if (p->out.fd >= 0)
            watch_set(&p->out, ev);
        if (p->err.fd >= 0)
            watch_set(&p->err, ev);
    }
}

/* ------------------------------------------------------------ signals -- */

void proc_kill(struct proc *p, int sig)
{
    /* the whole group: a shell's children too. ESRCH if the command left its group. */
    if (kill(-p->pid, sig) < 0 && errno == ESRCH)
        kill(p->pid, sig);
}

static void unlink_from_conn(struct proc *p)
{
    struct conn *c = p->conn;
    for (struct proc **pp = &c->procs; *pp; pp = &(*pp)->next)
        if (*pp == p) {
            *pp = p->next;
            break;
        }
    c->open_requests--;
}

static void close_fds(struct proc *p)
{
    stdin_drop(p);
    if (p->in.fd >= 0)
        watch_close(&p->in);
    if (p->out.fd >= 0)
        watch_close(&p->out);
    if (p->err.fd >= 0)
        watch_close(&p->err);
}

void proc_detach_all(struct conn *c)
{
    while (c->procs) {
        struct proc *p = c->procs;
        proc_kill(p, SIGKILL); /* nobody is left to see its result */
        close_fds(p);
        unlink_from_conn(p);
        p->conn = NULL; /* stays in all_procs until reaped */
    }
    c->stdin_bytes = 0;
}

void proc_timers(uint64_t now, int64_t *wait_ms)
{
    for (struct proc *p = all_procs; p; p = p->all_next) {
        if (!p->conn || !p->deadline_ns || p->timed_out)
            continue;
        if (now >= p->deadline_ns) {
            p->timed_out = 1;
            proc_kill(p, SIGKILL);
        } else {
            int64_t ms = (int64_t)((p->deadline_ns - now + 999999) / 1000000);
            if (*wait_ms < 0 || ms < *wait_ms)
                *wait_ms = ms;
        }
    }
}

/* The leader is gone: send what is left in its pipes, then EXIT, and forget it. */
static void finish(struct proc *p, int status)
{
    uint64_t duration = now_ns() - p->start_ns;
    struct conn *c = p->conn;
    if (c) {
        struct watch *ws[2] = {&p->out, &p->err};
        for (int i = 0; i < 2; i++) {
            /* bounded: a background process still writing must not keep us here */
            for (uint32_t got = 0; ws[i]->fd >= 0 && got < FINAL_DRAIN_MAX; got += OUT_CHUNK)
                if (pipe_read(p, ws[i]) <= 0)
                    break;
        }
        uint8_t e[16];
        uint32_t flags = p->timed_out ? EXIT_TIMED_OUT : 0;
        int32_t code;
        if (WIFSIGNALED(status)) {
            flags |= EXIT_SIGNALED;
            code = WTERMSIG(status);
        } else {
            code = WEXITSTATUS(status);
        }
        st32(e, flags);
        st32(e + 4, (uint32_t)code);
        st64(e + 8, duration);
        conn_queue_frame(c, MSG_EXIT, p->rid, e, 16, NULL, 0);
        close_fds(p);
        unlink_from_conn(p);
        conn_update(c);
    }
    for (struct proc **pp = &all_procs; *pp; pp = &(*pp)->all_next)
        if (*pp == p) {
            *pp = p->all_next;
            break;
        }
    defer_free(p); /* events of this batch may still point at its watches */
}

int proc_signal_fd(void)
{
    find_spawn_sigdefault();
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGCHLD);
    sigprocmask(SIG_BLOCK, &set, NULL);
    return signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
}

/*
 * Reap every child that has exited: ours (reported) and, as PID 1 or a
 * subreaper, orphans reparented to us (just collected).
 */
void proc_reap(void)
{
    for (;;) {
        int status;
        pid_t pid = waitpid(-1, &status, WNOHANG);
        if (pid <= 0) {
            if (pid < 0 && errno == EINTR)
                continue;
            return;
        }
        if (!WIFEXITED(status) && !WIFSIGNALED(status))
            continue;
        for (struct proc *p = all_procs; p; p = p->all_next)
            if (p->pid == pid) {
                finish(p, status);
                break;
            }
    }
}
