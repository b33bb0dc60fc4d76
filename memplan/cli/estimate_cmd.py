"""`memplan estimate` and `memplan trace`: the peak-memory breakdown of one configuration."""

from __future__ import annotations

import os
import warnings
from typing import Annotated, Any

import typer

from memplan.cli import app
from memplan.cli.options import SINGLE, ConfigOpt, GpuOpt, JsonOpt, MarginOpt, OptModel, knob_options

ExplainOpt = Annotated[bool, typer.Option("--explain", help="the formula behind each term")]
ByModuleOpt = Annotated[bool, typer.Option("--by-module", help="exact mode: live bytes at the peak by the module "
                                                               "that allocated them")]
RemoteOpt = Annotated[bool, typer.Option("--trust-remote-code", help="exact mode: allow the model's own code")]
TimelineOpt = Annotated[str | None, typer.Option("--timeline", metavar="FILE.html",
                                                 help="write the step's memory over its operations as one "
                                                      "self-contained HTML page (phases, layers, the peak's op "
                                                      "and module, the largest tensors live at the peak)")]


@app.command()
@knob_options(*SINGLE)
def estimate(model: OptModel = None, config: ConfigOpt = None, gpu: GpuOpt = None, margin: MarginOpt = 0.05,
             explain: ExplainOpt = False,
             exact: Annotated[bool, typer.Option("--exact", help="trace the real transformers model on fake "
                                                 "tensors (needs memplan\\[trace]); the same as `memplan trace`")]
             = False,
             by_module: ByModuleOpt = False, trust_remote_code: RemoteOpt = False, json_out: JsonOpt = False,
             **knobs: Any) -> None:
    """Peak VRAM of one configuration, term by term (architectures the formulas do not know: the exact mode)."""
    _estimate(model, config, gpu, margin, explain, exact, by_module, trust_remote_code, json_out, knobs)


@app.command()
@knob_options(*SINGLE)
def trace(model: OptModel = None, config: ConfigOpt = None, gpu: GpuOpt = None, margin: MarginOpt = 0.05,
          explain: ExplainOpt = False, by_module: ByModuleOpt = False, trust_remote_code: RemoteOpt = False,
          json_out: JsonOpt = False, timeline: TimelineOpt = None, **knobs: Any) -> None:
    """Exact mode: run the real transformers model's training step on fake tensors and count live bytes (no GPU,
    no weights; needs memplan\\[trace])."""
    _estimate(model, config, gpu, margin, explain, True, by_module, trust_remote_code, json_out, knobs, timeline)


def _estimate(model: str | None, config: str | None, gpu: str | None, margin: float, explain: bool, exact: bool,
              by_module: bool, trust_remote_code: bool, json_out: bool, knobs: dict[str, Any],
              timeline: str | None = None) -> None:
    from memplan.cli import render
    from memplan.cli.options import given, model_and_config, train_config
    from memplan.errors import ExitCode
    from memplan.predict.breakdown import Verdict
    from memplan.spec.catalog import resolve_model
    from memplan.spec.dtypes import dtype_warning
    from memplan.spec.hardware import resolve_gpu
    from memplan.spec.prequantized import train_for
    from memplan.trace.exact import estimate_any

    model, lf = model_and_config(model, config)
    train = train_config(given(knobs), lf.train if lf else None, command="estimate")
    if lf is not None and lf.gpus_from is None and "gpus" not in given(knobs) and train.sharding.value != "none":
        warnings.warn(f"--config {config}: it shards ({train.sharding.value}) but names no GPU count (no --gpus, "
                      "NPROC_PER_NODE or launch line): estimated on 1 GPU; give --gpus N", stacklevel=1)
    spec = resolve_model(model, trust_remote_code=trust_remote_code)
    if lf is None or lf.generation is None:
        train = train_for(spec, train)  # adapters over a pre-quantized checkpoint: QLoRA over its storage
    if (note := spec.seq_warning(train.seq_len)) is not None:
        warnings.warn(note, stacklevel=1)
    if (note := dtype_warning(train.stack, train.precision, spec.checkpoint_dtype, train.method)) is not None:
        warnings.warn(note, stacklevel=1)
    card = resolve_gpu(gpu) if gpu is not None else None
    usable = card.usable_bytes(margin) if card else None
    if lf is not None and lf.generation is not None:  # a prediction run: inference memory
        from memplan.predict.generation import generation_estimate

        bd = generation_estimate(spec, lf.generation)
    elif timeline is not None:
        bd = _with_timeline(spec, train, timeline, trust_remote_code, by_module)
    else:
        bd = estimate_any(spec, train, exact=exact, trust_remote_code=trust_remote_code, by_module=by_module)
    if json_out:
        render.emit_json(render.estimate_json(spec, train, bd, card, usable))
    else:
        render.print_estimate(spec, train, bd, card, usable, explain)
    if usable is not None and bd.verdict(usable) is Verdict.DOES_NOT_FIT:
        raise typer.Exit(int(ExitCode.DOES_NOT_FIT))


def _with_timeline(spec: Any, train: Any, path: str, trust_remote_code: bool, by_module: bool) -> Any:
    """The exact mode with every allocation labelled, and its timeline page written to `path`."""
    from memplan.cli import render
    from memplan.errors import ConfigError
    from memplan.trace.exact import exact_run
    from memplan.trace.timeline import write_timeline

    if not path.endswith((".html", ".htm")):
        raise ConfigError(f"--timeline {path}: the timeline is an HTML page: give a FILE.html")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):  # said before the trace, not after it
        raise ConfigError(f"--timeline {path}: {folder} is not a folder this user can write to")
    run = exact_run(spec, train, trust_remote_code=trust_remote_code, by_module=by_module, labels=True)
    try:
        size = write_timeline(path, run, spec, render.page_title(spec, train))
    except OSError as err:
        raise ConfigError(f"--timeline {path}: cannot write it: {err.strerror or err}") from None
    render.note_stderr(f"timeline: {path} ({size / 2**20:.2f} MiB; open it in a browser)")
    return run.breakdown
