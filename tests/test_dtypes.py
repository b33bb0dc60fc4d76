"""Parameter dtypes per stack (memplan.spec.dtypes): LLaMA-Factory keeps the checkpoint's dtype for its frozen base
and fp32 LoRA adapters even under pure_bf16; every other stack loads in the flag's compute dtype. The analytic layout
reads the rule (the builder's side is checked against LLaMA-Factory's own CPU peak in test_llamafactory_train)."""

from __future__ import annotations

import dataclasses

import pytest

from memplan.predict.estimator import estimate
from memplan.spec.catalog import resolve_model
from memplan.spec.dtypes import dtype_warning, param_dtypes
from memplan.spec.stacks import Stack
from memplan.spec.train import Method, Precision, TrainConfig

LF = Stack.LLAMAFACTORY
BF16, FP32 = "bfloat16", "float32"


@pytest.mark.parametrize(("precision", "checkpoint", "frozen", "trainable", "autocast"), [
    (Precision.BF16, FP32, FP32, FP32, True),  # (a) an fp32 checkpoint (Gemma-2, OLMo-2) under bf16 autocast
    (Precision.FP32, BF16, BF16, FP32, False),  # (b) no flag: a bf16 base, fp32 trainables, no autocast
    (Precision.PURE_BF16, BF16, BF16, BF16, False),  # (c) pure_bf16: trainables stay bf16 ...
    (Precision.PURE_BF16, FP32, FP32, FP32, False),  # ... the checkpoint's dtype, whatever it is
    (Precision.BF16, None, BF16, FP32, True),  # no dtype in config.json: the flag's compute dtype, as before
    (Precision.FP32, None, FP32, FP32, False),
])
def test_llamafactory_follows_the_checkpoint_dtype(precision, checkpoint, frozen, trainable, autocast) -> None:
    for method in (Method.LORA, Method.FREEZE, Method.FULL):
        dt = param_dtypes(LF, precision, checkpoint, method)
        assert (dt.frozen, dt.trainable, dt.adapters, dt.autocast) == (frozen, trainable, FP32, autocast)


def test_llamafactory_qlora_keeps_the_compute_dtype_but_fp32_adapters() -> None:
    dt = param_dtypes(LF, Precision.PURE_BF16, FP32, Method.QLORA)
    assert (dt.frozen, dt.trainable, dt.adapters, dt.autocast) == (BF16, BF16, FP32, False)


def test_other_stacks_load_in_the_compute_dtype() -> None:
    for stack in set(Stack) - {LF}:
        for precision in Precision:
            dts = {param_dtypes(stack, precision, d, Method.LORA) for d in (None, BF16, FP32)}
            assert len(dts) == 1, (stack, precision)
            (dt,) = dts
            assert dt.frozen == dt.compute and dt.adapters == dt.trainable


def test_the_estimate_reads_the_rule() -> None:
    gemma = resolve_model("gemma-2-2b")  # config.json: float32
    assert gemma.checkpoint_dtype == FP32
    lora = TrainConfig(method=Method.LORA, seq_len=512)
    lf, hf = (estimate(gemma, lora.with_(stack=s)) for s in (LF, Stack.HF))
    assert lf.term("weights") - hf.term("weights") == 2 * (gemma.num_parameters)  # an fp32 base, not bf16
    assert lf.peak_allocated_bytes > hf.peak_allocated_bytes
    llama = resolve_model("llama-3-8b")  # bfloat16
    no_flag, pure = (estimate(llama, lora.with_(stack=LF, precision=p)) for p in (Precision.FP32, Precision.PURE_BF16))
    assert no_flag.peak_allocated_bytes == pure.peak_allocated_bytes  # the same dtypes, no autocast either way
    assert no_flag.peak_allocated_bytes < estimate(llama, lora.with_(precision=Precision.FP32)).peak_allocated_bytes
    unknown = dataclasses.replace(llama, checkpoint_dtype=None)  # as before the rule: an fp32 load without a flag
    assert estimate(unknown, lora.with_(stack=LF, precision=Precision.FP32)).peak_allocated_bytes == \
        estimate(unknown, lora.with_(precision=Precision.FP32)).peak_allocated_bytes


def test_freeze_without_a_flag_over_a_half_checkpoint_is_warned(capsys) -> None:
    from memplan.cli import main

    note = dtype_warning(LF, Precision.FP32, BF16, Method.FREEZE)
    assert note is not None and "dtype mismatch" in note and note.endswith("add bf16: true")
    assert dtype_warning(LF, Precision.BF16, BF16, Method.FREEZE) is None
    assert dtype_warning(LF, Precision.FP32, None, Method.FREEZE) is None  # unknown: nothing new said
    assert dtype_warning(Stack.HF, Precision.FP32, BF16, Method.FREEZE) is None
    assert dtype_warning(LF, Precision.FP32, BF16, Method.LORA) is None
    assert main(["estimate", "--model", "llama-3-8b", "--method", "freeze", "--precision", "fp32", "--stack",
                 "llamafactory"]) == 0
    assert "add bf16: true" in capsys.readouterr().err
