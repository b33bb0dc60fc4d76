"""Read a LLaMA-Factory training YAML into (model, TrainConfig); every field memplan does not model is kept.

Defaults are LLaMA-Factory's own (hparams/finetuning_args.py, model_args.py) and HF Seq2SeqTrainingArguments':
finetuning_type lora, lora_rank 8, lora_alpha 2 x rank, lora_target all, cutoff_len 2048, per-device batch 8,
accumulation 1, optim adamw_torch, flash_attn auto, no bf16/fp16 (fp32), checkpointing on.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from memplan.errors import ConfigError
from memplan.spec.train import ALL_LINEAR, Attention, Method, Optimizer, Precision, TrainConfig

# HF `optim` names -> memplan optimizers (transformers.training_args.OptimizerNames)
OPTIM_FROM_HF = {"adamw_torch": Optimizer.ADAMW, "adamw_torch_fused": Optimizer.ADAMW, "adamw_hf": Optimizer.ADAMW,
                 "adamw_torch_xla": Optimizer.ADAMW, "adamw_apex_fused": Optimizer.ADAMW,
                 "adamw_bnb_8bit": Optimizer.ADAMW_8BIT, "adamw_8bit": Optimizer.ADAMW_8BIT,
                 "paged_adamw_8bit": Optimizer.PAGED_ADAMW_8BIT, "sgd": Optimizer.SGD, "adafactor": Optimizer.ADAFACTOR}
ATTN_FROM_LF = {"auto": Attention.AUTO, "sdpa": Attention.SDPA, "disabled": Attention.EAGER, "eager": Attention.EAGER,
                "fa2": Attention.FLASH_ATTENTION_2, "flash_attention_2": Attention.FLASH_ATTENTION_2}


@dataclass(frozen=True, slots=True, kw_only=True)
class LlamaFactoryConfig:
    """What memplan read from the YAML, and the YAML itself (`raw`, every key as written)."""

    model: str  # model_name_or_path
    train: TrainConfig
    raw: dict[str, Any] = field(default_factory=dict)
    output_dir: str | None = None
    deepspeed: str | None = None  # path of a DeepSpeed JSON, kept as written


def _bool(raw: dict[str, Any], key: str, default: bool = False) -> bool:
    value = raw.get(key, default)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    return value


def _method(raw: dict[str, Any]) -> Method:
    kind = str(raw.get("finetuning_type", "lora")).lower()
    bits = raw.get("quantization_bit")
    if kind not in ("full", "freeze", "lora"):
        raise ConfigError(f"finetuning_type {kind!r}: memplan models full, freeze and lora (oft is not modelled)")
    if bits is not None:
        if kind != "lora":
            raise ConfigError(f"quantization_bit with finetuning_type {kind}: memplan models quantized training "
                              "as QLoRA only (finetuning_type: lora)")
        return Method.QLORA
    return Method(kind)


def _precision(raw: dict[str, Any]) -> Precision:
    if _bool(raw, "pure_bf16"):
        return Precision.PURE_BF16
    bf16, fp16 = _bool(raw, "bf16"), _bool(raw, "fp16")
    if bf16 and fp16:
        raise ConfigError("bf16 and fp16 are both true: choose one")
    return Precision.BF16 if bf16 else Precision.FP16 if fp16 else Precision.FP32


def _targets(value: Any) -> tuple[str, ...]:
    names = value if isinstance(value, list) else str(value).split(",")
    names = [str(n).strip() for n in names if str(n).strip()]
    return (ALL_LINEAR,) if names in ([], ["all"]) else tuple(names)


def config_from_llamafactory(raw: dict[str, Any]) -> LlamaFactoryConfig:
    """A parsed YAML mapping -> LlamaFactoryConfig; every problem in the modelled fields is reported at once."""
    problems: list[str] = []
    if not raw.get("model_name_or_path"):
        problems.append("model_name_or_path is missing")
    kw: dict[str, Any] = {}
    for name, fn in (("method", _method), ("precision", _precision)):
        try:
            kw[name] = fn(raw)
        except ConfigError as err:
            problems.extend(err.problems)
    optim = str(raw.get("optim", "adamw_torch"))
    if optim not in OPTIM_FROM_HF:
        problems.append(f"optim {optim!r} is not modelled: use one of {', '.join(OPTIM_FROM_HF)}")
    else:
        kw["optimizer"] = OPTIM_FROM_HF[optim]
        if optim == "sgd" and "momentum" in str(raw.get("optim_args", "")):
            kw["optimizer"] = Optimizer.SGD_MOMENTUM
    attn = str(raw.get("flash_attn", "auto")).lower()
    if attn not in ATTN_FROM_LF:
        problems.append(f"flash_attn {attn!r}: choose one of {', '.join(ATTN_FROM_LF)}")
    else:
        kw["attn"] = ATTN_FROM_LF[attn]
    try:  # LLaMA-Factory enables checkpointing itself unless disabled; HF's gradient_checkpointing is not read
        kw["checkpointing"] = not _bool(raw, "disable_gradient_checkpointing")
    except ConfigError as err:
        problems.extend(err.problems)
    for key, name, default in (("per_device_train_batch_size", "batch_size", 8),
                               ("gradient_accumulation_steps", "grad_accum", 1), ("cutoff_len", "seq_len", 2048),
                               ("lora_rank", "lora_rank", 8),
                               ("freeze_trainable_layers", "freeze_trainable_layers", 2)):
        kw[name] = raw.get(key, default)
    if raw.get("lora_alpha") is not None:
        kw["lora_alpha"] = raw["lora_alpha"]
    kw["lora_dropout"] = float(raw.get("lora_dropout", 0.0) or 0.0)
    kw["lora_targets"] = _targets(raw.get("lora_target", "all"))
    if raw.get("quantization_bit") is not None:
        kw["quant_bits"] = raw["quantization_bit"]
    try:
        train = TrainConfig(**kw) if not problems else None
    except ConfigError as err:
        problems.extend(p.replace("--batch-size", "per_device_train_batch_size")
                        .replace("--grad-accum", "gradient_accumulation_steps").replace("--seq-len", "cutoff_len")
                        for p in err.problems)
        train = None
    if problems or train is None:
        raise ConfigError(problems)
    return LlamaFactoryConfig(model=str(raw["model_name_or_path"]), train=train, raw=dict(raw),
                              output_dir=raw.get("output_dir"), deepspeed=raw.get("deepspeed"))


def deepspeed_sharding(ds_path: str, relative_to: Path) -> dict[str, Any]:
    """A DeepSpeed JSON -> TrainConfig fields: zero_optimization.stage, its offload_optimizer / offload_param
    devices and reduce_bucket_size. The path is tried as written, then beside the YAML; a missing file is a
    ConfigError."""
    import json

    from memplan.spec.parallel import DS_REDUCE_BUCKET, Offload, Sharding

    candidates = [Path(ds_path), relative_to / ds_path]
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        raise ConfigError(f"deepspeed {ds_path}: no such file (looked beside the YAML too)")
    try:
        zero = json.loads(found.read_text()).get("zero_optimization", {})
    except (json.JSONDecodeError, AttributeError):
        raise ConfigError(f"deepspeed {ds_path}: not a DeepSpeed JSON config") from None
    stage = int(zero.get("stage", 0))
    out: dict[str, Any] = {"sharding": Sharding.NONE if stage == 0 else Sharding(f"zero{stage}")}
    bucket = zero.get("reduce_bucket_size", DS_REDUCE_BUCKET)  # absent: DeepSpeed's default; auto: HF fills it
    if bucket != "auto":
        try:
            out["ds_reduce_bucket"] = int(float(bucket))
        except (TypeError, ValueError):
            raise ConfigError(f"deepspeed {ds_path}: zero_optimization.reduce_bucket_size must be a number or auto, "
                              f"got {bucket!r}") from None
    if str(zero.get("offload_param", {}).get("device", "none")) in ("cpu", "nvme"):
        out["offload"] = Offload.PARAMS
    elif str(zero.get("offload_optimizer", {}).get("device", "none")) in ("cpu", "nvme"):
        out["offload"] = Offload.OPTIMIZER
    return out


def read_llamafactory(path: str | Path) -> LlamaFactoryConfig:
    """Read a LLaMA-Factory training YAML; a missing file or malformed YAML is a ConfigError (one line)."""
    import yaml

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as err:
        raise ConfigError(f"--config {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"--config {path}: malformed YAML{where}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {path}: expected a mapping of LLaMA-Factory arguments")
    try:
        lf = config_from_llamafactory(raw)
        if lf.deepspeed:  # the ZeRO stage and offload come from the DeepSpeed JSON the YAML names
            lf = replace(lf, train=lf.train.with_(**deepspeed_sharding(str(lf.deepspeed), path.parent)))
        return lf
    except ConfigError as err:
        raise ConfigError([f"--config {path}: {p}" for p in err.problems]) from None
