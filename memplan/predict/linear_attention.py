"""Qwen3.5's Gated DeltaNet layer as a tape program (activations.attention runs it for a linear-attention layer):
what transformers 5.24's Qwen3_5GatedDeltaNet and torch_chunk_gated_delta_rule save for backward when torch's
fallbacks run them (CPU, or a GPU without the fla / causal-conv1d kernels)."""

from __future__ import annotations

from memplan.predict.activations import FP32, _Ctx, linear
from memplan.predict.tape import T, param


def _mm(cx: _Ctx, a: T, b: T, out_numel: int, *, copy_a: bool = False, copy_b: bool = False) -> T:
    """torch.matmul inside the delta rule: under autocast both operands cast to half (fresh copies of fp32 tensors
    that are no leaves: autocast caches only leaf weights), each saved for the other's gradient (mm: `self` if
    `mat2` requires grad and the other way round). copy_a / copy_b: an operand whose strides cannot fold into bmm's
    batch, which matmul's reshape copies (the copy is what it saves)."""
    tp = cx.tape
    if cx.lay.amp:
        a, b = tp.cast(a, 2), tp.cast(b, 2)
    else:
        a, b = tp.new(a) if copy_a else a, tp.new(b) if copy_b else b
    if b.rg:
        tp.save(a)
    if a.rg:
        tp.save(b)
    return T(out_numel, 2 if cx.lay.amp else max(a.width, b.width), a.rg or b.rg)


def gated_deltanet(cx: _Ctx, h: T) -> T:
    """Qwen3_5GatedDeltaNet.forward (modeling_qwen3_5.py l.550-656) without a cache, as torch's fallbacks run it
    (no causal-conv1d / fla kernels: CPU, or a GPU without them): the four input projections, causal_conv1d_fn
    (l.256-277), beta = sigmoid(b), g = -exp(A_log) * softplus(a + dt_bias), torch_chunk_gated_delta_rule
    (`_delta_rule`), the gated RMSNorm (Qwen3_5RMSNormGated l.204-220) and out_proj."""
    s, tp, lay = cx.lay.spec, cx.tape, cx.lay
    n, hid, nv, dv = cx.tokens, s.hidden_size, s.gdn_value_heads, s.gdn_value_dim
    conv = s.gdn_conv_dim
    qkv = linear(cx, h, "in_proj_qkv", hid, conv)
    z = linear(cx, h, "in_proj_z", hid, nv * dv)
    b = linear(cx, h, "in_proj_b", hid, nv)
    a = linear(cx, h, "in_proj_a", hid, nv)
    # causal_conv1d_fn: `F.conv1d(hidden_states.to(weight.dtype), weight.unsqueeze(1), padding=kernel - 1,
    # groups=conv_dim)[:, :, :seq_len]`, then silu, `.to(hidden_states.dtype)`. conv1d is an autocast op (half
    # input copy; the weight's `squeeze(1).unsqueeze(1)` is a view, no leaf, so cast afresh per call) and saves its
    # input and weight (one derivative formula for both); silu saves its input, the (B, C, S + kernel - 1) output
    w_width = lay.trainable_width if cx.trains else lay.base_width
    xc = tp.cast(qkv, w_width)
    weight = param(conv * s.gdn_conv, w_width, cx.trains)
    if cx.amp:
        xc = tp.cast(xc, 2)
        weight = T(weight.numel, 2, weight.rg) if w_width != 2 else weight
    rg = xc.rg or cx.trains
    if rg:
        tp.save(xc, weight)
    padded = T(cx.batch * conv * (cx.seq + s.gdn_conv - 1), 2 if cx.amp else max(xc.width, w_width), rg)
    act = tp.cast(tp.saving_input(padded.view(n * conv)), qkv.width)  # silu's input: a view of `padded`
    act = T(n * conv, act.width, rg)
    beta = tp.saving_output(b)  # b.sigmoid()
    # g: A_log.float().exp() (saves its result), negated; a.float() + dt_bias, softplus (saves its input)
    a_log = tp.saving_output(param(nv, FP32, cx.trains)) if cx.trains else T(nv, FP32, False)
    neg = tp.new(a_log)
    shifted = T(n * nv, FP32, a.rg or cx.trains)
    g = tp.mul(neg, tp.saving_input(shifted))
    core = _delta_rule(cx, act, g, beta)
    # Qwen3_5RMSNormGated(core (tokens x heads, dv), z): x.float(), pow (saves), rsqrt (saves), weight *
    # x.to(input_dtype), times silu(gate.float()) (saves its input, mul both sides), `.to(input_dtype)`
    xf = tp.cast(core, FP32)
    tp.saving_input(xf)
    rs = tp.saving_output(T(n * nv, FP32, xf.rg))
    hb = tp.cast(tp.mul(xf, rs), core.width)
    w = param(dv, cx.norm_width(), cx.trains)
    hw = tp.mul(w, hb, width=max(w.width, hb.width))
    out = tp.cast(tp.mul(hw, tp.saving_input(tp.cast(z, FP32))), core.width)
    return linear(cx, out, "out_proj", nv * dv, hid)


def _delta_rule(cx: _Ctx, act: T, g: T, beta: T) -> T:
    """torch_chunk_gated_delta_rule (modeling_qwen3_5.py l.287-426) on the conv output's q / k / v views, as
    autograd records it: repeat_interleave of q / k to the value heads, fp32 contiguous copies, l2norm (x * x and
    x * rsqrt(...) save x and the fp32 rsqrt), pads to whole chunks of 64, beta products, the (B, H, chunks, 64, 64)
    decays (masked_fill saves the bool mask, exp its result), the two triangular solves (each saves the matrix and
    its result), the decay products, then per chunk the recurrent state's matmuls: each state (B, H, dk, dv) and
    v_new (B, H, 64, dv) saved, half copies of every operand under autocast."""
    s, tp = cx.lay.spec, cx.tape
    bsz, nv, dk, dv, c = cx.batch, s.gdn_value_heads, s.gdn_key_dim, s.gdn_value_dim, 64
    chunks = -(-cx.seq // c)
    rows = bsz * nv * chunks * c  # padded (B, H, S_pad) positions
    rg = act.rg
    # `x.transpose(1, 2).to(torch.float32, memory_format=torch.contiguous_format)` copies a half x; an fp32 x it
    # returns as is (Tensor.to aliases when the dtype matches and the suggested memory format is already
    # contiguous), still in the (B, S, H, d) layout: with no repeat_interleave (as many key as value heads) a view
    # of the conv output. F.pad to whole chunks then makes contiguous copies, but with no padding
    # (S a multiple of 64) it clones in that layout, so each chunk matmul copies its operands (reshape to bmm)
    strided = act.width == FP32 and cx.seq % c == 0
    # such a (B, H, chunks, 64, d) operand folds into bmm's (B x H x chunks) batch as a view only with one sample
    # and one chunk; a chunk's (B, H, 64, d) slice only with one sample
    whole, per_chunk = strided and (bsz > 1 or chunks > 1), strided and bsz > 1
    if act.width == FP32 and s.gdn_key_heads == nv:
        q, k = act.view(cx.tokens * nv * dk), act.view(cx.tokens * nv * dk)
    else:
        q, k = T(cx.tokens * nv * dk, FP32, rg), T(cx.tokens * nv * dk, FP32, rg)

    def l2norm(x: T) -> T:
        tp.saving_input(x)  # x * x
        inv = tp.saving_output(T(x.numel // dk, FP32, x.rg))  # rsqrt(sum + eps)
        return tp.mul(x, inv)

    q, k = l2norm(q), l2norm(k)
    # `query * scaling`, then F.pad of q, k, v (B, H, S_pad, d), beta and decay (B, H, S_pad): fresh tensors
    q_p, k_p, v_p = T(rows * dk, FP32, rg), T(rows * dk, FP32, rg), T(rows * dv, FP32, rg)
    beta_p, decay = T(rows, FP32, beta.rg), T(rows, FP32, g.rg)
    v_beta, k_beta = tp.mul(v_p, beta_p), tp.mul(k_p, beta_p)
    pairs = bsz * nv * chunks * c * c
    if decay.rg:
        tp.save(T(c * c, 1, False))  # masked_fill's strictly-upper bool mask
    pd = tp.saving_output(T(pairs, FP32, decay.rg))  # exp of the masked pairwise decays
    ut = tp.mul(_mm(cx, k_beta, k_p, pairs, copy_a=whole, copy_b=whole), pd)
    intra = tp.mul(_mm(cx, q_p, k_p, pairs, copy_a=whole, copy_b=whole), pd)
    dkb = tp.mul(k_beta, tp.saving_output(T(rows, FP32, decay.rg)))  # k_beta * cum_decay.exp()
    solved = []
    for rhs, d in ((v_beta, dv), (dkb, dk)):  # linalg.solve_triangular saves the matrix and its result
        x = T(rows * d, FP32, ut.rg or rhs.rg)
        if x.rg:
            tp.save(ut, x)
        solved.append(x)
    new_values, k_cumdecay = solved
    query = tp.mul(q_p, tp.saving_output(T(rows, FP32, decay.rg)))  # q * cum_decay.exp()
    key = tp.mul(k_p, tp.saving_output(T(rows, FP32, decay.rg)))  # k * (cum_decay[-1] - cum_decay).exp()
    chunk_decay = tp.saving_output(T(bsz * nv * chunks, FP32, decay.rg))
    state = T(bsz * nv * dk * dv, FP32, False)  # zeros
    per = bsz * nv * c
    for _ in range(chunks):
        v_new = T(per * dv, FP32, True)  # new_values[:, :, i] - k_cumdecay[:, :, i] @ state
        _mm(cx, k_cumdecay.view(per * dk), state, per * dv)  # column-major (LAPACK's result): folds into bmm
        _mm(cx, query.view(per * dk), state, per * dv, copy_a=per_chunk)
        v_new.rg = new_values.rg or k_cumdecay.rg or state.rg
        _mm(cx, intra.view(per * c), v_new, per * dv)
        tp.mul(state, chunk_decay.view(bsz * nv))
        _mm(cx, key.view(per * dk), v_new, bsz * nv * dk * dv, copy_a=per_chunk)
        state = T(bsz * nv * dk * dv, FP32, True)
    # core_attn_out[:, :, :S].transpose(1, 2).to(initial_dtype, contiguous): (B, S, H, dv) in q's dtype
    return T(cx.tokens * nv * dv, act.width, rg)
