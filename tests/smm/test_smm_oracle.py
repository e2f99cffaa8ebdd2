"""Byte-for-byte agreement with QEMU's TCG on the SMM oracle image (tests/oracle): the same
-bios image, run by ringminus under the qemu profile, prints exactly what QEMU printed."""
import shutil
import subprocess
from pathlib import Path

import pytest

from ringminus import Machine, StopReason

ORACLE = Path(__file__).parents[1] / "oracle"
RUNS = [  # (image, chipset, cpu model, fixture)
    *((f"smm-{mode}.bin", chipset, "qemu64", f"smm-x86_64-{chipset}-{mode}.txt")
      for mode in (16, 32, 64) for chipset in ("q35", "pc")),
    *((f"smm-{mode}.bin", "q35", "qemu32", f"smm-i386-q35-{mode}.txt") for mode in (16, 32)),
    *((f"smm-aseg-{mode}.bin", chipset, "qemu64", f"smm-aseg-x86_64-{chipset}-{mode}.txt")
      for mode in (16, 64) for chipset in ("q35", "pc")),
]


def run_image(image: bytes, chipset: str, cpu: str, profile: str = "qemu", board: bool = False):
    """On the bare machine with ``chipset``'s SMM pieces, or (``board``) on QEMU's whole board."""
    machine = Machine(chipset=chipset, cpu_model=cpu, profile=profile, machine=chipset if board else "none")
    machine.load_bios(image)
    machine.boot("bios")
    return machine, machine.run(timeout=30)


@pytest.mark.parametrize("board", [False, True], ids=["bare", "board"])
@pytest.mark.parametrize("image,chipset,cpu,fixture", RUNS, ids=[r[3] for r in RUNS])
def test_console_matches_qemu(image, chipset, cpu, fixture, board):
    _, result = run_image((ORACLE / "images" / image).read_bytes(), chipset, cpu, board=board)
    expected = (ORACLE / "qemu" / fixture).read_text()
    assert result.stop.reason is StopReason.EXIT and result.stop.value == 0
    assert result.console == expected
    # Two SMIs, the second at the relocated SMBASE, each followed by an RSM.
    kinds = [(e["kind"], e["smbase"]) for e in result.events if e["kind"] in ("smi", "rsm")]
    relocated = 0xA0000 if "aseg" in image else 0x40000
    assert kinds == [("smi", 0x30000), ("rsm", relocated), ("smi", relocated), ("rsm", relocated)]


def save_area(console: str, index: int = 0) -> bytes:
    """The 512-byte @SAVEn record the image prints."""
    block = console.split(f"@SAVE{index}\n")[1].split("@")[0]
    return bytes.fromhex("".join(block.split()))


def test_32_bit_map_segment_flags_follow_the_profile():
    # §F.6 / vector E.67: KVM stores the descriptor bits unshifted, QEMU shifted by 8.
    image = (ORACLE / "images" / "smm-32.bin").read_bytes()
    qemu = save_area(run_image(image, "q35", "qemu32", "qemu")[1].console)
    kvm = save_area(run_image(image, "q35", "qemu32", "kvm")[1].console)
    cs_flags = 0x190                      # FF90 - FE00: the CS cache's flags word
    qemu_flags = int.from_bytes(qemu[cs_flags:cs_flags + 4], "little")
    kvm_flags = int.from_bytes(kvm[cs_flags:cs_flags + 4], "little")
    assert qemu_flags & 0xFE == 0x9A and kvm_flags == (qemu_flags & 0xF0FF) << 8   # code, P, S


LIVE = shutil.which("qemu-system-x86_64") and shutil.which("nasm")


@pytest.mark.skipif(not LIVE, reason="qemu-system-x86_64 and nasm are not installed (apt-get install qemu-system-x86 nasm)")
@pytest.mark.parametrize("mode,chipset", [(16, "q35"), (64, "pc")])
def test_live_qemu_agrees(tmp_path, mode, chipset):
    image = tmp_path / "smm.bin"
    subprocess.run(["nasm", "-I", f"{ORACLE / 'src'}/", "-w-number-overflow", "-f", "bin", f"-DMODE={mode}",
                    "-o", str(image), str(ORACLE / "src" / "smm.asm")], check=True)
    console = tmp_path / "console.txt"
    done = subprocess.run(["qemu-system-x86_64", "-machine", chipset, "-accel", "tcg", "-nographic", "-no-reboot",
                           "-serial", "none", "-monitor", "none", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
                           "-bios", str(image), "-debugcon", f"file:{console}", "-singlestep"],
                          timeout=120, capture_output=True)
    assert done.returncode == 1
    _, result = run_image(image.read_bytes(), chipset, "qemu64")
    assert result.console == console.read_text()
