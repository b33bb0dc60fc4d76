"""The reward stage (LLaMA-Factory stage: rm): chosen + rejected pairs through trl's value head, the LM loss made in
forward and dropped; read from YAMLs, equal to the exact trace, and checked against the CPU truth of the step."""

from __future__ import annotations

import pytest
import yaml

from memplan.formats.llamafactory import read_llamafactory
from memplan.predict.estimator import estimate
from memplan.spec.catalog import resolve_model
from memplan.spec.train import Method, Precision, Stage, TrainConfig
from memplan.testing.tiny import tiny_spec


def test_rm_is_read_and_not_warned(tmp_path) -> None:
    cfg = {"model_name_or_path": "Qwen/Qwen3-4B-Instruct-2507", "stage": "rm", "do_train": True,
           "finetuning_type": "lora", "per_device_train_batch_size": 1, "cutoff_len": 2048}
    (tmp_path / "rm.yaml").write_text(yaml.safe_dump(cfg))
    plan = read_llamafactory(tmp_path / "rm.yaml")
    assert plan.train.stage is Stage.RM
    assert not plan.not_modelled, plan.not_modelled


def test_rm_runs_pairs_but_no_vocabulary_backward() -> None:
    """Twice the rows of SFT, but the backward starts at the value head: below SFT at twice the batch, whose
    cross-entropy backward holds (B, S, V) fp32 gradients, and above SFT at the micro-batch."""
    spec = resolve_model("qwen3-4b-instruct-2507")  # 151,936-token vocabulary
    train = TrainConfig(stage=Stage.RM, batch_size=2, seq_len=2048)
    rm = estimate(spec, train)
    sft = estimate(spec, train.with_(stage=Stage.SFT))
    pairs = estimate(spec, train.with_(stage=Stage.SFT, batch_size=4))
    assert sft.peak_allocated_bytes < rm.peak_allocated_bytes < pairs.peak_allocated_bytes
    moments = dict(rm.moments)
    assert moments["backward"] < dict(pairs.moments)["backward"]
    assert "value head" in rm.note


def test_full_rm_makes_no_states_for_an_untied_head() -> None:
    spec = resolve_model("llama-2-7b")
    train = TrainConfig(stage=Stage.RM, method=Method.FULL, precision=Precision.PURE_BF16, seq_len=512)
    rm, sft = estimate(spec, train), estimate(spec, train.with_(stage=Stage.SFT, batch_size=2))
    head = spec.vocab_size * spec.hidden_size
    # AdamW: two bf16 states of the head never made, nor its bf16 gradient
    assert dict(sft.moments)["optimizer"] - dict(rm.moments)["optimizer"] >= 3 * 2 * head
    assert "over-estimate" not in rm.note
    assert "over-estimate" in estimate(spec, train.with_(optimizer="adafactor")).note


@pytest.mark.parametrize("knobs", [dict(), dict(checkpointing=False, method=Method.FULL)], ids=["lora", "full"])
def test_rm_equals_the_exact_trace(knobs: dict) -> None:
    from memplan.trace.exact import exact_estimate

    spec = tiny_spec("qwen2")
    train = TrainConfig(stage=Stage.RM, batch_size=2, seq_len=256, **knobs)
    analytic = estimate(spec, train, device="cpu").peak_allocated_bytes
    exact = exact_estimate(spec, train, device="cpu").peak_allocated_bytes
    assert abs(analytic - exact) / exact < 0.01, (analytic, exact)


@pytest.mark.integration
@pytest.mark.parametrize("knobs", [dict(method=Method.LORA), dict(method=Method.FULL, checkpointing=False),
                                   dict(method=Method.FREEZE, precision=Precision.PURE_BF16)],
                         ids=["lora", "full-nockpt", "freeze-pure-bf16"])
def test_rm_within_one_percent_of_its_cpu_truth(knobs: dict) -> None:
    from memplan.testing.truth import measure_cpu_peak

    spec = tiny_spec("llama")
    kw = dict(stage=Stage.RM, batch_size=1, seq_len=256, precision=Precision.BF16) | knobs
    train = TrainConfig(**kw)
    truth = measure_cpu_peak(spec, train)
    predicted = estimate(spec, train, device="cpu").peak_allocated_bytes
    assert abs(predicted - truth.peak_bytes) / truth.peak_bytes < 0.01, (predicted, truth.peak_bytes)
