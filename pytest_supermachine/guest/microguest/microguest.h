/*
 * Internal declarations of the microguest, shared by the C files and entry.S.
 *
 * Anything the host must know (panic codes, marks, the trampoline page, the
 * COUNT print interval) is mirrored in __init__.py; tests/kvm/
 * test_microguest_build.py parses this file so the two cannot drift apart.
 */
#ifndef MICROGUEST_H
#define MICROGUEST_H

/* Panic codes: the argument of SM_CTL_PANIC. 0-31 are CPU exception vectors. */
#define MG_PANIC_AGENT_NO_VSOCK 0xA6  /* AGENT mode without a usable virtio-vsock device */
#define MG_PANIC_AGENT_NO_MEMORY 0xA7 /* AGENT mode in too little RAM for its buffers */
#define MG_PANIC_AGENT_DEVICE 0xA8    /* a virtio device failed (NEEDS_RESET, bad answer) */
#define MG_PANIC_AGENT_NO_TIMER 0xA9  /* no TSC-deadline LAPIC timer (CPUID.1:ECX[24]) */
#define MG_PANIC_AGENT_STACK 0xAA     /* an agent task overflowed its stack */
#define MG_PANIC_BAD_BOOT_INFO 0xB1   /* wrong magic or version in sm_boot_info */
#define MG_PANIC_UNKNOWN_MODE 0xB2    /* sm_boot_info.mode is not an sm_guest_mode */
#define MG_PANIC_TOO_MANY_CPUS 0xB3   /* SMP mode with vcpus > MG_MAX_CPUS */
#define MG_PANIC_BAD_SYSCALL 0xB4     /* CPL3 code made an unknown system call */

/* Marks (argument of SM_CTL_MARK): timestamps the host may use for benchmarks. */
#define MG_MARK_OUT_LOOP_START 1
#define MG_MARK_OUT_LOOP_END 2
#define MG_MARK_SMP_START 3     /* BSP is about to send INIT-SIPI-SIPI */
#define MG_MARK_SMP_ALL_ONLINE 4 /* every AP checked in */
#define MG_MARK_AGENT_DEVICES 5  /* AGENT: virtio devices are up (then READY when listening) */

/*
 * APs get their stack by ticket, so at most MG_MAX_CPUS - 1 of them can run;
 * the BSP refuses more (MG_PANIC_TOO_MANY_CPUS) instead of corrupting memory.
 */
#define MG_MAX_CPUS 64
#define MG_AP_STACK_SIZE 4096

/*
 * The real-mode AP entry is copied here; the SIPI vector is its page number.
 * It lies between the boot info page (0x7000) and the VMM's page tables
 * (0x9000), so the VMM must keep 0x8000-0x8fff free of its own data.
 */
#define MG_TRAMPOLINE_ADDR 0x8000
#define MG_SIPI_VECTOR (MG_TRAMPOLINE_ADDR >> 12)

/* COUNT mode prints every 2^MG_COUNT_PRINT_SHIFT increments: 2-5 lines/s at the
 * 0.5-1.3e9 increments/s the CPL3 loop runs at under nested PVM here. */
#define MG_COUNT_PRINT_SHIFT 28

/*
 * Our own GDT keeps the VMM's selectors 0x08/0x10/0x18 with the same
 * descriptors, so CS/SS stay valid across our lgdt and no far jump is needed;
 * user segments and the TSS come after them.
 */
#define MG_SEL_CODE64 0x08
#define MG_SEL_DATA 0x10
#define MG_SEL_CODE32 0x18
#define MG_SEL_UCODE (0x20 | 3)
#define MG_SEL_UDATA (0x28 | 3)
#define MG_SEL_TSS 0x30
#define MG_GDT_ENTRIES 8 /* null, code64, data, code32, ucode, udata, tss (2 slots) */

/* System calls from CPL3 (mg_user_gate): number in RAX, argument in RDI. */
#define MG_SYS_EXIT 0        /* leave CPL3: mg_enter_user returns the argument */
#define MG_SYS_PRINT_COUNT 1 /* print "microguest: count <arg>" */
#define MG_SYS_WAIT 2        /* sti; hlt until an interrupt; arg = TSC deadline (0 = none) */
#define MG_SYS_PUTS 3        /* print the NUL-terminated string at arg on the console */
#define MG_SYS_CONTROL 4     /* write arg to the control port (cmd | arg << 8) */
#define MG_SYS_HANG 5        /* cli; hlt forever: the guest stops answering */

/*
 * Interrupt vectors (AGENT mode). Boot device i raises vector MG_VEC_DEVICE + i
 * through its IOAPIC pin; the TSC-deadline timer raises MG_VEC_TIMER.
 */
#define MG_VEC_DEVICE 0x40
#define MG_VEC_TIMER 0xe0
#define MG_VEC_SPURIOUS 0xff
#define MG_MAX_IRQ_DEVICES 16 /* = SM_MAX_BOOT_DEVICES, checked in cpu.c */

#define MG_MSR_TSC_DEADLINE 0x6e0

/* entry.S writes the control port without a stack; bootinfo.h is C-only. */
#define MG_ASM_CONTROL_PORT 0x510
#define MG_ASM_CTL_PANIC 3

#ifndef __ASSEMBLER__
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include "bootinfo.h"

_Static_assert(MG_ASM_CONTROL_PORT == SM_CONTROL_PORT, "entry.S control port");
_Static_assert(MG_ASM_CTL_PANIC == SM_CTL_PANIC, "entry.S panic command");
_Static_assert(MG_MAX_IRQ_DEVICES == SM_MAX_BOOT_DEVICES, "one IRQ stub per boot device");

#define MG_NORETURN __attribute__((noreturn))
#define MG_PAGE_SIZE 4096ul

static inline uint64_t mg_align_up(uint64_t v, uint64_t a) { return (v + a - 1) & ~(a - 1); }

static inline void mg_outb(uint16_t port, uint8_t v)
{
    __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}

static inline void mg_outl(uint16_t port, uint32_t v)
{
    __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port));
}

/* lib.c: console, control port, the libc bits gcc may call on its own. */
void mg_printf(const char *fmt, ...);          /* one line, under the console lock */
void mg_printf_nolock(const char *fmt, ...);   /* for exception paths */
void mg_vprintf(const char *fmt, va_list ap);
/* Formatting into a buffer (any CPL; CPL3 code prints through MG_SYS_PUTS). */
size_t mg_snprintf(char *buf, size_t size, const char *fmt, ...);
size_t mg_vsnprintf(char *buf, size_t size, const char *fmt, va_list ap);
void mg_control(uint32_t cmd, uint32_t arg);
MG_NORETURN void mg_poweroff(uint32_t status);
MG_NORETURN void mg_panic(uint32_t code);
MG_NORETURN void mg_halt_forever(void);
void *memcpy(void *dst, const void *src, size_t n);
void *memset(void *dst, int c, size_t n);
void *memmove(void *dst, const void *src, size_t n);
int memcmp(const void *a, const void *b, size_t n);

/* cpu.c: descriptor tables, exceptions, CPL3, LAPIC, APs. */
void mg_cpu_init_bsp(void);
void mg_load_tables(void);
MG_NORETURN void mg_triple_fault(void);
uint32_t mg_lapic_id(void);
void mg_start_aps(void);
extern volatile uint32_t mg_cpus_online; /* APs that reached C, BSP excluded */
void mg_lapic_enable(void);
int mg_irq_init(const struct sm_boot_info *bi); /* AGENT: IDT, LAPIC timer, IOAPIC; 0 = ok */
uint32_t mg_calibrate_tsc_khz(void);            /* TSC frequency against the PIT */

typedef void (*mg_user_fn)(uint64_t a0, uint64_t a1);
/* Run fn(a0, a1) at CPL3 until it calls MG_SYS_EXIT; returns that call's argument. */
uint64_t mg_enter_user(mg_user_fn fn, uint64_t a0, uint64_t a1, uint64_t user_rsp);
uint64_t mg_syscall(uint64_t nr, uint64_t arg); /* called from entry.S */
MG_NORETURN void mg_exception(uint64_t vec, uint64_t err, uint64_t rip, uint64_t cs);
void mg_ap_main(void);

/* entry.S: the CPL3 side of a system call (a ud2 the #UD entry recognises). */
uint64_t mg_user_gate(uint64_t nr, uint64_t arg);

/* entry.S: interrupt entries (AGENT mode) and the state they share with CPL3. */
extern void *const mg_irq_device_stubs[MG_MAX_IRQ_DEVICES];
void mg_irq_timer(void);
void mg_irq_other(void);
void mg_irq_spurious(void);
extern uint64_t mg_irq_mmio[MG_MAX_IRQ_DEVICES];          /* device windows, for the ACK */
extern volatile uint32_t mg_irq_seen[MG_MAX_IRQ_DEVICES]; /* set by device i's entry */
extern volatile uint32_t mg_irq_other_count;              /* unexpected vectors */
extern uint64_t mg_lapic_eoi_addr;

/* entry.S: CPL3 coroutine switch (agent tasks). Saves callee-saved registers. */
void mg_ctx_switch(uint64_t *save_sp, uint64_t load_sp);
void mg_ctx_start(void); /* first "return" of a new context: calls r13(r12) */

/* agent.c: AGENT mode, entered at CPL3 and never left. */
MG_NORETURN void mg_agent_main(uint64_t boot_info, uint64_t tsc_khz);

/* entry.S */
extern char mg_trampoline_start[], mg_trampoline_end[];
extern void *const mg_exception_stubs[32];
extern char mg_int_stack_top[], mg_user_stack_top[];
extern uint32_t mg_ap_cr0, mg_ap_cr3, mg_ap_cr4, mg_ap_efer;
extern uint64_t mg_gdt[MG_GDT_ENTRIES];
#endif /* __ASSEMBLER__ */

#endif
