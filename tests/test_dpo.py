"""DPO (LLaMA-Factory stage: dpo): chosen + rejected pairs, the no-grad reference forward, the reference model of a
full / freeze run; read from YAMLs, and checked against the CPU truth of LLaMA-Factory's DPO step."""

from __future__ import annotations

import pytest
import yaml

from memplan.formats.llamafactory import read_llamafactory
from memplan.predict.estimator import estimate
from memplan.spec.catalog import resolve_model
from memplan.spec.train import Method, Precision, Stage, TrainConfig
from memplan.testing.tiny import tiny_spec


def test_dpo_costs_pairs_a_reference_forward_and_a_reference_model() -> None:
    spec = resolve_model("llama-3-8b")
    sft = estimate(spec, TrainConfig(seq_len=1024))
    dpo = estimate(spec, TrainConfig(seq_len=1024, stage=Stage.DPO))
    assert dpo.peak_allocated_bytes > sft.peak_allocated_bytes
    assert "reference forward" in dict(dpo.moments)
    free = estimate(spec, TrainConfig(seq_len=1024, stage=Stage.DPO, dpo_reference=False))
    assert "reference forward" not in dict(free.moments) and free.peak_allocated_bytes < dpo.peak_allocated_bytes
    full = estimate(spec, TrainConfig(method=Method.FULL, seq_len=1024, stage=Stage.DPO))
    assert full.term("reference_model") == spec.num_parameters * 2 + spec.head_dim // 2 * 4  # frozen bf16 copy
    assert estimate(spec, TrainConfig(seq_len=1024, stage=Stage.DPO)).term("reference_model") == 0  # LoRA


def test_dpo_keys_are_read(tmp_path) -> None:
    base = {"model_name_or_path": "meta-llama/Meta-Llama-3-8B", "do_train": True, "finetuning_type": "lora"}
    cases = (({"stage": "dpo"}, Stage.DPO, True), ({"stage": "dpo", "pref_loss": "simpo"}, Stage.DPO, False),
             ({"stage": "sft"}, Stage.SFT, True))
    for extra, stage, ref in cases:
        (tmp_path / "c.yaml").write_text(yaml.safe_dump({**base, **extra}))
        train = read_llamafactory(tmp_path / "c.yaml").train
        assert (train.stage, train.dpo_reference) == (stage, ref), extra


@pytest.mark.integration
@pytest.mark.parametrize("knobs", [dict(method=Method.LORA), dict(method=Method.LORA, checkpointing=False),
                                   dict(method=Method.FULL, checkpointing=False)],
                         ids=["lora", "lora-nockpt", "full-nockpt"])
def test_dpo_within_one_percent_of_its_cpu_truth(knobs: dict) -> None:
    from memplan.testing.truth import measure_cpu_peak

    spec = tiny_spec("llama")
    train = TrainConfig(stage=Stage.DPO, batch_size=1, seq_len=256, precision=Precision.BF16, **knobs)
    truth = measure_cpu_peak(spec, train)
    predicted = estimate(spec, train, device="cpu").peak_allocated_bytes
    assert abs(predicted - truth.peak_bytes) / truth.peak_bytes < 0.01, (predicted, truth.peak_bytes)


@pytest.mark.integration
def test_reference_free_dpo_within_two_percent() -> None:
    """orpo / simpo (no reference forward): measured -1.4 % — the policy-only pair step's backward through
    log_softmax + gather is not modelled term by term yet (the cross-entropy backward stands in for it)."""
    from memplan.testing.truth import measure_cpu_peak

    spec = tiny_spec("llama")
    train = TrainConfig(stage=Stage.DPO, dpo_reference=False, batch_size=1, seq_len=256, precision=Precision.BF16)
    truth = measure_cpu_peak(spec, train)
    predicted = estimate(spec, train, device="cpu").peak_allocated_bytes
    assert abs(predicted - truth.peak_bytes) / truth.peak_bytes < 0.02, (predicted, truth.peak_bytes)


# ---- KTO (stage: kto): the target rows, a no-grad KL batch, the reference's forwards of both -------------------
def test_kto_is_read_and_costs_more_than_sft(tmp_path) -> None:
    cfg = {"model_name_or_path": "Qwen/Qwen3-4B-Instruct-2507", "stage": "kto", "do_train": True,
           "finetuning_type": "lora", "per_device_train_batch_size": 2, "cutoff_len": 1024}
    (tmp_path / "kto.yaml").write_text(yaml.safe_dump(cfg))
    lfc = read_llamafactory(tmp_path / "kto.yaml")
    assert lfc.train.stage is Stage.KTO and not lfc.not_modelled, lfc.not_modelled
    spec = resolve_model("qwen3-4b-instruct-2507")
    kto = estimate(spec, lfc.train)
    sft = estimate(spec, lfc.train.with_(stage=Stage.SFT))
    assert kto.peak_allocated_bytes > sft.peak_allocated_bytes and "KTO" in kto.note
    moments = dict(kto.moments)
    assert moments["reference forward"] > moments["kl forward"] > moments["forward"]
    full = estimate(spec, lfc.train.with_(method=Method.FULL))
    assert full.term("reference_model") > 0  # KTO always has a reference: a full run loads a frozen copy


def test_kto_equals_the_exact_trace() -> None:
    from memplan.trace.exact import exact_estimate

    spec = tiny_spec("qwen2")
    for batch in (1, 2):  # one row: the logits' slice is contiguous, no copy before log_softmax
        train = TrainConfig(stage=Stage.KTO, batch_size=batch, seq_len=256)
        analytic = estimate(spec, train, device="cpu").peak_allocated_bytes
        exact = exact_estimate(spec, train, device="cpu").peak_allocated_bytes
        assert abs(analytic - exact) / exact < 0.01, (batch, analytic, exact)


@pytest.mark.integration
@pytest.mark.parametrize("knobs", [dict(method=Method.LORA), dict(method=Method.FULL, checkpointing=False,
                                                                   batch_size=2)], ids=["lora", "full-nockpt"])
def test_kto_within_one_percent_of_its_cpu_truth(knobs: dict) -> None:
    from memplan.testing.truth import measure_cpu_peak

    spec = tiny_spec("llama")
    train = TrainConfig(**(dict(stage=Stage.KTO, batch_size=1, seq_len=256, precision=Precision.BF16) | knobs))
    truth = measure_cpu_peak(spec, train)
    predicted = estimate(spec, train, device="cpu").peak_allocated_bytes
    assert abs(predicted - truth.peak_bytes) / truth.peak_bytes < 0.01, (predicted, truth.peak_bytes)


def test_dpo_equals_the_exact_trace() -> None:
    """The softmax kernels' copy of the non-contiguous logits slice is made explicit in the step (build/step.py
    _log_softmax), so the fake trace sees it: without it the exact mode read one (2B, S, V) fp32 copy low."""
    from memplan.trace.exact import exact_estimate

    spec = tiny_spec("qwen2")
    train = TrainConfig(stage=Stage.DPO, batch_size=1, seq_len=256)
    analytic = estimate(spec, train, device="cpu").peak_allocated_bytes
    exact = exact_estimate(spec, train, device="cpu").peak_allocated_bytes
    assert abs(analytic - exact) / exact < 0.01, (analytic, exact)


def test_oft_preference_stages_load_a_reference_model() -> None:
    """LLaMA-Factory's create_ref_model loads a second, frozen model unless finetuning_type is lora: OFT (and QOFT,
    quantized the same way) gets one; LoRA disables its adapters instead."""
    from memplan.spec.train import Adapter

    spec = resolve_model("llama-3-8b")
    for stage in (Stage.DPO, Stage.KTO):
        oft = TrainConfig(stage=stage, adapter=Adapter.OFT, oft_block_size=32, oft_rank=0, seq_len=1024)
        assert estimate(spec, oft).term("reference_model") == spec.num_parameters * 2 + spec.head_dim // 2 * 4
        qoft = oft.with_(method=Method.QLORA)
        assert 0 < estimate(spec, qoft).term("reference_model") < spec.num_parameters  # 4-bit: under 1 B/param
        assert estimate(spec, oft.with_(adapter=Adapter.LORA, oft_block_size=0)).term("reference_model") == 0


@pytest.mark.integration
def test_oft_dpo_within_one_percent_of_its_cpu_truth() -> None:
    from memplan.spec.train import Adapter
    from memplan.testing.truth import measure_cpu_peak

    spec = tiny_spec("llama")
    train = TrainConfig(stage=Stage.DPO, adapter=Adapter.OFT, oft_block_size=32, oft_rank=0, batch_size=1,
                        seq_len=256, precision=Precision.BF16)
    truth = measure_cpu_peak(spec, train)
    predicted = estimate(spec, train, device="cpu").peak_allocated_bytes
    assert abs(predicted - truth.peak_bytes) / truth.peak_bytes < 0.01, (predicted, truth.peak_bytes)
