"""The reference step (README "The memory model", as HF Trainer runs it): for each optimizer step, `grad_accum`
micro-steps of `loss = model(input_ids=ids, labels=ids).loss; loss.backward()`, then `optimizer.step();
zero_grad(set_to_none=True)`. Trainer's compute_loss keeps only the loss, so the logits are released before
backward. The exact trace, the probe and the CPU ground truth all run this function."""

from __future__ import annotations

import contextlib
from typing import Any

from memplan._imports import try_import
from memplan.build.model import compute_dtype
from memplan.spec.train import Precision, TrainConfig

PHASES = ("forward", "backward", "optimizer")


def reference_step(model: Any, optimizer: Any, train: TrainConfig, ids: Any, mark: Any, steps: int = 2,
                   record_losses: bool = True, first: int = 1) -> list[float]:
    """Run `steps` optimizer steps of the reference step, numbered from `first`; `mark(name)` returns a context
    manager per phase. record_losses=False for fake tensors, whose values cannot be read."""
    torch = try_import("torch")
    amp = train.precision in (Precision.FP16, Precision.BF16)
    losses = []
    for step in range(first, first + steps):
        for _ in range(train.grad_accum):
            with mark(f"forward:{step}"):
                ctx = torch.autocast("cpu", dtype=compute_dtype(train)) if amp else contextlib.nullcontext()
                with ctx:
                    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            with mark(f"backward:{step}"):
                (loss / train.grad_accum).backward()
            if record_losses:
                losses.append(float(loss.detach()))
            del loss
        with mark(f"optimizer:{step}"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return losses
