"""The exact mode: run the real transformers model's reference step on fake tensors and count live bytes.

No memory is allocated and no GPU is needed (NOTES §4): the model (and its peft wrapper) is built on the meta
device, its parameters are swapped for fake CPU tensors inside FakeTensorMode, and the reference step runs under
the LiveBytes tracker. The peak is linear in the number of decoder layers, so the model is traced with k, k+1 and
k+2 layers and extrapolated to the real depth; when the third point is off the line the full depth is traced.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pickle
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Any

from memplan._imports import try_import
from memplan.errors import ConfigError, UnsupportedModel
from memplan.predict.breakdown import Breakdown, Term
from memplan.predict.cuda import cuda_overheads
from memplan.spec.model import ModelSpec
from memplan.spec.train import Method, TrainConfig

LINEARITY_TOLERANCE = 1e-3  # relative gap of the third point from the line of the first two


@dataclass(frozen=True, slots=True, kw_only=True)
class Trace:
    """Live bytes of one traced depth."""

    layers: int
    peak: int
    weights: int  # parameters + buffers
    states: int  # optimizer states after the steps
    forward_end: int  # live bytes when step 2's forward returned
    trainable: int  # trainable parameters
    phase: str
    op: str = ""  # the op that made the peak
    phase_peaks: dict[str, int] = dataclasses.field(default_factory=dict)  # forward / backward / optimizer
    by_module: dict[str, int] = dataclasses.field(default_factory=dict)  # live bytes at the peak, by allocator


def trace_depth(spec: ModelSpec, train: TrainConfig, layers: int, by_module: bool = False) -> Trace:
    """Trace the reference step of `spec` cut to `layers` decoder layers (by_module: attribute live bytes to the
    module whose forward allocated them, `layers.*` pooled; backward and optimizer allocations by phase)."""
    torch = try_import("torch")
    try_import("transformers")
    from torch._subclasses.fake_tensor import FakeTensorMode

    from memplan.probe.truth import reference_step
    from memplan.trace.build import build_model, build_optimizer
    from memplan.trace.tracker import LiveBytes

    cut = dataclasses.replace(spec, num_layers=layers, config={**spec.config, "num_hidden_layers": layers})
    with _quiet():
        model = build_model(cut, train, device="meta")  # outside the fake mode (NOTES §4)
    tracker = LiveBytes(by_owner=by_module)
    marks: dict[str, int] = {}
    if by_module:
        _attribute_to_modules(model, tracker)

    @contextlib.contextmanager
    def mark(name: str):  # noqa: ANN202
        tracker.phase, tracker.owner = name.split(":")[0], ""
        yield
        marks[name] = tracker.live

    with _fake_process_group(train) as mesh, FakeTensorMode(), _no_packed_sequence_detection(), \
            _fake_friendly_experts(), _quiet():
        _fake_parameters(model, torch)
        ids = torch.randint(0, spec.vocab_size, (train.batch_size, train.seq_len))
        tensors = list(model.parameters()) + list(model.buffers())
        tracker.seed(tensors + [ids])
        del tensors  # sharding must be able to free the full parameters
        if mesh is not None:
            with tracker:  # the shards are allocated, the full parameters freed
                _fully_shard(model, mesh, train)
            tracker.reset_peak()  # frameworks load and shard on the host (or meta): the GPU only sees shards
        optimizer = build_optimizer(model, train)
        weights = tracker.live - ids.untyped_storage().nbytes()
        _create_optimizer_states(model, optimizer)
        state_tensors = [t for st in optimizer.state.values() for t in st.values() if isinstance(t, torch.Tensor)]
        tracker.phase = "optimizer"  # by_module: states are the optimizer's, as when step 1 created them
        tracker.seed(state_tensors)
        tracker.phase = ""
        states = sum(_storage_bytes(t) for t in state_tensors)
        with tracker:  # step 2 of the reference step: states exist from the start, as in every later step
            reference_step(model, optimizer, train, ids, mark, steps=1, record_losses=False, first=2)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return Trace(layers=layers, peak=tracker.peak, weights=weights, states=states,
                 forward_end=marks.get("forward:2", 0), trainable=trainable, phase=tracker.peak_phase,
                 op=str(tracker.peak_op), phase_peaks=dict(tracker.phase_peaks),
                 by_module=tracker.peak_by_owner)


def _storage_bytes(t: Any) -> int:
    """Bytes a tensor really holds: a DTensor's are its local shard's (its own storage is a placeholder)."""
    local = getattr(t, "_local_tensor", None)
    return (local if local is not None else t).untyped_storage().nbytes()


@contextlib.contextmanager
def _fake_process_group(train: TrainConfig):  # noqa: ANN202
    """FSDP configs: torch's fake process group (rank 0 of the shard group; collectives do nothing) and its
    device mesh, built outside FakeTensorMode. Yields None for everything else."""
    if not train.sharding.is_fsdp2:
        yield None
        return
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    world = train.gpus_per_node if train.sharding.value == "hybrid_shard" else train.gpus
    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        yield init_device_mesh("cpu", (world,))
    finally:
        dist.destroy_process_group()


def _fully_shard(model: Any, mesh: Any, train: TrainConfig) -> None:
    """FSDP2 as HF Trainer / accelerate apply it: each decoder layer, then the root; half parameters gathered
    under AMP (MixedPrecisionPolicy), layers kept gathered after forward for shard_grad_op."""
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from memplan.trace.build import compute_dtype

    amp = train.precision.value in ("fp16", "bf16")
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype(train), reduce_dtype=torch.float32) if amp else \
        MixedPrecisionPolicy()
    reshard = train.sharding.value != "shard_grad_op"
    kw: dict[str, Any] = {"reshard_after_forward": reshard, "mp_policy": policy}
    if train.offload.value != "none":  # probes on CUDA (the trace refuses offload): shards live on the host
        from torch.distributed.fsdp import CPUOffloadPolicy

        kw["offload_policy"] = CPUOffloadPolicy()
    for module in model.modules():
        if type(module).__name__.endswith("DecoderLayer"):
            fully_shard(module, mesh=mesh, **kw)
    fully_shard(model, mesh=mesh, **kw)


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


def _fake_parameters(model: Any, torch: Any) -> None:
    """Replace meta parameters and buffers by fake CPU tensors of the same dtype, keeping tied weights tied."""
    memo: dict[int, Any] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                if id(p) not in memo:
                    memo[id(p)] = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="cpu"),
                                                     requires_grad=p.requires_grad)
                module._parameters[name] = memo[id(p)]
        for name, b in list(module._buffers.items()):
            if b is not None:
                if id(b) not in memo:
                    memo[id(b)] = torch.empty(b.shape, dtype=b.dtype, device="cpu")
                module._buffers[name] = memo[id(b)]


@contextlib.contextmanager
def _quiet():  # noqa: ANN202
    """transformers' deprecation warnings and config notices are not the user's business here."""
    import warnings

    import transformers

    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            transformers.logging.set_verbosity(level)


@contextlib.contextmanager
def _fake_friendly_experts():  # noqa: ANN202
    """MoE experts in transformers 5 run as grouped matmuls over the T x k routed rows, so their memory does not
    depend on the routing. torch's meta kernel for grouped_mm accepts bf16 only (a CUDA rule) while the CPU kernel
    takes any dtype; on fake tensors of other dtypes a stand-in with aten's autograd behaviour runs instead: it
    saves the input only when the weight needs a gradient (and the weight only when the input does), returns
    (S, out), and computes in backward only the gradients that are needed (transformers' own fallback op saves
    and computes both, which over-counts frozen experts)."""
    try:
        import transformers.integrations.moe as moe
    except ImportError:  # a transformers without MoE integrations: nothing to patch
        yield
        return
    import torch
    from torch._subclasses.fake_tensor import FakeTensor

    class GroupedMM(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, input: Any, weight: Any, offs: Any) -> Any:  # noqa: ARG004
            # derivatives.yaml: grad_input needs the weight, grad_weight needs the input; each saved only if needed
            need_input, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            ctx.save_for_backward(input if need_weight else None, weight if need_input else None)
            ctx.shapes = ((input.shape, input.dtype), (weight.shape, weight.dtype))  # shapes only, no references
            return input.new_empty(input.size(0), weight.size(-1))

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            (in_shape, in_dtype), (w_shape, w_dtype) = ctx.shapes
            return (grad.new_empty(in_shape, dtype=in_dtype) if ctx.needs_input_grad[0] else None,
                    grad.new_empty(w_shape, dtype=w_dtype) if ctx.needs_input_grad[1] else None, None)

    original = moe._grouped_mm

    def grouped_mm(input: Any, weight: Any, offs: Any) -> Any:
        if isinstance(weight, FakeTensor) and weight.dtype != torch.bfloat16:
            return GroupedMM.apply(input.to(weight.dtype), weight, offs)
        return original(input, weight, offs=offs)

    moe._grouped_mm = grouped_mm
    try:
        yield
    finally:
        moe._grouped_mm = original


@contextlib.contextmanager
def _no_packed_sequence_detection():  # noqa: ANN202
    """Under fake tensors transformers thinks it is tracing and builds a full (B,1,S,S) mask (NOTES §4)."""
    import transformers.masking_utils as mu

    original = mu.find_packed_sequence_indices
    mu.find_packed_sequence_indices = lambda *args, **kwargs: None
    try:
        yield
    finally:
        mu.find_packed_sequence_indices = original


def exact_mode_available() -> bool:
    """torch and transformers importable (checked without importing them)."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers", "peft"))


def exact_estimate(spec: ModelSpec, train: TrainConfig, *, trust_remote_code: bool = False,
                   by_module: bool = False) -> Breakdown:
    """Peak memory from traces of the real model, extrapolated in depth; same Breakdown as the analytic one."""
    if spec.remote_code and not trust_remote_code:
        raise UnsupportedModel(f"{spec.name}: model_type {spec.model_type!r} needs trust_remote_code; "
                               "pass --trust-remote-code to run its code")
    note = ""
    traced_train = train
    if train.method is Method.QLORA:  # bitsandbytes cannot run on fake CPU tensors: trace LoRA, model the rest
        traced_train = train.with_(method=Method.LORA)
        note = "; QLoRA: traced as LoRA, NF4/int8 storage and saved inputs of quantized linears added analytically"
    if not train.sharding.is_fsdp2 and (train.gpus > 1 or train.sharding.value != "none") or \
            train.offload.value != "none":
        raise UnsupportedModel("the exact mode traces one GPU's step, or one FSDP rank (fake process group); "
                               "per-rank memory under DDP / ZeRO / offload is analytic: drop --exact")
    if spec.is_moe:
        note += ("; MoE: experts run as grouped matmuls over the tokens x experts_per_token routed rows, so memory "
                 "does not depend on how the router balances them")
    first = min(train.freeze_trainable_layers, spec.num_layers) if train.method is Method.FREEZE else 0
    if train.sharding.is_fsdp2:  # FSDP's prefetching only settles from three layers on (measured on 7B:
        first += 2  # the backward peak grows 0.73, 0.40, 0.40 GiB from 2 to 5 layers)
    depths = [d for d in (first + 1, first + 2, first + 3) if d <= spec.num_layers]
    try:
        traces = _trace_depths(spec, traced_train, depths, by_module)
    except (ValueError, KeyError, TypeError, AttributeError, RuntimeError) as err:
        raise ConfigError(f"{spec.name}: transformers cannot build or run this config on fake tensors: "
                          f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
    full = _extrapolate(traces, spec.num_layers)
    if full is None:  # not linear in depth (mixed layer types): trace the real depth
        full = trace_depth(spec, traced_train, spec.num_layers, by_module)
        note += "; traced at full depth (per-layer memory not linear)"
    peak, weights, states = full.peak, full.weights, full.states
    if train.method is Method.QLORA:
        from memplan.predict.estimator import estimate

        delta_w = _analytic(spec, train, "weights") - _analytic(spec, traced_train, "weights")
        delta_peak = estimate(spec, train).peak_allocated_bytes - estimate(spec, traced_train).peak_allocated_bytes
        peak, weights = peak + delta_peak, weights + delta_w
    acts = max(full.forward_end - weights - states, 0) if full.forward_end else 0
    terms = [Term(name="weights", bytes=weights, explain="parameters and buffers of the real model" + note),
             Term(name="optimizer_states", bytes=states, explain="torch optimizer state tensors after two steps"),
             Term(name="gradients", bytes=0, explain="included in transient"),
             Term(name="activations", bytes=min(acts, peak - weights - states),
                  explain="live at the end of step 2's forward, beyond weights and states")]
    terms.append(Term(name="transient", bytes=peak - sum(t.bytes for t in terms),
                      explain=f"the rest of the peak, during {full.phase}"))
    reserved, context = cuda_overheads(peak)
    return Breakdown(terms=tuple(terms), peak_allocated_bytes=peak, peak_reserved_bytes=reserved,
                     cuda_context_bytes=context, phase=full.phase, trainable_params=full.trainable,
                     by_module=tuple(sorted(full.by_module.items(), key=lambda kv: -kv[1])),
                     method="exact")


def _trace_depths(spec: ModelSpec, train: TrainConfig, depths: list[int], by_module: bool) -> list[Trace]:
    """Trace each depth. Cold (torch not imported yet, one thread, fork and a second CPU available), the deepest
    depth is traced by a child forked before any import: its imports and trace run on the other core while this
    process imports and traces the rest. The imports are most of a cold trace's wall time (forking after torch is
    imported can deadlock, so a warm process traces in turn)."""
    cold = "torch" not in sys.modules and threading.active_count() == 1 and hasattr(os, "fork")
    if len(depths) < 2 or not cold or (os.cpu_count() or 1) < 2:
        return [trace_depth(spec, train, d, by_module) for d in depths]
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: trace, send the Trace (or the error) back, leave without running any cleanup
        os.close(read)
        try:
            result: Any = trace_depth(spec, train, depths[-1], by_module)
        except BaseException as err:  # noqa: BLE001 (re-raised in the parent)
            result = err
        try:
            data = pickle.dumps(result)
        except Exception:  # noqa: BLE001 an error pickle cannot carry: its type and message
            data = pickle.dumps(RuntimeError(f"{type(result).__name__}: {result}"))
        with contextlib.suppress(OSError), os.fdopen(write, "wb") as pipe:
            pipe.write(data)
        os._exit(0)
    os.close(write)
    try:
        with os.fdopen(read, "rb") as pipe:  # closed however this ends
            traces = [trace_depth(spec, train, d, by_module) for d in depths[:-1]]
            data = pipe.read()
    finally:
        with contextlib.suppress(ProcessLookupError):
            if os.waitpid(pid, os.WNOHANG) == (0, 0):  # still running: this process failed first
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
    last = pickle.loads(data) if data else RuntimeError("the forked trace died without a result")
    if isinstance(last, BaseException):
        raise last
    return [*traces, last]


def _extrapolate(traces: list[Trace], layers: int) -> Trace | None:
    """Each quantity, and the peak of each phase separately, on the line through the first two depths (checked
    against the third). The peak is the largest extrapolated phase peak: which phase wins can change with depth
    (the optimizer step grows faster per layer than a LoRA backward, say), so the overall peak is not linear."""
    if traces[-1].layers == layers:
        return traces[-1]
    if len(traces) < 2:
        return None
    a, b = traces[0], traces[1]

    def line(x: int, y: int, n: int) -> int:
        return x + (y - x) * (n - a.layers)

    fields = ("weights", "states", "forward_end", "trainable")
    if len(traces) == 3:
        c = traces[2]
        pairs = [(getattr(a, f), getattr(b, f), getattr(c, f)) for f in fields]
        pairs += [(a.phase_peaks.get(p, 0), b.phase_peaks.get(p, 0), c.phase_peaks.get(p, 0)) for p in b.phase_peaks]
        for x, y, z in pairs:
            if abs(z - line(x, y, c.layers)) > LINEARITY_TOLERANCE * max(z, 1):
                return None
    peaks = {p: line(a.phase_peaks.get(p, 0), v, layers) for p, v in b.phase_peaks.items()}
    phase = max(peaks, key=peaks.__getitem__)
    return Trace(layers=layers, peak=peaks[phase], weights=line(a.weights, b.weights, layers),
                 states=line(a.states, b.states, layers), forward_end=line(a.forward_end, b.forward_end, layers),
                 trainable=line(a.trainable, b.trainable, layers), phase=phase, phase_peaks=peaks,
                 by_module={k: line(a.by_module.get(k, 0), v, layers) for k, v in b.by_module.items()})


def _analytic(spec: ModelSpec, train: TrainConfig, term: str) -> int:
    from memplan.predict.estimator import estimate

    return estimate(spec, train).term(term)
