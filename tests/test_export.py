"""Exported plans are accepted by their consumers."""

import json

import pytest
import yaml

from memplan.cli import main
from memplan.formats.hf import hf_training_kwargs
from memplan.formats.llamafactory import llamafactory_yaml
from memplan.spec.catalog import resolve_model
from memplan.spec.train import Attention, Method, Optimizer, Precision, TrainConfig

# keys of LLaMA-Factory's argument dataclasses (ModelArguments, FinetuningArguments, DataArguments and the
# Seq2SeqTrainingArguments it extends) that memplan writes
LF_KEYS = {"model_name_or_path", "finetuning_type", "per_device_train_batch_size", "gradient_accumulation_steps",
           "cutoff_len", "disable_gradient_checkpointing", "optim", "flash_attn", "bf16", "fp16", "pure_bf16",
           "lora_rank", "lora_alpha", "lora_dropout", "lora_target", "quantization_bit", "freeze_trainable_layers",
           "optim_args"}
CONFIGS = [TrainConfig(),
           TrainConfig(method=Method.FULL, precision=Precision.PURE_BF16, optimizer=Optimizer.SGD_MOMENTUM),
           TrainConfig(method=Method.QLORA, quant_bits=8, lora_targets=("q_proj", "v_proj"), attn=Attention.SDPA),
           TrainConfig(method=Method.FREEZE, precision=Precision.FP16, optimizer=Optimizer.ADAFACTOR, batch_size=4,
                       grad_accum=2, checkpointing=False)]


@pytest.mark.parametrize("train", CONFIGS)
def test_hf_kwargs_build_training_arguments(train, tmp_path):
    from transformers import TrainingArguments

    kw = hf_training_kwargs(train, output_dir=str(tmp_path))
    if kw["bf16"] or kw["fp16"]:  # a CPU machine cannot validate mixed precision flags: check them, then drop them
        assert kw["bf16"] == (train.precision in (Precision.BF16, Precision.PURE_BF16))
        kw = {**kw, "bf16": False, "fp16": False}
    args = TrainingArguments(**kw, report_to=[])
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps == train.effective_batch
    assert args.gradient_checkpointing == train.checkpointing


@pytest.mark.parametrize("train", CONFIGS)
def test_llamafactory_yaml_uses_known_keys_and_keeps_the_rest(train):
    base = {"dataset": "alpaca_en_demo", "template": "llama3", "learning_rate": 1e-4, "lora_rank": 999}
    out = llamafactory_yaml(resolve_model("llama-3-8b"), train, base)
    assert set(out) - set(base) <= LF_KEYS
    assert out["dataset"] == "alpaca_en_demo" and out["learning_rate"] == 1e-4  # nothing lost
    assert out["per_device_train_batch_size"] * out["gradient_accumulation_steps"] == train.effective_batch
    assert ("lora_rank" in out) == train.is_lora


def test_fit_exports_the_recommended_plan(tmp_path, capsys):
    path = tmp_path / "plan.yaml"
    assert main(["fit", "--model", "llama-2-7b", "--gpu", "24GB", "--export", "llamafactory", "-o", str(path)]) == 0
    plan = yaml.safe_load(path.read_text())
    assert plan["finetuning_type"] == "lora" and plan["cutoff_len"] == 2048
    assert plan["per_device_train_batch_size"] * plan["gradient_accumulation_steps"] == 16
    plan_json = str(tmp_path / "p.json")
    assert main(["fit", "--model", "llama-2-7b", "--gpu", "24GB", "--export", "json", "-o", plan_json]) == 0
    assert json.loads((tmp_path / "p.json").read_text())["config"]["method"] == "lora"
    assert main(["fit", "--model", "llama-2-7b", "--gpu", "24GB", "--export", "xml", "-o", str(path)]) == 2
    assert main(["fit", "--model", "llama-2-7b", "--gpu", "24GB", "--export", "hf"]) == 2


@pytest.mark.parametrize("optimizer", list(Optimizer))
def test_every_optimizer_round_trips_through_each_format(optimizer, tmp_path):
    """Write -> read gives the same knobs for every optimizer in the table: LLaMA-Factory YAML, HF flags and a
    live TrainingArguments (whose `optim` the in-process retune used to ignore)."""
    from transformers import TrainingArguments

    from memplan.formats.hf import config_from_args, config_from_flags, rewrite_flags
    from memplan.formats.llamafactory import config_from_llamafactory

    spec = resolve_model("llama-3-8b")
    train = TrainConfig(method=Method.FULL, precision=Precision.FP32, optimizer=optimizer, batch_size=2,
                        grad_accum=4, checkpointing=False)
    assert config_from_llamafactory(llamafactory_yaml(spec, train)).train == train
    kw = hf_training_kwargs(train, output_dir=str(tmp_path))
    args = TrainingArguments(**kw, report_to=[])
    assert config_from_args(args, TrainConfig(method=Method.FULL)) == train
    argv = rewrite_flags(["train.py"], TrainConfig(method=Method.FULL), train)
    assert config_from_flags(argv, TrainConfig(method=Method.FULL)) == train
