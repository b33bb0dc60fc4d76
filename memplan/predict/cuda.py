"""CUDA-only terms: caching-allocator reserve over allocated, and the context + cuBLAS workspace."""

from __future__ import annotations

from memplan.predict.layout import Layout

MIB = 1024**2


def cuda_overheads(peak_allocated: int, lay: Layout) -> tuple[int, int]:
    """(peak reserved bytes, context bytes). Placeholder calibration, see README 'memory model'."""
    del lay
    reserved = int(peak_allocated * 1.05) + 2 * 20 * MIB
    return reserved, 500 * MIB
