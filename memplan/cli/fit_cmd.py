"""`memplan fit`: does it fit, what is fastest, what to change; `fit --probe` (= `memplan tune`) confirms the
fastest with few real probes."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from memplan.cli import app
from memplan.cli.options import (
    SINGLE,
    ConfigOpt,
    ExportOpt,
    GpuOpt,
    JsonOpt,
    MarginOpt,
    OptModel,
    OutputOpt,
    knob_options,
)

GlobalBatchOpt = Annotated[int | None, typer.Option("--global-batch", help="micro x accum x GPUs, kept exact "
                                                    "(default 16, or the --config YAML's)")]
ProbeOpt = Annotated[bool, typer.Option("--probe", help="confirm with real probes (the same as `memplan tune`)")]
DeviceOpt = Annotated[str, typer.Option(help="--probe: cuda, or cpu with --capacity")]
CapacityOpt = Annotated[str | None, typer.Option(help="--probe on cpu: simulated device size, e.g. 200MB")]
NProbesOpt = Annotated[int, typer.Option("--n-probes", help="--probe: most probes to run")]
TimeoutOpt = Annotated[float | None, typer.Option(help="--probe: wall-time cap of the study, seconds")]
ProbeTimeoutOpt = Annotated[float, typer.Option(help="--probe: seconds before one probe is killed")]
StepsOpt = Annotated[int, typer.Option(help="--probe: measured steps per probe")]
StorageOpt = Annotated[str, typer.Option(help="--probe: Optuna storage URL (resumes a study of the same name)")]


@app.command()
@knob_options(*SINGLE)
def fit(gpu: GpuOpt = None, model: OptModel = None, config: ConfigOpt = None, global_batch: GlobalBatchOpt = None,
        margin: MarginOpt = 0.05, top: Annotated[int, typer.Option(help="alternatives shown")] = 5,
        exact: Annotated[bool, typer.Option("--exact", help="re-check the top candidates with fake-tensor traces")]
        = False, export: ExportOpt = None, output: OutputOpt = None, probe: ProbeOpt = False,
        device: DeviceOpt = "cuda", capacity: CapacityOpt = None, n_probes: NProbesOpt = 4,
        timeout: TimeoutOpt = None, probe_timeout: ProbeTimeoutOpt = 600.0, steps: StepsOpt = 3,
        storage: StorageOpt = "sqlite:///memplan-tune.db", json_out: JsonOpt = False, **knobs: Any) -> None:
    """Fits or not on this GPU, the fastest configuration, and what to change when nothing fits; with --probe,
    the fastest confirmed by real probes."""
    if probe:
        _tune(gpu, model, config, global_batch, margin, export, output, device, capacity, n_probes, timeout,
              probe_timeout, steps, storage, json_out, knobs)
        return
    from memplan.errors import ConfigError

    if gpu is None:
        raise ConfigError("fit needs --gpu (a size such as 24GB, a name from `memplan gpus`, or auto)")
    _check_export(export, output)
    _fit(gpu, model, config, global_batch, margin, top, exact, export, output, json_out, knobs)


@app.command()
@knob_options(*SINGLE)
def tune(gpu: Annotated[str | None, typer.Option(help="cuda: the card to fit (size, name, auto)")] = None,
         model: OptModel = None, config: ConfigOpt = None, global_batch: GlobalBatchOpt = None,
         margin: MarginOpt = 0.05, export: ExportOpt = None, output: OutputOpt = None, device: DeviceOpt = "cuda",
         capacity: CapacityOpt = None, n_probes: NProbesOpt = 4, timeout: TimeoutOpt = None,
         probe_timeout: ProbeTimeoutOpt = 600.0, steps: StepsOpt = 3,
         storage: StorageOpt = "sqlite:///memplan-tune.db", json_out: JsonOpt = False, **knobs: Any) -> None:
    """Probe few configurations (steered by the estimator) and confirm the fastest one that does not OOM (the same
    as `memplan fit --probe`)."""
    _tune(gpu, model, config, global_batch, margin, export, output, device, capacity, n_probes, timeout,
          probe_timeout, steps, storage, json_out, knobs)


def _check_export(export: str | None, output: str | None) -> None:
    from memplan.errors import ConfigError
    from memplan.formats.plan import check_format

    if (export is None) != (output is None):
        raise ConfigError("--export FORMAT and -o FILE go together")
    if export is not None:
        check_format(export)


def _plan(model: str | None, config: str | None, global_batch: int | None, knobs: dict[str, Any],
          search_gpus: bool = True) -> tuple:
    """(spec, base, space, the YAML read or None, its Pinned or None): the one path from fit / tune options to
    the search; `search_gpus` lets a sharded YAML without a GPU count search SEARCHED_GPUS (fit, not tune)."""
    from memplan.cli.options import given, model_and_config, search_space
    from memplan.fit.pin import pin_to_config
    from memplan.spec.catalog import resolve_model

    model, lf = model_and_config(model, config)
    typed = given(knobs)
    base, space = search_space(typed, lf.train if lf else None, global_batch)
    pinned = None
    if lf is not None:  # the YAML pins its knobs; micro x accum (and checkpointing unless given) are searched
        pinned = pin_to_config(lf.train, space, set(typed) | ({"global_batch"} if global_batch else set()),
                               gpus_from=lf.gpus_from, search_gpus=search_gpus)
        space = pinned.space
    spec = resolve_model(model)
    if (note := spec.seq_warning(base.seq_len)) is not None:
        import warnings

        warnings.warn(note, stacklevel=1)
    return spec, base, space, lf, pinned


def _fit(gpu: str, model: str | None, config: str | None, global_batch: int | None, margin: float, top: int,
         exact: bool, export: str | None, output: str | None, json_out: bool, knobs: dict[str, Any]) -> None:
    from memplan.cli import render
    from memplan.errors import ConfigError, ExitCode
    from memplan.fit import fit as run_fit
    from memplan.fit import recheck_exact
    from memplan.spec.hardware import resolve_gpu

    if top < 0:
        raise ConfigError(f"--top must be 0 or more, got {top}")
    spec, base, space, lf, pinned = _plan(model, config, global_batch, knobs)
    card = resolve_gpu(gpu)
    written = lf.train.with_(gpus=pinned.gpus, nodes=base.nodes) if lf and pinned else None
    accept = None
    if lf is not None or export == "llamafactory":  # never rank what LLaMA-Factory would refuse to launch
        from memplan.formats.llamafactory import allowed, sft_template

        accept = allowed(spec, lf.raw if lf else sft_template())
    with render.search_progress() as progress:
        res = run_fit(spec, base, card, space, margin=margin, as_written=written, on_progress=progress,
                      accept=accept)
    if exact:
        res = recheck_exact(res, top=min(top, 3))
    files = _export(export, output, spec, res.best.train if res.best else None, lf.raw if lf else None, config)
    if json_out:
        extra = {"as_written": render.candidate_json(res.as_written, spec)} if res.as_written else {}
        notes = {"gpu_note": pinned.note} if pinned and pinned.note else {}
        render.emit_json({**render.fit_json(res), **extra, **notes, "exported": [str(f) for f in files]})
    else:
        if pinned is not None and pinned.note:
            render.note(pinned.note)
        if res.as_written is not None:
            render.print_as_written(res.as_written, res, config)
        render.print_fit(res, top)
    render.print_export(export, output, files, res.best.train if res.best else None)
    raise typer.Exit(int(ExitCode.OK if res.fits else ExitCode.DOES_NOT_FIT))


def _export(export: str | None, output: str | None, spec: Any, train: Any, base: dict | None,
            config: str | None) -> list:
    """The files written for --export (none when nothing fits)."""
    if export and output and train is not None:
        from pathlib import Path

        from memplan.formats.plan import write_plan

        return write_plan(export, spec, train, Path(output), base=base,
                          base_dir=Path(config).parent if config else None)
    return []


def _tune(gpu: str | None, model: str | None, config: str | None, global_batch: int | None, margin: float,
          export: str | None, output: str | None, device: str, capacity: str | None, n_probes: int,
          timeout: float | None, probe_timeout: float, steps: int, storage: str, json_out: bool,
          knobs: dict[str, Any]) -> None:
    import dataclasses

    from memplan.cli import render
    from memplan.cli.options import seconds
    from memplan.errors import ConfigError, ExitCode
    from memplan.probe.launch import ProbeOptions, probe
    from memplan.spec.hardware import GPU, resolve_gpu
    from memplan.tune.study import tune as run_tune
    from memplan.units import parse_size

    _check_export(export, output)
    seconds("--timeout", timeout)
    seconds("--probe-timeout", probe_timeout)
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
    if n_probes <= 0:
        raise ConfigError("--n-probes must be positive")
    spec, base, space, lf, _ = _plan(model, config, global_batch, knobs, search_gpus=False)
    if space.shardings is None:  # the engine the user runs (fit --gpus compares engines; probes cost real time)
        space = dataclasses.replace(space, shardings=(base.sharding,))
    usable = card.usable_bytes(margin)
    popts = ProbeOptions(steps=steps, warmup=1, device=device, timeout_s=probe_timeout,
                         capacity_bytes=usable if device == "cpu" else None,
                         gpu_memory_bytes=usable if device == "cuda" else None)
    progress = None if json_out else render.print_trial
    accept = None
    if lf is not None or export == "llamafactory":  # as fit: never probe what LLaMA-Factory would refuse to launch
        from memplan.formats.llamafactory import allowed, sft_template

        accept = allowed(spec, lf.raw if lf else sft_template())
    res = run_tune(spec, base, card, lambda t: probe(spec, t, popts), space=space, usable_bytes=usable,
                   device=device, storage=storage, n_probes=n_probes, timeout_s=timeout, on_trial=progress,
                   accept=accept)
    files = _export(export, output, spec, res.best.train if res.best else None, lf.raw if lf else None, config)
    if json_out:
        render.emit_json(render.tune_json(res, spec))
    else:
        render.print_tune(res, spec, card)
    render.print_export(export, output, files, res.best.train if res.best else None)
    raise typer.Exit(int(ExitCode.OK if res.best else ExitCode.DOES_NOT_FIT))
