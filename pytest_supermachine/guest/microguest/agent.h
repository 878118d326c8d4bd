/*
 * The microguest agent (AGENT mode): internal declarations shared by
 * virtio.c, vsock.c, blk.c, task.c, files.c, agent.c and builtins.c.
 *
 * Everything declared here runs at CPL3, natively (CPL0 is emulated ~1000x
 * slower under nested PVM): ring handling, packet and frame parsing, copying,
 * the task scheduler and the built-in commands. CPL0 is entered only through
 * mg_user_gate: to halt until an interrupt (MG_SYS_WAIT), to print, and to
 * write the control port. The agent is single-threaded on the BSP and runs
 * with IF=0; interrupts are only taken inside MG_SYS_WAIT's hlt.
 */
#ifndef MG_AGENT_H
#define MG_AGENT_H

#include "microguest.h"

#define AG_HEX "%x" /* mg_vsnprintf's %x prints the 0x itself */
#include "agent_protocol.h" /* pytest_supermachine/guest/include: the wire format */

#define MG_AGENT_SOFTWARE "microguest-agent 1"

/* Linux errno values the protocol uses (docs/agent-protocol.md: Linux numbering). */
#define E_NOENT 2
#define E_IO 5
#define E_2BIG 7
#define E_BUSY 16
#define E_ISDIR 21
#define E_INVAL 22
#define E_FBIG 27
#define E_NOSPC 28
#define E_NAMETOOLONG 36
#define E_NOSYS 38
#define E_PROTO 71

/* ------------------------------------------------------------ helpers -- */

#define MG_MIN(a, b) ((a) < (b) ? (a) : (b))
#define MG_MAX(a, b) ((a) > (b) ? (a) : (b))
#define MG_BARRIER() __asm__ volatile("" ::: "memory")

/* rep movsb/stosb: native and fast at CPL3 (lib.c's loops are for CPL0's emulator). */
static inline void ag_copy(void *dst, const void *src, size_t n)
{
    __asm__ volatile("rep movsb" : "+D"(dst), "+S"(src), "+c"(n) : : "memory");
}

static inline void ag_zero(void *dst, size_t n)
{
    __asm__ volatile("rep stosb" : "+D"(dst), "+c"(n) : "a"(0) : "memory");
}

static inline uint64_t ag_rdtsc(void)
{
    uint32_t lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
}

/* agent.c: console, time, memory. */
void ag_printf(const char *fmt, ...); /* formats at CPL3, prints via MG_SYS_PUTS (slow: ~15 us/char) */
MG_NORETURN void ag_panic(uint32_t code, const char *why);
extern uint64_t ag_tsc_khz;
uint64_t ag_ms_to_tsc(uint64_t ms);
uint64_t ag_tsc_to_ns(uint64_t tsc);
void *ag_alloc(uint64_t bytes); /* boot-time bump allocator, page aligned, zeroed; panics */
extern uint64_t ag_progress;    /* bumped by anything that moved; the main loop idles at 0 */

/* ------------------------------------------------------------- virtio -- */

struct vq_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};
#define VQ_DESC_F_NEXT 1
#define VQ_DESC_F_WRITE 2
#define VQ_AVAIL_F_NO_INTERRUPT 1

struct vq_used_elem {
    uint32_t id;
    uint32_t len;
};

/* One split virtqueue; descriptor ids are owned by the device driver (fixed per buffer). */
struct vq {
    uint16_t index, size;
    struct vq_desc *desc;
    volatile uint16_t *avail; /* flags, idx, ring[size] */
    volatile uint16_t *used;  /* flags, idx, then struct vq_used_elem ring[size] at +4 */
    uint16_t avail_idx;       /* our shadow of avail->idx */
    uint16_t last_used;
    volatile uint32_t *notify;
};

struct virtio_dev {
    volatile uint8_t *mmio;
    uint32_t irq_index; /* boot device index (its vector is MG_VEC_DEVICE + index) */
    uint64_t features;  /* accepted device-specific features (bits 0-31) */
};

/* Reset, handshake up to FEATURES_OK. `want` = device feature bits (0-23) to accept if offered. */
int virtio_init(struct virtio_dev *dev, uint64_t mmio_base, uint32_t device_id, uint32_t want,
                uint32_t irq_index);
int virtio_setup_queue(struct virtio_dev *dev, struct vq *q, uint16_t index, uint16_t size);
void virtio_driver_ok(struct virtio_dev *dev);
uint32_t virtio_config32(struct virtio_dev *dev, uint32_t offset);
int virtio_needs_reset(struct virtio_dev *dev);
void vq_push(struct vq *q, uint16_t head);
int vq_pop_used(struct vq *q, uint32_t *id, uint32_t *len);
static inline int vq_has_used(struct vq *q) { return q->last_used != q->used[1]; }
static inline void vq_kick(struct vq *q) { *q->notify = q->index; }
void vq_irq(struct vq *q, int enable);

/* -------------------------------------------------------------- vsock -- */

#define VS_HOST_CID 2
#define VS_MAX_CONNS 8

enum vs_state { VS_FREE, VS_CONNECTING, VS_OPEN, VS_CLOSING };

/* One stream connection: byte buffers both ways, credit both ways. */
struct vs_conn {
    uint32_t state, gen, id;
    uint32_t local_port, peer_port;
    /* host -> guest: a linear buffer; [rx_start, rx_end) unread, compacted lazily */
    uint8_t *rx;
    uint32_t rx_cap, rx_start, rx_end;
    uint32_t rx_cnt;                 /* bytes received */
    uint32_t fwd_cnt, last_fwd_sent; /* bytes the agent consumed; last told the host */
    /* guest -> host: a ring; tx_head written by the agent, tx_tail sent */
    uint8_t *tx;
    uint32_t tx_cap; /* power of two */
    uint64_t tx_head, tx_tail;
    uint32_t tx_cnt, peer_buf_alloc, peer_fwd_cnt;
    uint32_t ctrl;  /* VS_CTRL_* packets owed to the host */
    int close_when_drained;
};

extern struct vs_conn vs_conns[VS_MAX_CONNS];

int vsock_init(const struct sm_boot_device *bd, uint32_t irq_index);
uint64_t vsock_cid(void);
void vsock_listen(uint32_t port);
struct vs_conn *vsock_connect(uint32_t port); /* to the host (CID 2); NULL if no slot */
void vsock_poll(void);  /* rx, events, tx completions: feed connections */
void vsock_flush(void); /* connections' tx buffers and control packets out; kick */
void vsock_irq(int enable);
int vsock_pending(void); /* the device left something in a used ring */
void vsock_check(void); /* panics if the device needs a reset */
void vsock_close(struct vs_conn *c); /* SHUTDOWN once everything written has been sent */
void vsock_abort(struct vs_conn *c); /* RST now, drop */

static inline uint32_t vs_rx_len(struct vs_conn *c) { return c->rx_end - c->rx_start; }
static inline uint8_t *vs_rx_ptr(struct vs_conn *c) { return c->rx + c->rx_start; }
void vs_rx_consume(struct vs_conn *c, uint32_t n);
static inline uint32_t vs_tx_room(struct vs_conn *c)
{
    return c->tx_cap - (uint32_t)(c->tx_head - c->tx_tail);
}
void vs_tx_put(struct vs_conn *c, const void *data, uint32_t n); /* caller checked the room */

/* Upcalls into agent.c. */
void agent_on_accept(struct vs_conn *c);
void agent_on_connected(struct vs_conn *c);
void agent_on_data(struct vs_conn *c);
void agent_on_close(struct vs_conn *c); /* c is about to be freed: forget it */

/* ---------------------------------------------------------------- blk -- */

#define BLK_SECTOR 512u
#define BLK_T_IN 0u
#define BLK_T_OUT 1u
#define BLK_T_FLUSH 4u
#define BLK_T_GET_ID 8u
#define BLK_CHUNK (64u * 1024) /* bytes of one request's bounce buffer */

int blk_init(const struct sm_boot_device *bd, uint32_t irq_index);
int blk_present(void);
uint64_t blk_capacity(void); /* 512-byte sectors */
int blk_read_only(void);
void blk_poll(void);
void blk_irq(int enable);
int blk_pending(void);
void blk_check(void);

/* From a task (see blk.c): take a request slot, run requests on its buffer, give it back. */
struct task;
uint8_t *blk_begin(struct task *t, int *slot);
int blk_run(struct task *t, int slot, uint32_t type, uint64_t sector, uint32_t len);
void blk_end(int slot);

/* --------------------------------------------------------------- tasks -- */

/* Every connection can have all its requests open at once: EBUSY only past max_inflight. */
#define TASK_MAX (VS_MAX_CONNS * AG_MAX_INFLIGHT)
#define TASK_STACK (16u * 1024)
#define TASK_ARGS (16u * 1024) /* argv, env, cwd as C strings: room for a 4 KiB blk-write */
#define TASK_MAX_ARGS 64
#define TASK_MAX_ENV 32

struct task;
typedef int (*task_fn)(struct task *t); /* returns the exit status */

struct task {
    int used;
    uint64_t sp;
    uint8_t *stack, *args; /* TASK_STACK / TASK_ARGS bytes */
    task_fn fn;
    /* the request */
    struct vs_conn *conn;
    uint32_t conn_gen, rid;
    uint64_t start_tsc, deadline_tsc; /* deadline: EXEC timeout (0 = none) */
    uint64_t wake_tsc;                /* a sleeping task's alarm (0 = none) */
    int killed, kill_signal, timed_out, finished;
    int shell;
    int argc, envc;
    char *argv[TASK_MAX_ARGS + 1];
    char *env[TASK_MAX_ENV];
    char *cwd;
    /* stdin: a STDIN frame parked at the front of conn->rx, handed to this task */
    int reads_stdin, stdin_eof, stdin_ready;
    uint32_t stdin_len, stdin_pos;
    /* GET_FILE */
    int file;
};

void task_init(void);
struct task *task_new(struct vs_conn *c, uint32_t rid, task_fn fn);
void task_start(struct task *t);
struct task *task_find(struct vs_conn *c, uint32_t rid);
int task_count(struct vs_conn *c);
void task_yield(struct task *t);
void sched_run(void);
uint64_t sched_next_deadline(void);
int task_alive(struct task *t); /* its connection still exists */
void task_kill_conn(struct vs_conn *c);

/* Output: whole frames, ≤ the host's max_frame; blocks for room. -1 if killed or gone. */
int task_wait_room(struct task *t, uint32_t need);
int task_out(struct task *t, uint16_t type, const void *data, uint32_t n);
int task_printf(struct task *t, uint16_t type, const char *fmt, ...);
/* Stdin: 1 = data ready (task_stdin_ptr), 0 = EOF, -1 = killed or gone. */
int task_stdin_wait(struct task *t);
const uint8_t *task_stdin_ptr(struct task *t, uint32_t *n);
void task_stdin_consume(struct task *t, uint32_t n);
int task_sleep_until(struct task *t, uint64_t tsc); /* 0 = slept, -1 = killed */

/* ------------------------------------------------------------ protocol -- */

/* What this agent accepts and offers (the wire format is agent_protocol.h). */
#define AG_MAX_FRAME (256u * 1024) /* what we accept; buffers are sized from it */
#define AG_MAX_INFLIGHT 16u
#define AG_OUT_CHUNK (32u * 1024) /* stdout/stderr/file data per frame */

uint32_t agent_host_max_frame(struct vs_conn *c);
/* Write one frame (header + payload) into c's tx buffer; caller checked the room. */
void agent_put_frame(struct vs_conn *c, uint16_t type, uint32_t rid, const void *payload,
                     uint32_t len);
void agent_put_frame2(struct vs_conn *c, uint16_t type, uint32_t rid, const void *a, uint32_t alen,
                      const void *b, uint32_t blen);
void agent_task_exit(struct task *t, int status); /* send EXIT (status >= 0) */
void agent_task_done(struct task *t);             /* a task ended: the connection may be unstalled */

/* ----------------------------------------------------------- built-ins -- */

task_fn builtin_find(const char *name, int *reads_stdin);
int builtin_get_file(struct task *t); /* GET_FILE streaming */
int builtin_not_found(struct task *t);
void builtins_init(const struct sm_boot_info *bi, uint64_t scratch, uint64_t scratch_pages);
/* SEED: the `rand` builtin's generator state, and the host's wall clock (0: none given). */
void builtins_seed(const uint8_t *seed, uint32_t len, uint64_t wall_ns);

/* -------------------------------------------------------------- files -- */

#define FS_MAX_FILES 64
#define FS_MAX_PATH 255u
#define FS_MAX_SIZE (16u << 20)

void fs_init(uint64_t heap, uint64_t heap_bytes);
int fs_lookup(const uint8_t *path, uint32_t plen);                 /* index or -1 */
int fs_open(const uint8_t *path, uint32_t plen, uint32_t mode, int truncate); /* index or -errno */
int fs_append(int f, const void *data, uint32_t n);                /* 0 or -errno */
const uint8_t *fs_data(int f, uint64_t *size);
uint64_t fs_heap_free(void);
uint32_t fs_count(void);

#endif
