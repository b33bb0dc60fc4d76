"""The command-line options of every training knob, in one table (`KNOBS`), and the one path from options to a
TrainConfig or a SearchSpace. A knob's option is named after its dataclass field (batch_size -> --batch-size);
adding one is a `Knob` entry here plus the field and its help text. Commands take the knobs they need with
`@knob_options(...)`; a knob left out on the command line is None, and the dataclass default (or the --config
YAML's value) holds.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Annotated, Any

import typer

from memplan.errors import ConfigError, Problem
from memplan.spec.optimizers import Optimizer
from memplan.spec.parallel import Offload, Sharding
from memplan.spec.space import SearchSpace
from memplan.spec.stacks import Stack
from memplan.spec.train import CHOICES, Adapter, Attention, Method, Precision, TrainConfig, parse_choice


@dataclass(frozen=True, slots=True)
class Knob:
    name: str  # the TrainConfig / Parallelism field it sets (zero / fsdp: the sharding)
    help: str
    short: str = ""
    switch: bool = False  # a --name/--no-name flag
    listable: bool = False  # fit / tune take a comma list (or a range) to search


def _choices(enum: type[Enum]) -> str:
    return "|".join(m.value for m in enum)  # type: ignore[attr-defined]


KNOBS = {k.name: k for k in (
    Knob("method", f"{_choices(Method)} (default lora)"),
    Knob("precision", f"{_choices(Precision)} (default bf16; fit: what the GPU supports)"),
    Knob("batch_size", "micro-batch per GPU", short="-b"),
    Knob("grad_accum", "gradient accumulation steps"),
    Knob("seq_len", "tokens per sample (default 2048)", short="-s"),
    Knob("checkpointing", "full recompute per decoder layer (default on; fit: both)", switch=True),
    Knob("lora_rank", "rank (default 8; fit / tune: also a list 8,16 or range 8-64)", listable=True),
    Knob("lora_alpha", "default 2 x rank"),
    Knob("lora_targets", "comma list of modules, or all-linear"),
    Knob("lora_dropout", "default 0"),
    Knob("quant_bits", "qlora: bnb 4 (NF4) or 8 (int8); hqq 1/2/3/4/5/6/8; eetq 8"),
    Knob("quant_method", "qlora: bnb|hqq|eetq (LLaMA-Factory quantization_method; default bnb)"),
    Knob("adapter", f"{_choices(Adapter)}: what lora / qlora train (default lora; qlora + oft: QOFT)"),
    Knob("oft_block_size", "oft: block size (default 32; 0 to give --oft-rank)"),
    Knob("oft_rank", "oft: blocks per layer (with --oft-block-size 0)"),
    Knob("pissa_init", "LoRA initialised from each target's SVD (a load-phase peak)", switch=True),
    Knob("liger_kernel", "Liger's fused kernels: linear cross-entropy, RMSNorm, SwiGLU", switch=True),
    Knob("offload_checkpoints", "checkpointed layer inputs in host memory (LLaMA-Factory use_unsloth_gc)",
         switch=True),
    Knob("freeze_trainable_layers", "freeze: last N layers train, the first -N if negative (default 2)"),
    Knob("optimizer", f"{_choices(Optimizer)} (fit / tune: a comma list to search)", listable=True),
    Knob("proj_rank", "GaLore / APOLLO: the projection rank (default 16, LLaMA-Factory's galore_rank)"),
    Knob("proj_targets", "GaLore / APOLLO: comma list of modules, or all-linear"),
    Knob("proj_type", "GaLore / APOLLO: std|reverse_std|right|left (the projected side)"),
    Knob("attn", f"{_choices(Attention)} (fit / tune: a comma list to search)", listable=True),
    Knob("gpus", "data-parallel GPUs, every node counted (fit / tune: a list 1,2,4,8 to find the fewest that fit "
                 "and the fastest)", listable=True),
    Knob("nodes", "machines; --gpus counts every GPU across them"),
    Knob("zero", "DeepSpeed ZeRO stage 0|1|2|3 (0 = plain DDP)"),
    Knob("fsdp", "full_shard|shard_grad_op|hybrid_shard|no_shard"),
    Knob("fsdp_version", "with --fsdp: 1 = FullyShardedDataParallel (flat parameters; accelerate's default) or "
                         "2 = fully_shard"),
    Knob("offload", f"{_choices(Offload)} (CPU offload; fit: a list to search)", listable=True),
    Knob("eval_batch_size", "evaluation during training: the eval micro-batch (per_device_eval_batch_size; "
                            "default 0 = no evaluation)"),
    Knob("stack", f"{_choices(Stack)}: the training stack's own model preparation (default hf; a LLaMA-Factory "
                  "--config: llamafactory)"),
    Knob("images", "vision-language models: images per sample, the sample with the most (default: text only; a "
                   "LLaMA-Factory --config: from its template and dataset)"),
    Knob("image_max_pixels", "vision-language models: each image's pixels after LLaMA-Factory's resize (default "
                             "768 x 768 = 589824)"),
)}
SINGLE = tuple(KNOBS)  # every knob: estimate, trace, probe
_LORA_ONLY = ("lora_rank", "lora_alpha", "lora_targets", "lora_dropout")

def knob_options(*names: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add the named knobs' options to a command (keyword parameters after its own, each defaulting to None)."""
    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        sig = inspect.signature(func, eval_str=True)  # the command's own options, resolved
        params = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        for name in names:
            knob = KNOBS[name]
            flag = "--" + name.replace("_", "-")
            decls = [f"{flag}/--no-{flag[2:]}"] if knob.switch else [flag, *([knob.short] if knob.short else [])]
            kind = bool | None if knob.switch else str | None
            params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                            annotation=Annotated[kind, typer.Option(*decls, help=knob.help)]))
            func.__annotations__[name] = params[-1].annotation
        func.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
        return func
    return decorate


def given(values: dict[str, Any], names: tuple[str, ...] = SINGLE) -> dict[str, Any]:
    """The knobs the user typed: those of `names` that are not None."""
    return {n: values[n] for n in names if values.get(n) is not None}


def _int(name: str, text: str) -> int:
    try:
        return int(str(text).strip())
    except ValueError:
        raise ConfigError(Problem(name, f"{{}} {text!r} must be an integer")) from None


def _float(name: str, text: str) -> float:
    try:
        return float(str(text).strip())
    except ValueError:
        raise ConfigError(Problem(name, f"{{}} {text!r} must be a number")) from None


def _value(name: str, text: Any) -> Any:
    """One knob's text -> the field's value (sharding from --zero / --fsdp handled by the caller)."""
    if KNOBS[name].switch:
        return text
    if name in CHOICES:
        return parse_choice(CHOICES[name], text, "--" + name.replace("_", "-"))
    if name in ("lora_targets", "proj_targets"):
        return tuple(t.strip() for t in str(text).split(",") if t.strip())
    if name == "lora_dropout":
        return _float(name, text)
    return _int(name, text)


def _sharding(knobs: dict[str, Any]) -> dict[str, Any]:
    zero, fsdp = knobs.get("zero"), knobs.get("fsdp")
    if zero is not None and fsdp is not None:
        raise ConfigError("--zero and --fsdp are two engines: give one")
    if zero is not None:
        stage = _int("zero", zero)
        if stage not in (0, 1, 2, 3):
            raise ConfigError(f"--zero {stage}: ZeRO stages are 0, 1, 2, 3")
        return {"sharding": Sharding.NONE if stage == 0 else Sharding(f"zero{stage}")}
    if fsdp is not None:
        choice = parse_choice(Sharding, fsdp, "--fsdp")
        if choice.is_deepspeed or choice is Sharding.NONE:  # type: ignore[attr-defined]
            raise ConfigError(f"--fsdp {fsdp}: choose full_shard|shard_grad_op|hybrid_shard|no_shard")
        return {"sharding": choice}
    return {}


def _fsdp_version(knobs: dict[str, Any], sharding: Sharding) -> dict[str, Any]:
    """--fsdp-version 1|2, given with a torch FSDP sharding only (--fsdp, or a --config YAML's fsdp key)."""
    text = knobs.get("fsdp_version")
    if text is None:
        return {}
    if not sharding.is_fsdp:
        raise ConfigError(f"--fsdp-version {text} applies to torch FSDP: add --fsdp full_shard|shard_grad_op|"
                          "hybrid_shard|no_shard")
    return {"fsdp_version": _int("fsdp_version", text)}


def train_config(knobs: dict[str, Any], base: TrainConfig | None = None, *, command: str) -> TrainConfig:
    """The knobs given on the command line over `base` (TrainConfig's defaults, or a --config YAML's values);
    LoRA / QLoRA / freeze options with another method are an error. `command` names single-value commands in
    the error for a list."""
    base = base or TrainConfig()
    method = _value("method", knobs["method"]) if "method" in knobs else base.method
    problems: list[str] = []
    lora_given = ["--" + n.replace("_", "-") for n in _LORA_ONLY if n in knobs]
    if lora_given and method not in (Method.LORA, Method.QLORA):
        problems.append(f"{', '.join(lora_given)} given without LoRA: add --method lora (or qlora)")
    for name in ("quant_bits", "quant_method"):
        if name in knobs and method is not Method.QLORA:
            problems.append(f"--{name.replace('_', '-')} applies to --method qlora only")
    if "freeze_trainable_layers" in knobs and method is not Method.FREEZE:
        problems.append("--freeze-trainable-layers applies to --method freeze only")
    if problems:
        raise ConfigError(problems)
    changes: dict[str, Any] = _sharding(knobs)
    changes.update(_fsdp_version(knobs, changes.get("sharding", base.sharding)))
    for name, text in knobs.items():
        if name in ("zero", "fsdp", "fsdp_version"):
            continue
        if KNOBS[name].listable and name in ("lora_rank", "gpus"):
            values = parse_int_list(str(text), "--" + name.replace("_", "-"))
            if len(values) != 1 or any(c in str(text) for c in "-:,"):
                raise ConfigError(f"{command} takes one --{name.replace('_', '-')}; lists and ranges are for "
                                  "`memplan fit`" + (" and `memplan tune`" if name == "lora_rank" else ""))
            changes[name] = values[0]
        else:
            changes[name] = _value(name, text)
    return base.with_(**changes)


def search_space(knobs: dict[str, Any], base: TrainConfig | None, global_batch: int | None,
                 ) -> tuple[TrainConfig, SearchSpace]:
    """fit / tune: the base configuration (the first value of each list) and the space of the open knobs."""
    lists: dict[str, Any] = {}
    single = dict(knobs)
    for name, parse in (("lora_rank", lambda t: parse_int_list(t, "--lora-rank")),
                        ("gpus", lambda t: parse_int_list(t, "--gpus")),
                        ("optimizer", lambda t: [_value("optimizer", o) for o in t.split(",")]),
                        ("attn", lambda t: [_value("attn", a) for a in t.split(",")]),
                        ("offload", lambda t: [_value("offload", o) for o in t.split(",")])):
        if name in single:
            lists[name] = tuple(parse(str(single.pop(name))))
            single[name] = str(getattr(lists[name][0], "value", lists[name][0]))
    train = train_config(single, base, command="fit")
    kw: dict[str, Any] = dict(lora_ranks=lists.get("lora_rank"), optimizers=lists.get("optimizer"),
                              attentions=lists.get("attn"), gpu_counts=lists.get("gpus"),
                              offloads=lists.get("offload"))
    if "precision" in knobs:
        kw["precisions"] = (train.precision,)
    if "checkpointing" in knobs:
        kw["checkpointing"] = (train.checkpointing,)
    if "zero" in knobs or "fsdp" in knobs:
        kw["shardings"] = (train.sharding,)
    if global_batch is not None:
        kw["global_batch"] = global_batch
    names = {"lora_ranks": "--lora-rank", "gpu_counts": "--gpus", "global_batch": "--global-batch"}
    try:
        return train, SearchSpace(**kw)
    except ConfigError as err:
        raise err.respelled(names) from None


def seconds(option: str, value: float | None) -> float | None:
    """A time limit: None (no limit) or a finite number of seconds above 0."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{option} must be a number of seconds above 0, got {value}")
    return value


def model_and_config(model: str | None, config: str | None) -> tuple[str, Any]:
    """--model and/or --config -> (model name, the LlamaFactoryConfig or None)."""
    from memplan.formats.llamafactory import read_llamafactory

    if config is None:
        if model is None:
            raise ConfigError("give --model NAME (or --config train.yaml)")
        return model, None
    import os

    lf = read_llamafactory(config, env=os.environ)  # LLaMA-Factory's launcher reads NPROC_PER_NODE / NNODES
    return model or lf.model, lf


# ---- the options every command spells the same way -------------------------------------------------------------
Model = Annotated[str, typer.Option("--model", "-m",
                                    help="catalog name (memplan models), hub id, folder or config.json")]
OptModel = Annotated[str | None, typer.Option("--model", "-m", help="catalog name (memplan models), hub id, folder "
                                             "or config.json (default: model_name_or_path of --config)")]
ConfigOpt = Annotated[str | None, typer.Option("--config", "-c", help="a LLaMA-Factory training YAML: the model "
                                               "and knobs come from it; options given on the command line win")]
JsonOpt = Annotated[bool, typer.Option("--json", help="machine-readable output")]
GpuOpt = Annotated[str | None, typer.Option("--gpu", help="size (24GB, 80GiB), catalog name (memplan gpus) or auto")]
MarginOpt = Annotated[float, typer.Option(help="fraction of the card kept free, in [0, 0.5)")]
ExportOpt = Annotated[str | None, typer.Option(help="write the recommended plan: llamafactory | hf | json")]
OutputOpt = Annotated[str | None, typer.Option("--output", "-o", help="file for --export")]


def parse_int_list(text: str, option: str) -> list[int]:
    """'8' -> [8]; '8,16,32' -> [8, 16, 32]; '8-64' -> powers of two times 8 up to 64 (it must end on one:
    8,16,32,64); '4-12:4' -> [4, 8, 12]. Every value is a positive integer; errors are one-line ConfigErrors."""
    import re

    from memplan.errors import ConfigError

    max_values, max_value = 64, 10**6

    def fail(why: str) -> ConfigError:
        shown = text if len(text) <= 40 else text[:37] + "..."
        return ConfigError(f"{option} {shown!r}: {why}")

    def num(digits: str) -> int:  # int() refuses thousands of digits: anything past 7 is too large anyway
        if len(digits.lstrip("+-")) > 7:
            raise fail("values are positive integers" if digits.startswith("-") else f"values are at most {max_value}")
        return int(digits)

    usage = "use a number, a list (8,16), a range (8-64, powers of two) or a stepped range (4-12:4)"
    spec = text.strip()
    ranged = re.fullmatch(r"(-?[0-9]+)\s*-\s*(-?[0-9]+)(?:\s*:\s*(-?[0-9]+))?", spec)
    if ranged:  # parse and validate everything before expanding anything
        lo, hi = num(ranged[1]), num(ranged[2])
        step = num(ranged[3]) if ranged[3] is not None else None
        if lo <= 0:
            raise fail("ranges start above 0")
        if hi < lo:
            raise fail(f"a range runs from low to high: use {hi}-{lo}" if hi > 0 else "a range runs from low to high")
        if hi > max_value:
            raise fail(f"values are at most {max_value}")
        if step is not None:
            if step <= 0:
                raise fail("the step of a range is a positive integer")
            count = (hi - lo) // step + 1
            last = lo + (count - 1) * step
            if last != hi:
                raise fail(f"{lo}-{hi}:{step} does not end on {hi}: use {lo}-{last}:{step} or "
                           f"{lo}-{last + step}:{step}")
            if count > max_values:
                raise fail(f"expands to {count} values; at most {max_values}")
            return list(range(lo, hi + 1, step))
        out = [lo]
        while out[-1] * 2 <= hi:  # at most log2(max_value) + 1 = 20 values
            out.append(out[-1] * 2)
        if out[-1] != hi:
            listed = ",".join(str(v) for v in [*out, hi])
            up = f"use {lo}-{out[-1] * 2}, or " if out[-1] * 2 <= max_value else "use "
            raise fail(f"{lo}-{hi} does not end on a power-of-two multiple of {lo}: {up}a list {listed}")
        return out
    items = [x.strip() for x in spec.split(",") if x.strip()]
    if not items or not all(re.fullmatch(r"[-+]?[0-9]+", x) for x in items):
        raise fail(usage)
    values = [num(x) for x in items]
    if min(values) <= 0:
        raise fail("values are positive integers")
    if max(values) > max_value:
        raise fail(f"values are at most {max_value}")
    if len(values) > max_values:
        raise fail(f"{len(values)} values; at most {max_values}")
    return values


