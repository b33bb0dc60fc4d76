"""The analytic estimator: peak live bytes of the reference step (memplan.build.step), term by term, pure Python.

The peak is the largest of four moments of step 2 (optimizer states exist by then), as `estimate` names them:
  forward       end of forward: weights + states + autocast cache + saved activations + logits, upcast, log-probs
  backward      the largest of: the cross-entropy backward (log-probs + their gradient + the logits' gradient);
                the LM head's backward; with checkpointing, one layer recomputed on the kept layer inputs + its
                gradient buffers
  optimizer     weights + gradients + states + the step's temporaries (foreach AdamW: one more state copy)
  backward end  every gradient done (tied embeddings: the dense embedding gradient and its sum)
Saved activations come from the tape programs in `activations.py`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from memplan.errors import ConfigError, UnsupportedModel
from memplan.predict import adapters
from memplan.predict.activations import (
    head_saved,
    layer_saved,
    layers_saved,
    merged_experts,
    sdpa_masked,
    stream_width,
)
from memplan.predict.band import band_for
from memplan.predict.breakdown import Breakdown, Term
from memplan.predict.cuda import cuda_overheads, with_cuda_terms
from memplan.predict.kernels import fused_ce as fused_ce_bytes
from memplan.predict.kernels import liger_applies, offloaded_checkpoint_bytes, offloads_checkpoints
from memplan.predict.layout import Layout
from memplan.predict.sharding import RankStates, rank_states
from memplan.predict.vision import vision_cost
from memplan.predict.weights import ModelStates, model_states, optimizer_bytes
from memplan.spec.dtypes import deepspeed_half
from memplan.spec.model import ModelSpec
from memplan.spec.optimizers import Projection, States, facts
from memplan.spec.prequantized import train_for
from memplan.spec.stacks import Stack, quantize_temporaries, stack_facts
from memplan.spec.train import Attention, Method, Precision, QuantMethod, Sharding, Stage, TrainConfig

FP32 = 4


def estimate(spec: ModelSpec, train: TrainConfig, *, device: str = "cuda", fused_ce: bool = True,
             value_head: bool = False) -> Breakdown:
    """Peak memory of `train` on `spec`, per GPU (per rank under data parallelism: train.gpus, train.sharding,
    train.offload; see sharding.py), with its terms and the phase where the peak happens.

    device="cpu" predicts the same step on PyTorch's CPU kernels, for checking against CPU measurements.
    fused_ce=False: Liger without its fused linear cross-entropy (LLaMA-Factory's stages that need the logits).
    value_head=True: the reward stage's loss (`_rm`): the LM loss made in forward and dropped, a value head's."""
    if not spec.analytic:
        raise UnsupportedModel(f"{spec.name}: model_type {spec.model_type!r} is not in the analytic formulas; "
                               "use the exact mode (memplan estimate --exact, needs pip install 'memplan[trace]')")
    train = train_for(spec, train)  # adapters over a pre-quantized checkpoint: QLoRA over its own storage
    if train.stage in (Stage.DPO, Stage.KTO):
        return _dpo(spec, train, device)
    if train.stage is Stage.RM:
        return _rm(spec, train, device)
    lay = Layout.of(spec, train, device)
    if train.sharding.is_deepspeed and train.precision in (Precision.BF16, Precision.FP16):
        # DeepSpeed's own mixed precision: the module itself is half (no autocast, no fp32 weights on it); the
        # fp32 copies live in the optimizer's partition (sharding.py)
        lay = Layout.of(spec, train.with_(precision=Precision.PURE_BF16), device, deepspeed_half(train.precision))
    _check_targets(lay)
    rs = rank_states(lay, model_states(lay))
    st = rs.states
    head_states_left = False
    if value_head and lay.full and not spec.tie_word_embeddings:
        st, head_states_left = _without_head_states(lay, rs)
    comm = rs.gathered_bytes + rs.bucket_bytes
    b, s = train.batch_size, train.seq_len
    n, v = b * s, spec.vocab_size
    c = lay.compute_width
    acts, recomputed, recomputed_end, top_released = _activations(lay)
    acts += _embedding_dropout_bytes(lay)
    head = head_saved(lay, batch=b, seq=s)
    # cross-entropy backward: log-probs (saved) + their gradient + the logits' gradient, all fp32 (B, S, V)
    ce_bwd = head.logprobs_bytes + 2 * n * v * FP32
    if spec.family.shifted_loss:  # Qwen-1 (Family.shifted_loss): log_softmax's backward, its saved output, the
        # incoming gradient and its result all in the log-probs' dtype (the logits' without autocast)
        ce_bwd = 3 * head.logprobs_bytes
    ce_fwd = head.logits_bytes + head.upcast_bytes + head.logprobs_bytes + head.softcap_bytes
    grad_logits = n * v * lay.logits_width  # the logits' gradient, back in the logits' dtype
    per_param = facts(train.optimizer).per_param  # each gradient freed by its step in backward (weights.py)
    # LM head backward: the logits' gradient, the weight's gradient (and its fp32 copy under AMP; a per-parameter
    # step: inside MmBackward only the compute-dtype gradient, its fp32 cast after grad_logits is freed being the
    # per-parameter moment below: LOMO fp32 / AMP / pure bf16 within 0.2 %)
    head_bwd = head.norm_bytes + lay.head_cast_bytes + grad_logits + n * spec.hidden_size * c + (
        spec.vocab_size * spec.hidden_size * c if per_param and lay.full else _lm_head_grad_peak(lay))
    if lay.head_trains and not lay.full and lay.amp and lay.trainable_width != c:
        # an extra trained head (extra_modules) under AMP: MmBackward makes the half weight gradient, then frees
        # the logits' gradient before ToCopyBackward casts it to the fp32 weight's dtype (measured on the exact
        # trace: the two are never alive together)
        vh = spec.vocab_size * spec.hidden_size
        head_bwd = head.norm_bytes + lay.head_cast_bytes + n * spec.hidden_size * c + vh * c + \
            max(grad_logits, vh * lay.trainable_width)
    head_dq = dequantized_bytes(lay, v * spec.hidden_size) if lay.quantized_head else 0
    if head_dq:  # a 4-bit LM head (LitGPT): its weight dequantized for the hidden states' gradient, and in its
        # forward before the logits exist (bitsandbytes 0.42 MatMul4Bit.forward: `F.dequantize_4bit(B,
        # quant_state).to(A.dtype)`): the fp16 copy freed once cast, the cast alive beside the new logits
        head_bwd += head_dq
        ce_fwd = max(ce_fwd, head_dq, v * spec.hidden_size * c + head.logits_bytes)
    if fused_ce and liger_applies(spec.model_type, train.liger_kernel):
        # Liger's fused linear cross-entropy (predict/kernels.py): no logits; both head gradients made in forward
        f = fused_ce_bytes(tokens=n, vocab=v, hidden=spec.hidden_size, input_width=stream_width(lay),
                           compute_width=c, head_width=lay.trainable_width, head_trains=lay.head_trains)
        ce_fwd, ce_bwd = f.forward_peak_bytes, f.grad_input_bytes + f.grad_weight_bytes
        head = dataclasses.replace(head, logits_bytes=0, upcast_bytes=0, logprobs_bytes=0, softcap_bytes=0)
        head_bwd = head.norm_bytes + ce_bwd
    head_kept = head.norm_bytes + lay.head_cast_bytes + head.softcap_bytes  # through the head's backward
    head_grads = 0 if per_param else _head_grad_bytes(lay)
    if value_head:
        vh = _value_head(lay, n)
        ce_fwd += vh.saved + _hidden_states_kept(lay, b, s)
        # the logits' graph is dropped after forward: no log-probs, logits gradient or LM-head backward; the final
        # norm's output (the LM head's saved input) is freed, the value head's backward runs on its saved tensors
        head_kept = head.norm_bytes - (n * spec.hidden_size * c if lay.full else 0) + vh.saved
        ce_bwd, head_bwd = vh.backward, 0
        head_grads = (spec.hidden_size * lay.trainable_width if lay.full else 0) + vh.param_bytes
    layer_grad = _layer_backward_buffers(lay, n) + rs.layer_backward_bytes
    if train.checkpointing:
        # a recomputed layer's two high points: its backward at the MLP's product (what is still saved + the
        # three (B, S, I) gradients), or the end of its recompute: torch.utils.checkpoint's non-reentrant early
        # stop raises only at the next op that saves a tensor, so the layer's forward runs to its last projection,
        # whose output (and LoRA branch: B's output and its scaled copy, peft lora/layer.py Linear.forward
        # `result + lora_B(lora_A(dropout(x))) * scaling`, with `x = self._cast_input_dtype(x, ...)`: the input's
        # copy in the adapter dtype lives until that forward returns) coexists with everything it recomputed
        tail = n * spec.hidden_size * c
        if spec.residual_dropout:  # the MLP's dropout, which saves a tensor, runs too: its output joins the tail
            tail += n * spec.hidden_size * c
        if spec.mlp_linears()[-1].name in lay.lora_modules and not spec.is_moe:
            inter = spec.intermediate_size
            tail += 2 * n * spec.hidden_size * c + (n * inter * lay.lora_width if lay.lora_width != c else 0)
        layer_grad = max(layer_grad + recomputed, recomputed_end + tail + rs.layer_backward_bytes,
                         recomputed_end + adapters.forward_transient_bytes(lay) + rs.layer_backward_bytes)
    # input_ids (B, S) int64, alive through the step (labels=ids: the same tensor)
    base = st.weights_bytes + st.optimizer_states_bytes + comm + 8 * n
    vis = vision_cost(lay)  # a VL step's images (predict/vision.py): its inputs, the tower's saved and kept tensors
    base += vis.inputs_bytes
    acts += vis.saved_bytes
    if value_head:
        base += _value_head(lay, n).resident_bytes
    # eager attention: transformers materialises each mask as (B, 1, S, S) in the embedding dtype; alive for the
    # whole forward, and through backward when checkpointed layers keep it as an input
    masks = spec.mask_types * b * s * s * stream_width(lay) if lay.attn is Attention.EAGER else \
        spec.mask_types * b * s * s if sdpa_masked(lay) else 0  # sdpa: the bool sliding-window mask
    # autocast's weight copies live until forward ends; in backward only those saved by a graph remain: all of
    # them without checkpointing, the LM head's (+ the recomputed layer's, in layer_grad) with it
    ac_backward = st.autocast_cache_bytes - _unsaved_casts(lay)
    if train.checkpointing:
        cast_layers = lay.trainable_layers if train.method is Method.FREEZE else len(lay.adapted_ids) \
            if train.is_lora else spec.num_layers
        ac_backward -= cast_layers * st.autocast_layer_bytes
        layer_grad += st.autocast_layer_bytes
    head_grads = 0 if per_param else head_grads
    states_base = base  # what the optimizer step sees besides the gradients
    # with accumulation, micro-steps after the first run forward and backward with every gradient already alive
    if train.grad_accum > 1:
        base += st.gradients_bytes
        head_grads = 0
    rope = _rope_bytes(lay)
    # what ctx attributes hold (bitsandbytes < 0.43.2 MatMul4Bit's inputs): not freed as backward passes each
    # layer, only with the graph; where the stack's loop keeps the last output, the graph outlives the step
    # Checkpointed layers: reentrant ones run forward under no_grad (MatMul4Bit holds nothing, its recompute only
    # within that layer's backward); non-reentrant ones hold every input past the checkpoint's saved-tensor hooks,
    # and more (CPU, 3-layer llama: 1,261,572 B freed with the graph vs the tape's 1,064,960): not modelled yet
    held = 0 if train.checkpointing else held_bytes(lay)
    facts_ = stack_facts(train.stack)
    holds = facts_.holds_previous_output
    returned = n * v * FP32 if facts_.output_fp32 else head.logits_bytes  # the logits the loop holds
    previous = returned + held if holds else 0  # the last micro-step's logits and what its graph holds
    kept = base + ac_backward + acts + (masks if train.checkpointing else 0)
    head_cast = lay.head_cast_bytes  # a frozen fp32 head's half copy, saved until the head's backward
    moments = {
        "forward": base + st.autocast_cache_bytes + acts + masks + rope.forward + head.norm_bytes + head_cast
        + ce_fwd - rs.forward_release_bytes + vis.kept_bytes,
        # DoRA: the top layer's weight materialised in its forward, beside everything saved below it
        "forward adapter": base + st.autocast_cache_bytes + acts + masks + rope.forward
        + adapters.forward_transient_bytes(lay),
        "backward": kept + rope.backward + rs.backward_bucket_bytes + max(
            head_kept + ce_bwd,
            head_bwd,
            # a decoder layer's backward (recomputed first under checkpointing): the head's backward is done, so
            # its saved tensors (final norm, lm_head input, softcap) are freed; its gradients stay
            head_grads + layer_grad - top_released + n * spec.hidden_size * c + head.held_bytes),
        # the lowest trained layer's backward, the same transient with the most gradients already made
        "backward bottom": base + rope.backward + rs.backward_bucket_bytes + (masks if train.checkpointing else 0)
        + _bottom_layer_kept(lay, st) + vis.saved_bytes
        + (0 if train.grad_accum > 1 or per_param else _grads_above_bottom(lay, st))
        + layer_grad + n * spec.hidden_size * c + held - _bottom_held(lay),
        # the gradients once (with accumulation `base` already holds them)
        "optimizer": states_base + st.gradients_bytes + st.optimizer_step_bytes + rs.step_extra_bytes
        - (0 if rs.gathered_in_step else rs.gathered_bytes) + previous,
        # end of backward with tied embeddings trained: the embedding's dense (V, H) gradient and its sum with
        # the lm_head gradient already in .grad (AccumulateGrad adds out of place here)
        "backward end": base + rs.backward_bucket_bytes + (0 if train.grad_accum > 1 else st.gradients_bytes)
        + _tied_embedding_extra(lay) + (previous if holds else held),
    }
    if vis.tokens:  # the tower's forward, before any decoder layer ran
        moments["forward vision"] = base + vis.peak_bytes - rs.forward_release_bytes
    if holds:
        # the next forward, up to its logits (their assignment frees the previous ones), beside the previous graph
        # (a 4-bit head: its dequantized weight beside them; fp32 outputs: the cast copy beside the half logits)
        head_fwd = max(head_dq, v * spec.hidden_size * c + head.logits_bytes) if head_dq else head.logits_bytes
        head_fwd = max(head_fwd, head.logits_bytes + returned) if facts_.output_fp32 else head_fwd
        moments["forward previous"] = base + st.autocast_cache_bytes + acts + masks + rope.forward + \
            head.norm_bytes + head_cast + head_fwd + previous - rs.forward_release_bytes
    if per_param and lay.full and not spec.tie_word_embeddings:
        # the largest tensor's step (the LM head's) runs in its backward, right after its gradient is accumulated:
        # on the kept activations, the head's saved tensors and the hidden-state gradient
        moments["optimizer"] = kept + rope.backward + head.norm_bytes + head_cast + n * spec.hidden_size * c + \
            st.gradients_bytes + st.optimizer_step_bytes
        if lay.amp and facts(train.optimizer).projection is not Projection.NONE:
            # a post-accumulate-grad hook runs after the head's MmBackward released what it saved, the autocast
            # half copy of the weight among them (LOMO's tensor hook runs a parameter later: kept there)
            moments["optimizer"] -= spec.vocab_size * spec.hidden_size * c
    run = _run_phases(lay, st, st.weights_bytes + st.optimizer_states_bytes + comm, ac=st.autocast_cache_bytes)
    if holds and "eval" in run:  # evaluation runs after the optimizer step, the previous output still bound
        run["eval"] += previous
    phases = (("load", run["load"]), ("step", max(moments.values()))) + \
        ((("eval", run["eval"]),) if "eval" in run else ()) + (("save", run["save"]),)
    moments.update(run)
    moment = max(moments, key=moments.__getitem__)
    peak = moments[moment]
    phase = moment.split()[0]  # "backward end" is a backward moment
    ac = st.autocast_cache_bytes if phase in ("forward", "eval") else 0 if phase in ("load", "save") else ac_backward
    terms = _terms(lay, st, acts, ac, phase, peak, rs, previous=moment == "forward previous")
    reserved, context = cuda_overheads(peak, lay, st)
    # measured against bitsandbytes 0.50 on the CPU allocator: 4-bit within 1 %, LLM.int8 -8 ... +10 % (its
    # backward's dequantized weight and fp16 copies are not modelled term by term yet)
    note = "; ".join(n for n in (_quant_note(train), vis.note or spec.family.limits, spec.quantization) if n)
    if head_states_left:
        note += ("; " if note else "") + ("the untied LM head gets no gradient in the reward stage, yet its gradient "
                                          "and optimizer states are counted (an over-estimate)")
    bd = Breakdown(terms=terms, peak_allocated_bytes=peak, peak_reserved_bytes=reserved,
                   cuda_context_bytes=context, phase=phase, trainable_params=st.trainable_params,
                   host_bytes=rs.host_bytes + offloaded_checkpoint_bytes(lay) * train.gpus_per_node,
                   note=note, band=band_for(train), phases=phases, moments=tuple(moments.items()))
    return with_cuda_terms(bd) if device == "cuda" else bd


def _quant_note(train: TrainConfig) -> str:
    """What the estimate of a quantized base has not measured (bitsandbytes 4-bit is within 1 % of the CPU step)."""
    if train.method is not Method.QLORA:
        return ""
    if train.quant_method is QuantMethod.HQQ:
        return ("HQQ: storage from hqq's packing, each linear's dequantized weight saved for backward "
                "(forward_pytorch); hqq does not run in the CPU ground truth, so not measured")
    if train.quant_method.prequantized:
        return (f"{train.quant_method.value.upper()}: the checkpoint's packed storage and its kernel's saved tensors "
                "and backward transients, read from the library's source; not measured (the kernels are CUDA-only)")
    if train.quant_method is QuantMethod.EETQ:
        return ("EETQ: int8 + fp16 scales, input saved as LLM.int8's; its backward's dequantized weight is a "
                "transient not modelled, and EETQ has no CPU kernel to measure")
    if train.quant_bits == 8:
        return "8-bit QLoRA: LLM.int8's backward is modelled only roughly (measured -8 ... +10 % on CPU)"
    return ""


def _dpo(spec: ModelSpec, train: TrainConfig, device: str) -> Breakdown:
    """LLaMA-Factory's DPO step (memplan.build.step.dpo_loss; dpo/trainer.py L219-300): the policy runs the
    reference step on chosen + rejected together (PairwiseDataCollatorWithPadding: 2 x micro-batch rows); then the
    reference forward, under no_grad, while the policy's saved activations, its fp32 logits (kept in the trainer's
    output dict) and log-probs are alive: its own fp32 logits and log_softmax (B, S, V) on top. A full / freeze run
    also holds the reference model, a frozen copy in the compute dtype (trainer_utils.py create_ref_model).

    KTO (memplan.build.step.kto_loss; kto/trainer.py L110-270) runs the same head on the micro-batch's target
    rows (KTODataCollatorWithPadding: n target rows + n KL rows), then a no-grad forward of the KL rows on the
    policy, then the reference's forwards of both: its target logits alive through its KL forward, while the
    policy's chosen / rejected logits (boolean-index copies of its fp32 logits) and log-probs are kept."""
    kto = train.stage is Stage.KTO
    pairs = train.with_(stage=Stage.SFT, batch_size=train.batch_size if kto else 2 * train.batch_size)
    # LLaMA-Factory turns Liger's fused cross-entropy off for a stage that needs the logits (require_logits:
    # model/model_utils/liger_kernel.py L106-108, loader.py: stage not in pt / sft)
    policy = estimate(spec, pairs, device=device, fused_ce=False)
    lay = Layout.of(spec, pairs, device)
    nv = pairs.batch_size * train.seq_len * spec.vocab_size
    ref_weights = 0
    if train.separate_reference and train.method is Method.QLORA:
        # QOFT: the reference loads with the same quantization_bit (ModelArguments.copyfrom): the policy's weights
        # without its trainable adapters
        ref_weights = policy.term("weights") - policy.trainable_params * lay.lora_width
    elif train.separate_reference:  # full / freeze / OFT: a frozen copy in the compute dtype
        ref_weights = spec.num_parameters * lay.compute_width + spec.head_dim // 2 * 4  # + rotary inv_freq
    moments = {k: v + ref_weights for k, v in policy.moments}
    # the loss head differs from cross-entropy's (logits c + fp32 upcast + log-probs): `.logits.to(torch.float32)`
    # frees the half logits; `logits[:, :-1, :].log_softmax(-1)` runs on a non-contiguous slice, which the softmax
    # kernels copy first (aten/src/ATen/native/SoftMax.cpp host_softmax and the CUDA log_softmax both take
    # `input.contiguous()`): fp32 logits + that copy + the log-probs at the policy's peak. One row (KTO at
    # micro-batch 1): the slice of a (1, S, V) tensor is contiguous, no copy
    heads = (3 if pairs.batch_size > 1 else 2) * nv * FP32
    sft_head = nv * (2 * FP32 if lay.head_output_fp32 else
                     lay.logits_width + (FP32 if lay.logits_width != FP32 else 0) + FP32)
    moments["forward"] += heads - sft_head
    hidden = nv // spec.vocab_size * spec.hidden_size * stream_width(lay)
    if kto:
        # the KL rows' no-grad forward on the policy: its last hidden states, fp32 logits, their contiguous copy,
        # log-probs, beside the policy's fp32 logits and log-probs (the copy of the forward is gone)
        moments["kl forward"] = moments["forward"] - (heads - 2 * nv * FP32) + hidden + heads
        # the reference's KL forward: the policy's chosen / rejected copies (nv fp32 in all) and log-probs, the
        # reference's target logits, and the KL forward's own
        moments["reference forward"] = moments["forward"] - (heads - 2 * nv * FP32) + nv * FP32 + hidden + heads
    elif train.dpo_reference:
        # then the reference's forward under no_grad, while the policy's fp32 logits (kept in the trainer's output
        # dict) and log-probs are alive: its last hidden states, fp32 logits, their contiguous copy, log-probs
        moments["reference forward"] = moments["forward"] - nv * FP32 + hidden + heads
    phase = max(moments, key=moments.__getitem__)
    peak = moments[phase]
    terms = list(policy.terms)
    if ref_weights:
        terms.insert(1, Term(name="reference_model", bytes=ref_weights,
                             explain=f"frozen reference: {spec.num_parameters:,} params x {lay.compute_width} B"))
    rest = peak - sum(t.bytes for t in terms if t.name != "transient")
    terms = [t if t.name != "transient" else Term(
        name="transient", bytes=rest, explain="the reference's no-grad forward: its fp32 logits and log-probs "
                                              "beside the policy's" if phase == "reference forward" else t.explain)
        for t in terms]
    what = "reference" if phase == "reference forward" else phase.split()[0]
    if kto:
        what = "reference" if phase in ("reference forward", "kl forward") else what
        note = "KTO: the target rows, a no-grad KL batch, the reference's forwards of both"
    else:
        note = "DPO: chosen + rejected pairs" + (", a no-grad reference forward" if train.dpo_reference else "")
    if vision_cost(lay).tokens:  # the exact mode feeds no image to a preference step either
        note += "; images: the policy's tower forward only (the reference's and the KL batch's not costed)"
    return dataclasses.replace(policy, terms=tuple(terms), peak_allocated_bytes=peak,
                               peak_reserved_bytes=policy.peak_reserved_bytes + (peak - policy.peak_allocated_bytes),
                               phase="forward" if what == "reference" else what,
                               note=(policy.note + "; " if policy.note else "") + note,
                               moments=tuple(moments.items()),
                               phases=tuple((n, b + ref_weights) if n != "step" else (n, max(moments.values()))
                                            for n, b in policy.phases))


@dataclass(frozen=True, slots=True)
class _ValueHead:
    saved: int  # what its forward saves: the dropout mask and the summary's input
    backward: int  # its backward's buffers beside those
    param_bytes: int  # the summary's gradient
    resident_bytes: int  # the summary's weight and its optimizer states (AdamW's two fp32 states)


def _value_head(lay: Layout, n: int) -> _ValueHead:
    """trl 0.24's ValueHead on the final norm's output (memplan.build.model.value_head): dropout(0.1) saves its
    bool mask; the input is cast to the fp32 summary's dtype (modeling_value_head.py L55-56); under autocast the
    Linear casts it back to the compute dtype and saves that copy, else it saves the fp32 input. Its backward:
    the input's gradient in the compute dtype, its fp32 cast, the dropout's gradient in the norm's dtype."""
    h = lay.spec.hidden_size
    norm_out = max(lay.stream_width, lay.trainable_width if lay.full else lay.kept_width)
    saved = n * h * (1 + (lay.compute_width if lay.amp else FP32))
    backward = n * h * ((lay.compute_width + FP32 if lay.amp else FP32) + norm_out)
    return _ValueHead(saved=saved, backward=backward, param_bytes=(h + 1) * FP32, resident_bytes=3 * (h + 1) * FP32)


def _without_head_states(lay: Layout, rs: RankStates) -> tuple[ModelStates, bool]:
    """A full reward run's untied LM head gets no gradient (the loss reads the values only), so it has no .grad and
    torch's optimizers skip it, never making its states (torch/optim/adamw.py _init_group: `if p.grad is None:
    continue`). Removed for the optimizers whose states are per element; (states, True) where they stay counted
    (sharded ranks, per-tensor rules: an over-estimate)."""
    st, tr = rs.states, lay.train
    opt = facts(tr.optimizer)
    linear = opt.states in (States.ADAM, States.ADAM_FP32, States.MOMENTUM, States.NONE)
    if not linear or opt.per_param or opt.projection is not Projection.NONE or tr.gpus > 1:
        return st, True
    vh = lay.spec.vocab_size * lay.spec.hidden_size
    states, step = optimizer_bytes(lay, vh, lay.trainable_width)
    return dataclasses.replace(st, gradients_bytes=st.gradients_bytes - vh * lay.trainable_width,
                               optimizer_states_bytes=st.optimizer_states_bytes - states,
                               optimizer_step_bytes=st.optimizer_step_bytes - step), False


def _hidden_states_kept(lay: Layout, b: int, s: int) -> int:
    """`output_hidden_states=True` (trl's forward sets it, modeling_value_head.py L156) keeps the tuple of the L+1
    hidden states until the output is dropped: the first layer's input, each layer's output, the last replaced by
    the final norm's output (transformers utils/output_capturing.py L370-379). What the graph saves anyway costs
    nothing more: a checkpointed layer's input, an input its first op saves (an fp32 stream's norm: `pow` on the
    tensor itself), the norm's output an LM head that trains saves as its input outside autocast."""
    tr, spec = lay.train, lay.spec
    h = b * s * spec.hidden_size
    norm_out = max(lay.stream_width, lay.trainable_width if lay.full else lay.kept_width)
    kept = 0 if lay.full and not lay.amp else h * norm_out
    trains = lay.trainable_layers > 0
    frozen = spec.num_layers - lay.trainable_layers if tr.method is Method.FREEZE else 0
    own = layer_saved(lay, batch=b, seq=s, trains=trains, x_rg=True) - \
        layer_saved(lay, batch=b, seq=s, trains=trains, x_rg=True, input_kept=True)  # the input, if it saves it
    per_trained = 0 if tr.checkpointing else h * lay.stream_width - own
    return kept + frozen * h * lay.stream_width + (spec.num_layers - frozen) * per_trained


def _rm(spec: ModelSpec, train: TrainConfig, device: str) -> Breakdown:
    """LLaMA-Factory's reward step (memplan.build.step.rm_loss; rm/trainer.py compute_loss L88-110): chosen +
    rejected rows in one batch (PairwiseDataCollatorWithPadding: 2 x micro-batch), the SFT forward with its own LM
    loss (the labels go in), whose graph is dropped once the value head has read the last hidden states; the
    backward starts at the value head, never at the vocabulary. trl upcasts the returned logits (`lm_logits.float()`,
    modeling_value_head.py L177-178) while the LM loss's log-probs are alive: the same bytes as the upcast in
    cross-entropy, so the forward's head moment is the SFT one. A full run's untied LM head gets no gradient, so
    torch's optimizers never make its states (`_without_head_states`)."""
    pairs = train.with_(stage=Stage.SFT, batch_size=2 * train.batch_size)
    bd = estimate(spec, pairs, device=device, fused_ce=False, value_head=True)
    note = "reward model: chosen + rejected pairs through a value head"
    return dataclasses.replace(bd, note=(bd.note + "; " if bd.note else "") + note)


def _run_phases(lay: Layout, st: ModelStates, base: int, ac: int) -> dict[str, int]:
    """The run's other moments (issue 17, whole-run peak): model load, checkpoint saves (_save_copies), and
    evaluation during training.

    load: the weights, plus the largest converted tensor's half copy in flight (transformers 5
      from_pretrained fills meta parameters tensor by tensor; bitsandbytes quantizes each half weight on its way in;
      LLaMA-Factory's cast_trainable_params_to_fp32 and peft's k-bit upcast replace one parameter at a time:
      `param.data = param.data.to(torch.float32)`), before any optimizer state exists.
    eval: HF Trainer's prediction_step after an optimizer step (states alive, gradients freed by zero_grad): a
      no-grad forward of `eval_batch_size` sequences under the same autocast (whose weight cache still fills: it
      caches leaf tensors that require grad, whatever the grad mode), nothing saved for backward, the peak at the
      loss: the (B, S, V) logits, their fp32 upcast and log-probs (transformers loss_utils ForCausalLMLoss).
    """
    s, tr = lay.spec, lay.train
    linear = max(lin.in_features * lin.out_features for lin in s.layer_linears())
    vocab = s.vocab_size * s.hidden_size
    # which tensors are converted on the device after loading, one at a time (the old half copy is the transient)
    if tr.method is Method.QLORA:  # quantized on the way in; the stack may upcast the embedding and head too
        quantized = max((lin.in_features * lin.out_features for lin in s.layer_linears()
                         if lay.quantized(lin.name)), default=0)
        quantized = max(quantized, vocab if lay.quantized_head else 0)
        # the stack's quantizer: bytes per element alive at once for the largest 4-bit tensor (spec.stacks)
        transient = sum(quantize_temporaries(tr.stack, quantized))
        load = st.weights_bytes + max(transient, 2 * (vocab if lay.kept_width != lay.base_width else 0))
    else:
        if lay.trainable_width == 4 and lay.amp and tr.method in (Method.FULL, Method.FREEZE):
            converted = max(linear, vocab) if tr.method is Method.FULL else linear  # fp32 master copies
        else:
            converted = 0  # loaded straight into its dtype (LoRA adapters are created, not converted)
        load = st.weights_bytes + max(2 * converted, adapters.pissa_load_bytes(lay))  # PiSSA's SVD at init
    out = {"load": load, "save": base + _save_copies(lay)}
    if tr.eval_batch_size:
        head = head_saved(lay, batch=tr.eval_batch_size, seq=tr.seq_len)
        hidden = tr.eval_batch_size * tr.seq_len * s.hidden_size * stream_width(lay)  # the last hidden states
        out["eval"] = base + ac + hidden + head.logits_bytes + head.upcast_bytes + head.logprobs_bytes + \
            head.softcap_bytes
    return out


def _save_copies(lay: Layout) -> int:
    """Device bytes a checkpoint save adds to the model states (the `save` phase; issue 17, whole-run peak).

    HF Trainer._save_checkpoint (transformers 5.24 trainer.py l.3363) runs after an optimizer step and zero_grad:
    save_model, then the optimizer's and scheduler's state dicts and the RNG states, which torch.save writes storage
    by storage through host copies; safetensors' save_file moves each tensor to the host too. What stays on the
    device is what save_pretrained makes there before that: it reverts transformers' weight conversions of the
    whole state dict at once (modeling_utils.py l.3541), and for a MoE whose fused gate_up_proj came from per-expert
    gate/up weights that is a contiguous copy of every gate_up_proj (Family.save_copies_gate_up). A peft model
    saves its adapters only (no conversion). Under FSDP the full state dict is gathered unit by unit to the host
    (trainer.py l.4105-4108, accelerate get_state_dict offload_to_cpu) and under DeepSpeed cloned or consolidated
    to the host (l.4109-4121): the conversion runs on host copies there, the device holds at most one gathered
    unit, which the step's gathered parameters already count. Measured on CPU with a real Trainer (tests/
    test_phases.py): the model states plus the RNG state, plus these copies for a MoE."""
    s, tr = lay.spec, lay.train
    if not s.family.save_copies_gate_up or tr.method not in (Method.FULL, Method.FREEZE) or \
            tr.sharding is not Sharding.NONE:
        return 0
    gate_up = s.num_experts * 2 * s.moe_intermediate_size * s.hidden_size  # one MoE layer's fused parameter
    moe_layers = range(s.dense_prefix, s.num_layers)
    trained = set(lay.trained_ids) if tr.method is Method.FREEZE else set(moe_layers)
    # each copy in its parameter's dtype: trained ones at the trainable width, frozen ones at the base width
    return sum(gate_up * (lay.trainable_width if i in trained else lay.base_width) for i in moe_layers)


@dataclass(frozen=True, slots=True)
class _Rope:
    forward: int  # live through the forward
    backward: int  # still live in backward


def _rope_bytes(lay: Layout) -> _Rope:
    """The rotary cos/sin and position ids, made once per forward and passed to every layer (transformers 5
    LlamaModel.forward: `position_ids = torch.arange(S).unsqueeze(0)` int64; LlamaRotaryEmbedding.forward returns
    `cos.to(x.dtype), sin.to(x.dtype)`, each (1, S, rotary_dim) in the stream dtype, whatever the batch). In
    backward, cos/sin stay saved by the layers' `q * cos` (any layer whose q or k requires grad); a checkpointed
    layer's recompute keeps all its inputs, position ids included (torch/utils/checkpoint.py: the non-reentrant
    frame's recompute_fn closes over args and kwargs; the reentrant one save_for_backward()s the tensor inputs)."""
    s, tr = lay.spec, lay.train
    cos_sin = 2 * tr.seq_len * s.rotary_dim * stream_width(lay)
    if s.family.rope_half:  # gpt-oss: cos/sin (1, S, rotary_dim / 2) (Family.rope_half)
        cos_sin //= 2
    if s.family.rope_complex:  # DeepSeek-V2: one complex64 freqs_cis (1, S, rope / 2) in place of cos and sin
        cos_sin = tr.seq_len * (s.rotary_dim // 2) * 8
    if s.family.rope_fp32_cache:  # Qwen-1: fp32 cos and sin cached for max(2 S, 16) positions, alive for good
        cos_sin = 2 * max(2 * tr.seq_len, 16) * s.rotary_dim * FP32
        return _Rope(cos_sin + 8 * tr.seq_len, cos_sin)  # position ids: not passed to the blocks
    ids = 8 * tr.seq_len
    # M-RoPE: cos/sin (B, S, D), one per sample (Qwen2_5_VLRotaryEmbedding.forward l.530-540, Qwen2VLRotaryEmbedding
    # l.126-136; Qwen3VLTextRotaryEmbedding l.396-419 interleaves the sections in place, then one cat, one cast)
    if s.family.mrope:
        cos_sin *= tr.batch_size
    if tr.checkpointing:
        return _Rope(cos_sin + ids, cos_sin + ids)
    qk = {"q_proj", "k_proj", "qkv_proj"}
    saved = lay.full or tr.method is Method.FREEZE or s.num_layers > 1 or bool(qk & lay.lora_modules)
    return _Rope(cos_sin + ids, cos_sin if saved else 0)


def _activations(lay: Layout) -> tuple[int, int, int, int]:
    """(bytes kept for backward by all decoder layers, bytes one recomputed layer still holds when its backward
    reaches the MLP's product, bytes it holds at the end of its recompute, bytes the top layer has released by
    the MLP's product without checkpointing)."""
    tr, L = lay.train, lay.spec.num_layers
    b, s = tr.batch_size, tr.seq_len
    trains = lay.trainable_layers > 0
    full_layer = layer_saved(lay, batch=b, seq=s, trains=trains, x_rg=True)
    if lay.sparse_layers:
        return _freeze_activations(lay)
    # layers of different kinds (Qwen3.5): the recomputed / top-of-backward layer is the one that holds the most
    mixed = bool(lay.spec.layer_types)
    if tr.checkpointing:
        # a checkpointed layer keeps its input hidden states (the rest is recomputed in backward). Only while
        # its graph lives: torch/utils/checkpoint.py's non-reentrant frame is held by the saved-tensor hooks of
        # what the layer saves, and the reentrant CheckpointFunction's ctx by its output's grad_fn
        kept = b * s * lay.spec.hidden_size * stream_width(lay)
        recomputed = layer_saved(lay, batch=b, seq=s, trains=trains, x_rg=True, input_kept=True, at_mlp=True,
                                 worst=mixed)
        end = layer_saved(lay, batch=b, seq=s, trains=trains, x_rg=True, input_kept=True, worst=mixed)
        if offloads_checkpoints(lay):
            # LLaMA-Factory's UnslothGradientCheckpointing: each input saved as a host copy, so the device keeps
            # none (a layer's input is freed once the next runs) but the bottom one where it is a leaf (frozen
            # embedding: its AccumulateGrad node holds it); in backward, one input back on the device per recompute
            return (0 if lay.embedding_trains else kept), recomputed + kept, end + kept, 0
        return L * kept, recomputed, end, 0
    top = L - 1 if mixed else None
    released = layer_saved(lay, batch=b, seq=s, trains=trains, x_rg=True, layer=top) - \
        layer_saved(lay, batch=b, seq=s, trains=trains, x_rg=True, at_mlp=True, layer=top)
    if lay.full:
        return (layers_saved(lay, range(L), batch=b, seq=s, trains=trains, x_rg=True) if mixed else
                L * full_layer), full_layer, full_layer, released
    # LoRA: the first layer's input does not require grad (frozen embedding; a trained copy's output does)
    first = layer_saved(lay, batch=b, seq=s, trains=False, x_rg=lay.embedding_trains, layer=0 if mixed else None)
    rest = layers_saved(lay, range(1, L), batch=b, seq=s, trains=trains, x_rg=True) if mixed else \
        (L - 1) * full_layer
    return first + rest, full_layer, full_layer, released


def _embedding_dropout_bytes(lay: Layout) -> int:
    """The dropout after the embedding (StarCoder2's embedding_dropout) saves its mask or noise (activations.
    dropout) when the embedding's output requires grad: the embedding trains, or checkpointing turned on input
    grads (transformers' enable_input_require_grads), which keeps the frozen embedding's output alive besides."""
    s, tr = lay.spec, lay.train
    # LLaMA-Factory's checkpointing wrapper sets requires_grad on each trained layer's input instead (memplan.build.
    # model.enable_checkpointing): after the dropout
    hook = tr.checkpointing and stack_facts(tr.stack).name is not Stack.LLAMAFACTORY
    if not s.embedding_dropout or not (lay.embedding_trains or hook):
        return 0
    hidden = tr.batch_size * tr.seq_len * s.hidden_size
    noise = hidden * (1 if lay.device == "cuda" else stream_width(lay))
    # a frozen embedding's output made to require grad by the hook is a leaf, held by its AccumulateGrad node
    return noise + (0 if lay.embedding_trains else hidden * stream_width(lay))


def _freeze_activations(lay: Layout) -> tuple[int, int, int, int]:
    """Freeze tuning, or LoRA on LLaMA Pro's blocks (any trained layer set: the last N, the first N, LLaMA Pro's
    stride; a LoRA one trains its adapters, the others run the frozen base alone). Layers below the lowest
    trained one save nothing (their input needs no grad); the lowest sees an input without grad; every layer
    above it is on the backward path: a trained one saves its tape (or, checkpointed, its input), a frozen one
    saves what its input's gradient needs (trains=False, x_rg=True). LLaMA-Factory checkpoints only modules with
    trainable parameters (model_utils/checkpointing.py custom_gradient_checkpointing_func: `if any(param.
    requires_grad ...)`), so its frozen layers above save that tape even with checkpointing on; transformers'
    own checkpointing (the HF stack) wraps them too."""
    tr, L = lay.train, lay.spec.num_layers
    b, s = tr.batch_size, tr.seq_len
    ids = lay.adapted_ids if tr.is_lora else lay.trained_ids
    own = not tr.is_lora  # the trained layers' own weights train (freeze), else their adapters
    if not ids:
        return 0, 0, 0, 0
    # a trained embedding (extra_modules) puts every layer on the backward path: the frozen ones below too; so does
    # LLaMA-Factory's LoRA under checkpointing (peft's enable_input_require_grads: memplan.build.model
    # lf_input_grads), whose frozen layers below are not checkpointed (no trainable parameter)
    lf = stack_facts(tr.stack).name is Stack.LLAMAFACTORY
    lo = ids[0]
    emb = lay.embedding_trains or (lf and tr.is_lora and tr.checkpointing and tr.method is not Method.QLORA)
    below_ids = range(lo) if emb else range(0)
    above = [i for i in range(lo + 1, L) if i not in ids] + list(below_ids)  # frozen layers on the backward path
    frozen_above = len(above)
    frozen = layers_saved(lay, above, batch=b, seq=s, trains=False, x_rg=True, lora=False)
    top_id = ids[-1]  # the highest trained layer: its kind (DeepSeek: dense or MoE) sets the recomputed moment
    if tr.checkpointing:
        kept = b * s * lay.spec.hidden_size * stream_width(lay)
        recomputed = layer_saved(lay, batch=b, seq=s, trains=own, x_rg=True, input_kept=True, at_mlp=True,
                                 layer=top_id)
        end = layer_saved(lay, batch=b, seq=s, trains=own, x_rg=True, input_kept=True, layer=top_id)
        # transformers' activation_checkpointing_enable turns input grads on (enable_input_require_grads): the
        # frozen layers below the lowest trained one are then on the backward path too, each keeping its input
        below = 0 if lf else (lo - len(below_ids)) * kept
        if lf and below_ids and not lay.embedding_trains:
            # the frozen embedding's output, made to require grad by peft's hook, is a leaf its AccumulateGrad node
            # holds, unless the uncheckpointed frozen layer 0 saves it already (an fp32 stream's norm: `pow` on the
            # tensor itself; a half one saves its fp32 copy)
            kw = dict(batch=b, seq=s, trains=False, x_rg=True, lora=False, layer=0)
            if layer_saved(lay, **kw) == layer_saved(lay, input_kept=True, **kw):  # type: ignore[arg-type]
                below += kept
        return len(ids) * kept + (frozen if lf else frozen_above * kept) + below, recomputed, end, 0
    first = layer_saved(lay, batch=b, seq=s, trains=own, x_rg=emb, layer=lo)
    trained = layers_saved(lay, ids[1:], batch=b, seq=s, trains=own, x_rg=True)
    top_trains = top_id == L - 1
    top = layer_saved(lay, batch=b, seq=s, trains=top_trains and own, x_rg=True, layer=L - 1, lora=top_trains)
    released = top - layer_saved(lay, batch=b, seq=s, trains=top_trains and own, x_rg=True, at_mlp=True,
                                 layer=L - 1, lora=top_trains)
    own_top = layer_saved(lay, batch=b, seq=s, trains=own, x_rg=True, layer=top_id)
    return first + trained + frozen, own_top, own_top, released


def _unsaved_casts(lay: Layout) -> int:
    """Autocast's cached half copies no graph saves (freed with the cache as forward ends): in the lowest trained
    layer under freeze's trainable_modules, a trained Linear whose input needs no gradient saves only that input
    for its weight's gradient, not the weight (MmBackward: the weight is needed for the input's gradient alone).
    Its input needs none when nothing trains before it in that layer: q / k / v without input_layernorm, the MLP's
    input projections without self_attn and either norm (the down projection's input always does)."""
    s, tr = lay.spec, lay.train
    if tr.checkpointing or not lay.amp or lay.trainable_width != 4 or tr.method is not Method.FREEZE or \
            "all" in tr.trainable_modules or lay.embedding_trains or not lay.trained_ids:
        return 0
    attn = [lin for lin in s.attention_linears() if lin.name != "o_proj" and lin.in_features == s.hidden_size]
    n = sum(lin.params for lin in attn) if lay.part_trains("self_attn") and \
        not lay.part_trains("input_layernorm") else 0
    before_mlp = any(lay.part_trains(p) for p in ("self_attn", "input_layernorm", "post_attention_layernorm"))
    if lay.part_trains("mlp") and not before_mlp and not s.is_moe:
        n += sum(lin.params for lin in s.mlp_linears()[:-1])
    return 2 * n


def _bottom_layer_kept(lay: Layout, st: ModelStates) -> int:
    """What the lowest trained decoder layer still holds when its backward starts: every layer above has run its
    backward, freeing what it saved (autograd releases a node's saved tensors once it ran: torch/csrc/autograd/
    engine.cpp, retain_graph=False) and its autocast weight copies. Checkpointed: its kept input (its recompute's
    tensors and weight copies are in the transient). Otherwise: its saved tensors and its weight copies."""
    tr, s = lay.train, lay.spec
    b, sq = tr.batch_size, tr.seq_len
    if tr.checkpointing:
        return b * sq * s.hidden_size * stream_width(lay)
    x_rg = lay.embedding_trains  # the embedding trains; else the first trained layer's input needs no grad
    bottom = (lay.trained_ids[0] if lay.trained_ids else 0) if s.layer_types else None
    return layer_saved(lay, batch=b, seq=sq, trains=lay.trainable_layers > 0, x_rg=x_rg, at_mlp=True,
                       layer=bottom) + \
        st.autocast_layer_bytes


def held_bytes(lay: Layout) -> int:
    """Bytes the ctx attributes of the whole graph hold (Tape.held: bitsandbytes < 0.43.2 MatMul4Bit's inputs, the
    decoder layers' and a 4-bit head's), alive after backward until the graph itself is freed."""
    tr, L = lay.train, lay.spec.num_layers
    b, s = tr.batch_size, tr.seq_len
    full = layer_saved(lay, batch=b, seq=s, trains=lay.trainable_layers > 0, x_rg=True, held=True)
    layers = L * full if lay.full or tr.method is Method.FREEZE else _bottom_held(lay) + (L - 1) * full
    return layers + head_saved(lay, batch=b, seq=s).held_bytes


def _bottom_held(lay: Layout) -> int:
    """What the lowest layer's ctx attributes hold (LoRA: its input needs no grad)."""
    tr = lay.train
    trains = lay.trainable_layers > 0
    return layer_saved(lay, batch=tr.batch_size, seq=tr.seq_len, trains=trains, x_rg=lay.embedding_trains,
                       held=True)


def _grads_above_bottom(lay: Layout, st: ModelStates) -> int:
    """Gradients made before the lowest trained layer's backward: all but that layer's own and, in full
    fine-tuning with an untied embedding, the embedding's (made last)."""
    s, tr = lay.spec, lay.train
    if tr.is_lora:
        own = lay.lora_params_per_layer() * lay.lora_width
    else:
        own = (lay.trained_params_of_layer(lay.trained_ids[0] if lay.trained_ids else 0)
               if s.layer_types or "all" not in tr.trainable_modules else s.layer_params) * lay.trainable_width
    # the embedding's gradient is made last, unless it is the LM head's tied tensor (made at the head)
    embedding = s.vocab_size * s.hidden_size * lay.trainable_width if lay.embedding_trains and not lay.tied_trains \
        else 0
    return st.gradients_bytes - own - embedding


def _layer_backward_buffers(lay: Layout, n: int) -> int:
    """Gradient buffers alive inside one layer's backward: the MLP's three (B, S, I) grads; with 4-bit MLP
    linears, the up / gate projection's backward beside two of them: its weight dequantized for the input's
    gradient (bitsandbytes MatMul4Bit.backward, 0.42 and 0.50 alike: `torch.matmul(grad_output,
    F.dequantize_4bit(B, ctx.state).to(grad_output.dtype))`)."""
    s = lay.spec
    inter = s.moe_intermediate_size * s.routed_rows if s.is_moe else s.intermediate_size
    # gated: act * up's backward (the product's, the activation's and up's gradients); one projection (StarCoder2):
    # the activation's backward (its output's and input's gradients)
    grads = (3 if s.family.gated_mlp else 2) * n * inter * lay.compute_width
    if s.shared_intermediate and s.family.moe_block == "llama4":  # torch.bmm autocasts: the compute dtype
        grads = 3 * n * max(inter, s.shared_intermediate) * lay.compute_width
    elif s.shared_intermediate:
        # DeepSeek's top (MoE) layer: the routed experts' grouped matmuls run in the expert weights' dtype
        # (activations._moe: fp32 where they train under AMP), the shared experts' product under autocast
        trains = not lay.train.is_lora and (lay.full or lay.train.trainable_layer_ids(s.num_layers)[-1:] ==
                                            [s.num_layers - 1])
        experts = lay.trainable_width if trains else lay.stream_width
        grads = max(3 * n * inter * experts, 3 * n * s.shared_intermediate * lay.compute_width)
    down, _ = merged_experts(lay)
    if down:  # peft's wrapped experts: the merged down_proj's gradient beside its input's (a Mixtral trace: the
        # layer's top; gate_up_proj's comes once that one and the saved down weight are freed)
        grads = max(grads, down + n * inter * lay.compute_width)
    mlp = [lin for lin in s.mlp_linears() if lay.quantized(lin.name)] if not s.is_moe else []
    if not mlp:
        return grads
    # AQLM's backward also scales the incoming gradient by the output scales first (cuda_kernel.cpp L314:
    # `scaled_input = input * scales`): one more (B, S, I) copy
    scaled = n * inter * lay.compute_width if lay.train.quant_method is QuantMethod.AQLM else 0
    return max(grads, 2 * n * inter * lay.compute_width + scaled
               + max(dequantized_bytes(lay, lin.params) for lin in mlp))


def dequantized_bytes(lay: Layout, numel: int) -> int:
    """A 4-bit (bitsandbytes) weight of `numel` elements dequantized in a backward: in its QuantState dtype (the
    dtype it was quantized from), plus its cast to the gradient's dtype when that differs (`.to()` copies). A
    pre-quantized checkpoint's, as its kernel's backward makes it (GPTQ's is the saved forward weight: none)."""
    tr = lay.train
    if tr.method is Method.QLORA and tr.quant_method is QuantMethod.AWQ:
        # gptqmodel AwqGemmFn.backward (gemm_awq.py L101-106): awq_dequantize_weights -> fp16 (in, out),
        # `.to(grad_output.dtype)`: a second copy when the gradient is bf16
        return numel * (2 + (2 if lay.compute_width == 2 and tr.precision is not Precision.FP16 else 0))
    if tr.method is Method.QLORA and tr.quant_method is QuantMethod.AQLM:
        # aqlm code1x16_matmat_dequant_transposed (cuda_kernel.cpp L316-320): the (out, in) weight in the codebooks'
        # dtype (the model's)
        return numel * lay.base_width
    if tr.method is not Method.QLORA or tr.quant_method is not QuantMethod.BNB or tr.quant_bits != 4:
        return 0
    if stack_facts(tr.stack).quantizes_from_half:  # fp16 QuantState; the gradient is bf16 under bf16 training
        return numel * (2 + (lay.compute_width if tr.precision in (Precision.BF16, Precision.PURE_BF16) else 0))
    return numel * lay.base_width


def _head_grad_bytes(lay: Layout) -> int:
    """Gradients of the final norm and lm_head once the head's backward is done (tied or not, lm_head's grad
    is a dense (V, H) tensor)."""
    norm = lay.spec.hidden_size if lay.full else 0
    return (norm + (lay.spec.vocab_size * lay.spec.hidden_size if lay.head_trains else 0)) * lay.trainable_width


def _tied_embedding_extra(lay: Layout) -> int:
    if not lay.tied_trains:
        return 0
    return 2 * lay.spec.vocab_size * lay.spec.hidden_size * lay.trainable_width


def _lm_head_grad_peak(lay: Layout) -> int:
    """lm_head's weight gradient being made: (V, H) in the compute dtype, plus its cast to the weight's dtype
    under AMP (fp32 master weights; a half trained copy takes the gradient as it is)."""
    if not lay.head_trains:
        return 0
    vh = lay.spec.vocab_size * lay.spec.hidden_size
    return vh * lay.compute_width + (vh * lay.trainable_width if lay.amp and lay.trainable_width !=
                                     lay.compute_width else 0)


def _check_targets(lay: Layout) -> None:
    names = {lin.name for lin in lay.spec.layer_linears()}
    unknown = sorted(set(lay.lora_modules) - names)
    if unknown:
        real = dict(lay.spec.family.module_names)  # the architecture's own names (Qwen-1: c_attn, c_proj, w1, w2)
        raise ConfigError(f"--lora-targets {','.join(unknown)} not in {lay.spec.model_type} layers; "
                          f"choose from {','.join(sorted({real.get(n, n) for n in names}))} or all-linear")


def _terms(lay: Layout, st: ModelStates, acts: int, ac: int, phase: str, peak: int,
           rs: RankStates, *, previous: bool = False) -> tuple[Term, ...]:
    """Split the peak into named terms; `transient` is what the peak moment adds on top of the kept state."""
    tr = lay.train
    if st.quantized_params:
        kept = st.frozen_params - st.quantized_params
        w_explain = (f"{st.trainable_params:,} trainable x {lay.trainable_width} B + {st.quantized_params:,} "
                     f"quantized to {tr.quant_bits}-bit {tr.quant_method.value} + {kept:,} frozen x "
                     f"{lay.kept_width} B + buffers"
                     + (f" ({stack_facts(tr.stack).explain})" if lay.kept_width != lay.base_width else ""))
    else:
        w_explain = (f"{st.trainable_params:,} trainable x {lay.trainable_width} B + {st.frozen_params:,} frozen x "
                     f"{lay.base_width} B + buffers")
    opt = facts(tr.optimizer)
    states = opt.explain
    terms = [Term(name="weights", bytes=st.weights_bytes, explain=w_explain),
             Term(name="optimizer_states", bytes=st.optimizer_states_bytes, explain=states)]
    if rs.gathered_bytes or rs.bucket_bytes or rs.backward_bucket_bytes:
        gathered = rs.gathered_bytes if phase != "optimizer" or rs.gathered_in_step else 0
        terms.append(Term(name="sharding", bytes=gathered + rs.bucket_bytes
                          + (rs.backward_bucket_bytes if phase == "backward" else 0),
                          explain=f"{rs.explain}: gathered parameters {rs.gathered_bytes:,} B + communication "
                                  f"buckets {rs.bucket_bytes:,} B{rs.detail}"))
    elif lay.train.sharding is not Sharding.NONE or lay.train.gpus > 1:
        terms[0] = Term(name="weights", bytes=st.weights_bytes, explain=f"{w_explain}; {rs.explain}")
    ids = 8 * tr.batch_size * tr.seq_len  # the input batch: (B, S) int64 ids (labels=ids), alive all step
    if phase == "optimizer":
        terms += [Term(name="gradients", bytes=st.gradients_bytes, explain="trainable params x param width"),
                  Term(name="activations", bytes=ids, explain="only the input ids (B x S int64): the rest freed "
                                                              "after backward")]
        step = "foreach AdamW: _foreach_sqrt(exp_avg_sq) copy" if opt.foreach_copy else "step"
        terms.append(Term(name="transient", bytes=peak - sum(t.bytes for t in terms),
                          explain=f"optimizer.step() temporaries ({step})"))
        return tuple(terms)
    if phase == "save":
        terms += [Term(name="gradients", bytes=0, explain="freed by zero_grad(set_to_none=True)"),
                  Term(name="activations", bytes=0, explain="none: a checkpoint save runs between steps"),
                  Term(name="transient", bytes=peak - sum(t.bytes for t in terms),
                       explain="checkpoint save: save_pretrained's contiguous copy of every fused MoE gate_up_proj "
                               "as it reverts to the per-expert layout (the rest goes to the host)")]
        return tuple(terms)
    if phase in ("load", "eval"):
        if phase == "load":  # no optimizer state yet
            terms[1] = Term(name="optimizer_states", bytes=0, explain="not created before the first step")
        cast = f"autocast half copies of fp32 weights {ac:,} B" if ac else "none saved (no grad)"
        terms += [Term(name="gradients", bytes=0, explain="freed by zero_grad(set_to_none=True)" if phase == "eval"
                       else "none before the first step"),
                  Term(name="activations", bytes=ac, explain=cast)]
        what = (f"evaluation: a no-grad forward of {tr.eval_batch_size} x {tr.seq_len} tokens, its logits, fp32 "
                "upcast and log-probs at the loss") if phase == "eval" else \
            "model load: the largest tensor in flight as it is cast or quantized"
        terms.append(Term(name="transient", bytes=peak - sum(t.bytes for t in terms), explain=what))
        return tuple(terms)
    ckpt = "checkpointed layer inputs (B x S x hidden each)" if tr.checkpointing else \
        "tensors saved for backward by every decoder layer (tape program)"
    cast = f" + autocast half copies of fp32 weights {ac:,} B" if ac else ""
    terms += [Term(name="gradients", bytes=0, explain="allocated during backward; included in transient"),
              Term(name="activations", bytes=acts + ac + ids, explain=ckpt + cast + " + the input ids")]
    what = "logits, fp32 upcast and log-probs at the loss" if phase == "forward" else \
        "cross-entropy backward (three fp32 B x S x vocab) or a recomputed layer + gradient buffers"
    if previous:
        what = ("this forward's logits beside the previous micro-step's, which the loop still holds with their "
                "graph (and the 4-bit linears' inputs bitsandbytes < 0.43.2 keeps in ctx.tensors)")
    terms.append(Term(name="transient", bytes=peak - sum(t.bytes for t in terms), explain=f"{what}; LM head"))
    return tuple(terms)
