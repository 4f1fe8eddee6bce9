/*
 * Entry code of the test guest (AT&T syntax).
 *
 * - pvh_start32: the PVH entry. The loader enters in 32-bit protected mode with paging off
 *   and %ebx = physical address of the hvm_start_info. We identity map the first 4 GiB,
 *   switch to long mode and call kmain(start_info).
 * - ap_tramp_*: the real-mode trampoline an application processor starts in after
 *   INIT/SIPI. kmain copies it to AP_TRAMP_BASE; it switches to long mode on the BSP's
 *   page tables and calls ap_main().
 * - isr_*: interrupt and exception stubs.
 */

.set AP_TRAMP_BASE, 0x8000
.set CR4_BITS, 0x620            /* PAE | OSFXSR | OSXMMEXCPT */
.set EFER_MSR, 0xC0000080
.set EFER_LME, 0x100
.set CR0_SET, 0x80000002        /* PG | MP */
.set CR0_CLEAR, 0xfffffffb      /* ~EM */
.set PTE_PS_RW_P, 0x83
.set PTE_RW_P, 0x03

/* The PVH note: XEN_ELFNOTE_PHYS32_ENTRY (18) carries the 32-bit entry address. */
.section .note.Xen, "a"
.balign 4
.long 4
.long 4
.long 18
.asciz "Xen"
.balign 4
.long pvh_start32
.balign 4

.section .text.entry32, "ax"
.code32
.global pvh_start32
pvh_start32:
    cli
    cld
    mov %ebx, %edi
    /* The first line goes out before anything else, in one exit: it marks "the guest runs"
       for the boot benchmark. */
    mov $0x3f8, %dx
    mov $boot_line, %esi
    mov $(boot_line_end - boot_line), %ecx
    rep outsb
    lgdt gdt_ptr32
    mov $0x10, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov $bsp_stack_top, %esp

    /* Zero the PML4 and the PDPT: memory is not promised to be clean after a reset. */
    xor %eax, %eax
    mov $pml4, %ebx
    mov %ebx, %esi
    mov $2048, %ecx
1:  mov %eax, (%esi)
    add $4, %esi
    dec %ecx
    jnz 1b
    lea 0x1000(%ebx), %edx          /* edx = pdpt */
    lea PTE_RW_P(%edx), %eax
    mov %eax, (%ebx)                /* pml4[0] -> pdpt */

    /* 1 GiB pages when the CPU has them (CPUID 0x80000001 EDX bit 26). */
    mov %edi, %ebp
    mov $0x80000001, %eax
    cpuid
    mov %ebp, %edi
    bt $26, %edx
    jnc 3f
    mov $pdpt, %esi
    mov $PTE_PS_RW_P, %eax
    xor %edx, %edx
    mov $4, %ecx
2:  mov %eax, (%esi)
    mov %edx, 4(%esi)
    add $0x40000000, %eax
    adc $0, %edx
    add $8, %esi
    dec %ecx
    jnz 2b
    jmp 5f

    /* Otherwise 2 MiB pages: four page directories, 2048 entries. */
3:  mov $pd, %esi
    mov $PTE_PS_RW_P, %eax
    xor %edx, %edx
    mov $2048, %ecx
4:  mov %eax, (%esi)
    mov %edx, 4(%esi)
    add $0x200000, %eax
    adc $0, %edx
    add $8, %esi
    dec %ecx
    jnz 4b
    mov $pdpt, %esi
    mov $pd, %eax
    or $PTE_RW_P, %eax
    mov $4, %ecx
6:  mov %eax, (%esi)
    movl $0, 4(%esi)
    add $0x1000, %eax
    add $8, %esi
    dec %ecx
    jnz 6b

5:  call enter_long_mode_32
    ljmp $0x18, $bsp_long_entry

/* Shared by the BSP and the APs: PAE, CR3, EFER.LME, paging. */
enter_long_mode_32:
    mov %cr4, %eax
    or $CR4_BITS, %eax
    mov %eax, %cr4
    mov $pml4, %eax
    mov %eax, %cr3
    mov $EFER_MSR, %ecx
    rdmsr
    or $EFER_LME, %eax
    wrmsr
    mov %cr0, %eax
    or $CR0_SET, %eax
    and $CR0_CLEAR, %eax
    mov %eax, %cr0
    ret

.code64
bsp_long_entry:
    mov $0x10, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov %eax, %fs
    mov %eax, %gs
    mov $bsp_stack_top, %rsp
    mov %edi, %edi
    call kmain
7:  cli
    hlt
    jmp 7b

.global ap_long_entry
ap_long_entry:
    mov $0x10, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov %eax, %fs
    mov %eax, %gs
    mov AP_STACK_TOP(%rip), %rsp
    call ap_main
8:  cli
    hlt
    jmp 8b

/* Timer interrupt: acknowledge the local APIC and return; the waiter re-reads the clock. */
.global isr_timer
isr_timer:
    push %rax
    mov $0xFEE000B0, %rax
    movl $0, (%rax)
    pop %rax
    iretq

.global isr_spurious
isr_spurious:
    iretq

/* Exceptions 0..31: report the vector and the frame, then stop this CPU. */
.macro FAULT_STUB n
fault_stub_\n:
    mov $\n, %edi
    mov %rsp, %rsi
    and $-16, %rsp
    call guest_fault
9:  cli
    hlt
    jmp 9b
.endm
.irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
FAULT_STUB \n
.endr

.section .rodata.fault_stubs, "a"
.balign 8
.global FAULT_STUBS
FAULT_STUBS:
.irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
.quad fault_stub_\n
.endr

/* The real-mode AP trampoline. kmain copies [ap_tramp_start, ap_tramp_end) to
   AP_TRAMP_BASE and sends SIPI with vector AP_TRAMP_BASE >> 12. */
.section .rodata.ap_tramp, "a"
.balign 16
.global ap_tramp_start
.global ap_tramp_end
.code16
ap_tramp_start:
    cli
    cld
    mov %cs, %ax
    mov %ax, %ds
    lgdtl (tramp_gdt_ptr - ap_tramp_start)
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmpl $0x08, $(AP_TRAMP_BASE + ap_tramp32 - ap_tramp_start)
.code32
ap_tramp32:
    mov $0x10, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov $(AP_TRAMP_BASE + 0xff0), %esp
    mov $enter_long_mode_32, %eax
    call *%eax
    ljmp $0x18, $ap_long_entry
.balign 4
tramp_gdt_ptr:
    .word gdt_end - gdt - 1
    .long gdt
ap_tramp_end:

.section .rodata.gdt, "a"
.balign 16
gdt:
    .quad 0
    .quad 0x00cf9a000000ffff    /* 0x08: 32-bit code */
    .quad 0x00cf92000000ffff    /* 0x10: data */
    .quad 0x00af9a000000ffff    /* 0x18: 64-bit code */
gdt_end:
.balign 4
gdt_ptr32:
    .word gdt_end - gdt - 1
    .long gdt
boot_line:
    .ascii "NOVACRON-GUEST boot\n"
boot_line_end:

.section .bss.paging, "aw", @nobits
.balign 4096
.global pml4
pml4:
    .skip 4096
.global pdpt
pdpt:
    .skip 4096
pd:
    .skip 4096 * 4
.balign 16
bsp_stack:
    .skip 32768
bsp_stack_top:

/* Leave the assembler as rustc expects it. */
.code64
.text
