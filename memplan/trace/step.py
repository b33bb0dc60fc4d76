"""Trace one depth: the reference step of a model cut to k decoder layers, on fake tensors, under the live-bytes
tracker. Builds on the meta device outside FakeTensorMode, swaps in fake parameters inside it, creates the optimizer
states with one step on zero gradients, then traces step 2 (states alive from the start, as in every later step)."""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any

from memplan._imports import try_import
from memplan.predict.allocator import replay
from memplan.spec.model import ModelSpec
from memplan.spec.train import Sharding, TrainConfig


@dataclass(frozen=True, slots=True, kw_only=True)
class Trace:
    """Live bytes of one traced depth."""

    layers: int
    peak: int
    weights: int  # parameters + buffers
    states: int  # optimizer states after the steps
    forward_end: int  # live bytes when step 2's forward returned
    trainable: int  # trainable parameters
    params: int = 0  # the model's own parameters (adapters excluded)
    phase: str
    peak_reserved: int = 0  # max_memory_reserved of the step's allocations replayed through the allocator model
    reserved_allocated: int = 0  # memory_allocated (rounded blocks) at that reserved peak
    phase_peaks: dict[str, int] = dataclasses.field(default_factory=dict)  # forward / backward / optimizer
    by_module: dict[str, int] = dataclasses.field(default_factory=dict)  # live bytes at the peak, by allocator
    # the step's ordered (kind, storage, nbytes, stream) allocations and frees, parameters and states first
    events: list[tuple[str, int, int, int]] = dataclasses.field(default_factory=list, repr=False, compare=False)
    reserved_extrapolated: bool = False  # peak_reserved is a line through traced depths, not a replay
    # labels=True: the (phase, module, op) that made allocation event i (trace/labels.py), for the timeline
    labels: dict[int, tuple[str, str, str]] = dataclasses.field(default_factory=dict, repr=False, compare=False)


def trace_depth(spec: ModelSpec, train: TrainConfig, layers: int, by_module: bool = False,
                labels: bool = False) -> Trace:
    """Trace the reference step of `spec` cut to `layers` decoder layers (by_module: attribute live bytes to the
    module whose forward allocated them, `layers.*` pooled; backward and optimizer allocations by phase; labels:
    name the phase, module and op of every allocation event, for `memplan trace --timeline`)."""
    torch = try_import("torch")
    try_import("transformers")
    from torch._subclasses.fake_tensor import FakeTensorMode

    from memplan.build.model import build_model, build_optimizer
    from memplan.build.shard import fsdp1_wrap_model, fully_shard_model
    from memplan.build.step import reference_step
    from memplan.build.visual import has_images, visual_batch
    from memplan.trace.labels import LabelledLiveBytes, label_modules
    from memplan.trace.patches import (
        constant_indices,
        fake_friendly_experts,
        fake_parameters,
        fake_process_group,
        no_packed_sequence_detection,
        quiet,
    )
    from memplan.trace.tracker import LiveBytes

    cut = spec.with_layers(layers)
    with quiet():
        model = build_model(cut, train, device="meta")  # outside the fake mode: get_peft_model / .to() fail in it
    tracker = LabelledLiveBytes(by_owner=by_module) if labels else LiveBytes(by_owner=by_module, record_events=True)
    marks: dict[str, int] = {}
    if by_module:
        _attribute_to_modules(model, tracker)
    if labels:
        label_modules(model, tracker)

    @contextlib.contextmanager
    def mark(name: str):  # noqa: ANN202
        tracker.phase, tracker.owner = name.split(":")[0], ""
        yield
        marks[name] = tracker.live

    batch = visual_batch(model, cut, train) if has_images(cut, train) else None  # real, built outside the mode
    with fake_process_group(train) as mesh, FakeTensorMode(), no_packed_sequence_detection(), \
            fake_friendly_experts(), quiet(), constant_indices(batch is not None):
        fake_parameters(model, torch)
        vocab = model.get_input_embeddings().num_embeddings  # a VL config may leave vocab_size to its default
        ids = torch.randint(0, vocab, (train.batch_size, train.seq_len))
        visual, inputs = _fake_visual(batch, torch)
        if visual is not None:
            ids = visual.pop("input_ids")
        tensors = list(model.parameters()) + list(model.buffers())
        tracker.seed(tensors + [ids] + inputs)
        del tensors  # sharding must be able to free the full parameters
        # counted before sharding: FSDP1's original parameters become views of this rank's shard
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        params = sum(p.numel() for name, p in model.named_parameters() if "lora_" not in name)
        if mesh is not None:
            with tracker:  # the shards are allocated, the full parameters freed
                if train.parallel.fsdp1:
                    # flat parameters: FSDP1 wraps, not in place. hybrid_shard holds what full_shard over the
                    # fake group (one node's ranks) holds: the replication across nodes adds no memory
                    model = fsdp1_wrap_model(model, train.with_(sharding=Sharding.FULL_SHARD), "cpu")
                else:
                    fully_shard_model(model, mesh, train)
            tracker.reset_peak()  # frameworks load and shard on the host (or meta): the GPU only sees shards
        optimizer = build_optimizer(model, train)
        weights = tracker.live - sum(t.untyped_storage().nbytes() for t in [ids] + inputs)
        _create_optimizer_states(model, optimizer)
        state_tensors = [t for st in optimizer.state.values() for t in st.values() if isinstance(t, torch.Tensor)]
        tracker.phase = "optimizer"  # by_module: states are the optimizer's, as when step 1 created them
        tracker.seed(state_tensors)
        tracker.phase = ""
        states = sum(_storage_bytes(t) for t in state_tensors)
        with tracker:  # step 2 of the reference step: states exist from the start, as in every later step
            reference_step(model, optimizer, train, ids, mark, steps=1, record_losses=False, first=2, visual=visual)
        events, tracker.events = tracker.events or [], None
        made_by = getattr(tracker, "labels", {})
    # the parameters, buffers, ids and states were seeded first, one request each (as when a model is loaded and
    # step 1 made the states), then step 2's allocations and frees in order
    reserved = replay(events)
    return Trace(layers=layers, peak=tracker.peak, weights=weights, states=states,
                 forward_end=marks.get("forward:2", 0), trainable=trainable, params=params,
                 phase=tracker.peak_phase,
                 peak_reserved=reserved.peak_reserved_bytes,
                 reserved_allocated=reserved.allocated_at_peak_reserved_bytes,
                 phase_peaks=dict(tracker.phase_peaks),
                 by_module=tracker.peak_by_owner, events=events, labels=made_by)


def _fake_visual(batch: dict[str, Any] | None, torch: Any) -> tuple[dict[str, Any] | None, list[Any]]:
    """The VL batch inside FakeTensorMode: its integer tensors as constants (patches.constant_indices), pixel_values
    a fake fp32 tensor of its shape; (model kwargs with input_ids, the tensors to seed as the step's inputs)."""
    if batch is None:
        return None, []
    def const(t: Any) -> Any:
        return torch.tensor(t.tolist(), dtype=t.dtype)
    out = {k: const(v) for k, v in batch.items() if k not in ("pixel_values", "precomputed")}
    out["pixel_values"] = torch.empty(batch["pixel_values"].shape, dtype=batch["pixel_values"].dtype)
    out.update({k: const(v) for k, v in batch["precomputed"].items()})
    return out, [v for k, v in out.items() if k != "input_ids"]


def _storage_bytes(t: Any) -> int:
    """Bytes a tensor really holds: a DTensor's are its local shard's (its own storage is a placeholder)."""
    local = getattr(t, "_local_tensor", None)
    return (local if local is not None else t).untyped_storage().nbytes()


def _create_optimizer_states(model: Any, optimizer: Any) -> None:
    """Step 1 of the reference step, minus forward and backward: an optimizer step on zero gradients creates the
    states. Step 1's own forward and backward run without states, so its peak never exceeds step 2's, and its
    optimizer phase (grads + states being created + temporaries) equals step 2's: tracing step 2 alone suffices."""
    import torch

    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _attribute_to_modules(model: Any, tracker: Any) -> None:
    """Forward pre/post hooks keep `tracker.owner` on the innermost running module (`layers.N` -> `layers.*`);
    allocations in backward (recomputation included) and in the optimizer step are attributed to that phase."""
    import re

    stack: list[str] = []

    def enter(name: str) -> Any:
        def hook(*_: Any) -> None:
            if tracker.phase == "forward":  # checkpoint recomputes in backward may stop early: no post hook
                stack.append(name)
                tracker.owner = name
        return hook

    def leave(*_: Any) -> None:
        if tracker.phase == "forward":
            stack.pop()
            tracker.owner = stack[-1] if stack else ""

    for name, module in model.named_modules():
        short = re.sub(r"\.layers\.\d+", ".layers.*", name.replace("base_model.model.", "")) or "model"
        module.register_forward_pre_hook(enter(short))
        module.register_forward_hook(leave)
