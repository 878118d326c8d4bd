/*
 * AGENT mode: the microguest serves the agent protocol (docs/agent-protocol.md,
 * version 1; executable reference: tests/agent_peer.py) over virtio-vsock,
 * with built-in commands instead of programs (builtins.c). It is a test guest:
 * it exists so the VMM, the devices and the host side of the protocol can be
 * tested and measured end to end in milliseconds, without a Linux guest.
 *
 * Where things run: CPL0 (emulated, ~1.5 M instructions/s here) only sets up
 * the CPU, the IOAPIC/LAPIC and the TSC rate, then enters mg_agent_main at
 * CPL3 for good. Everything here runs at CPL3, natively. CPL0 is re-entered
 * through the ud2 gate only to idle (MG_SYS_WAIT: sti; hlt until an interrupt
 * or the next timer deadline), to print and to write the control port; the
 * interrupt entries ACK the device and EOI, nothing more.
 *
 * The main loop: take what the devices returned (vsock_poll, blk_poll), parse
 * complete frames of every connection (dispatch), let every task run until it
 * waits (sched_run), push output to the host (vsock_flush); repeat while
 * anything moved, else enable device interrupts, re-check, and halt.
 */
#include "agent.h"

#define RESPONSE_ROOM (AG_HDR + 4096u + 64u) /* the largest answer the dispatcher writes (PONG) */
#define HEAP_MAX (64ull << 20)

enum { FRAME_DONE, FRAME_STALL, FRAME_CLOSED };

/* Per-connection protocol state, alongside vs_conns[] (same index). */
struct aconn {
    int hello;
    uint32_t host_max_frame;
    struct task *stalled; /* a STDIN frame at the front of rx belongs to this task */
};

uint64_t ag_tsc_khz, ag_progress;
static uint64_t ns_mult; /* ns = tsc * ns_mult >> 32 */
static uint64_t bump, bump_end;
static struct aconn aconns[VS_MAX_CONNS];
static struct vs_conn *ready_conn;

/* ----------------------------------------------------------------- basics -- */

void ag_printf(const char *fmt, ...)
{
    char buf[256];
    va_list ap;
    va_start(ap, fmt);
    mg_vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    mg_user_gate(MG_SYS_PUTS, (uint64_t)buf);
}

void ag_panic(uint32_t code, const char *why)
{
    ag_printf("microguest: agent: %s\n", why);
    mg_user_gate(MG_SYS_CONTROL, SM_CTL_PANIC | code << 8);
    for (;;)
        mg_user_gate(MG_SYS_HANG, 0);
}

uint64_t ag_ms_to_tsc(uint64_t ms) { return ms * ag_tsc_khz; }

uint64_t ag_tsc_to_ns(uint64_t tsc) { return (uint64_t)(((unsigned __int128)tsc * ns_mult) >> 32); }

/*
 * Boot-time allocations (rings, buffers, stacks) from the RAM above the image.
 * Not zeroed on purpose: freshly booted guest RAM is zero, and touching it
 * would make every page resident (and part of every snapshot) for nothing.
 */
void *ag_alloc(uint64_t bytes)
{
    uint64_t p = bump;
    bytes = mg_align_up(bytes, MG_PAGE_SIZE);
    if (bytes > bump_end - bump)
        ag_panic(MG_PANIC_AGENT_NO_MEMORY, "not enough RAM for the agent's buffers (~14 MiB; give the machine 32 MiB or more)");
    bump += bytes;
    return (void *)p;
}

/* ----------------------------------------------------------------- frames -- */

uint32_t agent_host_max_frame(struct vs_conn *c) { return aconns[c->id].host_max_frame; }

void agent_put_frame2(struct vs_conn *c, uint16_t type, uint32_t rid, const void *a, uint32_t alen,
                      const void *b, uint32_t blen)
{
    uint8_t h[AG_HDR];
    ag_header_store(h, type, rid, alen + blen);
    vs_tx_put(c, h, AG_HDR);
    if (alen)
        vs_tx_put(c, a, alen);
    if (blen)
        vs_tx_put(c, b, blen);
}

void agent_put_frame(struct vs_conn *c, uint16_t type, uint32_t rid, const void *payload,
                     uint32_t len)
{
    agent_put_frame2(c, type, rid, payload, len, 0, 0);
}

static void send_error(struct vs_conn *c, uint32_t rid, uint32_t err, const char *fmt, ...)
{
    uint8_t buf[4 + 200];
    va_list ap;
    va_start(ap, fmt);
    size_t n = mg_vsnprintf((char *)buf + 4, sizeof(buf) - 4, fmt, ap);
    va_end(ap);
    st32(buf, err);
    agent_put_frame(c, MSG_ERROR, rid, buf, 4 + (uint32_t)MG_MIN(n, sizeof(buf) - 5));
}

/* A protocol error ends the connection: one ERROR on request 0, then close (§2). */
static int protocol_error(struct vs_conn *c, const struct ag_problem *why)
{
    send_error(c, 0, E_PROTO, why->fmt, why->a, why->b, why->c);
    task_kill_conn(c);
    vsock_close(c);
    return FRAME_CLOSED;
}

static uint32_t hello_payload(uint8_t *p)
{
    return ag_hello_store(p, AG_CAP_ALL | AG_CAP_SEED, AG_MAX_FRAME, AG_MAX_INFLIGHT, MG_AGENT_SOFTWARE);
}

/* ------------------------------------------------------------ connections -- */

void agent_on_accept(struct vs_conn *c) { aconns[c->id] = (struct aconn){0, AG_MIN_FRAME, 0}; }

void agent_on_connected(struct vs_conn *c)
{
    if (c != ready_conn)
        return;
    uint8_t p[AG_HELLO_FIXED + 64];
    agent_put_frame(c, MSG_READY, 0, p, hello_payload(p)); /* §6: one READY, then close */
    vsock_close(c);
}

void agent_on_data(struct vs_conn *c) { (void)c; }

void agent_on_close(struct vs_conn *c)
{
    task_kill_conn(c);
    aconns[c->id].stalled = 0;
    if (c == ready_conn)
        ready_conn = 0;
}

/* ------------------------------------------------------------ task output -- */

int task_wait_room(struct task *t, uint32_t need)
{
    for (;;) {
        if (t->killed || !task_alive(t))
            return -1;
        if (vs_tx_room(t->conn) >= need)
            return 0;
        task_yield(t);
    }
}

int task_out(struct task *t, uint16_t type, const void *data, uint32_t n)
{
    const uint8_t *p = data;
    while (n) {
        uint32_t k = MG_MIN(n, MG_MIN(AG_OUT_CHUNK, agent_host_max_frame(t->conn)));
        if (task_wait_room(t, AG_HDR + k) < 0)
            return -1;
        agent_put_frame(t->conn, type, t->rid, p, k);
        p += k;
        n -= k;
    }
    return 0;
}

int task_printf(struct task *t, uint16_t type, const char *fmt, ...)
{
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    size_t n = mg_vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    return task_out(t, type, buf, (uint32_t)MG_MIN(n, sizeof(buf) - 1));
}

int task_stdin_wait(struct task *t)
{
    for (;;) {
        if (t->killed || !task_alive(t))
            return -1;
        if (t->stdin_ready)
            return 1;
        if (t->stdin_eof)
            return 0;
        task_yield(t);
    }
}

/* The stalled STDIN frame is at the front of rx; recompute after every yield (rx compacts). */
const uint8_t *task_stdin_ptr(struct task *t, uint32_t *n)
{
    *n = t->stdin_len - t->stdin_pos;
    return vs_rx_ptr(t->conn) + AG_HDR + t->stdin_pos;
}

static void stdin_release(struct task *t)
{
    struct aconn *a = &aconns[t->conn->id];
    t->stdin_ready = 0;
    if (a->stalled == t && t->conn->gen == t->conn_gen) {
        a->stalled = 0;
        vs_rx_consume(t->conn, AG_HDR + t->stdin_len);
    }
}

void task_stdin_consume(struct task *t, uint32_t n)
{
    t->stdin_pos += n;
    if (t->stdin_pos >= t->stdin_len)
        stdin_release(t);
}

/* The task function returned: EXIT (unless it answered otherwise, status < 0). */
void agent_task_exit(struct task *t, int status)
{
    if (status < 0)
        return;
    for (;;) { /* not killable: a killed command still reports how it ended */
        if (!task_alive(t))
            return;
        if (vs_tx_room(t->conn) >= AG_HDR + 16)
            break;
        task_yield(t);
    }
    uint8_t p[16];
    uint32_t flags = 0;
    if (t->killed && t->kill_signal) {
        flags |= EXIT_SIGNALED;
        status = t->kill_signal;
    }
    if (t->timed_out)
        flags |= EXIT_TIMED_OUT;
    st32(p, flags);
    st32(p + 4, (uint32_t)status);
    st64(p + 8, ag_tsc_to_ns(ag_rdtsc() - t->start_tsc));
    agent_put_frame(t->conn, MSG_EXIT, t->rid, p, 16);
}

void agent_task_done(struct task *t)
{
    if (t->stdin_ready)
        stdin_release(t); /* a STDIN frame it never finished: ignored, like any late stdin */
}

/* -------------------------------------------------------------- requests -- */

/* Copy a byte string into the task's argument area as a C string. */
static char *arg_copy(struct task *t, uint32_t *used, const uint8_t *s, uint32_t n)
{
    if (*used + n + 1 > TASK_ARGS)
        return 0;
    char *d = (char *)t->args + *used;
    ag_copy(d, s, n);
    d[n] = 0;
    *used += n + 1;
    return d;
}

static int is_space(char ch) { return ch == ' ' || ch == '\t' || ch == '\n' || ch == '\r' || ch == '\v' || ch == '\f'; }

static const char *base_name(const char *s)
{
    const char *b = s;
    for (; *s; s++)
        if (*s == '/')
            b = s + 1;
    return b;
}

static int request_in_use(struct vs_conn *c, uint32_t rid) { return task_find(c, rid) != 0; }

static void handle_exec(struct vs_conn *c, uint32_t rid, struct ag_exec *x)
{
    uint32_t flags = x->flags, argc = x->argc, envc = x->envc;
    int shell = x->shell;
    if (task_count(c) >= (int)AG_MAX_INFLIGHT) {
        send_error(c, rid, E_BUSY, "too many requests (at most %u at once)", AG_MAX_INFLIGHT);
        return;
    }
    struct task *t = task_new(c, rid, 0);
    if (!t) {
        send_error(c, rid, E_BUSY, "no free task slot");
        return;
    }
    uint32_t used = 0;
    int err = 0;
    const char *why = "";
    if (!(t->cwd = arg_copy(t, &used, x->cwd, x->cwd_len)))
        err = E_2BIG, why = "arguments too long";
    for (uint32_t i = 0; i < argc && !err; i++) {
        uint32_t n;
        const uint8_t *a;
        const char *wrong = ag_exec_arg(x, &a, &n);
        if (wrong) {
            err = E_INVAL, why = wrong;
        } else if (shell) { /* the microguest's "shell": words split at white space */
            for (uint32_t k = 0; k < n && !err;) {
                while (k < n && is_space((char)a[k]))
                    k++;
                uint32_t s = k;
                while (k < n && !is_space((char)a[k]))
                    k++;
                if (k == s)
                    break;
                if (t->argc >= TASK_MAX_ARGS || !(t->argv[t->argc++] = arg_copy(t, &used, a + s, k - s)))
                    err = E_2BIG, why = "too many or too long arguments";
            }
        } else if (t->argc >= TASK_MAX_ARGS || !(t->argv[t->argc++] = arg_copy(t, &used, a, n))) {
            err = E_2BIG, why = "too many or too long arguments";
        }
    }
    for (uint32_t i = 0; i < envc && !err; i++) {
        uint32_t n;
        const uint8_t *e;
        const char *wrong = ag_exec_env(x, &e, &n);
        if (wrong)
            err = E_INVAL, why = wrong;
        else if (t->envc >= TASK_MAX_ENV || !(t->env[t->envc++] = arg_copy(t, &used, e, n)))
            err = E_2BIG, why = "environment too large";
    }
    if (!err && x->user) /* it has no users (and does not announce AG_CAP_USER) */
        err = E_INVAL, why = "EXEC_USER: the microguest has no users to run a command as";
    const char *trailing = err ? 0 : ag_exec_end(x);
    if (trailing)
        err = E_INVAL, why = trailing;
    if (err) {
        t->used = 0;
        send_error(c, rid, (uint32_t)err, "%s", why);
        return;
    }
    t->argv[t->argc] = 0;
    t->shell = shell;
    int reads_stdin = 0;
    const char *name = t->argc ? base_name(t->argv[0]) : "true"; /* an empty line does nothing */
    t->fn = builtin_find(name, &reads_stdin);
    if (!t->fn) {
        if (!shell) { /* like a failed execve */
            t->used = 0;
            send_error(c, rid, E_NOENT, "No such file or directory: %s", t->argv[0]);
            return;
        }
        t->fn = builtin_not_found; /* like sh: "not found" on stderr, exit 127 */
    }
    t->reads_stdin = (flags & EXEC_STDIN) && reads_stdin; /* else its STDIN frames are dropped */
    t->stdin_eof = !(flags & EXEC_STDIN);
    if (x->timeout_ms)
        t->deadline_tsc = t->start_tsc + ag_ms_to_tsc(x->timeout_ms);
    task_start(t);
}

static void handle_put(struct vs_conn *c, uint32_t rid, const struct ag_put_file *put)
{
    int f;
    if (put->flags & PUT_APPEND) {
        f = fs_lookup(put->path, put->path_len);
        if (f < 0) {
            send_error(c, rid, E_NOENT, "No such file or directory");
            return;
        }
    } else {
        f = fs_open(put->path, put->path_len, put->mode, 1);
        if (f < 0) {
            send_error(c, rid, (uint32_t)-f, f == -E_NOSPC ? "the file store is full (%u files)"
                                                          : "path too long", FS_MAX_FILES);
            return;
        }
    }
    if (fs_append(f, put->data, put->data_len) < 0) {
        send_error(c, rid, E_NOSPC, "No space left on device (files are at most %u bytes)",
                   FS_MAX_SIZE);
        return;
    }
    agent_put_frame(c, MSG_OK, rid, 0, 0);
}

static void handle_get(struct vs_conn *c, uint32_t rid, const uint8_t *p, uint32_t len)
{
    int f = fs_lookup(p, len);
    if (f < 0) {
        send_error(c, rid, E_NOENT, "No such file or directory");
        return;
    }
    uint64_t size;
    const uint8_t *data = fs_data(f, &size);
    uint8_t flags[4] = {0, 0, 0, 0};
    if (size + 4 <= MG_MIN(AG_OUT_CHUNK, aconns[c->id].host_max_frame) &&
        vs_tx_room(c) >= AG_HDR + 4 + size) { /* small: answer right here */
        agent_put_frame2(c, MSG_FILE_DATA, rid, flags, 4, data, (uint32_t)size);
        return;
    }
    if (task_count(c) >= (int)AG_MAX_INFLIGHT) {
        send_error(c, rid, E_BUSY, "too many requests (at most %u at once)", AG_MAX_INFLIGHT);
        return;
    }
    struct task *t = task_new(c, rid, builtin_get_file);
    if (!t) {
        send_error(c, rid, E_BUSY, "no free task slot");
        return;
    }
    t->file = f;
    t->stdin_eof = 1;
    task_start(t);
}

/* One complete frame. FRAME_STALL leaves it at the front of rx (stdin handed to a task). */
static int handle_frame(struct vs_conn *c, const struct ag_header *h, const uint8_t *p)
{
    struct aconn *a = &aconns[c->id];
    struct ag_problem bad;
    if (!a->hello) {
        if (ag_host_hello_bad(h, p, &a->host_max_frame, &bad))
            return protocol_error(c, &bad);
        a->hello = 1;
        uint8_t hello[AG_HELLO_FIXED + 64];
        agent_put_frame(c, MSG_HELLO, 0, hello, hello_payload(hello));
        return FRAME_DONE;
    }
    if (ag_host_frame_bad(h, p, request_in_use(c, h->request_id), &bad))
        return protocol_error(c, &bad);
    uint32_t rid = h->request_id, len = h->len;
    struct ag_request req;
    if (ag_request_bad(h, p, &req, &bad)) {
        send_error(c, rid, E_INVAL, bad.fmt, bad.a, bad.b, bad.c);
        return FRAME_DONE;
    }
    struct task *t;
    switch (h->type) {
    case MSG_PING:
        agent_put_frame(c, MSG_PONG, rid, p, len);
        return FRAME_DONE;
    case MSG_EXEC:
        handle_exec(c, rid, &req.exec);
        return FRAME_DONE;
    case MSG_PUT_FILE:
        handle_put(c, rid, &req.put);
        return FRAME_DONE;
    case MSG_GET_FILE:
        handle_get(c, rid, req.path, len);
        return FRAME_DONE;
    case MSG_SEED: /* no kernel RNG here: the seed is the `rand` builtin's state */
        builtins_seed(req.seed.seed, req.seed.seed_len, req.seed.wall_ns);
        agent_put_frame(c, MSG_OK, rid, 0, 0);
        return FRAME_DONE;
    case MSG_TCP_CONNECT: /* it does not announce AG_CAP_TCP; a host that asks anyway hears why */
        send_error(c, rid, E_NOSYS, "the microguest has no TCP/IP stack (port %u)", req.port);
        return FRAME_DONE;
    case MSG_STDIN:
        t = task_find(c, rid);
        if (!t || !t->reads_stdin || t->stdin_eof || t->killed)
            return FRAME_DONE; /* unknown, finished, or a command that reads no stdin: ignored */
        t->stdin_ready = 1;
        t->stdin_len = len;
        t->stdin_pos = 0;
        a->stalled = t;
        ag_progress++;
        return FRAME_STALL;
    case MSG_STDIN_EOF:
        if ((t = task_find(c, rid)))
            t->stdin_eof = 1;
        return FRAME_DONE;
    case MSG_KILL:
        if ((t = task_find(c, rid)) && !t->killed) {
            t->killed = 1;
            t->kill_signal = (int)ag_kill_signal(p, len);
        }
        return FRAME_DONE;
    }
    return FRAME_DONE; /* not reached: ag_host_frame_bad refused every other type */
}

static void dispatch(struct vs_conn *c)
{
    struct aconn *a = &aconns[c->id];
    while (c->state == VS_OPEN && !c->close_when_drained && !a->stalled) {
        uint32_t avail = vs_rx_len(c);
        if (avail < AG_HDR)
            return;
        const uint8_t *raw = vs_rx_ptr(c);
        struct ag_header h = ag_header_load(raw);
        if (vs_tx_room(c) < RESPONSE_ROOM)
            return; /* any answer must fit whole; the host drains us, room comes back */
        struct ag_problem bad;
        if (ag_header_bad(&h, AG_MAX_FRAME, &bad)) { /* checked on the header alone (§2) */
            protocol_error(c, &bad);
            return;
        }
        if (avail < AG_HDR + h.len)
            return;
        if (handle_frame(c, &h, raw + AG_HDR) != FRAME_DONE)
            return;
        vs_rx_consume(c, AG_HDR + h.len);
    }
}

/* -------------------------------------------------------------- main -- */

static MG_NORETURN void serve(void)
{
    int woke = 0;
    for (;;) {
        ag_progress = 0;
        vsock_poll();
        blk_poll();
        for (uint32_t i = 0; i < VS_MAX_CONNS; i++)
            dispatch(&vs_conns[i]);
        sched_run();
        for (uint32_t i = 0; i < VS_MAX_CONNS; i++)
            dispatch(&vs_conns[i]); /* tasks may have released stalled stdin */
        vsock_flush();
        if (ag_progress) {
            woke = 0;
            continue;
        }
        /*
         * A device interrupt with nothing to show is a configuration change: a
         * device in DEVICE_NEEDS_RESET (the interrupt entry does not read the
         * cause, to save an exit per interrupt). One that coincides with used
         * buffers is only noticed at the next empty wake-up; the VMM logs it
         * either way. A stale timer interrupt costs nothing here.
         */
        if (woke) {
            vsock_check();
            blk_check();
        }
        /* Idle: let the devices interrupt, look once more (they may have raced us), halt. */
        vsock_irq(1);
        blk_irq(1);
        if (!vsock_pending() && !blk_pending()) {
            for (uint32_t i = 0; i < MG_MAX_IRQ_DEVICES; i++)
                mg_irq_seen[i] = 0;
            mg_user_gate(MG_SYS_WAIT, sched_next_deadline());
        }
        vsock_irq(0);
        blk_irq(0);
        woke = 1;
    }
}

void mg_agent_main(uint64_t boot_info, uint64_t tsc_khz)
{
    const struct sm_boot_info *bi = (const struct sm_boot_info *)boot_info;
    ag_tsc_khz = tsc_khz;
    ns_mult = (1000000ull << 32) / tsc_khz;
    bump = mg_align_up(bi->free_start, MG_PAGE_SIZE);
    bump_end = bi->low_mem_end;

    int vs = -1, blk = -1;
    for (uint32_t i = 0; i < bi->ndevices && i < MG_MAX_IRQ_DEVICES; i++) {
        if (bi->devices[i].type == SM_DEV_VIRTIO_VSOCK && vs < 0)
            vs = (int)i;
        if (bi->devices[i].type == SM_DEV_VIRTIO_BLK && blk < 0)
            blk = (int)i;
    }
    if (vs < 0)
        ag_panic(MG_PANIC_AGENT_NO_VSOCK, "no virtio-vsock device in the boot info");
    if (vsock_init(&bi->devices[vs], (uint32_t)vs) < 0)
        ag_panic(MG_PANIC_AGENT_NO_VSOCK, "virtio-vsock initialisation failed");
    if (blk >= 0 && blk_init(&bi->devices[blk], (uint32_t)blk) < 0)
        ag_printf("microguest: agent: virtio-blk initialisation failed; blk-* commands disabled\n");
    task_init();

    /* What is left: the file store's heap, then the `dirty` scratch area. */
    uint64_t left = (bump_end - bump) & ~(MG_PAGE_SIZE - 1);
    uint64_t heap = MG_MIN(left / 2, HEAP_MAX) & ~(MG_PAGE_SIZE - 1);
    uint64_t heap_base = (uint64_t)ag_alloc(heap ? heap : MG_PAGE_SIZE);
    fs_init(heap_base, heap);
    uint64_t scratch = bump;
    builtins_init(bi, scratch, (bump_end - scratch) / MG_PAGE_SIZE);
    mg_user_gate(MG_SYS_CONTROL, SM_CTL_MARK | MG_MARK_AGENT_DEVICES << 8);

    vsock_listen(AG_PORT);
    mg_user_gate(MG_SYS_CONTROL, SM_CTL_READY);
    ready_conn = vsock_connect(AG_READY_PORT);
    ag_printf("microguest: agent listening on vsock port %u cid %lu tsc_khz %lu\n", AG_PORT,
              vsock_cid(), tsc_khz);
    serve();
}
