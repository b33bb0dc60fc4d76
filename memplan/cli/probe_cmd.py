"""`memplan probe`: a few real training steps in a child process, measured."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from memplan.cli import app
from memplan.cli.options import SINGLE, JsonOpt, Model, knob_options


@app.command()
@knob_options(*SINGLE)
def probe(model: Model, steps: Annotated[int, typer.Option(help="measured optimizer steps")] = 3,
          warmup: Annotated[int, typer.Option(help="optimizer steps before measuring")] = 1,
          device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
          capacity: Annotated[str | None, typer.Option(help="cpu: simulated device size, e.g. 200MB")] = None,
          gpu: Annotated[str | None, typer.Option(help="cuda: cap the process to this card size (24GB)")] = None,
          gpu_fraction: Annotated[float | None, typer.Option(help="cuda: cap to this fraction")] = None,
          timeout: Annotated[float, typer.Option(help="seconds before the probe is killed")] = 600.0,
          no_cache: Annotated[bool, typer.Option("--no-cache", help="run even if a result is cached")] = False,
          json_out: JsonOpt = False, **knobs: Any) -> None:
    """Run a few real training steps in an isolated process and measure peak memory and throughput (--gpus N
    launches N ranks under torchrun and reports the fullest)."""
    from memplan.cli import render
    from memplan.cli.options import given, seconds, train_config
    from memplan.errors import ConfigError, ExitCode, MemplanError
    from memplan.probe.launch import ProbeOptions
    from memplan.probe.launch import probe as run_probe
    from memplan.probe.result import ProbeStatus
    from memplan.spec.catalog import resolve_model
    from memplan.spec.hardware import resolve_gpu
    from memplan.trace.exact import estimate_any
    from memplan.units import parse_size

    train = train_config(given(knobs), command="probe")
    seconds("--timeout", timeout)
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
    try:  # the measurement stands on its own: a model no estimator handles is shown without a comparison
        predicted = estimate_any(spec, train, device=device)
    except MemplanError:
        predicted = None
    if json_out:
        render.emit_json({"model": {"name": spec.name, "parameters": spec.num_parameters},
                          "config": render.config_dict(spec, train), "probe": result.to_dict(),
                          "estimate": predicted.memory_dict() if predicted else None})
    else:
        render.print_probe(result, predicted)
    code = {ProbeStatus.OK: ExitCode.OK, ProbeStatus.OOM: ExitCode.DOES_NOT_FIT}.get(result.status,
                                                                                     ExitCode.PROBE_FAILED)
    raise typer.Exit(int(code))
