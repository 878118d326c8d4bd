/*
 * The microguest's assembly: BSP entry, AP trampoline, exception entries, the
 * CPL3 system call gate, and the switch to CPL3.
 *
 * Under nested PVM every CPL0 instruction is emulated by KVM, so these paths
 * use only plain moves, arithmetic, lgdt/lidt, mov cr, wrmsr, iretq and hlt.
 */
#include "microguest.h"

/* ------------------------------------------------------------------ BSP -- */
    .section .text.entry, "ax"
    .code64
    .globl _start
_start:
    /* The VMM leaves RSP = 0 and RDI = &sm_boot_info: give C a stack, pass RDI on. */
    lea     mg_bsp_stack_top(%rip), %rsp
    call    mg_main
1:  cli
    hlt
    jmp     1b

/* ----------------------------------------------------- AP trampoline -- */
/*
 * Copied to MG_TRAMPOLINE_ADDR by the BSP; the SIPI starts an AP here in real
 * mode with CS = MG_TRAMPOLINE_ADDR >> 4, IP = 0. Only this stub is copied:
 * it loads our GDT (32-bit base, hence lgdtl) and jumps straight into the
 * image at 1 MiB, where the rest runs at its link address.
 */
    .text
    .code16
    .globl mg_trampoline_start, mg_trampoline_end
mg_trampoline_start:
    cli
    mov     %cs, %ax
    mov     %ax, %ds
    lgdtl   tramp_gdtr - mg_trampoline_start
    mov     %cr0, %eax
    or      $1, %eax                    /* PE */
    mov     %eax, %cr0
    ljmpl   $MG_SEL_CODE32, $mg_ap_entry32
    .balign 8
tramp_gdtr:
    .word   MG_GDT_ENTRIES * 8 - 1
    .long   mg_gdt
mg_trampoline_end:

    .code32
mg_ap_entry32:
    /* Protected mode, paging off: switch on long mode with the BSP's own control registers. */
    mov     $MG_SEL_DATA, %eax
    mov     %eax, %ds
    mov     %eax, %es
    mov     %eax, %ss
    mov     mg_ap_cr4, %eax
    mov     %eax, %cr4
    mov     mg_ap_cr3, %eax
    mov     %eax, %cr3
    mov     $0xc0000080, %ecx           /* IA32_EFER */
    mov     mg_ap_efer, %eax
    xor     %edx, %edx
    wrmsr
    mov     mg_ap_cr0, %eax
    mov     %eax, %cr0                  /* PG: now in compatibility mode */
    ljmp    $MG_SEL_CODE64, $mg_ap_entry64

    .code64
mg_ap_entry64:
    mov     $MG_SEL_DATA, %eax
    mov     %eax, %ds
    mov     %eax, %es
    mov     %eax, %ss
    mov     %eax, %fs
    mov     %eax, %gs
    /* A ticket picks the stack: APIC ids need not be dense, tickets are. */
    mov     $1, %eax
    lock xaddl %eax, mg_ap_ticket(%rip)
    cmp     $MG_MAX_CPUS - 1, %eax
    jae     2f                          /* the BSP refused this many cpus already */
    add     $1, %eax
    .if MG_AP_STACK_SIZE != 4096
    .error "the shift below assumes 4 KiB AP stacks"
    .endif
    shl     $12, %rax                   /* * MG_AP_STACK_SIZE */
    lea     mg_ap_stacks(%rip), %rsp
    add     %rax, %rsp
    call    mg_ap_main
2:  cli
    hlt
    jmp     2b

/* ------------------------------------------------------- exceptions -- */
/* Vectors without a CPU-pushed error code push 0, so the frame is uniform. */
    .macro EXC vec
    .balign 16
exc_\vec:
    .if \vec == 6
    /* #UD from CPL3 at the gate's ud2 is a system call, not an error. */
    testb   $3, 8(%rsp)                 /* CS of the interrupted code */
    jz      5f
    cmpq    $mg_user_gate_ud2, (%rsp)   /* RIP */
    je      syscall_entry
5:
    .endif
    .if (\vec == 8) || (\vec == 10) || (\vec == 11) || (\vec == 12) || (\vec == 13) || (\vec == 14) || (\vec == 17) || (\vec == 21) || (\vec == 29) || (\vec == 30)
    .else
    pushq   $0
    .endif
    pushq   $\vec
    jmp     exc_common
    .endm

    .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    EXC \v
    .endr

exc_common:
    /* Frame: vector, error, RIP, CS, RFLAGS, RSP, SS. Never returns. */
    mov     (%rsp), %rdi
    mov     8(%rsp), %rsi
    mov     16(%rsp), %rdx
    mov     24(%rsp), %rcx
    and     $-16, %rsp
    call    mg_exception
3:  cli
    hlt
    jmp     3b

    .section .rodata
    .balign 8
    .globl mg_exception_stubs
mg_exception_stubs:
    .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad   exc_\v
    .endr

/* ------------------------------------------------------------- CPL3 -- */
    .text
/*
 * uint64_t mg_enter_user(fn, a0, a1, user_rsp): iretq to fn(a0, a1) at CPL3
 * with interrupts off. The kernel context is parked in mg_kernel_rsp; the
 * MG_SYS_EXIT system call resumes it, so this looks like an ordinary call.
 * Only the BSP enters CPL3 (one TSS, one parked context).
 */
    .globl mg_enter_user
mg_enter_user:
    push    %rbx
    push    %rbp
    push    %r12
    push    %r13
    push    %r14
    push    %r15
    mov     %rsp, mg_kernel_rsp(%rip)
    sub     $8, %rcx                    /* as if called: RSP+8 16-byte aligned */
    pushq   $MG_SEL_UDATA               /* SS */
    push    %rcx                        /* RSP */
    pushq   $0x2                        /* RFLAGS: IF=0, IOPL=0 */
    pushq   $MG_SEL_UCODE               /* CS */
    push    %rdi                        /* RIP */
    mov     %rsi, %rdi
    mov     %rdx, %rsi
    iretq

/*
 * System calls from CPL3: uint64_t mg_user_gate(nr, arg). Under nested PVM a
 * CPL3 `int $n` raises #UD (KVM's emulator does not do INT outside real
 * mode) and SYSCALL is mishandled, but exceptions are delivered faithfully;
 * so the gate is a ud2 at a known address, recognised by the #UD entry.
 */
    .globl mg_user_gate
mg_user_gate:
    mov     %rdi, %rax
    mov     %rsi, %rdi
mg_user_gate_ud2:
    ud2
    ret

/* From the #UD entry: RAX = number, RDI = argument; frame = RIP, CS, RFLAGS, RSP, SS. */
syscall_entry:
    cmp     $MG_SYS_WAIT, %rax
    je      wait_entry
    cmp     $MG_SYS_EXIT, %rax
    je      4f
    push    %rcx
    push    %rdx
    push    %rsi
    push    %rdi
    push    %r8
    push    %r9
    push    %r10
    push    %r11
    sub     $8, %rsp                    /* 16-byte alignment for the C call */
    mov     %rdi, %rsi
    mov     %rax, %rdi
    call    mg_syscall                  /* result in RAX, returned to CPL3 */
    add     $8, %rsp
    pop     %r11
    pop     %r10
    pop     %r9
    pop     %r8
    pop     %rdi
    pop     %rsi
    pop     %rdx
    pop     %rcx
    addq    $2, (%rsp)                  /* resume after the ud2 */
    iretq
4:  /* MG_SYS_EXIT: drop the exception frame, resume mg_enter_user's caller. */
    mov     mg_kernel_rsp(%rip), %rsp
    mov     $MG_SEL_DATA, %eax
    mov     %eax, %ss                   /* the CPL change loaded a null SS */
    mov     %eax, %ds
    mov     %eax, %es
    mov     %rdi, %rax
    pop     %r15
    pop     %r14
    pop     %r13
    pop     %r12
    pop     %rbp
    pop     %rbx
    ret

/*
 * MG_SYS_WAIT, the agent's idle path, in as few emulated instructions as we
 * can: arm (or, with 0, disarm) the TSC-deadline timer, then sti; hlt. CPL3
 * runs with IF=0, so an interrupt raised since CPL3 last looked at its rings
 * is pending in the LAPIC and ends the hlt at once (sti's shadow makes
 * sti; hlt atomic): no wake-up is lost. The handlers run on this stack and
 * return after the hlt. mg_user_gate is a C call, so RAX/RCX/RDX are ours.
 * The MSR is written only when the deadline changes: one that is still armed
 * fires on its own, and one that already fired has either woken us or is
 * pending; CPL3 never waits for a deadline it has seen pass.
 */
wait_entry:
    cmp     mg_tsc_deadline(%rip), %rdi
    je      1f                          /* unchanged (usually 0 -> 0): save the exit */
    mov     %rdi, mg_tsc_deadline(%rip)
    mov     %rdi, %rax
    mov     %rdi, %rdx
    shr     $32, %rdx
    mov     $MG_MSR_TSC_DEADLINE, %ecx
    wrmsr
1:  sti
    hlt
    cli
    addq    $2, (%rsp)                  /* resume after the ud2 */
    iretq

/* ------------------------------------------------------- interrupts -- */
/*
 * Interrupts are only ever taken inside wait_entry's hlt (CPL3 and the rest
 * of CPL0 run with IF=0), so these entries never switch stacks and clobber
 * nothing CPL3 cares about beyond what they save.
 *
 * Device i: InterruptACK both causes without reading InterruptStatus, EOI.
 * Each register access is an exit that the VMM serves in Python on this
 * vCPU's thread (~30 us here), and the cause does not matter: CPL3 looks at
 * all rings after every wake-up, and checks the device status itself when a
 * wake-up brings nothing (a configuration change: DEVICE_NEEDS_RESET). The
 * ACK keeps InterruptStatus clear, so a VMM that signals only its 0 -> 1
 * change, or resamples a level-triggered line, still works.
 */
    .macro IRQ_DEVICE idx
    .balign 16
irq_device_\idx:
    push    %rax
    mov     $\idx, %eax
    jmp     irq_device_common
    .endm

    .irp i, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15
    IRQ_DEVICE \i
    .endr

irq_device_common:
    push    %rcx
    mov     mg_irq_mmio(,%rax,8), %rcx
    movl    $3, 0x64(%rcx)              /* InterruptACK: used-buffer and config causes */
    movl    $1, mg_irq_seen(,%rax,4)    /* which device woke us (CPL3 clears it) */
    mov     mg_lapic_eoi_addr(%rip), %rcx
    movl    $0, (%rcx)
    pop     %rcx
    pop     %rax
    iretq

/* The TSC-deadline timer: waking up was the point; just EOI. */
    .globl mg_irq_timer
mg_irq_timer:
    push    %rcx
    mov     mg_lapic_eoi_addr(%rip), %rcx
    movl    $0, (%rcx)
    pop     %rcx
    iretq

/* Any other vector (nothing else is unmasked): count it, EOI, carry on. */
    .globl mg_irq_other
mg_irq_other:
    push    %rcx
    incl    mg_irq_other_count(%rip)
    mov     mg_lapic_eoi_addr(%rip), %rcx
    movl    $0, (%rcx)
    pop     %rcx
    iretq

/* The LAPIC's spurious vector must not be EOIed. */
    .globl mg_irq_spurious
mg_irq_spurious:
    iretq

    .section .rodata
    .balign 8
    .globl mg_irq_device_stubs
mg_irq_device_stubs:
    .irp i, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15
    .quad   irq_device_\i
    .endr

/* --------------------------------------------------- CPL3 coroutines -- */
    .text
/*
 * void mg_ctx_switch(uint64_t *save_sp, uint64_t load_sp): the agent's task
 * switch, at CPL3. Only callee-saved registers need saving: it is a C call.
 */
    .globl mg_ctx_switch
mg_ctx_switch:
    push    %rbp
    push    %rbx
    push    %r12
    push    %r13
    push    %r14
    push    %r15
    mov     %rsp, (%rdi)
    mov     %rsi, %rsp
    pop     %r15
    pop     %r14
    pop     %r13
    pop     %r12
    pop     %rbx
    pop     %rbp
    ret

/* A new context's first switch "returns" here with r12 = argument, r13 = function. */
    .globl mg_ctx_start
mg_ctx_start:
    mov     %r12, %rdi
    call    *%r13
    ud2                                 /* task functions never return */

/* ------------------------------------------------------------- data -- */
    .data
    .balign 8
    .globl mg_ap_cr0, mg_ap_cr3, mg_ap_cr4, mg_ap_efer
mg_kernel_rsp:  .quad 0
mg_ap_ticket:   .long 0
mg_ap_cr0:      .long 0     /* the BSP's control registers, for the APs */
mg_ap_cr3:      .long 0
mg_ap_cr4:      .long 0
mg_ap_efer:     .long 0
    .globl mg_irq_mmio, mg_irq_seen, mg_irq_other_count, mg_lapic_eoi_addr
mg_irq_mmio:    .skip 8 * MG_MAX_IRQ_DEVICES
mg_irq_seen:    .skip 4 * MG_MAX_IRQ_DEVICES
mg_irq_other_count: .long 0
    .balign 8
mg_lapic_eoi_addr: .quad 0xfee000b0
mg_tsc_deadline: .quad 0            /* what IA32_TSC_DEADLINE was last set to */

    /* Stacks live in .bss: the loader zeroes it, untouched pages stay clean. */
    .bss
    .balign 4096
mg_bsp_stack:   .skip 16384
mg_bsp_stack_top:
    .globl mg_int_stack_top, mg_user_stack_top
mg_int_stack:   .skip 8192      /* TSS.RSP0: entries from CPL3 land here */
mg_int_stack_top:
mg_user_stack:  .skip 32768     /* CPL3: the agent main loop runs on it */
mg_user_stack_top:
mg_ap_stacks:   .skip (MG_MAX_CPUS - 1) * MG_AP_STACK_SIZE
