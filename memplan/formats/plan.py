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


def write_plan(fmt: str, spec: ModelSpec, train: TrainConfig, path: Path, base: dict[str, Any] | None = None) -> None:
    """Write the plan in `fmt` (llamafactory | hf | json) to `path`; a LLaMA-Factory `base` YAML keeps its keys."""
    check_format(fmt)
    if fmt == "llamafactory":
        import yaml

        from memplan.formats.llamafactory import llamafactory_yaml

        text = yaml.safe_dump(llamafactory_yaml(spec, train, base), sort_keys=False)
    elif fmt == "hf":
        from memplan.formats.hf import hf_training_kwargs

        text = json.dumps(hf_training_kwargs(train), indent=2) + "\n"
    else:
        text = json.dumps(plan_json(spec, train), indent=2) + "\n"
    try:
        path.write_text(text)
    except OSError as err:
        raise ConfigError(f"cannot write {path}: {err.strerror}") from None
