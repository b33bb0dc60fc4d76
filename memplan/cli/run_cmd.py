"""`memplan run -- COMMAND ...`: launch the training; after an OOM re-plan, rewrite the config copy, resume."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from memplan.cli import app
from memplan.cli.options import ConfigOpt, GpuOpt, OptModel, knob_options


@app.command(context_settings={"allow_interspersed_args": False})
@knob_options("method", "seq_len", "lora_rank", "lora_alpha", "lora_targets", "lora_dropout", "stack")
def run(command: Annotated[list[str] | None, typer.Argument(help="the training command, after --")] = None,
        config: ConfigOpt = None, model: OptModel = None, gpu: GpuOpt = None,
        max_retries: Annotated[int, typer.Option("--max-retries", help="relaunches after an OOM")] = 3,
        log: Annotated[str | None, typer.Option(help="JSON lines decision log (default: beside the config, or "
                                                     "in the output dir)")] = None,
        allow_method_change: Annotated[bool, typer.Option("--allow-method-change",
                                                          help="after the other changes, LoRA may become QLoRA")]
        = False, **knobs: Any) -> None:
    """Launch COMMAND (no shell); on an OOM re-plan with the same effective batch and resume from the newest
    checkpoint. The config comes from --config (a LLaMA-Factory YAML the command names) or from the command's
    HF TrainingArguments flags (--per_device_train_batch_size, --gradient_accumulation_steps, ...); without
    --config, --method says what the script trains."""
    from pathlib import Path

    from memplan.cli import render
    from memplan.cli.options import given, train_config
    from memplan.errors import ConfigError
    from memplan.run.supervisor import RunOptions, open_target, supervise
    from memplan.spec.catalog import resolve_model
    from memplan.spec.hardware import resolve_gpu

    typed = given(knobs, tuple(knobs))
    base = None
    if config is None:
        if "method" not in typed:
            raise ConfigError("without --config, say what the script trains: --method full|freeze|lora|qlora "
                              "(and --model unless the command has --model_name_or_path)")
        base = train_config(typed, command="run")
    target = open_target(list(command or []), config, base)
    name = model or target.model
    if name is None:
        raise ConfigError("no model: give --model, or --model_name_or_path in the command")
    spec = resolve_model(name)
    options = RunOptions(max_retries=max_retries, log_path=Path(log) if log else None,
                         gpu=resolve_gpu(gpu) if gpu else None, allow_method_change=allow_method_change,
                         env={"PYTHONUNBUFFERED": "1"})
    result = supervise(spec, target, options, echo=render.echo_raw)
    render.print_run(result)
    raise typer.Exit(result.exit_code)
