#!/usr/bin/env bash
# Record what QEMU 7.2 TCG does with a SeaBIOS image on a board, for tests/platform/test_seabios.py:
#   OUT.log        the debug console (0x402) to "No bootable device.", exactly the command
#   OUT-smi.txt    QEMU's -d int record of the SMI ("SMM: enter": where it was taken); with
#                  OUT-smram.bin.gz, only for an image that takes one
#   OUT-smram.bin.gz   512 + 128 KiB + 64 KiB: the state-save map QEMU wrote at SeaBIOS's
#                  relocation SMI (0x3FE00-0x3FFFF, at the handler's first instruction), then,
#                  once SeaBIOS is done, the A-segment SMRAM (0xA0000-0xBFFFF) and 0x30000-0x3FFFF
# SMRAM is read through QEMU's gdb stub, which reads what the CPU sees: the A-segment only in
# SMM.  So at the end an SMI is made (gdb writes "out 0xb2, al; jmp $" at 0x7000 and jumps
# there) and SMRAM is read at its handler's first instruction; that SMI's own save map
# (0xAFE00-0xAFFFF) is the gdb-made state, not SeaBIOS's: the tests do not compare it.
# QEMU runs the SMRAM recording with -singlestep: TCG otherwise notices the SMI that OUT
# raises only at the end of its translation block, three instructions later (RAX and RFLAGS
# in the saved state differ; -d int shows the same EIP), where the CPU and KVM take it at the
# next instruction boundary.  The SMM oracle (tests/oracle) is recorded the same way.
#   tools/capture-seabios.sh pc|q35 BIOS OUT [MEM]     (MEM: -m, 128M by default; needs
#                                                       qemu-system-x86_64 and gdb)
set -euo pipefail
board=${1:?pc or q35}; bios=${2:?BIOS image}; out=${3:?output prefix}; mem=${4:-128M}
scratch=$(mktemp -d); trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$scratch"' EXIT
port=$((20000 + RANDOM % 20000))
qemu() {
    exec qemu-system-x86_64 -machine "$board" -accel tcg -m "$mem" -smp 1 -bios "$bios" -nodefaults -nographic \
        -no-reboot -monitor none -serial "file:$scratch/serial.txt" -chardev "file,id=dbg,path=$1" \
        -device isa-debugcon,iobase=0x402,chardev=dbg "${@:2}"
}
until_end() {   # until_end LOG: wait (at most 20 s) for "No bootable device." on the console
    for _ in $(seq 200); do grep -q "No bootable device\." "$1" 2>/dev/null && return 0; sleep 0.1; done
    echo "capture-seabios: no 'No bootable device.' in 20 s" >&2; return 1
}
# the log and -d int, as the command runs it
qemu "$scratch/debug.log" -d int -D "$scratch/int.log" & until_end "$scratch/debug.log"; kill %1; wait || true
sed -n '0,/No bootable device\./p' "$scratch/debug.log" > "$out.log"
sed -n '/^SMM: enter/,/^EFER=/p' "$scratch/int.log" | sed '/^EFER=/q' > "$out-smi.txt"
if [ ! -s "$out-smi.txt" ]; then    # a build without SMM support (Debian's 128 KiB bios.bin)
    rm "$out-smi.txt"; echo "capture-seabios: $bios takes no SMI on $board: no SMRAM to record" >&2; exit 0
fi
# SMRAM, through the gdb stub
qemu "$scratch/step.log" -singlestep -S -gdb "tcp::$port" &
gdb -batch -nx -ex "target remote :$port" -ex "hbreak *0x38000" -ex continue \
    -ex "dump binary memory $scratch/map.bin 0x3fe00 0x40000" -ex delete -ex detach > /dev/null 2>&1
until_end "$scratch/step.log"
gdb -batch -nx -ex "target remote :$port" -ex "set {unsigned char[4]}0x7000 = {0xe6, 0xb2, 0xeb, 0xfe}" \
    -ex 'set $cs = 0' -ex 'set $rip = 0x7000' -ex 'set $rax = 0' -ex "hbreak *0xa8000" -ex continue \
    -ex "dump binary memory $scratch/aseg.bin 0xa0000 0xc0000" \
    -ex "dump binary memory $scratch/low.bin 0x30000 0x40000" -ex kill > /dev/null 2>&1 || true
wait || true
cat "$scratch/map.bin" "$scratch/aseg.bin" "$scratch/low.bin" | gzip -9n > "$out-smram.bin.gz"
