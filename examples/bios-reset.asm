; bios-reset.asm - a 64 KiB -bios image that reports the reset state it starts in.
; Runs unchanged on:  qemu-system-x86_64 -bios bios-reset.bin -nographic -debugcon stdio \
;                       -device isa-debug-exit,iobase=0xf4,iosize=4
; and on:             ringminus run --boot bios examples/bios-reset.bin
; Prints "edx=XXXXXXXX cr0=XXXXXXXX eflags=XXXXXXXX cs-base-ok" and exits with value 0x21.
; Build: nasm -f bin -o bios-reset.bin bios-reset.asm
bits 16
org 0                       ; offsets inside the 64 KiB image; CS base is 0xFFFF0000
start:
    mov ebp, edx            ; the CPU signature, before anything clobbers EDX
    mov si, label_edx
    call puts
    mov eax, ebp
    call puthex
    mov si, label_cr0
    call puts
    mov eax, cr0
    call puthex
    mov si, label_eflags
    call puts
    pushfd
    pop eax
    call puthex
    mov si, label_cs            ; reading our own bytes through CS checks its base
    call puts
    mov al, 10
    out 0xe9, al
    mov al, 0x21
    out 0xf4, al
.halt:
    hlt
    jmp .halt

puts:                           ; cs:si -> debug console
    mov al, [cs:si]
    test al, al
    jz .done
    out 0xe9, al
    inc si
    jmp puts
.done:
    ret

puthex:                         ; eax as 8 hex digits
    mov cx, 8
.digit:
    rol eax, 4
    mov bl, al
    and bl, 0x0f
    add bl, '0'
    cmp bl, '9'
    jbe .out
    add bl, 7
.out:
    xchg al, bl
    out 0xe9, al
    xchg al, bl
    loop .digit
    ret

label_edx:    db "edx=", 0
label_cr0:    db " cr0=", 0
label_eflags: db " eflags=", 0
label_cs:     db " cs-base-ok", 0

    times 0xfff0 - ($ - $$) db 0
reset_vector:                   ; 0xFFFFFFF0
    jmp start               ; near: CS keeps its reset base 0xFFFF0000
    times 0x10000 - ($ - $$) db 0
