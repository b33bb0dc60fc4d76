"""`memplan fit`: search the open knobs for a fixed effective batch, drop what does not fit, rank by speed.

Everything here is pure Python over the analytic estimator: thousands of configurations in well under a second.
`search` expands the SearchSpace, `speed` predicts tokens/s, `suggest` lists what would make it fit, `pin` keeps a
LLaMA-Factory YAML's knobs; `recheck_exact` re-checks the winners with the exact mode.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable

from memplan.errors import ConfigError
from memplan.fit.result import Candidate, FitResult, Suggestion, evaluate
from memplan.fit.search import search_space
from memplan.fit.speed import predicted_tokens_per_s
from memplan.fit.suggest import suggest
from memplan.predict.breakdown import Verdict
from memplan.predict.cuda import reserved_lower_bound
from memplan.spec.hardware import DEFAULT_MARGIN, GPU
from memplan.spec.model import ModelSpec
from memplan.spec.space import SearchSpace
from memplan.spec.train import TrainConfig

__all__ = ["Candidate", "FitResult", "Suggestion", "evaluate", "fit", "predicted_tokens_per_s", "recheck_exact",
           "search_space"]


PROGRESS_EVERY = 2000  # candidates between two on_progress calls


def fit(spec: ModelSpec, base: TrainConfig, gpu: GPU, space: SearchSpace | None = None, *,
        margin: float = DEFAULT_MARGIN, as_written: TrainConfig | None = None,
        on_progress: Callable[[int, int], None] | None = None,
        accept: Callable[[TrainConfig], bool] | None = None) -> FitResult:
    """Rank every fitting configuration by predicted speed; when none fits, suggest the cheapest changes.
    `as_written` (a config file's own configuration) is judged too, as `FitResult.as_written`; `on_progress(done,
    total)` hears of a long search every PROGRESS_EVERY candidates; `accept` drops candidates the target cannot
    run (LLaMA-Factory's refused combinations) before they are judged."""
    space = space or SearchSpace()
    usable = gpu.usable_bytes(margin)
    every = search_space(base, gpu, space)
    configs = [t for t in every if accept is None or accept(t)]
    if not configs:
        raise ConfigError("every configuration searched is one the target (LLaMA-Factory) refuses: open another "
                          "knob (--precision, --zero / --fsdp)")
    why: Counter[str] = Counter()
    if len(configs) < len(every):
        why["the target (LLaMA-Factory) refuses the combination (its parser's rules)"] = len(every) - len(configs)
    bounds: list[Candidate] = []  # each candidate with reserved at its lower bound (cuda.reserved_lower_bound)
    refused: ConfigError | None = None
    with reserved_lower_bound():
        for i, t in enumerate(configs, 1):
            try:
                bounds.append(evaluate(spec, t, gpu, usable))
            except ConfigError as err:  # a layout the model cannot train (ZeRO-3 / FSDP over a pre-quantized one)
                refused = refused or err
                why[str(err)] += 1
            if on_progress is not None and i % PROGRESS_EVERY == 0:
                on_progress(i, len(configs))
    if not bounds and refused is not None:
        raise refused
    # a bound's total is at most the full estimate's: what does not fit with its band at the bound does not in
    # full, so only the rest replay the allocator
    full = {i: evaluate(spec, c.train, gpu, usable) for i, c in enumerate(bounds) if c.fits}
    ranked = sorted((c for c in full.values() if c.fits), key=lambda c: (-c.tokens_per_s, c.total_bytes))
    smallest = _smallest(spec, bounds, full, gpu, usable)
    suggestions = () if ranked else tuple(suggest(spec, smallest.train, gpu, usable))
    return FitResult(model=spec, gpu=gpu, margin=margin, global_batch=space.global_batch, usable_bytes=usable,
                     ranked=tuple(ranked), searched=len(bounds), best_effort=smallest, suggestions=suggestions,
                     as_written=evaluate(spec, as_written, gpu, usable) if as_written else None,
                     left_out=tuple(f"{n} configuration{'s' * (n > 1)}: {reason}" for reason, n in why.items()))


def _smallest(spec: ModelSpec, bounds: list[Candidate], full: dict[int, Candidate], gpu: GPU,
              usable: int) -> Candidate:
    """The smallest-memory candidate in full (checkpointed first on a tie, the first searched after that), as
    `min` over every full estimate would pick it: candidates are estimated in full in their bounds' order until a
    bound is above the smallest full total found, which no later candidate can then undercut."""
    def key(c: Candidate) -> tuple[int, bool]:
        return c.total_bytes, not c.train.checkpointing

    best: tuple[int, bool] | None = None
    for i in sorted(range(len(bounds)), key=lambda i: key(bounds[i])):
        if best is not None and key(bounds[i]) > best:
            break
        if i not in full:
            full[i] = evaluate(spec, bounds[i].train, gpu, usable)
        best = key(full[i]) if best is None else min(best, key(full[i]))
    return min((full[i] for i in sorted(full) if key(full[i]) == best), key=key)


def recheck_exact(res: FitResult, top: int = 3) -> FitResult:
    """Re-estimate the `top` ranked candidates with the exact mode (fake-tensor traces); drop those that no longer
    fit and keep the order by predicted speed. Needs the `trace` extra."""
    from memplan.trace.exact import exact_estimate

    checked = []
    for cand in res.ranked[:top]:
        if not cand.train.parallel.traceable:
            checked.append(cand)  # DDP / ZeRO / offload: per-rank memory is analytic only
            continue
        bd = exact_estimate(res.model, cand.train)
        verdict = bd.verdict(res.usable_bytes)
        checked.append(dataclasses.replace(cand, breakdown=bd, fits=verdict is Verdict.FITS, verdict=verdict))
    ranked = tuple(c for c in checked if c.fits) + res.ranked[top:]
    return dataclasses.replace(res, ranked=ranked)
