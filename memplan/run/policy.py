"""After an OOM, pick the next configuration. Pure: the analytic estimator plus the failures seen so far.

The evidence: a configuration that ran out of memory is infeasible, and so is everything the estimator predicts to
be at least as large (whatever the estimate's error, it is monotone in the knobs). The next configuration keeps
the effective batch (micro x accum x GPUs) and walks the issue's order: a smaller micro-batch with more
accumulation, then gradient checkpointing, then an 8-bit optimizer; a different method only when allowed.
"""

from __future__ import annotations

from dataclasses import dataclass

from memplan.fit import predicted_tokens_per_s
from memplan.predict.estimator import estimate
from memplan.spec.hardware import GPU
from memplan.spec.model import ModelSpec
from memplan.spec.train import Method, Optimizer, TrainConfig

SAFETY = 0.95  # the next configuration must be predicted at most 95 % of the smallest failed one


@dataclass(frozen=True, slots=True, kw_only=True)
class Replan:
    train: TrainConfig | None  # None: nothing left to try within what is allowed
    reason: str
    predicted_bytes: int = 0
    bound_bytes: int = 0  # predicted bytes of the smallest failure x SAFETY


def _stages(cur: TrainConfig, allow_method_change: bool) -> list[tuple[str, dict[str, object]]]:
    stages: list[tuple[str, dict[str, object]]] = [("smaller micro-batch, more accumulation", {})]
    if not cur.checkpointing:
        stages.append(("gradient checkpointing", dict(checkpointing=True)))
    if cur.optimizer in (Optimizer.ADAMW, Optimizer.ADAMW_FUSED):
        stages.append(("8-bit AdamW", dict(optimizer=Optimizer.ADAMW_8BIT)))
    if allow_method_change and cur.method is Method.LORA:  # same adapters: the checkpoint still resumes
        stages.append(("QLoRA 4-bit", dict(method=Method.QLORA, quant_bits=4)))
    return stages


def replan(spec: ModelSpec, current: TrainConfig, failures: list[TrainConfig], *, gpu: GPU | None = None,
           allow_method_change: bool = False) -> Replan:
    """The fastest configuration of the earliest stage that is predicted below every failure (and below the GPU,
    when one is given), with the effective batch of `current`."""
    # the bound applies to what the knobs change: the allocated peak (the fixed CUDA context would dominate the
    # 95 % rule for small models and no configuration would ever be tried)
    bound = int(min(estimate(spec, f).peak_allocated_bytes for f in [current, *failures]) * SAFETY)
    per_rank = current.batch_size * current.grad_accum
    micros = [b for b in range(current.batch_size, 0, -1) if per_rank % b == 0]  # never a larger micro-batch
    changes: dict[str, object] = {}
    done: list[str] = []
    for label, change in _stages(current, allow_method_change):
        changes.update(change)  # stages accumulate: checkpointing stays on when the optimizer changes too
        done.append(label)
        options = []
        for b in micros:
            t = current.with_(**changes, batch_size=b, grad_accum=per_rank // b)
            if t == current or t in failures:
                continue
            bd = estimate(spec, t)
            peak = bd.peak_allocated_bytes
            if peak <= bound and (gpu is None or bd.total_bytes <= gpu.memory_bytes):
                options.append((predicted_tokens_per_s(spec, t, gpu) if gpu else b, peak, t))
        if options:
            _, peak, best = max(options, key=lambda o: (o[0], -o[1]))
            return Replan(train=best, reason=" + ".join(done), predicted_bytes=peak, bound_bytes=bound)
    return Replan(train=None, bound_bytes=bound,
                  reason="nothing with the same effective batch is predicted below the failed configurations"
                         + ("" if allow_method_change or current.method is not Method.LORA
                            else " (--allow-method-change would also try QLoRA)"))
