; hello.asm - the smallest ringminus guest: real mode, loaded at 0x7C00.
; Prints a greeting on the debug console (port 0xE9), leaves a marker in EBX, halts.
; Build: nasm -f bin -o hello.bin hello.asm
bits 16
org 0x7c00
start:
    mov si, message
.next:
    lodsb
    test al, al
    jz .done
    out 0xe9, al
    jmp .next
.done:
    mov ebx, 0x52494E47          ; "RING"
    hlt

message: db "Hello from ringminus!", 10, 0
