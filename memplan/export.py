"""Write a plan for the tools people train with: LLaMA-Factory YAML, HF TrainingArguments keywords, memplan JSON.

Pure functions from (ModelSpec, TrainConfig) to plain dicts; `write_plan` serialises one to a file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from memplan.errors import ConfigError
from memplan.spec.model import ModelSpec
from memplan.spec.train import ALL_LINEAR, Attention, Method, Optimizer, Precision, TrainConfig

FORMATS = ("llamafactory", "hf", "json")

# HF Trainer `optim` names (transformers.training_args.OptimizerNames)
HF_OPTIM = {Optimizer.ADAMW: "adamw_torch", Optimizer.ADAMW_8BIT: "adamw_bnb_8bit",
            Optimizer.PAGED_ADAMW_8BIT: "paged_adamw_8bit", Optimizer.SGD: "sgd",
            Optimizer.SGD_MOMENTUM: "sgd", Optimizer.ADAFACTOR: "adafactor"}
# LLaMA-Factory ModelArguments.flash_attn choices
LF_ATTN = {Attention.AUTO: "auto", Attention.SDPA: "sdpa", Attention.EAGER: "disabled",
           Attention.FLASH_ATTENTION_2: "fa2"}


def hf_training_kwargs(train: TrainConfig, output_dir: str = "output") -> dict[str, Any]:
    """Keyword arguments for transformers.TrainingArguments (validated by building one in the tests)."""
    kw: dict[str, Any] = {
        "output_dir": output_dir,
        "per_device_train_batch_size": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "bf16": train.precision in (Precision.BF16, Precision.PURE_BF16),
        "fp16": train.precision is Precision.FP16,
        "gradient_checkpointing": train.checkpointing,
        "optim": HF_OPTIM[train.optimizer],
    }
    if train.optimizer is Optimizer.SGD_MOMENTUM:
        kw["optim_args"] = "momentum=0.9"
    return kw


def llamafactory_yaml(spec: ModelSpec, train: TrainConfig, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """A LLaMA-Factory training YAML with the plan's knobs; every other key of `base` is kept as it was, in place."""
    plan: dict[str, Any] = dict(
        finetuning_type="full" if train.method is Method.FULL else
        "freeze" if train.method is Method.FREEZE else "lora",
        per_device_train_batch_size=train.batch_size, gradient_accumulation_steps=train.grad_accum,
        cutoff_len=train.seq_len, disable_gradient_checkpointing=not train.checkpointing,
        optim=HF_OPTIM[train.optimizer], flash_attn=LF_ATTN[train.attn])
    if train.optimizer is Optimizer.SGD_MOMENTUM:
        plan["optim_args"] = "momentum=0.9"
    if train.precision is Precision.PURE_BF16:
        plan["pure_bf16"] = True
    elif train.precision in (Precision.BF16, Precision.FP16):
        plan[train.precision.value] = True
    if train.is_lora:
        plan.update(lora_rank=train.lora_rank, lora_alpha=train.alpha, lora_dropout=train.lora_dropout,
                    lora_target="all" if ALL_LINEAR in train.lora_targets else ",".join(train.lora_targets))
    if train.method is Method.QLORA:
        plan["quantization_bit"] = train.quant_bits
    if train.method is Method.FREEZE:
        plan["freeze_trainable_layers"] = train.freeze_trainable_layers
    owned = {"bf16", "fp16", "pure_bf16", "quantization_bit", "lora_rank", "lora_alpha", "lora_dropout",
             "lora_target", "freeze_trainable_layers", *plan}
    out = {"model_name_or_path": spec.config.get("_name_or_path") or spec.name}
    for key, value in (base or {}).items():  # the input's order and its other keys, untouched
        if key not in owned:
            out[key] = value
        elif key in plan:
            out[key] = plan[key]
    out.update((k, v) for k, v in plan.items() if k not in out)
    return out


def plan_json(spec: ModelSpec, train: TrainConfig) -> dict[str, Any]:
    return {"model": spec.name, "model_type": spec.model_type, "config": train.to_dict()}


def write_plan(fmt: str, spec: ModelSpec, train: TrainConfig, path: Path, base: dict[str, Any] | None = None) -> None:
    """Write the plan in `fmt` (llamafactory | hf | json) to `path`; a LLaMA-Factory `base` YAML keeps its keys."""
    if fmt not in FORMATS:
        raise ConfigError(f"--export {fmt!r}: choose one of {'|'.join(FORMATS)}")
    if fmt == "llamafactory":
        import yaml

        text = yaml.safe_dump(llamafactory_yaml(spec, train, base), sort_keys=False)
    else:
        text = json.dumps(hf_training_kwargs(train) if fmt == "hf" else plan_json(spec, train), indent=2) + "\n"
    try:
        path.write_text(text)
    except OSError as err:
        raise ConfigError(f"cannot write {path}: {err.strerror}") from None
