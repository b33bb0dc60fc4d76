"""Result dataclasses of the estimator: one Breakdown, made of named Terms."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Verdict(str, Enum):
    FITS = "fits"
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
    peak_reserved_bytes: int  # what the CUDA caching allocator holds at the peak
    cuda_context_bytes: int  # CUDA context + cuBLAS workspace, outside the allocator
    phase: str  # forward / backward / optimizer: where the peak happens
    trainable_params: int
    params: int | None = None  # exact mode: the real model's parameters (the spec's count is rough there)
    method: str = "analytic"  # or "exact" (trace)
    by_module: tuple[tuple[str, int], ...] = ()  # exact mode, --by-module: live bytes at the peak by allocator
    host_bytes: int = 0  # CPU memory per node for offloaded states / parameters (ZeRO / FSDP offload)
    note: str = ""  # how it was estimated when that is not the plain analytic path (the exact-mode fallback)

    @property
    def total_bytes(self) -> int:
        """What nvidia-smi would show: reserved + context. A fits verdict compares this with the card."""
        return self.peak_reserved_bytes + self.cuda_context_bytes

    def verdict(self, usable_bytes: int) -> Verdict:
        """The one fits rule: what nvidia-smi would show, within the card's usable bytes."""
        return Verdict.FITS if self.total_bytes <= usable_bytes else Verdict.DOES_NOT_FIT

    def term(self, name: str) -> int:
        return sum(t.bytes for t in self.terms if t.name == name)

    def memory_dict(self) -> dict[str, int]:
        out = {t.name: t.bytes for t in self.terms}
        for key in ("weights", "gradients", "optimizer_states", "activations", "transient"):
            out.setdefault(key, 0)
        out.update(peak_allocated_bytes=self.peak_allocated_bytes, peak_reserved_bytes=self.peak_reserved_bytes,
                   cuda_context_bytes=self.cuda_context_bytes, total_bytes=self.total_bytes,
                   host_bytes=self.host_bytes)
        return out
