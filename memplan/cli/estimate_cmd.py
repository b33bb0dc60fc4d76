"""`memplan estimate`: the peak-memory breakdown of one configuration."""

from __future__ import annotations

from typing import Annotated

import typer

from memplan.cli import app
from memplan.cli.options import (
    AccumOpt,
    AlphaOpt,
    AttnOpt,
    BatchOpt,
    BitsOpt,
    CkptOpt,
    ConfigOpt,
    DropoutOpt,
    FreezeOpt,
    FsdpOpt,
    GpuOpt,
    JsonOpt,
    MethodOpt,
    NodesOpt,
    OffloadOpt,
    OptimOpt,
    OptModel,
    PrecisionOpt,
    RankOpt,
    SeqOpt,
    TargetsOpt,
    ZeroOpt,
    build_config,
)
from memplan.errors import ExitCode


@app.command()
def estimate(ctx: typer.Context, model: OptModel = None, config: ConfigOpt = None, method: MethodOpt = "lora",
             precision: PrecisionOpt = None, batch_size: BatchOpt = 1,
             grad_accum: AccumOpt = 1, seq_len: SeqOpt = 2048, checkpointing: CkptOpt = None,
             lora_rank: RankOpt = None, lora_alpha: AlphaOpt = None, lora_targets: TargetsOpt = None,
             lora_dropout: DropoutOpt = None, quant_bits: BitsOpt = None, freeze_trainable_layers: FreezeOpt = None,
             optimizer: OptimOpt = "adamw", attn: AttnOpt = "auto", gpu: GpuOpt = None,
             gpus: Annotated[int, typer.Option("--gpus", help="data-parallel GPUs (per-rank memory)")] = 1,
             nodes: NodesOpt = 1, zero: ZeroOpt = None, fsdp: FsdpOpt = None, offload: OffloadOpt = None,
             margin: Annotated[float, typer.Option(help="fraction of the card kept free")] = 0.05,
             explain: Annotated[bool, typer.Option("--explain", help="the formula behind each term")] = False,
             exact: Annotated[bool, typer.Option("--exact", help="trace the real transformers model on fake "
                                                 "tensors (needs memplan[trace]); `memplan trace` = this")] = False,
             by_module: Annotated[bool, typer.Option("--by-module", help="exact mode: live bytes at the peak by "
                                                     "the module that allocated them")] = False,
             trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code",
                                                             help="exact mode: allow the model's own code")] = False,
             json_out: JsonOpt = False) -> None:
    """Peak VRAM of one configuration, term by term (`memplan trace ...` runs it with --exact)."""
    from memplan.cli import render
    from memplan.cli.options import given_options, merge_config, model_and_config, one_rank, parse_sharding
    from memplan.errors import ConfigError
    from memplan.fit import usable_bytes
    from memplan.predict.estimator import estimate as run_estimate
    from memplan.spec.catalog import resolve_model
    from memplan.spec.hardware import resolve_gpu

    model, lf = model_and_config(model, config)
    given = given_options(ctx)
    if lf is not None:
        train = merge_config(lf.train, ctx.params, given)
    else:
        train = build_config(method=method, precision=precision, batch_size=batch_size, grad_accum=grad_accum,
                             seq_len=seq_len, checkpointing=checkpointing, lora_rank=one_rank(lora_rank, "estimate"),
                             lora_alpha=lora_alpha, lora_targets=lora_targets, lora_dropout=lora_dropout,
                             quant_bits=quant_bits, freeze_trainable_layers=freeze_trainable_layers,
                             optimizer=optimizer, attn=attn)
    dist = parse_sharding(zero, fsdp, offload)
    if dist or {"gpus", "nodes"} & given:
        train = train.with_(**{"gpus": gpus, "nodes": nodes, **dist})
    spec = resolve_model(model)
    card = resolve_gpu(gpu) if gpu else None
    usable = usable_bytes(card, margin) if card else None
    note = ""
    if by_module and not exact:
        raise ConfigError("--by-module needs the exact mode: add --exact (or use memplan trace)")
    if exact or not spec.analytic:
        from memplan.trace.exact import exact_estimate, exact_mode_available

        if not exact and not exact_mode_available():
            run_estimate(spec, train)  # raises the clear "not in the analytic formulas" error
        if not exact:
            note = f"{spec.model_type} is not in the analytic formulas: using the exact mode (fake-tensor trace)"
        bd = exact_estimate(spec, train, trust_remote_code=trust_remote_code, by_module=by_module)
    else:
        bd = run_estimate(spec, train)
    if json_out:
        render.emit_json({**render.estimate_json(spec, train, bd, card, usable), **({"note": note} if note else {})})
    else:
        if note:
            render.console.print(f"[yellow]{note}[/]")
        render.print_estimate(spec, train, bd, card, usable, explain)
    if card is not None and usable is not None and bd.total_bytes > usable:
        raise typer.Exit(int(ExitCode.DOES_NOT_FIT))
