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

    uint64_t apic_base = rdmsr(MSR_APIC_BASE);
    if (!(apic_base & APIC_BASE_ENABLE))
        wrmsr(MSR_APIC_BASE, apic_base | APIC_BASE_ENABLE);
    *lapic(LAPIC_SVR) = 0x100 | 0xff; /* software enable, spurious vector 0xff */

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
