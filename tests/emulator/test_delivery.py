"""Exceptions and interrupts are delivered through the guest's IVT/IDT by ringminus."""

from ringminus import StopReason
from ringminus.emulator.boot import IDT_BASE, RING0_STACK_TOP
from ringminus.arch.segments import SYS_INT_GATE, SYS_TRAP_GATE, pack_gate

from ..helpers import asm, run_guest

HANDLER = 0x200000


def install(machine, source, bits, address=HANDLER):
    machine.write_memory(address, asm(source, bits, address))


def gate(machine, vector, offset=HANDLER, selector=0x08, gate_type=SYS_TRAP_GATE, dpl=0, long_mode=False,
         present=True):
    size = 16 if long_mode else 8
    machine.write_memory(IDT_BASE + vector * size, pack_gate(offset, selector, gate_type, dpl, present,
                                                             long_mode=long_mode))


def test_divide_error_through_the_real_mode_ivt():
    main = ("xor dx, dx; mov word ptr [0], 0x8000; mov word ptr [2], 0; xor cx, cx; mov ax, 5; div cx; "
            "mov si, 0x1234; div cx; mov di, 0x5678; hlt")
    handler = "mov bp, sp; mov bx, [bp]; add word ptr [bp], 2; inc dx; iret"

    machine, result = run_guest(main, "real", setup=lambda m: install(m, handler, 16, 0x8000))
    div_address = 0x7C00 + len(asm("xor dx, dx; mov word ptr [0], 0x8000; mov word ptr [2], 0; xor cx, cx; mov ax, 5", 16))
    assert result.stop.reason is StopReason.HLT
    # Two consecutive handled faults: the second is not mistaken for a #DF.
    assert result.regs["rdx"] & 0xFFFF == 2 and result.regs["rsi"] == 0x1234 and result.regs["rdi"] == 0x5678
    assert result.regs["rbx"] == div_address + 2 + 3        # the second div's address (after mov si)
    assert result.stats["exceptions_delivered"] == 2


def test_general_protection_at_cpl3_uses_the_tss_stack_and_pushes_the_error_code():
    # Ring 3 writes a ring-0 trap gate for #GP into the machine's IDT (found with SIDT), then
    # loads DS with a selector beyond the GDT: #GP(0x1238).
    main = f"""
        sidt [0x70000]
        mov edi, dword ptr [0x70002]
        add edi, {13 * 8}
        mov word ptr [edi], {HANDLER & 0xFFFF}
        mov word ptr [edi + 2], 0x08
        mov word ptr [edi + 4], 0x8F00
        mov word ptr [edi + 6], {HANDLER >> 16}
        mov ax, 0x1238
        mov ds, ax
        hlt"""
    handler = ("mov eax, esp; mov ebx, [esp]; mov ecx, [esp + 8]; mov edx, [esp + 20]; "
               "mov esi, [esp + 4]; mov edi, [esp + 16]; hlt")
    machine, result = run_guest(main, "protected", cpl=3, setup=lambda m: install(m, handler, 32))
    assert result.stop.reason is StopReason.HLT
    assert result.regs["cpl"] == 0
    assert result.regs["rax"] == RING0_STACK_TOP - 24            # SS, ESP, EFLAGS, CS, EIP, error
    assert result.regs["rbx"] == 0x1238
    assert result.regs["rcx"] == 0x1B and result.regs["rdx"] == 0x23
    faulting = 0x100000 + len(asm(main.rsplit("mov ds", 1)[0], 32, 0x100000))
    assert result.regs["rsi"] == faulting
    assert result.regs["rdi"] == 0x80000                          # the ring-3 stack pointer


def test_page_fault_in_long_mode_sets_cr2_and_the_error_code():
    main = "mov rax, 0x40000123; mov qword ptr [rax], 1; hlt"
    handler = "mov rbx, [rsp]; mov rcx, cr2; mov rdx, [rsp + 8]; mov rsi, rsp; hlt"

    def setup(m):
        install(m, handler, 64)
        gate(m, 14, selector=0x28, gate_type=SYS_INT_GATE, long_mode=True)

    machine, result = run_guest(main, "long", setup=setup)
    assert result.stop.reason is StopReason.HLT
    assert result.regs["rbx"] == 0x2                      # not present, write, supervisor
    assert result.regs["rcx"] == 0x40000123 and result.regs["cr2"] == 0x40000123
    assert result.regs["rdx"] == 0x100000 + len(asm("mov rax, 0x40000123", 64))
    assert result.regs["rsi"] == 0x80000 - 6 * 8          # same privilege: still 16-byte aligned
    assert not result.regs["rflags"] & 0x200              # interrupt gate clears IF


def test_user_page_fault_error_code_and_interrupt_gates_in_long_mode():
    # At CPL 3, writing a page the identity map does not cover: error code U|W (6).
    main = "mov rax, 0x40000000; mov byte ptr [rax], 1; hlt"
    handler = "mov rbx, [rsp]; mov rcx, [rsp + 16]; mov rdx, [rsp + 40]; mov rsi, rsp; hlt"

    def setup(m):
        install(m, handler, 64)
        gate(m, 14, selector=0x28, gate_type=SYS_INT_GATE, long_mode=True)

    _, result = run_guest(main, "long", cpl=3, setup=setup)
    assert result.stop.reason is StopReason.HLT and result.regs["cpl"] == 0
    assert result.regs["rbx"] == 0x6 and result.regs["rcx"] == 0x33 and result.regs["rdx"] == 0x23
    assert result.regs["rsi"] == RING0_STACK_TOP - 6 * 8


def test_int3_and_int_n_push_the_next_instruction():
    main = "int3; mov esi, 1; int 0x40; mov edi, 2; int 0x41; hlt"
    handler = "inc ebx; mov ecx, [esp]; iretd"

    def setup(m):
        install(m, handler, 32)
        gate(m, 3, dpl=3)
        gate(m, 0x40, dpl=3)
        gate(m, 0x41, dpl=0)                                  # INT 0x41 from ring 3: #GP(0x20A)
        install(m, "mov eax, [esp]; mov edx, [esp + 4]; hlt", 32, HANDLER + 0x100)
        gate(m, 13, offset=HANDLER + 0x100)

    _, result = run_guest(main, "protected", cpl=3, setup=setup)
    assert result.stop.reason is StopReason.HLT
    assert result.regs["rbx"] == 2 and result.regs["rsi"] == 1 and result.regs["rdi"] == 2
    assert result.regs["rcx"] == 0x100000 + len(asm("int3; mov esi, 1; int 0x40", 32))
    assert result.regs["rax"] == 0x41 * 8 + 2                 # software INT: no EXT bit
    assert result.regs["rdx"] == 0x100000 + len(asm("int3; mov esi, 1; int 0x40; mov edi, 2", 32))


def test_int_n_through_the_real_mode_ivt():
    main = "mov word ptr [0x80 * 4], 0x9000; mov word ptr [0x80 * 4 + 2], 0; pushf; pop dx; sti; int 0x80; hlt"
    handler = "mov bp, sp; mov bx, [bp + 4]; pushf; pop cx; mov si, 0x77; iret"
    _, result = run_guest(main, "real", setup=lambda m: install(m, handler, 16, 0x9000))
    assert result.stop.reason is StopReason.HLT and result.regs["rsi"] == 0x77
    assert result.regs["rbx"] & 0x200                          # pushed FLAGS had IF
    assert not result.regs["rcx"] & 0x200                      # the handler runs with IF clear
    assert result.regs["rflags"] & 0x200                       # IRET restored it


def test_fault_during_np_delivery_becomes_double_fault():
    # INT 0x30 hits a not-present gate: #NP(0x182).  The #NP gate names a selector beyond the
    # GDT, so delivering #NP raises #GP: contributory + contributory = #DF, error code 0.
    def setup(m):
        gate(m, 0x30, present=False, dpl=0)
        gate(m, 11, selector=0x1000)
        install(m, "mov ebx, [esp]; mov ecx, esp; mov edx, 0xdf; hlt", 32)
        gate(m, 8)

    _, result = run_guest("int 0x30; hlt", "protected", setup=setup)
    assert result.stop.reason is StopReason.HLT
    assert result.regs["rdx"] == 0xDF and result.regs["rbx"] == 0
    assert result.regs["rcx"] == 0x80000 - 16


def test_fault_without_gates_escalates_to_shutdown_at_cpl3():
    # Every gate is not present: #GP -> #NP -> #DF -> #NP during #DF = triple fault.
    _, result = run_guest("mov eax, cr0; hlt", "protected", cpl=3)
    assert result.stop.reason is StopReason.SHUTDOWN
    assert result.stop.exit_status == 4


def test_triple_fault_in_long_mode_with_an_empty_idt():
    _, result = run_guest("lidt [0x70000]; ud2", "long",
                          setup=lambda m: m.write_memory(0x70000, bytes(10)))
    assert result.stop.reason is StopReason.SHUTDOWN


def test_icebp_delivers_a_debug_trap():
    handler = "mov ebx, [esp]; mov ecx, 0xdb; hlt"

    def setup(m):
        install(m, handler, 32)
        gate(m, 1)

    machine, result = run_guest("nop", "protected", setup=lambda m: (setup(m), m.write_memory(0x100000, b"\xf1\xf4")))
    assert result.stop.reason is StopReason.HLT
    assert result.regs["rcx"] == 0xDB and result.regs["rbx"] == 0x100001
