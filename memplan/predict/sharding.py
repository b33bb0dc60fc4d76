"""Per-rank model states under data parallelism: DDP, DeepSpeed ZeRO 1/2/3, torch FSDP, with CPU offload.

Input: the single-GPU ModelStates (HF AMP semantics: fp32 trainable weights, autocast half copies). Output: what
one rank holds, plus the communication buffers and gathered parameters the framework adds, and host memory.

DeepSpeed runs its own mixed precision: with bf16/fp16 the module itself is half (2 B/param) and the optimizer
holds fp32 master weights, fp32 gradients and states for its partition. Per trainable parameter (DeepSpeed's
`estimate_zero2_model_states_mem_needs`): 2 (half params) + 18 / N = 2 half grads + 4 fp32 grads + 4 master + 8
Adam states; ZeRO-3 partitions the half params too and gathers the largest layer with its half grads
(`estimate_zero3_model_states_mem_needs`: 4 x largest + 18 / N). Those formulas are the model states; _deepspeed
adds when each part is alive and DeepSpeed's buffers, as measured on real ranks (tests/test_scale.py).
torch FSDP (as HF Trainer / accelerate set it up) keeps the flat parameters in their own dtype (fp32 under AMP),
shards params, grads and states over the shard group, and gathers each wrapped decoder layer in the compute dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

from memplan.predict.layout import Layout
from memplan.predict.weights import ModelStates
from memplan.spec.optimizers import facts
from memplan.spec.parallel import DDP_BUCKET_MB, DS_MAX_LIVE_PARAMS, Offload, Sharding
from memplan.spec.train import Precision


@dataclass(frozen=True, slots=True, kw_only=True)
class RankStates:
    """What one rank holds. `gathered_bytes` and `bucket_bytes` live through forward and backward;
    `step_extra_bytes` is added during the optimizer step; host bytes are per node."""

    states: ModelStates
    gathered_bytes: int  # parameters gathered for compute (ZeRO-3 / FSDP units, FSDP shard_grad_op's full copy)
    bucket_bytes: int  # gradient reduce buckets (DDP copies, DeepSpeed ipg buffer) and prefetch buckets
    step_extra_bytes: int  # ZeRO-1/2 allgather bucket of updated params
    host_bytes: int  # CPU memory per node for offloaded states / params
    explain: str
    layer_backward_bytes: int = 0  # FSDP: one more gathered layer and its unsharded grads inside a layer's backward
    backward_bucket_bytes: int = 0  # alive from the first backward to the step only (ZeRO-1/2 ipg buffer)
    ds_grad_bytes: int = 0  # DeepSpeed: the gradients its estimators count (ZeRO-1/2 half + fp32, ZeRO-3 fp32)
    gathered_in_step: bool = True  # False: everything is resharded before the optimizer step (FSDP)
    forward_release_bytes: int = 0  # part of gathered_bytes not yet gathered at the end of forward (FSDP1 prefetch)
    detail: str = ""  # one line per named term ("\n· name bytes: source"), shown under the sharding term


def _ceil(x: int, n: int) -> int:
    return -(-x // n)


def shard_group(lay: Layout) -> int:
    tr = lay.train
    if tr.sharding is Sharding.HYBRID_SHARD:
        return tr.gpus_per_node
    if tr.sharding in (Sharding.NONE, Sharding.NO_SHARD):
        return 1
    return tr.gpus


def largest_unit_params(lay: Layout) -> int:
    """The biggest block gathered at once: a decoder layer, or the (V, H) embedding / LM head."""
    s = lay.spec
    return max(s.layer_params, s.vocab_size * s.hidden_size)


def model_state_bytes(lay: Layout, st: ModelStates) -> tuple[int, int]:
    """(GPU bytes per rank, host bytes per node) of model states alone: the quantity DeepSpeed's estimators give
    (no activations, buckets or temporaries)."""
    rs = rank_states(lay, st)
    grads = rs.ds_grad_bytes if lay.train.sharding.is_deepspeed else rs.states.gradients_bytes
    gpu = rs.states.weights_bytes + grads + rs.states.optimizer_states_bytes
    if lay.train.sharding is Sharding.ZERO3:  # DeepSpeed counts the largest layer's half params + half grads
        gpu += 2 * largest_unit_params(lay) * _half(lay)
    return gpu, rs.host_bytes


def _half(lay: Layout) -> int:
    return 4 if lay.train.precision is Precision.FP32 else 2


def rank_states(lay: Layout, st: ModelStates) -> RankStates:
    tr = lay.train
    if tr.sharding.is_deepspeed:
        return _deepspeed(lay, st)
    if tr.parallel.fsdp1 and tr.sharding is not Sharding.NO_SHARD:
        return _fsdp1(lay, st)
    if tr.parallel.fsdp2:
        return _fsdp(lay, st)
    ddp = st.gradients_bytes if tr.gpus > 1 and tr.sharding is Sharding.NONE else 0
    what = f"DDP: gradient buckets ({DDP_BUCKET_MB} MB each) copy every gradient" if ddp else "no sharding"
    return RankStates(states=st, gathered_bytes=0, bucket_bytes=ddp, step_extra_bytes=0, host_bytes=0,
                      explain=what)


def _fp32_states(lay: Layout, st: ModelStates) -> int:
    """Optimizer states over fp32 partitions (DeepSpeed's optimizer always steps fp32 master weights)."""
    width = 2 if lay.train.precision is Precision.PURE_BF16 else 4
    if not facts(lay.train.optimizer).states.follows_param_width:  # 8-bit / fp32 / factored: as they are
        return st.optimizer_states_bytes
    return st.optimizer_states_bytes * 4 // width


def _deepspeed(lay: Layout, st: ModelStates) -> RankStates:
    """DeepSpeed 0.19 as measured on real ranks (CPU accelerator, gloo; memplan.probe.parallel): the module in
    the half dtype, an fp32 partition the optimizer steps (a copy even in fp32) with its Adam states; gradients
    reduced in buckets into this rank's partition as backward runs (ZeRO-1 like ZeRO-2, except that it keeps
    whole gradients while accumulating micro-steps) and turned into fp32 for the step; the contiguous-gradients
    (ipg) buffer of reduce_bucket_size elements, from backward to the step. ZeRO-3 keeps that buffer and a
    flat gradient partition for the whole run, and up to stage3_max_live_parameters gathered from forward
    through backward (parameters reused within stage3_max_reuse_distance stay gathered)."""
    tr, n = lay.train, shard_group(lay)
    half = _half(lay)
    t, f = st.trainable_params, st.frozen_params
    frozen = st.weights_bytes - t * lay.trainable_width  # frozen/quantized base + buffers, as loaded
    reduce = tr.parallel.reduce_bucket(lay.spec.hidden_size)
    master = 4 * t  # fp32 partition the optimizer steps
    states = _fp32_states(lay, st)
    grad_part = _ceil(t * half, n)  # reduced gradients of this rank's partition, in the module's dtype
    grad32 = _ceil(4 * t, n)  # the fp32 gradients the optimizer steps (made from grad_part)
    ipg = reduce * half if t else 0
    offload = tr.offload is not Offload.NONE
    if tr.sharding is Sharding.ZERO3:
        weights = _ceil(t * half + frozen, n)
        grads, backward_bucket = 0, 0
        bucket = ipg + (0 if offload else grad_part)  # allocated at initialisation
        gathered = max(min(DS_MAX_LIVE_PARAMS, t + f), largest_unit_params(lay)) * half
        step_extra = 0 if offload else grad32
    else:
        weights = t * half + frozen
        # ZeRO-1 accumulating over micro-steps keeps whole gradients until the boundary (measured)
        whole = tr.sharding is Sharding.ZERO1 and tr.grad_accum > 1
        grads = 0 if offload else t * half if whole else grad_part  # offload: streamed to the CPU optimizer
        bucket, backward_bucket, gathered = 0, ipg, 0
        step_extra = 0 if offload else max(grad32 - grads, 0)  # half gradients become fp32 ones
    host = 0
    partitioned = _ceil(master + states, n)
    if offload:  # the optimizer's partition (fp32 master, grads and states) lives in host memory
        host = _ceil(master + 4 * t + states, n) * tr.gpus_per_node
        partitioned = 0
    if tr.offload is Offload.PARAMS:
        host += weights * tr.gpus_per_node
        weights = 0
    ranked = ModelStates(
        weights_bytes=weights, trainable_params=t, frozen_params=f, quantized_params=st.quantized_params,
        gradients_bytes=grads, optimizer_states_bytes=partitioned,
        optimizer_step_bytes=0 if offload else _ceil(st.optimizer_step_bytes * 4 // lay.trainable_width, n),
        autocast_cache_bytes=0, autocast_layer_bytes=0,)  # the module is already half: nothing to cast
    what = (f"DeepSpeed {tr.sharding.value} over {n} ranks: {half} B params, fp32 partition + states, "
            f"ipg buffer {reduce:,} elements" + (f", offload {tr.offload.value}" if offload else ""))
    return RankStates(states=ranked, gathered_bytes=gathered, bucket_bytes=bucket, step_extra_bytes=step_extra,
                      host_bytes=host, explain=what, backward_bucket_bytes=backward_bucket,
                      gathered_in_step=False, ds_grad_bytes=0 if offload else grads + grad32)


def _fsdp_shards(lay: Layout, st: ModelStates, n: int) -> tuple[ModelStates, int]:
    """One FSDP rank's share of the model states (FSDP1 and FSDP2 alike), and the host bytes per node: CPUOffload
    (offload_params=True) moves parameters and gradients, the optimizer follows. Units are gathered in the compute
    dtype (MixedPrecision param_dtype), so no autocast copies."""
    tr = lay.train
    weights, grads = _ceil(st.weights_bytes, n), _ceil(st.gradients_bytes, n)
    states = _ceil(st.optimizer_states_bytes, n)
    host = 0
    if tr.offload is not Offload.NONE:
        host = (weights + grads + states) * tr.gpus_per_node
        weights = grads = states = 0
    ranked = ModelStates(
        weights_bytes=weights, trainable_params=st.trainable_params, frozen_params=st.frozen_params,
        quantized_params=st.quantized_params, gradients_bytes=grads,
        optimizer_states_bytes=states, optimizer_step_bytes=0 if host else _ceil(st.optimizer_step_bytes, n),
        autocast_cache_bytes=0, autocast_layer_bytes=0)
    return ranked, host


def _fsdp(lay: Layout, st: ModelStates) -> RankStates:
    """FSDP2 (each decoder layer and the root wrapped; measured with the exact mode under a fake process group):
    the root (embeddings, head) stays gathered from its forward through backward, one decoder layer is gathered
    (prefetched) at the loss, two plus the running layer's unsharded gradients inside a layer's backward, none in
    the optimizer step. shard_grad_op keeps every layer gathered from forward to the end of backward."""
    tr, n, s = lay.train, shard_group(lay), lay.spec
    cw = lay.compute_width  # MixedPrecisionPolicy gathers half parameters under AMP
    root = s.vocab_size * s.hidden_size * (1 if s.tie_word_embeddings else 2) + s.hidden_size
    per_layer_trained = s.layer_params if st.trainable_params >= s.layer_params else \
        st.trainable_params // s.num_layers  # LoRA: the adapters' gradients only
    unsharded_grads = per_layer_trained * cw if st.gradients_bytes else 0
    if tr.sharding is Sharding.SHARD_GRAD_OP:
        gathered, layer_extra = s.num_parameters * cw, unsharded_grads
    else:
        gathered, layer_extra = (root + s.layer_params) * cw, s.layer_params * cw + unsharded_grads
    ranked, host = _fsdp_shards(lay, st, n)
    what = f"FSDP {tr.sharding.value} over {n} ranks" + (f", offload {tr.offload.value}" if host else "")
    return RankStates(states=ranked, gathered_bytes=gathered, bucket_bytes=0, step_extra_bytes=0,
                      host_bytes=host, explain=what, layer_backward_bytes=layer_extra, gathered_in_step=False)


def _fsdp1(lay: Layout, st: ModelStates) -> RankStates:
    """FSDP1 FullyShardedDataParallel as accelerate + HF Trainer wrap it (memplan.build.shard.fsdp1_wrap_model), from
    torch 2.13's torch/distributed/fsdp sources; measured on two real gloo ranks and under the fake process group
    (tests/test_fsdp1.py). One FlatParameter per unit (each decoder layer; the root: embeddings, final norm, head;
    under peft, HF Trainer's update_fsdp_plugin_peft wraps every lora_A / lora_B as a unit of its own, so a decoder
    unit's flat parameter is all frozen and gets no gradient), each padded to a multiple of the shard group:
      shards       params, fp32 grads, states / N (_flat_param.py FlatParamHandle._get_shard pads each unit to a
                   multiple of N: under N elements a unit, not counted)
      root         gathered from the root's forward through its backward (_runtime_utils.py _post_forward_reshard:
                   `free_unsharded_flat_param = not state._is_root and ...`)
      unit         a decoder unit is gathered only while it runs: FULL_SHARD frees it after its forward
                   (RESHARD_AFTER_FORWARD_HANDLE_STRATEGIES) and accelerate's forward_prefetch is off
      prefetch     from the root's backward on, the next unit in backward order is already gathered (the root's
                   pre-backward hook prefetches the last decoder unit; BackwardPrefetch.BACKWARD_PRE,
                   _runtime_utils.py _pre_backward_hook -> _prefetch_handle); limit_all_gathers allows two in flight
      unsharded grad  the running unit's whole flat gradient in param_dtype until reduce-scatter
                   (_runtime_utils.py _post_backward_hook -> _reduce_grad), trained units only
    Gathered units are in MixedPrecision's param_dtype: half under AMP (accelerate set_mixed_precision).
    shard_grad_op keeps every unit gathered from forward to the end of backward (_should_free_in_backward)."""
    tr, n, s = lay.train, shard_group(lay), lay.spec
    cw = lay.compute_width
    root = s.vocab_size * s.hidden_size * (1 if s.tie_word_embeddings else 2) + s.hidden_size
    per_layer_trained = s.layer_params if st.trainable_params >= s.layer_params else \
        st.trainable_params // s.num_layers  # LoRA: the adapters' own units
    unsharded_grads = per_layer_trained * cw if st.gradients_bytes else 0
    forward_release = 0
    if tr.sharding is Sharding.SHARD_GRAD_OP:
        gathered, layer_extra = s.num_parameters * cw, unsharded_grads
        parts = [("every unit gathered", gathered, "SHARD_GRAD_OP: not freed after forward")]
    else:
        # from the loss on the last decoder unit is gathered too: the root's pre-backward hook prefetches it
        gathered, layer_extra = (root + s.layer_params) * cw, s.layer_params * cw + unsharded_grads
        forward_release = s.layer_params * cw  # at the end of forward only the root is gathered
        parts = [("root unit gathered", root * cw, "_post_forward_reshard: the root is not freed after forward"),
                 ("prefetched unit", s.layer_params * cw, "BACKWARD_PRE: _prefetch_handle in _pre_backward_hook, "
                                                          "from the root's backward on; none at forward's end"),
                 ("running unit gathered", s.layer_params * cw,
                  "FlatParamHandle.unshard, in a unit's backward (in transient)")]
    parts.append(("unsharded flat grad", unsharded_grads, "_post_backward_hook: the running unit's grad until "
                                                            "reduce-scatter (in transient)"))
    ranked, host = _fsdp_shards(lay, st, n)
    what = (f"FSDP1 {tr.sharding.value} over {n} ranks (flat parameters, use_orig_params)"
            + (f", offload {tr.offload.value}" if host else ""))
    detail = "".join(f"\n· {name} {b:,} B: {src}" for name, b, src in parts)
    return RankStates(states=ranked, gathered_bytes=gathered, bucket_bytes=0, step_extra_bytes=0,
                      host_bytes=host, explain=what, layer_backward_bytes=layer_extra, gathered_in_step=False,
                      forward_release_bytes=forward_release, detail=detail)
