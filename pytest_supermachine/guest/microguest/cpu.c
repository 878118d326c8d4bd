/*
 * CPU setup: our GDT/IDT/TSS (the VMM's GDT has no user segments and no TSS),
 * exception reporting (the #UD entry doubles as the CPL3 system call gate), and
 * starting the APs through the in-kernel LAPIC.
 */
#include "microguest.h"

struct __attribute__((packed)) tss64 {
    uint32_t reserved0;
    uint64_t rsp[3];
    uint64_t reserved1;
    uint64_t ist[7];
    uint64_t reserved2;
    uint16_t reserved3;
    uint16_t iopb; /* = sizeof: no I/O bitmap, CPL3 has no port access */
};

struct __attribute__((packed)) idt_gate {
    uint16_t off_lo;
    uint16_t sel;
    uint8_t ist;
    uint8_t type_attr;
    uint16_t off_mid;
    uint32_t off_hi;
    uint32_t zero;
};

struct __attribute__((packed)) dtr {
    uint16_t limit;
    uint64_t base;
};

/*
 * Accessed bits are preset (0x9b/0x93/...) so the CPU never has to write the
 * descriptors back, one less thing for the instruction emulator to do.
 */
__attribute__((aligned(16))) uint64_t mg_gdt[MG_GDT_ENTRIES] = {
    [0] = 0,
    [MG_SEL_CODE64 >> 3] = 0x00af9b000000ffffull,   /* 64-bit code, DPL 0 (as the VMM's) */
    [MG_SEL_DATA >> 3] = 0x00cf93000000ffffull,     /* data, DPL 0 (as the VMM's) */
    [MG_SEL_CODE32 >> 3] = 0x00cf9b000000ffffull,   /* 32-bit code: AP trampoline */
    [MG_SEL_UCODE >> 3] = 0x00affb000000ffffull,    /* 64-bit code, DPL 3 */
    [MG_SEL_UDATA >> 3] = 0x00cff3000000ffffull,    /* data, DPL 3 */
    /* MG_SEL_TSS: filled in at run time (needs the TSS address) */
};

static struct tss64 tss __attribute__((aligned(16)));
static struct idt_gate idt[256] __attribute__((aligned(16)));

volatile uint32_t mg_cpus_online;

static void set_gate(unsigned vec, void (*handler)(void), unsigned dpl)
{
    uint64_t a = (uint64_t)handler;
    idt[vec] = (struct idt_gate){
        .off_lo = (uint16_t)a,
        .sel = MG_SEL_CODE64,
        .ist = 0,
        .type_attr = (uint8_t)(0x8e | (dpl << 5)), /* present, 64-bit interrupt gate */
        .off_mid = (uint16_t)(a >> 16),
        .off_hi = (uint32_t)(a >> 32),
    };
}

/* Load GDT and IDT; shared by BSP and APs. The selectors in use stay valid. */
void mg_load_tables(void)
{
    struct dtr g = {sizeof(mg_gdt) - 1, (uint64_t)mg_gdt};
    struct dtr i = {sizeof(idt) - 1, (uint64_t)idt};
    __asm__ volatile("lgdt %0; lidt %1" : : "m"(g), "m"(i) : "memory");
}

void mg_cpu_init_bsp(void)
{
    uint64_t t = (uint64_t)&tss;
    tss.rsp[0] = (uint64_t)mg_int_stack_top;
    tss.iopb = sizeof(tss);
    mg_gdt[MG_SEL_TSS >> 3] = (sizeof(tss) - 1) | ((t & 0xffffff) << 16) | (0x89ull << 40) |
                              ((t >> 24) & 0xff) << 56;
    mg_gdt[(MG_SEL_TSS >> 3) + 1] = t >> 32;
    for (unsigned v = 0; v < 32; v++)
        set_gate(v, (void (*)(void))mg_exception_stubs[v], 0);
    mg_load_tables();
    __asm__ volatile("ltr %w0" : : "r"(MG_SEL_TSS));
}

static const char *const exception_names[32] = {
    "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "CSO", "#TS", "#NP",
    "#SS", "#GP", "#PF", "?15", "#MF", "#AC", "#MC", "#XM", "#VE", "#CP",
};

void mg_exception(uint64_t vec, uint64_t err, uint64_t rip, uint64_t cs)
{
    /* No console lock: the faulting CPU may hold it. */
    mg_printf_nolock("microguest: exception %lu rip=%lx err=%lx\n", vec, rip, err);
    const char *name = vec < 32 && exception_names[vec] ? exception_names[vec] : "?";
    mg_printf_nolock("microguest: (%s at cpl %lu", name, cs & 3);
    if (vec == 14) {
        uint64_t cr2;
        __asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
        mg_printf_nolock(" cr2=%lx", cr2);
    }
    mg_printf_nolock(")\n");
    mg_panic((uint32_t)vec);
}

uint64_t mg_syscall(uint64_t nr, uint64_t arg)
{
    switch (nr) {
    case MG_SYS_PRINT_COUNT:
        mg_printf("microguest: count %lu\n", arg);
        return 0;
    case MG_SYS_PUTS:
        /* The identity map is user-accessible: the string is readable as is. */
        mg_printf("%s", (const char *)arg);
        return 0;
    case MG_SYS_CONTROL:
        mg_outl(SM_CONTROL_PORT, (uint32_t)arg);
        return 0;
    case MG_SYS_HANG:
        mg_printf("microguest: agent: hanging with interrupts off (on request)\n");
        mg_halt_forever();
    default:
        mg_printf("microguest: bad syscall %lu\n", nr);
        mg_panic(MG_PANIC_BAD_SYSCALL);
    }
}

void mg_triple_fault(void)
{
    /* A zero-limit IDT makes #UD unreachable -> #GP -> #DF -> shutdown. */
    struct dtr empty = {0, 0};
    __asm__ volatile("lidt %0; ud2" : : "m"(empty) : "memory");
    __builtin_unreachable();
}

/* ------------------------------------------------------------ LAPIC -- */

#define MSR_APIC_BASE 0x1b
#define APIC_BASE_ENABLE (1ull << 11)
#define LAPIC_ID 0x20
#define LAPIC_SVR 0xf0
#define LAPIC_ICR_LO 0x300
#define LAPIC_ICR_HI 0x310
#define ICR_PENDING (1u << 12)
#define ICR_ALL_BUT_SELF (3u << 18)
#define ICR_ASSERT (1u << 14)
#define ICR_INIT (5u << 8)
#define ICR_STARTUP (6u << 8)

static uint64_t rdmsr(uint32_t msr)
{
    uint32_t lo, hi;
    __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
    return ((uint64_t)hi << 32) | lo;
}

static void wrmsr(uint32_t msr, uint64_t v)
{
    __asm__ volatile("wrmsr" : : "c"(msr), "a"((uint32_t)v), "d"((uint32_t)(v >> 32)));
}

/* The LAPIC's MMIO page, identity mapped (the VMM maps the whole 32-bit hole). */
static volatile uint32_t *lapic(uint32_t reg)
{
    static uint64_t base;
    if (!base)
        base = rdmsr(MSR_APIC_BASE) & 0xffffff000ull;
    return (volatile uint32_t *)(base + reg);
}

uint32_t mg_lapic_id(void) { return *lapic(LAPIC_ID) >> 24; }

static void send_ipi(uint32_t icr)
{
    *lapic(LAPIC_ICR_HI) = 0;
    *lapic(LAPIC_ICR_LO) = icr;
    while (*lapic(LAPIC_ICR_LO) & ICR_PENDING)
        __builtin_ia32_pause();
}

/* Software-enable the LAPIC (KVM starts it enabled in the MSR, disabled in the SVR). */
void mg_lapic_enable(void)
{
    uint64_t apic_base = rdmsr(MSR_APIC_BASE);
    if (!(apic_base & APIC_BASE_ENABLE))
        wrmsr(MSR_APIC_BASE, apic_base | APIC_BASE_ENABLE);
    *lapic(LAPIC_SVR) = 0x100 | MG_VEC_SPURIOUS;
}

/*
 * INIT then SIPI twice to every other CPU (shorthand "all excluding self",
 * so APIC ids need not be 1..n-1). KVM completes IPIs at once, so the
 * multi-millisecond delays real hardware wants are left out.
 */
void mg_start_aps(void)
{
    uint64_t cr0, cr3, cr4;
    __asm__ volatile("mov %%cr0, %0; mov %%cr3, %1; mov %%cr4, %2"
                     : "=r"(cr0), "=r"(cr3), "=r"(cr4));
    mg_ap_cr0 = (uint32_t)cr0;
    mg_ap_cr3 = (uint32_t)cr3; /* the VMM's page tables are below 4 GiB (0x9000) */
    mg_ap_cr4 = (uint32_t)cr4;
    mg_ap_efer = (uint32_t)rdmsr(0xc0000080) & ~(1u << 10); /* LMA is the CPU's to set */
    memcpy((void *)MG_TRAMPOLINE_ADDR, mg_trampoline_start,
           (size_t)(mg_trampoline_end - mg_trampoline_start));

    mg_lapic_enable();

    send_ipi(ICR_ALL_BUT_SELF | ICR_ASSERT | ICR_INIT);
    send_ipi(ICR_ALL_BUT_SELF | ICR_ASSERT | ICR_STARTUP | MG_SIPI_VECTOR);
    send_ipi(ICR_ALL_BUT_SELF | ICR_ASSERT | ICR_STARTUP | MG_SIPI_VECTOR);
}

/* Every AP lands here from entry.S, on its own stack. */
void mg_ap_main(void)
{
    mg_load_tables();
    mg_printf("microguest: cpu %u online\n", mg_lapic_id());
    __atomic_fetch_add(&mg_cpus_online, 1, __ATOMIC_SEQ_CST);
    mg_halt_forever();
}

/* ------------------------------------------------------ AGENT: interrupts -- */

#define LAPIC_EOI 0xb0
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_LVT_LINT0 0x350
#define LAPIC_LVT_LINT1 0x360
#define LVT_MASKED (1u << 16)
#define LVT_TSC_DEADLINE (2u << 17)
#define IOAPIC_BASE 0xfec00000ul
#define IOAPIC_REDTBL(pin) (0x10 + 2 * (pin))
#define IOAPIC_PINS 24
#define PIC1_DATA 0x21
#define PIC2_DATA 0xa1

static void ioapic_write(uint32_t reg, uint32_t value)
{
    *(volatile uint32_t *)IOAPIC_BASE = reg;            /* IOREGSEL */
    *(volatile uint32_t *)(IOAPIC_BASE + 0x10) = value; /* IOWIN */
}

/*
 * AGENT mode's interrupt plumbing, once at boot: an IDT entry for every vector
 * (unexpected ones are counted and EOIed, never fatal), the 8259s masked (the
 * LAPIC's LINT0 would otherwise deliver them as ExtINT), LINT0/1 masked, the
 * LAPIC timer in TSC-deadline mode, and for boot device i an IOAPIC entry:
 * edge, active high, fixed delivery of MG_VEC_DEVICE + i to this CPU.
 * Returns the number of devices routed, or -1 without a TSC-deadline timer.
 */
int mg_irq_init(const struct sm_boot_info *bi)
{
    uint32_t eax = 1, ebx, ecx = 0, edx;
    __asm__ volatile("cpuid" : "+a"(eax), "=b"(ebx), "+c"(ecx), "=d"(edx));
    if (!(ecx & (1u << 24)))
        return -1;
    for (unsigned v = 32; v < 256; v++)
        set_gate(v, mg_irq_other, 0);
    set_gate(MG_VEC_TIMER, mg_irq_timer, 0);
    set_gate(MG_VEC_SPURIOUS, mg_irq_spurious, 0);
    mg_outb(PIC1_DATA, 0xff);
    mg_outb(PIC2_DATA, 0xff);
    mg_lapic_enable();
    mg_lapic_eoi_addr = (uint64_t)lapic(LAPIC_EOI);
    *lapic(LAPIC_LVT_LINT0) = LVT_MASKED;
    *lapic(LAPIC_LVT_LINT1) = LVT_MASKED;
    *lapic(LAPIC_LVT_TIMER) = LVT_TSC_DEADLINE | MG_VEC_TIMER;
    uint32_t apic_id = mg_lapic_id();
    int routed = 0;
    for (uint32_t i = 0; i < bi->ndevices && i < MG_MAX_IRQ_DEVICES; i++) {
        const struct sm_boot_device *d = &bi->devices[i];
        if (d->irq >= IOAPIC_PINS)
            continue;
        mg_irq_mmio[i] = d->mmio_base;
        set_gate(MG_VEC_DEVICE + i, (void (*)(void))mg_irq_device_stubs[i], 0);
        ioapic_write(IOAPIC_REDTBL(d->irq) + 1, apic_id << 24);
        ioapic_write(IOAPIC_REDTBL(d->irq), MG_VEC_DEVICE + i); /* edge, high, fixed, unmasked */
        routed++;
    }
    return routed;
}

/* ------------------------------------------------------ AGENT: TSC rate -- */

#define PIT_HZ 1193182u
#define PIT_CH2 0x42
#define PIT_CMD 0x43
#define PIT_SPEAKER 0x61
#define CALIBRATE_US 2000u
#define CALIBRATE_MAX_RUNS 8

static uint8_t mg_inb(uint16_t port)
{
    uint8_t v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

static uint64_t rdtsc(void)
{
    uint32_t lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
}

/*
 * TSC ticks in CALIBRATE_US by PIT channel 2 in mode 0 (OUT2 rises in port
 * 0x61 bit 5 when the count runs out), and the uncertainty of that number:
 * the start lies between the TSC reads around the write that starts the
 * count, the end between the read before the last poll that saw OUT2 low and
 * the read after the one that saw it high. A preempted vCPU widens a bracket
 * instead of silently stretching the run.
 */
static uint64_t pit_run(uint64_t *uncertainty)
{
    uint32_t count = PIT_HZ / (1000000u / CALIBRATE_US);
    mg_outb(PIT_SPEAKER, (uint8_t)((mg_inb(PIT_SPEAKER) & ~0x02) | 0x01)); /* gate on, speaker off */
    mg_outb(PIT_CMD, 0xb0);                                                 /* ch2, lo/hi, mode 0 */
    mg_outb(PIT_CH2, (uint8_t)count);
    uint64_t s0 = rdtsc();
    mg_outb(PIT_CH2, (uint8_t)(count >> 8)); /* counting starts here */
    uint64_t s1 = rdtsc(), before_prev = s0, before = s1;
    while (!(mg_inb(PIT_SPEAKER) & 0x20)) {
        before_prev = before;
        before = rdtsc();
    }
    uint64_t e1 = rdtsc();
    *uncertainty = (s1 - s0 + e1 - before_prev) / 2;
    return (e1 + before_prev) / 2 - (s1 + s0) / 2;
}

/*
 * The TSC rate in kHz, against the PIT: the guest's CPUID here has no
 * TSC-frequency leaf, and the in-kernel PIT is an exact 1.193182 MHz. Runs
 * repeat (up to CALIBRATE_MAX_RUNS) until one is bracketed to 0.5%; the
 * tightest is used. A quiet host needs one 2 ms run (polls are port exits of
 * a few us); a loaded one, where the vCPU gets preempted, a few more.
 */
uint32_t mg_calibrate_tsc_khz(void)
{
    uint64_t best = 0, best_unc = ~0ull;
    for (int i = 0; i < CALIBRATE_MAX_RUNS && best_unc * 200 > best; i++) {
        uint64_t unc, ticks = pit_run(&unc);
        if (unc < best_unc) {
            best = ticks;
            best_unc = unc;
        }
    }
    return (uint32_t)(best * 1000u / CALIBRATE_US);
}
