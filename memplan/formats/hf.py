"""HF `TrainingArguments`: the keywords a plan exports, the same fields read from a command line's flags
(HfArgumentParser style) or from a live Trainer's `args`, and written back into either.

One reader serves both carriers: a field absent means TrainingArguments' default (per-device batch 8, no
accumulation, no checkpointing, adamw_torch, fp32).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from memplan.errors import ConfigError
from memplan.spec import optimizers
from memplan.spec.train import ALL_LINEAR, Precision, ProjType, TrainConfig

# TrainingArguments defaults for the fields memplan reads (transformers.training_args.TrainingArguments)
# (the stack is the base's: hf unless the command line names another, memplan.spec.stacks)
DEFAULTS: dict[str, object] = dict(batch_size=8, grad_accum=1, checkpointing=False,
                                   optimizer=optimizers.Optimizer.ADAMW, precision=Precision.FP32, eval_batch_size=0)


def hf_training_kwargs(train: TrainConfig, output_dir: str = "output") -> dict[str, Any]:
    """Keyword arguments for transformers.TrainingArguments (validated by building one in the tests)."""
    opt = optimizers.facts(train.optimizer)
    kw: dict[str, Any] = {
        "output_dir": output_dir,
        "per_device_train_batch_size": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "bf16": train.precision in (Precision.BF16, Precision.PURE_BF16),
        "fp16": train.precision is Precision.FP16,
        "gradient_checkpointing": train.checkpointing,
        "optim": opt.hf_optim,
    }
    if not opt.hf_optim:
        raise ConfigError(f"--optimizer {train.optimizer.value} is LLaMA-Factory's ({opt.lf_flag}): HF "
                          "TrainingArguments cannot select it; export a LLaMA-Factory YAML")
    if opt.optim_args:
        kw["optim_args"] = opt.optim_args
    kw.update(_projection_fields(train))
    return kw


def _projection_fields(train: TrainConfig) -> dict[str, Any]:
    """GaLore / APOLLO in TrainingArguments: the rank and side in `optim_args`, the targets in
    `optim_target_modules` (transformers trainer_optimizer.py _get_galore_optimizer: rank defaults to 128)."""
    if optimizers.facts(train.optimizer).projection is optimizers.Projection.NONE:
        return {}
    targets = "all-linear" if ALL_LINEAR in train.proj_targets else list(train.proj_targets)
    return {"optim_args": f"rank={train.proj_rank},proj_type={train.proj_type.value}", "optim_target_modules": targets}


def _read_projection(get: Callable[[str], object | None], optim: str, where: str) -> dict[str, Any]:
    """The inverse of _projection_fields, with transformers' defaults (rank 128, proj_type std)."""
    args = dict(kv.split("=", 1) for kv in str(get("optim_args") or "").replace(" ", "").split(",") if "=" in kv)
    targets = get("optim_target_modules")
    if targets is None:
        raise ConfigError(f"--optim {optim} {where} needs --optim_target_modules (transformers raises without it)")
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.strip("[]").replace("'", "").split(",") if t.strip()]
    names = [str(t) for t in targets]  # type: ignore[attr-defined]
    try:
        return {"proj_rank": int(args.get("rank", 128)), "proj_type": ProjType(args.get("proj_type", "std")),
                "proj_targets": (ALL_LINEAR,) if [n.replace("_", "-") for n in names] == ["all-linear"]
                else tuple(names)}
    except ValueError:
        raise ConfigError(f"--optim_args {get('optim_args')!r} {where}: rank must be an integer, proj_type one "
                          f"of {', '.join(p.value for p in ProjType)}") from None


def _truthy(value: object) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() in ("true", "1", "yes")


def config_from_fields(get: Callable[[str], object | None], base: TrainConfig, where: str) -> TrainConfig:
    """The knobs TrainingArguments carry, read through `get(field name) -> value or None` (flags give strings, a
    Trainer's args typed values), over `base` (method, rank, sequence: what the arguments do not say)."""
    changes = dict(DEFAULTS)
    for name, knob in (("per_device_train_batch_size", "batch_size"), ("gradient_accumulation_steps", "grad_accum")):
        value = get(name)
        if value is not None:
            try:
                changes[knob] = int(value)  # type: ignore[call-overload]
            except (TypeError, ValueError):
                raise ConfigError(f"--{name} {value!r} {where} is not an integer") from None
    strategy = str(getattr(get("eval_strategy"), "value", get("eval_strategy")) or "no").lower()
    if strategy in ("steps", "epoch") or _truthy(get("do_eval") or False):  # evaluation during / after training
        value = get("per_device_eval_batch_size")
        try:
            changes["eval_batch_size"] = int(value) if value is not None else 8  # TrainingArguments' default
        except (TypeError, ValueError):
            raise ConfigError(f"--per_device_eval_batch_size {value!r} {where} is not an integer") from None
    if (ckpt := get("gradient_checkpointing")) is not None:
        changes["checkpointing"] = _truthy(ckpt)
    if (optim := get("optim")) is not None:
        optim = getattr(optim, "value", optim)  # a Trainer holds an OptimizerNames enum
        chosen = optimizers.from_hf(str(optim), str(get("optim_args") or ""))
        if chosen is None:
            raise ConfigError(f"--optim {optim} {where} is not modelled: one of {', '.join(optimizers.hf_names())}")
        changes["optimizer"] = chosen
        if optimizers.facts(chosen).projection is not optimizers.Projection.NONE:
            changes.update(_read_projection(get, str(optim), where))
    if _truthy(get("bf16") or False):  # AMP: pure bf16 (a bf16-loaded model) cannot be told from the flags
        changes["precision"] = Precision.BF16
    elif _truthy(get("fp16") or False):
        changes["precision"] = Precision.FP16
    return base.with_(**changes)


# ---- a command line's flags -----------------------------------------------------------------------------------
def _flag(argv: list[str], name: str) -> tuple[int, int] | None:
    """(start, count) of `--name value`, `--name=value` or a bare boolean `--name` in argv."""
    for i, a in enumerate(argv):
        if a == f"--{name}":
            has_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
            return i, 2 if has_value else 1
        if a.startswith(f"--{name}="):
            return i, 1
    return None


def flag_value(argv: list[str], name: str) -> str | None:
    hit = _flag(argv, name)
    if hit is None:
        return None
    i, n = hit
    return argv[i].split("=", 1)[1] if "=" in argv[i] else argv[i + 1] if n == 2 else "true"


def set_flag(argv: list[str], name: str, value: str) -> list[str]:
    hit = _flag(argv, name)
    if hit is None:
        return [*argv, f"--{name}", value]
    i, n = hit
    return [*argv[:i], f"--{name}", value, *argv[i + n:]]


def config_from_flags(argv: list[str], base: TrainConfig) -> TrainConfig:
    return config_from_fields(lambda name: flag_value(argv, name), base, "in the command")


def rewrite_flags(argv: list[str], before: TrainConfig, after: TrainConfig) -> list[str]:
    """argv with the flags of `after` where it differs from `before` (batch and accumulation always written)."""
    if after.method != before.method:
        raise ConfigError("a method change cannot be expressed in HF TrainingArguments flags: use a "
                          "LLaMA-Factory --config, or run without --allow-method-change")
    argv = set_flag(argv, "per_device_train_batch_size", str(after.batch_size))
    argv = set_flag(argv, "gradient_accumulation_steps", str(after.grad_accum))
    if after.checkpointing != before.checkpointing:
        argv = set_flag(argv, "gradient_checkpointing", str(after.checkpointing))
    if after.optimizer != before.optimizer:
        opt = optimizers.facts(after.optimizer)
        if not opt.hf_optim:
            raise ConfigError(f"{after.optimizer.value} is LLaMA-Factory's ({opt.lf_flag}): HF flags cannot select it")
        argv = set_flag(argv, "optim", opt.hf_optim)
        if opt.optim_args:
            argv = set_flag(argv, "optim_args", opt.optim_args)
    for name, value in _projection_fields(after).items():
        argv = set_flag(argv, name, value if isinstance(value, str) else ",".join(value))
    return argv


# ---- a live Trainer's arguments -------------------------------------------------------------------------------
def config_from_args(args: Any, base: TrainConfig) -> TrainConfig:
    """A TrainingArguments object -> TrainConfig over `base`."""
    return config_from_fields(lambda name: getattr(args, name, None), base, "in the Trainer's arguments")


def apply_to_args(args: Any, train: TrainConfig) -> bool:
    """Set `train`'s micro-batch, accumulation, checkpointing and optimizer on a TrainingArguments object; True
    when the optimizer changed (the Trainer must build a new one)."""
    args.per_device_train_batch_size = train.batch_size
    args.gradient_accumulation_steps = train.grad_accum
    args.gradient_checkpointing = train.checkpointing
    opt = optimizers.facts(train.optimizer)
    current = getattr(args.optim, "value", args.optim)
    if not opt.hf_optim:
        raise ConfigError(f"{train.optimizer.value} is LLaMA-Factory's ({opt.lf_flag}): a Trainer cannot switch to it")
    fields = {"optim_args": opt.optim_args or None, **_projection_fields(train)}
    if opt.hf_optim == current and all((getattr(args, k, None) or None) == (v or None)
                                           for k, v in fields.items()):
        return False
    args.optim = opt.hf_optim
    for key, value in fields.items():
        setattr(args, key, value)
    return True
