"""Fit's result types and the one verdict: a candidate fits when its total (reserved + context) is within the
card's usable bytes."""

from __future__ import annotations

from dataclasses import dataclass, field

from memplan.fit.speed import predicted_tokens_per_s
from memplan.predict.breakdown import Breakdown, Verdict
from memplan.predict.estimator import estimate
from memplan.spec.hardware import GPU
from memplan.spec.model import ModelSpec
from memplan.spec.train import TrainConfig


@dataclass(frozen=True, slots=True, kw_only=True)
class Candidate:
    train: TrainConfig
    breakdown: Breakdown
    fits: bool
    tokens_per_s: float  # predicted, per GPU

    @property
    def total_bytes(self) -> int:
        return self.breakdown.total_bytes

    verdict: Verdict = Verdict.DOES_NOT_FIT  # fits = verdict is FITS: the band, too, within the card


@dataclass(frozen=True, slots=True, kw_only=True)
class Suggestion:
    change: str  # e.g. "turn on gradient checkpointing"
    candidate: Candidate


@dataclass(frozen=True, slots=True, kw_only=True)
class FitResult:
    model: ModelSpec
    gpu: GPU
    margin: float
    global_batch: int
    usable_bytes: int
    ranked: tuple[Candidate, ...]  # fitting candidates, fastest first
    searched: int
    best_effort: Candidate  # the smallest-memory candidate when nothing fits
    suggestions: tuple[Suggestion, ...] = field(default=())
    as_written: Candidate | None = None  # fit --config: the YAML's own configuration, judged the same way
    # candidates the search did not judge, one "N configurations: why" line per reason (the target refuses the
    # combination; the estimate refuses the layout)
    left_out: tuple[str, ...] = ()

    @property
    def fits(self) -> bool:
        return bool(self.ranked)

    @property
    def best(self) -> Candidate | None:
        return self.ranked[0] if self.ranked else None

    @property
    def fewest_gpus(self) -> Candidate | None:
        """The fitting candidate with the fewest GPUs (the fastest among those)."""
        return min(self.ranked, key=lambda c: (c.train.gpus, -c.tokens_per_s)) if self.ranked else None


def evaluate(spec: ModelSpec, train: TrainConfig, gpu: GPU, usable: int) -> Candidate:
    bd = estimate(spec, train)
    verdict = bd.verdict(usable)
    return Candidate(train=train, breakdown=bd, fits=verdict is Verdict.FITS, verdict=verdict,
                     tokens_per_s=predicted_tokens_per_s(spec, train, gpu))
