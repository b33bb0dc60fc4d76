"""A model of PyTorch's CUDA caching allocator, in pure Python: replay an ordered list of tensor allocations and
frees and read what `torch.cuda.memory_reserved()` / `max_memory_reserved()` would say.

Sources (every rule below names its function; "L<n>" is the line in [1.14] where the rule reads the same):
  [cpp]  c10/cuda/CUDACachingAllocator.cpp, pytorch/pytorch at commit 001074d2 (the newest copy stored in the
         search library; read function by function, its own line numbers were not available)
  [1.14] the same file at commit c3023c51 (torch 1.14.0a0, a full copy with line numbers) - the base rules
         (rounding, pools, splitting, merging, release) are unchanged between the two
  [cfg]  torch 2.13.0 wheel, include/c10/core/AllocatorConfig.h (the constants and the PYTORCH_CUDA_ALLOC_CONF
         options of the installed torch)
What is not modelled: CUDA graphs' private pools, recordStream's cross-stream events, garbage_collection_threshold,
the CUDA context and cuBLAS workspace (outside the allocator).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass

from memplan.errors import MemplanError

# [cfg] L17-25 ([1.14] L97-106)
MIN_BLOCK = 512  # kMinBlockSize: every request is rounded to a multiple of 512 B
SMALL_SIZE = 1024**2  # kSmallSize: requests up to 1 MiB go to the small pool
SMALL_BUFFER = 2 * 1024**2  # kSmallBuffer: the small pool's segments are 2 MiB
LARGE_BUFFER = 20 * 1024**2  # kLargeBuffer: 1-10 MiB requests share 20 MiB segments ([cfg] L340)
MIN_LARGE_ALLOC = 10 * 1024**2  # kMinLargeAlloc
ROUND_LARGE = 2 * 1024**2  # kRoundLarge: larger requests get their own segment, rounded to 2 MiB
ALLOC, FREE = "alloc", "free"  # the kinds of a replayed event


class SimulatedCudaOOM(MemplanError):
    """The simulated device ran out of memory even after releasing every cached block."""


@dataclass(frozen=True, slots=True, kw_only=True)
class AllocatorConfig:
    """The PYTORCH_CUDA_ALLOC_CONF options that change reserved memory, with torch's defaults ([cfg] L338-353)."""

    max_split_size_bytes: int | None = None  # max_split_size_mb (default unlimited)
    max_non_split_rounding_bytes: int = LARGE_BUFFER  # max_non_split_rounding_mb (default 20 MiB, [cfg] L184-189)
    roundup_power2_divisions: int = 0  # roundup_power2_divisions, one value for every size (0: off)
    expandable_segments: bool = False  # expandable_segments:True
    capacity_bytes: int | None = None  # the device's memory (None: unlimited, never OOM)


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplayStats:
    """What torch.cuda.memory_stats() would report. Bytes are block sizes (rounded), as torch counts them."""

    allocated_bytes: int  # memory_allocated() now
    reserved_bytes: int  # memory_reserved() now
    peak_allocated_bytes: int  # max_memory_allocated()
    peak_reserved_bytes: int  # max_memory_reserved()
    allocated_at_peak_reserved_bytes: int  # the most allocated while reserved stood at its peak
    peak_requested_bytes: int  # the peak of the bytes asked for (unrounded): the live-bytes peak
    segments: int  # cudaMalloc'd segments held now (expandable segments: 0)
    num_alloc_retries: int  # mallocs that had to release cached blocks and retry

    @property
    def fragmentation_bytes(self) -> int:
        """Reserved but not allocated at the reserved peak (its least, while reserved stood there): rounding, split
        remainders, cached blocks no request fitted."""
        return self.peak_reserved_bytes - self.allocated_at_peak_reserved_bytes


class _Block:
    """A range of a segment ([cpp] struct Block): free or allocated; mapped unless in an expandable segment."""

    __slots__ = ("addr", "size", "stream", "small", "allocated", "mapped", "expandable", "prev", "next")

    def __init__(self, addr: int, size: int, stream: int, small: bool, expandable: bool = False) -> None:
        self.addr, self.size, self.stream, self.small = addr, size, stream, small
        self.allocated, self.mapped, self.expandable = False, True, expandable
        self.prev: _Block | None = None
        self.next: _Block | None = None


class Allocator:
    """One device's caching allocator ([cpp] class DeviceCachingAllocator). malloc returns a handle for free."""

    def __init__(self, config: AllocatorConfig | None = None) -> None:
        self.config = config or AllocatorConfig()
        self._max_split = self.config.max_split_size_bytes or 2**63
        # free blocks per (small pool, stream), sorted by (size, address): [1.14] L232-240 BlockComparator orders
        # the pool by stream, then size, then address, so lower_bound finds the best fit on the stream
        self._free: dict[tuple[bool, int], list[tuple[int, int]]] = {}
        self._unmapped: dict[tuple[bool, int], list[tuple[int, int]]] = {}  # expandable: by address
        self._blocks: dict[int, _Block] = {}  # free or unmapped blocks by address
        self._live: dict[int, tuple[_Block | None, int]] = {}  # handle -> (block, requested bytes)
        self._next_addr = 1 << 20
        self._handles = 0
        self.allocated = self.reserved = self.requested = self.segments = self.retries = 0
        self.peak_allocated = self.peak_reserved = self.allocated_at_peak = self.peak_requested = 0

    # ---- the public calls ---------------------------------------------------------------------------------
    def malloc(self, nbytes: int, stream: int = 0) -> int:
        """[cpp] DeviceCachingAllocator::malloc ([1.14] L737-803 and the split at L888-931)."""
        self._handles += 1
        if nbytes == 0:  # [1.14] L2094 NativeCachingAllocator::allocate: a 0-byte tensor calls no malloc
            self._live[self._handles] = (None, 0)
            return self._handles
        size = round_size(nbytes, self.config.roundup_power2_divisions)
        small = size <= SMALL_SIZE  # [1.14] L1453 get_pool
        block = self._get_free_block(small, stream, size)
        if block is None:  # [1.14] L782-789: cudaMalloc; else free oversize cached blocks, retry; else free all
            alloc_size = allocation_size(size)
            block = self._alloc_block(small, stream, size, alloc_size)
            if block is None and self._release_available_cached_blocks(small, stream, size):
                block = self._alloc_block(small, stream, size, alloc_size)
            if block is None:
                self._release_cached_blocks()
                self.retries += 1  # [1.14] L1584-1586 num_alloc_retries
                block = self._alloc_block(small, stream, size, alloc_size)
            if block is None:
                raise SimulatedCudaOOM(f"simulated CUDA out of memory: tried to allocate {alloc_size} B with "
                                       f"{self.reserved} B reserved of {self.config.capacity_bytes} B")
        if self._should_split(block, size):
            block = self._split(block, size)
        block.allocated = True
        allocated = self.allocated = self.allocated + block.size  # [1.14] L949-951 allocated_bytes counts the
        requested = self.requested = self.requested + nbytes  # block's (rounded) size
        if allocated > self.peak_allocated:  # (comparisons, not max(): this is the replay's hot path)
            self.peak_allocated = allocated
        if requested > self.peak_requested:
            self.peak_requested = requested
        if self.reserved > self.peak_reserved:  # reserved only grows inside malloc: its peak is seen here
            self.peak_reserved, self.allocated_at_peak = self.reserved, allocated
        elif self.reserved == self.peak_reserved and allocated > self.allocated_at_peak:  # still at the peak:
            self.allocated_at_peak = allocated  # the most of it in use
        self._live[self._handles] = (block, nbytes)
        return self._handles

    def free(self, handle: int) -> None:
        """[cpp] DeviceCachingAllocator::free ([1.14] L968-1017): the block goes back to its pool, merged."""
        block, nbytes = self._live.pop(handle)
        if block is None:
            return
        block.allocated = False
        self.allocated -= block.size
        self.requested -= nbytes
        self._free_block(block)

    def empty_cache(self) -> None:
        """torch.cuda.empty_cache ([cpp] emptyCache -> release_cached_blocks, [1.14] L1056-1060)."""
        self._release_cached_blocks()

    @property
    def stats(self) -> ReplayStats:
        return ReplayStats(allocated_bytes=self.allocated, reserved_bytes=self.reserved,
                           peak_allocated_bytes=self.peak_allocated, peak_reserved_bytes=self.peak_reserved,
                           allocated_at_peak_reserved_bytes=self.allocated_at_peak,
                           peak_requested_bytes=self.peak_requested, segments=self.segments,
                           num_alloc_retries=self.retries)

    # ---- finding and making blocks --------------------------------------------------------------------------
    def _get_free_block(self, small: bool, stream: int, size: int) -> _Block | None:
        """[cpp] get_free_block ([1.14] L1484-1510): the smallest free block >= size on this stream and pool."""
        free = self._free.get((small, stream))
        if not free:
            return None
        i = bisect.bisect_left(free, (size, -1))
        if i == len(free):
            return None
        if self.config.expandable_segments:  # [cpp] get_free_block: a block followed by unmapped space counts as
            def grow(j: int) -> int:  # the size it can expand to; walk on while the next one expands less
                b = self._blocks[free[j][1]]
                return b.size + (b.next.size if b.next is not None and not b.next.mapped else 0)
            while i + 1 < len(free) and grow(i + 1) < grow(i):
                i += 1
        block = self._blocks[free[i][1]]
        if size < self._max_split <= block.size:  # do not hand an oversize block to a request that could split
            return None
        # an oversize request may take a bigger oversize block, by less than max_non_split_rounding ([cfg] L184-189;
        # [cpp] and [1.14] L1503-1505 hard-code kLargeBuffer, its default)
        if size >= self._max_split and block.size >= size + self.config.max_non_split_rounding_bytes:
            return None
        self._remove_free(block)
        return block

    def _alloc_block(self, small: bool, stream: int, size: int, alloc_size: int) -> _Block | None:
        """[cpp] alloc_block ([1.14] L1577-1634): a new segment of alloc_size (cudaMalloc), or None when it would
        pass the capacity (as cudaMalloc's failure, or set_fraction's limit at [1.14] L1588-1591)."""
        if self.config.expandable_segments:
            return self._try_allocate_expandable_block(small, stream, size)
        if self.config.capacity_bytes is not None and self.reserved + alloc_size > self.config.capacity_bytes:
            return None
        block = _Block(self._next_addr, alloc_size, stream, small)
        self._next_addr += alloc_size + ROUND_LARGE  # segments never touch: no merging across segments
        self.reserved += alloc_size  # [1.14] L1619-1623 reserved_bytes grows by the segment
        self.segments += 1
        return block

    def _should_split(self, block: _Block, size: int) -> bool:
        """[cpp] should_split ([1.14] L1464-1472): the small pool (and every expandable segment) splits off any
        remainder >= 512 B; the large pool only a remainder > 1 MiB, and never a block of an oversize request."""
        remaining = block.size - size
        if block.small or self.config.expandable_segments:
            return remaining >= MIN_BLOCK
        return size < self._max_split and remaining > SMALL_SIZE

    def _split(self, block: _Block, size: int) -> _Block:
        """[1.14] L888-906 (alloc_found_block in [cpp]): the front `size` bytes are handed out, the rest stays
        free in the pool."""
        front = _Block(block.addr, size, block.stream, block.small, block.expandable)
        front.prev, front.next = block.prev, block
        if block.prev is not None:
            block.prev.next = front
        block.prev = front
        block.addr += size
        block.size -= size
        self._insert_free(block)
        return front

    def _free_block(self, block: _Block) -> None:
        """[cpp] free_block ([1.14] L1325-1378): merge with a free neighbour on either side, back into the pool."""
        for neighbour in (block.prev, block.next):
            self._try_merge(block, neighbour)
        self._insert_free(block)

    def _try_merge(self, dst: _Block, src: _Block | None) -> None:
        """[cpp] try_merge_blocks ([1.14] L1380-1424): neighbours of one segment, both free (and both mapped or
        both unmapped, [cpp]) become one block."""
        if src is None or src.allocated or src.mapped != dst.mapped:
            return
        self._remove_free(src) if src.mapped else self._remove_unmapped(src)
        if src is dst.prev:
            dst.addr, dst.prev = src.addr, src.prev
            if dst.prev is not None:
                dst.prev.next = dst
        else:
            dst.next = src.next
            if dst.next is not None:
                dst.next.prev = dst
        dst.size += src.size

    # ---- releasing cached memory (empty_cache, and before an OOM) ------------------------------------------
    def _release_available_cached_blocks(self, small: bool, stream: int, size: int) -> bool:
        """[cpp] release_available_cached_blocks ([1.14] L1636-1680): with max_split_size set, free the smallest
        oversize cached block >= max(size, max_split), else oversize blocks from the largest down until enough."""
        if self.config.max_split_size_bytes is None:
            return False
        key = max(size, self._max_split)
        free = self._free.get((small, stream), [])
        i = bisect.bisect_left(free, (key, -1))
        if i < len(free):
            self._release_block(self._blocks[free[i][1]])
            return True
        released = 0
        for _, addr in reversed(list(free)):
            block = self._blocks[addr]
            if released >= key or block.size < self._max_split:
                break
            released += block.size
            self._release_block(block)
        return released >= key

    def _release_cached_blocks(self) -> None:
        """[cpp] release_cached_blocks / release_blocks ([1.14] L1682-1751): every cached block that is a whole
        segment (not split) is cudaFree'd, large pool first; [cpp] expandable segments unmap their free pages."""
        for small in (False, True):
            for (pool_small, _), free in list(self._free.items()):
                if pool_small != small:
                    continue
                for _, addr in list(free):
                    block = self._blocks[addr]
                    if block.expandable:
                        self._unmap(block)
                    elif block.prev is None and block.next is None:
                        self._release_block(block)

    def _release_block(self, block: _Block) -> None:
        """[cpp] release_block ([1.14] L1709-1739): cudaFree; reserved shrinks by the segment."""
        self._remove_free(block)
        self.reserved -= block.size
        self.segments -= 1

    # ---- expandable segments ([cpp] Note [Expandable Segments], find_expandable_block, map_block, unmap_block) -
    def _page(self, small: bool) -> int:
        return SMALL_BUFFER if small else LARGE_BUFFER  # [cpp] find_expandable_block: segment_size per pool

    def _try_allocate_expandable_block(self, small: bool, stream: int, size: int) -> _Block | None:
        """[cpp] try_allocate_expandable_block: map pages at the lowest address with room (a free block followed
        by unmapped space, or unmapped space alone) until the block holds `size`."""
        block = self._find_expandable_block(small, stream, size)
        if not block.mapped and not self._map(block, min(block.size, size)):
            return None
        while block.size < size:
            nxt = block.next
            assert nxt is not None and not nxt.mapped
            if not self._map(nxt, min(size - block.size, nxt.size)):
                return None
            block = nxt  # map_block merged the free block before it into `nxt`
        self._remove_free(block)
        return block

    def _find_expandable_block(self, small: bool, stream: int, size: int) -> _Block:
        """[cpp] find_expandable_block: the lowest-address unmapped range (with the free block before it) that
        has `size` bytes of free address space; else a new segment of address space on this stream."""
        def room(b: _Block | None) -> int:
            total = 0
            while total < size and b is not None and not b.allocated:
                total, b = total + b.size, b.next
            return total
        for addr, _ in self._unmapped.get((small, stream), []):
            c = self._blocks[addr]
            if c.prev is not None and not c.prev.allocated:
                c = c.prev
            if room(c) >= size:
                return c
        space = self.config.capacity_bytes or 2**40  # [cpp]: address space for 1 1/8 of the GPU's memory
        space = -(-(space + space // 8) // LARGE_BUFFER) * LARGE_BUFFER
        base = -(-self._next_addr // LARGE_BUFFER) * LARGE_BUFFER  # pages are counted from the segment's start
        block = _Block(base, space, stream, small, expandable=True)
        block.mapped = False
        self._next_addr = base + space + LARGE_BUFFER
        self._insert_unmapped(block)
        return block

    def _map(self, block: _Block, nbytes: int) -> bool:
        """[cpp] map_block: back the first pages of an unmapped block with memory (whole pages), merge the mapped
        part with free neighbours; reserved grows by the pages mapped."""
        page = self._page(block.small)
        mapped = min(-(-nbytes // page) * page, block.size)
        if self.config.capacity_bytes is not None and self.reserved + mapped > self.config.capacity_bytes:
            return False
        self._remove_unmapped(block)
        if mapped < block.size:
            rest = _Block(block.addr + mapped, block.size - mapped, block.stream, block.small, expandable=True)
            rest.mapped = False
            rest.prev, rest.next = block, block.next
            if block.next is not None:
                block.next.prev = rest
            block.next = rest
            block.size = mapped
            self._insert_unmapped(rest)
        block.mapped = True
        self._try_merge(block, block.prev)
        self._try_merge(block, block.next)
        self._insert_free(block)
        self.reserved += mapped
        return True

    def _unmap(self, block: _Block) -> None:
        """[cpp] unmap_block: give back the whole pages inside a free block; its partial pages stay mapped."""
        page = self._page(block.small)
        begin = -(-block.addr // page) * page
        end = (block.addr + block.size) // page * page
        if end <= begin:
            return
        self._remove_free(block)
        for lo, hi in ((block.addr, begin), (end, block.addr + block.size)):
            if hi > lo:  # the partial pages at either end: free mapped blocks
                part = _Block(lo, hi - lo, block.stream, block.small, expandable=True)
                if lo < begin:
                    part.prev, part.next = block.prev, block
                    if block.prev is not None:
                        block.prev.next = part
                    block.prev = part
                else:
                    part.prev, part.next = block, block.next
                    if block.next is not None:
                        block.next.prev = part
                    block.next = part
                self._insert_free(part)
        block.addr, block.size, block.mapped = begin, end - begin, False
        self._try_merge(block, block.prev)
        self._try_merge(block, block.next)
        self._insert_unmapped(block)
        self.reserved -= end - begin

    # ---- the sorted pools ------------------------------------------------------------------------------------
    def _insert_free(self, block: _Block) -> None:
        bisect.insort(self._free.setdefault((block.small, block.stream), []), (block.size, block.addr))
        self._blocks[block.addr] = block

    def _remove_free(self, block: _Block) -> None:
        free = self._free[(block.small, block.stream)]
        del free[bisect.bisect_left(free, (block.size, block.addr))]
        del self._blocks[block.addr]

    def _insert_unmapped(self, block: _Block) -> None:
        bisect.insort(self._unmapped.setdefault((block.small, block.stream), []), (block.addr, block.size))
        self._blocks[block.addr] = block

    def _remove_unmapped(self, block: _Block) -> None:
        unmapped = self._unmapped[(block.small, block.stream)]
        del unmapped[bisect.bisect_left(unmapped, (block.addr, block.size))]
        del self._blocks[block.addr]


def round_size(nbytes: int, divisions: int = 0) -> int:
    """[cpp] round_size ([1.14] L1227-1241): at least 512 B, a multiple of 512 B; with roundup_power2_divisions
    above 512 x divisions bytes, up to the next of `divisions` equal steps between two powers of two."""
    if nbytes < MIN_BLOCK:
        return MIN_BLOCK
    if divisions > 1 and nbytes > MIN_BLOCK * divisions:
        return _roundup_power2_next_division(nbytes, divisions)
    return -(-nbytes // MIN_BLOCK) * MIN_BLOCK


def _roundup_power2_next_division(size: int, divisions: int) -> int:
    """[cpp] roundup_power2_next_division ([1.14] L1206-1225): 1200 B in 4 divisions -> 1280 B."""
    if size & (size - 1) == 0:
        return size
    floor = 1 << (size.bit_length() - 1)
    step = floor >> (divisions.bit_length() - 1)  # floor >> log2(divisions)
    if step == 0:
        return floor << 1
    low = size & ~(step - 1)
    return size if low == size else low + step


def allocation_size(size: int) -> int:
    """[cpp] get_allocation_size ([1.14] L1474-1482): the segment cudaMalloc'd for a request nothing cached fits."""
    if size <= SMALL_SIZE:
        return SMALL_BUFFER
    if size < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return -(-size // ROUND_LARGE) * ROUND_LARGE


def replay(events: Iterable[tuple[str, int, int, int]], config: AllocatorConfig | None = None) -> ReplayStats:
    """Replay ordered (kind, id, nbytes, stream) events - kind ALLOC or FREE, `id` naming the tensor's storage
    (reusable once freed) - through one Allocator; the stats at the end (peaks over the whole sequence)."""
    alloc = Allocator(config)
    handles: dict[int, int] = {}
    for kind, key, nbytes, stream in events:
        if kind == ALLOC:
            handles[key] = alloc.malloc(nbytes, stream)
        else:
            alloc.free(handles.pop(key))
    return alloc.stats
