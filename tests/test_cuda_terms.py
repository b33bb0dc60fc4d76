"""Every CUDA-only term memplan models (memplan.predict.cuda.CUDA_TERMS): the README lists each with its source,
and each moves the estimate the way its source says, against the same step on PyTorch's CPU kernels."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from memplan.predict import cuda as cu
from memplan.predict.cuda import CUDA_TERMS, cuda_workspace_requests
from memplan.predict.estimator import estimate
from memplan.spec.train import Method, TrainConfig
from memplan.testing.tiny import tiny_spec

README = Path(__file__).resolve().parents[1] / "README.md"
LORA = TrainConfig(method=Method.LORA, batch_size=2, seq_len=256, lora_dropout=0.0)


def _gap(arch: str, train: TrainConfig) -> int:
    """The step's moments on CUDA minus the same on the CPU kernels, workspaces left out: the lowest."""
    spec = tiny_spec(arch)
    cuda, cpu = dict(estimate(spec, train).moments), dict(estimate(spec, train, device="cpu").moments)
    return min(cuda[k] - sum(cuda_workspace_requests()) - cpu[k] for k in cuda if k != "load")


def test_readme_lists_every_cuda_term_with_its_source():
    text = README.read_text()
    section = text[text.index("### CUDA-only terms"):]
    section = section[:section.index("\n#", 5)]
    rows = [line for line in section.splitlines() if line.startswith("|")][2:]
    table = {cells[0]: cells for cells in ([c.strip() for c in r.strip("|").split("|")] for r in rows)}
    assert set(table) == {t.name for t in CUDA_TERMS}
    for term in CUDA_TERMS:
        assert table[term.name][2] == term.source.replace("|", "/")
        for test in re.findall(r"tests/\w+\.py", term.test):
            assert (README.parent / test).exists(), test


def test_cublas_workspaces_are_the_only_gap_on_a_plain_lora_step():
    """llama, no dropout, AdamW: the CUDA and CPU kernels keep the same tensors; the workspaces are the difference:
    two threads x (32 MiB cuBLAS + 1 MiB cuBLASLt), allocated and kept (CublasHandlePool.cpp)."""
    spec = tiny_spec("llama")
    cuda, cpu = estimate(spec, LORA), estimate(spec, LORA, device="cpu")
    assert cuda.peak_allocated_bytes - cpu.peak_allocated_bytes == cu.CUBLAS_THREADS * (cu.CUBLAS_WORKSPACE_BYTES
                                                                                         + cu.CUBLASLT_WORKSPACE_BYTES)
    assert cuda.term("cuda_workspaces") == sum(cuda_workspace_requests())
    assert sum(t.bytes for t in cuda.terms) == cuda.peak_allocated_bytes
    # reserved: the 32 MiB request is its own segment, the 1 MiB one a 2 MiB small-pool segment
    assert cuda.peak_reserved_bytes - cpu.peak_reserved_bytes >= cuda.peak_allocated_bytes - cpu.peak_allocated_bytes
    assert cuda.total_bytes - cuda.peak_reserved_bytes == cu.CUDA_CONTEXT_BYTES
    load = dict(cuda.phases)["load"]
    assert load == dict(cpu.phases)["load"]  # no matmul has run while loading


def test_dropout_keeps_a_bool_mask_on_cuda_and_noise_on_cpu():
    assert _gap("llama", LORA.with_(lora_dropout=0.1)) < 0  # CPU saves full-width noise per adapted input


def test_sdpa_returns_its_output_in_bshd_on_cuda():
    # phi3's cat rope: the CPU kernel's output then needs a copy, CUDA's does not
    assert _gap("phi3", LORA.with_(method=Method.FULL)) < 0


def test_unequal_head_sizes_take_the_memory_efficient_kernel_on_cuda():
    assert _gap("deepseek_v3", LORA) < 0  # MLA: the CPU math path saves fp32 probabilities


@pytest.mark.integration
def test_the_exact_mode_adds_the_same_workspaces():
    from memplan.trace.exact import exact_estimate

    bd = exact_estimate(tiny_spec("llama"), LORA)
    assert bd.term("cuda_workspaces") == sum(cuda_workspace_requests())
