"""Saved activations: the decoder layer and the LM head written as tape programs (what transformers 5.x runs).

`layer_saved(layout, tokens, trains, x_rg)` is the bytes one decoder layer keeps for backward. Layers differ only in
whether their weights train (freeze) and whether their input already requires grad (the first LoRA layer's does
not, unless checkpointing turned on input grads), so the estimator runs at most three programs per layer kind
(DeepSeek's dense / MoE layers, Qwen3.5's Gated DeltaNet / full-attention ones: `layer_kinds`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from memplan.predict import adapters
from memplan.predict.kernels import liger_applies
from memplan.predict.layout import Layout
from memplan.predict.tape import T, Tape, param
from memplan.spec.model import Linear, ModelSpec
from memplan.spec.train import Adapter, Attention, QuantMethod

FP32 = 4


@dataclass(slots=True)
class _Ctx:
    tape: Tape
    lay: Layout
    tokens: int  # batch x seq
    batch: int
    seq: int
    trains: bool  # this layer's own weights train (full / freeze-trainable)
    stream: int  # width of the residual stream (the rotary cos/sin follow it)
    autocast: bool = True  # False where the op has no autocast rule (MoE grouped matmuls): stream dtype
    windowed: bool = True  # this layer attends within the sliding window (Gemma3: all but every 6th layer)
    moe: bool = True  # an MoE model's layer has the sparse MLP (False: DeepSeek's leading dense layers)
    linear: bool = False  # a Qwen3.5 Gated DeltaNet layer (layer_types "linear_attention")
    rope: bool = True  # this layer rotates q / k (False: Llama 4's NoPE layers)
    lora: bool = True  # this layer carries the adapters (False: a layer LLaMA Pro leaves without, Layout.adapted_ids)

    @property
    def amp(self) -> bool:
        return self.lay.amp and self.autocast

    @property
    def c(self) -> int:
        return self.lay.compute_width if self.autocast else self.stream

    @property
    def liger(self) -> bool:
        """Liger's fused RMSNorm / SwiGLU replace transformers' (predict/kernels.py)."""
        return liger_applies(self.lay.spec.model_type, self.lay.train.liger_kernel)

    def norm_width(self) -> int:
        if self.lay.norms_fp32:
            return FP32
        return self.lay.trainable_width if self.trains else self.lay.kept_width


def rms_norm(cx: _Ctx, x: T, dim: int, *, gemma: bool = False) -> T:
    """LlamaRMSNorm: x.float(); x * rsqrt(mean(x^2) + eps); weight * x.to(in_dtype). Gemma: x * (1 + w)."""
    tp, rows = cx.tape, x.numel // dim
    if cx.liger:  # LigerRMSNormFunction (predict/kernels.py): saves X itself and one fp32 rstd per row
        w = param(dim, cx.norm_width(), cx.trains)
        if x.rg or w.rg:
            tp.save(x, T(rows, FP32, False))
        return T(x.numel, x.width, x.rg or w.rg)
    xf = tp.cast(x, FP32)
    tp.saving_input(xf)  # pow(2)
    rs = tp.saving_output(T(rows, FP32, xf.rg))  # rsqrt saves its result
    xr = tp.mul(xf, rs)
    w = param(dim, cx.norm_width(), cx.trains)
    if gemma:
        # Gemma / Qwen3.5: `(1.0 + self.weight.float())` is a fresh (dim,) tensor, saved for xr's gradient; OLMo-2
        # multiplies by the weight itself
        fam = cx.lay.spec.family  # OLMo-2 and gpt-oss multiply by the weight itself
        w1 = param(dim, FP32, cx.trains) if fam.post_norms or fam.norm_mul_fp32 else T(dim, FP32, cx.trains)
        return tp.cast(tp.mul(xr, w1, width=FP32), x.width)
    hn = tp.cast(xr, x.width)
    return tp.mul(w, hn, width=max(w.width, hn.width))


def l2_norm(cx: _Ctx, x: T, dim: int) -> T:
    """Llama4TextL2Norm: `x.float()`, x * rsqrt(mean(x^2) + eps) (pow and the product save the fp32 copy, rsqrt its
    result), `.type_as(x)`; no weight."""
    xf = cx.tape.cast(x, FP32)
    if x.rg:
        cx.tape.save(xf, T(x.numel // dim, FP32, False))
    return T(x.numel, x.width, x.rg)


def norm(cx: _Ctx, x: T, dim: int, *, gemma: bool = False) -> T:
    """The family's norm: nn.LayerNorm (StarCoder2) or an RMSNorm."""
    if cx.lay.spec.family.layer_norm:
        return layer_norm(cx, x, dim)
    return rms_norm(cx, x, dim, gemma=gemma)


def layer_norm(cx: _Ctx, x: T, dim: int) -> T:
    """nn.LayerNorm -> native_layer_norm, which saves its input, mean and rstd (one per row) for backward
    (derivatives.yaml native_layer_norm; weight and bias are parameters). CUDA autocast runs layer_norm in fp32
    (torch/include/ATen/autocast_mode.h AT_FORALL_FP32: layer_norm, native_layer_norm): a fp32 copy of a half
    input, fp32 output and statistics (its fp32 weight copy, hidden x 4 B, left out); not checked on a GPU.
    CPU autocast has no rule for it: the input's dtype out, mean / rstd fp32 when the input is half and the
    weights fp32, else the input's dtype (aten/src/ATen/native/layer_norm.cpp param_scalar_type; measured with
    saved_tensors_hooks)."""
    tp, rows = cx.tape, x.numel // dim
    w = param(dim, cx.norm_width(), cx.trains)
    rg = x.rg or w.rg
    if cx.lay.device == "cuda":
        x = tp.cast(x, FP32) if cx.amp else x
        stats = FP32  # acc_type of the input
    else:
        stats = FP32 if x.width < w.width else x.width
    if rg:
        tp.save(x, T(rows, stats, False), T(rows, stats, False))
    return T(x.numel, x.width, rg)


def dropout(cx: _Ctx, x: T, p: float) -> T:
    """F.dropout(x, p, training=True): CUDA's native_dropout saves a bool mask; the CPU kernel computes x * noise
    and saves the noise, in x's dtype (aten/src/ATen/native/Dropout.cpp _dropout_impl; measured); p = 0 returns
    x itself."""
    if not p:
        return x
    if x.rg:
        cx.tape.save(T(x.numel, 1 if cx.lay.device == "cuda" else x.width, False))
    return cx.tape.new(x)


def linear(cx: _Ctx, x: T, name: str, in_f: int, out_f: int, *, trains: bool | None = None) -> T:
    """nn.Linear under autocast (a fresh half copy of x per call), plus the LoRA branch when `name` is targeted."""
    tp, lay = cx.tape, cx.lay
    w_trains = cx.trains if trains is None else trains
    adapter = lay.train.adapter if cx.lora and name in lay.lora_modules else None
    x_in = x
    if adapter is Adapter.OFT:  # the rotation applies to the input; the base layer runs on the rotated copy
        x = adapters.oft_rotate(tp, x, lay.train, Linear(name=name, in_features=in_f, out_features=out_f),
                                amp=lay.amp, width=lay.lora_width)
    quantized = lay.quantized(name) and not name.startswith(("router", "experts"))
    how = lay.train.quant_method
    if quantized and how is QuantMethod.HQQ:
        # hqq 0.2.8 HQQLinear's default backend (HQQBackend.PYTORCH, core/quantize.py L389) runs forward_pytorch:
        # `torch.matmul(x, self.dequantize().t())` (L895): a fresh (out, in) weight in the compute dtype, which
        # the matmul saves for x's gradient whenever x requires grad (the weight itself needs none)
        xin = tp.cast(x, 2) if cx.amp else x
        if xin.rg:
            tp.save(T(in_f * out_f, lay.base_width, False))
        y = T(x.numel // in_f * out_f, cx.c, x.rg)
    elif quantized and how is QuantMethod.GPTQ:
        # gptqmodel TorchQuantLinear._forward_eager (nn_modules/qlinear/torch.py L344-376), the training path of
        # its kernels (tritonv2.py L179-180 defers to it when training): `weights = self.dequantize_weight()` (in,
        # out) `.to(x.dtype)`, then `torch.matmul(x, weights)`, which saves that weight (under autocast its half
        # cast) for x's gradient, as HQQ's forward_pytorch does
        xin = tp.cast(x, 2) if cx.amp else x
        if xin.rg:
            tp.save(T(in_f * out_f, xin.width, False))
        y = T(x.numel // in_f * out_f, xin.width, x.rg)
    elif quantized and how is QuantMethod.AWQ:
        # gptqmodel AwqGEMMLinear.forward (nn_modules/qlinear/gemm_awq.py L199-240, what transformers 5 builds for
        # AWQ): x cast to fp16 unless half already; AwqGemmFn keeps only qweight, qzeros and scales for backward
        # (L57-59); its dense path above 1024 rows dequantizes the (in, out) weight inside forward, a transient; the
        # output is cast back to x's dtype (L242-243)
        y = T(x.numel // in_f * out_f, x.width, x.rg)
    elif quantized and how is QuantMethod.BNB and lay.train.quant_bits == 4:
        # bitsandbytes Linear4bit.forward (0.50: nn/modules.py L626-637): x.to(compute_dtype), then the output is
        # cast back to the input's dtype (`.to(inp_dtype)`): fp32 when the stack upcast the stream. MatMul4Bit
        # keeps that compute-dtype input for backward before 0.43.2 (`ctx.tensors = (A, B)`), only the packed
        # weight since (`(None, B)`, autograd/_functions.py L358): memplan.spec.packages
        if lay.linear4bit_keeps_input:
            xin = tp.cast(x, cx.c)
            if xin.rg:
                tp.hold(xin)  # a ctx attribute: alive until the graph is freed (Tape.held)
        y = T(x.numel // in_f * out_f, x.width, x.rg)
    elif quantized:
        # EETQ (transformers integrations/eetq.py EetqLinearMMFunction: `ctx.save_for_backward(x, weight, scales,
        # bias)`, no autocast rule) keeps its input as LLM.int8 does; so does AQLM (aqlm 1.1.7 inference.py
        # _QuantizedMatmul.forward L107-113 saves `input`; its kernels return the input's dtype). Linear8bitLt:
        # MatMul8bitLt is no autocast op; it keeps its input A itself (`ctx.tensors = (CAt, subA, A)`,
        # autograd/_functions.py L187; its fp16 quantization copies are transients) and returns A's dtype
        if x.rg:
            tp.hold(x) if how is QuantMethod.BNB else tp.save(x)  # MatMul8bitLt: ctx.tensors; EETQ: saved
        y = T(x.numel // in_f * out_f, x.width, x.rg)
    else:
        xin = tp.cast(x, 2) if cx.amp else x
        y = tp.linear(xin, in_f, out_f, w_trains=w_trains, width=cx.c, autocast=cx.autocast)
        if cx.amp and lay.frozen_cast and not w_trains and xin.rg:
            # autocast casts a frozen weight afresh on every call (cached_cast caches only leaves that require
            # grad: aten/src/ATen/autocast_mode.cpp), and the matmul saves that copy for its input's gradient
            tp.save(T(in_f * out_f, cx.c, False))
        del xin  # the cast input dies with the matmul (unless saved); the `del`s below place such ends for
        # predict/reserve.py, which records when each tensor of this program is dropped (tape.Lifetimes)
    if adapter in (Adapter.LORA, Adapter.DORA):
        x = x_in
        xl = tp.cast(x, lay.lora_width)  # peft _cast_input_dtype to the adapter dtype (a no-op when equal)
        if lay.train.lora_dropout > 0:
            # CUDA native_dropout saves a bool mask; the CPU kernel computes x * noise and saves the noise
            if xl.rg:  # kept for backward only when the input needs a gradient
                tp.save(T(xl.numel, 1 if lay.device == "cuda" else xl.width, False))
            xl = tp.new(xl)
        xa = tp.cast(xl, 2) if lay.amp else xl
        # without autocast the adapters compute in their own dtype (fp32 ones over a half base: LLaMA-Factory)
        aw = cx.c if lay.amp else xa.width
        a = tp.linear(xa, in_f, lay.train.lora_rank, w_trains=True, width=aw)
        if adapter is Adapter.DORA:
            b = tp.linear(a, lay.train.lora_rank, out_f, w_trains=True, width=aw)
            adapters.dora_extra(tp, xa, y, b, lay.train, Linear(name=name, in_features=in_f, out_features=out_f),
                                amp=lay.amp, width=lay.lora_width, compute=cx.c)
            y = tp.new(y)  # `result + result_dora` (fp32), `.to(torch_result_dtype)`: not the saved base output
        else:  # peft lora/layer.py Linear.forward: `result = result + lora_B(lora_A(dropout(x))) * scaling`
            del xa
            b = tp.linear(a, lay.train.lora_rank, out_f, w_trains=True, width=aw)
            del a
            scaled = tp.new(b)  # `* scaling`: a scalar product saves nothing
            del b
            y = tp.new(y, rg=True)  # the sum: a new tensor; the base output goes
            del scaled
        y.rg = True
    return y


def attention(cx: _Ctx, h: T) -> T:
    s, lay, tp = cx.lay.spec, cx.lay, cx.tape
    n = cx.tokens
    if s.family.mla:
        return mla_attention(cx, h)
    if cx.linear:
        from memplan.predict.linear_attention import gated_deltanet  # it builds on this module's ops

        return gated_deltanet(cx, h)
    gate = None
    if s.family.linear_attention:
        # Qwen3_5Attention.forward (modeling_qwen3_5.py l.781-788): q_proj's (B, S, H, 2D) output chunked into the
        # query (a view: the q_norm's fp32 `pow` pins all of it) and the gate, whose reshape of a strided chunk
        # copies; k_proj, v_proj as usual
        qg = linear(cx, h, "q_proj", s.hidden_size, 2 * s.q_dim)
        q, gate = qg.view(n * s.q_dim), tp.new(qg, numel=n * s.q_dim)
        k = linear(cx, h, "k_proj", s.hidden_size, s.kv_dim)
        v = linear(cx, h, "v_proj", s.hidden_size, s.kv_dim)
    elif s.fused_qkv:
        qkv = linear(cx, h, "qkv_proj", s.hidden_size, s.q_dim + 2 * s.kv_dim)
        q, k, v = qkv.view(n * s.q_dim), qkv.view(n * s.kv_dim), qkv.view(n * s.kv_dim)
    else:
        q = linear(cx, h, "q_proj", s.hidden_size, s.q_dim)
        k = linear(cx, h, "k_proj", s.hidden_size, s.kv_dim)
        v = linear(cx, h, "v_proj", s.hidden_size, s.kv_dim)
    if s.qk_norm:  # Gemma3's q_norm / k_norm are Gemma norms too; OLMo-2's span the whole projection
        gemma = s.family.sandwich_norms or s.family.post_norms or s.family.zero_centered_norms
        qd, kd = (s.q_dim, s.kv_dim) if s.family.qk_norm_full else (s.head_dim, s.head_dim)
        q, k = norm(cx, q, qd, gemma=gemma), norm(cx, k, kd, gemma=gemma)
    if not cx.rope:  # Llama 4's NoPE layer: `(q * attn_scales).to(q.dtype)` (modeling_llama4.py l.360-367)
        if s.config.get("attn_temperature_tuning", True):
            if q.rg:
                tp.save(T(cx.seq, FP32, False))  # attn_scales (1, S, 1, 1) expanded over the batch
            q = tp.new(q)
    elif s.family.rope_complex or s.family.rope_fp32_cache:
        # apply_rotary_emb (l.225-234): complex products on float copies, `.type_as(x)`; Qwen-1's
        # apply_rotary_pos_emb: fp32 products on `t.float()`, `.type_as(t)` (Family.rope_fp32_cache)
        q, k = tp.new(q), tp.new(k)
        if s.family.nope_layers and s.config.get("use_qk_norm", True):  # Llama4TextL2Norm (l.106-118) on q, k
            q, k = l2_norm(cx, q, s.head_dim), l2_norm(cx, k, s.head_dim)
    else:
        rope_width = max(cx.stream, q.width)  # cos/sin carry the stream dtype; q*cos promotes
        q, k = tp.new(q, width=rope_width), tp.new(k, width=rope_width)  # q*cos + rotate_half(q)*sin
    if lay.amp:  # sdpa / matmul autocast to half
        q, k, v = tp.cast(q, 2), tp.cast(k, 2), tp.cast(v, 2)
    rg = q.rg or k.rg or v.rg
    if lay.attn is Attention.EAGER:
        out = tp.new(_eager(cx, q, k, v, rg))  # transpose(1, 2).reshape of a (B, H, S, D) result: a copy
    elif s.attention_dropout and lay.device == "cpu":
        # the CPU flash kernel takes no dropout: torch's math path (sdp_utils_cpp.cpp check_for_dropout), which
        # upcasts half inputs to fp32 and saves the scaled q, the scaled k and v at every query head (repeated
        # for GQA), the softmax output, the dropout noise and the dropped probabilities (B, H, S, S), all fp32
        # (measured with saved_tensors_hooks); its (B, H, S, D) output is copied by transpose(1, 2).contiguous()
        if rg:
            probs = cx.batch * s.num_heads * cx.seq * cx.seq
            tp.save(*(T(m, FP32, False) for m in (q.numel, q.numel, q.numel, probs, probs, probs)))
        out = T(n * s.q_dim, q.width, rg)
    else:
        # sdpa / flash: saves q, k, v, out and the fp32 logsumexp (B, heads, S) (with dropout on CUDA, the philox
        # seed and offset too: 16 B, left out; the mask is regenerated in backward). CUDA kernels return `out` in
        # (B, S, H, D) memory, so transformers' transpose(1, 2).contiguous() is free; the CPU kernel follows the
        # query's layout, which a torch.cat rope (phi3) makes (B, H, S, D): then it is a copy.
        out = T(n * s.q_dim, cx.c, rg)
        # an explicit mask (windowed layers; Qwen-1's own (1, 1, S, S) causal one): no enable_gqa (repeat_kv
        # copies), and sdpa converts the bool mask to the query dtype, saved per layer
        qwen_mask = s.family.sdpa_causal_mask and lay.attn is Attention.SDPA
        if cx.windowed and sdpa_masked(lay) or qwen_mask:
            if s.num_kv_heads != s.num_heads:
                k, v = tp.new(k, numel=q.numel), tp.new(v, numel=q.numel)
            if rg:
                tp.save(T((1 if qwen_mask else cx.batch) * cx.seq * cx.seq, q.width, False))
        if rg:
            tp.save(q, k, v, out, T(n * s.num_heads, FP32, False))
        if lay.device == "cpu" and s.rope_concat:
            out = tp.new(out)
    if gate is not None:  # `attn_output * torch.sigmoid(gate)` (l.812): sigmoid saves its output, mul both sides
        out = tp.mul(out, tp.saving_output(gate))
    return linear(cx, out, "o_proj", s.q_dim, s.hidden_size)


def mla_attention(cx: _Ctx, h: T) -> T:
    """DeepseekV3Attention.forward (modeling_deepseek_v3.py l.427-481): q (directly, or q_a_proj -> RMSNorm ->
    q_b_proj), the joint compression kv_a_proj_with_mqa split into the latent (RMSNorm'd) and the shared rope key;
    rope on the rope parts (its products save only cos/sin), torch.cat(q_pass, q_rot) and expand_kv's new_empty key
    (l.412-417) are fresh tensors; the value is a slice of kv_b_proj's output, so saving it pins all of it."""
    s, lay, tp = cx.lay.spec, cx.lay, cx.tape
    n, nh, rope, vd = cx.tokens, s.num_heads, s.qk_rope_head_dim, s.v_head_dim
    qk, h_in = s.head_dim, s.hidden_size
    nope = qk - rope
    if s.q_lora_rank:
        qa = rms_norm(cx, linear(cx, h, "q_a_proj", h_in, s.q_lora_rank), s.q_lora_rank)
        q = linear(cx, qa, "q_b_proj", s.q_lora_rank, nh * qk)
    else:
        q = linear(cx, h, "q_proj", h_in, nh * qk)
    ckv = linear(cx, h, "kv_a_proj_with_mqa", h_in, s.kv_lora_rank + rope)
    latent = rms_norm(cx, ckv.view(n * s.kv_lora_rank), s.kv_lora_rank)
    # V3: cos/sin carry the stream dtype (q * cos promotes); V2: apply_rotary_emb casts back `type_as(xq)` and its
    # complex product saves only the shared freqs_cis (estimator._rope_bytes)
    rope_width = q.width if s.family.rope_complex else max(cx.stream, q.width)
    q = T(n * nh * qk, rope_width, q.rg)  # cat(q_pass, rotated q_rot): promoted to the rotated part's dtype
    kvb = linear(cx, latent, "kv_b_proj", s.kv_lora_rank, nh * (nope + vd))
    k = T(n * nh * qk, kvb.width, kvb.rg or ckv.rg)  # new_empty + copy_ of k_nope and the expanded k_rot
    v = kvb.view(n * nh * vd)
    if lay.amp:
        q, k, v = tp.cast(q, 2), tp.cast(k, 2), tp.cast(v, 2)
    rg = q.rg or k.rg or v.rg
    if lay.attn is Attention.EAGER:  # eager_attention_forward: scores, fp32 softmax, probs @ v
        scores = T(cx.batch * nh * cx.seq * cx.seq, q.width, rg)
        if rg:
            tp.save(q, k)
        probs = tp.cast(tp.saving_output(scores, width=FP32), q.width)
        probs = tp.cast(probs, 2) if lay.amp else probs
        # matmul saves a contiguous copy of the sliced v (not kv_b_proj's whole output); the reshape copies
        out = tp.new(_matmul(cx, probs, tp.new(v), n * nh * vd))
    elif lay.device == "cpu" and vd != qk:
        # the CPU flash kernel needs one head size: torch falls back to its math path, which upcasts half inputs to
        # fp32 and saves the scaled q and k, the probabilities and a contiguous v (measured with saved_tensors_hooks)
        if rg:
            tp.save(*(T(m, FP32, False) for m in (q.numel, k.numel, cx.batch * nh * cx.seq * cx.seq, n * nh * vd)))
        out = tp.new(T(n * nh * vd, cx.c, rg))  # cast back to the input dtype, (B, H, S, D): the reshape copies
    else:  # CUDA memory-efficient kernel (flash needs one head size): q, k, v (pinning kv_b_proj's output), out, lse
        out = T(n * nh * vd, cx.c, rg)
        if rg:
            tp.save(q, k, v, out, T(n * nh, FP32, False))
        if lay.device == "cpu":  # the CPU kernel's output follows the (B, H, S, D) query: reshape copies
            out = tp.new(out)
    return linear(cx, out, "o_proj", nh * vd, h_in)


def sdpa_masked(lay: Layout) -> bool:
    """sdpa gets an explicit (B, 1, S, S) mask when a sliding window is shorter than the sequence."""
    w = lay.spec.sliding_window
    return lay.attn is not Attention.EAGER and w is not None and w < lay.train.seq_len


def _eager(cx: _Ctx, q: T, k: T, v: T, rg: bool) -> T:
    """eager_attention_forward: repeat_kv copies, scores, (softcap), fp32 softmax, probs @ v."""
    s, tp = cx.lay.spec, cx.tape
    if s.num_kv_heads != s.num_heads:
        k, v = tp.new(k, numel=q.numel), tp.new(v, numel=q.numel)
    scores = T(cx.batch * s.num_heads * cx.seq * cx.seq, q.width, rg)
    if rg:
        tp.save(q, k)
    if s.family.attention_sinks:
        return _eager_sinks(cx, scores, v, q.numel)
    if s.attn_softcap:
        scores = tp.saving_output(scores)  # tanh(scores / cap) * cap
    probs = tp.saving_output(scores, width=FP32)  # softmax(dim=-1, dtype=float32)
    probs = tp.cast(probs, q.width)  # .to(query.dtype)
    probs = dropout(cx, probs, s.attention_dropout)  # nn.functional.dropout(attn_weights, p=dropout)
    probs = tp.cast(probs, 2) if cx.lay.amp else probs
    return _matmul(cx, probs, v, q.numel)


def _eager_sinks(cx: _Ctx, scores: T, v: T, out_numel: int) -> T:
    """gpt-oss's eager_attention_forward (modeling_gpt_oss.py l.205-227): `scores * scaling + mask` (the mask is in
    the stream dtype and promotes), `torch.cat([scores, sinks])` to (B, H, S, S + 1) (cat promotes to the sinks'
    dtype: fp32 where they train under AMP), minus its max (`max(dim=-1)` saves its int64 indices), softmax in that
    dtype (saves its result), the sink column dropped by a slice and `.to(value.dtype)`: a copy only when the
    dtypes differ, else the slice (a view) is what the matmul saves."""
    s, tp, lay = cx.lay.spec, cx.tape, cx.lay
    rows = cx.batch * s.num_heads * cx.seq
    sinks = param(s.num_heads, lay.trainable_width if cx.trains else lay.kept_width, cx.trains)
    width = max(scores.width, cx.stream, sinks.width)
    rg = scores.rg or sinks.rg
    if rg:
        tp.save(T(rows, 8, False))  # max(dim=-1, keepdim=True).indices
    probs = tp.saving_output(T(rows * (cx.seq + 1), width, rg))  # softmax(combined - max, dtype=combined.dtype)
    weights = probs.view(rows * cx.seq) if width == v.width else T(rows * cx.seq, v.width, rg)  # [..., :-1].to()
    weights = dropout(cx, weights, s.attention_dropout)
    return _matmul(cx, weights, v, out_numel)


def _matmul(cx: _Ctx, a: T, b: T, out_numel: int) -> T:
    if a.rg or b.rg:
        cx.tape.save(a, b)
    return T(out_numel, cx.c, a.rg or b.rg)


def mlp(cx: _Ctx, h: T) -> T:
    s = cx.lay.spec
    hid = s.hidden_size
    if s.is_moe and cx.moe and s.family.shared_expert_gate:
        # Qwen3_5MoeSparseMoeBlock.forward (modeling_qwen3_5_moe.py l.921-933): the shared expert first, the router
        # and experts, then `sigmoid(shared_expert_gate(x)) * shared` (sigmoid saves its output, mul both sides)
        shared = _gated_mlp(cx, h, s.shared_intermediate, "shared_expert.")
        routed = _moe(cx, h)
        gate = cx.tape.saving_output(linear(cx, h, "shared_expert_gate", s.hidden_size, 1))
        shared = cx.tape.mul(gate, shared)
        return T(routed.numel, max(routed.width, shared.width), True)
    if s.is_moe and cx.moe and s.family.moe_block == "gpt_oss":
        return _gpt_oss_moe(cx, h)
    if s.is_moe and cx.moe and s.family.moe_block == "llama4":
        return _llama4_moe(cx, h)
    if s.is_moe and cx.moe:  # each token visits `experts_per_token` experts of width moe_intermediate
        routed = _moe(cx, h)
        if not s.shared_intermediate:
            return routed
        # DeepseekV3MoE.forward (modeling_deepseek_v3.py l.215-222): `hidden_states + self.shared_experts(residuals)`
        shared = _gated_mlp(cx, h, s.shared_intermediate, s.family.shared_prefix)
        return T(routed.numel, max(routed.width, shared.width), True)
    inter = s.intermediate_size
    if not s.family.gated_mlp:  # Starcoder2MLP: c_fc, the activation (saves its input), c_proj
        up_name, down_name = (lin.name for lin in s.mlp_linears())
        act = cx.tape.saving_input(linear(cx, h, up_name, hid, inter))
        cx.tape.mark_here()  # the activation's backward: c_proj's saved input is freed by then
        return linear(cx, act, down_name, inter, hid)
    return _gated_mlp(cx, h, inter)


def _gated_mlp(cx: _Ctx, h: T, inter: int, prefix: str = "") -> T:
    """down(act(gate(x)) * up(x)) (LlamaMLP, DeepseekV3MLP l.115-117); `prefix` names DeepSeek's shared experts."""
    s = cx.lay.spec
    n, hid = cx.tokens, s.hidden_size
    if cx.liger:  # LigerSiLUMulFunction / GEGLU (predict/kernels.py): saves gate and up, recomputes the act
        gate, up = _gate_up(cx, h, inter, prefix)
        if gate.rg or up.rg:
            cx.tape.save(gate, up)
        cx.tape.mark_here()
        return linear(cx, T(n * inter, max(gate.width, up.width), gate.rg or up.rg), prefix + "down_proj", inter,
                      hid)
    if s.fused_gate_up:
        gate, up = _gate_up(cx, h, inter, prefix)
        act = cx.tape.saving_input(gate)  # silu / gelu_tanh
    else:  # `down_proj(act_fn(gate_proj(x)) * up_proj(x))`: the gate's output goes once the activation ran
        act = cx.tape.saving_input(linear(cx, h, prefix + "gate_proj", hid, inter))
        up = linear(cx, h, prefix + "up_proj", hid, inter)
    prod = cx.tape.mul(act, up)
    del act, up
    # backward reaches act * up's node (its three (B, S, I) gradients: layer_backward_buffers) after the down
    # projection's node (and any later one) ran and released what only they saved (`layer_saved(at_mlp=True)`)
    cx.tape.mark_here()
    return linear(cx, prod, prefix + "down_proj", inter, hid)


def _gate_up(cx: _Ctx, h: T, inter: int, prefix: str = "") -> tuple[T, T]:
    """The MLP's gate and up projections (two views of one output when fused)."""
    n, hid = cx.tokens, cx.lay.spec.hidden_size
    if cx.lay.spec.fused_gate_up:
        gu = linear(cx, h, "gate_up_proj", hid, 2 * inter)
        return gu.view(n * inter), gu.view(n * inter)
    return linear(cx, h, prefix + "gate_proj", hid, inter), linear(cx, h, prefix + "up_proj", hid, inter)


def _moe(cx: _Ctx, h: T) -> T:
    """Sparse MoE block (transformers 5: a router, then every expert on its gathered tokens). The tokens x
    experts_per_token rows are the same whatever the routing balance, so saved bytes do not depend on it.
    With LoRA on all linear layers peft 0.21 also wraps the router and the 3D expert parameters
    (target_parameters): the experts then run a grouped matmul on merged weights W + BA, saved for backward."""
    s, tp, lay = cx.lay.spec, cx.tape, cx.lay
    n, k = cx.tokens, s.experts_per_token
    wrapped = lay.experts_wrapped and cx.lora
    router_trains = cx.trains or wrapped
    if s.family.router == "sigmoid":
        weights = _sigmoid_router(cx, h, router_trains, wrapped)
    elif s.family.router == "softmax_fp32":
        weights = _softmax_fp32_router(cx, h, router_trains, wrapped)
    else:
        hin = tp.cast(h, 2) if lay.amp else h
        logits = tp.linear(hin, s.hidden_size, s.num_experts, w_trains=router_trains, width=cx.c)
        if wrapped:
            tp.save(T(n * lay.train.lora_rank, cx.c, True))  # router LoRA: A's output
        probs = tp.saving_output(tp.cast(logits, FP32), width=FP32)  # softmax(router_logits.float())
        weights = T(n * k, FP32, probs.rg)  # top-k probabilities, renormalised
    routed = T(n * k * s.hidden_size, h.width, h.rg)  # hidden_states[token_idx], all experts together
    # the experts' grouped matmul has no autocast rule: transformers casts its input to the expert weights' dtype
    # (`input.to(weight.dtype)`): the stream's, except in freeze's trained layers under AMP (fp32 weights)
    width = lay.trainable_width if cx.trains and not lay.train.is_lora else h.width
    sub = _Ctx(tp, lay, n * k, cx.batch, cx.seq, cx.trains or wrapped, width, autocast=False, lora=cx.lora)
    inter = s.moe_intermediate_size
    routed = tp.cast(routed, width)
    if wrapped:  # merged expert weights (E, 2I, H) and (E, H, I) in the compute dtype: peft's ParamWrapper
        # (tuners/lora/layer.py l.2572-2600) parametrizes each with _LoraFactorsProxy's baddbmm(W, lhs, rhs);
        # register_parametrization computes it once to check it (torch/nn/utils/parametrize.py l.233-237
        # `Z = self()`: down_proj's wrapper is the outer one), dropped; the experts then read each under
        # parametrize.cached(), gate_up_proj's for the first grouped matmul, down_proj's for the second, saved
        down_b, gate_up_b = merged_experts(lay)
        T(down_b, 1, False)  # (made and dropped at once)
        T(gate_up_b, 1, False)
        merged = [T(gate_up_b, 1, False)]  # held by the cache until the block returns
        tp.save(merged[0])
    gate = linear(sub, routed, "experts.gate", s.hidden_size, inter)
    up = linear(sub, routed, "experts.up", s.hidden_size, inter)
    prod = tp.mul(tp.saving_input(gate), up)
    if wrapped:
        merged.append(T(down_b, 1, False))
        tp.save(merged[1])
    out = linear(sub, prod, "experts.down", inter, s.hidden_size)
    tp.mul(out, weights)  # x routing weight
    return T(n * s.hidden_size, h.width, True)  # `.to(hidden_states.dtype)` at the end


def merged_experts(lay: Layout) -> tuple[int, int]:
    """Bytes of the merged down_proj (E, H, I) and gate_up_proj (E, 2I, H) weights peft builds in each forward of
    an MoE layer whose experts it wraps (_moe), in the compute dtype; their gradients are as large (the grouped
    matmuls' backward makes them: the merged weight requires grad through the LoRA factors). (0, 0) unwrapped."""
    s = lay.spec
    if not (s.is_moe and lay.experts_wrapped):
        return 0, 0
    down = s.num_experts * s.moe_intermediate_size * s.hidden_size * lay.compute_width
    return down, 2 * down


def _gpt_oss_moe(cx: _Ctx, h: T) -> T:
    """GptOssMLP (modeling_gpt_oss.py l.131-145) on transformers 5's grouped_mm experts (integrations/moe.py
    grouped_mm_experts_forward l.424-537). The router (l.123-128): `F.linear(h, weight, bias)` (autocast: half),
    topk of the logits (saves its int64 indices), softmax over the k in the logits' dtype (saves its result). The
    experts: the rows sorted by expert, `hidden_states[perm // k]` and `sample_weights[perm]` (each indexing saves its
    int64 index), the bias rows `gate_up_proj_bias[expert_ids_g]` / `down_proj_bias[expert_ids_g]` (one index,
    saved when the biases train), each grouped matmul saving its input (cast to the expert weights' dtype) and the
    int32 offsets; `_apply_gate` (l.79-85): the interleaved gate / up slices of gate_up clamped (clamp saves its
    input: the whole gate_up), `gate * sigmoid(gate * alpha)` (sigmoid saves its result, the product both
    factors), `(up + 1) * glu` (both); x the routing weight (both saved), un-permuted `weighted_out[inv_perm]`
    (its index saved), summed over the k in the experts' dtype, `.to(hidden_states.dtype)`."""
    s, tp, lay = cx.lay.spec, cx.tape, cx.lay
    n, k, e, hid, inter = cx.tokens, s.experts_per_token, s.num_experts, s.hidden_size, s.moe_intermediate_size
    hin = tp.cast(h, 2) if lay.amp else h
    logits = tp.linear(hin, hid, e, w_trains=cx.trains, width=cx.c)
    if logits.rg:
        tp.save(T(n * k, 8, False))  # topk's indices
    weights = tp.saving_output(T(n * k, logits.width, logits.rg))  # softmax over the top-k values
    rows = n * k
    if h.rg:
        tp.save(T(rows, 8, False))  # hidden_states[perm // k]'s index
    if weights.rg:
        tp.save(T(rows, 8, False))  # sample_weights[perm]'s index
    weights = T(rows, weights.width, weights.rg)  # the gathered sample_weights_g
    width = lay.trainable_width if cx.trains else h.width  # `input.to(weight.dtype)` (no autocast rule)
    routed = tp.cast(T(rows * hid, h.width, h.rg), width)
    if cx.trains:
        tp.save(routed, T(rows, 8, False), T(e, 4, False))  # grouped_mm's input; the bias rows' index; offsets
    gate_up = T(rows * 2 * inter, width, routed.rg or cx.trains)
    if gate_up.rg:
        tp.save(gate_up, T(e, 4, False))  # both clamps' input (the strided gate / up views); the offsets
    gate = T(rows * inter, width, gate_up.rg)  # gate.clamp(max=limit)
    glu = tp.mul(gate, tp.saving_output(T(rows * inter, width, gate.rg)))  # gate * sigmoid(gate * alpha)
    gated = tp.mul(T(rows * inter, width, gate_up.rg), glu)  # (up.clamp(-limit, limit) + 1) * glu
    # the down grouped_mm (+ bias rows): no autocast rule
    out = tp.linear(gated, inter, hid, w_trains=cx.trains, width=width, autocast=False)
    weighted = tp.mul(out, weights)
    if weighted.rg:
        tp.save(T(rows, 8, False))  # weighted_out[inv_perm]'s index
    return T(n * hid, h.width, True)


def _llama4_moe(cx: _Ctx, h: T) -> T:
    """Llama4TextMoe.forward (modeling_llama4.py l.166-175). Llama4Router (l.141-152): an nn.Linear (autocast:
    half logits; never adapted, Family.lora_exclude), topk (its int64 indices, which the scatter_ saves too),
    `full_like(-inf).scatter_` then `sigmoid(scores.float())` (saves its fp32 result) `.to(dtype)`. Every token goes
    to every expert: `hidden_states.repeat(E, 1)` times the scores' transposed column (a copy; the product saves
    both). Llama4TextExperts (l.66-85): torch.bmm, an autocast op (half input copy saved when the experts train),
    `gate_up.chunk(2)`, silu(gate) saves the gate view (so all of gate_up), `up * act` both, the down bmm its input.
    Then the shared expert (a Llama4TextMLP on the layer's input) and `out.add_(routed.sum(0))`."""
    s, tp, lay = cx.lay.spec, cx.tape, cx.lay
    n, k, e, hid, inter = cx.tokens, s.experts_per_token, s.num_experts, s.hidden_size, s.moe_intermediate_size
    hin = tp.cast(h, 2) if lay.amp else h
    logits = tp.linear(hin, hid, e, w_trains=cx.trains, width=cx.c)
    if logits.rg:
        tp.save(T(n * k, 8, False))  # topk's indices (scatter_'s index too)
    scores = tp.cast(tp.saving_output(tp.cast(T(n * e, logits.width, logits.rg), FP32)), logits.width)
    col = T(n * e, scores.width, scores.rg)  # router_scores.transpose(0, 1).reshape(-1, 1): a copy
    routed = tp.mul(T(e * n * hid, h.width, h.rg), col)  # hidden_states.repeat(E, 1) * col
    xin = tp.cast(routed, 2) if lay.amp else routed
    gate_up = tp.linear(xin, hid, 2 * inter, w_trains=cx.trains, width=cx.c)  # bmm(x, gate_up_proj)
    act = tp.saving_input(gate_up, width=None)  # silu(gate): saves the gate view, i.e. gate_up's storage
    act = T(e * n * inter, act.width, act.rg)
    prod = tp.mul(gate_up.view(e * n * inter), act)  # up * act
    tp.linear(prod, inter, hid, w_trains=cx.trains, width=cx.c)  # bmm(prod, down_proj)
    shared = _gated_mlp(cx, h, s.shared_intermediate, s.family.shared_prefix)
    return T(n * hid, shared.width, True)


def _sigmoid_router(cx: _Ctx, h: T, trains: bool, wrapped: bool) -> T:
    """DeepseekV3TopkRouter.forward (modeling_deepseek_v3.py l.133-158): `F.linear(h.type(float32),
    weight.type(float32))` on the fp32 weight (autocast then casts both to half), sigmoid (saves its result), the
    grouped top-k on the scores + e_score_correction_bias without grad, `scores.gather(1, topk_indices)` (saves the
    int64 index), renormalised in place by their sum (div_ saves the denominator) and scaled."""
    s, tp, lay = cx.lay.spec, cx.tape, cx.lay
    n, k = cx.tokens, s.experts_per_token
    hin = tp.cast(h, FP32)
    hin = tp.cast(hin, 2) if lay.amp else hin
    logits = tp.linear(hin, s.hidden_size, s.num_experts, w_trains=trains, width=cx.c if lay.amp else FP32)
    if wrapped:
        tp.save(T(n * lay.train.lora_rank, logits.width, True))  # router LoRA: A's output
    scores = tp.saving_output(logits)
    if scores.rg:
        tp.save(T(n * k, 8, False))  # gather's index
        if s.config.get("norm_topk_prob", True):
            tp.save(T(n, scores.width, False))  # the denominator (n, 1)
    return T(n * k, scores.width, scores.rg)


def _softmax_fp32_router(cx: _Ctx, h: T, trains: bool, wrapped: bool) -> T:
    """DeepseekV2TopkRouter.forward (modeling_deepseek_v2.py l.98-117): the fp32 weight's `F.linear(h.float(),
    w.float())` (autocast casts both to half), `softmax(dim=-1, dtype=float32)` (saves its fp32 result), top-k
    (saves its int64 indices; group_limited_greedy first masks the scores: masked_fill saves the bool mask), then
    x routed_scaling_factor (no renormalisation)."""
    s, tp, lay = cx.lay.spec, cx.tape, cx.lay
    n, k = cx.tokens, s.experts_per_token
    hin = tp.cast(h, FP32)
    hin = tp.cast(hin, 2) if lay.amp else hin
    logits = tp.linear(hin, s.hidden_size, s.num_experts, w_trains=trains, width=cx.c if lay.amp else FP32)
    if wrapped:
        tp.save(T(n * lay.train.lora_rank, logits.width, True))  # router LoRA: A's output
    probs = tp.saving_output(tp.cast(logits, FP32), width=FP32)
    if probs.rg:
        if s.config.get("topk_method") == "group_limited_greedy":
            tp.save(T(n * s.num_experts, 1, False))  # masked_fill's mask
        tp.save(T(n * k, 8, False))  # topk's indices
    return T(n * k, FP32, probs.rg)


def _part(cx: _Ctx, name: str) -> _Ctx:
    """The context of one sub-module of the layer: its weights train only where the layer's do and freeze's
    trainable_modules name it (LLaMA-Factory `.{idx}.{name}` in the parameter's name; "norm": a norm the table
    does not name separately, trained under all only)."""
    if not cx.trains or cx.lay.part_trains(name):
        return cx
    return dataclasses.replace(cx, trains=False)


def decoder_layer(cx: _Ctx, x: T) -> T:
    s = cx.lay.spec
    attn, ffn, norm_ = _part(cx, "self_attn"), _part(cx, "mlp"), _part(cx, "norm")
    if s.family.post_norms:  # OLMo-2: x + norm(attn(x)), then x + norm(mlp(x))
        a = rms_norm(norm_, attention(attn, x), s.hidden_size, gemma=True)
        x = T(x.numel, max(x.width, a.width), x.rg or a.rg)
        m = rms_norm(norm_, mlp(ffn, x), s.hidden_size, gemma=True)
        return T(x.numel, max(x.width, m.width), x.rg or m.rg)
    gemma = s.family.sandwich_norms
    # x * (1 + w) in fp32 (Gemma, Qwen3_5RMSNorm), or the weight times the fp32 normalised input (gpt-oss)
    fp32_mul = gemma or s.family.zero_centered_norms or s.family.norm_mul_fp32
    first, second = (norm_, norm_) if gemma else (_part(cx, "input_layernorm"), _part(cx, "post_attention_layernorm"))
    a = dropout(cx, attention(attn, norm(first, x, s.hidden_size, gemma=fp32_mul)), s.residual_dropout)
    if gemma:
        a = rms_norm(norm_, a, s.hidden_size, gemma=True)  # post_attention_layernorm
    x = T(x.numel, max(x.width, a.width), x.rg or a.rg)
    m = dropout(cx, mlp(ffn, norm(second, x, s.hidden_size, gemma=fp32_mul)), s.residual_dropout)
    if gemma:
        m = rms_norm(norm_, m, s.hidden_size, gemma=True)  # post_feedforward_layernorm
    return T(x.numel, max(x.width, m.width), x.rg or m.rg)


def stream_width(lay: Layout) -> int:
    """dtype of the residual stream (Layout.stream_width)."""
    return lay.stream_width


def layer_saved(lay: Layout, *, batch: int, seq: int, trains: bool, x_rg: bool, input_kept: bool = False,
                at_mlp: bool = False, held: bool = False, layer: int | None = None, worst: bool = False,
                lora: bool = True) -> int:
    """Bytes one decoder layer saves for backward (its input included when it is saved, unless `input_kept`:
    a recomputed checkpointed layer, whose input the checkpoint already holds: the norm's `pow` saves that very
    storage when the stream is fp32, so it is not a second copy). at_mlp: what is still saved when its backward
    reaches the MLP's `act * up` (autograd frees a node's saved tensors once it ran, torch/csrc/autograd/
    engine.cpp, retain_graph=False; the down projection's saved input is gone by then, unless a ctx attribute
    holds it). held: only the bytes held by ctx attributes (Tape.held), which outlive the layer's backward.
    layer: that decoder layer's own kind (DeepSeek: dense below first_k_dense_replace; Qwen3.5: a Gated DeltaNet
    or full attention; Llama 4: rope or NoPE); None: the mean over all, or with `worst` the largest kind's.
    lora: the layer carries the adapters (a layer LLaMA Pro leaves without runs the frozen base alone)."""
    def saved(windowed: bool, moe: bool = True, linear: bool = False, rope: bool = True) -> int:
        tape = Tape()
        cx = _Ctx(tape, lay, batch * seq, batch, seq, trains, stream_width(lay), windowed=windowed, moe=moe,
                  linear=linear, rope=rope, lora=lora)
        x = T(batch * seq * lay.spec.hidden_size, stream_width(lay), x_rg)
        decoder_layer(cx, x)
        if held:  # only what a ctx attribute holds (Tape.held): what outlives the layer's backward
            return sum(tape.held.values())
        if input_kept and x.storage in tape.saved:
            tape.saved[x.storage] = 0  # kept in place: its position before the mark stays
        return tape.nbytes_before_mark + tape.held_after_mark if at_mlp else tape.nbytes

    w, n = lay.spec.windowed_layers, lay.spec.num_layers
    if lay.spec.family.nope_layers:
        # Llama 4: rope layers (chunked: an explicit mask past attention_chunk_size) and NoPE ones (full attention)
        masked = w is not None and sdpa_masked(lay)
        if layer is not None:
            rope = lay.spec.uses_rope(layer)
            return saved(rope or not masked, rope=rope)
        r = lay.spec.rope_layers
        if worst:
            return max(saved(True), saved(not masked, rope=False)) if r < n else saved(True)
        return (r * saved(True) + (n - r) * saved(not masked, rope=False)) // n
    if lay.spec.layer_types or (lay.spec.dense_layers and worst):
        kinds = layer_kinds(lay.spec, [layer] if layer is not None else range(n))
        values = {kind: saved(True, moe=kind[0], linear=kind[1]) for kind in kinds}
        if worst:
            return max(values.values())
        return sum(count * values[kind] for kind, count in kinds.items()) // sum(kinds.values())
    if lay.spec.dense_layers and layer is not None:
        return saved(True, moe=layer >= lay.spec.dense_layers)
    if lay.spec.dense_layers:
        # DeepSeek's leading dense layers and the MoE ones: their mean, so that num_layers x this is the sum (a
        # moment inside one layer's backward takes that layer's own: `layer_kind_saved`)
        d = lay.spec.dense_layers
        return (d * saved(True, moe=False) + (n - d) * saved(True)) // n
    if w is None or w == n or not sdpa_masked(lay):
        return saved(True)
    # layers with and without the window differ (sdpa's explicit mask, repeat_kv copies): their mean, so that the
    # estimator's num_layers x this is the sum over the layer types
    return (w * saved(True) + (n - w) * saved(False)) // n


def layer_kinds(spec: ModelSpec, ids: list[int] | range) -> dict[tuple[bool, bool], int]:
    """How many of these decoder layers are of each kind: (sparse MLP, Gated DeltaNet)."""
    kinds: dict[tuple[bool, bool], int] = {}
    for i in ids:
        kind = (i >= spec.dense_layers, spec.is_linear_layer(i))
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def layers_saved(lay: Layout, ids: list[int] | range, **kw: object) -> int:
    """The sum of layer_saved over these decoder layers (one program per layer kind)."""
    if lay.spec.family.nope_layers:  # Llama 4's rope / NoPE layers: each its own kind
        return sum(layer_saved(lay, layer=i, **kw) for i in ids)  # type: ignore[arg-type]
    if lay.spec.layer_types:
        first = {}
        for i in ids:
            first.setdefault(layer_kinds(lay.spec, [i]).popitem()[0], []).append(i)
        return sum(len(same) * layer_saved(lay, layer=same[0], **kw) for same in first.values())  # type: ignore
    if not lay.spec.dense_layers:
        return len(ids) * layer_saved(lay, **kw)  # type: ignore[arg-type]
    dense = sum(i < lay.spec.dense_layers for i in ids)
    return (dense * layer_saved(lay, layer=0, **kw) if dense else 0) + \
        ((len(ids) - dense) * layer_saved(lay, layer=lay.spec.num_layers - 1, **kw) if len(ids) > dense else 0)


@dataclass(frozen=True, slots=True)
class HeadSaved:
    norm_bytes: int  # final norm's saved tensors
    logits_bytes: int  # (B, S, V) logits in the compute dtype
    logprobs_bytes: int  # fp32 log_softmax output saved by cross entropy
    upcast_bytes: int  # logits.float() copy when logits are half
    softcap_bytes: int  # gemma2 final_logit_softcapping: tanh output saved
    held_bytes: int = 0  # a 4-bit LM head's input, kept by MatMul4Bit's ctx attribute (in norm_bytes too)


def head_saved(lay: Layout, *, batch: int, seq: int) -> HeadSaved:
    s = lay.spec
    n = batch * seq
    tape = Tape()
    cx = _Ctx(tape, lay, n, batch, seq, lay.full, stream_width(lay))
    x = T(n * s.hidden_size, stream_width(lay), True)
    norm(cx, x, s.hidden_size, gemma=s.family.sandwich_norms or s.family.post_norms or s.family.norm_mul_fp32)
    norm_bytes = tape.nbytes
    # upcast_lmhead_output: the hook's fp32 copy is what the model returns (the half output is freed at once),
    # and the loss's logits.float() is then a no-op (transformers loss_utils ForCausalLMLoss)
    c = FP32 if lay.head_output_fp32 else lay.logits_width
    softcap = n * s.vocab_size * c if s.final_softcap else 0
    if s.family.shifted_loss:  # Qwen-1's own loss (Family.shifted_loss): the shifted contiguous copy in the logits'
        # dtype (none at batch 1: `logits[..., :-1, :]` of a (1, S, V) tensor is contiguous already, so
        # .contiguous() returns it), then under autocast cross_entropy's fp32 copy of it (CPU: cross_entropy_loss is
        # an fp32 autocast op; CUDA: log_softmax(dtype=float32) converts a bf16 input first, SoftMax.cpp
        # log_softmax) and fp32 log-probs; without autocast log_softmax runs in the logits' dtype
        shifted = c if batch > 1 else 0
        up = n * s.vocab_size * (shifted + (FP32 if lay.amp and c != FP32 else 0))
        return HeadSaved(norm_bytes=norm_bytes + (n * s.hidden_size * c if lay.full else 0),
                         logits_bytes=n * s.vocab_size * c, upcast_bytes=up,
                         logprobs_bytes=n * s.vocab_size * (FP32 if lay.amp else c), softcap_bytes=softcap)
    # a 4-bit head (LitGPT) keeping its input before bitsandbytes 0.43.2, as the decoder's 4-bit linears do
    held = n * s.hidden_size * lay.compute_width if lay.quantized_head and lay.linear4bit_keeps_input else 0
    # lm_head's input, saved for its weight's gradient
    return HeadSaved(norm_bytes=norm_bytes + (n * s.hidden_size * c if lay.head_trains else 0) + held,
                     logits_bytes=n * s.vocab_size * c, logprobs_bytes=n * s.vocab_size * FP32,
                     upcast_bytes=n * s.vocab_size * FP32 if c != FP32 else 0, softcap_bytes=softcap,
                     held_bytes=held)
