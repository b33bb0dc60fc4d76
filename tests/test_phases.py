"""The run's phases (load, step, eval): each estimated, the run's peak named by the phase that sets it; evaluation
read from LLaMA-Factory YAMLs and HF arguments, and checked against a real HF Trainer.evaluate() on CPU."""

from __future__ import annotations

import json

import pytest
import yaml

from memplan.formats.hf import config_from_flags
from memplan.formats.llamafactory import read_llamafactory
from memplan.predict.estimator import estimate
from memplan.spec.catalog import resolve_model
from memplan.spec.train import Method, Precision, TrainConfig
from memplan.testing.tiny import tiny_spec


def test_phases_are_reported_and_eval_can_set_the_peak() -> None:
    spec = resolve_model("llama-3-8b")  # a 128k vocabulary: (8, 2048, 128256) eval logits dwarf the LoRA step
    plain = estimate(spec, TrainConfig())
    assert [name for name, _ in plain.phases] == ["load", "step"]
    assert plain.phase not in ("load", "eval") and dict(plain.phases)["step"] == plain.peak_allocated_bytes
    with_eval = estimate(spec, TrainConfig(eval_batch_size=8))
    phases = dict(with_eval.phases)
    assert with_eval.phase == "eval" and phases["eval"] == with_eval.peak_allocated_bytes > phases["step"]
    # the eval peak: states alive, three (B, S, V) tensors at the loss (bf16 logits, fp32 upcast, fp32 log-probs)
    assert phases["eval"] - phases["step"] > 8 * 2048 * spec.vocab_size * (2 + 4 + 4) * 0.8
    assert sum(t.bytes for t in with_eval.terms) == with_eval.peak_allocated_bytes
    assert estimate(spec, TrainConfig(eval_batch_size=1)).phase != "eval"  # batch 1 evaluates under the step


def test_load_phase_is_the_weights_and_one_tensor_in_flight() -> None:
    spec = resolve_model("llama-2-7b")
    vocab = spec.vocab_size * spec.hidden_size  # the hf stack upcasts the embedding and head of a k-bit model
    bd = estimate(spec, TrainConfig(method=Method.QLORA))
    assert dict(bd.phases)["load"] == bd.term("weights") + 2 * vocab
    lora = estimate(spec, TrainConfig(method=Method.LORA))  # loaded straight into bf16: nothing converted
    assert dict(lora.phases)["load"] == lora.term("weights")


def test_eval_keys_are_read(tmp_path) -> None:
    base = {"model_name_or_path": "meta-llama/Meta-Llama-3-8B", "stage": "sft", "do_train": True,
            "finetuning_type": "lora"}
    cases = [({}, 0), ({"val_size": 0.1}, 0), ({"val_size": 0.1, "eval_strategy": "steps"}, 8),
             ({"val_size": 0.1, "eval_strategy": "steps", "per_device_eval_batch_size": 2}, 2),
             ({"do_eval": True, "per_device_eval_batch_size": 4}, 4)]
    for extra, expected in cases:
        (tmp_path / "c.yaml").write_text(yaml.safe_dump({**base, **extra}))
        assert read_llamafactory(tmp_path / "c.yaml").train.eval_batch_size == expected, extra
    assert config_from_flags(["--eval_strategy", "steps"], TrainConfig()).eval_batch_size == 8
    assert config_from_flags(["--do_eval", "--per_device_eval_batch_size", "3"], TrainConfig()).eval_batch_size == 3
    assert config_from_flags([], TrainConfig(eval_batch_size=5)).eval_batch_size == 0


def test_cli_eval_batch_size(capsys) -> None:
    from memplan.cli import main

    assert main(["estimate", "--model", "llama-3-8b", "--eval-batch-size", "8", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["peak_phase"] == "eval" and set(data["phases"]) == {"load", "step", "eval"}
    assert main(["estimate", "--model", "llama-3-8b", "--eval-batch-size", "-1"]) == 2
    assert "--eval-batch-size" in capsys.readouterr().err


@pytest.mark.integration
@pytest.mark.parametrize("method", [Method.LORA, Method.FULL, Method.QLORA])
def test_eval_phase_within_one_percent_of_a_real_trainer_evaluate(method: Method) -> None:
    if method is Method.QLORA:
        pytest.importorskip("bitsandbytes")
    from memplan.testing.truth import measure_trainer_eval_peak

    spec = tiny_spec("llama")
    train = TrainConfig(method=method, precision=Precision.BF16, batch_size=1, seq_len=256, eval_batch_size=4,
                        checkpointing=method is not Method.FULL)
    measured, _ = measure_trainer_eval_peak(spec, train)
    predicted = dict(estimate(spec, train, device="cpu").phases)["eval"]
    assert abs(predicted - measured) / measured < 0.01, (predicted, measured)
