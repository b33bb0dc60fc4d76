"""The adapters a LoRA / QLoRA method trains on its frozen base (memplan.spec.train.Adapter), per wrapped linear:
trainable parameters, buffers, and the tape program of what each one saves for backward (peft 0.21).

LoRA's own branch is in activations.linear; DoRA adds to it, OFT replaces it (it rotates the linear's input).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from memplan.predict.tape import T, Tape
from memplan.spec.model import Linear
from memplan.spec.train import Adapter, Method, TrainConfig

if TYPE_CHECKING:
    from memplan.predict.layout import Layout

FP32 = 4
# peft OFTConfig.num_cayley_neumann_terms default (tuners/oft/config.py L170); LLaMA-Factory does not set it
NEUMANN_TERMS = 5


def oft_blocks(train: TrainConfig, in_features: int) -> tuple[int, int]:
    """(blocks r, block size b) of one OFT linear: OFTLayer.update_layer (peft tuners/oft/layer.py L421-437), with
    adjust_oft_parameters (L490-509) moving a size that does not divide in_features to the nearest divisor."""
    if train.oft_rank == 0:
        b = train.oft_block_size
        if in_features % b or b > in_features:
            b = _adjust(in_features, b)
        return in_features // b, b
    r = train.oft_rank
    if in_features % r or r > in_features:
        r = _adjust(in_features, r)
    return r, in_features // r


def _adjust(in_features: int, params: int) -> int:
    """peft OFTLayer.adjust_oft_parameters, line for line."""
    if params >= in_features:
        return in_features
    higher = params
    while higher <= in_features and in_features % higher != 0:
        higher += 1
    lower = params
    while lower > 1 and in_features % lower != 0:
        lower -= 1
    return lower if params - lower <= higher - params else higher


def params_per_linear(train: TrainConfig, lin: Linear) -> int:
    """Trainable elements one wrapped linear adds."""
    if train.adapter is Adapter.OFT:
        r, b = oft_blocks(train, lin.in_features)
        return r * (b * (b - 1) // 2)  # OFTRotationModule.weight (r, b(b-1)/2): the skew-symmetric upper triangle
    lora = train.lora_rank * (lin.in_features + lin.out_features)  # lora_A (r, in) + lora_B (out, r)
    # DoRA: lora_magnitude_vector (out,), DoraLinearLayer.update_layer (peft tuners/lora/dora.py L117)
    return lora + (lin.out_features if train.adapter is Adapter.DORA else 0)


def autocast_params_per_linear(train: TrainConfig, lin: Linear) -> int:
    """The part of them an autocast op casts (and caches) in forward: lora_A and lora_B (F.linear); DoRA's
    magnitude enters a division and OFT's weight an index_put (no autocast rule): none."""
    if train.adapter is Adapter.OFT:
        return 0
    return train.lora_rank * (lin.in_features + lin.out_features)


def buffer_bytes_per_linear(train: TrainConfig, lin: Linear) -> int:
    """OFTRotationModule's rows / cols: torch.triu_indices(b, b, 1), int64, registered buffers (L100-102)."""
    if train.adapter is not Adapter.OFT:
        return 0
    _, b = oft_blocks(train, lin.in_features)
    return 2 * (b * (b - 1) // 2) * 8


def trainable_shapes(train: TrainConfig, lin: Linear) -> list[tuple[int, int]]:
    """(rows, cols or 0) of each trainable tensor of one wrapped linear."""
    if train.adapter is Adapter.OFT:
        r, b = oft_blocks(train, lin.in_features)
        return [(r, b * (b - 1) // 2)]
    out = [(train.lora_rank, lin.in_features), (lin.out_features, train.lora_rank)]
    return out + ([(lin.out_features, 0)] if train.adapter is Adapter.DORA else [])


def oft_rotate(tp: Tape, x: T, train: TrainConfig, lin: Linear, *, amp: bool, width: int) -> T:
    """OFT Linear.forward (tuners/oft/layer.py L638-659) up to the base layer: x cast to the rotation's dtype
    (`_cast_input_dtype`), OFTRotationModule.forward (L245-284): R from the Cayley-Neumann series of the skew
    matrix (_cayley_batch L118-157: bmm(Q, Q), then bmm(Q_power, Q) for each further term), then
    einsum('...rk,rkc->...rc', x, R), a bmm that saves x (R trains) and R (iff x needs a gradient); under autocast
    bmm casts both to half: x's copy is a fresh (tokens x in) tensor, and every bmm's fp32 operands are cast (none
    is a leaf, so nothing is cached). Returns the rotated input, cast back to x's dtype for the base layer."""
    r, b = oft_blocks(train, lin.in_features)
    small = r * b * b
    xr = tp.cast(x, width)  # the rotation's dtype (fp32 unless pure bf16)
    xe = tp.cast(xr, 2) if amp else xr
    tp.save(xe)
    # the series' saved operands: fp32: Q, Q^2 and Q^3 (bmm(Q, Q), bmm(Q^2, Q), bmm(Q^3, Q)); under autocast Q is
    # cast once per operand (4 copies: bmm(Q, Q) casts it twice) beside Q^2 and Q^3, already half
    # (read with saved_tensors_hooks on a peft OFT linear: 6 half / 3 fp32 (r, b, b) tensors, +R when x.rg)
    assert NEUMANN_TERMS == 5, "the series' saved operands are counted for peft's default of 5 terms"
    n_saved = 6 if amp else 3
    for _ in range(n_saved + (1 if xe.rg else 0)):
        tp.save(T(small, 2 if amp else width, False))
    out = T(xe.numel, 2 if amp else width, True)  # einsum output; `.to(required_dtype)`, then `.to(prev dtype)`
    return tp.cast(tp.cast(out, width), x.width)


def dora_extra(tp: Tape, x_saved: T, base_out: T, lora_out: T, train: TrainConfig, lin: Linear, *, amp: bool,
               width: int, compute: int) -> None:
    """What DoRA saves beyond LoRA's branch (DoraLinearVariant.forward, tuners/lora/variants.py; DoraLinearLayer.
    forward, tuners/lora/dora.py L134-165), x already in the adapter dtype (lora/layer.py L161):
      get_lora_weight: lora_B(lora_A(eye(in))).T builds a graph whose only use is `lora_weight.detach()`: it is
        freed with its saved (in, in) identity once the linear's forward returns (a transient, not saved);
      weight_norm (detached, no grad: its full (out, in) weight copies are transients) enters
        mag_norm_scale = magnitude / weight_norm: div saves weight_norm (out,);
      (mag_norm_scale - 1) * base_result saves the base output (and the scale iff the base output needs grad);
      mag_norm_scale * lora_result saves both."""
    tp.save(T(lin.out_features, width, False))  # weight_norm (x.dtype)
    tp.save(T(lin.out_features, width, True))  # mag_norm_scale
    if base_out.rg:
        tp.save(T(lin.out_features, width, True))  # mag_norm_scale - 1
    tp.save(base_out, lora_out)


def dora_transient_bytes(lin: Linear, *, amp: bool, base_width: int, width: int, quantized: bool = False) -> int:
    """The no-grad weight DoRA materialises in each wrapped linear's forward (dora.py L134-145), at its high point,
    `weight + scaling * lora_weight` in get_weight_norm: lora_weight (in, out) in the adapter dtype (B's output,
    or its `.to(x.dtype)` copy, the half output then freed), the base weight's `weight.to(x.dtype)` copy (unless
    already that dtype), the scaled copy and the sum; plus the identity's half copy (autocast) that lora_A saved
    in get_lora_weight's graph, alive as long as lora_weight. A 4-bit base is first dequantized (peft
    utils/integrations.py dequantize_module_weight -> bitsandbytes dequantize_4bit, in the compute dtype): that copy
    is freed when `weight = weight.to(x.dtype)` rebinds the name, before the sum, so it adds nothing here
    (QLoRA + DoRA measured -0.99 % on the CPU allocator, tests/test_adapters.py)."""
    del quantized
    w = lin.in_features * lin.out_features
    eye = lin.in_features * lin.in_features * (2 if amp else width)
    return w * (width + (width if width != base_width else 0) + 2 * width) + eye


def pissa_init_bytes(lin: Linear, train: TrainConfig, *, base_width: int) -> int:
    """peft LoraLayer.pissa_init (tuners/lora/layer.py L429-462), once per target when the adapter is created:
    the base weight's fp32 copy (`weight.to(torch.float32)`, none if already fp32); then either the full SVD
    (pissa_iter -1: V (out, k), S (k,), Uh (k, in), k = min(out, in); LAPACK's own workspace is not counted) or
    svd_lowrank's (out | in, r) bases (small); at `weight.data - scaling * lora_B @ lora_A` the product and the
    difference, (out, in) fp32 each, beside the copy."""
    w, k = lin.in_features * lin.out_features, min(lin.in_features, lin.out_features)
    copy = w * FP32 if base_width != FP32 else 0
    if train.pissa_iter == -1:
        svd = FP32 * (lin.out_features * k + k + k * lin.in_features)
        return copy + max(svd, 2 * w * FP32)
    return copy + 2 * w * FP32


def pissa_load_bytes(lay: Layout) -> int:
    """PiSSA's initialisation of the largest target (pissa_init_bytes), a load-phase transient."""
    if not lay.train.pissa_init:
        return 0
    return max((pissa_init_bytes(lin, lay.train, base_width=lay.base_width)
                for lin in lay.spec.layer_linears() if lin.name in lay.lora_modules), default=0)


def forward_transient_bytes(lay: Layout) -> int:
    """The largest no-grad weight an adapter materialises inside one linear's forward (DoRA)."""
    if lay.train.adapter is not Adapter.DORA:
        return 0
    n, lw = lay.train.batch_size * lay.train.seq_len, lay.lora_width
    # beside it, the linear's base output (`result`) and its input's copy in the adapter dtype (lora/layer.py
    # Linear.forward L149, L161)
    quantized = lay.train.method is Method.QLORA
    return max((dora_transient_bytes(lin, amp=lay.amp, base_width=lay.base_width, width=lw, quantized=quantized)
                + n * lin.out_features * lay.compute_width + (n * lin.in_features * lw if lw != lay.stream_width
                                                              else 0)
                for lin in lay.spec.layer_linears() if lin.name in lay.lora_modules), default=0)
