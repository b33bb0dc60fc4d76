"""The analytic estimate against the exact CPU allocator peak of real training steps (a fast subset of
benchmarks/accuracy.py; the full table is in benchmarks/results/accuracy.md)."""

import statistics

import pytest

from memplan.predict.estimator import estimate
from memplan.spec.train import Attention, Method, Optimizer, Precision, TrainConfig
from memplan.testing.tiny import tiny_spec
from memplan.testing.truth import measure_cpu_peak

# nine real training steps measured on the CPU allocator (about a minute on two cores): with the slow set
pytestmark = pytest.mark.integration

CASES = [
    ("llama", dict(method=Method.FULL, precision=Precision.FP32, checkpointing=False)),
    ("mistral", dict(method=Method.LORA, precision=Precision.BF16, checkpointing=True, batch_size=4)),
    ("qwen2", dict(method=Method.FULL, precision=Precision.BF16, checkpointing=False)),
    ("gemma2", dict(method=Method.LORA, precision=Precision.BF16, checkpointing=False)),
    ("phi3", dict(method=Method.LORA, precision=Precision.PURE_BF16, checkpointing=False)),
    ("llama", dict(method=Method.FREEZE, precision=Precision.BF16, checkpointing=False, optimizer=Optimizer.SGD,
                   grad_accum=2)),
    ("qwen2", dict(method=Method.FULL, precision=Precision.FP32, checkpointing=False, grad_accum=2)),
    ("llama", dict(method=Method.LORA, precision=Precision.FP32, attn=Attention.EAGER, checkpointing=False,
                   lora_dropout=0.1)),
    ("mixtral", dict(method=Method.FREEZE, precision=Precision.BF16, checkpointing=False)),  # fp32 experts
]


@pytest.fixture(scope="module")
def errors():
    out = []
    for arch, kw in CASES:
        cfg = TrainConfig().with_(**{"batch_size": 2, "seq_len": 256, **kw})
        truth = measure_cpu_peak(tiny_spec(arch), cfg)
        assert all(loss == loss for loss in truth.losses)  # finite
        out.append(100 * (estimate(tiny_spec(arch), cfg, device="cpu").peak_allocated_bytes / truth.peak_bytes - 1))
    return out


def test_worst_error_within_5_percent(errors):
    assert max(abs(e) for e in errors) <= 5.0, errors


def test_median_error_within_2_percent(errors):
    assert statistics.median(abs(e) for e in errors) <= 2.0, errors
