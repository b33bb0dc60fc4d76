"""memplan's own plan JSON, and `write_plan`: a plan in any export format, to a file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from memplan.errors import ConfigError
from memplan.spec.model import ModelSpec
from memplan.spec.train import TrainConfig

FORMATS = ("llamafactory", "hf", "json")


def plan_json(spec: ModelSpec, train: TrainConfig) -> dict[str, Any]:
    return {"model": spec.name, "model_type": spec.model_type, "config": train.to_dict()}


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ConfigError(f"--export {fmt!r}: choose one of {'|'.join(FORMATS)}")


def write_plan(fmt: str, spec: ModelSpec, train: TrainConfig, path: Path, base: dict[str, Any] | None = None,
               base_dir: Path | None = None) -> list[Path]:
    """Write the plan in `fmt` (llamafactory | hf | json) to `path`; returns the files written. A LLaMA-Factory
    `base` YAML (from `base_dir`) keeps its keys; without one, configs/templates/sft.yaml is the base, and a ZeRO
    plan gets its DeepSpeed JSON beside `path`."""
    check_format(fmt)
    if fmt == "llamafactory":
        from memplan.formats.llamafactory import sft_template, write_llamafactory

        return write_llamafactory(spec, train, path, base if base is not None else sft_template(), base_dir)
    if fmt == "hf":
        from memplan.formats.hf import hf_training_kwargs

        text = json.dumps(hf_training_kwargs(train), indent=2) + "\n"
    else:
        text = json.dumps(plan_json(spec, train), indent=2) + "\n"
    try:
        path.write_text(text)
    except OSError as err:
        raise ConfigError(f"cannot write {path}: {err.strerror}") from None
    return [path]
