"""DeepSpeed JSON: read the ZeRO stage, offload and reduce_bucket_size a config names; write the config HF Trainer
would hand DeepSpeed (its "auto" values filled as transformers.integrations.deepspeed fills them)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from memplan.errors import ConfigError
from memplan.spec.parallel import DS_REDUCE_BUCKET, Offload, Sharding
from memplan.spec.train import Precision, TrainConfig


def deepspeed_candidates(ds_path: str, relative_to: Path) -> list[Path]:
    """Where a YAML's `deepspeed` JSON is looked for, in order: as written (HF Trainer opens it from the working
    directory, the LLaMA-Factory checkout `llamafactory-cli` runs in: examples/train_full/qwen3vl_full_sft.yaml
    names `examples/deepspeed/ds_z3_config.json`), then beside `relative_to` (the YAML's folder) and each of its
    ancestors, where a checkout-relative path finds the checkout the YAML lives in."""
    path = Path(ds_path)
    if path.is_absolute():
        return [path]
    folder = relative_to.resolve()
    return [path, *(d / path for d in (folder, *folder.parents))]


def read_deepspeed(ds_path: str, relative_to: Path) -> dict[str, Any]:
    """A DeepSpeed JSON -> Parallelism fields: zero_optimization.stage, its offload_optimizer / offload_param
    devices and reduce_bucket_size. The path is tried as `deepspeed_candidates` lists; a missing file is a
    ConfigError saying where it was looked for."""
    candidates = deepspeed_candidates(ds_path, relative_to)
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        where = "as an absolute path" if len(candidates) == 1 else (
            f"in the working directory {Path.cwd()}, then in {relative_to.resolve()} and each folder above it")
        raise ConfigError(f"deepspeed {ds_path}: no such file (looked {where})")
    try:
        data = json.loads(found.read_bytes().decode("utf-8"))
    except OSError as err:
        raise ConfigError(f"deepspeed {ds_path}: cannot read it ({err.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ConfigError(f"deepspeed {ds_path}: not a DeepSpeed JSON config (not UTF-8 JSON)") from None
    zero = data.get("zero_optimization", {}) if isinstance(data, dict) else None
    if not isinstance(zero, dict):
        raise ConfigError(f"deepspeed {ds_path}: zero_optimization must be an object, got {zero!r}")
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3) or isinstance(stage, bool):
        raise ConfigError(f"deepspeed {ds_path}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    out: dict[str, Any] = {"sharding": Sharding.NONE if stage == 0 else Sharding(f"zero{stage}")}
    bucket = zero.get("reduce_bucket_size", DS_REDUCE_BUCKET)  # absent: DeepSpeed's default; auto: HF fills it
    if bucket != "auto":
        try:
            out["ds_reduce_bucket"] = int(float(bucket))
        except (TypeError, ValueError):
            raise ConfigError(f"deepspeed {ds_path}: zero_optimization.reduce_bucket_size must be a number or auto, "
                              f"got {bucket!r}") from None
    devices = {}
    for key in ("offload_param", "offload_optimizer"):
        section = zero.get(key) or {}  # null: no offload
        if not isinstance(section, dict):
            raise ConfigError(f"deepspeed {ds_path}: zero_optimization.{key} must be an object, got {section!r}")
        devices[key] = str(section.get("device", "none"))
    if devices["offload_param"] in ("cpu", "nvme"):
        out["offload"] = Offload.PARAMS
    elif devices["offload_optimizer"] in ("cpu", "nvme"):
        out["offload"] = Offload.OPTIMIZER
    return out


def deepspeed_config(train: TrainConfig, hidden_size: int, *, auto_batch: bool = False) -> dict[str, Any]:
    """The DeepSpeed JSON HF Trainer would hand DeepSpeed for `train` (its "auto" buckets filled the same way).
    `auto_batch` (exports) leaves the batch, accumulation and precision "auto": HF Trainer fills them from its
    arguments (transformers integrations/deepspeed.py trainer_config_process), so a retuned YAML stays consistent."""
    h = hidden_size  # HF's "auto" fill for the ZeRO-3 knobs (transformers.integrations.deepspeed)
    zero: dict[str, Any] = {"stage": int(train.sharding.value[-1]),
                            "reduce_bucket_size": train.parallel.reduce_bucket(h),
                            "stage3_prefetch_bucket_size": int(0.9 * h * h),
                            "stage3_param_persistence_threshold": 10 * h}
    if train.offload is not Offload.NONE:
        zero["offload_optimizer"] = {"device": "cpu"}
    if train.offload is Offload.PARAMS:
        zero["offload_param"] = {"device": "cpu"}
    cfg: dict[str, Any] = {"train_micro_batch_size_per_gpu": train.batch_size,
                           "gradient_accumulation_steps": train.grad_accum, "zero_optimization": zero,
                           "zero_force_ds_cpu_optimizer": False, "steps_per_print": 2**31 - 1,
                           "wall_clock_breakdown": False}
    if auto_batch:
        cfg.update(train_batch_size="auto", train_micro_batch_size_per_gpu="auto", gradient_accumulation_steps="auto",
                   fp16={"enabled": "auto"}, bf16={"enabled": "auto"})
    elif train.precision is Precision.FP16:
        cfg["fp16"] = {"enabled": True}
    elif train.precision in (Precision.BF16, Precision.PURE_BF16):
        cfg["bf16"] = {"enabled": True}
    return cfg
