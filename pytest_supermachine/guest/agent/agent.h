/*
 * sm-agent: the Linux guest agent (docs/agent-protocol.md, version 1) and the
 * initramfs init, in one static binary. Declarations shared by agent.c
 * (options, event loop, listener, ready signal), conn.c (connections, frames,
 * files), proc.c (commands) and init.c (PID 1 setup).
 *
 * One thread, one epoll loop. Every fd is non-blocking; every object that owns
 * an fd in the epoll set embeds a `struct watch` whose address is the epoll
 * cookie, so dispatch needs no lookup table.
 */
#ifndef SM_AGENT_H
#define SM_AGENT_H

#define _GNU_SOURCE
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "agent_protocol.h" /* pytest_supermachine/guest/include: the wire format */

#define AGENT_SOFTWARE "sm-agent 1 (linux)"

/* ------------------------------------------------------------ protocol -- */

/*
 * What this agent accepts: 1 MiB keeps the per-connection receive buffer small
 * in a 64 MiB guest while making each awaited PUT_FILE chunk big enough that
 * file uploads are not round-trip bound.
 */
#define AG_MAX_FRAME (1u << 20)
#define AG_MAX_INFLIGHT 64u

/* The supermachine control port (pytest_supermachine/guest/microguest/bootinfo.h). */
#define SM_CONTROL_PORT 0x510
#define SM_CTL_READY 2u

/* ------------------------------------------------------------ limits -- */

/* Bytes read from a pipe or a file per output frame (a pipe holds 64 KiB by default). */
#define OUT_CHUNK (64u * 1024)
/*
 * Backpressure: above OUT_HIGH queued output bytes a connection stops reading
 * its commands' pipes, its files and its own socket; below OUT_LOW it resumes.
 * Memory per connection stays near OUT_HIGH + one frame however slow the host.
 */
#define OUT_HIGH (1u << 20)
#define OUT_LOW (256u * 1024)
/* Stdin bytes queued for commands that do not read them yet before the socket pauses. */
#define STDIN_HIGH (2u << 20)
/* After its leader exits, a command's pipes are drained at most this much each. */
#define FINAL_DRAIN_MAX (1u << 20)
/* How long a connection that is being closed may take to flush its last frames. */
#define CLOSE_LINGER_MS 2000

/* ------------------------------------------------------------ helpers -- */

#define MIN(a, b) ((a) < (b) ? (a) : (b))

uint64_t now_ns(void); /* CLOCK_MONOTONIC */
void logmsg(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* ------------------------------------------------------------ event loop -- */

enum watch_kind { W_LISTEN, W_CONN, W_SIGNAL, W_READY, W_PIPE_IN, W_PIPE_OUT, W_PIPE_ERR };

struct watch {
    enum watch_kind kind;
    int fd;
    uint32_t events; /* what is registered with epoll now (0 = not registered) */
    void *obj;
};

void watch_set(struct watch *w, uint32_t events); /* add/modify/remove as needed */
void watch_close(struct watch *w);                /* remove from epoll and close the fd */
void defer_free(void *p);                         /* free after the current batch of events */

/* ------------------------------------------------------------ connections -- */

struct chunk {
    struct chunk *next;
    uint32_t len, off;
    uint8_t data[];
};

struct proc;

/* A GET_FILE being streamed: one frame per pump while the output queue has room. */
struct fileget {
    struct fileget *next;
    uint32_t rid;
    int fd;
    int regular; /* a short read is the end */
};

/* CONN_HANDED: a TCP_CONNECT turned the connection into a relay owned by a child (tcp.c) */
enum conn_state { CONN_HELLO, CONN_OPEN, CONN_CLOSING, CONN_HANDED };

struct conn {
    struct watch w;
    struct conn *next;
    enum conn_state state;
    uint32_t host_max_frame;
    /* receive: header, then a payload buffer sized to the frame being read */
    uint8_t hdr[AG_HDR];
    uint32_t hdr_have;
    uint8_t *payload;
    uint32_t need, have;
    /* send queue */
    struct chunk *out_head, *out_tail;
    size_t out_bytes;
    int paused; /* output above OUT_HIGH: producers stopped */
    /* requests */
    struct proc *procs; /* open EXECs of this connection */
    struct fileget *gets;
    unsigned open_requests;
    size_t stdin_bytes; /* queued for all its commands */
    uint64_t close_deadline;
    int shut_wr;
};

extern struct conn *conns;

void conn_accept(int listen_fd);
void conn_event(struct conn *c, uint32_t events);
void conn_queue_frame(struct conn *c, uint16_t type, uint32_t rid, const void *a, uint32_t alen,
                      const void *b, uint32_t blen);
/* A frame whose payload the caller fills: returns the payload pointer (room bytes). */
struct chunk *conn_frame_alloc(uint32_t room);
void conn_frame_push(struct conn *c, struct chunk *ch, uint16_t type, uint32_t rid, uint32_t plen);
void conn_send_error(struct conn *c, uint32_t rid, uint32_t err, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
void conn_update(struct conn *c); /* re-evaluate interest after the queue or requests changed */
void conn_timers(uint64_t now, int64_t *wait_ms);
uint32_t conn_out_room(const struct conn *c); /* payload bytes per output frame */
uint32_t hello_payload(uint8_t *p);             /* at least AG_HELLO_FIXED + 64 bytes */
int conn_flush_all(struct conn *c);              /* the send queue, whole (blocking fd); -1: gone */

/* ------------------------------------------------------------ TCP relay -- */

/* TCP_CONNECT: answered here (ERROR: 0) or handed to a relay child (1; -1: the host is gone). */
int tcp_handoff(struct conn *c, uint32_t rid, uint32_t port);

/* ------------------------------------------------------------ commands -- */

struct outbuf { /* stdin bytes waiting for the command to read them */
    struct outbuf *next;
    uint32_t len, off;
    uint8_t data[];
};

struct proc {
    struct proc *next;      /* in the connection's list */
    struct proc *all_next;  /* in the global list (reaping finds orphans by pid) */
    struct conn *conn;      /* NULL once the connection is gone (killed, awaiting reap) */
    uint32_t rid;
    pid_t pid;              /* also the process group id */
    uint64_t start_ns, deadline_ns;
    int timed_out;
    struct watch in, out, err;
    struct outbuf *stdin_head, *stdin_tail;
    int stdin_eof;          /* STDIN_EOF seen: close the pipe once the queue is written */
};

struct exec_req {
    uint32_t flags, timeout_ms;
    char *cwd;   /* NULL = the agent's */
    char **argv; /* NULL-terminated */
    char **env;  /* NULL-terminated additions/overrides */
    int user;    /* EXEC_USER: run as uid/gid with these supplementary groups */
    uint32_t uid, gid, ngroups;
    const uint32_t *groups;
};

extern const char *opt_shell;
extern const char *opt_cwd;

/* Start a command; 0 or an errno (the request is then answered by the caller). */
int proc_spawn(struct conn *c, uint32_t rid, const struct exec_req *req);
struct proc *proc_find(struct conn *c, uint32_t rid);
void proc_stdin(struct proc *p, const uint8_t *data, uint32_t len);
void proc_stdin_eof(struct proc *p);
void proc_kill(struct proc *p, int sig);
void proc_event(struct watch *w, uint32_t events);
void proc_detach_all(struct conn *c); /* the connection closes: kill its commands */
void proc_update_interest(struct conn *c);
void proc_timers(uint64_t now, int64_t *wait_ms);
void proc_reap(void);
int proc_signal_fd(void); /* signalfd for SIGCHLD, made once */

/* ------------------------------------------------------------ seed -- */

/* SEED: entropy into the kernel's pool, the wall clock, $RANDOM seeds; 0 or an errno. */
int seed_apply(const struct ag_seed *s);
/* Before each command once seeded: RANDOM=<next seed number> in the base environment. */
void seed_before_exec(void);

/* ------------------------------------------------------------ init -- */

struct init_result {
    const char *shell; /* for EXEC_SHELL; NULL = /bin/sh */
};

/* PID 1 duties before serving: mounts, hostname, lo, optional root switch. */
void init_system(const char *cmdline_override, struct init_result *out);
void init_debug_shell(void);

#endif
