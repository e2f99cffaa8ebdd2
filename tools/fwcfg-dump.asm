; fw_cfg dump probe: writes the file directory (item 0x19, whole) and then every file's
; bytes, in directory order, to the debug console at 0x402; then halts.  Assembled plain, it
; is a -bios image (what fw_cfg holds at power-on); with -DBOOT_SECTOR, a boot sector that
; the firmware boots after its own setup (what QEMU rebuilt when the firmware read it).
bits 16
%ifdef BOOT_SECTOR
org 0x7c00
%else
org 0
%endif
start:
    cli
    xor ax, ax
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov sp, 0x7000
    mov si, marker               ; where the dump starts on the console
    mov dx, 0x402
.marker:
    cs lodsb
    out dx, al
    cmp si, marker.end
    jb .marker
    mov ax, 0x19
    mov dx, 0x510
    out dx, ax
    mov di, 0x1000
    mov cx, 4 + 64 * 32
    mov dx, 0x511
.dir:
    in al, dx
    mov [di], al
    push dx
    mov dx, 0x402
    out dx, al
    pop dx
    inc di
    loop .dir
    mov eax, [0x1000]
    bswap eax
    mov ebp, eax                 ; count
    mov si, 0x1004
.file:
    test ebp, ebp
    jz .done
    mov ecx, [si]
    bswap ecx                    ; size
    mov ax, [si + 4]
    xchg al, ah                  ; selector
    mov dx, 0x510
    out dx, ax
.byte:
    jecxz .next
    mov dx, 0x511
    in al, dx
    mov dx, 0x402
    out dx, al
    dec ecx
    jmp .byte
.next:
    add si, 64
    dec ebp
    jmp .file
.done:
    hlt
    jmp .done
marker: db "fw_cfg dump", 10
.end:
%ifdef BOOT_SECTOR
times 510 - ($ - $$) db 0
    dw 0xaa55
%else
times 0xfff0 - ($ - $$) db 0
    jmp 0xf000:start
times 0x10000 - ($ - $$) db 0
%endif
