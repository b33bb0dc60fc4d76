"""`memplan probe`: a few real training steps in a child process, measured."""

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
    DropoutOpt,
    FreezeOpt,
    FsdpOpt,
    JsonOpt,
    MethodOpt,
    Model,
    NodesOpt,
    OffloadOpt,
    OptimOpt,
    PrecisionOpt,
    RankOpt,
    SeqOpt,
    TargetsOpt,
    ZeroOpt,
    build_config,
    one_rank,
    parse_sharding,
)
from memplan.errors import ExitCode


@app.command()
def probe(model: Model, method: MethodOpt = "lora", precision: PrecisionOpt = None, batch_size: BatchOpt = 1,
          grad_accum: AccumOpt = 1, seq_len: SeqOpt = 2048, checkpointing: CkptOpt = None,
          lora_rank: RankOpt = None, lora_alpha: AlphaOpt = None, lora_targets: TargetsOpt = None,
          lora_dropout: DropoutOpt = None, quant_bits: BitsOpt = None, freeze_trainable_layers: FreezeOpt = None,
          optimizer: OptimOpt = "adamw", attn: AttnOpt = "auto",
          steps: Annotated[int, typer.Option(help="measured optimizer steps")] = 3,
          warmup: Annotated[int, typer.Option(help="optimizer steps before measuring")] = 1,
          device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
          capacity: Annotated[str | None, typer.Option(help="cpu: simulated device size, e.g. 200MB")] = None,
          gpu: Annotated[str | None, typer.Option(help="cuda: cap the process to this card size (24GB)")] = None,
          gpu_fraction: Annotated[float | None, typer.Option(help="cuda: cap to this fraction")] = None,
          timeout: Annotated[float, typer.Option(help="seconds before the probe is killed")] = 600.0,
          gpus: Annotated[int, typer.Option("--gpus", help="ranks: >1 launches torchrun (DDP, or --zero / --fsdp) "
                                                           "and reports the fullest rank (per-rank in --json)")] = 1,
          nodes: NodesOpt = 1, zero: ZeroOpt = None, fsdp: FsdpOpt = None, offload: OffloadOpt = None,
          no_cache: Annotated[bool, typer.Option("--no-cache", help="run even if a result is cached")] = False,
          json_out: JsonOpt = False) -> None:
    """Run a few real training steps in an isolated process and measure peak memory and throughput."""
    from memplan.cli import render
    from memplan.errors import ConfigError
    from memplan.predict.estimator import estimate
    from memplan.probe.launch import ProbeOptions
    from memplan.probe.launch import probe as run_probe
    from memplan.probe.result import ProbeStatus
    from memplan.spec.catalog import resolve_model
    from memplan.spec.hardware import resolve_gpu
    from memplan.units import parse_size

    train = build_config(method=method, precision=precision, batch_size=batch_size, grad_accum=grad_accum,
                         seq_len=seq_len, checkpointing=checkpointing, lora_rank=one_rank(lora_rank, "probe"),
                         lora_alpha=lora_alpha, lora_targets=lora_targets, lora_dropout=lora_dropout,
                         quant_bits=quant_bits, freeze_trainable_layers=freeze_trainable_layers,
                         optimizer=optimizer, attn=attn).with_(gpus=gpus, nodes=nodes,
                                                               **parse_sharding(zero, fsdp, offload))
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"--device must be cpu or cuda, got {device!r}")
    if device == "cpu" and (gpu or gpu_fraction):
        raise ConfigError("--gpu / --gpu-fraction cap a CUDA device; on cpu use --capacity")
    if device == "cuda" and capacity:
        raise ConfigError("--capacity simulates a device on cpu; on cuda use --gpu 24GB or --gpu-fraction")
    if gpu_fraction is not None and not 0 < gpu_fraction <= 1:
        raise ConfigError(f"--gpu-fraction must be in (0, 1], got {gpu_fraction}")
    spec = resolve_model(model)
    cap = resolve_gpu(gpu).memory_bytes if gpu else None
    opts = ProbeOptions(steps=steps, warmup=warmup, device=device, timeout_s=timeout, use_cache=not no_cache,
                        capacity_bytes=parse_size(capacity, nominal=True) if capacity else None,
                        gpu_memory_bytes=cap, gpu_fraction=gpu_fraction)
    if json_out:
        result = run_probe(spec, train, opts)
    else:
        with render.console.status("probe: starting") as status:
            result = run_probe(spec, train, opts, on_progress=lambda s: status.update(f"probe: {s}"))
    predicted = estimate(spec, train, device=device)
    if json_out:
        render.emit_json({"model": {"name": spec.name, "parameters": spec.num_parameters},
                          "config": render.config_dict(spec, train), "probe": result.to_dict(),
                          "estimate": predicted.memory_dict()})
    else:
        render.print_probe(result, predicted)
    code = {ProbeStatus.OK: ExitCode.OK, ProbeStatus.OOM: ExitCode.DOES_NOT_FIT}.get(result.status,
                                                                                     ExitCode.PROBE_FAILED)
    raise typer.Exit(int(code))
