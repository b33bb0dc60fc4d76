"""Result dataclasses of the estimator: one Breakdown, made of named Terms."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Verdict(str, Enum):
    FITS = "fits"  # the estimate and its band are within the card
    TIGHT = "tight"  # the estimate is, its band is not: published runs like it have exceeded such estimates
    DOES_NOT_FIT = "does not fit"


@dataclass(frozen=True, slots=True, kw_only=True)
class Term:
    name: str  # weights, gradients, optimizer_states, activations, transient, ...
    bytes: int
    explain: str  # the formula or reason behind the number


@dataclass(frozen=True, slots=True, kw_only=True)
class Breakdown:
    """Peak memory of one configuration. `terms` sum to `peak_allocated_bytes` (the reference-step peak of live
    tensor bytes, comparable with torch.cuda.max_memory_allocated)."""

    terms: tuple[Term, ...]
    peak_allocated_bytes: int
    peak_reserved_bytes: int  # max_memory_reserved: what the CUDA caching allocator holds (predict/allocator.py)
    cuda_context_bytes: int  # CUDA context and loaded kernels, outside the allocator (predict/cuda.py)
    phase: str  # forward / backward / optimizer: where the peak happens
    trainable_params: int
    params: int | None = None  # exact mode: the real model's parameters (the spec's count is rough there)
    method: str = "analytic"  # or "exact" (trace)
    by_module: tuple[tuple[str, int], ...] = ()  # exact mode, --by-module: live bytes at the peak by allocator
    host_bytes: int = 0  # CPU memory per node for offloaded states / parameters (ZeRO / FSDP offload)
    note: str = ""  # how it was estimated when that is not the plain analytic path (the exact-mode fallback)
    band: float = 0.0  # how far real peaks have exceeded such estimates (memplan.predict.band)
    phases: tuple[tuple[str, int], ...] = ()  # the run's phases (load, step, eval) and each one's peak allocated
    moments: tuple[tuple[str, int], ...] = ()  # analytic: the step's moments (forward, backward, ...) and bytes
    fragmentation_bytes: int = 0  # exact mode: reserved but unallocated at the reserved peak (its least, while
    # reserved stood there; predict/allocator.py ReplayStats.fragmentation_bytes)
    reserved_explain: str = ""  # how peak_reserved_bytes was obtained

    @property
    def total_bytes(self) -> int:
        """What nvidia-smi would show: reserved + context. A fits verdict compares this with the card."""
        return self.peak_reserved_bytes + self.cuda_context_bytes

    @property
    def upper_bytes(self) -> int:
        """The total with the verdict band on top: what a run like this has reached in published measurements."""
        return int(self.total_bytes * (1 + self.band))

    def verdict(self, usable_bytes: int) -> Verdict:
        """The one fits rule: what nvidia-smi would show, within the card's usable bytes — with its band (fits),
        without it (tight), or not at all."""
        if self.upper_bytes <= usable_bytes:
            return Verdict.FITS
        return Verdict.TIGHT if self.total_bytes <= usable_bytes else Verdict.DOES_NOT_FIT

    def term(self, name: str) -> int:
        return sum(t.bytes for t in self.terms if t.name == name)

    def memory_dict(self) -> dict[str, int]:
        out = {t.name: t.bytes for t in self.terms}
        for key in ("weights", "gradients", "optimizer_states", "activations", "transient"):
            out.setdefault(key, 0)
        out.update(peak_allocated_bytes=self.peak_allocated_bytes, peak_reserved_bytes=self.peak_reserved_bytes,
                   cuda_context_bytes=self.cuda_context_bytes, total_bytes=self.total_bytes,
                   upper_bytes=self.upper_bytes, host_bytes=self.host_bytes,
                   fragmentation_bytes=self.fragmentation_bytes)
        return out
