"""Recognise an out-of-memory failure from a process's exit status and output. Pure; tested on recorded text."""

from __future__ import annotations

from memplan.probe.result import ProbeStatus

# signatures of OOM across PyTorch/CUDA/ROCm versions, the caching allocator, cuBLAS/cuDNN and our simulation
OOM_SIGNATURES = (
    "CUDA out of memory",
    "torch.OutOfMemoryError",
    "torch.cuda.OutOfMemoryError",
    "OutOfMemoryError",
    "HIP out of memory",
    "CUBLAS_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_ALLOC_FAILED",
    "cudaErrorMemoryAllocation",
    "DefaultCPUAllocator: can't allocate memory",
    "memplan: simulated out of memory",
)


def is_oom_text(text: str) -> bool:
    return any(sig in text for sig in OOM_SIGNATURES)


def classify_failure(returncode: int | None, text: str) -> ProbeStatus:
    """ok for exit 0; oom when the output carries an OOM signature; error otherwise."""
    if returncode == 0:
        return ProbeStatus.OK
    if is_oom_text(text):
        return ProbeStatus.OOM
    return ProbeStatus.ERROR
