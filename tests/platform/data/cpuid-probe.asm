; CPUID probe BIOS: runs CPUID for each leaf below (ECX = 0) and writes EAX, EBX, ECX, EDX
; (little-endian dwords) to the debug console at 0x402, then halts.
; nasm -f bin cpuid-probe.asm -o cpuid-probe.bin
bits 16
org 0
leaves: dd 0, 1, 2, 4, 6, 7, 0xb, 0xd, 0x40000000, 0x40000001, 0x40000010, 0x80000000, 0x80000001, 0x80000002, 0x80000003, 0x80000004, 0x80000005, 0x80000006, 0x80000007, 0x80000008, 0x8000000a, 0xffffffff
start:
    mov ax, 0x9000
    mov ss, ax
    mov sp, 0xfff0
    mov ax, 0xf000
    mov ds, ax
    xor si, si
.next:
    mov eax, [si]
    cmp eax, 0xffffffff
    je .done
    xor ecx, ecx
    cpuid
    push edx
    push ecx
    push ebx
    call out32
    pop eax
    call out32
    pop eax
    call out32
    pop eax
    call out32
    add si, 4
    jmp .next
.done:
    hlt
    jmp .done
out32:
    mov cx, 4
.b: mov dx, 0x402
    out dx, al
    shr eax, 8
    loop .b
    ret
times 0xfff0 - ($ - $$) db 0
    jmp 0xf000:start
times 0x10000 - ($ - $$) db 0
