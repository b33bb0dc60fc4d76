"""Exact CPU ground truth (NOTES §3): the allocator peak of the reference training step, from profiler events.

The reference step (NOTES §1, as HF Trainer runs it): for two optimizer steps, `grad_accum` micro-steps of
`loss = model(input_ids=ids, labels=ids).loss; loss.backward()`, then `optimizer.step(); zero_grad(set_to_none)`.
Trainer's compute_loss keeps only the loss, so the logits are released before backward.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

from memplan._imports import try_import
from memplan.spec.model import ModelSpec
from memplan.spec.train import Precision, TrainConfig
from memplan.trace.build import build_model, build_optimizer, compute_dtype

PHASES = ("forward", "backward", "optimizer")


@dataclass(frozen=True, slots=True, kw_only=True)
class Truth:
    peak_bytes: int  # max live bytes (parameters + everything allocated) over the reference step
    phase: str  # forward / backward / optimizer, where the peak happened
    step: int  # 1 or 2
    baseline_bytes: int  # parameters and buffers before the first step
    phase_peaks: dict[str, int]  # "forward:2" -> peak live bytes inside that phase
    peak_op: str  # the innermost profiled op running at the peak (e.g. aten::_log_softmax_backward_data)
    losses: tuple[float, ...]


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


def measure_cpu_peak(spec: ModelSpec, train: TrainConfig, *, seed: int = 0) -> Truth:
    """Build the model with random weights on CPU, run the reference step under the profiler, return the peak."""
    torch = try_import("torch")
    torch.manual_seed(seed)
    model = build_model(spec, train, device="cpu")
    optimizer = build_optimizer(model, train)
    ids = torch.randint(0, spec.vocab_size, (train.batch_size, train.seq_len))
    seen: set[int] = set()
    baseline = 0
    for t in list(model.parameters()) + list(model.buffers()):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            baseline += t.untyped_storage().nbytes()
    baseline += ids.untyped_storage().nbytes()
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        losses = reference_step(model, optimizer, train, ids, record_function)
    events = list(prof.profiler.kineto_results.events())
    marks = sorted((e.start_ns(), e.start_ns() + e.duration_ns(), e.name()) for e in events
                   if e.name().split(":")[0] in PHASES)
    mem = sorted((e.start_ns(), e.nbytes()) for e in events
                 if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live, peak, peak_ns = 0, 0, 0
    phase_peaks: dict[str, int] = {}
    spans = iter(marks)
    span = next(spans, None)
    for ts, nbytes in mem:
        live += nbytes
        while span is not None and ts > span[1]:
            span = next(spans, None)
        if span is not None and span[0] <= ts:
            phase_peaks[span[2]] = max(phase_peaks.get(span[2], 0), baseline + live)
        if live > peak:
            peak, peak_ns = live, ts
    phase, step = "forward", 1
    for start, end, name in marks:
        if start <= peak_ns <= end:
            phase, step = name.split(":")[0], int(name.split(":")[1])
    running = [(e.duration_ns(), e.name()) for e in events if e.name() != "[memory]"
               and e.start_ns() <= peak_ns <= e.start_ns() + e.duration_ns()]
    return Truth(peak_bytes=baseline + peak, phase=phase, step=step, baseline_bytes=baseline,
                 phase_peaks=phase_peaks, peak_op=min(running)[1] if running else "", losses=tuple(losses))
