"""`memplan tune` (= `memplan fit --probe`): confirm the fastest configuration that fits with few real probes."""

from __future__ import annotations

from typing import Annotated

import typer

from memplan.cli import app
from memplan.cli.options import (
    AlphaOpt,
    BitsOpt,
    CkptOpt,
    DropoutOpt,
    FreezeOpt,
    FsdpOpt,
    JsonOpt,
    MethodOpt,
    Model,
    NodesOpt,
    OffloadOpt,
    PrecisionOpt,
    RankOpt,
    SeqOpt,
    TargetsOpt,
    ZeroOpt,
    parse_sharding,
    search_config,
)
from memplan.errors import ExitCode


@app.command()
def tune(model: Model, gpu: Annotated[str | None, typer.Option(help="cuda: the card to fit (size, name, auto)")]
         = None, method: MethodOpt = "lora", precision: PrecisionOpt = None,
         global_batch: Annotated[int, typer.Option("--global-batch", help="micro x accum x GPUs, kept exact")] = 16,
         gpus: Annotated[int, typer.Option("--gpus", help="data-parallel ranks: probes run under torchrun (DDP, or "
                                                          "--zero / --fsdp)")] = 1,
         nodes: NodesOpt = 1, zero: ZeroOpt = None, fsdp: FsdpOpt = None, offload: OffloadOpt = None,
         seq_len: SeqOpt = 2048, checkpointing: CkptOpt = None, lora_rank: RankOpt = None,
         lora_alpha: AlphaOpt = None, lora_targets: TargetsOpt = None, lora_dropout: DropoutOpt = None,
         quant_bits: BitsOpt = None, freeze_trainable_layers: FreezeOpt = None,
         optimizer: Annotated[str | None, typer.Option(help="one name or a comma list to search")] = None,
         attn: Annotated[str, typer.Option(help="one kernel or a comma list to search")] = "auto",
         device: Annotated[str, typer.Option(help="cuda, or cpu with --capacity")] = "cuda",
         capacity: Annotated[str | None, typer.Option(help="cpu: simulated device size, e.g. 200MB")] = None,
         margin: Annotated[float, typer.Option(help="fraction of the card kept free")] = 0.05,
         n_probes: Annotated[int, typer.Option("--n-probes", help="most probes to run")] = 4,
         timeout: Annotated[float | None, typer.Option(help="wall-time cap of the study, seconds")] = None,
         probe_timeout: Annotated[float, typer.Option(help="seconds before one probe is killed")] = 600.0,
         steps: Annotated[int, typer.Option(help="measured steps per probe")] = 3,
         storage: Annotated[str, typer.Option(help="Optuna storage URL (resumes a study of the same name)")]
         = "sqlite:///memplan-tune.db",
         export: Annotated[str | None, typer.Option(help="write the winner: llamafactory | hf | json")] = None,
         output: Annotated[str | None, typer.Option("--output", "-o", help="file for --export")] = None,
         json_out: JsonOpt = False) -> None:
    """Probe few configurations (steered by the estimator) and confirm the fastest one that does not OOM."""
    from memplan.cli import render
    from memplan.errors import ConfigError
    from memplan.fit import usable_bytes
    from memplan.probe.launch import ProbeOptions, probe
    from memplan.spec.catalog import resolve_model
    from memplan.spec.hardware import GPU, resolve_gpu
    from memplan.tune.study import tune as run_tune
    from memplan.units import parse_size

    base, space = search_config(method=method, seq_len=seq_len, lora_rank=lora_rank, lora_alpha=lora_alpha,
                                lora_targets=lora_targets, lora_dropout=lora_dropout, quant_bits=quant_bits,
                                freeze_trainable_layers=freeze_trainable_layers, optimizer=optimizer, attn=attn,
                                precision=precision, checkpointing=checkpointing)
    if (export is None) != (output is None):
        raise ConfigError("--export FORMAT and -o FILE go together")
    if export is not None and export not in ("llamafactory", "hf", "json"):
        raise ConfigError(f"--export {export!r}: choose one of llamafactory|hf|json")
    if device == "cpu":
        if not capacity or gpu:
            raise ConfigError("--device cpu tunes against a simulated device: give --capacity (and no --gpu)")
        card = GPU(name=f"simulated {capacity}", memory_bytes=parse_size(capacity, nominal=True))
    elif device == "cuda":
        if capacity:
            raise ConfigError("--capacity is for --device cpu; on cuda give --gpu")
        card = resolve_gpu(gpu or "auto")
    else:
        raise ConfigError(f"--device must be cuda or cpu, got {device!r}")
    if n_probes <= 0 or gpus <= 0:
        raise ConfigError("--n-probes and --gpus must be positive")
    base = base.with_(gpus=gpus, nodes=nodes, **parse_sharding(zero, fsdp, offload))
    space = {**space, "shardings": [base.sharding]}  # the engine the user runs; fit --gpus compares engines
    spec = resolve_model(model)
    usable = usable_bytes(card, margin)
    popts = ProbeOptions(steps=steps, warmup=1, device=device, timeout_s=probe_timeout,
                         capacity_bytes=usable if device == "cpu" else None,
                         gpu_memory_bytes=usable if device == "cuda" else None)
    progress = None if json_out else render.print_trial
    res = run_tune(spec, base, card, lambda t: probe(spec, t, popts), global_batch=global_batch,
                   usable_bytes=usable, device=device, storage=storage, n_probes=n_probes, timeout_s=timeout,
                   on_trial=progress, **space)  # type: ignore[arg-type]
    if export and output and res.best:
        from pathlib import Path

        from memplan.formats.plan import write_plan

        write_plan(export, spec, res.best.train, Path(output))
    if json_out:
        render.emit_json(render.tune_json(res, spec))
    else:
        render.print_tune(res, spec, card)
    raise typer.Exit(int(ExitCode.OK if res.best else ExitCode.DOES_NOT_FIT))
