"""Exported plans are accepted by their consumers."""

import json

import pytest
import yaml

from memplan.cli import main
from memplan.errors import ConfigError
from memplan.formats.hf import hf_training_kwargs
from memplan.formats.llamafactory import llamafactory_yaml
from memplan.spec import optimizers
from memplan.spec.catalog import resolve_model
from memplan.spec.stacks import Stack
from memplan.spec.train import Attention, Method, Optimizer, Precision, Sharding, TrainConfig

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
                        grad_accum=1 if optimizers.facts(optimizer).per_param else 4, checkpointing=False)
    # a LLaMA-Factory YAML runs LLaMA-Factory's stack (memplan.spec.stacks); everything else round-trips
    assert config_from_llamafactory(llamafactory_yaml(spec, train)).train == train.with_(stack=Stack.LLAMAFACTORY)
    if not optimizers.facts(optimizer).hf_optim:  # LLaMA-Factory's own (use_adam_mini): no HF name to write
        with pytest.raises(ConfigError, match="LLaMA-Factory's"):
            hf_training_kwargs(train, output_dir=str(tmp_path))
        return
    kw = hf_training_kwargs(train, output_dir=str(tmp_path))
    args = TrainingArguments(**kw, report_to=[])
    assert config_from_args(args, TrainConfig(method=Method.FULL)) == train
    argv = rewrite_flags(["train.py"], TrainConfig(method=Method.FULL), train)
    assert config_from_flags(argv, TrainConfig(method=Method.FULL)) == train


@pytest.mark.parametrize(("extra", "named"), [
    ({"stage": "kto", "fp8": True}, ["fp8=true"]),  # kto and rm are modelled (tests/test_dpo.py, test_reward.py)
    ({"use_badam": True, "use_unsloth": True}, ["use_badam=true", "use_unsloth=true"]),
    ({"resize_vocab": True, "do_train": True, "predict_with_generate": True},
     ["resize_vocab=true", "predict_with_generate=true"]),
    ({"stage": "sft", "use_galore": False, "double_quantization": True}, []),  # values memplan models
    ({"use_reentrant_gc": True, "do_train": True, "do_eval": True}, []),  # the llamafactory stack; the eval phase
])
def test_llamafactory_keys_that_are_not_modelled_are_named(extra, named, tmp_path, capsys):
    """A key that changes memory is modelled or named in one warning line, never silently ignored."""
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump({"model_name_or_path": "llama-2-7b", **extra}))
    assert main(["estimate", "--config", str(path), "--json"]) == 0
    err = capsys.readouterr().err
    assert all(n in err for n in named) and err.count("\n") == (1 if named else 0), err


def test_non_training_configs_and_local_paths(tmp_path, monkeypatch, capsys):
    (tmp_path / "predict.yaml").write_text("model_name_or_path: llama-2-7b\ndo_predict: true\n")
    assert main(["estimate", "--config", str(tmp_path / "predict.yaml")]) == 2
    assert "not a training run" in capsys.readouterr().err
    folder = tmp_path / "Llama-2-7b"  # a local folder named like a catalog model holds a 2-layer config
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(dict(model_type="llama", hidden_size=128, intermediate_size=352,
                                                        num_attention_heads=4, num_hidden_layers=2,
                                                        vocab_size=2048)))
    monkeypatch.chdir(tmp_path)
    assert main(["estimate", "--model", "Llama-2-7b", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["parameters"] < 10**6  # the local one, not 6.74 B


@pytest.mark.parametrize("sharding", list(__import__("memplan").Sharding))
def test_every_sharding_round_trips_through_the_plan_and_deepspeed_json(sharding, tmp_path):
    from memplan import Offload, Parallelism
    from memplan.formats.deepspeed import deepspeed_config, read_deepspeed
    from memplan.formats.plan import plan_json
    from memplan.spec.train import train_from_dict

    spec = resolve_model("llama-2-7b")
    offload = Offload.OPTIMIZER if sharding.is_deepspeed or sharding.is_fsdp2 else Offload.NONE
    train = TrainConfig(method=Method.FULL, parallel=Parallelism(gpus=8, sharding=sharding, offload=offload,
                                                                 ds_reduce_bucket=12345))
    assert train_from_dict(plan_json(spec, train)["config"]) == train.with_(lora_alpha=train.alpha)
    if sharding.is_deepspeed:
        path = tmp_path / "ds.json"
        path.write_text(json.dumps(deepspeed_config(train, spec.hidden_size)))
        back = train.with_(sharding=Sharding.NONE, offload=Offload.NONE, ds_reduce_bucket=None)
        assert back.with_(**read_deepspeed(str(path), tmp_path)) == train
