#!/usr/bin/env bash
# Record what QEMU's fw_cfg holds on a board (-nodefaults, one vCPU, a 16550 on COM1): tools/fwcfg-dump.asm, run as QEMU's -bios,
# writes the file directory and every file to the debug console; the gzipped dump is what
# ringminus/platform/tables.py serves (the ACPI tables, table-loader and SMBIOS QEMU builds).
#   tools/capture-fwcfg.sh pc|q35 [MEM]     (default 128M; writes ringminus/platform/data/)
set -euo pipefail
board=${1:?pc or q35}; mem=${2:-128M}
here=$(cd "$(dirname "$0")" && pwd); scratch=$(mktemp -d); trap 'rm -rf "$scratch"' EXIT
nasm -f bin "$here/fwcfg-dump.asm" -o "$scratch/dump.bin"
timeout 60 qemu-system-x86_64 -machine "$board" -accel tcg -m "$mem" -smp 1 -bios "$scratch/dump.bin" \
    -nodefaults -nographic -no-reboot -monitor none -serial null \
    -chardev "file,id=dbg,path=$scratch/fwcfg.bin" -device isa-debugcon,iobase=0x402,chardev=dbg || true
qemu-system-x86_64 --version | head -1
# keep only the tables ringminus serves (tables.SERVED), in the same dump format
PYTHONPATH="$here/.." python3 - "$scratch/fwcfg.bin" "$here/../ringminus/platform/data/qemu-7.2-$board-$mem-fwcfg.bin.gz" <<'PY'
import gzip, struct, sys
from ringminus.platform.tables import DIRECTORY, SERVED, parse_dump
files = parse_dump(open(sys.argv[1], "rb").read())
kept = {name: files[name] for name in files if name in SERVED}
directory = bytearray(DIRECTORY)
struct.pack_into(">I", directory, 0, len(kept))
for index, (name, contents) in enumerate(kept.items()):
    struct.pack_into(">IHH", directory, 4 + 64 * index, len(contents), 0x20 + index, 0)
    directory[4 + 64 * index + 8:4 + 64 * index + 8 + len(name)] = name.encode()
open(sys.argv[2], "wb").write(gzip.compress(bytes(directory) + b"".join(kept.values()), 9))
PY
