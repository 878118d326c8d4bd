/*
 * The guest agent protocol (docs/agent-protocol.md, version 1) for C agents:
 * the one copy both guests compile, the Linux agent (guest/agent) and the
 * freestanding microguest (guest/microguest).
 *
 * What is here is what the wire fixes: ports, magic, version, the 12-byte
 * frame header, message types and flag bits, the HELLO layout, and readers
 * that check a frame header, a host's HELLO and the payloads of the host's
 * requests exactly as the document says. What each agent chooses (the
 * max_frame and max_inflight it announces, its software name) stays in its own
 * header. The Python copy of the constants is
 * pytest_supermachine/vmm/agent/protocol.py; tests/unit/test_agent_protocol_header.py
 * compiles this header and checks the two agree.
 *
 * Freestanding: <stdint.h> only (which gcc provides without a libc), every
 * function static inline, no allocation. Everything returns its verdict: a
 * problem is a `struct ag_problem` (a printf format and up to three unsigned
 * arguments) or a reason string, for the caller to send in its ERROR.
 */
#ifndef AGENT_PROTOCOL_H
#define AGENT_PROTOCOL_H

#include <stdint.h>

/*
 * How a hex number with its 0x reads in the includer's printf: "%#x" for libc;
 * the microguest's printf (whose %x always prints 0x) defines "%x" first.
 */
#ifndef AG_HEX
#define AG_HEX "%#x"
#endif

/* ------------------------------------------------------------ constants -- */

#define AG_PORT 5253u       /* the agent listens here (vsock, any CID it owns) */
#define AG_READY_PORT 5254u /* the agent connects here (host CID 2) to say READY */
#define AG_HOST_CID 2u
#define AG_MAGIC 0x47414D53u /* "SMAG" little-endian */
#define AG_VERSION 1u
#define AG_HDR 12u                    /* frame header: length, type, flags, request id */
#define AG_MIN_FRAME 4096u            /* the smallest max_frame a peer may announce */
#define AG_MAX_FRAME_LIMIT (16u << 20) /* the largest max_frame a peer may announce */
#define AG_MAX_PING 4096u
#define AG_MAX_SOFTWARE 256u
#define AG_HELLO_FIXED 28u /* magic, version, capabilities, max_frame, max_inflight, name length */

#define AG_CAP_EXEC (1u << 0)
#define AG_CAP_SHELL (1u << 1)
#define AG_CAP_STDIN (1u << 2)
#define AG_CAP_ENV (1u << 3)
#define AG_CAP_CWD (1u << 4)
#define AG_CAP_FILES (1u << 5)
#define AG_CAP_KILL (1u << 6)
#define AG_CAP_TIMEOUT (1u << 7)
#define AG_CAP_ALL ((1u << 8) - 1) /* the base set every version-1 agent has */
#define AG_CAP_USER (1u << 8)     /* EXEC_USER: a command runs as a uid/gid/groups */
#define AG_CAP_SEED (1u << 10)    /* SEED: a per-test seed and wall clock (both agents) */
#define AG_MAX_SEED 256u
/* TCP_CONNECT (an agent with a TCP/IP stack: the Linux one; not in AG_CAP_ALL) */
#define AG_CAP_TCP (1u << 9)

enum msg_type {
    MSG_HELLO = 0x01,
    MSG_READY = 0x02,
    MSG_PING = 0x03,
    MSG_PONG = 0x04,
    MSG_OK = 0x05,
    MSG_ERROR = 0x06,
    MSG_EXEC = 0x10,
    MSG_STDIN = 0x11,
    MSG_STDIN_EOF = 0x12,
    MSG_STDOUT = 0x13,
    MSG_STDERR = 0x14,
    MSG_EXIT = 0x15,
    MSG_KILL = 0x16,
    MSG_PUT_FILE = 0x20,
    MSG_GET_FILE = 0x21,
    MSG_FILE_DATA = 0x22,
    MSG_SEED = 0x40,
    MSG_TCP_CONNECT = 0x41,
};

#define EXEC_STDIN 1u
#define EXEC_SHELL 2u
#define EXEC_USER 4u
#define AG_MAX_GROUPS 256u /* supplementary groups an EXEC_USER may name */
#define EXIT_SIGNALED 1u
#define EXIT_TIMED_OUT 2u
#define PUT_APPEND 1u
#define FILE_MORE 1u
#define SEED_RESEED 1u

/* ------------------------------------------------------ little endian -- */

static inline uint16_t ld16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }
static inline uint32_t ld32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static inline uint64_t ld64(const uint8_t *p) { return ld32(p) | (uint64_t)ld32(p + 4) << 32; }
static inline void st16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}
static inline void st32(uint8_t *p, uint32_t v)
{
    st16(p, (uint16_t)v);
    st16(p + 2, (uint16_t)(v >> 16));
}
static inline void st64(uint8_t *p, uint64_t v)
{
    st32(p, (uint32_t)v);
    st32(p + 4, (uint32_t)(v >> 32));
}

/* ------------------------------------------------------------ problems -- */

struct ag_problem {
    const char *fmt; /* printf format taking a, b and c (it may use fewer) */
    uint32_t a, b, c;
};

static inline int ag_problem(struct ag_problem *why, const char *fmt, uint32_t a, uint32_t b,
                             uint32_t c)
{
    why->fmt = fmt;
    why->a = a;
    why->b = b;
    why->c = c;
    return 1;
}

/* -------------------------------------------------------------- frames -- */

/* The frame header as it is on the wire: 12 bytes, little endian, no padding. */
struct ag_header {
    uint32_t len; /* payload bytes after the header */
    uint16_t type;
    uint16_t flags; /* reserved: 0 */
    uint32_t request_id;
};

static inline struct ag_header ag_header_load(const uint8_t *p)
{
    struct ag_header h = {ld32(p), ld16(p + 4), ld16(p + 6), ld32(p + 8)};
    return h;
}

static inline void ag_header_store(uint8_t *p, uint16_t type, uint32_t request_id, uint32_t len)
{
    st32(p, len);
    st16(p + 4, type);
    st16(p + 6, 0);
    st32(p + 8, request_id);
}

static inline int ag_known_type(uint16_t t)
{
    return (t >= MSG_HELLO && t <= MSG_ERROR) || (t >= MSG_EXEC && t <= MSG_KILL) ||
           (t >= MSG_PUT_FILE && t <= MSG_FILE_DATA) || t == MSG_SEED || t == MSG_TCP_CONNECT;
}

/*
 * A header is judged alone, as soon as its 12 bytes are in (§2): a length
 * beyond what the agent accepts, reserved flags or an unknown type is a
 * protocol error before anything waits for (or allocates) the payload.
 */
static inline int ag_header_bad(const struct ag_header *h, uint32_t max_frame,
                                struct ag_problem *why)
{
    if (h->len > max_frame)
        return ag_problem(why, "frame of %u bytes exceeds max_frame %u", h->len, max_frame, 0);
    if (h->flags)
        return ag_problem(why, "frame flags " AG_HEX " are reserved (type " AG_HEX ")", h->flags,
                          h->type, 0);
    if (!ag_known_type(h->type))
        return ag_problem(why, "unknown message type " AG_HEX " (request %u)", h->type,
                          h->request_id, 0);
    return 0;
}

/* ------------------------------------------------------------ payloads -- */

/* A cursor over a payload: every read is bounds-checked; a short one sets `bad`. */
struct ag_reader {
    const uint8_t *p;
    uint32_t len, pos;
    int bad;
};

static inline struct ag_reader ag_reader(const uint8_t *p, uint32_t len)
{
    struct ag_reader r = {p, len, 0, 0};
    return r;
}

static inline uint32_t ag_rd_left(const struct ag_reader *r) { return r->len - r->pos; }

static inline uint32_t ag_rd_u32(struct ag_reader *r)
{
    if (ag_rd_left(r) < 4) {
        r->bad = 1;
        return 0;
    }
    r->pos += 4;
    return ld32(r->p + r->pos - 4);
}

/* A `bytes` field: u32 length, then that many bytes (*n = 0 and `bad` if it does not fit). */
static inline const uint8_t *ag_rd_bytes(struct ag_reader *r, uint32_t *n)
{
    *n = ag_rd_u32(r);
    if (r->bad || *n > ag_rd_left(r)) {
        r->bad = 1;
        *n = 0;
        return r->p;
    }
    r->pos += *n;
    return r->p + r->pos - *n;
}

static inline int ag_has_nul(const uint8_t *s, uint32_t n)
{
    for (uint32_t i = 0; i < n; i++)
        if (!s[i])
            return 1;
    return 0;
}

/* ------------------------------------------------------------ messages -- */

/* HELLO or READY payload of an agent; `p` has room for AG_HELLO_FIXED + the name. */
static inline uint32_t ag_hello_store(uint8_t *p, uint64_t capabilities, uint32_t max_frame,
                                      uint32_t max_inflight, const char *software)
{
    uint32_t n = 0;
    while (software[n] && n < AG_MAX_SOFTWARE) {
        p[AG_HELLO_FIXED + n] = (uint8_t)software[n];
        n++;
    }
    st32(p, AG_MAGIC);
    st32(p + 4, AG_VERSION);
    st64(p + 8, capabilities);
    st32(p + 16, max_frame);
    st32(p + 20, max_inflight);
    st32(p + 24, n);
    return AG_HELLO_FIXED + n;
}

/*
 * The first frame of a connection must be the host's HELLO on request 0, of
 * our magic and version, well formed, announcing a max_frame within limits
 * (stored in *host_max_frame). Its capabilities and max_inflight ask nothing
 * of the agent.
 */
static inline int ag_host_hello_bad(const struct ag_header *h, const uint8_t *p,
                                    uint32_t *host_max_frame, struct ag_problem *why)
{
    if (h->type != MSG_HELLO)
        return ag_problem(why, "expected HELLO first, got type " AG_HEX " (request %u)", h->type,
                          h->request_id, 0);
    if (h->request_id != 0)
        return ag_problem(why, "HELLO must use request id 0, not %u", h->request_id, 0, 0);
    struct ag_reader r = ag_reader(p, h->len);
    uint32_t magic = ag_rd_u32(&r), version = ag_rd_u32(&r);
    if (r.bad || magic != AG_MAGIC)
        return ag_problem(why,
                          "malformed HELLO (%u bytes, magic " AG_HEX
                          "): not the supermachine agent protocol",
                          h->len, magic, 0);
    if (version != AG_VERSION)
        return ag_problem(why, "agent speaks protocol version %u, host %u", AG_VERSION, version,
                          0);
    ag_rd_u32(&r), ag_rd_u32(&r); /* capabilities */
    uint32_t max_frame = ag_rd_u32(&r);
    ag_rd_u32(&r); /* max_inflight */
    uint32_t software_len;
    ag_rd_bytes(&r, &software_len);
    if (r.bad || ag_rd_left(&r))
        return ag_problem(why, "malformed HELLO (%u bytes)", h->len, 0, 0);
    if (max_frame < AG_MIN_FRAME || max_frame > AG_MAX_FRAME_LIMIT)
        return ag_problem(why, "HELLO max_frame %u is outside %u..%u", max_frame, AG_MIN_FRAME,
                          AG_MAX_FRAME_LIMIT);
    *host_max_frame = max_frame;
    return 0;
}

/* KILL's signal, 0 if the payload is not one u32 in 1..64. */
static inline uint32_t ag_kill_signal(const uint8_t *p, uint32_t len)
{
    uint32_t sig = len == 4 ? ld32(p) : 0;
    return sig >= 1 && sig <= 64 ? sig : 0;
}

/*
 * After the handshake: what makes a host frame a protocol error. `id_in_use`
 * says whether the agent has the frame's request id open. The payload of a
 * request is judged next, by ag_request_bad: a bad one only fails that request.
 */
static inline int ag_host_frame_bad(const struct ag_header *h, const uint8_t *p, int id_in_use,
                                    struct ag_problem *why)
{
    switch (h->type) {
    case MSG_PING:
    case MSG_EXEC:
    case MSG_PUT_FILE:
    case MSG_GET_FILE:
    case MSG_SEED:
    case MSG_TCP_CONNECT: /* these open a request: its id must be new and nonzero */
        return h->request_id && !id_in_use
                   ? 0
                   : ag_problem(why, "request type " AG_HEX ": id %u is 0 or still open",
                                h->type, h->request_id, 0);
    case MSG_STDIN:
        return h->len ? 0 : ag_problem(why, "empty STDIN frame (request %u)", h->request_id, 0, 0);
    case MSG_STDIN_EOF:
        return h->len ? ag_problem(why, "STDIN_EOF with %u payload bytes (request %u)", h->len,
                                   h->request_id, 0)
                      : 0;
    case MSG_KILL:
        return ag_kill_signal(p, h->len)
                   ? 0
                   : ag_problem(why, "malformed KILL (%u bytes, signal %u)", h->len,
                                h->len == 4 ? ld32(p) : 0, 0);
    default:
        return ag_problem(why, "message type " AG_HEX " is not a host request (request %u)",
                          h->type, h->request_id, 0);
    }
}

/*
 * EXEC (§4): the fixed part and cwd by ag_exec_begin, then argc argv entries
 * by ag_exec_arg, envc env entries by ag_exec_env, with EXEC_USER the user by
 * ag_exec_user, and ag_exec_end. Each
 * returns 0 or what is wrong (answered with EINVAL on the request).
 */
struct ag_exec {
    uint32_t flags, timeout_ms, argc, envc;
    int user; /* EXEC_USER: ag_exec_user reads uid, gid, groups after env */
    const uint8_t *cwd; /* not NUL-terminated; cwd_len 0 = the agent's */
    uint32_t cwd_len;
    int shell;
    struct ag_reader r;
};

static inline int ag_exec_begin(struct ag_exec *e, const uint8_t *p, uint32_t len,
                                struct ag_problem *why)
{
    e->r = ag_reader(p, len);
    e->flags = ag_rd_u32(&e->r);
    e->timeout_ms = ag_rd_u32(&e->r);
    e->argc = ag_rd_u32(&e->r);
    e->envc = ag_rd_u32(&e->r);
    e->cwd = ag_rd_bytes(&e->r, &e->cwd_len);
    if (e->r.bad)
        return ag_problem(why, "EXEC payload too short (%u bytes)", len, 0, 0);
    if (e->flags & ~(EXEC_STDIN | EXEC_SHELL | EXEC_USER))
        return ag_problem(why, "EXEC flags " AG_HEX ": unknown bits", e->flags, 0, 0);
    e->shell = (e->flags & EXEC_SHELL) != 0;
    e->user = (e->flags & EXEC_USER) != 0;
    /* each entry takes at least its 4-byte length: bounds the counts before anything is sized */
    uint64_t left = ag_rd_left(&e->r);
    if (e->argc < 1 || (e->shell && e->argc != 1) || (uint64_t)e->argc * 4 > left)
        return ag_problem(why, "EXEC argc %u is invalid", e->argc, 0, 0);
    if ((uint64_t)e->envc * 4 > left - (uint64_t)e->argc * 4)
        return ag_problem(why, "EXEC envc %u does not fit the payload", e->envc, 0, 0);
    if (ag_has_nul(e->cwd, e->cwd_len))
        return ag_problem(why, "NUL byte in cwd", 0, 0, 0);
    return 0;
}

static inline const char *ag_exec_arg(struct ag_exec *e, const uint8_t **s, uint32_t *n)
{
    *s = ag_rd_bytes(&e->r, n);
    if (e->r.bad)
        return "argv runs past the payload";
    return ag_has_nul(*s, *n) ? "NUL byte in argv" : 0;
}

static inline const char *ag_exec_env(struct ag_exec *e, const uint8_t **s, uint32_t *n)
{
    *s = ag_rd_bytes(&e->r, n);
    if (e->r.bad)
        return "env runs past the payload";
    uint32_t eq = 0;
    while (eq < *n && (*s)[eq] != '=')
        eq++;
    if (ag_has_nul(*s, *n) || eq == 0 || eq == *n)
        return "env entries must be NAME=VALUE without NUL";
    return 0;
}

/*
 * With EXEC_USER, after env: u32 uid, u32 gid, u32 ngroups (<= AG_MAX_GROUPS),
 * ngroups x u32 supplementary gids, stored in `groups` (room for AG_MAX_GROUPS).
 */
static inline const char *ag_exec_user(struct ag_exec *e, uint32_t *uid, uint32_t *gid,
                                       uint32_t *ngroups, uint32_t *groups)
{
    *uid = ag_rd_u32(&e->r);
    *gid = ag_rd_u32(&e->r);
    *ngroups = ag_rd_u32(&e->r);
    if (e->r.bad)
        return "EXEC_USER fields run past the payload";
    if (*ngroups > AG_MAX_GROUPS || (uint64_t)*ngroups * 4 > ag_rd_left(&e->r))
        return "EXEC_USER ngroups is invalid";
    for (uint32_t i = 0; i < *ngroups; i++)
        groups[i] = ag_rd_u32(&e->r);
    return 0;
}

static inline const char *ag_exec_end(const struct ag_exec *e)
{
    return ag_rd_left(&e->r) ? "trailing bytes after env" : 0;
}

/* PUT_FILE (§5): mode, flags, path, then the data to the end of the payload. */
struct ag_put_file {
    uint32_t mode, flags;
    const uint8_t *path; /* not NUL-terminated, no NUL inside, not empty */
    uint32_t path_len;
    const uint8_t *data;
    uint32_t data_len;
};

static inline int ag_put_file_bad(struct ag_put_file *f, const uint8_t *p, uint32_t len,
                                  struct ag_problem *why)
{
    struct ag_reader r = ag_reader(p, len);
    f->mode = ag_rd_u32(&r);
    f->flags = ag_rd_u32(&r);
    f->path = ag_rd_bytes(&r, &f->path_len);
    if (r.bad || !f->path_len || ag_has_nul(f->path, f->path_len) || (f->mode & ~07777u) ||
        (f->flags & ~PUT_APPEND))
        return ag_problem(why, "PUT_FILE: bad mode, flags or path", 0, 0, 0);
    f->data = p + r.pos;
    f->data_len = ag_rd_left(&r);
    return 0;
}

/* SEED (§4): flags, the wall clock to set (0 = leave it), then 1..AG_MAX_SEED seed bytes. */
struct ag_seed {
    uint32_t flags;
    uint64_t wall_ns;
    const uint8_t *seed;
    uint32_t seed_len;
};

static inline int ag_seed_bad(struct ag_seed *s, const uint8_t *p, uint32_t len,
                              struct ag_problem *why)
{
    if (len < 13 || len > 12 + AG_MAX_SEED)
        return ag_problem(why, "SEED payload of %u bytes (13..%u)", len, 12 + AG_MAX_SEED, 0);
    s->flags = ld32(p);
    s->wall_ns = ld64(p + 4);
    s->seed = p + 12;
    s->seed_len = len - 12;
    if (s->flags & ~SEED_RESEED)
        return ag_problem(why, "SEED flags " AG_HEX ": unknown bits", s->flags, 0, 0);
    return 0;
}

/*
 * splitmix64: how both agents turn a seed into numbers (the microguest's `rand`
 * builtin, the Linux agent's per-command $RANDOM seeds). Fixed here so a seed
 * means the same sequence in every agent and in tests/agent_peer.py.
 */
static inline uint64_t ag_splitmix64(uint64_t *state)
{
    uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* The 64-bit state a SEED's bytes give: FNV-1a over them, then one splitmix step. */
static inline uint64_t ag_seed_state(const uint8_t *seed, uint32_t n)
{
    uint64_t h = 0xCBF29CE484222325ull;
    for (uint32_t i = 0; i < n; i++)
        h = (h ^ seed[i]) * 0x100000001B3ull;
    return ag_splitmix64(&h);
}

/* A request's payload, as far as the protocol judges it (each kind in its member). */
struct ag_request {
    struct ag_exec exec;    /* EXEC: argv and env still to be read */
    struct ag_put_file put; /* PUT_FILE */
    const uint8_t *path;    /* GET_FILE: the whole payload, not NUL-terminated */
    struct ag_seed seed;    /* SEED */
    uint32_t port;          /* TCP_CONNECT */
};

/*
 * The payload of a frame that opens a request (PING, EXEC, PUT_FILE,
 * GET_FILE, SEED), checked: a bad one is answered with EINVAL on that request and
 * the connection lives on.
 */
static inline int ag_request_bad(const struct ag_header *h, const uint8_t *p,
                                 struct ag_request *req, struct ag_problem *why)
{
    switch (h->type) {
    case MSG_PING:
        return h->len > AG_MAX_PING ? ag_problem(why, "PING payload of %u bytes (at most %u)",
                                                 h->len, AG_MAX_PING, 0)
                                    : 0;
    case MSG_EXEC:
        return ag_exec_begin(&req->exec, p, h->len, why);
    case MSG_PUT_FILE:
        return ag_put_file_bad(&req->put, p, h->len, why);
    case MSG_GET_FILE:
        req->path = p;
        return !h->len || ag_has_nul(p, h->len) ? ag_problem(why, "GET_FILE: bad path", 0, 0, 0)
                                                : 0;
    case MSG_SEED:
        return ag_seed_bad(&req->seed, p, h->len, why);
    case MSG_TCP_CONNECT:
        req->port = h->len == 4 ? ld32(p) : 0;
        return req->port >= 1 && req->port <= 65535
                   ? 0
                   : ag_problem(why, "TCP_CONNECT: %u payload bytes, port %u (want u32 1..65535)",
                                h->len, req->port, 0);
    default:
        return 0;
    }
}

#endif
