"""Code sites: hooks where a flagged instruction starts, armed when Unicorn translates the code.

Unicorn runs everything natively; ringminus sees an instruction *before* it executes only
through a UC_HOOK_CODE hook that covers its address (reference/unicorn.md §1).  A hook costs
nothing where it is not reached, but Unicorn keeps all code hooks in one list and walks the
whole list for every instruction it translates and for every hook call: with thousands of
hooks each translated instruction and each exit cost tens of µs more (benchmarks/arming.py).
The number of hooks is what arming must keep small.  So:

* Sites are armed at translation, not by scanning memory.  Unicorn reports each block it has
  just translated, before the block runs (UC_HOOK_EDGE_GENERATED; it reports only once some
  block has run, so until then a UC_HOOK_BLOCK sees the blocks).  The block's bytes are
  searched for the flagged opcodes and, where one occurs, decoded from the block's start, so
  only instruction starts are armed: a data byte that looks like HLT is never a site, nor is
  anything in code that never runs, however densely it is flagged.  If the block holds a new
  site, its translation is dropped and RIP written, which makes Unicorn leave the block
  before its first instruction (none has run or been counted) and translate it again, now
  with the hook.
* Code written after it was translated (DESIGN.md §3 rule 2) is found the same way: the
  guest's stores drop the translations of code they overwrite (QEMU's self-modifying-code
  check), and ringminus's loaders and its own writes as the CPU (``PhysicalMemory.write``,
  told which physical pages hold translated code) drop them for what they place, so the new
  bytes are translated, and searched, before they run.  No write hook is needed: a zero-filled .bss
  holding a stack costs nothing, and code the guest copies into it is found when it runs.
* A site sits at the linear address its block was translated at, where the code is mapped
  now; another mapping of the same code is translated, and armed, on its own.
* One hook covers a run of consecutive flagged instructions, and touching runs share one.
  A block with many runs (RUNS_PER_BLOCK) gets one hook from its first site to its last; a
  run of flagged blocks (a HLT after a HLT), and any block once RANGE_BUDGET hooks exist,
  one from its first site to the end of its page; between slices, past the budget, the
  nearest ranges are merged.  The instructions between sites then reach the hook's callback
  too, and it passes on only armed starts, so a site still fires only where a flagged one
  starts.  A range never reaches past its block for density alone: the code after it in the
  page (a firmware's memset beside its port writes) would pay a callback per instruction.
* A counted slice is different: Unicorn's instruction counter is a code hook over every
  address, so every instruction that runs walks the whole list — each hook then costs every
  instruction executed, not just those translated (a SeaBIOS boot on q35 spent 4 of its 5 s
  there, 72 hooks deep).  So where instructions are counted, hooks are evicted: every
  EVICTION_INTERVAL instructions, past COUNTED_RANGE_BUDGET hooks, the ranges none of whose
  sites fired since the last look (init code that ran once) are deleted and everything is
  translated again; a site evicted that runs again is armed again when its block is
  translated.  Ranges that fire stay, so a loop of sites does not thrash.
* ``armed`` tells the run loop whether a hook covers an instruction (Unicorn compiles it in
  differently, machine.py's ``_hooked_at_fault``), so translated code must stay in step with
  the hooks: coverage only grows over the block being translated again, or is followed by
  translating everything again.

Two Unicorn behaviours decide where the rest happens.  Translations are dropped by *linear*
address, looked up through the guest's page tables; where those map nothing, QEMU leaves a
#PF pending and CR2 written (and deleting a hook drops the translations it was compiled
into).  So inside a hook, translations are dropped, and hooks deleted, only within the pages
of the block just translated; the rest — merging ranges, and translating everything again
after opcodes were flagged late (``set_opcodes``) or a range was laid over code translated
in another address space — is done by ``remap``, which the run loop calls between slices
whenever ``physical`` has grown, with the CPU state saved around it.  And with a single
hook of a kind, Unicorn compiles a direct call to its callback into the code instead of the
call through its hook list (which skips deleted hooks), so a code hook and a block hook that
never match stay installed (unicorn 2.1.4, include/tcg/tcg-op.h gen_uc_tracecode).
"""
from __future__ import annotations

import bisect
import re
from typing import Callable

from unicorn import UC_HOOK_BLOCK, UC_HOOK_CODE, UC_HOOK_EDGE_GENERATED, Uc
from unicorn.x86_const import UC_X86_REG_RIP

from ..decode.length import disassembler
from ..decode.prefixes import MAX_INSTRUCTION_LENGTH, is_prefix
from . import ucinternals

PAGE = 0x1000
NEVER = 1 << 63                 # non-canonical: no instruction is fetched there in any mode
# Code hooks past which they are merged.  Each hook adds about 15 ns to every instruction
# translated and to every hook call (benchmarks/arming.py); a merged range costs a filtered
# callback for each instruction that runs between the sites it joins, so merges join only
# sites at most MERGE_GAP bytes apart.
RANGE_BUDGET = 128
MERGE_GAP = 256
# Where instructions are counted: hooks past which the cold ones are evicted, looked at once
# every EVICTION_INTERVAL instructions (a full re-translation costs milliseconds; a hook,
# about 3.5 ns an instruction counted).
COUNTED_RANGE_BUDGET = 2
EVICTION_INTERVAL = 100_000
# A block longer than this is not decoded (capstone costs µs an instruction): every start that
# reaches a flagged opcode over prefix bytes is armed instead.
DECODE_LIMIT = 128
# A dense block — more runs of flagged instructions than RUNS_PER_BLOCK — gets one hook over
# its flagged span; nothing but flagged instructions right after a hooked one (a HLT after a
# HLT) one to the end of its page, so that the blocks that follow it there need none.
RUNS_PER_BLOCK = 4

Piece = tuple[int, int, bytes]      # a block's part in one page: linear, physical, bytes


def _never(*_args) -> None:
    """The guard hooks' callback: they sit at NEVER."""


def _pattern(opcodes: frozenset[bytes]) -> re.Pattern | None:
    """Finds every offset where one of ``opcodes`` starts, overlapping ones included."""
    if not opcodes:
        return None
    return re.compile(b"(?=" + b"|".join(re.escape(opcode) for opcode in sorted(opcodes)) + b")")


def _hits(pattern: re.Pattern | None, code: bytes) -> set[int]:
    return {match.start() for match in pattern.finditer(code)} if pattern is not None else set()


def _instruction_starts(code: bytes, bits: int, count: int | None) -> list[tuple[int, int]] | None:
    """(offset, length) of each instruction of a block that starts at ``code[0]``; None where
    capstone does not decode the block as Unicorn did (``count`` instructions, when known,
    filling the block exactly)."""
    starts, at = [], 0
    for _address, length, _mnemonic, _operands in disassembler(bits).disasm_lite(code, 0):
        starts.append((at, length))
        at += length
    if at != len(code) or count is not None and count != len(starts):
        return None
    return starts


def _opcode_offset(code: bytes, start: int, length: int, bits: int) -> int:
    """Where the opcode of the instruction at ``start`` begins: after its prefixes."""
    at = start
    while at < start + length - 1 and is_prefix(code[at], bits):
        at += 1
    return at


def _possible_starts(code: bytes, hits: set[int]) -> list[int]:
    """Without a decode: every hit and every start that reaches it over prefix bytes (REX
    included: in 16/32-bit code such a start simply decodes as something else)."""
    starts = set(hits)
    for hit in hits:
        at = hit
        while at > 0 and hit - at < MAX_INSTRUCTION_LENGTH - 1 and is_prefix(code[at - 1], 64):
            at -= 1
            starts.add(at)
    return sorted(starts)


def _flagged_runs(code: bytes, hits: set[int], possible: list[int], bits: int,
                  count: int | None) -> tuple[list[int], list[list[int]], bool]:
    """The flagged instruction starts of a block (offsets), the runs they form ([first,
    last] offsets over consecutive flagged instructions), and whether the block was decoded
    and holds nothing else.  ``possible``: ``_possible_starts``, what is armed where the
    block is not decoded."""
    starts = _instruction_starts(code, bits, count) if len(code) <= DECODE_LIMIT else None
    flagged: list[int] = []
    runs: list[list[int]] = []
    if starts is None:
        for offset in possible:
            flagged.append(offset)
            if runs and runs[-1][1] == offset - 1:
                runs[-1][1] = offset
            else:
                runs.append([offset, offset])
        return flagged, runs, False
    previous = False
    for offset, length in starts:
        is_flagged = _opcode_offset(code, offset, length, bits) in hits
        if is_flagged:
            flagged.append(offset)
            if previous:
                runs[-1][1] = offset + length - 1
            else:
                runs.append([offset, offset + length - 1])
        previous = is_flagged
    return flagged, runs, len(flagged) == len(starts)


class ArmedSites:
    """The armed sites, by linear address.  ``len`` counts the instruction starts armed;
    ``address in`` says whether a code hook covers the address, that is whether Unicorn
    compiled a hook call before an instruction there."""

    def __init__(self, starts: set[int], firsts: list[int], lasts: list[int]):
        self._starts, self._firsts, self._lasts = starts, firsts, lasts

    def __len__(self) -> int:
        return len(self._starts)

    def __contains__(self, address: int) -> bool:
        at = bisect.bisect_right(self._firsts, address) - 1
        return at >= 0 and address <= self._lasts[at]


class CodeSites:
    def __init__(self, uc: Uc, callback: Callable, opcodes: frozenset[bytes],
                 read: Callable[[int, int], bytes | None], code_pages: set[int],
                 translate: Callable[[int], int | None]):
        """``code_pages``: the set to keep the physical pages of translated code in;
        ``translate``: linear to physical as the CPU fetched (paging.LinearMemory)."""
        self._uc = uc
        self._callback = callback
        self._read = read
        self._translate = translate                 # pages just fetched from: in the TLB
        # What Unicorn has mapped, without mapping anything: a range hidden since a block was
        # translated there holds no translation any more (unmapping dropped it).
        self._read_mapped = ucinternals.FastAccess(uc).read_memory
        self._context = ucinternals.Context(uc)
        self.opcodes = frozenset(opcodes)
        self._opcodes_pattern = _pattern(self.opcodes)
        self._starts: set[int] = set()              # linear addresses of armed instruction starts
        self._firsts: list[int] = []                # armed linear ranges, sorted and disjoint:
        self._lasts: list[int] = []                 # first and last address, and the hook
        self._hooks: list[int] = []
        self.armed = ArmedSites(self._starts, self._firsts, self._lasts)
        self._fired: set[int] = set()               # sites that fired since the last eviction
        self.evictions = 0                          # hooks evicted (``evict_cold``)
        # Physical addresses of sites that translated code does not honour yet, or whose
        # ranges are to be merged; the run loop calls remap whenever this has grown.
        self.physical: set[int] = set()
        self._flush_owed = False                    # translate everything again, in remap
        self._merge_owed = False                    # merge ranges, in remap
        self._hooks_after_merge = 0
        self.translations = 0                       # blocks searched as Unicorn translated them
        self.restarts = 0                           # blocks translated again to run with new sites
        self.flushes = 0                            # times every translation was dropped
        # Blocks whose new sites lie in code written after its page was first searched, and
        # each page (physical) as it was then.
        self.rescans = 0
        self._first_seen: dict[int, bytes | None] = {}
        # Blocks translated since the last flush, which may still be cached: (linear start,
        # physical start) -> (size, physical start of a second page or None); and for each
        # linear page, the physical pages code was translated from there.
        self._translated: dict[tuple[int, int], tuple[int, int | None]] = {}
        self._translated_from: dict[int, set[int]] = {}
        self._code_pages = code_pages
        uc.hook_add(UC_HOOK_CODE, _never, begin=NEVER, end=NEVER)       # guards: see the docstring
        uc.hook_add(UC_HOOK_BLOCK, _never, begin=NEVER, end=NEVER)
        self._first_blocks: int | None = uc.hook_add(UC_HOOK_BLOCK, self._on_first_blocks)
        uc.hook_add(UC_HOOK_EDGE_GENERATED, self._on_translated)

    @property
    def ranges(self) -> list[tuple[int, int]]:
        """The armed linear ranges (first, last address), one Unicorn hook each."""
        return list(zip(self._firsts, self._lasts))

    # -- translation ---------------------------------------------------------------------
    def _on_translated(self, uc: Uc, block, _previous, _data) -> None:
        if self._first_blocks is not None:
            # Blocks are reported from now on.  Deleting the block hook drops the blocks it
            # was compiled into, the few that ran first, here in this address space.
            uc.hook_del(self._first_blocks)
            self._first_blocks = None
        self._search_block(block.pc, block.size, block.icount)

    def _on_first_blocks(self, uc: Uc, address: int, size: int, _data) -> None:
        self._search_block(address, size, None)

    def _search_block(self, pc: int, size: int, count: int | None) -> None:
        """Arm the sites of the block Unicorn is about to run at linear ``pc``; if one is new,
        make Unicorn translate the block again, with its hook."""
        pieces = self._block_pieces(pc, size)
        if not pieces:
            return
        self.translations += 1
        self._remember(pc, pieces)
        code = b"".join(data for _linear, _physical, data in pieces)
        hits = _hits(self._opcodes_pattern, code)
        if not hits:
            return
        possible = _possible_starts(code, hits)
        if all(pc + offset in self.armed for offset in possible):
            # Hooked already when translated (a block translated again, or overlapping one
            # searched before): let the filter pass every start that may be flagged.
            self._starts.update(pc + offset for offset in possible)
            return
        bits = ucinternals.code_bits(self._context.snapshot().u32(ucinternals.HFLAGS))
        flagged, runs, every = _flagged_runs(code, hits, possible, bits, count)
        new = [offset for offset in flagged if pc + offset not in self.armed]
        self._starts.update(pc + offset for offset in flagged)
        if not new:                                 # all hooked when translated
            return
        end = pc + sum(len(data) for _linear, _physical, data in pieces)    # where translations are dropped
        if every and pc - 1 in self.armed or len(self._hooks) >= RANGE_BUDGET:
            end = ((end - 1) | (PAGE - 1)) + 1
            runs = [[runs[0][0], end - 1 - pc]]
        elif len(runs) > RUNS_PER_BLOCK:
            runs = [[runs[0][0], runs[-1][1]]]
        pages = {linear >> 12 for linear, _physical, _data in pieces}
        for first, last in runs:
            self._cover(pc + first, pc + last, pages)
            if self._translated_elsewhere(pc + first, pc + last, pieces):
                self._owe(pieces, new, flush=True)
        if len(self._hooks) > max(RANGE_BUDGET, self._hooks_after_merge + RANGE_BUDGET // 2):
            self._owe(pieces, new, merge=True)
        if self._written_since_first_seen(pieces):
            self.rescans += 1
        self.restarts += 1
        for linear, _physical, data in pieces:      # the block's pages were just fetched from
            self._uc.ctl_remove_cache(linear, min(end, (linear | (PAGE - 1)) + 1))
        self._uc.reg_write(UC_X86_REG_RIP, self._uc.reg_read(UC_X86_REG_RIP))   # leave the block now

    def _block_pieces(self, pc: int, size: int) -> list[Piece]:
        pieces = []
        at, end = pc, pc + size
        while at < end:
            count = min(end, (at | (PAGE - 1)) + 1) - at
            physical = self._translate(at)
            data = None if physical is None else self._read(physical, count)
            if data is None:
                break
            pieces.append((at, physical, data))
            at += count
        return pieces

    def _remember(self, pc: int, pieces: list[Piece]) -> None:
        self._translated[(pc, pieces[0][1])] = (sum(len(data) for _l, _p, data in pieces),
                                                 pieces[1][1] if len(pieces) > 1 else None)
        for linear, physical, _data in pieces:
            self._translated_from.setdefault(linear >> 12, set()).add(physical >> 12)
            self._code_pages.add(physical >> 12)
            page = physical & ~(PAGE - 1)
            if page not in self._first_seen:
                self._first_seen[page] = self._read(page, PAGE)

    def _written_since_first_seen(self, pieces: list[Piece]) -> bool:
        written = False
        for _linear, physical, data in pieces:
            page, offset = physical & ~(PAGE - 1), physical & (PAGE - 1)
            seen = self._first_seen.get(page)
            if seen is not None and seen[offset:offset + len(data)] != data:
                written = True
                self._first_seen[page] = self._read(page, PAGE)
        return written

    def _translated_elsewhere(self, first: int, last: int, pieces: list[Piece]) -> bool:
        """Whether code was translated in the pages of [first, last] from other physical
        pages than this block's (another address space): dropping this block's translations
        does not reach it."""
        own = {physical >> 12 for _linear, physical, _data in pieces}
        return any(self._translated_from.get(page, own) - own for page in range(first >> 12, (last >> 12) + 1))

    def _owe(self, pieces: list[Piece], offsets: list[int], flush: bool = False, merge: bool = False) -> None:
        """Ask for remap before the next slice: ``physical`` grows by these sites."""
        self._flush_owed |= flush
        self._merge_owed |= merge
        for offset in offsets:
            for _linear, physical, data in pieces:
                if offset < len(data):
                    self.physical.add(physical + offset)
                    break
                offset -= len(data)

    # -- hooks ---------------------------------------------------------------------------
    def _fire(self, uc: Uc, address: int, size: int, data) -> None:
        if address in self._starts:     # a merged range also covers what lies between sites
            self._fired.add(address)
            self._callback(uc, address, size, data)

    def _cover(self, first: int, last: int, pages: set[int]) -> None:
        """Make hooks cover [first, last], within the pages ``pages`` of the block being
        translated again: merged with the ranges it overlaps or touches where those lie in
        these pages too, beside them otherwise."""
        low = bisect.bisect_left(self._lasts, first - 1)
        high = bisect.bisect_right(self._firsts, last + 1)
        near = range(low, high)
        if all(self._firsts[i] >> 12 in pages and self._lasts[i] >> 12 in pages for i in near):
            if near:
                first, last = min(first, self._firsts[low]), max(last, self._lasts[high - 1])
            self._replace(low, high, first, last)
            return
        uncovered, at = [], first                   # add what no range covers yet
        for i in near:
            if at < self._firsts[i] and at <= last:
                uncovered.append((at, min(last, self._firsts[i] - 1)))
            at = max(at, self._lasts[i] + 1)
        if at <= last:
            uncovered.append((at, last))
        for piece_first, piece_last in uncovered:
            at = bisect.bisect_left(self._firsts, piece_first)
            self._replace(at, at, piece_first, piece_last)

    def _replace(self, low: int, high: int, first: int, last: int) -> None:
        """Ranges low..high-1 (none if equal) become one range [first, last]."""
        for hook in self._hooks[low:high]:
            self._uc.hook_del(hook)
        hook = self._uc.hook_add(UC_HOOK_CODE, self._fire, begin=first, end=last)
        self._firsts[low:high], self._lasts[low:high], self._hooks[low:high] = [first], [last], [hook]

    def _merge(self) -> bool:
        """Merge touching ranges; then, past the budget, the nearest ranges (at most MERGE_GAP
        apart) down to half of it.  Returns whether a range now covers new addresses."""
        i = 0
        while i < len(self._hooks) - 1:
            if self._lasts[i] + 1 >= self._firsts[i + 1]:
                self._replace(i, i + 2, self._firsts[i], max(self._lasts[i], self._lasts[i + 1]))
            else:
                i += 1
        grew = False
        while len(self._hooks) > RANGE_BUDGET // 2 and (len(self._hooks) > RANGE_BUDGET or grew):
            gaps = [(self._firsts[i + 1] - self._lasts[i], i) for i in range(len(self._hooks) - 1)]
            gap, nearest = min(gaps)
            if gap > MERGE_GAP:
                break
            self._replace(nearest, nearest + 2, self._firsts[nearest], self._lasts[nearest + 1])
            grew = True
        self._hooks_after_merge = len(self._hooks)
        return grew

    # -- what the machine asks -----------------------------------------------------------
    def state(self) -> tuple:
        """What a snapshot holds of the sites: the opcodes flagged, and the sites found that
        translated code does not honour yet (the armed ones are a cache: rescan)."""
        return self.opcodes, frozenset(self.physical)

    def restore(self, state: tuple) -> None:
        opcodes, physical = state
        if opcodes != self.opcodes:
            # Flagging only ever adds (set_opcodes), and the adding reads the code translated
            # so far, which may map a hidden SMRAM range: a replay flags them when the first
            # run did, so they are put back as they were, without that read.
            self.opcodes = opcodes
            self._opcodes_pattern = _pattern(opcodes)
        # The run loop re-arms when ``physical`` grows past what it armed in an address space.
        self.physical.clear()
        self.physical.update(physical)

    def set_opcodes(self, opcodes: frozenset[bytes]) -> None:
        """Flag more opcodes.  Blocks translated before that hold one of them are translated
        again before the next slice (their addresses join ``physical``; see ``remap``)."""
        added = frozenset(opcodes) - self.opcodes
        self.opcodes |= added
        self._opcodes_pattern = _pattern(self.opcodes)
        pattern = _pattern(added)
        if pattern is None:
            return
        for (_pc, first), (size, second) in self._translated.items():
            head = min(size, PAGE - (first & (PAGE - 1)))
            code = self._read_mapped(first, head)
            if code is None:
                continue
            if second is not None:
                code += self._read_mapped(second, size - head) or b""
            for hit in _hits(pattern, code):
                self._flush_owed = True
                self.physical.add(first + hit if hit < head else second + hit - head)

    def remap(self) -> None:
        """The run loop is between slices (``physical`` has grown, or the address space
        changed).  A site follows its translation, so another mapping needs nothing armed
        here; what ``physical`` announced is done now, where no translated code runs: merge
        ranges, translate everything again."""
        if self._merge_owed:
            self._merge_owed = False
            self._context.snapshot()                # deleting hooks may leave a #PF and CR2
            self._flush_owed |= self._merge()
            self._context.commit()
        if self._flush_owed:
            self._flush()

    def evict_cold(self) -> None:
        """Between counted slices: past COUNTED_RANGE_BUDGET hooks, delete the ranges none of
        whose sites fired since the last call, and translate everything again (their blocks
        re-arm if they run again)."""
        fired, self._fired = self._fired, set()
        if len(self._hooks) <= COUNTED_RANGE_BUDGET:
            return
        hot = {bisect.bisect_right(self._firsts, address) - 1 for address in fired}
        keep = [i for i in range(len(self._hooks)) if i in hot]
        if len(keep) == len(self._hooks):
            return
        self._context.snapshot()                    # deleting hooks may leave a #PF and CR2
        for i in range(len(self._hooks)):
            if i not in hot:
                self._uc.hook_del(self._hooks[i])
        self._context.commit()
        self.evictions += len(self._hooks) - len(keep)
        self._firsts[:] = [self._firsts[i] for i in keep]
        self._lasts[:] = [self._lasts[i] for i in keep]
        self._hooks[:] = [self._hooks[i] for i in keep]
        self._starts.intersection_update({address for address in self._starts if address in self.armed})
        self._hooks_after_merge = min(self._hooks_after_merge, len(self._hooks))
        self._flush()

    def rescan(self) -> None:
        """Memory changed behind Unicorn's back (a snapshot taken or restored): translate
        everything again, so every block is searched as its bytes are now, and arm from
        nothing, so that a replay arms, merges and flushes where the first run did."""
        self._context.snapshot()
        for hook in self._hooks:
            self._uc.hook_del(hook)
        self._context.commit()
        self._firsts.clear()
        self._lasts.clear()
        self._hooks.clear()
        self._starts.clear()
        self._fired.clear()
        self._hooks_after_merge = 0
        self._merge_owed = False
        self._flush()

    def _flush(self) -> None:
        self._flush_owed = False
        self.flushes += 1
        self._translated.clear()
        self._translated_from.clear()
        self._code_pages.clear()
        self._uc.ctl_flush_tb()
