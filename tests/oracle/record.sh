#!/usr/bin/env bash
# Regenerate the QEMU TCG SMM oracle fixtures under tests/oracle/.
#   tests/oracle/record.sh            (from the repo root; any cwd works)
# Needs: nasm, qemu-system-x86_64, qemu-system-i386 (Debian qemu-system-x86), python3.
#
# Writes:
#   tests/oracle/images/smm-{16,32,64}.bin        nasm -DMODE=N
#   tests/oracle/images/smm-aseg-{16,64}.bin      nasm -DMODE=N -DASEG -DRELOC=0xA0000
#   tests/oracle/qemu/<tag>.txt                   raw debugcon (port 0xE9) output of the run
#   tests/oracle/qemu/<tag>.json                  smmdecode.py --raw --json of that output
#   tests/oracle/qemu/exit-status.txt             "<tag> <qemu exit status>" per run
#   tests/oracle/qemu/qemu-version.txt            qemu-system-* --version, nasm -v
# The QEMU command line is the one in ../shared/oracle/qemu-smm.sh plus -singlestep.
# Exits non-zero if a run did not end through port 0xF4 (status 1) or its
# decoded records fail the sanity checks at the bottom.
set -euo pipefail
cd "$(dirname "$0")/../.."          # repo root
O=tests/oracle
mkdir -p "$O/images" "$O/qemu"

build() {   # build OUT.bin [nasm defines...]
    local out=$1; shift
    nasm -I "$O/src/" -w-number-overflow -f bin "$@" -o "$out" "$O/src/smm.asm"
}

: > "$O/qemu/exit-status.txt"
fail=0
run() {     # run QBIN MACHINE IMAGE TAG
    local qbin=$1 mach=$2 img=$3 tag=$4 rc
    local txt="$O/qemu/$tag.txt"
    rm -f "$txt"
    set +e
    timeout 60 "qemu-system-$qbin" -machine "$mach" -accel tcg -nographic -no-reboot \
        -serial none -monitor none -device isa-debug-exit,iobase=0xf4,iosize=0x04 \
        -bios "$img" -debugcon "file:$txt" -singlestep
    rc=$?
    set -e
    echo "$tag $rc" >> "$O/qemu/exit-status.txt"
    python3 "$O/smmdecode.py" "$txt" --raw --json "$O/qemu/$tag.json" > /dev/null
    [ "$rc" = 1 ] || { echo "FAIL $tag: qemu exit status $rc (want 1)" >&2; fail=1; }
    printf '%-28s rc=%s\n' "$tag" "$rc"
}

for mode in 16 32 64; do
    build "$O/images/smm-$mode.bin" -DMODE="$mode"
done
for mode in 16 64; do
    build "$O/images/smm-aseg-$mode.bin" -DMODE="$mode" -DASEG -DRELOC=0xA0000
done

for mach in q35 pc; do
    for mode in 16 32 64; do
        run x86_64 "$mach" "$O/images/smm-$mode.bin" "smm-x86_64-$mach-$mode"
    done
done
for mode in 16 32; do
    run i386 q35 "$O/images/smm-$mode.bin" "smm-i386-q35-$mode"
done
for mach in q35 pc; do
    for mode in 16 64; do
        run x86_64 "$mach" "$O/images/smm-aseg-$mode.bin" "smm-aseg-x86_64-$mach-$mode"
    done
done

{ qemu-system-x86_64 --version | head -1; qemu-system-i386 --version | head -1; nasm -v; } \
    > "$O/qemu/qemu-version.txt"

# Sanity checks on the decoded records: two SMIs, @END reached, first SMI at
# the default SMBASE 0x30000, the second at the relocated SMBASE, the expected
# state-save revision, saved RIP = instruction after the OUT (needs -singlestep),
# saved EAX/RAX patched by the handler visible after RSM.
python3 - "$O/qemu" <<'EOF' || fail=1
import json, os, sys
d = sys.argv[1]
bad = 0
for line in open(os.path.join(d, "exit-status.txt")):
    tag, rc = line.split()
    j = json.load(open(os.path.join(d, tag + ".json")))
    raw = open(os.path.join(d, tag + ".txt")).read()
    reloc = 0xA0000 if tag.startswith("smm-aseg") else 0x40000
    rev = 0x00020000 if "-i386-" in tag else 0x00020064
    mode = tag.rsplit("-", 1)[1]
    img = open(f"{d}/../images/smm-{'aseg-' if 'aseg' in tag else ''}{mode}.bin", "rb").read()
    # saved RIP must be the instruction right after "out 0xb2,al" (E6 B2), which
    # TRIGGERnn follows with "nop; nop; jmp short $+2" (90 90 EB 00)
    outs, k = [], img.find(b"\xe6\xb2\x90\x90\xeb\x00")
    while k >= 0:
        outs.append(k + 2 + (0 if mode == "16" else 0xF0000)); k = img.find(b"\xe6\xb2\x90\x90\xeb\x00", k + 1)
    errs = []
    if "@END" not in raw: errs.append("no @END")
    if j.get("count") != 2: errs.append(f"count={j.get('count')}")
    for i, base in ((0, 0x30000), (1, reloc)):
        s = j.get(f"save{i}")
        if not s: errs.append(f"no save{i}"); continue
        if s["rev"] != rev: errs.append(f"save{i} rev={s['rev']:#x}")
        if s["fields"]["SMBASE"] != base: errs.append(f"save{i} SMBASE={s['fields']['SMBASE']:#x}")
        rip = s["fields"].get("RIP", s["fields"].get("EIP"))
        if len(outs) < 2 or rip != outs[i]: errs.append(f"save{i} RIP={rip:#x}")
        p = j.get(f"snap{i}")
        if not p or p["RAX"] & 0xFFFFFFFF != 0xC0DE0000 + i + 1:
            errs.append(f"snap{i} RAX={p and p['RAX']:#x}")
    print(f"check {tag:28s} " + ("ok" if not errs else "BAD: " + ", ".join(errs)))
    bad |= bool(errs)
sys.exit(bad)
EOF
exit $fail
