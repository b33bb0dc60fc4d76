"""Options shared by estimate and fit, and their conversion into a TrainConfig."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from memplan.spec.train import Attention, Method, Optimizer, Precision, TrainConfig, parse_choice

Model = Annotated[str, typer.Option("--model", "-m",
                                    help="catalog name (memplan models), hub id, folder or config.json")]
OptModel = Annotated[str | None, typer.Option("--model", "-m", help="catalog name (memplan models), hub id, folder "
                                             "or config.json (default: model_name_or_path of --config)")]
MethodOpt = Annotated[str, typer.Option("--method", help="full|freeze|lora|qlora")]
PrecisionOpt = Annotated[str | None, typer.Option("--precision", help="fp32|fp16|bf16|pure_bf16")]
BatchOpt = Annotated[int, typer.Option("--batch-size", "-b", help="micro-batch per GPU")]
AccumOpt = Annotated[int, typer.Option("--grad-accum", help="gradient accumulation steps")]
SeqOpt = Annotated[int, typer.Option("--seq-len", "-s", help="tokens per sample")]
CkptOpt = Annotated[bool | None, typer.Option("--checkpointing/--no-checkpointing",
                                                 help="full recompute per decoder layer")]
RankOpt = Annotated[str | None, typer.Option("--lora-rank", help="rank (fit: also a list 8,16 or range 8-64)")]
AlphaOpt = Annotated[int | None, typer.Option("--lora-alpha", help="default 2 x rank")]
TargetsOpt = Annotated[str | None, typer.Option("--lora-targets", help="comma list of modules, or all-linear")]
DropoutOpt = Annotated[float | None, typer.Option("--lora-dropout")]
BitsOpt = Annotated[int | None, typer.Option("--quant-bits", help="qlora: 4 (NF4) or 8 (int8)")]
FreezeOpt = Annotated[int | None, typer.Option("--freeze-trainable-layers", help="freeze: last N layers train")]
OptimOpt = Annotated[str, typer.Option("--optimizer",
                                       help="adamw|adamw_8bit|paged_adamw_8bit|sgd|sgd_momentum|adafactor")]
AttnOpt = Annotated[str, typer.Option("--attn", help="auto|sdpa|eager|flash_attention_2")]
JsonOpt = Annotated[bool, typer.Option("--json", help="machine-readable output")]
GpuOpt = Annotated[str | None, typer.Option("--gpu", help="size (24GB, 80GiB), catalog name (memplan gpus) or auto")]


def build_config(*, method: str, precision: str | None, batch_size: int, grad_accum: int, seq_len: int,
                 checkpointing: bool | None, lora_rank: int | None, lora_alpha: int | None, lora_targets: str | None,
                 lora_dropout: float | None, quant_bits: int | None, freeze_trainable_layers: int | None,
                 optimizer: str, attn: str) -> TrainConfig:
    """Options -> TrainConfig; LoRA/QLoRA/freeze options given with another method are an error."""
    from memplan.errors import ConfigError

    m = parse_choice(Method, method, "--method")
    problems = []
    lora_given = [n for n, v in (("--lora-rank", lora_rank), ("--lora-alpha", lora_alpha),
                                 ("--lora-targets", lora_targets), ("--lora-dropout", lora_dropout)) if v is not None]
    if lora_given and m not in (Method.LORA, Method.QLORA):
        problems.append(f"{', '.join(lora_given)} given without LoRA: add --method lora (or qlora)")
    if quant_bits is not None and m is not Method.QLORA:
        problems.append("--quant-bits applies to --method qlora only")
    if freeze_trainable_layers is not None and m is not Method.FREEZE:
        problems.append("--freeze-trainable-layers applies to --method freeze only")
    if problems:
        raise ConfigError(problems)
    kw: dict[str, object] = dict(method=m, batch_size=batch_size, grad_accum=grad_accum, seq_len=seq_len,
                                 optimizer=parse_choice(Optimizer, optimizer, "--optimizer"),
                                 attn=parse_choice(Attention, attn, "--attn"))
    if precision is not None:
        kw["precision"] = parse_choice(Precision, precision, "--precision")
    if checkpointing is not None:
        kw["checkpointing"] = checkpointing
    if lora_rank is not None:
        kw["lora_rank"] = lora_rank
    for key, value in (("lora_alpha", lora_alpha), ("lora_dropout", lora_dropout), ("quant_bits", quant_bits),
                       ("freeze_trainable_layers", freeze_trainable_layers)):
        if value is not None:
            kw[key] = value
    if lora_targets is not None:
        kw["lora_targets"] = tuple(t.strip() for t in lora_targets.split(",") if t.strip())
    return TrainConfig(**kw)  # type: ignore[arg-type]


def parse_int_list(text: str, option: str) -> list[int]:
    """'8' -> [8]; '8,16,32' -> [8, 16, 32]; '8-64' -> powers of two from 8 to 64."""
    from memplan.errors import ConfigError

    try:
        if "-" in text:
            lo, hi = (int(x) for x in text.split("-", 1))
            out, v = [], lo
            while v <= hi:
                out.append(v)
                v *= 2
            return out
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{option} {text!r}: use a number, a list (8,16) or a range (8-64)") from None


def one_rank(text: str | None, command: str) -> int | None:
    """--lora-rank for commands that take a single configuration."""
    from memplan.errors import ConfigError

    if text is None:
        return None
    ranks = parse_int_list(text, "--lora-rank")
    if len(ranks) != 1:
        raise ConfigError(f"{command} takes one --lora-rank; lists and ranges are for `memplan fit`")
    return ranks[0]


def search_config(*, method: str, seq_len: int, lora_rank: str | None, lora_alpha: int | None,
                  lora_targets: str | None, lora_dropout: float | None, quant_bits: int | None,
                  freeze_trainable_layers: int | None, optimizer: str | None, attn: str, precision: str | None,
                  checkpointing: bool | None) -> tuple[TrainConfig, dict[str, object]]:
    """fit / tune: the base configuration and the open knobs to search (lists for rank, optimizer, kernel)."""
    ranks = parse_int_list(lora_rank, "--lora-rank") if lora_rank is not None else None
    opts = [parse_choice(Optimizer, o, "--optimizer") for o in optimizer.split(",")] if optimizer else None
    attns = [parse_choice(Attention, a, "--attn") for a in attn.split(",")]
    base = build_config(method=method, precision=None, batch_size=1, grad_accum=1, seq_len=seq_len,
                        checkpointing=None, lora_rank=ranks[0] if ranks else None, lora_alpha=lora_alpha,
                        lora_targets=lora_targets, lora_dropout=lora_dropout, quant_bits=quant_bits,
                        freeze_trainable_layers=freeze_trainable_layers,
                        optimizer=opts[0].value if opts else "adamw", attn=attns[0].value)
    space: dict[str, object] = dict(
        precisions=[parse_choice(Precision, precision, "--precision")] if precision else None,
        checkpointing=[checkpointing] if checkpointing is not None else None,
        lora_ranks=ranks, optimizers=opts, attentions=attns)
    return base, space


ConfigOpt = Annotated[str | None, typer.Option("--config", "-c", help="a LLaMA-Factory training YAML: the model "
                                               "and knobs come from it; options given on the command line win")]


def given_options(ctx: typer.Context) -> set[str]:
    """Parameters the user typed (or set through the environment), as opposed to defaults."""
    return {name for name in ctx.params
            if (src := ctx.get_parameter_source(name)) is not None and src.name in ("COMMANDLINE", "ENVIRONMENT")}


def merge_config(base: TrainConfig, values: dict[str, object], given: set[str]) -> TrainConfig:
    """A config file's TrainConfig with the options the user gave on the command line applied on top."""
    from memplan.spec.train import train_from_dict

    data = base.to_dict()
    data["lora_alpha"] = base.lora_alpha  # None keeps "2 x rank" when only the rank is overridden
    kinds = {"method": Method, "precision": Precision, "optimizer": Optimizer, "attn": Attention}
    for name in given & set(data):
        value = values[name]
        if name in kinds:
            value = parse_choice(kinds[name], str(value), f"--{name}")
        elif name == "lora_rank":
            value = one_rank(str(value), "this command")
        elif name == "lora_targets":
            value = [t.strip() for t in str(value).split(",") if t.strip()]
        data[name] = value
    return train_from_dict(data)


def model_and_config(model: str | None, config: str | None) -> tuple[str, Any]:
    """--model and/or --config -> (model name, the LlamaFactoryConfig or None)."""
    from memplan.errors import ConfigError
    from memplan.spec.llamafactory import read_llamafactory

    if config is None:
        if model is None:
            raise ConfigError("give --model NAME (or --config train.yaml)")
        return model, None
    lf = read_llamafactory(config)
    return model or lf.model, lf


NodesOpt = Annotated[int, typer.Option("--nodes", help="machines; --gpus counts every GPU across them")]
ZeroOpt = Annotated[int | None, typer.Option("--zero", help="DeepSpeed ZeRO stage 0|1|2|3 (0 = plain DDP)")]
FsdpOpt = Annotated[str | None, typer.Option("--fsdp", help="full_shard|shard_grad_op|hybrid_shard|no_shard")]
OffloadOpt = Annotated[str | None, typer.Option("--offload", help="optimizer|params (CPU offload)")]


def parse_sharding(zero: int | None, fsdp: str | None, offload: str | None) -> dict[str, object]:
    """--zero / --fsdp / --offload -> TrainConfig fields (sharding, offload)."""
    from memplan.errors import ConfigError
    from memplan.spec.train import Offload, Sharding

    if zero is not None and fsdp is not None:
        raise ConfigError("--zero and --fsdp are two engines: give one")
    out: dict[str, object] = {}
    if zero is not None:
        if zero not in (0, 1, 2, 3):
            raise ConfigError(f"--zero {zero}: ZeRO stages are 0, 1, 2, 3")
        out["sharding"] = Sharding.NONE if zero == 0 else Sharding(f"zero{zero}")
    if fsdp is not None:
        choice = parse_choice(Sharding, fsdp, "--fsdp")
        if choice.is_deepspeed or choice is Sharding.NONE:  # type: ignore[attr-defined]
            raise ConfigError(f"--fsdp {fsdp}: choose full_shard|shard_grad_op|hybrid_shard|no_shard")
        out["sharding"] = choice
    if offload is not None:
        out["offload"] = parse_choice(Offload, offload, "--offload")
    return out
