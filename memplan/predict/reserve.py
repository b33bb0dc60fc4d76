"""Reserved memory on the analytic path: the reference step written as an ordered list of allocations and frees,
built from the estimator's own pieces (each parameter's shape, the optimizer's states, each decoder layer's tape
program, the LM head and loss), replayed through the caching-allocator model at the model's full depth.

A decoder layer's requests are its tape program run once with its tensors' lifetimes recorded (tape.Lifetimes:
what it makes, where it drops what it does not save) plus autocast's copies of the weights it casts; the layer's
backward keeps what the program saved (or, checkpointed, makes it again) and adds its gradients. It is a sketch of
the real sequence, not a copy (a backward's own temporaries are left out but the MLP's three gradients). What it
contributes is the allocator's overhead (reserved minus the live peak of the same sequence), added to the analytic
live peak; how close that comes to the replay of an exact trace is measured in
benchmarks/results/allocator_catalog.md (`python benchmarks/allocator_catalog.py`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

from memplan.predict import adapters
from memplan.predict.activations import _Ctx, decoder_layer, merged_experts, stream_width
from memplan.predict.allocator import ALLOC, FREE
from memplan.predict.layout import Layout
from memplan.predict.runs import ALLOC_OP, FREE_LOCAL, FREE_REF, Chunk, replay_chunks
from memplan.predict.tape import CAST, MADE, T, Tape
from memplan.predict.weights import ModelStates
from memplan.spec.optimizers import States, facts
from memplan.spec.parallel import Parallelism
from memplan.spec.stacks import Stack, quantize_temporaries, stack_facts
from memplan.spec.train import Adapter, Method

FP32 = 4
# CUDA streams of the sketch: the caching allocator reuses a freed block only for a request on the stream it was
# allocated on (c10/cuda/CUDACachingAllocator.cpp get_free_block: `(*it)->stream != p.stream()` -> no block), so
# what FSDP1 allocates on its own streams is cached apart from the compute stream's blocks
COMPUTE, UNSHARD, POST_BACKWARD = 0, 1, 2


class _Program:
    """The requests being written, in chunks (runs.Chunk: one per decoder layer in each phase, `mark`): `new`
    allocates and returns an id (ids count the allocations), `free` releases one."""

    def __init__(self) -> None:
        self.chunks: list[Chunk] = []
        self.sizes: list[tuple[int, int]] = []  # each id's (bytes, stream)
        self.packed: list[int] = []  # the 4-bit weights' ids, in load order
        self.templates: dict[tuple[int, bool, int], tuple] = {}  # _run's requests per (program, keep, offset)
        self._groups: dict[tuple[float, ...], tuple] = {}  # allocs' requests per group
        self._ops: list[tuple[int, int, int]] = []
        self._refs: list[int] = []
        self._base, self._layer = 0, False

    def new(self, nbytes: float, stream: int = COMPUTE) -> int:
        n = int(nbytes)
        self._ops.append((ALLOC_OP, n, stream))
        self.sizes.append((n, stream))
        return len(self.sizes) - 1

    def allocs(self, group: tuple[float, ...]) -> range:
        """`new` for each of `group` (a layer's parameters, states, copies: written once per distinct group)."""
        made = self._groups.get(group)
        if made is None:
            made = self._groups[group] = (tuple((ALLOC_OP, int(n), COMPUTE) for n in group),
                                          [(int(n), COMPUTE) for n in group])
        start = len(self.sizes)
        self._ops += made[0]
        self.sizes += made[1]
        return range(start, len(self.sizes))

    def free(self, *ids: int | None) -> None:
        base, ops, refs = self._base, self._ops, self._refs
        for i in ids:
            if i is None:
                continue
            if i >= base:
                ops.append((FREE_LOCAL, i - base, 0))
            else:
                ops.append((FREE_REF, len(refs), 0))
                refs.append(i)

    def mark(self, layer: bool = False) -> None:
        """Close the chunk being written; the next is one decoder layer's when `layer`."""
        if self._ops:
            self.chunks.append(Chunk(ops=tuple(self._ops), base=self._base, allocs=len(self.sizes) - self._base,
                                     refs=tuple(self._refs), layer=self._layer))
        self._ops, self._refs, self._base, self._layer = [], [], len(self.sizes), layer

    @property
    def events(self) -> list[tuple[str, int, int, int]]:
        """The program as replay() takes it: (ALLOC | FREE, id, bytes, stream) in order."""
        out: list[tuple[str, int, int, int]] = []
        for c in self.chunks:
            made = 0
            for op, x, y in c.ops:
                if op == ALLOC_OP:
                    out.append((ALLOC, c.base + made, x, y))
                    made += 1
                else:
                    key = c.base + x if op == FREE_LOCAL else c.refs[x]
                    out.append((FREE, key, *self.sizes[key]))
        return out


def reserved_overhead(lay: Layout, st: ModelStates, scale: float = 1.0, depth: int | None = None) -> int:
    """Reserved minus live peak bytes of the step's sketched allocation sequence (`scale`: the fraction of each
    parameter, gradient and state one rank holds under sharding; `depth`: sketch that many decoder layers, all by
    default). The sketch leaves gradient accumulation out, so candidates that differ only there share one replay;
    of the parallel layout it reads only FSDP1's gathered units (_fsdp1_units) and of the states only autocast's
    copies, so without units the GPU count and the sharding (a rank's share is `scale`) share one too."""
    train = dataclasses.replace(lay.train, grad_accum=1)
    if _fsdp1_units(lay) is None:
        train = dataclasses.replace(train, parallel=Parallelism())
    return _overhead(dataclasses.replace(lay, train=train), _Autocast(st.autocast_cache_bytes, st.autocast_layer_bytes),
                     scale, depth)


class _Autocast(NamedTuple):
    """What the sketch reads of the model states (weights.ModelStates' fields of the same names)."""

    autocast_cache_bytes: int
    autocast_layer_bytes: int


@lru_cache(maxsize=4096)
def _overhead(lay: Layout, st: _Autocast, scale: float, depth: int | None) -> int:
    """One replay per distinct sketch: a fit estimating a configuration again (its ranking, its suggestions)
    replays nothing. A 7B model's sketch is ~10,000-15,000 requests, replayed by runs.replay_chunks (the bytes of
    allocator.replay, tests/test_runs.py). The cache keeps the integers, not the requests."""
    p = _sketch(lay, st, scale, depth)
    peaks = replay_chunks(p.chunks, p.sizes)
    return peaks.peak_reserved_bytes - peaks.peak_requested_bytes


def sketch_events(lay: Layout, st: ModelStates, scale: float = 1.0,
                  depth: int | None = None) -> tuple[tuple[str, int, int, int], ...]:
    """The step's sketched (kind, id, nbytes, stream) allocations and frees, in order (see reserved_overhead)."""
    return tuple(_sketch(lay, st, scale, depth).events)


def _sketch(lay: Layout, st: ModelStates | _Autocast, scale: float = 1.0, depth: int | None = None) -> _Program:
    """The step's program, in chunks (see reserved_overhead)."""
    p = _Program()
    s, tr = lay.spec, lay.train
    layers = _all_layer_params(lay, scale, s.num_layers if depth is None else depth)
    # the load's quantizer temporaries are left to load_reserved: this sketch is the step's, as the exact mode's
    # replays (which trace the step) measure it
    head = _load(p, lay, layers, scale, quantizer=False)
    # the trainable tensors, each layer's (a chunk each), then the head's and the embedding's
    trained = [[n for n, t, _ in params if t] for params in layers] + [[n for n, t in head if t]]
    if lay.full:
        trained[-1].append(s.vocab_size * s.hidden_size * scale * lay.trainable_width)  # the embedding
    opt = facts(tr.optimizer)
    per_state = {States.ADAM: 2, States.ADAM_FP32: 2, States.MOMENTUM: 1}.get(opt.states, 0)
    for i, group in enumerate(trained):  # optimizer states, per trainable tensor (8-bit / factored: left out)
        p.mark(layer=i < len(layers))
        p.allocs(tuple(n for n in group for _ in range(per_state)))
    p.mark()
    p.new(tr.batch_size * tr.seq_len * 8)  # input ids (int64)
    grads = _forward_backward(p, lay, st, layers, head, scale)
    if opt.foreach_copy:  # foreach AdamW: _foreach_sqrt(exp_avg_sq), one copy per tensor, freed after the step
        copies = []
        for i, group in enumerate(trained):
            p.mark(layer=i < len(layers))
            copies += p.allocs(tuple(group))
        p.mark()
        p.free(*copies)
    p.free(*grads)
    p.mark()
    return p


def load_reserved(lay: Layout, st: ModelStates, scale: float = 1.0) -> int:
    """Reserved bytes at the end of the model load, replayed at full depth: a QLoRA stack whose quantizer's
    temporaries are large (spec.stacks quantize_load_transients) leaves the allocator holding far more than the
    weights, and the cache never shrinks, so the run's reserved peak is at least this. The extrapolation
    `reserved_overhead` uses for the step does not hold here: the temporaries' cached blocks are reused by later
    weights, a one-off pattern, not a per-layer one."""
    p = _Program()
    layers = _all_layer_params(lay, scale, lay.spec.num_layers)
    _load(p, lay, layers, scale, quantizer=True)
    if stack_facts(lay.train.stack).device_init:  # built and quantized on the GPU, then each weight replaced
        _requantize(p, lay, layers)
    p.mark()
    return replay_chunks(p.chunks, p.sizes).peak_reserved_bytes


def _quantize(p: _Program, lay: Layout, nbytes: float, elements: float) -> int:
    """One weight quantized on its way in: the quantizer's temporaries (spec.stacks quantize_load_transients,
    per element), the packed result made while the first `packed_with` of them are alive, then the rest freed."""
    stack = stack_facts(lay.train.stack)
    if not elements:
        return p.new(nbytes)
    temps = [p.new(b) for b in quantize_temporaries(lay.train.stack, int(elements))]
    p.free(*temps[stack.packed_with:])
    packed = p.new(nbytes)
    p.free(*temps[:stack.packed_with])
    return packed


def _requantize(p: _Program, lay: Layout, layers: list[list[tuple[float, bool, float]]]) -> None:
    """The checkpoint's weights replacing the ones built on the device: each 4-bit weight quantized anew, the old
    packed one freed after (the other parameters are copied in place). The ids follow _load's order."""
    weights = [(n, e) for params in layers for n, _, e in params if e]
    p.mark()
    for key, (nbytes, elements) in zip(list(p.packed), weights, strict=True):
        _quantize(p, lay, nbytes, elements)
        p.free(key)


def _load(p: _Program, lay: Layout, layers: list[list[tuple[float, bool, float]]],
          scale: float, quantizer: bool) -> list[tuple[float, bool]]:
    """The model load's requests: the embedding, each layer's parameters, the final norm and LM head (returned);
    with `quantizer`, each 4-bit weight made through the stack's quantizer temporaries."""
    s, qlora = lay.spec, lay.train.method is Method.QLORA and quantizer
    if s.vision_tensors:  # a VL model's tower first (`visual` precedes the decoder in its modules), frozen, in the
        # load dtype (full), the base's (freeze) or the kept one (LoRA), as predict/weights.py counts it
        tower = lay.load_width if lay.full else lay.base_width if lay.train.method is Method.FREEZE else lay.kept_width
        p.allocs(tuple(n * tower * scale for n in s.vision_tensors))
        p.mark()
    p.new(s.vocab_size * s.hidden_size * scale * (lay.trainable_width if lay.full else lay.base_width))  # embedding
    for params in layers:  # each parameter its own request, as a model is loaded; QLoRA: 4-bit ones quantized
        p.mark(layer=True)
        if not qlora:
            p.allocs(tuple(nbytes for nbytes, _, _ in params))
            continue
        for nbytes, _trains, elements in params:
            key = _quantize(p, lay, nbytes, elements if qlora else 0)
            if elements and qlora:
                p.packed.append(key)
    p.mark()
    head = [(s.hidden_size * scale * (lay.trainable_width if lay.full else lay.base_width), lay.full)]
    if not s.tie_word_embeddings:
        head.append((s.vocab_size * s.hidden_size * scale * (lay.trainable_width if lay.full else lay.base_width),
                     lay.full))
    for nbytes, _trains in head:
        p.new(nbytes)
    return head


def _all_layer_params(lay: Layout, scale: float, depth: int) -> list[list[tuple[float, bool, float]]]:
    """_layer_params of the first `depth` decoder layers, worked out once per kind (trains, MoE, Gated DeltaNet)."""
    kinds: dict[tuple[bool, bool, bool], list[tuple[float, bool, float]]] = {}
    out = []
    for i in range(depth):
        kind = (lay.full or (lay.train.method is Method.FREEZE and i in lay.trained_ids), _moe_layer(lay, i),
                lay.spec.is_linear_layer(i))
        if kind not in kinds:
            kinds[kind] = _layer_params(lay, i, scale)
        out.append(kinds[kind])
    return out


def _layer_params(lay: Layout, index: int, scale: float) -> list[tuple[float, bool, float]]:
    """(bytes, trains, elements quantized on the way in or 0) of each parameter of decoder layer `index`: its
    nn.Linears (spec.model layer_linears of that layer: a Gated DeltaNet's or the attention's), an MoE layer's 3D
    experts, the rest of spec.model params_of_layer (norms; the Gated DeltaNet's conv1d, dt_bias, A_log, norm; MLA's
    latent norms; sinks; expert biases) as the norms' (hidden,) tensors and one more, then the LoRA adapters (an MoE
    layer's router and expert ones where peft wraps them: Layout.experts_wrapped)."""
    s, tr = lay.spec, lay.train
    trains = lay.full or (tr.method is Method.FREEZE and index in lay.trained_ids)
    width = lay.trainable_width if trains else lay.base_width
    kept = lay.trainable_width if trains else lay.kept_width  # never quantized (predict/weights.py: kept_width)
    qlora = tr.method is Method.QLORA
    moe = _moe_layer(lay, index)
    linears = s.layer_linears(index)  # an MoE model's: attention (and the gated / all-linear shared experts);
    if s.is_moe and not moe:  # a DeepSeek dense layer adds its SwiGLU MLP, an MoE layer its shared experts
        linears += s.dense_mlp_linears(s.intermediate_size)  # (as Layout.lora_params_per_layer counts them)
    elif moe and s.shared_intermediate and not s.family.shared_expert_gate and not s.family.shared_in_all_linear:
        linears += s.shared_linears()
    out = [(lin.params * scale * (tr.quant_bits / 8 if q else width), trains, lin.params * scale if q else 0)
           for lin in linears for q in [lay.quantized(lin.name)]]
    rest = s.params_of_layer(index) - sum(lin.params for lin in linears)
    if moe:  # the router's (E, H) weight, the experts' gate_up_proj (E, 2I, H) and down_proj (E, H, I)
        # (modeling_mixtral.py l.65-66; every grouped_mm / bmm family stores them so)
        e, h, i = s.num_experts, s.hidden_size, s.moe_intermediate_size
        experts = [e * h] + [e * 2 * i * h, e * h * i] if s.family.gated_mlp else [e * h, e * h * i, e * h * i]
        # DeepSeek's routers stay fp32 whatever the load dtype (weights.py router_fp32)
        router = FP32 if s.family.router != "softmax" else width
        out += [(n * scale * (router if k == 0 else tr.quant_bits / 8 if qlora else width), trains, 0)
                for k, n in enumerate(experts)]
        rest -= sum(experts)
    norms = min(s.norms_per_layer, max(rest, 0) // s.hidden_size)
    out += [(s.hidden_size * kept * scale, trains, 0)] * norms
    if rest > norms * s.hidden_size:
        out.append(((rest - norms * s.hidden_size) * kept * scale, trains, 0))
    for lin in linears:
        if lin.name in lay.lora_modules:  # LoRA A, B (DoRA + magnitude; OFT: its rotation blocks)
            out += [(rows * (cols or 1) * lay.lora_width * scale, True, 0)
                    for rows, cols in adapters.trainable_shapes(tr, lin)]
    if moe and lay.experts_wrapped:  # Layout.lora_params_per_layer's shapes: router A (r, H) + B (E, r);
        e, h, i, r = s.num_experts, s.hidden_size, s.moe_intermediate_size, tr.lora_rank  # gate_up A (2Er, H) + B
        out += [(n * lay.lora_width * scale, True, 0)  # (2I, 2Er); down A (Er, I) + B (H, Er)
                for n in (r * h, e * r, 2 * e * r * h, 2 * i * 2 * e * r, e * r * i, h * e * r)]
    return out


def _fsdp1_units(lay: Layout) -> tuple[int, int] | None:
    """(root unit, decoder unit) bytes FSDP1 gathers in the compute dtype, where it shards parameters; else None."""
    s, tr = lay.spec, lay.train
    if not (tr.parallel.fsdp1 and tr.sharding.shards_params and tr.gpus > 1):
        return None
    root = s.vocab_size * s.hidden_size * (1 if s.tie_word_embeddings else 2) + s.hidden_size
    return root * lay.compute_width, s.layer_params * lay.compute_width


def _forward_backward(p: _Program, lay: Layout, st: ModelStates | _Autocast,
                      layers: list[list[tuple[float, bool, float]]], head: list[tuple[float, bool]],
                      scale: float = 1.0) -> list[int]:
    """Step 2's forward and backward; returns the gradients alive after it (freed by zero_grad). Each decoder layer
    runs its tape program's requests (_program): what it saves is kept for its backward, or, under checkpointing,
    dropped where the program drops it and made again when its backward recomputes it. Under FSDP1 (full or
    hybrid shard) its units are gathered on its unshard stream (_runtime_utils.py _unshard: `with
    state._device_handle.stream(unshard_stream): handle.unshard()`): the root from its forward to the end of
    backward, each decoder unit for its forward and again, with the next one prefetched (BACKWARD_PRE), for its
    backward; their cached blocks are reserved apart from the compute stream's in the optimizer step."""
    s, tr = lay.spec, lay.train
    n = tr.batch_size * tr.seq_len
    c = lay.compute_width
    hidden = n * s.hidden_size * stream_width(lay)
    # parameters offloaded to the host (FSDP1 CPUOffload: the rank's scale is 0, nothing of its own on the GPU):
    # the gathered units' stream pools are not sketched there
    units = _fsdp1_units(lay) if scale > 0 else None
    root_unit = p.new(units[0], UNSHARD) if units else None
    kinds = [_layer_kind(lay, i) for i in range(len(layers))]
    programs = {kind: _program(lay, kind) for kind in dict.fromkeys(kinds)}
    x, kept, cached = _forward(p, lay, [programs[k] for k in kinds], hidden, units)
    v, vh = s.vocab_size, s.vocab_size * s.hidden_size
    # the LM head's weight copy (full AMP: estimator.py counts it in autocast_cache_bytes), then its output, the
    # fp32 upcast and log_softmax's saved output
    head_cast = [p.new(st.autocast_cache_bytes - s.num_layers * st.autocast_layer_bytes)] if lay.full and lay.amp \
        and st.autocast_cache_bytes else []
    logits = p.new(n * v * c)
    up = p.new(n * v * FP32) if c != FP32 else logits
    logp = p.new(n * v * FP32)
    p.free(*{up, logits})
    p.free(*cached)  # autocast's cache is cleared as the forward's autocast region exits
    grads: list[int] = []
    g_logp, g_up = p.new(n * v * FP32), p.new(n * v * FP32)  # backward: nll_loss, log_softmax
    p.free(g_logp, logp)
    g_logits = p.new(n * v * c) if c != FP32 else g_up
    if c != FP32:
        p.free(g_up)
    head_grads: list[int] = []
    for b, trains in head:
        whole = b / scale if units else b  # FSDP1: the root's gradient, whole
        if trains and lay.amp and whole >= vh:  # the head's weight gradient in the compute dtype, cast to fp32
            half = p.new(vh * c)  # (estimator.py _lm_head_grad_peak)
            head_grads.append(p.new(whole))
            p.free(half)
        elif trains:
            head_grads.append(p.new(whole))
    g_x = p.new(hidden)
    p.free(g_logits, x, *head_cast)
    g_x, nxt = _backward(p, lay, layers, [programs[k] for k in kinds], kept, g_x, grads, units, scale)
    _embedding_and_root(p, lay, grads, head_grads, units, scale)
    p.free(g_x, root_unit, nxt)
    return grads


def _forward(p: _Program, lay: Layout, progs: list[_Layer], hidden: int,
             units: tuple[int, int] | None) -> tuple[int, list[list[int]], list[int]]:
    """The decoder layers' forward: returns (the last output, what each layer keeps for its backward, autocast's
    copies only its cache holds). Under FSDP1 FULL_SHARD each unit is gathered for its forward and freed after."""
    checkpointing = lay.train.checkpointing
    kept: list[list[int]] = []
    cached: list[int] = []  # autocast's copies that only its cache holds (checkpointed layers)
    x = p.new(hidden)  # the embedding output
    for prog in progs:
        p.mark(layer=True)
        unit = p.new(units[1], UNSHARD) if units else None
        keep, casts, y = _run(p, prog, keep_saved=not checkpointing)
        if checkpointing:  # the checkpoint keeps the layer's input (a layer with no gradient path: nothing)
            cached += casts
            kept.append([x] if prog.events else [])
            if not prog.events:
                p.free(x)
        else:
            kept.append(keep + casts + ([x] if prog.input_saved else []))
            if not prog.input_saved:
                p.free(x)
        x = y
        p.free(unit)
    p.mark()
    return x, kept, cached


def _backward(p: _Program, lay: Layout, layers: list[list[tuple[float, bool, float]]], progs: list[_Layer],
              kept: list[list[int]], g_x: int, grads: list[int], units: tuple[int, int] | None,
              scale: float) -> tuple[int, int | None]:
    """The decoder layers' backward, top down, appending their gradients to `grads`; returns (the embedding
    output's gradient, FSDP1's last prefetched unit). FSDP1: the root's pre-backward prefetches the last unit, each
    unit's the one below it; each unit's whole flat gradient is made on the compute stream, then the
    reduce-scatter's output shard on the post-backward stream (_runtime_utils.py _post_backward_hook: `with
    state._device_handle.stream(state._post_backward_stream)` around _reduce_grad -> _get_reduce_scatter_tensors
    `torch.empty_like(chunks[0])`), the whole one freed after."""
    s, tr = lay.spec, lay.train
    n = tr.batch_size * tr.seq_len
    hidden = n * s.hidden_size * stream_width(lay)
    nxt = p.new(units[1], UNSHARD) if units else None
    for params, keep, prog in zip(reversed(layers), reversed(kept), reversed(progs), strict=True):
        if not prog.events:
            continue  # below the lowest trained layer of a freeze run: no backward
        p.mark(layer=True)
        unit, nxt = nxt, (p.new(units[1], UNSHARD) if units else None)
        own = keep  # the program's saved tensors lead the forward's kept list
        if tr.checkpointing:  # the layer's forward again, on its kept input: it saves now
            own, casts, y = _run(p, prog, keep_saved=True)
            p.free(y)
            keep = keep + own + casts
        trained = [b for b, trains, _ in params if trains]
        whole = p.new(sum(trained) / scale) if units and trained else None
        if whole is None:
            grads += p.allocs(tuple(trained))
        gone: set[int] = set()
        for group, early in zip(prog.grads, prog.released, strict=True):  # the MLP's three (B, S, I) gradients;
            made = [p.new(nbytes) for nbytes in group]  # merged expert weights' gradients, each freeing the
            gone.update(own[i] for i in early)  # merged weight saved for it (_grads)
            p.free(*[own[i] for i in early], *made)
        if whole is not None:
            grads.append(p.new(sum(trained), POST_BACKWARD))
            p.free(whole)
        g_prev = p.new(hidden)
        p.free(g_x, *[k for k in keep if k not in gone])
        p.free(unit)
        g_x = g_prev
    p.mark()
    return g_x, nxt


def _embedding_and_root(p: _Program, lay: Layout, grads: list[int], head_grads: list[int],
                        units: tuple[int, int] | None, scale: float) -> None:
    """The embedding's dense gradient (full fine-tuning), then, under FSDP1, the root's flat gradient, whole once
    the embedding's is made (autograd's split backward), reduce-scattered last; appended to `grads`."""
    s = lay.spec
    if lay.full:  # the embedding's dense gradient; tied to the LM head, AccumulateGrad adds it out of place to the
        vh = s.vocab_size * s.hidden_size * lay.trainable_width  # head's (estimator.py _tied_embedding_extra)
        if s.tie_word_embeddings:
            lm, g_emb = p.new(vh), p.new(vh)  # the head's gradient came first; then the embedding's
            grads.append(p.new(vh))
            p.free(lm, g_emb)
        else:
            grads.append(p.new(vh))
    if units and head_grads:
        parts = head_grads + ([grads.pop()] if lay.full else [])
        whole = p.new(sum(p.sizes[k][0] for k in parts))
        p.free(*parts)
        grads.append(p.new(p.sizes[whole][0] * scale, POST_BACKWARD))
        p.free(whole)
    else:
        grads += head_grads


@dataclass(frozen=True, slots=True, kw_only=True)
class _Layer:
    """One decoder layer's forward as its tape program runs it (tape.Lifetimes): (MADE | DROPPED, storage, bytes)
    and (CAST, 0, bytes of autocast's copy) in order; which storages it saves; its output; whether it saves its
    input."""

    events: tuple[tuple[str, int, int], ...]
    saved: frozenset[int]
    output: int
    input_saved: bool
    grads: tuple[tuple[int, ...], ...] = ()  # its backward's gradient buffers, each group made then freed (_grads)
    released: tuple[tuple[int, ...], ...] = ()  # per group: its saved tensors (places in _run's saved list) freed
    # with it, before the layer's backward ends


def _moe_layer(lay: Layout, index: int) -> bool:
    """Decoder layer `index` has the sparse MoE MLP (not one of DeepSeek's first_k_dense_replace dense layers:
    modeling_deepseek_v3.py DeepseekV3DecoderLayer `if layer_idx >= config.first_k_dense_replace`)."""
    return lay.spec.is_moe and index >= lay.spec.dense_layers


class _Kind(NamedTuple):
    """What a decoder layer's tape program depends on: its weights train, its input requires grad, it is an MoE
    layer, a Gated DeltaNet (Qwen3.5 layer_types), it rotates q / k (not a Llama 4 NoPE layer), it attends within
    the sliding window (Gemma 3: all but every sliding_window_pattern-th; spec.model is_windowed_layer)."""

    trains: bool
    x_rg: bool
    moe: bool
    linear: bool = False
    rope: bool = True
    windowed: bool = True


def _layer_kind(lay: Layout, index: int) -> _Kind:
    """The kind of decoder layer `index`. transformers' checkpointing turns input gradients on (estimator.py
    _freeze_activations): then every layer's input needs a gradient, but on LLaMA-Factory's wrapper. Otherwise a
    freeze run's layers below the lowest trained one need none (they save nothing), nor a LoRA run's first layer; a
    full run's always do (the embedding trains)."""
    tr, s = lay.train, lay.spec
    shape = dict(moe=_moe_layer(lay, index), linear=s.is_linear_layer(index), rope=s.uses_rope(index),
                 windowed=s.is_windowed_layer(index))
    if tr.method is Method.FREEZE:
        lo = lay.trained_ids[0] if lay.trained_ids else s.num_layers
        input_grads = tr.checkpointing and stack_facts(tr.stack).name is not Stack.LLAMAFACTORY
        return _Kind(trains=index in lay.trained_ids, x_rg=index > lo or input_grads, **shape)
    return _Kind(trains=lay.full, x_rg=lay.full or tr.checkpointing or index > 0, **shape)


def _program(lay: Layout, kind: _Kind) -> _Layer:
    """Run activations.decoder_layer's tape program once for a layer of this kind, recording its storages'
    lifetimes. A linear whose weight trains reads autocast's half copy of it when that weight is fp32 (a leaf that
    requires grad: aten/src/ATen/autocast_mode.cpp cached_cast; weights.py autocast_layer_bytes): 2 B per element,
    else none."""
    tr = lay.train
    b, sq = tr.batch_size, tr.seq_len
    width = lay.lora_width if tr.is_lora else lay.trainable_width
    cast = 2 if lay.amp and width == FP32 and tr.adapter is not Adapter.OFT else 0
    tape = Tape()
    cx = _Ctx(tape, lay, b * sq, b, sq, kind.trains, stream_width(lay), moe=kind.moe, linear=kind.linear,
              rope=kind.rope, windowed=kind.windowed)
    x = T(b * sq * lay.spec.hidden_size, stream_width(lay), kind.x_rg)
    with tape.recording() as rec:
        y = decoder_layer(cx, x)
    output = y.storage
    del y
    events = tuple((what, key, nbytes * cast if what == CAST else nbytes) for what, key, nbytes in rec.events
                   if what != CAST or cast)
    has_grad = kind.trains or kind.x_rg or tr.is_lora  # (a LoRA run's first layer: its adapters train)
    groups = _grads(lay, kind)
    # _run's saved list: the saved storages in the order made (the output aside); a group releasing a saved tensor
    # of some size frees the last one of that size (activations._moe saves each merged weight once)
    sizes = [nbytes for what, key, nbytes in events if what == MADE and key in tape.saved and key != output]
    released = tuple((max(i for i, n in enumerate(sizes) if n == size),) if size in sizes else ()
                     for _, size in groups)
    return _Layer(events=events if has_grad else (), saved=frozenset(tape.saved), output=output,
                  input_saved=x.storage in tape.saved, grads=tuple(made for made, _ in groups), released=released)


def _grads(lay: Layout, kind: _Kind) -> tuple[tuple[tuple[int, ...], int], ...]:
    """The gradient buffers a layer's backward makes beside its parameters' gradients, in order: the MLP's three
    (B, S, I) ones of act * up's backward (estimator.py _layer_backward_buffers; a DeepSeek dense layer's I:
    intermediate_size, an MoE layer's: the routed rows); where peft wraps the experts (activations._moe), the
    merged weights' gradients, which the grouped matmuls' backward makes (the merged weight requires grad through
    the LoRA factors): down_proj's (E, H, I) before the MLP's, gate_up_proj's (E, 2I, H) after, each with the
    merged weight its grouped matmul saved (baddbmm's backward releases it; a Mixtral trace frees each there).
    Each group: (its bytes, the bytes of the saved tensor it frees or 0)."""
    s, n, c = lay.spec, lay.train.batch_size * lay.train.seq_len, lay.compute_width
    moe = s.is_moe and kind.moe
    inter = s.moe_intermediate_size * s.routed_rows if moe else s.intermediate_size
    mlp = (n * inter * c,) * (3 if s.family.gated_mlp else 2)  # one projection (StarCoder2): the activation's two
    down, gate_up = merged_experts(lay) if moe else (0, 0)
    return (((down,), down), (mlp, 0), ((gate_up,), gate_up)) if down else ((mlp, 0),)


def _run(p: _Program, prog: _Layer, keep_saved: bool) -> tuple[list[int], list[int], int]:
    """Make a layer's requests: returns (its saved tensors still alive, its weight copies, its output). Written
    once per (program, keep_saved, place in the chunk) and copied (_run_into)."""
    offset = len(p.sizes) - p._base
    key = (id(prog), keep_saved, offset)
    if key not in p.templates:
        q = _Program()
        q._base = -offset  # its ids count from 0; frees of them are local to the chunk at `offset`
        saved, casts, out = _run_into(q, prog, keep_saved)
        assert not q._refs
        p.templates[key] = (tuple(q._ops), q.sizes, saved, casts, out)
    ops, sizes, saved, casts, out = p.templates[key]
    start = len(p.sizes)
    p._ops += ops
    p.sizes += sizes
    return [start + i for i in saved], [start + i for i in casts], start + out


def _run_into(p: _Program, prog: _Layer, keep_saved: bool) -> tuple[list[int], list[int], int]:
    ids: dict[int, int] = {}
    casts: list[int] = []
    for kind, key, nbytes in prog.events:
        if kind == CAST:
            casts.append(p.new(nbytes))
        elif kind == MADE:
            ids[key] = p.new(nbytes)
        elif not (keep_saved and key in prog.saved):
            p.free(ids.pop(key))
    out = ids.pop(prog.output) if prog.output in ids else p.new(0)
    saved = [i for key, i in ids.items() if key in prog.saved]
    p.free(*[i for key, i in ids.items() if key not in prog.saved])  # made, never dropped: none expected
    return saved, casts, out
