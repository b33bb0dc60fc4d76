"""CUDA-only terms: the caching allocator's reserved memory over the live bytes, the cuBLAS workspaces, the context.

`CUDA_TERMS` lists every difference between a step on PyTorch's CUDA kernels and the CPU trace that memplan models,
with the source each follows and the test that checks it (README "CUDA-only terms" is this table, tests/
test_cuda_terms.py keeps the two equal).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass

from memplan.predict.allocator import allocation_size
from memplan.predict.breakdown import Breakdown, Term
from memplan.predict.layout import Layout
from memplan.predict.reserve import load_reserved, reserved_overhead
from memplan.predict.weights import ModelStates, model_states
from memplan.spec.stacks import stack_facts
from memplan.spec.train import Method

MIB = 1024**2
# inside `reserved_lower_bound()`: reserved is taken at its lower bound, the live peak, without the replay
_LOWER_BOUND: ContextVar[bool] = ContextVar("memplan_reserved_lower_bound", default=False)
CUDA_CONTEXT_BYTES = 500 * MIB  # CUDA context and loaded kernels: not yet calibrated on a GPU, see README 'Limits'

# cuBLAS workspaces (aten/src/ATen/cuda/CublasHandlePool.cpp, pytorch@26a39059: parseChosenWorkspaceSize,
# parseCUDABlasLtWorkspaceSize, setWorkspaceForHandle, getCUDABlasLtWorkspace): one workspace per (handle, stream),
# allocated through the caching allocator (getNewWorkspace: CUDACachingAllocator::get()->allocate) and kept in a
# map for the process's life, so it counts in memory_allocated. CUBLAS_WORKSPACE_CONFIG's default is ":4096:8"
# (32 MiB) on sm90 and ":4096:2:16:8" (8 MiB + 128 KiB) elsewhere; cuBLASLt's own is CUBLASLT_WORKSPACE_SIZE,
# 1024 KiB by default (separate unless TORCH_CUBLASLT_UNIFIED_WORKSPACE=1). Handles come from a per-thread pool
# window (getCurrentCUDABlasHandle: thread_local PoolWindow), and autograd runs CUDA backward ops on its own device
# thread: the forward's thread and the backward's thread each hold a handle, so two of each workspace. The
# estimate does not know the card's generation, so it takes sm90's size (at most 48 MiB over on other GPUs).
CUBLAS_WORKSPACE_BYTES = 4096 * 8 * 1024  # sm90 default; 4096 * 1024 * 2 + 16 * 1024 * 8 on other architectures
CUBLASLT_WORKSPACE_BYTES = 1024 * 1024
CUBLAS_THREADS = 2  # the Python thread running forward, autograd's CUDA device thread running backward


def cuda_workspace_requests() -> tuple[int, ...]:
    """The workspace allocations a training step makes through the caching allocator, one per request."""
    return (CUBLAS_WORKSPACE_BYTES, CUBLASLT_WORKSPACE_BYTES) * CUBLAS_THREADS


@dataclass(frozen=True, slots=True, kw_only=True)
class CudaTerm:
    """One way a step on CUDA keeps other bytes than the CPU trace, and where memplan follows it."""

    name: str
    what: str
    source: str  # the file (and function) of the stack whose behaviour it follows
    modelled: str  # where memplan applies it
    test: str  # the test that checks it


CUDA_TERMS: tuple[CudaTerm, ...] = (
    CudaTerm(name="caching allocator (reserved)",
             what="reserved = the allocator's segments over the live bytes: 512 B rounding, 2 MiB small / 20 MiB "
                  "large segments, best fit, splitting, max_split_size, expandable segments",
             source="c10/cuda/CUDACachingAllocator.cpp", modelled="predict/allocator.py, predict/reserve.py",
             test="tests/test_allocator.py, tests/test_reserved.py"),
    CudaTerm(name="cuBLAS / cuBLASLt workspaces",
             what="per (handle, stream), two threads: 2 x (32 MiB + 1 MiB) allocated at the first matmul, kept",
             source="aten/src/ATen/cuda/CublasHandlePool.cpp (parseChosenWorkspaceSize, setWorkspaceForHandle)",
             modelled="predict/cuda.py with_cuda_terms", test="tests/test_cuda_terms.py"),
    CudaTerm(name="CUDA context",
             what="500 MiB outside the allocator (nvidia-smi only); 1343 MiB on a V100 in HF's docs (eager "
                  "module loading): not calibrated per GPU generation",
             source="HF perf_train_gpu_one docs (the only measured anchor)", modelled="predict/cuda.py",
             test="tests/test_cuda_terms.py"),
    CudaTerm(name="sdpa output layout",
             what="CUDA's flash / memory-efficient kernels return (B, S, H, D): transformers' transpose(1, 2)"
                  ".contiguous() is free; the CPU kernel follows the query's layout (a copy after a cat rope)",
             source="aten/src/ATen/native/transformers/attention.cpp, cuda/attention.cu",
             modelled="predict/activations.py attention", test="tests/test_cuda_terms.py"),
    CudaTerm(name="sdpa saved tensors",
             what="q, k, v, out and an fp32 logsumexp (B, H, S); heads of unequal q/v size (MLA) take the "
                  "memory-efficient kernel (the CPU falls back to the math path: fp32 probabilities)",
             source="aten/src/ATen/native/transformers/cuda/attention_backward.cu, sdp_utils.cpp",
             modelled="predict/activations.py attention, mla_attention", test="tests/test_cuda_terms.py"),
    CudaTerm(name="dropout mask",
             what="native_dropout keeps a bool (1 B) mask on CUDA; the CPU kernel saves a full-width noise tensor",
             source="aten/src/ATen/native/cuda/Dropout.cu (fused_dropout), native/Dropout.cpp",
             modelled="predict/activations.py linear (LoRA dropout)", test="tests/test_cuda_terms.py"),
    CudaTerm(name="8-bit optimizer kernel",
             what="bitsandbytes' fused CUDA kernel updates in place; its CPU path makes six fp32 copies of the "
                  "largest tensor (counted for device=cpu only)",
             source="bitsandbytes/optim/optimizer.py, backends/cpu", modelled="predict/weights.py",
             test="tests/test_stacks.py"),
)


def with_cuda_terms(bd: Breakdown) -> Breakdown:
    """`bd` (a step estimated on the device's kernels) with the cuBLAS workspaces: allocated once the first matmul
    runs and never freed, so in every moment but loading; each request its own block (32 MiB: its own segment;
    1 MiB: a small-pool 2 MiB segment at the most)."""
    requests = cuda_workspace_requests()
    added = sum(requests)
    bump = tuple((k, v + (added if k != "load" else 0)) for k, v in bd.moments)
    phases = tuple((k, v + (added if k != "load" else 0)) for k, v in bd.phases)
    peak = max((v for _, v in bump), default=bd.peak_allocated_bytes + added)
    peak = max(peak, bd.peak_allocated_bytes)  # a loading peak stays what it was
    extra = peak - bd.peak_allocated_bytes
    if not extra:
        return dataclasses.replace(bd, moments=bump, phases=phases)
    segments = sum(allocation_size(n) for n in requests)
    terms = bd.terms + (Term(name="cuda_workspaces", bytes=extra,
                             explain=f"cuBLAS + cuBLASLt workspaces, {CUBLAS_THREADS} threads (forward, autograd's "
                                     "backward): CublasHandlePool.cpp, sm90 sizes"),)
    return dataclasses.replace(bd, terms=terms, peak_allocated_bytes=peak, moments=bump, phases=phases,
                               peak_reserved_bytes=max(bd.peak_reserved_bytes + segments, peak))


@contextlib.contextmanager
def reserved_lower_bound() -> Iterator[None]:
    """Estimates made inside take reserved at its lower bound, the live peak (the allocator never reserves less than
    it hands out), skipping the allocator replays (~0.03-0.1 s each at a 7B model's full depth). Every total is then at
    most the full estimate's, so a candidate over the card here is over it in full: fit screens with this."""
    token = _LOWER_BOUND.set(True)
    try:
        yield
    finally:
        _LOWER_BOUND.reset(token)


def cuda_overheads(peak_allocated: int, lay: Layout, st: ModelStates) -> tuple[int, int]:
    """(peak reserved bytes, context bytes). Reserved = the live peak + the allocator's overhead on the step's
    sketched allocation sequence at the model's full depth (predict/reserve.py: every decoder layer's tape program,
    the LM head and loss, the optimizer step, replayed by predict/allocator.py). A line through one- and two-layer
    sketches missed by up to -15 %: the overhead is not linear in depth (benchmarks/results/allocator_catalog.md).
    `st` is one rank's model states (sharding scales each parameter's, gradient's and state's request)."""
    if _LOWER_BOUND.get():
        return peak_allocated, CUDA_CONTEXT_BYTES
    unsharded = model_states(lay).weights_bytes
    scale = st.weights_bytes / unsharded if unsharded else 1.0
    reserved = peak_allocated + max(reserved_overhead(lay, st, scale), 0)  # never less than it hands out
    if stack_facts(lay.train.stack).device_init and lay.train.method is Method.QLORA:
        reserved = max(reserved, load_reserved(lay, st, scale))  # the cache keeps what the load reserved
    return reserved, CUDA_CONTEXT_BYTES
