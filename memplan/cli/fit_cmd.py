"""`memplan fit`: does it fit, what is fastest, what to change."""

from __future__ import annotations

from typing import Annotated

import typer

from memplan.cli import app
from memplan.cli.options import (
    AlphaOpt,
    BitsOpt,
    CkptOpt,
    ConfigOpt,
    DropoutOpt,
    FreezeOpt,
    FsdpOpt,
    JsonOpt,
    MethodOpt,
    NodesOpt,
    OptModel,
    PrecisionOpt,
    RankOpt,
    SeqOpt,
    TargetsOpt,
    ZeroOpt,
    search_config,
)
from memplan.errors import ExitCode
from memplan.spec.train import TrainConfig


@app.command()
def fit(ctx: typer.Context, gpu: Annotated[str, typer.Option("--gpu", help="size (24GB), name (memplan gpus) or auto")],
        model: OptModel = None, config: ConfigOpt = None, method: MethodOpt = "lora", precision: PrecisionOpt = None,
        global_batch: Annotated[int, typer.Option("--global-batch", help="micro x accum x GPUs, kept exact")] = 16,
        gpus: Annotated[str, typer.Option("--gpus", help="data-parallel GPUs: a count or a list (1,2,4,8) to "
                                                        "find the fewest that fit and the fastest")] = "1",
        nodes: NodesOpt = 1, zero: ZeroOpt = None, fsdp: FsdpOpt = None,
        offload: Annotated[str | None, typer.Option("--offload", help="optimizer|params, or a list to search")]
        = None,
        seq_len: SeqOpt = 2048, checkpointing: CkptOpt = None, lora_rank: RankOpt = None,
        lora_alpha: AlphaOpt = None, lora_targets: TargetsOpt = None, lora_dropout: DropoutOpt = None,
        quant_bits: BitsOpt = None, freeze_trainable_layers: FreezeOpt = None,
        optimizer: Annotated[str | None, typer.Option(help="one name or a comma list to search")] = None,
        attn: Annotated[str, typer.Option(help="auto|sdpa|eager|flash_attention_2, or a comma list to search")]
        = "auto",
        margin: Annotated[float, typer.Option(help="fraction of the card kept free, in [0, 0.5)")] = 0.05,
        top: Annotated[int, typer.Option(help="alternatives shown")] = 5,
        exact: Annotated[bool, typer.Option("--exact", help="re-check the top candidates with fake-tensor traces")]
        = False,
        export: Annotated[str | None, typer.Option(help="write the recommended plan: llamafactory | hf | json")]
        = None,
        output: Annotated[str | None, typer.Option("--output", "-o", help="file for --export")] = None,
        json_out: JsonOpt = False) -> None:
    """Fits or not on this GPU, the fastest configuration, and what to change when nothing fits."""
    from memplan.cli import render
    from memplan.cli.options import given_options, model_and_config
    from memplan.errors import ConfigError
    from memplan.fit import fit as run_fit
    from memplan.spec.catalog import resolve_model
    from memplan.spec.hardware import resolve_gpu

    model, lf = model_and_config(model, config)
    given = given_options(ctx)
    base, space = search_config(method=method, seq_len=seq_len, lora_rank=lora_rank, lora_alpha=lora_alpha,
                                lora_targets=lora_targets, lora_dropout=lora_dropout, quant_bits=quant_bits,
                                freeze_trainable_layers=freeze_trainable_layers, optimizer=optimizer, attn=attn,
                                precision=precision, checkpointing=checkpointing)
    from memplan.cli.options import parse_int_list, parse_sharding
    from memplan.spec.train import Offload, parse_choice

    counts = parse_int_list(gpus, "--gpus")
    if not counts or min(counts) <= 0 or global_batch <= 0:
        raise ConfigError("--gpus and --global-batch must be positive integers")
    dist = parse_sharding(zero, fsdp, None)
    offloads = [parse_choice(Offload, o, "--offload") for o in offload.split(",")] if offload else None
    space = {**space, "gpu_counts": counts, "shardings": [dist["sharding"]] if dist else None, "offloads": offloads}
    as_written = None
    if lf is not None:  # the YAML pins its knobs; fit searches micro x accum (and checkpointing unless given)
        base, space, global_batch = pin_to_config(lf.train, base, space, given, global_batch)
        as_written = lf.train.with_(gpus=counts[0], nodes=nodes)
    base = base.with_(gpus=counts[0], nodes=nodes)
    spec = resolve_model(model)
    card = resolve_gpu(gpu)
    res = run_fit(spec, base, card, global_batch=global_batch, margin=margin, **space)  # type: ignore[arg-type]
    written = None
    if as_written is not None:
        from memplan.fit import evaluate, usable_bytes

        written = evaluate(spec, as_written, card, usable_bytes(card, margin))
    if exact:
        from memplan.fit import recheck_exact

        res = recheck_exact(res, top=min(top, 3))
    if (export is None) != (output is None):
        raise ConfigError("--export FORMAT and -o FILE go together")
    if export and output and res.best:
        from pathlib import Path

        from memplan.formats.plan import write_plan

        write_plan(export, spec, res.best.train, Path(output), base=lf.raw if lf else None)
    if json_out:
        extra = {"as_written": render.candidate_json(written, spec)} if written else {}
        render.emit_json({**render.fit_json(res), **extra})
    else:
        if written is not None:
            render.print_as_written(written, res, config)
        render.print_fit(res, top)
    raise typer.Exit(int(ExitCode.OK if res.fits else ExitCode.DOES_NOT_FIT))


def pin_to_config(written: TrainConfig, base: TrainConfig, space: dict[str, object], given: set[str],
                  global_batch: int) -> tuple[TrainConfig, dict[str, object], int]:
    """fit --config: the YAML's method, rank, precision, optimizer, kernel and sequence stay as written unless the
    command line says otherwise; its effective batch is kept unless --global-batch is given."""
    from memplan.cli.options import merge_config

    pinned = merge_config(written, {}, set())
    cli = {k for k in given if k in ("method", "seq_len", "lora_alpha", "lora_targets", "lora_dropout",
                                     "quant_bits", "freeze_trainable_layers")}
    pinned = pinned.with_(**{k: getattr(base, k) for k in cli})
    space = dict(space)
    for key, name, value in (("precisions", "precision", pinned.precision),
                             ("optimizers", "optimizer", pinned.optimizer), ("attentions", "attn", pinned.attn),
                             ("lora_ranks", "lora_rank", pinned.lora_rank)):
        if name not in given:
            space[key] = [value]
    if "global_batch" not in given:
        global_batch = written.effective_batch
    if not {"zero", "fsdp", "offload"} & given and written.sharding.value != "none":  # the YAML's DeepSpeed JSON
        space.update(shardings=[written.sharding], offloads=[written.offload])
    return pinned, space, global_batch
