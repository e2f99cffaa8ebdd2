; vs_qemu.asm — the -bios images benchmarks/vs_qemu.py runs on QEMU and on ringminus.
;
; nasm -f bin -DWORK=smi|vmrun|vmrun_full|loop -DMODE=16|32|64 -DN=count -o IMAGE vs_qemu.asm
;
; A 64 KiB ROM: reset vector at its end (F000:FFF0), code at F000:0000 (linear 0xF0000).
; It programs the q35 chipset (ICH9 LPC 00:1f.0: PMBASE = 0x600, ACPI_EN, SMI_EN.APMC_EN)
; so that OUT 0xB2 raises an SMI, places the SMI handler `inc dword [0x500]; rsm` at
; SMBASE + 0x8000 (SMBASE 0x30000: plain RAM), switches to MODE and runs N iterations of WORK:
;   smi         out 0xb2, al                                  (SMI, handler, RSM)
;   vmrun       VMRUN of an L2 (32-bit flat) that exits at once on CPUID; L2's RIP reset each time
;   vmrun_full  CLGI; VMLOAD; VMRUN; VMSAVE; STGI around the same
;   loop        nothing: dec ecx; jnz (plain guest throughput)
; then writes 0 to port 0xF4 (QEMU's isa-debug-exit, ringminus's exit port).  VMRUN's L1 is
; 32-bit protected mode.

%ifndef N
%define N 1000
%endif
%ifndef MODE
%define MODE 16
%endif

%define IS_smi 1
%define IS_vmrun 2
%define IS_vmrun_full 3
%define IS_loop 4
%define KIND IS_ %+ WORK

ROM       equ 0xF0000
PMBASE    equ 0x600
HANDLER   equ 0x38000            ; SMBASE 0x30000 + 0x8000
COUNTER   equ 0x500
PML4      equ 0x10000            ; long mode: PML4, PDPT, PD (2 MiB pages)
HSAVE     equ 0x20000
VMCB      equ 0x21000
L2_STACK  equ 0x9000

; a VMCB segment record at save-area offset %1: selector %2, attributes %3, 4 GiB limit
%macro FLAT_SEGMENT 3
    mov word [VMCB + %1], %2
    mov word [VMCB + %1 + 2], %3
    mov dword [VMCB + %1 + 4], 0xFFFFFFFF
%endmacro

bits 16
org 0

start:
    cli
    xor ax, ax
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov sp, 0x7000
    ; ICH9 LPC: PMBASE (0x40) = 0x600 | 1, ACPI_CNTL (0x44) |= ACPI_EN; then SMI_EN |= APMC_EN.
    mov eax, 0x8000F840
    mov dx, 0xCF8
    out dx, eax
    mov eax, PMBASE | 1
    mov dx, 0xCFC
    out dx, eax
    mov eax, 0x8000F844
    mov dx, 0xCF8
    out dx, eax
    mov dx, 0xCFC
    in al, dx
    or al, 0x80
    out dx, al
    mov dx, PMBASE + 0x30
    in eax, dx
    or eax, 0x20
    out dx, eax
    ; the SMI handler: 66 FF 06 00 05 (inc dword [0x500]), 0F AA (rsm)
    mov ax, HANDLER >> 4
    mov es, ax
    mov dword [es:0], 0x0006FF66
    mov dword [es:4], 0x00AA0F05
    xor ax, ax
    mov es, ax
    mov al, 0x5A                          ; the APM command OUT 0xB2 writes (not 2/3: ACPI's)
%if MODE == 16 && (KIND == IS_smi || KIND == IS_loop)
    mov ecx, N
    jecxz done16
work16:
%if KIND == IS_smi
    out 0xb2, al
%endif
    dec ecx
    jnz work16
done16:
    xor al, al
    out 0xf4, al
    hlt
%else
    o32 lgdt [cs:gdt_pointer]
    mov eax, cr0
    or al, 1
    mov cr0, eax
    jmp dword 0x08:(ROM + protected)
%endif

bits 32
protected:
    mov bx, 0x10
    mov ds, bx
    mov es, bx
    mov ss, bx
    mov esp, 0x7000
%if MODE == 64
    ; identity map of the first 1 GiB: PML4 -> PDPT -> PD of 2 MiB pages
    mov edi, PML4
    mov ecx, 3 * 1024
    xor eax, eax
    rep stosd
    mov dword [PML4], PML4 + 0x1003
    mov dword [PML4 + 0x1000], PML4 + 0x2003
    mov edi, PML4 + 0x2000
    mov eax, 0x83
    mov ecx, 512
fill_pd:
    mov [edi], eax
    add eax, 0x200000
    add edi, 8
    loop fill_pd
    mov eax, PML4
    mov cr3, eax
    mov eax, cr4
    or eax, 0x20                          ; PAE
    mov cr4, eax
    mov ecx, 0xC0000080
    rdmsr
    or eax, 0x100                         ; LME
    wrmsr
    mov eax, cr0
    or eax, 0x80000000
    mov cr0, eax
    jmp 0x18:(ROM + long_mode)
%elif KIND == IS_vmrun || KIND == IS_vmrun_full
    ; EFER.SVME, VM_HSAVE_PA; a VMCB for a flat 32-bit L2 that exits on CPUID
    mov ecx, 0xC0000080
    rdmsr
    or eax, 0x1000
    wrmsr
    mov ecx, 0xC0010117
    mov eax, HSAVE
    xor edx, edx
    wrmsr
    mov edi, VMCB
    mov ecx, 1024
    xor eax, eax
    rep stosd
    mov dword [VMCB + 0x04], 0xFFFFFFFF              ; every exception
    mov dword [VMCB + 0x0C], (1 << 18) | (1 << 31)    ; CPUID, SHUTDOWN
    mov dword [VMCB + 0x10], 3                        ; VMRUN, VMMCALL
    mov dword [VMCB + 0x58], 1                        ; ASID
    FLAT_SEGMENT 0x410, 0x08, 0xC9B                   ; CS
    FLAT_SEGMENT 0x420, 0x10, 0xC93                   ; SS
    FLAT_SEGMENT 0x430, 0x10, 0xC93                   ; DS
    FLAT_SEGMENT 0x400, 0x10, 0xC93                   ; ES
    mov dword [VMCB + 0x464], gdt_end - gdt - 1       ; GDTR
    mov dword [VMCB + 0x468], ROM + gdt
    mov dword [VMCB + 0x4D0], 0x1000                  ; EFER: SVME
    mov dword [VMCB + 0x558], 0x11                    ; CR0: PE, ET
    mov dword [VMCB + 0x568], 0xFFFF0FF0              ; DR6
    mov dword [VMCB + 0x560], 0x400                   ; DR7
    mov dword [VMCB + 0x570], 2                       ; RFLAGS
    mov dword [VMCB + 0x5D8], L2_STACK                ; RSP
    mov esi, N
    test esi, esi
    jz done32
vmrun_loop:
    mov dword [VMCB + 0x578], ROM + l2                ; RIP
    mov eax, VMCB
%if KIND == IS_vmrun_full
    clgi
    vmload
    vmrun
    vmsave
    stgi
%else
    vmrun
%endif
    dec esi
    jnz vmrun_loop
    jmp done32
l2:
    cpuid
    jmp l2
%else
    mov ecx, N
    jecxz done32
work32:
%if KIND == IS_smi
    out 0xb2, al
%endif
    dec ecx
    jnz work32
%endif
done32:
    xor al, al
    out 0xf4, al
    hlt

%if MODE == 64
bits 64
long_mode:
    mov ecx, N
    test ecx, ecx
    jz done64
work64:
%if KIND == IS_smi
    out 0xb2, al
%endif
    dec ecx
    jnz work64
done64:
    xor al, al
    out 0xf4, al
    hlt
%endif

align 8
gdt:
    dq 0
    dq 0x00CF9B000000FFFF                 ; 0x08: 32-bit code
    dq 0x00CF93000000FFFF                 ; 0x10: data
    dq 0x00AF9B000000FFFF                 ; 0x18: 64-bit code
gdt_end:
gdt_pointer:
    dw gdt_end - gdt - 1
    dd ROM + gdt

    times 0xFFF0 - ($ - $$) db 0xF4
bits 16
reset:
    jmp 0xF000:start
    times 0x10000 - ($ - $$) db 0xF4
