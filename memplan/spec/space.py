"""SearchSpace: the open knobs `fit` and `tune` search for one effective batch (micro x accum x GPUs, exact).

A dimension left as None takes the base configuration's value (precisions: what the GPU supports; checkpointing:
both). `DIMENSIONS` are the TrainConfig fields in which candidates differ; `candidate_key` names one candidate by
them (tune's trial parameters, fit's ranking ties).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields

from memplan.errors import ConfigError, Problem
from memplan.spec.optimizers import Optimizer
from memplan.spec.parallel import Offload, Sharding
from memplan.spec.train import Attention, Precision, TrainConfig

DIMENSIONS = ("batch_size", "grad_accum", "precision", "checkpointing", "lora_rank", "optimizer", "attn", "gpus",
              "sharding", "offload")


@dataclass(frozen=True, slots=True, kw_only=True)
class SearchSpace:
    global_batch: int = 16  # micro x accum x GPUs, kept exact
    precisions: tuple[Precision, ...] | None = None
    checkpointing: tuple[bool, ...] | None = None
    lora_ranks: tuple[int, ...] | None = None
    optimizers: tuple[Optimizer, ...] | None = None
    attentions: tuple[Attention, ...] | None = None
    gpu_counts: tuple[int, ...] | None = None
    shardings: tuple[Sharding, ...] | None = None  # None with several GPUs: DDP, ZeRO 1/2/3 and FSDP are compared
    offloads: tuple[Offload, ...] | None = None

    def __post_init__(self) -> None:
        problems: list[str | Problem] = []
        if not isinstance(self.global_batch, int) or isinstance(self.global_batch, bool) or self.global_batch <= 0:
            problems.append(Problem("global_batch", f"{{}} must be a positive integer, got {self.global_batch!r}"))
        for name, values in (("lora_ranks", self.lora_ranks), ("gpu_counts", self.gpu_counts)):
            if values is not None and (not values or any(not isinstance(v, int) or v <= 0 for v in values)):
                problems.append(Problem(name, f"{{}} must be positive integers, got {list(values)}"))
        for f in fields(self):
            if getattr(self, f.name) == ():
                problems.append(Problem(f.name, "{} is empty: give at least one value"))
        if problems:
            raise ConfigError(problems)

    def key(self) -> str:
        """A stable text of the whole space (study names)."""
        return json.dumps({f.name: _plain(getattr(self, f.name)) for f in fields(self)}, sort_keys=True)


def _plain(value: object) -> object:
    if isinstance(value, tuple):
        return [getattr(v, "value", v) for v in value]
    return value


def candidate_params(train: TrainConfig) -> dict[str, object]:
    """The DIMENSIONS of one candidate as JSON-ready values."""
    d = train.to_dict()
    return {k: d[k] for k in DIMENSIONS}


def candidate_key(train: TrainConfig) -> str:
    return json.dumps(candidate_params(train), sort_keys=True)
