"""Reserved memory on the analytic path: the reference step written as an ordered list of allocations and frees,
built from the estimator's own pieces (each parameter's shape, the optimizer's states, the tape programs' saved
tensors of one decoder layer, the LM head's tensors), replayed through the caching-allocator model.

It is a sketch of the real sequence, not a copy: a layer's temporaries that die inside the layer are left out, and
the order follows transformers' code as the exact mode's traces show it. What it contributes is the allocator's
overhead (reserved minus the live peak of the same sequence), added to the analytic live peak; how close that comes
to the replay of an exact trace is measured in benchmarks/results/allocator_catalog.md.
"""

from __future__ import annotations

from functools import lru_cache

from memplan.predict import adapters
from memplan.predict.activations import _Ctx, decoder_layer, stream_width
from memplan.predict.allocator import ALLOC, FREE, replay
from memplan.predict.layout import Layout
from memplan.predict.tape import T, Tape
from memplan.predict.weights import ModelStates
from memplan.spec.optimizers import States, facts
from memplan.spec.stacks import quantize_temporaries, stack_facts
from memplan.spec.train import Method

FP32 = 4
# CUDA streams of the sketch: the caching allocator reuses a freed block only for a request on the stream it was
# allocated on (c10/cuda/CUDACachingAllocator.cpp get_free_block: `(*it)->stream != p.stream()` -> no block), so
# what FSDP1 allocates on its own streams is cached apart from the compute stream's blocks
COMPUTE, UNSHARD, POST_BACKWARD = 0, 1, 2


class _Program:
    """The events being written: `new` allocates and returns an id, `free` releases one."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int, int, int]] = []
        self.packed: list[int] = []  # the 4-bit weights' ids, in load order

    def new(self, nbytes: float, stream: int = COMPUTE) -> int:
        self.events.append((ALLOC, len(self.events), int(nbytes), stream))
        return len(self.events) - 1

    def free(self, *ids: int | None) -> None:
        self.events += [(FREE, i, self.events[i][2], self.events[i][3]) for i in ids if i is not None]


def reserved_overhead(lay: Layout, st: ModelStates, scale: float = 1.0, depth: int | None = None) -> int:
    """Reserved minus live peak bytes of the step's sketched allocation sequence (`scale`: the fraction of each
    parameter, gradient and state one rank holds under sharding; `depth`: sketch that many decoder layers)."""
    p = _Program()
    s, tr = lay.spec, lay.train
    layers = [_layer_params(lay, i, scale) for i in range(s.num_layers if depth is None else depth)]
    # the load's quantizer temporaries are left to load_reserved: this sketch is the step's, as the exact mode's
    # replays (which trace the step) measure it
    head = _load(p, lay, layers, scale, quantizer=False)
    trained = [n for params in layers for n, t, _ in params if t] + [n for n, t in head if t]
    if lay.full:
        trained.append(s.vocab_size * s.hidden_size * scale * lay.trainable_width)  # the embedding
    opt = facts(tr.optimizer)
    per_state = {States.ADAM: 2, States.ADAM_FP32: 2, States.MOMENTUM: 1}.get(opt.states, 0)
    for n in trained:  # optimizer states, per trainable tensor (8-bit / factored states: left out)
        for _ in range(per_state):
            p.new(n)
    p.new(tr.batch_size * tr.seq_len * 8)  # input ids (int64)
    grads = _forward_backward(p, lay, layers, head, scale)
    if opt.foreach_copy:  # foreach AdamW: _foreach_sqrt(exp_avg_sq), one copy per tensor, freed after the step
        p.free(*[p.new(n) for n in trained])
    p.free(*grads)
    return _overhead(tuple(p.events))


@lru_cache(maxsize=4096)
def _overhead(events: tuple[tuple[str, int, int, int], ...]) -> int:
    """One replay per distinct sequence: fit's candidates that differ only in what the sketch leaves out
    (accumulation, the attention kernel's temporaries, the step count) share it."""
    stats = replay(events)
    return stats.peak_reserved_bytes - stats.peak_requested_bytes


def load_reserved(lay: Layout, st: ModelStates, scale: float = 1.0) -> int:
    """Reserved bytes at the end of the model load, replayed at full depth: a QLoRA stack whose quantizer's
    temporaries are large (spec.stacks quantize_load_transients) leaves the allocator holding far more than the
    weights, and the cache never shrinks, so the run's reserved peak is at least this. The extrapolation
    `reserved_overhead` uses for the step does not hold here: the temporaries' cached blocks are reused by later
    weights, a one-off pattern, not a per-layer one."""
    p = _Program()
    layers = [_layer_params(lay, i, scale) for i in range(lay.spec.num_layers)]
    _load(p, lay, layers, scale, quantizer=True)
    if stack_facts(lay.train.stack).device_init:  # built and quantized on the GPU, then each weight replaced
        _requantize(p, lay, layers)
    return replay(p.events).peak_reserved_bytes


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
    for key, (nbytes, elements) in zip(list(p.packed), weights, strict=True):
        _quantize(p, lay, nbytes, elements)
        p.free(key)


def _load(p: _Program, lay: Layout, layers: list[list[tuple[float, bool, float]]],
          scale: float, quantizer: bool) -> list[tuple[float, bool]]:
    """The model load's requests: the embedding, each layer's parameters, the final norm and LM head (returned);
    with `quantizer`, each 4-bit weight made through the stack's quantizer temporaries."""
    s, qlora = lay.spec, lay.train.method is Method.QLORA and quantizer
    p.new(s.vocab_size * s.hidden_size * scale * (lay.trainable_width if lay.full else lay.base_width))  # embedding
    for params in layers:  # each parameter its own request, as a model is loaded; QLoRA: 4-bit ones quantized
        for nbytes, _trains, elements in params:
            key = _quantize(p, lay, nbytes, elements if qlora else 0)
            if elements and qlora:
                p.packed.append(key)
    head = [(s.hidden_size * scale * (lay.trainable_width if lay.full else lay.base_width), lay.full)]
    if not s.tie_word_embeddings:
        head.append((s.vocab_size * s.hidden_size * scale * (lay.trainable_width if lay.full else lay.base_width),
                     lay.full))
    for nbytes, _trains in head:
        p.new(nbytes)
    return head


def _layer_params(lay: Layout, index: int, scale: float) -> list[tuple[float, bool, float]]:
    """(bytes, trains, elements quantized on the way in or 0) of each parameter of decoder layer `index`: its
    linears, norms and LoRA adapters."""
    s, tr = lay.spec, lay.train
    trains = lay.full or (tr.method is Method.FREEZE and index in lay.trained_ids)
    width = lay.trainable_width if trains else lay.base_width
    qlora = tr.method is Method.QLORA
    out = [(lin.params * scale * (tr.quant_bits / 8 if q else width), trains, lin.params * scale if q else 0)
           for lin in s.layer_linears() for q in [lay.quantized(lin.name)]]
    out += [(s.hidden_size * (lay.trainable_width if trains else lay.base_width) * scale, trains, 0)
            for _ in range(s.norms_per_layer)]
    if s.is_moe:
        out += [(lin.params * s.num_experts * (tr.quant_bits / 8 if qlora else width) * scale, trains, 0)
                for lin in s.mlp_linears()]
    for lin in s.layer_linears():
        if lin.name in lay.lora_modules:  # LoRA A, B (DoRA + magnitude; OFT: its rotation blocks)
            out += [(rows * (cols or 1) * lay.lora_width * scale, True, 0)
                    for rows, cols in adapters.trainable_shapes(tr, lin)]
    return out


def _fsdp1_units(lay: Layout) -> tuple[int, int] | None:
    """(root unit, decoder unit) bytes FSDP1 gathers in the compute dtype, where it shards parameters; else None."""
    s, tr = lay.spec, lay.train
    if not (tr.parallel.fsdp1 and tr.sharding.shards_params and tr.gpus > 1):
        return None
    root = s.vocab_size * s.hidden_size * (1 if s.tie_word_embeddings else 2) + s.hidden_size
    return root * lay.compute_width, s.layer_params * lay.compute_width


def _forward_backward(p: _Program, lay: Layout, layers: list[list[tuple[float, bool, float]]],
                      head: list[tuple[float, bool]], scale: float = 1.0) -> list[int]:
    """Step 2's forward and backward; returns the gradients alive after it (freed by zero_grad). Under FSDP1 (full
    or hybrid shard) its units are gathered on its unshard stream (_runtime_utils.py _unshard: `with
    state._device_handle.stream(unshard_stream): handle.unshard()`): the root from its forward to the end of
    backward, each decoder unit for its forward and again, with the next one prefetched (BACKWARD_PRE), for its
    backward; their cached blocks are reserved apart from the compute stream's in the optimizer step."""
    s, tr = lay.spec, lay.train
    n = tr.batch_size * tr.seq_len
    stream, c = stream_width(lay), lay.compute_width
    hidden = n * s.hidden_size * stream
    saved = _layer_saved_tensors(lay, x_rg=lay.full or tr.checkpointing)
    # parameters offloaded to the host (FSDP1 CPUOffload: the rank's scale is 0, nothing of its own on the GPU):
    # the gathered units' stream pools are not sketched there
    units = _fsdp1_units(lay) if scale > 0 else None
    root_unit = p.new(units[0], UNSHARD) if units else None
    kept: list[list[int]] = []
    x = p.new(hidden)  # the embedding output
    for _ in layers:  # forward: each layer keeps its saved tensors (its input, under checkpointing)
        unit = p.new(units[1], UNSHARD) if units else None  # FULL_SHARD: freed after the unit's forward
        kept.append([x] if tr.checkpointing else [x, *(p.new(b) for b in saved)])
        x = p.new(hidden)
        p.free(unit)
    v = s.vocab_size
    logits = p.new(n * v * c)  # the LM head's output, the fp32 upcast, log_softmax's saved output
    up = p.new(n * v * FP32) if c != FP32 else logits
    logp = p.new(n * v * FP32)
    p.free(*{up, logits})
    grads: list[int] = []
    g_logp, g_up = p.new(n * v * FP32), p.new(n * v * FP32)  # backward: nll_loss, log_softmax
    p.free(g_logp, logp)
    g_logits = p.new(n * v * c) if c != FP32 else g_up
    if c != FP32:
        p.free(g_up)
    head_grads = [p.new(b / scale if units else b) for b, trains in head if trains]  # FSDP1: the root's, whole
    g_x = p.new(hidden)
    p.free(g_logits, x)
    inter = s.moe_intermediate_size * s.routed_rows if s.is_moe else s.intermediate_size
    # the root's pre-backward prefetches the last unit, each unit's the one below it (in the sketch every layer
    # has one below, as all but the lowest of the model's do: depth 1 and 2 differ by one layer's pattern)
    nxt = p.new(units[1], UNSHARD) if units else None
    for params, keep in zip(reversed(layers), reversed(kept), strict=True):
        unit, nxt = nxt, (p.new(units[1], UNSHARD) if units else None)
        if tr.checkpointing:  # the layer's forward again, on its kept input
            keep = keep + [p.new(b) for b in saved]
        trained = [b for b, trains, _ in params if trains]
        # FSDP1: the unit's whole flat gradient on the compute stream, then the reduce-scatter's output shard made
        # in the post-backward stream (_runtime_utils.py _post_backward_hook: `with state._device_handle.stream(
        # state._post_backward_stream)` around _reduce_grad -> _get_reduce_scatter_tensors `torch.empty_like(
        # chunks[0])`), the whole one freed after
        whole = p.new(sum(trained) / scale) if units and trained else None
        if whole is None:
            grads += [p.new(b) for b in trained]
        p.free(*[p.new(n * inter * c) for _ in range(3)])  # the MLP's three (B, S, I) gradients
        if whole is not None:
            grads.append(p.new(sum(trained), POST_BACKWARD))
            p.free(whole)
        g_prev = p.new(hidden)
        p.free(g_x, *keep)
        p.free(unit)
        g_x = g_prev
    if lay.full:  # the embedding's dense gradient; tied to the LM head, AccumulateGrad adds it out of place to the
        vh = s.vocab_size * s.hidden_size * lay.trainable_width  # head's (estimator.py _tied_embedding_extra)
        if s.tie_word_embeddings:
            lm, g_emb = p.new(vh), p.new(vh)  # the head's gradient came first; then the embedding's
            grads.append(p.new(vh))
            p.free(lm, g_emb)
        else:
            grads.append(p.new(vh))
    if units and head_grads:  # the root's flat gradient, whole once the embedding's is made (autograd's split
        parts = head_grads + ([grads.pop()] if lay.full else [])  # backward), is reduce-scattered last
        whole = p.new(sum(p.events[k][2] for k in parts))
        p.free(*parts)
        grads.append(p.new(p.events[whole][2] * scale, POST_BACKWARD))
        p.free(whole)
    else:
        grads += head_grads
    p.free(g_x, root_unit, nxt)
    return grads


def _layer_saved_tensors(lay: Layout, x_rg: bool) -> list[int]:
    """Bytes of each tensor one decoder layer saves for backward, in the order the tape program saves them."""
    tr = lay.train
    tape = Tape()
    b, s = tr.batch_size, tr.seq_len
    cx = _Ctx(tape, lay, b * s, b, s, lay.full or tr.method is Method.FREEZE, stream_width(lay))
    x = T(b * s * lay.spec.hidden_size, stream_width(lay), x_rg)
    decoder_layer(cx, x)
    return [nbytes for storage, nbytes in tape.saved.items() if nbytes and storage != x.storage]  # x: kept apart
