/*
 * The guest's first instructions. A PVH loader finds `pvh_start` through the
 * XEN_ELFNOTE_PHYS32_ENTRY note below and jumps there in 32-bit protected mode,
 * paging off, %ebx = struct hvm_start_info (xen/include/public/arch-x86/hvm/
 * start_info.h). We identity-map the first 4 GiB with 2 MiB pages, switch to
 * long mode and call kmain(start_info).
 */
#define XEN_ELFNOTE_PHYS32_ENTRY 18
#define MSR_EFER 0xc0000080
#define EFER_LME (1 << 8)
#define CR0_PG (1 << 31)
#define CR4_PAE (1 << 5)
#define PTE_PRESENT_RW 0x3
#define PTE_HUGE 0x80

    .section .note.pvh, "a"
    .p2align 2
    .long 4                      /* namesz: "Xen\0" */
    .long 8                      /* descsz: a 64-bit address in an ELF64 note */
    .long XEN_ELFNOTE_PHYS32_ENTRY
    .asciz "Xen"
    .p2align 2
    .quad pvh_start
    .p2align 2

    .section .text.entry, "ax"
    .code32
    .globl pvh_start
pvh_start:
    cli
    cld
    mov %ebx, start_info_paddr
    mov $boot_stack_top, %esp

    /* PML4[0] -> PDPT; PDPT[0..3] -> four page directories. */
    mov $boot_pdpt, %eax
    or $PTE_PRESENT_RW, %eax
    mov %eax, boot_pml4
    xor %ecx, %ecx
1:  mov %ecx, %eax
    shl $12, %eax
    add $boot_pd, %eax
    or $PTE_PRESENT_RW, %eax
    mov %eax, boot_pdpt(,%ecx,8)
    inc %ecx
    cmp $4, %ecx
    jb 1b
    /* PD entry j maps j * 2 MiB (the high dword is j >> 11). */
    xor %ecx, %ecx
2:  mov %ecx, %eax
    shl $21, %eax
    or $(PTE_PRESENT_RW | PTE_HUGE), %eax
    mov %eax, boot_pd(,%ecx,8)
    mov %ecx, %eax
    shr $11, %eax
    mov %eax, boot_pd+4(,%ecx,8)
    inc %ecx
    cmp $2048, %ecx
    jb 2b

    .globl enter_long_mode32
enter_long_mode32:               /* also the path the APs take from the trampoline */
    mov %cr4, %eax
    or $CR4_PAE, %eax
    mov %eax, %cr4
    mov $boot_pml4, %eax
    mov %eax, %cr3
    mov $MSR_EFER, %ecx
    rdmsr
    or $EFER_LME, %eax
    wrmsr
    lgdt gdt_ptr
    mov %cr0, %eax
    or $CR0_PG, %eax
    mov %eax, %cr0
    ljmp $0x08, $long_entry

    .code64
long_entry:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    xor %eax, %eax
    mov %ax, %fs
    mov %ax, %gs
    /* An AP finds its stack in ap_stack_top (set by the BSP before the SIPI). */
    mov ap_stack_top(%rip), %rsp
    test %rsp, %rsp
    jnz 3f
    mov $boot_stack_top, %rsp
    mov start_info_paddr(%rip), %edi
    call kmain
    jmp halt_forever
3:  movq $0, ap_stack_top(%rip)
    call ap_main
halt_forever:
    cli
    hlt
    jmp halt_forever

/*
 * Interrupt and exception entry. One stub per vector pushes a dummy error code
 * where the CPU pushes none, then the vector, and joins isr_common, which saves
 * the registers as a struct Frame (cpu.hpp) for interrupt_dispatch(Frame*).
 * The CPU's 5-word push plus 2 + 15 words keep the call 16-byte aligned.
 */
    .altmacro
    .macro ISR_STUB n
isr_\n:
    .if (\n == 8) || (\n == 10) || (\n == 11) || (\n == 12) || (\n == 13) || (\n == 14) || (\n == 17) || (\n == 21) || (\n == 29) || (\n == 30)
    .else
    push $0
    .endif
    push $\n
    jmp isr_common
    .endm
    .macro ISR_ADDR n
    .quad isr_\n
    .endm

    .text
    .set vec, 0
    .rept 256
    ISR_STUB %vec
    .set vec, vec + 1
    .endr

isr_common:
    .irp reg, rax, rbx, rcx, rdx, rsi, rdi, rbp, r8, r9, r10, r11, r12, r13, r14, r15
    push %\reg
    .endr
    mov %rsp, %rdi
    cld
    call interrupt_dispatch
    .irp reg, r15, r14, r13, r12, r11, r10, r9, r8, rbp, rdi, rsi, rdx, rcx, rbx, rax
    pop %\reg
    .endr
    add $16, %rsp
    iretq

    .section .rodata
    .p2align 3
    .globl isr_table
isr_table:
    .set vec, 0
    .rept 256
    ISR_ADDR %vec
    .set vec, vec + 1
    .endr

/*
 * The AP trampoline, copied by the BSP to AP_TRAMPOLINE (SIPI vector 8): in
 * real mode it loads our GDT, enters protected mode and jumps into the image,
 * where the AP takes the BSP's path into long mode.
 */
#define AP_TRAMPOLINE 0x8000
    .text
    .code16
    .globl ap_trampoline, ap_trampoline_end
ap_trampoline:
    cli
    xor %ax, %ax
    mov %ax, %ds
    lgdtl AP_TRAMPOLINE + (tramp_gdtr - ap_trampoline)
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmpl $0x18, $ap_entry32
tramp_gdtr:
    .word gdt64_end - gdt64 - 1
    .long gdt64
ap_trampoline_end:

    .code32
ap_entry32:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    jmp enter_long_mode32
    .code64

    .section .rodata
    .p2align 3
    .globl gdt64
gdt64:
    .quad 0                      /* null */
    .quad 0x00af9a000000ffff     /* 0x08: 64-bit code */
    .quad 0x00cf92000000ffff     /* 0x10: data */
    .quad 0x00cf9a000000ffff     /* 0x18: 32-bit code (AP trampoline) */
gdt64_end:
    .globl gdt_ptr
gdt_ptr:
    .word gdt64_end - gdt64 - 1
    .quad gdt64

    .data
    .p2align 3
    .globl start_info_paddr, ap_stack_top
start_info_paddr: .quad 0
ap_stack_top: .quad 0

    .bss
    .p2align 12
    .globl boot_pml4
boot_pml4: .skip 4096
boot_pdpt: .skip 4096
boot_pd: .skip 4 * 4096
boot_stack: .skip 16384
boot_stack_top:

    .section .note.GNU-stack, "", @progbits
