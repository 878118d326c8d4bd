/*
 * The microguest's commands. Each runs as a task (task.c) and returns its
 * exit status; output goes out as STDOUT/STDERR frames as it is produced.
 * Bad arguments print "<name>: <why>" on stderr and exit 2 (as the reference
 * peer does); a missing device or file exits 1. The list, for the docs, is
 * in __init__.py's docstring and `help`.
 */
#include "agent.h"

static const struct sm_boot_info *boot;
static uint8_t *scratch;
static uint64_t scratch_pages;

void builtins_init(const struct sm_boot_info *bi, uint64_t scratch_base, uint64_t pages)
{
    boot = bi;
    scratch = (uint8_t *)scratch_base;
    scratch_pages = pages;
}

static size_t slen(const char *s)
{
    size_t n = 0;
    while (s[n])
        n++;
    return n;
}

static int streq(const char *a, const char *b)
{
    while (*a && *a == *b)
        a++, b++;
    return *a == *b;
}

/* Decimal or 0x-hex, the whole string, no overflow. */
static int parse_u64(const char *s, uint64_t *out)
{
    uint64_t v = 0, base = 10;
    if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X'))
        base = 16, s += 2;
    if (!*s)
        return -1;
    for (; *s; s++) {
        uint64_t d;
        if (*s >= '0' && *s <= '9')
            d = (uint64_t)(*s - '0');
        else if (base == 16 && *s >= 'a' && *s <= 'f')
            d = (uint64_t)(*s - 'a' + 10);
        else if (base == 16 && *s >= 'A' && *s <= 'F')
            d = (uint64_t)(*s - 'A' + 10);
        else
            return -1;
        if (v > (~0ull - d) / base)
            return -1;
        v = v * base + d;
    }
    *out = v;
    return 0;
}

static int usage(struct task *t, const char *why)
{
    task_printf(t, MSG_STDERR, "%s: %s\n", t->argv[0], why);
    return 2;
}

/* The numeric argument i, or a usage error (returns -1 after printing it). */
static int num_arg(struct task *t, int i, uint64_t *v)
{
    if (t->argc <= i) {
        usage(t, "missing argument");
        return -1;
    }
    if (parse_u64(t->argv[i], v) < 0) {
        task_printf(t, MSG_STDERR, "%s: invalid number '%s'\n", t->argv[0], t->argv[i]);
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------- commands -- */

static int cmd_true(struct task *t)
{
    (void)t;
    return 0;
}

static int cmd_false(struct task *t)
{
    (void)t;
    return 1;
}

/* argv[1..] are consecutive C strings in t->args: join them in place. */
static int echo_to(struct task *t, uint16_t stream)
{
    if (t->argc < 2)
        return task_out(t, stream, "\n", 1) < 0 ? 1 : 0;
    char *start = t->argv[1], *end = t->argv[t->argc - 1] + slen(t->argv[t->argc - 1]);
    for (char *p = start; p < end; p++)
        if (!*p)
            *p = ' ';
    *end = '\n';
    return task_out(t, stream, start, (uint32_t)(end - start + 1)) < 0 ? 1 : 0;
}

static int cmd_echo(struct task *t) { return echo_to(t, MSG_STDOUT); }
static int cmd_err(struct task *t) { return echo_to(t, MSG_STDERR); }

static int cmd_exit(struct task *t)
{
    uint64_t v = 0;
    if (t->argc > 1 && num_arg(t, 1, &v) < 0)
        return 2;
    return (int)(v & 0xff);
}

/* Ends as if killed by signal N (the EXIT says SIGNALED). */
static int cmd_signal(struct task *t)
{
    uint64_t v;
    if (num_arg(t, 1, &v) < 0)
        return 2;
    if (v < 1 || v > 64)
        return usage(t, "signal must be 1..64");
    t->killed = 1;
    t->kill_signal = (int)v;
    return 0;
}

/*
 * The guest's randomness: one splitmix64 generator (agent_protocol.h), its
 * state set by SEED. Before any SEED it is what the guest booted with, so a
 * VM restored or reset from a snapshot repeats the snapshot's sequence; the
 * plugin seeds every handout, so each test has its own, reproducible one.
 */
static uint64_t rng_state = 0x5eed5eed5eed5eedull;
static uint64_t wall_ns_at_seed, tsc_at_seed;

void builtins_seed(const uint8_t *seed, uint32_t len, uint64_t wall_ns)
{
    rng_state = ag_seed_state(seed, len);
    if (wall_ns) {
        wall_ns_at_seed = wall_ns;
        tsc_at_seed = ag_rdtsc();
    }
}

static int cmd_rand(struct task *t)
{
    uint64_t n = 1;
    if (t->argc > 1 && num_arg(t, 1, &n) < 0)
        return 2;
    if (n < 1 || n > 64)
        return usage(t, "count must be 1..64");
    static const char digits[] = "0123456789abcdef";
    char line[17 * 64];
    uint32_t k = 0;
    for (uint64_t i = 0; i < n; i++) {
        uint64_t v = ag_splitmix64(&rng_state);
        for (int d = 15; d >= 0; d--)
            line[k++] = digits[(v >> (4 * d)) & 15];
        line[k++] = '\n';
    }
    return task_out(t, MSG_STDOUT, line, k) < 0 ? 1 : 0;
}

/* The wall clock SEED set, advanced by the TSC since: ns since the epoch (0: never set). */
static int cmd_clock(struct task *t)
{
    uint64_t ns = wall_ns_at_seed ? wall_ns_at_seed + ag_tsc_to_ns(ag_rdtsc() - tsc_at_seed) : 0;
    return task_printf(t, MSG_STDOUT, "%lu\n", ns) < 0 ? 1 : 0;
}

static int cmd_sleep(struct task *t)
{
    uint64_t ms;
    if (num_arg(t, 1, &ms) < 0)
        return 2;
    if (ms > 1ull << 32)
        return usage(t, "at most 2^32 ms");
    task_sleep_until(t, ag_rdtsc() + ag_ms_to_tsc(ms)); /* a kill or timeout ends it early */
    return 0;
}

/* stdin -> stdout, frame by frame, as fast as the host drains us. */
static int cat_stdin(struct task *t)
{
    int r;
    while ((r = task_stdin_wait(t)) > 0) {
        uint32_t n;
        task_stdin_ptr(t, &n);
        while (n) {
            uint32_t k = MG_MIN(n, MG_MIN(AG_OUT_CHUNK, agent_host_max_frame(t->conn)));
            if (task_wait_room(t, AG_HDR + k) < 0)
                return 1;
            const uint8_t *p = task_stdin_ptr(t, &n); /* may have moved while we waited */
            agent_put_frame(t->conn, MSG_STDOUT, t->rid, p, k);
            task_stdin_consume(t, k);
            n -= k;
        }
    }
    return r < 0 ? 1 : 0;
}

/* A file to stdout; the file may change while we wait for room, so re-read it each chunk. */
static int cat_file(struct task *t, const char *path)
{
    int f = fs_lookup((const uint8_t *)path, (uint32_t)slen(path));
    if (f < 0) {
        task_printf(t, MSG_STDERR, "cat: %s: No such file or directory\n", path);
        return 1;
    }
    for (uint64_t off = 0;;) {
        uint64_t size;
        fs_data(f, &size);
        if (off >= size)
            return 0;
        uint32_t k = (uint32_t)MG_MIN(size - off, MG_MIN(AG_OUT_CHUNK, agent_host_max_frame(t->conn)));
        if (task_wait_room(t, AG_HDR + k) < 0)
            return 1;
        const uint8_t *data = fs_data(f, &size);
        if (off >= size)
            return 0;
        k = (uint32_t)MG_MIN(k, size - off);
        agent_put_frame(t->conn, MSG_STDOUT, t->rid, data + off, k);
        off += k;
    }
}

static int cmd_cat(struct task *t)
{
    if (t->argc < 2)
        return cat_stdin(t);
    int status = 0;
    for (int i = 1; i < t->argc; i++)
        status |= cat_file(t, t->argv[i]);
    return status;
}

/* write PATH: stdin into the file store (created or truncated). */
static int cmd_write(struct task *t)
{
    if (t->argc != 2)
        return usage(t, "usage: write PATH (data on stdin)");
    int f = fs_open((const uint8_t *)t->argv[1], (uint32_t)slen(t->argv[1]), 0644, 1);
    if (f < 0) {
        task_printf(t, MSG_STDERR, "write: %s: %s\n", t->argv[1],
                    f == -E_NOSPC ? "No space left on device" : "File name too long");
        return 1;
    }
    int r;
    while ((r = task_stdin_wait(t)) > 0) {
        uint32_t n;
        const uint8_t *p = task_stdin_ptr(t, &n);
        if (fs_append(f, p, n) < 0) {
            task_stdin_consume(t, n);
            task_printf(t, MSG_STDERR, "write: %s: No space left on device\n", t->argv[1]);
            return 1;
        }
        task_stdin_consume(t, n);
    }
    return r < 0 ? 1 : 0;
}

/* dirty PAGES: one increment per page of the scratch area (a page's byte counts its dirtyings). */
static int cmd_dirty(struct task *t)
{
    uint64_t pages;
    if (num_arg(t, 1, &pages) < 0)
        return 2;
    if (pages > scratch_pages) {
        task_printf(t, MSG_STDERR, "dirty: %lu pages asked, the scratch area has %lu\n", pages,
                    scratch_pages);
        return 1;
    }
    for (uint64_t i = 0; i < pages; i++)
        ++*(volatile uint8_t *)(scratch + i * MG_PAGE_SIZE);
    return task_printf(t, MSG_STDOUT, "%lu\n", pages) < 0 ? 1 : 0;
}

/* An invalid opcode at CPL3 (not the gate's): the exception report, then PANIC 6. */
static int cmd_crash(struct task *t)
{
    (void)t;
    __asm__ volatile("ud2");
    return 0;
}

/* Interrupts off and halted for good: the host's timeout has to fire. */
static int cmd_hang(struct task *t)
{
    (void)t;
    mg_user_gate(MG_SYS_HANG, 0);
    return 0; /* not reached */
}

/* emit N: N bytes of the pattern 0,1,..,255,0,1,.. (what the reference peer emits). */
static int cmd_emit(struct task *t)
{
    static uint8_t pattern[AG_OUT_CHUNK + 256];
    uint64_t n;
    if (num_arg(t, 1, &n) < 0)
        return 2;
    if (!pattern[1])
        for (uint32_t i = 0; i < sizeof(pattern); i++)
            pattern[i] = (uint8_t)i;
    for (uint64_t off = 0; off < n;) {
        uint32_t k = (uint32_t)MG_MIN(n - off, MG_MIN(AG_OUT_CHUNK, agent_host_max_frame(t->conn)));
        if (task_wait_room(t, AG_HDR + k) < 0)
            return 1;
        agent_put_frame(t->conn, MSG_STDOUT, t->rid, pattern + (off & 255), k);
        off += k;
    }
    return 0;
}

static int cmd_env(struct task *t)
{
    for (int i = 0; i < t->envc; i++)
        if (task_printf(t, MSG_STDOUT, "%s\n", t->env[i]) < 0)
            return 1;
    return 0;
}

static int cmd_pwd(struct task *t)
{
    return task_printf(t, MSG_STDOUT, "%s\n", t->cwd && *t->cwd ? t->cwd : "/") < 0 ? 1 : 0;
}

static int cmd_info(struct task *t)
{
    return task_printf(t, MSG_STDOUT,
                       "software=%s\nvcpus=%u\nmem_bytes=%lu\ntsc_khz=%lu\nvsock_cid=%lu\n"
                       "scratch_pages=%lu\nfiles=%u\nfile_heap_free=%lu\nblk_sectors=%lu\n"
                       "blk_read_only=%u\n",
                       MG_AGENT_SOFTWARE, boot->vcpus, boot->mem_bytes, ag_tsc_khz, vsock_cid(),
                       scratch_pages, fs_count(), fs_heap_free(), blk_present() ? blk_capacity() : 0,
                       (unsigned)(blk_present() && blk_read_only())) < 0 ? 1 : 0;
}

/* ------------------------------------------------------------------ blk -- */

static int need_blk(struct task *t)
{
    if (blk_present())
        return 0;
    task_printf(t, MSG_STDERR, "%s: no virtio-blk device\n", t->argv[0]);
    return 1;
}

static int blk_range(struct task *t, uint64_t sector, uint64_t count)
{
    if (sector <= blk_capacity() && count <= blk_capacity() - sector)
        return 0;
    task_printf(t, MSG_STDERR, "%s: sectors %lu..%lu are beyond the disk (%lu sectors)\n",
                t->argv[0], sector, sector + count, blk_capacity());
    return 1;
}

static int io_failed(struct task *t, int status)
{
    if (status < 0)
        return 1; /* killed while waiting for a request slot */
    task_printf(t, MSG_STDERR, "%s: %s (status %u)\n", t->argv[0],
                status == 2 ? "unsupported request" : "I/O error", (unsigned)status);
    return 1;
}

/* blk-read SECTOR N: the raw bytes of N sectors on stdout. */
static int cmd_blk_read(struct task *t)
{
    uint64_t sector, count;
    if (need_blk(t))
        return 1;
    if (num_arg(t, 1, &sector) < 0 || num_arg(t, 2, &count) < 0)
        return 2;
    if (blk_range(t, sector, count))
        return 1;
    while (count) {
        uint32_t n = (uint32_t)MG_MIN(count, BLK_CHUNK / BLK_SECTOR);
        int slot;
        uint8_t *buf = blk_begin(t, &slot);
        if (!buf)
            return 1;
        int status = blk_run(t, slot, BLK_T_IN, sector, n * BLK_SECTOR);
        if (status) {
            blk_end(slot);
            return io_failed(t, status);
        }
        int r = task_out(t, MSG_STDOUT, buf, n * BLK_SECTOR); /* the slot stays ours meanwhile */
        blk_end(slot);
        if (r < 0)
            return 1;
        sector += n;
        count -= n;
    }
    return 0;
}

static int hexval(char ch)
{
    if (ch >= '0' && ch <= '9')
        return ch - '0';
    if (ch >= 'a' && ch <= 'f')
        return ch - 'a' + 10;
    if (ch >= 'A' && ch <= 'F')
        return ch - 'A' + 10;
    return -1;
}

/*
 * blk-write SECTOR HEX: the bytes HEX spells, written from the start of
 * SECTOR. A partial last sector keeps its other bytes (read, patch, write).
 */
static int cmd_blk_write(struct task *t)
{
    uint64_t sector;
    if (need_blk(t))
        return 1;
    if (num_arg(t, 1, &sector) < 0)
        return 2;
    if (t->argc != 3)
        return usage(t, "usage: blk-write SECTOR HEX");
    const char *hex = t->argv[2];
    uint32_t bytes = (uint32_t)slen(hex) / 2;
    if (!bytes || slen(hex) % 2 || bytes > BLK_CHUNK)
        return usage(t, "HEX must be an even number of hex digits");
    for (uint32_t i = 0; i < 2 * bytes; i++)
        if (hexval(hex[i]) < 0)
            return usage(t, "HEX must be an even number of hex digits");
    uint32_t sectors = (bytes + BLK_SECTOR - 1) / BLK_SECTOR;
    if (blk_range(t, sector, sectors))
        return 1;
    int slot;
    uint8_t *buf = blk_begin(t, &slot);
    if (!buf)
        return 1;
    int status = 0;
    if (bytes % BLK_SECTOR) /* keep the rest of the last sector */
        status = blk_run(t, slot, BLK_T_IN, sector + sectors - 1, BLK_SECTOR);
    if (!status) {
        if (bytes % BLK_SECTOR)
            ag_copy(buf + (sectors - 1) * BLK_SECTOR, buf, BLK_SECTOR);
        for (uint32_t i = 0; i < bytes; i++)
            buf[i] = (uint8_t)(hexval(hex[2 * i]) << 4 | hexval(hex[2 * i + 1]));
        status = blk_run(t, slot, BLK_T_OUT, sector, sectors * BLK_SECTOR);
    }
    blk_end(slot);
    return status ? io_failed(t, status) : 0;
}

static int blk_simple(struct task *t, uint32_t type)
{
    if (need_blk(t))
        return 1;
    int slot;
    uint8_t *buf = blk_begin(t, &slot);
    if (!buf)
        return 1;
    int status = blk_run(t, slot, type, 0, type == BLK_T_GET_ID ? 20 : 0);
    char id[21];
    if (!status && type == BLK_T_GET_ID) {
        ag_copy(id, buf, 20);
        id[20] = 0;
    }
    blk_end(slot);
    if (status)
        return io_failed(t, status);
    if (type == BLK_T_GET_ID)
        return task_printf(t, MSG_STDOUT, "%s\n", id) < 0 ? 1 : 0;
    return 0;
}

static int cmd_blk_flush(struct task *t) { return blk_simple(t, BLK_T_FLUSH); }
static int cmd_blk_id(struct task *t) { return blk_simple(t, BLK_T_GET_ID); }

static int cmd_blk_size(struct task *t)
{
    if (need_blk(t))
        return 1;
    return task_printf(t, MSG_STDOUT, "%lu\n", blk_capacity()) < 0 ? 1 : 0;
}

/* ---------------------------------------------------------------- lookup -- */

struct builtin {
    const char *name;
    task_fn fn;
    int reads_stdin;
    const char *help;
};

static int cmd_help(struct task *t);

static const struct builtin builtins[] = {
    {"echo", cmd_echo, 0, "ARGS: ARGS joined by spaces, newline, on stdout"},
    {"err", cmd_err, 0, "ARGS: like echo, on stderr"},
    {"true", cmd_true, 0, ": exit 0"},
    {"false", cmd_false, 0, ": exit 1"},
    {"exit", cmd_exit, 0, "N: exit N (0..255)"},
    {"signal", cmd_signal, 0, "N: end as if killed by signal N"},
    {"cat", cmd_cat, 1, "[PATH...]: files (or stdin) to stdout"},
    {"write", cmd_write, 1, "PATH: stdin into a file"},
    {"rand", cmd_rand, 0, "[N]: N (1..64) numbers of the seeded generator, 16 hex digits a line"},
    {"clock", cmd_clock, 0, ": the wall clock the last SEED set, in ns (0: none)"},
    {"sleep", cmd_sleep, 0, "MS: wait MS milliseconds (halted; KILL/timeout end it)"},
    {"emit", cmd_emit, 0, "N: N bytes 0,1,..,255,0,.. on stdout"},
    {"dirty", cmd_dirty, 0, "PAGES: write one byte in each of PAGES scratch pages"},
    {"crash", cmd_crash, 0, ": invalid opcode at CPL3 (exception report, PANIC 6)"},
    {"hang", cmd_hang, 0, ": halt with interrupts off, answer nothing ever again"},
    {"blk-read", cmd_blk_read, 0, "SECTOR N: raw bytes of N sectors on stdout"},
    {"blk-write", cmd_blk_write, 0, "SECTOR HEX: write bytes from the start of SECTOR"},
    {"blk-flush", cmd_blk_flush, 0, ": FLUSH request"},
    {"blk-id", cmd_blk_id, 0, ": the disk's serial (GET_ID)"},
    {"blk-size", cmd_blk_size, 0, ": capacity in 512-byte sectors"},
    {"env", cmd_env, 0, ": the EXEC's env entries, one a line"},
    {"pwd", cmd_pwd, 0, ": the EXEC's cwd (/ if none)"},
    {"info", cmd_info, 0, ": key=value facts about this guest"},
    {"help", cmd_help, 0, ": this list"},
};
#define NBUILTINS (sizeof(builtins) / sizeof(builtins[0]))

static int cmd_help(struct task *t)
{
    for (uint32_t i = 0; i < NBUILTINS; i++)
        if (task_printf(t, MSG_STDOUT, "%s %s\n", builtins[i].name, builtins[i].help) < 0)
            return 1;
    return 0;
}

task_fn builtin_find(const char *name, int *reads_stdin)
{
    for (uint32_t i = 0; i < NBUILTINS; i++) {
        if (streq(builtins[i].name, name)) {
            *reads_stdin = builtins[i].reads_stdin;
            return builtins[i].fn;
        }
    }
    return 0;
}

int builtin_not_found(struct task *t)
{
    task_printf(t, MSG_STDERR, "sh: %s: not found\n", t->argv[0]);
    return 127;
}

/* GET_FILE of a file too big for one frame: FILE_DATA frames, FILE_MORE on all but the last. */
int builtin_get_file(struct task *t)
{
    uint8_t more[4] = {FILE_MORE, 0, 0, 0}, last[4] = {0, 0, 0, 0};
    for (uint64_t off = 0;;) {
        uint64_t size;
        fs_data(t->file, &size);
        uint32_t room = MG_MIN(AG_OUT_CHUNK, agent_host_max_frame(t->conn)) - 4;
        uint32_t k = (uint32_t)MG_MIN(size > off ? size - off : 0, room);
        if (task_wait_room(t, AG_HDR + 4 + k) < 0)
            return -1;
        const uint8_t *data = fs_data(t->file, &size); /* it may have changed meanwhile */
        k = (uint32_t)MG_MIN(k, size > off ? size - off : 0);
        int end = off + k >= size;
        agent_put_frame2(t->conn, MSG_FILE_DATA, t->rid, end ? last : more, 4, data + off, k);
        off += k;
        if (end)
            return -1; /* answered: no EXIT for a GET_FILE */
    }
}
