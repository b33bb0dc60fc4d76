"""CUDA-only terms: caching-allocator reserve over allocated, and the context + cuBLAS workspace."""

from __future__ import annotations

MIB = 1024**2


def cuda_overheads(peak_allocated: int) -> tuple[int, int]:
    """(peak reserved bytes, context bytes): not yet calibrated on a GPU, see README 'Limits'."""
    reserved = int(peak_allocated * 1.05) + 2 * 20 * MIB
    return reserved, 500 * MIB
