"""In-process retune for HF `Trainer` users: `train_with_retune(trainer, model="llama-3-8b")` instead of
`trainer.train()`. On an OOM it re-plans exactly as `memplan run` does (same policy, same effective batch), saves a
checkpoint of the current step (the weights only change at optimizer steps, so they are consistent with
`state.global_step`), sets the new micro-batch / accumulation / checkpointing on `trainer.args`, and continues.

An OOM inside `optimizer.step()` may leave the optimizer half-updated: then (seen by `RetuneCallback`) training
resumes from the newest checkpoint on disk instead.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memplan.formats.hf import apply_to_args, config_from_args
from memplan.probe.oom import is_oom_text
from memplan.run.policy import replan
from memplan.run.supervisor import DecisionLog
from memplan.run.target import fresh_optimizer_view, newest_checkpoint, optimizer_changed
from memplan.spec.catalog import resolve_model
from memplan.spec.hardware import GPU
from memplan.spec.model import ModelSpec
from memplan.spec.train import TrainConfig

try:  # the callback base class, when transformers is installed (it is, for anyone holding a Trainer)
    from transformers import TrainerCallback as _Callback
except ImportError:  # pragma: no cover
    _Callback = object  # type: ignore[misc, assignment]


class RetuneCallback(_Callback):  # type: ignore[misc, valid-type]
    """Knows whether an optimizer step is in flight when an exception arrives."""

    def __init__(self) -> None:
        self.in_optimizer_step = False

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.in_optimizer_step = True

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.in_optimizer_step = False


@dataclass(frozen=True, slots=True, kw_only=True)
class RetuneEvent:
    global_step: int  # optimizer steps completed when the OOM came
    failed: TrainConfig
    chosen: TrainConfig
    resumed_from: str | None
    reason: str


def _is_oom(err: BaseException) -> bool:
    return type(err).__name__ in ("OutOfMemoryError", "SimulatedOOM") or is_oom_text(f"{type(err).__name__}: {err}")


def _apply(trainer: Any, train: TrainConfig) -> None:
    if apply_to_args(trainer.args, train):
        trainer.optimizer, trainer.lr_scheduler = None, None  # rebuilt by train() from args.optim
    trainer._train_batch_size = trainer.args.train_batch_size  # noqa: SLF001 - the dataloader is sized from this


def train_with_retune(trainer: Any, model: ModelSpec | str, *, base: TrainConfig | None = None,
                      gpu: GPU | None = None, max_retries: int = 3, allow_method_change: bool = False,
                      log_path: str | Path | None = None,
                      resume_from_checkpoint: str | None = None) -> list[RetuneEvent]:
    """`trainer.train()`, re-planned and continued after each OOM (at most `max_retries` times); returns the
    re-plans made. The last OOM, or any other exception, propagates."""
    spec = resolve_model(model) if isinstance(model, str) else model
    callback = RetuneCallback()
    trainer.add_callback(callback)
    log = DecisionLog(Path(log_path) if log_path else Path(trainer.args.output_dir) / "memplan-retune.jsonl")
    train = config_from_args(trainer.args, base or TrainConfig())
    failures: list[TrainConfig] = []
    events: list[RetuneEvent] = []
    resume = resume_from_checkpoint
    while True:
        try:
            trainer.train(resume_from_checkpoint=resume)
            log.write("finish", global_step=trainer.state.global_step, retunes=len(events))
            return events
        except Exception as err:
            if not _is_oom(err) or len(events) >= max_retries:
                log.write("finish", global_step=trainer.state.global_step, error=f"{type(err).__name__}: {err}")
                raise
            failures.append(train)
            plan = replan(spec, train, failures, gpu=gpu, allow_method_change=allow_method_change)
            if plan.train is None:
                log.write("finish", global_step=trainer.state.global_step, error=plan.reason)
                raise
        resume = _checkpoint_now(trainer, callback)
        if resume is not None and optimizer_changed(train, plan.train):
            resume = str(fresh_optimizer_view(Path(resume)))
        events.append(RetuneEvent(global_step=trainer.state.global_step, failed=train, chosen=plan.train,
                                  resumed_from=resume, reason=plan.reason))
        log.write("retune", global_step=trainer.state.global_step, failed=train.to_dict(),
                  chosen=plan.train.to_dict(), resume_from=resume, reason=plan.reason)
        train = plan.train
        _apply(trainer, train)


def _checkpoint_now(trainer: Any, callback: RetuneCallback) -> str | None:
    """Free the failed step's memory and save the current step; the newest checkpoint on disk when the OOM hit
    inside the optimizer step (or none when no step completed)."""
    trainer.model.zero_grad(set_to_none=True)
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass
    if callback.in_optimizer_step or trainer.state.global_step == 0:
        callback.in_optimizer_step = False
        newest = newest_checkpoint(trainer.args.output_dir)
        return str(newest) if newest else None
    trainer._save_checkpoint(trainer.model, trial=None)  # noqa: SLF001 - the Trainer's own complete checkpoint
    return str(Path(trainer.args.output_dir) / f"checkpoint-{trainer.state.global_step}")
