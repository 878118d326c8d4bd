/*
 * Contract between the VMM and the microguest: the boot info page and the
 * supermachine control port. The VMM's cffi build includes this header, so the
 * host and the guest compile the same struct; change it only together with
 * SM_BOOT_INFO_VERSION.
 *
 * Entry state (set by the VMM, see vmm/boot.py):
 *   64-bit long mode, paging on, identity map of all guest RAM and of the
 *   32-bit MMIO hole (2 MiB pages, user-accessible), GDT at 0x500 with
 *   0x08 = 64-bit code, 0x10 = data, 0x18 = 32-bit code (for AP trampolines),
 *   CS=0x08, DS=ES=SS=FS=GS=0x10, RFLAGS=0x2 (interrupts off),
 *   RDI = guest-physical address of struct sm_boot_info (0x7000),
 *   RSP = 0 (the guest sets its own stack). Only the BSP starts; APs wait for
 *   INIT-SIPI-SIPI from the guest via the in-kernel LAPIC.
 */
#ifndef SM_BOOTINFO_H
#define SM_BOOTINFO_H

#include <stdint.h>

#define SM_BOOT_INFO_MAGIC 0x49424d53u /* "SMBI" little endian */
#define SM_BOOT_INFO_VERSION 1u
#define SM_MAX_BOOT_DEVICES 16

/* What the microguest does after its banner (sm_boot_info.mode). */
enum sm_guest_mode {
    SM_MODE_HALT = 0,        /* power off through the control port */
    SM_MODE_TRIPLE_FAULT = 1,/* load an empty IDT and fault: the VM shuts down */
    SM_MODE_SPIN = 2,        /* loop forever with interrupts off */
    SM_MODE_DIRTY = 3,       /* write `arg` pages at CPL3, report, power off */
    SM_MODE_SMP = 4,         /* start every AP; each prints; power off when all did */
    SM_MODE_COUNT = 5,       /* count forever in RAM and on the console (snapshot tests) */
    SM_MODE_OUT_LOOP = 6,    /* `arg` port writes to the control port's NOP, then power off */
    SM_MODE_AGENT = 7,       /* serve the agent protocol over virtio-vsock (later) */
};

/* Device types in the boot device table (virtio device ids). */
#define SM_DEV_VIRTIO_BLK 2u
#define SM_DEV_VIRTIO_VSOCK 19u

struct sm_boot_device {
    uint32_t type;      /* SM_DEV_* */
    uint32_t irq;       /* IOAPIC pin */
    uint64_t mmio_base; /* guest-physical */
    uint64_t mmio_size;
};

struct sm_boot_info {
    uint32_t magic;      /* SM_BOOT_INFO_MAGIC */
    uint32_t version;    /* SM_BOOT_INFO_VERSION */
    uint64_t mem_bytes;  /* total RAM */
    uint64_t low_mem_end;/* end of RAM below 4 GiB (guest-physical) */
    uint32_t vcpus;      /* number of vCPUs, BSP included */
    uint32_t mode;       /* enum sm_guest_mode */
    uint64_t arg;        /* mode argument */
    uint64_t free_start; /* first guest-physical byte the guest may use for its own data */
    uint32_t ndevices;
    uint32_t reserved;
    struct sm_boot_device devices[SM_MAX_BOOT_DEVICES];
};

/*
 * The supermachine control port (I/O port 0x510, 32-bit `out`): bits 0-7 are
 * the command, bits 8-31 its argument. Handled by the VMM's C core.
 */
#define SM_CONTROL_PORT 0x510
#define SM_CTL_NOP 0u       /* counted, nothing else (exit round-trip benchmarks) */
#define SM_CTL_POWEROFF 1u  /* stop the VM: reason HALT, argument = exit status */
#define SM_CTL_READY 2u     /* the guest is ready (agent listening): timestamped */
#define SM_CTL_PANIC 3u     /* the guest gave up: reason PANIC, argument = code */
#define SM_CTL_MARK 4u      /* a timestamped progress mark, argument = mark id */

#endif
