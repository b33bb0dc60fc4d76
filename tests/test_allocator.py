"""Each rule of the caching-allocator model on a hand-computed sequence. Sources as in memplan/predict/allocator.py:
[cpp] c10/cuda/CUDACachingAllocator.cpp at pytorch/pytorch 001074d2 (by function), [1.14] the same file at c3023c51
(torch 1.14.0a0, line numbers), [cfg] torch 2.13.0's include/c10/core/AllocatorConfig.h."""

import pytest

from memplan.predict.allocator import (
    ALLOC,
    FREE,
    Allocator,
    AllocatorConfig,
    SimulatedCudaOOM,
    allocation_size,
    replay,
    round_size,
)

MIB = 2**20
KIB = 2**10


def test_round_size_512():
    """[1.14] L1227-1241 round_size: below 512 B -> 512 B; otherwise the next multiple of kMinBlockSize."""
    assert [round_size(n) for n in (1, 511, 512, 513, 1536)] == [512, 512, 512, 1024, 1536]


def test_roundup_power2_divisions():
    """[1.14] L1206-1225 roundup_power2_next_division, L1234-1236: above 512 x divisions bytes, round up to the
    next of `divisions` steps between two powers of two; 1.2e6 B with 4 divisions: 2^20 + 2^18."""
    assert round_size(1_200_000, 4) == 2**20 + 2**18
    assert round_size(2**20, 4) == 2**20  # a power of two stays
    assert round_size(1200, 4) == 1536  # 1200 <= 512 x 4: plain 512-B rounding


def test_allocation_size():
    """[1.14] L1474-1482 get_allocation_size: <= 1 MiB -> 2 MiB segment; < 10 MiB -> 20 MiB; else 2 MiB multiple."""
    assert allocation_size(MIB) == 2 * MIB
    assert allocation_size(MIB + 512) == 20 * MIB
    assert allocation_size(10 * MIB - 512) == 20 * MIB
    assert allocation_size(10 * MIB) == 10 * MIB
    assert allocation_size(10 * MIB + 512) == 12 * MIB


def test_small_pool_packs_2mib_segments():
    """[1.14] L1453-1457 get_pool (<= 1 MiB: small pool), L1466-1467 should_split (small pool: any remainder
    >= 512 B splits): four 500 KiB tensors share one 2 MiB segment, the fifth opens a second one."""
    a = Allocator()
    for _ in range(5):
        a.malloc(500 * KIB)
    assert a.stats.reserved_bytes == 4 * MIB
    assert a.stats.allocated_bytes == 5 * 500 * KIB
    assert a.stats.segments == 2


def test_large_pool_20mib_segments_and_own_segments():
    """[1.14] L1474-1482 get_allocation_size and L1469-1470 should_split (large pool: remainder > 1 MiB splits):
    two 5 MiB tensors share a 20 MiB segment; a 12 MiB tensor gets its own 12 MiB segment."""
    a = Allocator()
    a.malloc(5 * MIB)
    a.malloc(5 * MIB)
    assert a.stats.reserved_bytes == 20 * MIB
    a.malloc(12 * MIB)
    assert a.stats.reserved_bytes == 32 * MIB and a.stats.segments == 2


def test_large_remainder_of_1mib_is_not_split():
    """[1.14] L1469-1470 should_split: a large-pool remainder <= 1 MiB stays in the block, and L949-951 count the
    whole block as allocated: 19.5 MiB -> a 20 MiB segment, memory_allocated 20 MiB."""
    a = Allocator()
    a.malloc(19 * MIB + 512 * KIB)
    assert a.stats.allocated_bytes == 20 * MIB == a.stats.reserved_bytes


def test_best_fit():
    """[1.14] L1484-1510 get_free_block with L232-240 BlockComparator: the smallest cached block >= the request
    (12 MiB, not 14 MiB) for an 11 MiB request; its 1 MiB remainder is not split."""
    a = Allocator()
    x, y = a.malloc(12 * MIB), a.malloc(14 * MIB)
    a.free(x)
    a.free(y)
    a.malloc(11 * MIB)
    assert a.stats.reserved_bytes == 26 * MIB
    assert a.stats.allocated_bytes == 12 * MIB


def test_freed_neighbours_merge():
    """[1.14] L1325-1378 free_block and L1380-1424 try_merge_blocks: two freed 4 MiB blocks merge with the 12 MiB
    remainder back into the 20 MiB block, which then holds an 18 MiB request (split, 2 MiB > 1 MiB left)."""
    a = Allocator()
    x, y = a.malloc(4 * MIB), a.malloc(4 * MIB)
    a.free(x)
    a.free(y)
    a.malloc(18 * MIB)
    assert a.stats.reserved_bytes == 20 * MIB and a.stats.allocated_bytes == 18 * MIB


def test_empty_cache_releases_only_whole_segments():
    """[1.14] L1056-1060 emptyCache -> L1682-1707 release_cached_blocks -> L1741-1751 release_blocks: only
    cached blocks with no prev/next (a whole segment) are cudaFree'd (L1709-1739 release_block)."""
    a = Allocator()
    x, y = a.malloc(4 * MIB), a.malloc(4 * MIB)
    a.free(x)
    a.empty_cache()
    assert a.stats.reserved_bytes == 20 * MIB  # y still splits the segment
    a.free(y)
    a.empty_cache()
    assert a.stats.reserved_bytes == 0 and a.stats.segments == 0
    assert a.stats.peak_reserved_bytes == 20 * MIB  # max_memory_reserved keeps the peak


def test_a_block_is_reused_only_on_its_stream():
    """[1.14] L1497-1498 get_free_block: lower_bound on (stream, size) and `(*it)->stream != p.stream()` -> no
    block: a 12 MiB block freed on stream 0 is not reused on stream 1, and is on stream 0."""
    a = Allocator()
    a.free(a.malloc(12 * MIB, stream=0))
    a.malloc(12 * MIB, stream=1)
    assert a.stats.reserved_bytes == 24 * MIB
    a.malloc(12 * MIB, stream=0)
    assert a.stats.reserved_bytes == 24 * MIB


def test_max_split_size():
    """[1.14] L1499-1505 get_free_block: with max_split_size_mb, an oversize cached block is not given to a
    request below max_split; an oversize request takes one less than max_non_split_rounding ([cfg] L184-189)
    larger, unsplit (L1469 should_split: size < max_split)."""
    cfg = AllocatorConfig(max_split_size_bytes=40 * MIB)
    a = Allocator(cfg)
    a.free(a.malloc(50 * MIB))
    a.malloc(12 * MIB)
    assert a.stats.reserved_bytes == 62 * MIB  # the 50 MiB block is not split for 12 MiB
    big = a.malloc(45 * MIB)  # 50 < 45 + 20: reused whole
    assert a.stats.reserved_bytes == 62 * MIB and a.stats.allocated_bytes == 62 * MIB
    a.free(big)
    tight = Allocator(AllocatorConfig(max_split_size_bytes=40 * MIB, max_non_split_rounding_bytes=4 * MIB))
    tight.free(tight.malloc(50 * MIB))
    tight.malloc(42 * MIB)  # 50 >= 42 + 4: not reused
    assert tight.stats.reserved_bytes == 92 * MIB


def test_release_available_cached_blocks_before_an_oom():
    """[1.14] L782-786 malloc and L1636-1680 release_available_cached_blocks: at the capacity, free oversize
    cached blocks from the largest down until they add up to the request (50 + 45 MiB for 60 MiB), then retry."""
    a = Allocator(AllocatorConfig(max_split_size_bytes=40 * MIB, capacity_bytes=150 * MIB))
    x, y = a.malloc(50 * MIB), a.malloc(45 * MIB)
    a.free(x)
    a.free(y)
    a.malloc(60 * MIB)
    assert a.stats.reserved_bytes == 60 * MIB and a.stats.num_alloc_retries == 0


def test_release_cached_blocks_then_retry():
    """[1.14] L787-789 malloc: when nothing else helps, release_cached_blocks (L1682-1707) frees every whole
    cached segment and alloc_block retries (L1584-1586 counts num_alloc_retries)."""
    a = Allocator(AllocatorConfig(capacity_bytes=24 * MIB))
    a.free(a.malloc(12 * MIB))
    a.malloc(14 * MIB)
    assert a.stats.reserved_bytes == 14 * MIB and a.stats.num_alloc_retries == 1


def test_out_of_memory():
    """[1.14] L800-880 malloc: no block after the retries -> OutOfMemoryError (here SimulatedCudaOOM)."""
    a = Allocator(AllocatorConfig(capacity_bytes=30 * MIB))
    a.malloc(20 * MIB)
    with pytest.raises(SimulatedCudaOOM):
        a.malloc(20 * MIB)


def test_zero_bytes_allocate_nothing():
    """[1.14] L2094 NativeCachingAllocator::allocate: `if (size != 0)` - an empty tensor calls no malloc."""
    a = Allocator()
    a.free(a.malloc(0))
    assert a.stats.peak_reserved_bytes == 0


def test_fragmentation_at_the_reserved_peak():
    """[1.14] L1484-1510 get_free_block: a freed 12 MiB block cannot hold 14 MiB, so a new segment is made
    (L1577-1634 alloc_block): reserved 38 MiB with 26 MiB allocated at that peak."""
    a = Allocator()
    x = a.malloc(12 * MIB)
    a.malloc(12 * MIB)
    a.free(x)
    a.malloc(14 * MIB)
    st = a.stats
    assert (st.peak_reserved_bytes, st.allocated_at_peak_reserved_bytes) == (38 * MIB, 26 * MIB)
    assert st.fragmentation_bytes == 12 * MIB


def test_expandable_segments_grow_by_pages():
    """[cpp] Note [Expandable Segments], try_allocate_expandable_block / map_block: the large pool maps 20 MiB pages
    ([cpp] find_expandable_block: segment_size kLargeBuffer) at the segment's end, the free tail merging with the new
    page; should_split splits any remainder >= 512 B; 5 + 17 MiB -> two pages, 40 MiB."""
    a = Allocator(AllocatorConfig(expandable_segments=True))
    x = a.malloc(5 * MIB)
    assert a.stats.reserved_bytes == 20 * MIB
    y = a.malloc(17 * MIB)  # 15 MiB free tail + a new page = 35 MiB, 17 split off
    assert a.stats.reserved_bytes == 40 * MIB and a.stats.allocated_bytes == 22 * MIB
    a.malloc(18 * MIB)  # the 18 MiB left fits exactly
    assert a.stats.reserved_bytes == 40 * MIB
    a.free(x)
    a.free(y)
    a.empty_cache()  # [cpp] release_blocks -> unmap_block: whole free pages go back, partial ones stay
    assert a.stats.reserved_bytes == 20 * MIB  # [0, 22) MiB free: page 0 unmapped; page 1 holds the 18 MiB


def test_expandable_small_pool_pages():
    """[cpp] find_expandable_block: the small pool's pages are kSmallBuffer (2 MiB): three 1 MiB tensors -> 4 MiB."""
    a = Allocator(AllocatorConfig(expandable_segments=True))
    for _ in range(3):
        a.malloc(MIB)
    assert a.stats.reserved_bytes == 4 * MIB


def test_replay_matches_the_calls():
    """replay() drives the same Allocator: (kind, id, nbytes, stream) events, an id reusable once freed."""
    events = [(ALLOC, 1, 12 * MIB, 0), (ALLOC, 2, 12 * MIB, 0), (FREE, 1, 12 * MIB, 0), (ALLOC, 1, 14 * MIB, 0)]
    st = replay(events)
    assert (st.peak_reserved_bytes, st.fragmentation_bytes, st.peak_requested_bytes) == (38 * MIB, 12 * MIB,
                                                                                         26 * MIB)


def test_fragmentation_is_the_least_unused_at_the_peak():
    """The reserved peak stands until reserved grows again ([1.14] L1619-1623 is the only place it grows); a later
    request served from the cache at that peak (L1484-1510) lowers the fragmentation counted there."""
    a = Allocator()
    x = a.malloc(12 * MIB)
    a.malloc(12 * MIB)
    a.free(x)
    a.malloc(14 * MIB)
    a.malloc(11 * MIB)  # fits the cached 12 MiB block (remainder 1 MiB, not split): 38 MiB allocated at 38 reserved
    assert a.stats.fragmentation_bytes == 0
