"""The image forward of a Qwen-VL step, as tape programs (predict/tape.py): what the vision tower makes, saves and
hands to the decoder, for the visual input of memplan.spec.visual.

The tower is frozen (LLaMA-Factory's freeze_vision_tower / freeze_multi_modal_projector defaults), so its forward
records no graph unless its first output requires grad: transformers' enable_input_require_grads hooks every
sub-model's input embeddings (modeling_utils.py l.2147-2177), Qwen2-VL's and Qwen2.5-VL's vision patch_embed
among them (`_input_embed_layer = "patch_embed"`, modeling_qwen2_5_vl.py l.389, modeling_qwen2_vl.py l.647;
Qwen3-VL's tower names none). peft calls it on a model that checkpoints (peft_model.py l.184-185, l.728-735), as
LLaMA-Factory's LoRA runs are when init_adapter runs (patcher.py prepare_model_for_training first), and so does
transformers' own activation_checkpointing_enable (the hf stack). Then the whole frozen tower saves its
activations (LLaMA-Factory's checkpoint wrapper runs its blocks unchecked: no trainable parameter,
model_utils/checkpointing.py get_custom_gradient_checkpointing_func), alive until backward reaches the tower, the
step's very end; the hooked outputs are leaves the graph holds (the patch embedding's, the text embedding's).
Otherwise the tower is a transient at the start of forward. Either way its last hidden states, the merged image
features and their concatenated copy live until the model's forward returns (Qwen2_5_VLModel.forward l.1205-1222
keeps `mm_encoder_outputs` and `image_embeds`).
"""

from __future__ import annotations

from dataclasses import dataclass

from memplan.predict.layout import Layout
from memplan.predict.tape import DROPPED, MADE, T, Tape
from memplan.spec.stacks import Stack, stack_facts
from memplan.spec.visual import ImageGrid, feeds_images, fits_sequence, image_grid

FP32 = 4


@dataclass(frozen=True, slots=True, kw_only=True)
class VisionCost:
    """Bytes of the image forward (all 0 for a text-only step)."""

    inputs_bytes: int = 0  # the collator's pixel_values, image_grid_thw, (3, B, S) position ids: alive all step
    saved_bytes: int = 0  # what the tower's graph keeps for backward (a hooked patch embedding), to backward's end
    kept_bytes: int = 0  # alive until the model's forward returns: last hidden states, merged features, their copy
    peak_bytes: int = 0  # the tower forward's own high point above what was alive before it
    tokens: int = 0  # visual tokens in each sample
    note: str = ""


def hooked(lay: Layout) -> bool:
    """enable_input_require_grads has run (see the module docstring): LoRA under checkpointing (peft), or any
    checkpointing run of the hf stack (activation_checkpointing_enable). Its hook makes the text embedding's output
    a leaf that requires grad, and the tower's patch embedding's where the tower names patch_embed as its input
    embeddings (Qwen2-VL, Qwen2.5-VL): then the frozen tower records its graph."""
    tr = lay.train
    return tr.checkpointing and (tr.is_lora or stack_facts(tr.stack).name is not Stack.LLAMAFACTORY)


def tower_records(lay: Layout) -> bool:
    return hooked(lay) and lay.spec.family.vision in ("qwen2_vl", "qwen2_5_vl")


def vision_cost(lay: Layout) -> VisionCost:
    """The image forward's bytes for `lay`'s visual input (VisionCost() for text-only steps)."""
    spec, tr = lay.spec, lay.train
    vis = tr.visual
    if vis is None or not feeds_images(spec.family.vision, vis):
        return VisionCost()
    vc = spec.config.get("vision_config") or {}
    grid = image_grid(spec.family.vision, vc, vis)
    vis = fits_sequence(vis, grid, tr.seq_len)
    n = tr.batch_size * vis.images  # images in the micro-batch
    width = vc.get("in_channels", 3) * vc.get("temporal_patch_size", 2) * (grid.patches and _patch(vc, spec)) ** 2
    b, s = tr.batch_size, tr.seq_len
    # pixel_values (patches, C x T x P x P) fp32 from the image processor, image_grid_thw (n, 3) int64, and the
    # collator's M-RoPE position ids (3, B, S) int64 in place of the text path's arange(S) (estimator._rope_bytes)
    inputs = n * grid.patches * width * FP32 + n * 3 * 8 + 3 * b * s * 8 - 8 * s
    saved, kept, peak = _tower(lay, grid, n)
    return VisionCost(inputs_bytes=inputs, saved_bytes=saved, kept_bytes=kept, peak_bytes=peak, tokens=grid.tokens,
                      note=f"images: {vis.describe()}, {grid.tokens} visual tokens each ({grid.h} x {grid.w} "
                           "patches)" + ("; the frozen tower's activations saved (its patch embedding hooked by "
                                         "enable_input_require_grads)" if tower_records(lay) else ""))


def _patch(vc: dict, spec: object) -> int:
    from memplan.spec.visual import patch_size

    return patch_size(spec.family.vision, vc)  # type: ignore[attr-defined]


def _rms(tp: Tape, x: T, rows: int) -> T:
    """Qwen2_5_VLRMSNorm (l.65-82, Llama's): x.float(), pow saves it, rsqrt saves its result, weight * x.to(dtype)."""
    xf = tp.cast(x, FP32)
    tp.saving_input(xf)
    rs = tp.saving_output(T(rows, FP32, xf.rg))
    xr = tp.mul(xf, rs)
    hn = tp.cast(xr, x.width)
    return tp.mul(T(0, x.width, False, param=True), hn, width=x.width)


def _layer_norm(tp: Tape, x: T, rows: int) -> T:
    """nn.LayerNorm (Qwen2-VL / Qwen3-VL towers): native_layer_norm saves its input, mean and rstd (fp32 per row)."""
    if x.rg:
        tp.save(x, T(rows, FP32, False), T(rows, FP32, False))
    return tp.new(x)


def _rope(tp: Tape, x: T, cos: T, sin: T, half: int) -> T:
    """apply_rotary_pos_emb_vision (l.216-227): q.float(); q * cos + rotate_half(q) * sin (a neg and a cat); back to
    the input dtype."""
    xf = tp.cast(x, FP32)
    a = tp.mul(xf, cos)
    neg = tp.new(xf, numel=xf.numel // 2)
    rot = tp.new(xf)  # torch.cat((-x2, x1))
    del neg
    b = tp.mul(rot, sin)
    del rot
    out = tp.new(a, rg=a.rg or b.rg)  # the sum
    del a, b
    return tp.cast(out, x.width)


def _block(tp: Tape, h: T, p: int, e: int, i: int, heads: int, kind: str, cos: T, sin: T) -> T:
    """One vision block (Qwen2_5_VLVisionBlock l.342-370): x + attn(norm1(x)); x + mlp(norm2(x)). Attention per
    cu_seqlens chunk through sdpa (saves q, k, v, its output and logsumexp; the chunks' bytes add up to the whole
    image's), the MLP gated SiLU (2.5) or fc1 -> act -> fc2 (Qwen2-VL quick_gelu, Qwen3-VL gelu_pytorch_tanh)."""
    norm = _rms if kind == "qwen2_5_vl" else _layer_norm
    c = h.width
    n1 = norm(tp, h, p)
    qkv = tp.linear(n1, e, 3 * e, w_trains=False, width=c)
    del n1
    q, k, v = qkv.view(p * e), qkv.view(p * e), qkv.view(p * e)
    q2, k2 = _rope(tp, q, cos, sin, e // 2), _rope(tp, k, cos, sin, e // 2)
    del q, k
    out = T(p * e, c, q2.rg or k2.rg or v.rg)  # sdpa per chunk, outputs (1, heads, P_i, hd)
    if out.rg:
        tp.save(q2, k2, v, out, T(heads * p, FP32, False))  # + logsumexp (1, heads, P_i) fp32
    del q2, k2, v, qkv
    merged = tp.new(out)  # transpose(1, 2).contiguous() per chunk, then torch.cat
    del out
    o = tp.linear(merged, e, e, w_trains=False, width=c)
    del merged
    h1 = tp.new(h, rg=h.rg or o.rg)
    del o
    n2 = norm(tp, h1, p)
    if kind == "qwen2_5_vl":  # Qwen2_5_VLMLP: down(silu(gate(x)) * up(x)) (l.85-96)
        g = tp.linear(n2, e, i, w_trains=False, width=c)
        a = tp.saving_input(g)
        del g
        u = tp.linear(n2, e, i, w_trains=False, width=c)
        m = tp.mul(a, u)
        del a, u
    elif kind == "qwen2_vl":  # VisionMlp fc1 -> QuickGELU `x * sigmoid(1.702 * x)` (activations.py) -> fc2
        f = tp.linear(n2, e, i, w_trains=False, width=c)
        scaled = tp.new(f, rg=f.rg)
        sig = tp.saving_output(scaled)
        del scaled
        m = tp.mul(f, sig)
        del f, sig
    else:  # Qwen3VLVisionMLP: linear_fc1 -> gelu_pytorch_tanh (saves its input) -> linear_fc2
        f = tp.linear(n2, e, i, w_trains=False, width=c)
        m = tp.saving_input(f)
        del f
    del n2
    d = tp.linear(m, i, e, w_trains=False, width=c)
    del m
    out_h = tp.new(h1, rg=h1.rg or d.rg)
    return out_h


def _tower(lay: Layout, grid: ImageGrid, images: int) -> tuple[int, int, int]:
    """(saved, kept, peak) bytes of the tower's forward on `images` images of `grid` (module docstring)."""
    spec = lay.spec
    kind = spec.family.vision
    vc = spec.config.get("vision_config") or {}
    if kind == "qwen2_vl":  # Qwen2VLVisionConfig: embed_dim, mlp_ratio; merger out = hidden_size
        e, i, out_h = vc.get("embed_dim", 1280), int(vc.get("embed_dim", 1280) * vc.get("mlp_ratio", 4)), \
            vc.get("hidden_size", 3584)
    else:
        e = vc.get("hidden_size", 3584 if kind == "qwen2_5_vl" else 1152)
        i = vc.get("intermediate_size", 3420 if kind == "qwen2_5_vl" else 4304)
        out_h = vc.get("out_hidden_size", 3584)
    heads, depth, merge = vc.get("num_heads", 16), vc.get("depth", 32 if kind != "qwen3_vl" else 27), grid.merge
    hd = e // heads
    p = images * grid.patches
    c = lay.kept_width  # the frozen tower in its load dtype
    rg = tower_records(lay)
    # the hf stack checkpoints the vision blocks too (activation_checkpointing_enable reaches every
    # GradientCheckpointingLayer): each keeps only its input; LLaMA-Factory's wrapper skips frozen blocks
    per_block = rg and stack_facts(lay.train.stack).name is not Stack.LLAMAFACTORY
    tp = Tape()
    b, s, h = lay.train.batch_size, lay.train.seq_len, spec.hidden_size
    with tp.recording() as rec:
        # the text embedding's output (B, S, H), made before the tower runs (Qwen2_5_VLModel.forward l.1199); hooked,
        # it is a leaf the graph holds (masked_scatter makes the decoder's input from it)
        text = T(b * s * h, lay.stream_width, hooked(lay))
        if hooked(lay):
            tp.save(text)
        x0 = T(p * e, c, rg)  # PatchEmbed's Conv3d output (the hooked leaf: the graph holds it)
        if rg:
            tp.save(x0)
        x = tp.new(x0) if kind == "qwen2_5_vl" else x0  # the window permutation's gather (l.422-426)
        # rotary cos / sin (P, head_dim) fp32 (Qwen2_5_VLVisionRotaryEmbedding l.166-182; the window gather of
        # each), saved by every block's q * cos and k * cos when the graph records
        cos, sin = T(p * hd, FP32, False), T(p * hd, FP32, False)
        if kind == "qwen3_vl":  # the learned position embeddings added to the patches (l.694-695)
            x = tp.new(x0)
        for _ in range(depth):
            if per_block:  # torch.utils.checkpoint (non-reentrant): the block's input and rotary tables kept
                tp.save(x, cos, sin)
                inner = Tape()
                inner.lifetimes = tp.lifetimes
                x = _block(inner, x, p, e, i, heads, kind, cos, sin)
            else:
                x = _block(tp, x, p, e, i, heads, kind, cos, sin)
        # the merger (Qwen2_5_VLPatchMerger l.185-198): norm, view (P / m^2, m^2 E), Linear, GELU (saves its
        # input), Linear; Qwen2.5-VL then gathers back out of window order
        norm = _rms if kind == "qwen2_5_vl" else _layer_norm
        nq = norm(tp, x, p)
        f1 = tp.linear(nq, e * merge * merge, e * merge * merge, w_trains=False, width=c)
        del nq
        g = tp.saving_input(f1)
        del f1
        merged = tp.linear(g, e * merge * merge, out_h, w_trains=False, width=c)
        del g
        if kind == "qwen2_5_vl":
            order = T(p // (merge * merge), 8, False)  # argsort(window_index), saved by the gather
            if merged.rg:
                tp.save(order)
            merged = tp.new(merged)
        embeds = tp.new(merged)  # torch.cat(pooler_output) (Qwen2_5_VLModel.forward l.1217)
        mask = T(b * s, 1, False)  # input_ids == image_token_id, (B, S, 1) bool
        if embeds.rg:
            tp.save(mask)  # masked_scatter's backward reads it
        kept = [x, merged, embeds]
    saved = sum(tp.saved.values())
    live = peak = 0
    held: set[int] = set()
    for kind_, key, nbytes in rec.events:
        if kind_ == MADE:
            live += nbytes
            held.add(key)
        elif kind_ == DROPPED and key in held and key not in tp.saved:
            live -= nbytes
            held.discard(key)
        peak = max(peak, live)
    kept_bytes = sum(t.storage_bytes for t in {id(t): t for t in kept}.values() if t.storage not in tp.saved)
    if kind == "qwen3_vl":  # the deepstack mergers' outputs (Qwen3VLVisionModel.forward l.711-722), (tokens, out)
        # each, kept with the tower's output until the decoder's first layers have added them
        kept_bytes += len(vc.get("deepstack_visual_indexes", (8, 16, 24))) * p // (merge * merge) * out_h * c
    del kept, x, merged, embeds, mask, cos, sin, x0, text
    return saved, kept_bytes, peak

