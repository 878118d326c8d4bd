/*
 * The microguest: a freestanding test guest the VMM boots straight into long
 * mode. sm_boot_info.mode picks one small behaviour per boot (bootinfo.h).
 *
 * CPL0 code is emulated instruction by instruction under nested PVM, so the
 * modes keep it short; loops that run long (DIRTY, COUNT) run at CPL3, which
 * executes natively.
 */
#include "microguest.h"

static const char *const mode_names[] = {
    [SM_MODE_HALT] = "halt",   [SM_MODE_TRIPLE_FAULT] = "triple_fault",
    [SM_MODE_SPIN] = "spin",   [SM_MODE_DIRTY] = "dirty",
    [SM_MODE_SMP] = "smp",     [SM_MODE_COUNT] = "count",
    [SM_MODE_OUT_LOOP] = "out_loop", [SM_MODE_AGENT] = "agent",
};
#define NMODES (sizeof(mode_names) / sizeof(mode_names[0]))

/* ------------------------------------------------------------- CPL3 -- */

/* Adds 1 to the first byte of each page: every page is written, and a page's
 * value says how often it was dirtied since the snapshot it came from. */
static void user_dirty(uint64_t start, uint64_t pages)
{
    for (uint64_t i = 0; i < pages; i++)
        ++*(volatile uint8_t *)(start + i * MG_PAGE_SIZE);
    mg_user_gate(MG_SYS_EXIT, pages);
}

static void user_count(uint64_t counter_addr, uint64_t unused)
{
    (void)unused;
    volatile uint64_t *counter = (volatile uint64_t *)counter_addr;
    for (;;) {
        uint64_t n = *counter + 1;
        *counter = n;
        if (!(n & ((1ull << MG_COUNT_PRINT_SHIFT) - 1)))
            mg_user_gate(MG_SYS_PRINT_COUNT, n);
    }
}

/* ------------------------------------------------------------ modes -- */

static void mode_dirty(const struct sm_boot_info *bi)
{
    uint64_t start = mg_align_up(bi->free_start, MG_PAGE_SIZE);
    uint64_t avail = bi->low_mem_end > start ? (bi->low_mem_end - start) / MG_PAGE_SIZE : 0;
    uint64_t pages = bi->arg < avail ? bi->arg : avail;
    uint64_t done = mg_enter_user(user_dirty, start, pages, (uint64_t)mg_user_stack_top);
    mg_printf("microguest: dirtied %lu pages\n", done);
    mg_poweroff(0);
}

static void mode_smp(const struct sm_boot_info *bi)
{
    if (bi->vcpus > MG_MAX_CPUS) {
        mg_printf("microguest: %u vcpus, at most %u supported\n", bi->vcpus, MG_MAX_CPUS);
        mg_panic(MG_PANIC_TOO_MANY_CPUS);
    }
    mg_control(SM_CTL_MARK, MG_MARK_SMP_START);
    if (bi->vcpus > 1)
        mg_start_aps();
    while (__atomic_load_n(&mg_cpus_online, __ATOMIC_ACQUIRE) != bi->vcpus - 1)
        __builtin_ia32_pause();
    mg_control(SM_CTL_MARK, MG_MARK_SMP_ALL_ONLINE);
    mg_printf("microguest: all %u cpus online\n", bi->vcpus);
    mg_poweroff(0);
}

static void mode_count(const struct sm_boot_info *bi)
{
    uint64_t addr = mg_align_up(bi->free_start, 8);
    mg_printf("microguest: counter at %lx\n", addr);
    *(volatile uint64_t *)addr = 0;
    mg_enter_user(user_count, addr, 0, (uint64_t)mg_user_stack_top);
}

static void mode_out_loop(const struct sm_boot_info *bi)
{
    /* At CPL0 on purpose: a PIO exit from CPL0 is the cheaper round trip here. */
    mg_control(SM_CTL_MARK, MG_MARK_OUT_LOOP_START);
    for (uint64_t i = 0; i < bi->arg; i++)
        mg_outl(SM_CONTROL_PORT, SM_CTL_NOP);
    mg_control(SM_CTL_MARK, MG_MARK_OUT_LOOP_END);
    mg_poweroff(0);
}

/*
 * AGENT: the CPL0 part is this function (interrupt routing, the TSC rate);
 * the agent itself runs at CPL3 from here on (agent.c) and never returns.
 */
static void mode_agent(const struct sm_boot_info *bi)
{
    if (mg_irq_init(bi) < 0) {
        mg_printf("microguest: agent needs a TSC-deadline LAPIC timer (CPUID.1:ECX[24])\n");
        mg_panic(MG_PANIC_AGENT_NO_TIMER);
    }
    uint32_t tsc_khz = mg_calibrate_tsc_khz();
    mg_enter_user((mg_user_fn)mg_agent_main, (uint64_t)bi, tsc_khz, (uint64_t)mg_user_stack_top);
}

void mg_main(struct sm_boot_info *bi);

void mg_main(struct sm_boot_info *bi)
{
    mg_cpu_init_bsp(); /* first, so even a bad boot info page is reported */
    if (bi->magic != SM_BOOT_INFO_MAGIC || bi->version != SM_BOOT_INFO_VERSION) {
        mg_printf("microguest: bad boot info at %lx: magic=%x version=%u (want %x v%u)\n",
                  (uint64_t)bi, bi->magic, bi->version, SM_BOOT_INFO_MAGIC,
                  SM_BOOT_INFO_VERSION);
        mg_panic(MG_PANIC_BAD_BOOT_INFO);
    }
    const char *name = bi->mode < NMODES ? mode_names[bi->mode] : "unknown";
    mg_printf("microguest: boot vcpus=%u mem=%luMiB mode=%s arg=%lu\n", bi->vcpus,
              bi->mem_bytes >> 20, name, bi->arg);

    switch (bi->mode) {
    case SM_MODE_HALT:
        mg_printf("microguest: halting\n");
        mg_poweroff(0);
    case SM_MODE_TRIPLE_FAULT:
        mg_printf("microguest: triple fault\n");
        mg_triple_fault();
    case SM_MODE_SPIN:
        mg_printf("microguest: spinning\n");
        for (;;)
            __asm__ volatile("cli; 1: jmp 1b");
    case SM_MODE_DIRTY:
        mode_dirty(bi);
        break;
    case SM_MODE_SMP:
        mode_smp(bi);
        break;
    case SM_MODE_COUNT:
        mode_count(bi);
        break;
    case SM_MODE_OUT_LOOP:
        mode_out_loop(bi);
        break;
    case SM_MODE_AGENT:
        mode_agent(bi);
        break;
    default:
        mg_printf("microguest: unknown mode %u\n", bi->mode);
        mg_panic(MG_PANIC_UNKNOWN_MODE);
    }
    mg_halt_forever();
}
