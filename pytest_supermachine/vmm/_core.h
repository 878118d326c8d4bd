/*
 * The C core of the supermachine VMM: the vCPU run loop and the devices that
 * must not cost a trip into Python (16550 serial on COM1, the control port,
 * the i8042 reset line). Python (vmm/machine.py) owns the lifecycle; this file
 * owns the hot path.
 *
 * Everything here is declared again in _build.py's cdef; keep the two in step.
 */
#ifndef SM_CORE_H
#define SM_CORE_H

#include <stdint.h>

#define SM_MAX_VCPUS 64
#define SM_MAX_IO_REGIONS 64
#define SM_MAX_MARKS 64
#define SM_SERIAL_RX_MAX 65536

/* Why the machine stopped (first cause wins). */
enum sm_exit_reason {
    SM_EXIT_NONE = 0,     /* still running */
    SM_EXIT_HALT = 1,     /* guest powered off (control port) or halted with no irqchip */
    SM_EXIT_SHUTDOWN = 2, /* triple fault */
    SM_EXIT_RESET = 3,    /* guest asked for a reset (i8042 0xFE, system event) */
    SM_EXIT_PANIC = 4,    /* guest gave up through the control port */
    SM_EXIT_CANCELED = 5, /* the host stopped the machine */
    SM_EXIT_ERROR = 6,    /* KVM could not run the guest (emulation failure, entry failure, errno) */
};

/* What the host asks of the vCPU threads. */
enum sm_request { SM_REQ_RUN = 0, SM_REQ_PAUSE = 1, SM_REQ_STOP = 2 };

/* I/O regions dispatched to Python (slow devices). */
enum sm_io_space { SM_SPACE_PIO = 0, SM_SPACE_MMIO = 1 };

struct sm_exit_info {
    int32_t reason;     /* enum sm_exit_reason */
    int32_t vcpu;       /* index of the vCPU that caused it, -1 for the host */
    uint32_t kvm_exit;  /* kvm_run.exit_reason at the time, if any */
    uint32_t suberror;  /* internal-error suberror / entry-failure reason */
    int64_t code;       /* poweroff status, panic code, errno */
    uint64_t detail[4]; /* internal.data[] or rip etc. */
};

/* 16550 register state: what a snapshot needs to carry. */
struct sm_serial_state {
    uint8_t ier, iir_thre_pending, lcr, mcr, lsr_extra, msr, scr, dll, dlm, fcr;
    uint32_t rx_count;
    uint8_t rx[SM_SERIAL_RX_MAX];
};

struct sm_stats {
    uint64_t exits, io_exits, mmio_exits, python_calls, unhandled_io, control_nops, kicks;
};

struct sm_mark {
    uint32_t id;
    uint64_t ns; /* CLOCK_MONOTONIC */
};

struct sm_vm;

int sm_core_init(void);
int sm_ioctl_ptr(int fd, unsigned long request, void *arg);
int sm_ioctl_int(int fd, unsigned long request, unsigned long arg);
uint64_t sm_now_ns(void);
int64_t sm_copy_bitmap(void *dst, const void *src, const uint64_t *bitmap, uint64_t npages);
int64_t sm_madvise_bitmap(void *base, const uint64_t *bitmap, uint64_t npages, int advice);
int sm_ioctl_batch(int n, const int *fds, const unsigned long *requests, void *const *args,
                   int *failed);

struct sm_vm *sm_vm_new(int vm_fd, int nvcpus, uint64_t console_log_bytes, void *py_handle);
void sm_vm_free(struct sm_vm *vm);
int sm_vm_set_vcpu(struct sm_vm *vm, int index, int vcpu_fd, void *kvm_run);
int sm_vm_add_io_region(struct sm_vm *vm, int space, uint64_t base, uint64_t size, uint64_t token);
int sm_vm_remove_io_region(struct sm_vm *vm, int space, uint64_t base);
void sm_vm_set_console_stream(struct sm_vm *vm, int fd);

int sm_vcpu_run(struct sm_vm *vm, int index);
int sm_vcpu_settle(struct sm_vm *vm, int index);
int sm_vm_pause(struct sm_vm *vm, int64_t timeout_ms);
void sm_vm_resume(struct sm_vm *vm);
void sm_vm_stop(struct sm_vm *vm);
void sm_vm_rearm(struct sm_vm *vm);
int sm_vm_wait_stopped(struct sm_vm *vm, int64_t timeout_ms);
int sm_vm_wait_ready(struct sm_vm *vm, int64_t timeout_ms);
int sm_vm_wait_running(struct sm_vm *vm, int count, int64_t timeout_ms);
int sm_vm_exit_fd(struct sm_vm *vm);
int sm_vm_running_vcpus(struct sm_vm *vm);
void sm_vm_exit_info(struct sm_vm *vm, struct sm_exit_info *out);
void sm_vm_stats(struct sm_vm *vm, struct sm_stats *out);
int sm_vm_marks(struct sm_vm *vm, struct sm_mark *out, int max);
uint64_t sm_vm_ready_ns(struct sm_vm *vm);
void sm_vm_clear_ready(struct sm_vm *vm);

uint64_t sm_serial_log_total(struct sm_vm *vm);
uint64_t sm_serial_log_read(struct sm_vm *vm, uint8_t *out, uint64_t max);
void sm_serial_log_clear(struct sm_vm *vm);
int sm_serial_feed(struct sm_vm *vm, const uint8_t *data, uint32_t len);
void sm_serial_get_state(struct sm_vm *vm, struct sm_serial_state *out);
void sm_serial_set_state(struct sm_vm *vm, const struct sm_serial_state *in);

#endif
