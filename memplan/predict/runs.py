"""Replay a chunked allocation program through the allocator model (predict/allocator.py), skipping decoder
layers whose allocator transition repeats exactly.

A program is a list of Chunks: one per decoder layer in each phase of the step (load, optimizer states, forward,
backward, the step's copies), flat stretches between. Consecutive layer chunks with the same operations and the
same pattern of where their tensors are freed form a run. Replaying a run, the engine writes the allocator's
state before each chunk relative to that chunk (`_Run.canon`): every segment the chunk can touch (one with a free
block some request of the run could take, or a block the chunk frees), each block by its size and by when,
relative to the chunk, it is freed or was made; segments by where they come from (made n chunks ago, the k-th;
the same one before the run; the i-th of those whose first tensor freed is freed by the chunk n ago). Equal
states before chunks k and k+1 make equal transitions, so every later chunk of the run repeats chunk k's - as
long as what each later chunk frees that nothing touched before (backward: the forward's saved tensors) has the
same shape and place, checked for each chunk skipped (`_Run.target`). The state after the skipped chunks is then
built (`_Engine.materialize`): the same blocks, segments at the addresses the allocator would give them, counters
and peaks moved by the repeating increments; whatever does not fall into place exactly makes the engine replay
instead. The result is a full replay's to the byte (tests/test_runs.py).
Only the default AllocatorConfig (no capacity: nothing is ever released).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from dataclasses import dataclass

from memplan.predict.allocator import SMALL_SIZE, Allocator, _Block, round_size

ALLOC_OP, FREE_LOCAL, FREE_REF = 0, 1, 2  # (op, nbytes, stream) | (op, local alloc index, 0) | (op, ref index, 0)
TRIES = 4  # chunks of a run compared before the rest are simply replayed (the state settles in one or two)
MIN_RUN = 4  # shorter runs are replayed: nothing to gain


@dataclass(frozen=True, slots=True)
class Chunk:
    """A stretch of the program: its operations; the id of its first allocation (the rest numbered on from
    there) and how many it makes; the earlier chunks' ids it frees (FREE_REF's index); one decoder layer's or
    not (only layers are compared)."""

    ops: tuple[tuple[int, int, int], ...]
    base: int
    allocs: int
    refs: tuple[int, ...]
    layer: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class Peaks:
    peak_reserved_bytes: int
    peak_requested_bytes: int
    peak_allocated_bytes: int
    reserved_bytes: int
    skipped_chunks: int  # chunks not replayed (0: a plain replay)


class _NoSkip(Exception):
    """The skipped state would not fall into place exactly: replay instead."""


class _Tracked(Allocator):
    """The allocator, recording each segment it makes: address -> (chunk, its index among the chunk's)."""

    def __init__(self) -> None:
        super().__init__()
        self.chunk = -1
        self.seg: dict[int, tuple[int, int, int]] = {}  # address -> (chunk, j, size)
        self.at: dict[tuple[int, int], tuple[int, int]] = {}  # (chunk, j) -> (address, size)
        self.count: dict[int, int] = {}

    def note(self, chunk: int, addr: int, size: int) -> None:
        j = self.count.get(chunk, 0)
        self.count[chunk] = j + 1
        self.seg[addr] = (chunk, j, size)
        self.at[(chunk, j)] = (addr, size)

    def _alloc_block(self, small: bool, stream: int, size: int, alloc_size: int) -> _Block | None:
        block = super()._alloc_block(small, stream, size, alloc_size)
        if block is not None:
            self.note(self.chunk, block.addr, alloc_size)
        return block


def replay_chunks(chunks: list[Chunk], sizes: list[tuple[int, int]], skip: bool = True) -> Peaks:
    """Replay the program (`sizes`: each id's (bytes, stream)); `skip=False` replays every chunk."""
    return _Engine(chunks, sizes).run(skip)


def _runs(chunks: list[Chunk]) -> dict[int, tuple[int, int]]:
    """start -> (end, cap): stretches of layer chunks with equal operations (cap: that stretch's end) and, in
    it, equal free patterns: for each allocation freed by a later chunk before the cap, (its index, how many
    chunks later, which ref)."""
    out: dict[int, tuple[int, int]] = {}
    bases = [c.base for c in chunks]
    i, n = 0, len(chunks)
    while i < n:
        j = i + 1
        if chunks[i].layer:
            while j < n and chunks[j].layer and chunks[j].ops == chunks[i].ops:
                j += 1
        if j - i >= MIN_RUN:
            sig: list[list[tuple[int, int, int]]] = [[] for _ in range(j - i)]
            for c in range(i, j):
                for pos, key in enumerate(chunks[c].refs):
                    owner = bisect_right(bases, key) - 1
                    if owner >= i:
                        sig[owner - i].append((key - bases[owner], c - owner, pos))
            start = i
            for c in range(i + 1, j + 1):
                if c == j or sorted(sig[c - i]) != sorted(sig[start - i]):
                    if c - start >= MIN_RUN:
                        out[start] = (c, j)
                    start = c
        i = j
    return out


class _Engine:
    def __init__(self, chunks: list[Chunk], sizes: list[tuple[int, int]]) -> None:
        self.chunks, self.sizes = chunks, sizes
        self.a = _Tracked()
        self.handles: dict[int, int] = {}  # id -> allocator handle
        self.ids: dict[int, int] = {}  # a live block's address -> its id
        self.bases = [c.base for c in chunks]
        self.skipped = 0

    def step(self, ci: int) -> None:
        c, a, handles, ids = self.chunks[ci], self.a, self.handles, self.ids
        a.chunk = ci
        base, live, refs = c.base, a._live, c.refs
        made = 0
        for op, x, y in c.ops:
            if op == ALLOC_OP:
                if x:  # a 0-byte tensor calls no malloc (allocator.py Allocator.malloc): not tracked here
                    h = a.malloc(x, y)
                    handles[base + made] = h
                    ids[live[h][0].addr] = base + made
                made += 1
            else:
                h = handles.pop(base + x if op == FREE_LOCAL else refs[x], None)
                if h is not None:
                    del ids[live[h][0].addr]
                    a.free(h)

    def run(self, skip: bool) -> Peaks:
        ci, n = 0, len(self.chunks)
        runs = _runs(self.chunks) if skip else {}
        while ci < n:
            if ci in runs:
                ci = self.run_layers(ci, *runs[ci])
            else:
                self.step(ci)
                ci += 1
        a = self.a
        return Peaks(peak_reserved_bytes=a.peak_reserved, peak_requested_bytes=a.peak_requested,
                     peak_allocated_bytes=a.peak_allocated, reserved_bytes=a.reserved, skipped_chunks=self.skipped)

    def counters(self) -> list[int]:
        a = self.a
        return [a.reserved, a.allocated, a.requested, a.segments, a._next_addr]

    def run_layers(self, s: int, e: int, cap: int) -> int:
        """Replay chunks s..e-1, skipping what repeats; returns e."""
        run = _Run(self, s, cap)
        ci, prev, tries = s, None, 0
        while ci < e:
            if tries >= TRIES or ci + 2 >= e:
                self.step(ci)
                ci += 1
                continue
            tries += 1
            cur = run.canon(ci)
            if prev is not None and prev[0] == cur[0]:
                target = run.target(ci - 1, cur, e)
                if target > ci:
                    try:
                        self.materialize(run, ci - 1, target, prev, cur)
                    except _NoSkip:
                        pass
                    else:
                        self.skipped += target - ci
                        ci, prev, tries = target, None, TRIES
                        continue
            a = self.a
            before = self.counters()
            old = (a.peak_reserved, a.peak_allocated, a.peak_requested)
            a.peak_reserved, a.peak_allocated, a.peak_requested = a.reserved, a.allocated, a.requested
            self.step(ci)
            inner = (a.peak_reserved, a.peak_allocated, a.peak_requested)
            a.peak_reserved, a.peak_allocated, a.peak_requested = (max(x, y) for x, y in zip(old, inner, strict=True))
            prev = (cur[0], cur[1], before, self.counters(), inner)
            ci += 1
        return e

    def materialize(self, run: _Run, k: int, target: int, prev: tuple, cur: tuple) -> None:
        """The state before chunk `target`, chunks k+1 .. target-1 repeating chunk k's transition (from `prev`,
        the state before chunk k, to `cur`, the state before k+1)."""
        a, n = self.a, target - (k + 1)
        canon_k1, heads_k1 = cur
        _, heads_k, before, after, inner = prev
        made_k = [a.at[(k, j)] for j in range(a.count.get(k, 0))]
        advance = after[4] - before[4]  # the address space chunk k's new segments took
        # what chunk k left behind: for good (no usable free block, nothing freed before the cap), else replay
        leaving = [run.record(addr, k + 1) for addr in sorted((set(heads_k) | {x for x, _ in made_k}) - set(heads_k1))]
        if any(rec[0][0] == "abs" or any(b[0] == 1 for b in rec[3]) for rec in leaving):
            raise _NoSkip

        def real(ident: tuple, at: int) -> tuple[int, int]:
            """(address, size) of the segment `ident` names relative to chunk `at`."""
            if ident[0] == "abs":
                return ident[1], ident[2]
            if ident[0] == "rel":
                chunk, j = at + ident[1], ident[2]
                if chunk <= k:
                    return a.at[(chunk, j)]
                addr, size = made_k[j]
                return addr + (chunk - k) * advance, size
            entered = run.entering(at + ident[1])
            if ident[2] >= len(entered):
                raise _NoSkip
            return entered[ident[2]]

        plan: dict[int, tuple[int, tuple, int]] = {}  # address -> (size, record, relative to which chunk)

        def put(rec: tuple, at: int) -> None:
            addr, size = real(rec[0], at)
            if plan.setdefault(addr, (size, rec, at)) != (size, rec, at):
                raise _NoSkip

        for rec in canon_k1:  # the window before `target`, position by position as before chunk k+1
            if not (rec[0][0] == "ent" and rec[0][1] == 0):  # (entering at `target`: untouched, as it is)
                put(rec, target)
        for m in range(k + 1, target):  # what each skipped chunk leaves behind, as chunk k did
            for rec in leaving:
                put(rec, m + 1)
        # every segment the skipped chunks touch must have its final state planned
        touched = set(heads_k1) | {addr + (m - k) * advance for m in range(k + 1, target) for addr, _ in made_k}
        touched |= {addr for m in range(k + 2, target) for addr, _ in run.entering(m)}
        if not touched <= plan.keys():
            raise _NoSkip
        for addr, (size, rec, at) in sorted(plan.items()):
            self.rebuild(run, addr, size, rec, at)
        for m in range(k + 1, target):
            for addr, size in made_k:
                a.note(m, addr + (m - k) * advance, size)
        d = [y - x for x, y in zip(before, after, strict=True)]
        a.reserved, a.allocated, a.requested, a.segments, a._next_addr = (after[i] + n * d[i] for i in range(5))
        peaks = [a.peak_reserved, a.peak_allocated, a.peak_requested]
        for i in range(3):  # each skipped chunk's own excess over its start, as chunk k's
            top = after[i] + (inner[i] - before[i]) + max(0, (n - 1) * d[i])
            peaks[i] = max(peaks[i], top)
        a.peak_reserved, a.peak_allocated, a.peak_requested = peaks

    def rebuild(self, run: _Run, addr: int, size: int, rec: tuple, at: int) -> None:
        """Give segment `addr` the blocks `rec` describes relative to chunk `at` (its pre-run tensors kept)."""
        a, ids, handles = self.a, self.ids, self.handles
        walls: list[_Block] = []
        block = a._blocks.get(addr)
        if block is None and addr in ids:
            block = a._live[handles[ids[addr]]][0]
        while block is not None:
            nxt = block.next
            if not block.allocated:
                a._remove_free(block)
            else:
                key = ids[block.addr]
                if key < run.start_id:
                    walls.append(block)
                else:
                    del ids[block.addr]
                    del a._live[handles.pop(key)]
            block = nxt
        _, small, stream, blocks = rec
        cursor, prev = addr, None
        walls.reverse()
        for desc in blocks:
            bsize = desc[1]
            if desc[0] == 3:
                if not walls or walls[-1].size != bsize or walls[-1].addr != cursor:
                    raise AssertionError("a pre-run tensor out of place")
                b = walls.pop()
            else:
                b = _Block(cursor, bsize, stream, small)
            b.prev, b.next = prev, None
            if prev is not None:
                prev.next = b
            if desc[0] == 0:
                a._insert_free(b)
            elif desc[0] != 3:
                key = self.chunks[at + desc[3]].refs[desc[4]] if desc[0] == 1 else self.bases[at + desc[3]] + desc[4]
                b.allocated = True
                a._handles += 1
                a._live[a._handles] = (b, desc[2])
                handles[key] = a._handles
                ids[cursor] = key
            prev, cursor = b, cursor + bsize
        if cursor != addr + size or walls:
            raise AssertionError("a rebuilt segment does not tile")


class _Run:
    """One run's view of the allocator state: which requests it makes, what each of its chunks frees."""

    def __init__(self, eng: _Engine, s: int, cap: int) -> None:
        self.eng, self.s, self.cap = eng, s, cap
        self.start_id = eng.bases[s]
        self.freer: dict[int, tuple[int, int]] = {}  # id -> (the chunk before cap that frees it, which ref)
        for c in range(s, cap):
            for pos, key in enumerate(eng.chunks[c].refs):
                self.freer[key] = (c, pos)
        self.least: dict[tuple[bool, int], int] = {}  # (small pool, stream) -> the run's smallest request
        for op, x, y in eng.chunks[s].ops:
            if op == ALLOC_OP and x:
                size = round_size(x)
                pool = (size <= SMALL_SIZE, y)
                self.least[pool] = min(self.least.get(pool, size), size)
        # segments made before the run: usable from its start ("abs"), or first touched by chunk c ("ent")
        self.kind: dict[int, tuple] = {}
        self.entered: dict[int, list[tuple[int, int]]] = {}
        for c in range(s, cap):
            for key in eng.chunks[c].refs:
                if key >= self.start_id:
                    continue
                head = self.head_of_id(key)
                if head is None or head.addr in self.kind:
                    continue
                size = self.seg_size(head)
                if self.usable_in(head):
                    self.kind[head.addr] = ("abs", head.addr, size)
                else:
                    self.entered.setdefault(c, []).append((head.addr, size))
                    self.kind[head.addr] = ("ent", c)
        for c, segs in self.entered.items():
            segs.sort()
            for i, (addr, _) in enumerate(segs):
                self.kind[addr] = ("ent", c, i)

    def head_of_id(self, key: int) -> _Block | None:
        h = self.eng.handles.get(key)
        block = self.eng.a._live[h][0] if h is not None else None
        while block is not None and block.prev is not None:
            block = block.prev
        return block

    def seg_size(self, head: _Block) -> int:
        total, b = 0, head
        while b is not None:
            total, b = total + b.size, b.next
        return total

    def usable(self, b: _Block) -> bool:
        least = self.least.get((b.small, b.stream))
        return least is not None and b.size >= least

    def usable_in(self, head: _Block) -> bool:
        b = head
        while b is not None:
            if not b.allocated and self.usable(b):
                return True
            b = b.next
        return False

    def entering(self, c: int) -> list[tuple[int, int]]:
        return self.entered.get(c, [])

    def window(self, c: int) -> list[int]:
        """Heads of the segments chunk c can touch: a usable free block, or a block it frees."""
        a, heads = self.eng.a, set()
        for pool, least in self.least.items():
            free = a._free.get(pool)
            if not free:
                continue
            for _, addr in free[bisect_left(free, (least, -1)):]:
                b = a._blocks[addr]
                while b.prev is not None:
                    b = b.prev
                heads.add(b.addr)
        for key in self.eng.chunks[c].refs:
            head = self.head_of_id(key)
            if head is not None:
                heads.add(head.addr)
        return sorted(heads)

    def canon(self, c: int) -> tuple[tuple, list[int]]:
        heads = self.window(c)
        return tuple(self.record(addr, c) for addr in heads), heads

    def ident(self, addr: int, c: int) -> tuple:
        made = self.eng.a.seg.get(addr)
        if made is not None and made[0] >= self.s:
            return ("rel", made[0] - c, made[1])
        kind = self.kind.get(addr)
        if kind is None:  # made before the run, usable since its start
            return ("abs", addr, made[2])
        return kind if kind[0] == "abs" else ("ent", kind[1] - c, kind[2])

    def record(self, addr: int, c: int) -> tuple:
        """Segment `addr` relative to chunk c: (identity, small pool, stream, its blocks in address order)."""
        eng = self.eng
        a, ids, sizes, bases = eng.a, eng.ids, eng.sizes, eng.bases
        b = a._blocks.get(addr)
        if b is None:
            b = a._live[eng.handles[ids[addr]]][0]
        small, stream = b.small, b.stream
        blocks = []
        while b is not None:
            if not b.allocated:
                blocks.append((0, b.size))
            else:
                key = ids[b.addr]
                nbytes = sizes[key][0]
                fr = self.freer.get(key)
                if fr is not None:
                    blocks.append((1, b.size, nbytes, fr[0] - c, fr[1]))
                elif key >= self.start_id:
                    owner = bisect_right(bases, key) - 1
                    blocks.append((2, b.size, nbytes, owner - c, key - bases[owner]))
                else:
                    blocks.append((3, b.size, nbytes))
            b = b.next
        return self.ident(addr, c), small, stream, tuple(blocks)

    def target(self, k: int, cur: tuple, e: int) -> int:
        """How far chunks k+1.. repeat chunk k: the first chunk whose entering segments differ from those of
        chunk k+1 (shape, or place among the run's pre-run segments), else the run's end."""
        first = [self.record(addr, k + 1) for addr, _ in self.entering(k + 1)]
        prerun = [rec[0] for rec in cur[0] if rec[0][0] in ("abs", "ent")]
        for m in range(k + 2, e):
            if [self.record(addr, m) for addr, _ in self.entering(m)] != first:
                return m
            places = []
            for ident in prerun:
                if ident[0] == "abs":
                    places.append((ident[1], ident))
                else:
                    segs = self.entering(m + ident[1])
                    if ident[2] >= len(segs):
                        return m
                    places.append((segs[ident[2]][0], ident))
            if [ident for _, ident in sorted(places)] != prerun:
                return m
        return e
