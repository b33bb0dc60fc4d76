"""Exact CPU ground truth: the allocator peak of the reference training step, from the profiler's memory events.

PyTorch's CPU allocator does not cache, so its memory events are the truth: accumulate them in time order, take
the running maximum, add the parameters and buffers alive before. Deterministic to the byte; the oracle every
estimator is judged against in tests and benchmarks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from memplan._imports import try_import
from memplan.build.model import build_model, build_optimizer, build_reference_model
from memplan.build.step import PHASES, reference_step
from memplan.build.visual import has_images, visual_batch
from memplan.spec.model import ModelSpec
from memplan.spec.train import TrainConfig


@dataclass(frozen=True, slots=True, kw_only=True)
class Truth:
    peak_bytes: int  # max live bytes (parameters + everything allocated) over the reference step
    phase: str  # forward / backward / optimizer, where the peak happened
    step: int  # 1 or 2
    baseline_bytes: int  # parameters and buffers before the first step
    phase_peaks: dict[str, int]  # "forward:2" -> peak live bytes inside that phase
    peak_op: str  # the innermost profiled op running at the peak (e.g. aten::_log_softmax_backward_data)
    losses: tuple[float, ...]


@contextlib.contextmanager
def no_stray_frees() -> Iterator[None]:
    """The profiled live bytes start from the resident model: garbage of earlier work (a reference cycle holding
    tensors) freed by Python's cycle collector inside the window would count as negative bytes and lower the peak
    by an amount that depends on what ran before (seen: -1.1 % after the optimizer tests). Collect it first; no
    collection inside."""
    import gc

    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def measure_cpu_peak(spec: ModelSpec, train: TrainConfig, *, seed: int = 0) -> Truth:
    """Build the model with random weights on CPU, run the reference step under the profiler, return the peak."""
    torch = try_import("torch")
    torch.manual_seed(seed)
    model = build_model(spec, train, device="cpu")
    ref_model = build_reference_model(spec, train, device="cpu")  # DPO full / freeze: its frozen reference
    optimizer = build_optimizer(model, train)
    ids = torch.randint(0, spec.vocab_size, (train.batch_size, train.seq_len))
    visual = None
    if has_images(spec, train):  # a VL step: the collator's batch (the tower computes its own index tensors)
        batch = visual_batch(model, spec, train, seed=seed)
        ids = batch["input_ids"]
        visual = {k: batch[k] for k in ("pixel_values", "image_grid_thw", "position_ids")}
    baseline = resident_bytes(_resident(model) + (_resident(ref_model) if ref_model is not None else []))
    baseline += ids.untyped_storage().nbytes() + resident_bytes(list((visual or {}).values()))
    from torch.profiler import ProfilerActivity, profile, record_function

    with no_stray_frees(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        losses = reference_step(model, optimizer, train, ids, record_function, ref_model=ref_model, visual=visual)
    events = list(prof.profiler.kineto_results.events())
    marks = sorted((e.start_ns(), e.start_ns() + e.duration_ns(), e.name()) for e in events
                   if e.name().split(":")[0] in PHASES)
    mem = cpu_memory_events(events)
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


def cpu_memory_events(events: list) -> list[tuple[int, int]]:
    """(start_ns, +allocated / -freed bytes) of the CPU allocator's `[memory]` events of a profile, in time order."""
    torch = try_import("torch")
    return sorted((e.start_ns(), e.nbytes()) for e in events
                  if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)


def resident_bytes(tensors: list) -> int:
    """Bytes of the distinct storages behind `tensors` (tied weights counted once)."""
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def _resident(model: object) -> list:
    """Parameters, buffers and the tensors of bitsandbytes quant states (absmax, codes: attributes of a
    Params4bit's `quant_state`, neither parameters nor buffers, yet allocated before the step)."""
    torch = try_import("torch")
    out = list(model.parameters()) + list(model.buffers())  # type: ignore[attr-defined]
    todo = [p.quant_state for p in model.parameters() if getattr(p, "quant_state", None) is not None]  # type: ignore[attr-defined]
    while todo:
        state = todo.pop()
        for value in vars(state).values():
            if isinstance(value, torch.Tensor):
                out.append(value)
            elif value is not None and hasattr(value, "absmax"):  # nested state2
                todo.append(value)
    return out


def measure_trainer_eval_peak(spec: ModelSpec, train: TrainConfig, *, seed: int = 0) -> tuple[int, int]:
    """(peak live bytes during HF Trainer.evaluate() after one real training step, peak of that step) on CPU."""
    peaks = measure_trainer_phases(spec, train, ("eval",), seed=seed)
    return peaks["eval"], peaks["train"]


def measure_trainer_phases(spec: ModelSpec, train: TrainConfig, phases: tuple[str, ...], *,
                           seed: int = 0) -> dict[str, int]:
    """Peak live bytes of one real HF Trainer training step ("train") and of each phase after it on CPU: "eval"
    (Trainer.evaluate(): its prediction_step, autocast, zero_grad) and "save" (Trainer._save_checkpoint: the
    model's save_pretrained, the optimizer's and scheduler's state dicts, the RNG states), around memplan's model
    build, every sequence seq_len tokens long, profiled as measure_cpu_peak is."""
    torch = try_import("torch")
    transformers = try_import("transformers")
    import tempfile

    from memplan.spec.optimizers import facts
    from memplan.spec.train import Precision
    from memplan.testing.hf_train import collate, dataset

    torch.manual_seed(seed)
    model = build_model(spec, train, device="cpu")
    n = train.batch_size * train.grad_accum
    data = dataset(n, train.seq_len, train.seq_len, 0, spec.vocab_size)
    evals = dataset(max(train.eval_batch_size, 1), train.seq_len, train.seq_len, 0, spec.vocab_size)
    with tempfile.TemporaryDirectory() as out:
        args = transformers.TrainingArguments(
            output_dir=out, per_device_train_batch_size=train.batch_size, gradient_accumulation_steps=train.grad_accum,
            per_device_eval_batch_size=max(train.eval_batch_size, 1), max_steps=1, report_to=[], use_cpu=True,
            bf16=train.precision is Precision.BF16, fp16=train.precision is Precision.FP16, save_strategy="no",
            logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0, learning_rate=1e-5,
            optim=facts(train.optimizer).hf_optim)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data, eval_dataset=evals,
                                       data_collator=collate)
        from torch.profiler import ProfilerActivity, profile, record_function

        run = {"eval": trainer.evaluate, "save": lambda: trainer._save_checkpoint(trainer.model, trial=None)}
        baseline = resident_bytes(_resident(model))
        with no_stray_frees(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            with record_function("train:1"):
                trainer.train()
            for name in phases:
                with record_function(f"{name}:1"):
                    run[name]()
    events = list(prof.profiler.kineto_results.events())
    names = {"train:1", *(f"{p}:1" for p in phases)}
    spans = {e.name(): (e.start_ns(), e.start_ns() + e.duration_ns()) for e in events if e.name() in names}
    live, peaks = 0, dict.fromkeys(names, 0)
    for ts, nbytes in cpu_memory_events(events):
        live += nbytes
        for name, (start, end) in spans.items():
            if start <= ts <= end:
                peaks[name] = max(peaks[name], baseline + live)
    return {name.split(":")[0]: peak for name, peak in peaks.items()}
