/*
 * The supermachine VMM's C core: one vCPU run loop per thread, exits handled
 * without returning to Python on the hot path, a force-exit that cannot be
 * lost, and a pause barrier that parks every vCPU at a clean boundary.
 *
 * Force-exit protocol (why it cannot be lost): the host, holding vm->lock,
 * sets vm->request, then every vCPU's kvm_run.immediate_exit = 1, then sends
 * SM_KICK_SIGNAL to each vCPU thread that is inside sm_vcpu_run. A vCPU that
 * is inside KVM_RUN returns with EINTR because of the signal; one that is
 * about to enter KVM_RUN returns at once because of immediate_exit; one that
 * is handling an exit will meet immediate_exit on its next KVM_RUN, which
 * first completes the pending I/O (so the register state is consistent: a
 * clean boundary) and then returns EINTR. Only a vCPU holding vm->lock and
 * seeing SM_REQ_RUN clears immediate_exit, so no request is ever cleared by
 * accident.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <linux/kvm.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "_core.h"
#include "bootinfo.h"

/* Calls back into Python for I/O regions owned by Python devices (declared in _build.py). */
int sm_py_io(void *handle, uint64_t token, int space, uint64_t addr, uint8_t *data,
             uint32_t len, int is_write);

#define SM_COM1_BASE 0x3f8
#define SM_COM1_IRQ 4
#define SM_I8042_CMD 0x64
#define SM_I8042_DATA 0x60

struct sm_io_region {
    int space;
    uint64_t base, size, token;
};

struct sm_serial {
    struct sm_serial_state s;
    uint32_t rx_head;
    uint8_t *log;
    uint64_t log_size, log_total;
    int stream_fd;
};

struct sm_vcpu {
    int fd;
    struct kvm_run *run;
    pthread_t thread;
    int thread_live;
    int parked;
};

struct sm_vm {
    int vm_fd;
    int nvcpus;
    void *py_handle;
    pthread_mutex_t lock;
    pthread_cond_t cond;
    int request;
    int running; /* vCPU threads inside sm_vcpu_run */
    int parked;
    struct sm_exit_info exit;
    struct sm_vcpu vcpus[SM_MAX_VCPUS];
    int nregions;
    struct sm_io_region regions[SM_MAX_IO_REGIONS];
    pthread_mutex_t serial_lock;
    struct sm_serial serial;
    struct sm_stats stats;
    uint64_t ready_ns;
    int nmarks;
    struct sm_mark marks[SM_MAX_MARKS];
    int exit_efd; /* readable once the machine has an exit reason (host waiters poll it) */
};

static int sm_kick_signal;

static void sm_kick_handler(int sig) { (void)sig; }

int sm_core_init(void)
{
    static int done;
    if (done)
        return sm_kick_signal;
    sm_kick_signal = SIGRTMIN + 6;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = sm_kick_handler; /* no SA_RESTART: KVM_RUN must return EINTR */
    sigemptyset(&sa.sa_mask);
    if (sigaction(sm_kick_signal, &sa, NULL) < 0)
        return -errno;
    done = 1;
    return sm_kick_signal;
}

int sm_ioctl_ptr(int fd, unsigned long request, void *arg)
{
    int rc;
    do {
        rc = ioctl(fd, request, arg);
    } while (rc < 0 && errno == EINTR);
    return rc < 0 ? -errno : rc;
}

int sm_ioctl_int(int fd, unsigned long request, unsigned long arg)
{
    int rc;
    do {
        rc = ioctl(fd, request, arg);
    } while (rc < 0 && errno == EINTR);
    return rc < 0 ? -errno : rc;
}

/* Issue n ioctls in order, stopping at the first failure (index in *failed). KVM_SET_MSRS
 * counts as failed unless it set every MSR. Restores and resets use it: one C call. */
int sm_ioctl_batch(int n, const int *fds, const unsigned long *requests, void *const *args,
                   int *failed)
{
    for (int i = 0; i < n; i++) {
        int rc = sm_ioctl_ptr(fds[i], requests[i], args[i]);
        if (rc >= 0 && requests[i] == KVM_SET_MSRS && (uint32_t)rc != ((struct kvm_msrs *)args[i])->nmsrs)
            rc = -EIO;
        if (rc < 0) {
            *failed = i;
            return rc;
        }
    }
    *failed = -1;
    return 0;
}

/* The next run of set bits in `bitmap` at or after *page: sets [*page, *end) and returns 1,
 * or returns 0 when there is none. Bit n stands for page n of one RAM region. */
static int next_dirty_run(const uint64_t *bitmap, uint64_t npages, uint64_t *page, uint64_t *end)
{
    uint64_t p = *page;
    while (p < npages) {
        uint64_t word = bitmap[p / 64] >> (p % 64);
        if (!word) {
            p = (p / 64 + 1) * 64;
            continue;
        }
        p += (uint64_t)__builtin_ctzll(word);
        if (p >= npages)
            break;
        uint64_t e = p;
        while (e < npages && (bitmap[e / 64] >> (e % 64) & 1))
            e++;
        *page = p;
        *end = e;
        return 1;
    }
    return 0;
}

/* madvise() every run of set bits in `bitmap` over the region at `base`. Returns the number
 * of pages advised, or -errno. Reset (DISCARD) drops exactly the pages that were dirtied. */
int64_t sm_madvise_bitmap(void *base, const uint64_t *bitmap, uint64_t npages, int advice)
{
    int64_t done = 0;
    for (uint64_t page = 0, end; next_dirty_run(bitmap, npages, &page, &end); page = end) {
        if (madvise((uint8_t *)base + page * 4096, (end - page) * 4096, advice) < 0)
            return -errno;
        done += (int64_t)(end - page);
    }
    return done;
}

/* memcpy every run of set bits in `bitmap` from `src` to `dst` (page-aligned views of one RAM
 * region). Reset (COPY) copies the snapshot's bytes back over the pages the guest dirtied:
 * they stay resident and writable, so the guest's next write to them does not fault. */
int64_t sm_copy_bitmap(void *dst, const void *src, const uint64_t *bitmap, uint64_t npages)
{
    int64_t done = 0;
    for (uint64_t page = 0, end; next_dirty_run(bitmap, npages, &page, &end); page = end) {
        memcpy((uint8_t *)dst + page * 4096, (const uint8_t *)src + page * 4096,
               (end - page) * 4096);
        done += (int64_t)(end - page);
    }
    return done;
}

uint64_t sm_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void deadline_after(struct timespec *ts, int64_t timeout_ms)
{
    clock_gettime(CLOCK_MONOTONIC, ts);
    ts->tv_sec += timeout_ms / 1000;
    ts->tv_nsec += (timeout_ms % 1000) * 1000000;
    if (ts->tv_nsec >= 1000000000) {
        ts->tv_sec++;
        ts->tv_nsec -= 1000000000;
    }
}

/* Wait on vm->cond (lock held) until deadline; timeout_ms < 0 waits forever. */
static int cond_wait_until(struct sm_vm *vm, int64_t timeout_ms, const struct timespec *deadline)
{
    if (timeout_ms < 0)
        return pthread_cond_wait(&vm->cond, &vm->lock);
    return pthread_cond_timedwait(&vm->cond, &vm->lock, deadline);
}

/* ------------------------------------------------------------------ serial */

#define UART_LSR_DR 0x01
#define UART_LSR_THRE 0x20
#define UART_LSR_TEMT 0x40
#define UART_IER_RDI 0x01
#define UART_IER_THRI 0x02
#define UART_IIR_NONE 0x01
#define UART_IIR_THRI 0x02
#define UART_IIR_RDI 0x04
#define UART_LCR_DLAB 0x80
#define UART_MCR_LOOP 0x10
#define UART_MSR_DEFAULT 0xb0 /* DCD | DSR | CTS */

static void serial_irq_pulse(struct sm_vm *vm)
{
    struct kvm_irq_level level = {.irq = SM_COM1_IRQ, .level = 1};
    ioctl(vm->vm_fd, KVM_IRQ_LINE, &level);
    level.level = 0;
    ioctl(vm->vm_fd, KVM_IRQ_LINE, &level);
}

static uint8_t serial_iir(const struct sm_serial *sp)
{
    const struct sm_serial_state *s = &sp->s;
    uint8_t fifo = (s->fcr & 1) ? 0xc0 : 0;
    if ((s->ier & UART_IER_RDI) && s->rx_count)
        return UART_IIR_RDI | fifo;
    if ((s->ier & UART_IER_THRI) && s->iir_thre_pending)
        return UART_IIR_THRI | fifo;
    return UART_IIR_NONE | fifo;
}

static void serial_log_byte(struct sm_serial *sp, uint8_t b)
{
    if (sp->log_size)
        sp->log[sp->log_total % sp->log_size] = b;
    sp->log_total++;
    if (sp->stream_fd >= 0) {
        ssize_t n;
        do {
            n = write(sp->stream_fd, &b, 1);
        } while (n < 0 && errno == EINTR);
        if (n < 0)
            sp->stream_fd = -1; /* reader went away: keep the log, drop the stream */
    }
}

static void serial_rx_push(struct sm_serial *sp, uint8_t b)
{
    struct sm_serial_state *s = &sp->s;
    if (s->rx_count >= SM_SERIAL_RX_MAX)
        return; /* overrun: the byte is lost, as on a real UART */
    s->rx[(sp->rx_head + s->rx_count) % SM_SERIAL_RX_MAX] = b;
    s->rx_count++;
}

/* Returns 1 when an interrupt edge must be sent (caller sends it without serial_lock). */
static int serial_write(struct sm_serial *sp, unsigned offset, uint8_t v)
{
    struct sm_serial_state *s = &sp->s;
    uint8_t before = serial_iir(sp);
    switch (offset) {
    case 0:
        if (s->lcr & UART_LCR_DLAB) {
            s->dll = v;
        } else {
            if (s->mcr & UART_MCR_LOOP)
                serial_rx_push(sp, v);
            else
                serial_log_byte(sp, v);
            s->iir_thre_pending = 1; /* transmitted at once: THR is empty again */
        }
        break;
    case 1:
        if (s->lcr & UART_LCR_DLAB) {
            s->dlm = v;
        } else {
            if (!(s->ier & UART_IER_THRI) && (v & UART_IER_THRI))
                s->iir_thre_pending = 1; /* enabling THRI with THR empty raises it */
            s->ier = v & 0x0f;
        }
        break;
    case 2:
        s->fcr = v;
        if (v & 0x02) { /* clear receive FIFO */
            s->rx_count = 0;
            sp->rx_head = 0;
        }
        break;
    case 3:
        s->lcr = v;
        break;
    case 4:
        s->mcr = v & 0x1f;
        break;
    case 7:
        s->scr = v;
        break;
    default:
        break; /* LSR and MSR are read-only */
    }
    uint8_t after = serial_iir(sp);
    return !(after & UART_IIR_NONE) && after != before;
}

static uint8_t serial_read(struct sm_serial *sp, unsigned offset)
{
    struct sm_serial_state *s = &sp->s;
    switch (offset) {
    case 0:
        if (s->lcr & UART_LCR_DLAB)
            return s->dll;
        if (s->rx_count) {
            uint8_t b = s->rx[sp->rx_head];
            sp->rx_head = (sp->rx_head + 1) % SM_SERIAL_RX_MAX;
            s->rx_count--;
            return b;
        }
        return 0;
    case 1:
        return (s->lcr & UART_LCR_DLAB) ? s->dlm : s->ier;
    case 2: {
        uint8_t iir = serial_iir(sp);
        if ((iir & 0x0f) == UART_IIR_THRI)
            s->iir_thre_pending = 0; /* reading IIR acknowledges THRI */
        return iir;
    }
    case 3:
        return s->lcr;
    case 4:
        return s->mcr;
    case 5:
        return UART_LSR_THRE | UART_LSR_TEMT | (s->rx_count ? UART_LSR_DR : 0) | s->lsr_extra;
    case 6:
        if (s->mcr & UART_MCR_LOOP) {
            /* loopback: DTR->DSR, RTS->CTS, OUT1->RI, OUT2->DCD (Linux's autoconfig checks this) */
            uint8_t m = s->mcr;
            return (uint8_t)(((m & 0x01) << 5) | ((m & 0x02) << 3) | ((m & 0x04) << 4) |
                             ((m & 0x08) << 4));
        }
        return s->msr;
    case 7:
        return s->scr;
    }
    return 0xff;
}

static void serial_init(struct sm_serial *sp, uint64_t log_bytes)
{
    memset(&sp->s, 0, sizeof sp->s);
    sp->s.msr = UART_MSR_DEFAULT;
    sp->s.iir_thre_pending = 0;
    sp->rx_head = 0;
    sp->log_size = log_bytes;
    sp->log = log_bytes ? calloc(1, log_bytes) : NULL;
    if (!sp->log)
        sp->log_size = 0;
    sp->log_total = 0;
    sp->stream_fd = -1;
}

uint64_t sm_serial_log_total(struct sm_vm *vm)
{
    pthread_mutex_lock(&vm->serial_lock);
    uint64_t t = vm->serial.log_total;
    pthread_mutex_unlock(&vm->serial_lock);
    return t;
}

/* Copy the newest min(max, kept) console bytes, oldest first; returns the count. */
uint64_t sm_serial_log_read(struct sm_vm *vm, uint8_t *out, uint64_t max)
{
    struct sm_serial *sp = &vm->serial;
    pthread_mutex_lock(&vm->serial_lock);
    uint64_t kept = sp->log_total < sp->log_size ? sp->log_total : sp->log_size;
    uint64_t n = kept < max ? kept : max;
    uint64_t start = sp->log_total - n;
    for (uint64_t i = 0; i < n; i++)
        out[i] = sp->log[(start + i) % sp->log_size];
    pthread_mutex_unlock(&vm->serial_lock);
    return n;
}

void sm_serial_log_clear(struct sm_vm *vm)
{
    pthread_mutex_lock(&vm->serial_lock);
    vm->serial.log_total = 0;
    pthread_mutex_unlock(&vm->serial_lock);
}

int sm_serial_feed(struct sm_vm *vm, const uint8_t *data, uint32_t len)
{
    struct sm_serial *sp = &vm->serial;
    pthread_mutex_lock(&vm->serial_lock);
    uint8_t before = serial_iir(sp);
    uint32_t room = SM_SERIAL_RX_MAX - sp->s.rx_count;
    uint32_t n = len < room ? len : room;
    for (uint32_t i = 0; i < n; i++)
        serial_rx_push(sp, data[i]);
    uint8_t after = serial_iir(sp);
    pthread_mutex_unlock(&vm->serial_lock);
    if (!(after & UART_IIR_NONE) && after != before)
        serial_irq_pulse(vm);
    return (int)n;
}

void sm_serial_get_state(struct sm_vm *vm, struct sm_serial_state *out)
{
    struct sm_serial *sp = &vm->serial;
    pthread_mutex_lock(&vm->serial_lock);
    *out = sp->s;
    /* store the receive queue linearised, oldest byte first */
    for (uint32_t i = 0; i < sp->s.rx_count; i++)
        out->rx[i] = sp->s.rx[(sp->rx_head + i) % SM_SERIAL_RX_MAX];
    pthread_mutex_unlock(&vm->serial_lock);
}

void sm_serial_set_state(struct sm_vm *vm, const struct sm_serial_state *in)
{
    struct sm_serial *sp = &vm->serial;
    pthread_mutex_lock(&vm->serial_lock);
    sp->s = *in;
    if (sp->s.rx_count > SM_SERIAL_RX_MAX)
        sp->s.rx_count = SM_SERIAL_RX_MAX;
    sp->rx_head = 0;
    pthread_mutex_unlock(&vm->serial_lock);
}

void sm_vm_set_console_stream(struct sm_vm *vm, int fd)
{
    pthread_mutex_lock(&vm->serial_lock);
    vm->serial.stream_fd = fd;
    pthread_mutex_unlock(&vm->serial_lock);
}

/* ------------------------------------------------------------- lifecycle */

struct sm_vm *sm_vm_new(int vm_fd, int nvcpus, uint64_t console_log_bytes, void *py_handle)
{
    if (nvcpus < 1 || nvcpus > SM_MAX_VCPUS)
        return NULL;
    struct sm_vm *vm = calloc(1, sizeof *vm);
    if (!vm)
        return NULL;
    vm->vm_fd = vm_fd;
    vm->nvcpus = nvcpus;
    vm->py_handle = py_handle;
    pthread_mutex_init(&vm->lock, NULL);
    pthread_mutex_init(&vm->serial_lock, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&vm->cond, &ca);
    pthread_condattr_destroy(&ca);
    for (int i = 0; i < nvcpus; i++)
        vm->vcpus[i].fd = -1;
    serial_init(&vm->serial, console_log_bytes);
    vm->exit_efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    return vm;
}

void sm_vm_free(struct sm_vm *vm)
{
    if (!vm)
        return;
    free(vm->serial.log);
    if (vm->exit_efd >= 0)
        close(vm->exit_efd);
    pthread_cond_destroy(&vm->cond);
    pthread_mutex_destroy(&vm->lock);
    pthread_mutex_destroy(&vm->serial_lock);
    free(vm);
}

int sm_vm_set_vcpu(struct sm_vm *vm, int index, int vcpu_fd, void *kvm_run)
{
    if (index < 0 || index >= vm->nvcpus)
        return -EINVAL;
    vm->vcpus[index].fd = vcpu_fd;
    vm->vcpus[index].run = kvm_run;
    return 0;
}

int sm_vm_add_io_region(struct sm_vm *vm, int space, uint64_t base, uint64_t size, uint64_t token)
{
    if (size == 0 || base + size < base)
        return -EINVAL;
    pthread_mutex_lock(&vm->lock);
    int rc = 0;
    if (vm->nregions >= SM_MAX_IO_REGIONS) {
        rc = -ENOSPC;
        goto out;
    }
    for (int i = 0; i < vm->nregions; i++) {
        struct sm_io_region *r = &vm->regions[i];
        if (r->space == space && base < r->base + r->size && r->base < base + size) {
            rc = -EEXIST;
            goto out;
        }
    }
    vm->regions[vm->nregions++] = (struct sm_io_region){space, base, size, token};
out:
    pthread_mutex_unlock(&vm->lock);
    return rc;
}

int sm_vm_remove_io_region(struct sm_vm *vm, int space, uint64_t base)
{
    pthread_mutex_lock(&vm->lock);
    int rc = -ENOENT;
    for (int i = 0; i < vm->nregions; i++) {
        if (vm->regions[i].space == space && vm->regions[i].base == base) {
            vm->regions[i] = vm->regions[--vm->nregions];
            rc = 0;
            break;
        }
    }
    pthread_mutex_unlock(&vm->lock);
    return rc;
}

/* Caller holds vm->lock. */
static void kick_all_locked(struct sm_vm *vm, int except)
{
    for (int i = 0; i < vm->nvcpus; i++) {
        struct sm_vcpu *v = &vm->vcpus[i];
        if (!v->run)
            continue;
        __atomic_store_n(&v->run->immediate_exit, 1, __ATOMIC_SEQ_CST);
        if (v->thread_live && i != except) {
            pthread_kill(v->thread, sm_kick_signal);
            vm->stats.kicks++;
        }
    }
}

/* Record why the machine stops (first cause wins) and make every vCPU leave. */
static void request_stop(struct sm_vm *vm, const struct sm_exit_info *why, int self)
{
    pthread_mutex_lock(&vm->lock);
    if (vm->exit.reason == SM_EXIT_NONE) {
        vm->exit = *why;
        if (vm->exit_efd >= 0) {
            uint64_t one = 1;
            if (write(vm->exit_efd, &one, sizeof one) < 0) { /* counter full: already readable */
            }
        }
    }
    vm->request = SM_REQ_STOP;
    kick_all_locked(vm, self);
    pthread_cond_broadcast(&vm->cond);
    pthread_mutex_unlock(&vm->lock);
}

void sm_vm_stop(struct sm_vm *vm)
{
    struct sm_exit_info why = {.reason = SM_EXIT_CANCELED, .vcpu = -1};
    request_stop(vm, &why, -1);
}

/* Make a stopped machine runnable again (used by reset/restore before restarting threads). */
void sm_vm_rearm(struct sm_vm *vm)
{
    pthread_mutex_lock(&vm->lock);
    uint64_t drained;
    if (vm->exit_efd >= 0 && read(vm->exit_efd, &drained, sizeof drained) < 0) { /* was empty */
    }
    memset(&vm->exit, 0, sizeof vm->exit);
    vm->request = SM_REQ_RUN;
    vm->ready_ns = 0;
    for (int i = 0; i < vm->nvcpus; i++)
        if (vm->vcpus[i].run)
            vm->vcpus[i].run->immediate_exit = 0;
    pthread_mutex_unlock(&vm->lock);
}

int sm_vm_pause(struct sm_vm *vm, int64_t timeout_ms)
{
    struct timespec deadline;
    deadline_after(&deadline, timeout_ms);
    pthread_mutex_lock(&vm->lock);
    if (vm->request == SM_REQ_STOP) {
        pthread_mutex_unlock(&vm->lock);
        return -ESRCH;
    }
    vm->request = SM_REQ_PAUSE;
    kick_all_locked(vm, -1);
    int rc = 0;
    while (vm->parked < vm->running && vm->request == SM_REQ_PAUSE) {
        if (cond_wait_until(vm, timeout_ms, &deadline) == ETIMEDOUT) {
            rc = -ETIMEDOUT;
            break;
        }
    }
    if (vm->request == SM_REQ_STOP)
        rc = -ESRCH;
    pthread_mutex_unlock(&vm->lock);
    return rc;
}

void sm_vm_resume(struct sm_vm *vm)
{
    pthread_mutex_lock(&vm->lock);
    if (vm->request == SM_REQ_PAUSE)
        vm->request = SM_REQ_RUN;
    pthread_cond_broadcast(&vm->cond);
    pthread_mutex_unlock(&vm->lock);
}

int sm_vm_wait_stopped(struct sm_vm *vm, int64_t timeout_ms)
{
    struct timespec deadline;
    deadline_after(&deadline, timeout_ms);
    pthread_mutex_lock(&vm->lock);
    int rc = 0;
    while (vm->exit.reason == SM_EXIT_NONE || vm->running > 0) {
        if (cond_wait_until(vm, timeout_ms, &deadline) == ETIMEDOUT) {
            rc = -ETIMEDOUT;
            break;
        }
    }
    if (rc == 0)
        rc = vm->exit.reason;
    pthread_mutex_unlock(&vm->lock);
    return rc;
}

int sm_vm_wait_ready(struct sm_vm *vm, int64_t timeout_ms)
{
    struct timespec deadline;
    deadline_after(&deadline, timeout_ms);
    pthread_mutex_lock(&vm->lock);
    int rc = 0;
    while (vm->ready_ns == 0) {
        if (vm->exit.reason != SM_EXIT_NONE) {
            rc = -ESRCH;
            break;
        }
        if (cond_wait_until(vm, timeout_ms, &deadline) == ETIMEDOUT) {
            rc = -ETIMEDOUT;
            break;
        }
    }
    pthread_mutex_unlock(&vm->lock);
    return rc;
}

/* Wait until `count` vCPU threads are inside sm_vcpu_run (or the machine stopped). */
int sm_vm_wait_running(struct sm_vm *vm, int count, int64_t timeout_ms)
{
    struct timespec deadline;
    deadline_after(&deadline, timeout_ms);
    pthread_mutex_lock(&vm->lock);
    int rc = 0;
    while (vm->running < count && vm->exit.reason == SM_EXIT_NONE) {
        if (cond_wait_until(vm, timeout_ms, &deadline) == ETIMEDOUT) {
            rc = -ETIMEDOUT;
            break;
        }
    }
    pthread_mutex_unlock(&vm->lock);
    return rc;
}

int sm_vm_exit_fd(struct sm_vm *vm) { return vm->exit_efd; }

int sm_vm_running_vcpus(struct sm_vm *vm)
{
    pthread_mutex_lock(&vm->lock);
    int n = vm->running;
    pthread_mutex_unlock(&vm->lock);
    return n;
}

void sm_vm_exit_info(struct sm_vm *vm, struct sm_exit_info *out)
{
    pthread_mutex_lock(&vm->lock);
    *out = vm->exit;
    pthread_mutex_unlock(&vm->lock);
}

void sm_vm_stats(struct sm_vm *vm, struct sm_stats *out)
{
    pthread_mutex_lock(&vm->lock);
    *out = vm->stats;
    pthread_mutex_unlock(&vm->lock);
}

int sm_vm_marks(struct sm_vm *vm, struct sm_mark *out, int max)
{
    pthread_mutex_lock(&vm->lock);
    int n = vm->nmarks < max ? vm->nmarks : max;
    memcpy(out, vm->marks, (size_t)n * sizeof *out);
    pthread_mutex_unlock(&vm->lock);
    return n;
}

uint64_t sm_vm_ready_ns(struct sm_vm *vm)
{
    pthread_mutex_lock(&vm->lock);
    uint64_t t = vm->ready_ns;
    pthread_mutex_unlock(&vm->lock);
    return t;
}

void sm_vm_clear_ready(struct sm_vm *vm)
{
    pthread_mutex_lock(&vm->lock);
    vm->ready_ns = 0;
    vm->nmarks = 0;
    pthread_mutex_unlock(&vm->lock);
}

/* Complete any I/O a stopped vCPU left pending (KVM finishes it on the next KVM_RUN, which
 * immediate_exit makes return at once), so its registers are at a clean boundary. Only for
 * vCPUs whose thread has left sm_vcpu_run. */
int sm_vcpu_settle(struct sm_vm *vm, int index)
{
    if (index < 0 || index >= vm->nvcpus || !vm->vcpus[index].run)
        return -EINVAL;
    struct sm_vcpu *v = &vm->vcpus[index];
    if (v->thread_live)
        return -EBUSY;
    v->run->immediate_exit = 1;
    int rc = ioctl(v->fd, KVM_RUN, 0);
    int err = rc < 0 ? errno : 0;
    v->run->immediate_exit = 0;
    return (rc < 0 && err != EINTR) ? -err : 0;
}

/* ------------------------------------------------------------- run loop */

/* The control port: commands from the guest to the VMM (see bootinfo.h). Returns 1 to stop. */
static int control_write(struct sm_vm *vm, int index, uint32_t value)
{
    uint32_t cmd = value & 0xff, arg = value >> 8;
    struct sm_exit_info why = {.vcpu = index, .kvm_exit = KVM_EXIT_IO, .code = arg};
    switch (cmd) {
    case SM_CTL_NOP:
        __atomic_add_fetch(&vm->stats.control_nops, 1, __ATOMIC_RELAXED);
        return 0;
    case SM_CTL_POWEROFF:
        why.reason = SM_EXIT_HALT;
        request_stop(vm, &why, index);
        return 1;
    case SM_CTL_PANIC:
        why.reason = SM_EXIT_PANIC;
        request_stop(vm, &why, index);
        return 1;
    case SM_CTL_READY:
        pthread_mutex_lock(&vm->lock);
        vm->ready_ns = sm_now_ns();
        pthread_cond_broadcast(&vm->cond);
        pthread_mutex_unlock(&vm->lock);
        return 0;
    case SM_CTL_MARK:
        pthread_mutex_lock(&vm->lock);
        if (vm->nmarks < SM_MAX_MARKS)
            vm->marks[vm->nmarks++] = (struct sm_mark){arg, sm_now_ns()};
        pthread_mutex_unlock(&vm->lock);
        return 0;
    default:
        __atomic_add_fetch(&vm->stats.unhandled_io, 1, __ATOMIC_RELAXED);
        return 0;
    }
}

static const struct sm_io_region *find_region(struct sm_vm *vm, int space, uint64_t addr,
                                              uint32_t len)
{
    for (int i = 0; i < vm->nregions; i++) {
        const struct sm_io_region *r = &vm->regions[i];
        if (r->space == space && addr >= r->base && addr + len <= r->base + r->size)
            return r;
    }
    return NULL;
}

/* Hand an access to a Python device; returns 1 when the machine must stop. */
static int python_io(struct sm_vm *vm, int index, int space, uint64_t addr, uint8_t *data,
                     uint32_t len, int is_write)
{
    pthread_mutex_lock(&vm->lock);
    const struct sm_io_region *r = find_region(vm, space, addr, len);
    struct sm_io_region copy;
    if (r)
        copy = *r;
    pthread_mutex_unlock(&vm->lock);
    if (!r) {
        __atomic_add_fetch(&vm->stats.unhandled_io, 1, __ATOMIC_RELAXED);
        if (!is_write)
            memset(data, 0xff, len);
        return 0;
    }
    __atomic_add_fetch(&vm->stats.python_calls, 1, __ATOMIC_RELAXED);
    if (sm_py_io(vm->py_handle, copy.token, space, addr - copy.base, data, len, is_write) < 0) {
        struct sm_exit_info why = {.reason = SM_EXIT_ERROR, .vcpu = index, .code = -EIO,
                                   .detail = {addr, (uint64_t)space}};
        request_stop(vm, &why, index);
        return 1;
    }
    return 0;
}

static int handle_pio(struct sm_vm *vm, int index, struct kvm_run *run)
{
    uint8_t *data = (uint8_t *)run + run->io.data_offset;
    uint16_t port = run->io.port;
    uint32_t size = run->io.size;
    int is_write = run->io.direction == KVM_EXIT_IO_OUT;
    __atomic_add_fetch(&vm->stats.io_exits, 1, __ATOMIC_RELAXED);
    for (uint32_t n = 0; n < run->io.count; n++, data += size) {
        if (port >= SM_COM1_BASE && port < SM_COM1_BASE + 8) {
            int edge = 0;
            pthread_mutex_lock(&vm->serial_lock);
            if (is_write)
                edge = serial_write(&vm->serial, port - SM_COM1_BASE, data[0]);
            else
                data[0] = serial_read(&vm->serial, port - SM_COM1_BASE);
            pthread_mutex_unlock(&vm->serial_lock);
            if (edge)
                serial_irq_pulse(vm);
        } else if (port == SM_CONTROL_PORT && is_write) {
            uint32_t v = 0;
            memcpy(&v, data, size < 4 ? size : 4);
            if (control_write(vm, index, v))
                return 1;
        } else if (port == SM_I8042_CMD && is_write && data[0] == 0xfe) {
            struct sm_exit_info why = {.reason = SM_EXIT_RESET, .vcpu = index,
                                       .kvm_exit = KVM_EXIT_IO};
            request_stop(vm, &why, index);
            return 1;
        } else if ((port == SM_I8042_CMD || port == SM_I8042_DATA) && !is_write) {
            /* No keyboard controller: status 0 (buffers empty). Linux polls the status for
             * "input buffer empty" before its reset write, up to 65536 reads (each an exit). */
            memset(data, 0, size);
        } else if (python_io(vm, index, SM_SPACE_PIO, port, data, size, is_write)) {
            return 1;
        }
    }
    return 0;
}

static int handle_exit(struct sm_vm *vm, int index, struct kvm_run *run)
{
    struct sm_exit_info why = {.vcpu = index, .kvm_exit = run->exit_reason};
    switch (run->exit_reason) {
    case KVM_EXIT_IO:
        return handle_pio(vm, index, run);
    case KVM_EXIT_MMIO:
        __atomic_add_fetch(&vm->stats.mmio_exits, 1, __ATOMIC_RELAXED);
        return python_io(vm, index, SM_SPACE_MMIO, run->mmio.phys_addr, run->mmio.data,
                         run->mmio.len, run->mmio.is_write);
    case KVM_EXIT_INTR:
    case KVM_EXIT_IRQ_WINDOW_OPEN:
        return 0;
    case KVM_EXIT_HLT:
        why.reason = SM_EXIT_HALT;
        break;
    case KVM_EXIT_SHUTDOWN:
        why.reason = SM_EXIT_SHUTDOWN;
        break;
    case KVM_EXIT_SYSTEM_EVENT:
        why.reason = run->system_event.type == KVM_SYSTEM_EVENT_RESET ? SM_EXIT_RESET
                                                                      : SM_EXIT_HALT;
        why.suberror = run->system_event.type;
        break;
    case KVM_EXIT_INTERNAL_ERROR:
        why.reason = SM_EXIT_ERROR;
        why.suberror = run->internal.suberror;
        for (uint32_t i = 0; i < run->internal.ndata && i < 4; i++)
            why.detail[i] = run->internal.data[i];
        break;
    case KVM_EXIT_FAIL_ENTRY:
        why.reason = SM_EXIT_ERROR;
        why.detail[0] = run->fail_entry.hardware_entry_failure_reason;
        break;
    default:
        why.reason = SM_EXIT_ERROR;
        break;
    }
    request_stop(vm, &why, index);
    return 1;
}

/* Park or stop as the host asks; returns 1 when the thread must leave the run loop. */
static int service_request(struct sm_vm *vm, struct sm_vcpu *v)
{
    pthread_mutex_lock(&vm->lock);
    for (;;) {
        if (vm->request == SM_REQ_STOP) {
            pthread_mutex_unlock(&vm->lock);
            return 1;
        }
        if (vm->request == SM_REQ_PAUSE) {
            v->parked = 1;
            vm->parked++;
            pthread_cond_broadcast(&vm->cond);
            while (vm->request == SM_REQ_PAUSE)
                pthread_cond_wait(&vm->cond, &vm->lock);
            vm->parked--;
            v->parked = 0;
            continue;
        }
        v->run->immediate_exit = 0;
        pthread_mutex_unlock(&vm->lock);
        return 0;
    }
}

int sm_vcpu_run(struct sm_vm *vm, int index)
{
    if (index < 0 || index >= vm->nvcpus || !vm->vcpus[index].run)
        return -EINVAL;
    struct sm_vcpu *v = &vm->vcpus[index];
    struct kvm_run *run = v->run;
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, sm_kick_signal);
    pthread_sigmask(SIG_UNBLOCK, &set, NULL);

    pthread_mutex_lock(&vm->lock);
    v->thread = pthread_self();
    v->thread_live = 1;
    vm->running++;
    if (vm->request != SM_REQ_RUN)
        run->immediate_exit = 1;
    pthread_cond_broadcast(&vm->cond);
    pthread_mutex_unlock(&vm->lock);

    for (;;) {
        int rc = ioctl(v->fd, KVM_RUN, 0);
        if (rc < 0) {
            int err = errno;
            if (err == EINTR || err == EAGAIN) {
                if (service_request(vm, v))
                    break;
                continue;
            }
            struct sm_exit_info why = {.reason = SM_EXIT_ERROR, .vcpu = index, .code = -err};
            request_stop(vm, &why, index);
            break;
        }
        __atomic_add_fetch(&vm->stats.exits, 1, __ATOMIC_RELAXED);
        if (handle_exit(vm, index, run))
            break;
    }

    pthread_mutex_lock(&vm->lock);
    v->thread_live = 0;
    vm->running--;
    pthread_cond_broadcast(&vm->cond);
    int reason = vm->exit.reason;
    pthread_mutex_unlock(&vm->lock);
    return reason;
}
