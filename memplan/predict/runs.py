"""The analytic sketch's allocation program in chunks, and its replay through the caching-allocator rules of
predict/allocator.py, written for speed (the sketch of a 7B model is ~15,000 requests, replayed once per
candidate a fit estimates in full).

A program is a list of Chunks: one per decoder layer in each phase of the step (load, optimizer states, forward,
backward, the step's copies), flat stretches between; reserve.py writes a layer's requests once per tape program
and copies them. replay_chunks applies the same rules as allocator.Allocator under the default AllocatorConfig
(no capacity: nothing is ever released, so the reserved peak is the reserved bytes at the end) - best fit by
(size, address) in the request's pool and stream, 2 MiB / 20 MiB / rounded segments, splitting, merging with free
neighbours - with the pools as sorted lists of integer keys and each tensor's block found by its id; the bytes
equal Allocator's to the byte (tests/test_runs.py).

Tried and left: skipping decoder layers whose allocator transition repeats (the state before two consecutive
chunks written relative to the chunk, the state after the skipped ones built directly). Exact, but on the
catalog's sketches the state never repeats from one layer to the next: the small pool's 2 MiB segments fill over
several layers, kept activations split cached blocks with a period over one layer, and the forward's large-pool
window of reusable segments grows (7B LoRA b2 s2048: 6 -> 12 segments; backward 11 -> 24). See the git history
of this file.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from dataclasses import dataclass

from memplan.predict.allocator import LARGE_BUFFER, MIN_BLOCK, MIN_LARGE_ALLOC, ROUND_LARGE, SMALL_BUFFER, SMALL_SIZE

ALLOC_OP, FREE_LOCAL, FREE_REF = 0, 1, 2  # (op, nbytes, stream) | (op, local alloc index, 0) | (op, ref index, 0)
_ADDR = 1 << 48  # a pool key is size x 2^48 + address: one int orders as allocator.py's (size, address) pairs


@dataclass(frozen=True, slots=True)
class Chunk:
    """A stretch of the program: its operations; the id of its first allocation (the rest numbered on from
    there) and how many it makes; the earlier chunks' ids it frees (FREE_REF's index); one decoder layer's or
    not."""

    ops: tuple[tuple[int, int, int], ...]
    base: int
    allocs: int
    refs: tuple[int, ...]
    layer: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class Peaks:
    peak_reserved_bytes: int  # max_memory_reserved()
    peak_requested_bytes: int  # the peak of the bytes asked for: the live-bytes peak


class _B:
    """A block ([cpp] struct Block): a range of one segment, free or allocated."""

    __slots__ = ("addr", "size", "pool", "used", "prev", "next")

    def __init__(self, addr: int, size: int, pool: list[int], prev: _B | None, nxt: _B | None) -> None:
        self.addr, self.size, self.pool, self.used = addr, size, pool, True
        self.prev, self.next = prev, nxt


def replay_chunks(chunks: list[Chunk], sizes: list[tuple[int, int]]) -> Peaks:
    """Replay the program (`sizes`: each id's (bytes, stream)) under the default AllocatorConfig. The rules and
    their sources are allocator.Allocator's: malloc (round_size, get_pool, get_free_block, alloc_block with
    get_allocation_size, should_split, the split) and free (free_block, try_merge_blocks)."""
    held: list[_B | None] = [None] * len(sizes)  # each live id's block
    pools: dict[int, list[int]] = {}  # pool (stream x 2 + small) -> sorted keys of its free blocks (a block
    # holds its pool's list)
    free_at: dict[int, _B] = {}  # a free block's key -> the block
    reserved = requested = peak_requested = 0
    next_addr = 1 << 20
    for c in chunks:
        base, refs = c.base, c.refs
        made = base
        for op, x, y in c.ops:
            if op == ALLOC_OP:
                key_id, made = made, made + 1
                if not x:  # a 0-byte tensor calls no malloc
                    continue
                size = MIN_BLOCK if x < MIN_BLOCK else -(-x // MIN_BLOCK) * MIN_BLOCK  # round_size
                small = size <= SMALL_SIZE
                free = pools.get(y * 2 + small)
                if free is None:
                    free = pools[y * 2 + small] = []
                block = None
                i = bisect_left(free, size * _ADDR)  # the smallest free block >= size, lowest address first
                if i < len(free):
                    block = free_at.pop(free.pop(i))
                else:  # a new segment (cudaMalloc)
                    seg = SMALL_BUFFER if small else LARGE_BUFFER if size < MIN_LARGE_ALLOC else \
                        -(-size // ROUND_LARGE) * ROUND_LARGE
                    block = _B(next_addr, seg, free, None, None)
                    next_addr += seg + ROUND_LARGE  # segments never touch
                    reserved += seg
                rest = block.size - size
                if rest >= MIN_BLOCK if small else rest > SMALL_SIZE:  # should_split: the front is handed out
                    front = _B(block.addr, size, free, block.prev, block)
                    if block.prev is not None:
                        block.prev.next = front
                    block.prev = front
                    block.addr += size
                    block.size = rest
                    block.used = False
                    k = rest * _ADDR + block.addr
                    insort(free, k)
                    free_at[k] = block
                    block = front
                else:
                    block.used = True
                held[key_id] = block
                requested += x
                if requested > peak_requested:
                    peak_requested = requested
            else:
                key_id = base + x if op == FREE_LOCAL else refs[x]
                block = held[key_id]
                if block is None:
                    continue  # a 0-byte tensor
                held[key_id] = None
                requested -= sizes[key_id][0]
                block.used = False
                free = block.pool
                prev, nxt = block.prev, block.next
                if prev is not None and not prev.used:  # try_merge_blocks with the free neighbour before
                    k = prev.size * _ADDR + prev.addr
                    del free[bisect_left(free, k)]
                    del free_at[k]
                    block.addr, block.size, block.prev = prev.addr, prev.size + block.size, prev.prev
                    if block.prev is not None:
                        block.prev.next = block
                if nxt is not None and not nxt.used:  # and after
                    k = nxt.size * _ADDR + nxt.addr
                    del free[bisect_left(free, k)]
                    del free_at[k]
                    block.size += nxt.size
                    block.next = nxt.next
                    if block.next is not None:
                        block.next.prev = block
                k = block.size * _ADDR + block.addr
                insort(free, k)
                free_at[k] = block
    return Peaks(peak_reserved_bytes=reserved, peak_requested_bytes=peak_requested)
