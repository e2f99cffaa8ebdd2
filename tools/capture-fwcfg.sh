#!/usr/bin/env bash
# Record what QEMU's fw_cfg holds on a board (-nodefaults, one vCPU, a 16550 on COM1), twice:
# tools/fwcfg-dump.asm run as QEMU's -bios (the tables QEMU built at power-on), and as a boot
# sector SeaBIOS boots (the tables QEMU rebuilt when SeaBIOS first read them, after its PCI
# setup: acpi_build_update).  The dumper writes the file directory and every file to the
# debug console; the gzipped dumps are what ringminus/platform/tables.py serves.
#   tools/capture-fwcfg.sh pc|q35 [MEM] [BIOS]
#     (default 128M and /usr/share/seabios/bios-256k.bin; writes ringminus/platform/data/)
set -euo pipefail
board=${1:?pc or q35}; mem=${2:-128M}; bios=${3:-/usr/share/seabios/bios-256k.bin}
here=$(cd "$(dirname "$0")" && pwd); scratch=$(mktemp -d); trap 'rm -rf "$scratch"' EXIT
data="$here/../ringminus/platform/data"
nasm -f bin "$here/fwcfg-dump.asm" -o "$scratch/dump.bin"
nasm -f bin -DBOOT_SECTOR "$here/fwcfg-dump.asm" -o "$scratch/boot.img"
truncate -s 1M "$scratch/boot.img"
qemu() {    # qemu OUTPUT ARGS...: run the board until the dump is written
    local output=$1; shift
    timeout 20 qemu-system-x86_64 -machine "$board" -accel tcg -m "$mem" -smp 1 -nodefaults -nographic \
        -no-reboot -monitor none -serial null -chardev "file,id=dbg,path=$output" \
        -device isa-debugcon,iobase=0x402,chardev=dbg "$@" || true
}
qemu "$scratch/power-on.txt" -bios "$scratch/dump.bin"
qemu "$scratch/seabios.txt" -bios "$bios" -drive "file=$scratch/boot.img,format=raw,if=ide"
qemu-system-x86_64 --version | head -1
# keep only the tables ringminus serves (tables.SERVED), in the same dump format
PYTHONPATH="$here/.." python3 - "$scratch" "$data/qemu-7.2-$board-$mem-fwcfg" <<'PY'
import gzip, struct, sys
from ringminus.platform.tables import DIRECTORY, SERVED, parse_dump
MARKER = b"fw_cfg dump\n"
for when, suffix in (("power-on", ""), ("seabios", "-seabios")):
    console = open(f"{sys.argv[1]}/{when}.txt", "rb").read()
    files = parse_dump(console[console.rindex(MARKER) + len(MARKER):])
    kept = {name: files[name] for name in files if name in SERVED}
    directory = bytearray(DIRECTORY)
    struct.pack_into(">I", directory, 0, len(kept))
    for index, (name, contents) in enumerate(kept.items()):
        struct.pack_into(">IHH", directory, 4 + 64 * index, len(contents), 0x20 + index, 0)
        directory[4 + 64 * index + 8:4 + 64 * index + 8 + len(name)] = name.encode()
    with open(f"{sys.argv[2]}{suffix}.bin.gz", "wb") as out:
        out.write(gzip.compress(bytes(directory) + b"".join(kept.values()), 9, mtime=0))
PY
