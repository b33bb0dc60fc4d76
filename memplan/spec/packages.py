"""Facts that depend on the installed version of a library the user trains with, read without importing it.

bitsandbytes before 0.43.2 kept the input of every 4-bit linear for backward (`ctx.tensors = (A, B)` in
MatMul4Bit.forward), although only the frozen weight's gradient would need it; PR #1270 ("fix QLoRA mem bug:
delete useless buffered activation", commit 9e753741, first in 0.43.2) keeps `(None, B)`. The estimate follows the
installed version; without bitsandbytes installed (planning on another machine) it assumes the older, larger
behaviour, so that a QLoRA verdict errs on the safe side. MEMPLAN_BITSANDBYTES_VERSION overrides the lookup (for
judging published runs of a known era).
"""

from __future__ import annotations

import os
from functools import cache

BNB_DROPS_4BIT_INPUT = (0, 43, 2)
# torchao's NF4Tensor.convert_to_norm_float_weight compares the weight with the 16 NF4 values in chunks of
# CHUNK_SIZE = 1024**2 elements since PR #196 ("perform in chunks", commit 6081796b, 2024-05-01, first in 0.2.0);
# torchao 0.1 (torchtune's pin in April 2024) made the (numel, 16) comparison for the whole tensor at once
TORCHAO_CHUNKS_NF4 = (0, 2, 0)
NF4_CHUNK_ELEMENTS = 1024**2


def _parse(text: str) -> tuple[int, ...] | None:
    parts = []
    for piece in text.strip().split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts) or None


def _installed(package: str, override: str) -> tuple[int, ...] | None:
    """`package`'s installed version, or the one the environment variable `override` names; None: absent."""
    if text := os.environ.get(override):
        return _parse(text)
    from importlib import metadata

    try:
        return _parse(metadata.version(package))
    except metadata.PackageNotFoundError:
        return None


@cache
def bitsandbytes_version() -> tuple[int, ...] | None:
    return _installed("bitsandbytes", "MEMPLAN_BITSANDBYTES_VERSION")


@cache
def torchao_version() -> tuple[int, ...] | None:
    """The installed torchao's version (MEMPLAN_TORCHAO_VERSION overrides it, as for bitsandbytes)."""
    return _installed("torchao", "MEMPLAN_TORCHAO_VERSION")


def nf4_chunk_elements() -> int | None:
    """The elements torchao's NF4 quantizer compares at once: a chunk, or None (the whole tensor: torchao 0.1, and
    the assumption without torchao installed, the larger case)."""
    version = torchao_version()
    return NF4_CHUNK_ELEMENTS if version is not None and version >= TORCHAO_CHUNKS_NF4 else None


def linear4bit_keeps_input() -> bool:
    """Does bitsandbytes' MatMul4Bit keep its input for backward? (see the module docstring)"""
    version = bitsandbytes_version()
    return version is None or version < BNB_DROPS_4BIT_INPUT
