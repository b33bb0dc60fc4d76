"""Model states: weights (incl. quantized storage), gradients, optimizer states and the optimizer step's temporaries.

Bytes-per-parameter sums are written out next to each formula (DeepSpeed's habit).
"""

from __future__ import annotations

from dataclasses import dataclass

from memplan.predict import adapters
from memplan.predict.layout import Layout
from memplan.predict.optim_states import fused_step_bytes, largest_grad, special_states
from memplan.spec.optimizers import Projection, States, facts
from memplan.spec.prequantized import PackedQuant
from memplan.spec.train import Adapter, Method, QuantMethod, TrainConfig

NF4_BLOCK = 64  # bitsandbytes NF4 blocksize; absmax quantized to 8 bits (double quant), 2nd level fp32 per 256
HQQ_GROUP = 64  # transformers HqqConfig group_size default (LLaMA-Factory sets none)
OPT8_BLOCK = 256  # bitsandbytes 8-bit optimizer state blocksize (fp32 absmax per block)
OPT8_MIN_SIZE = 4096  # bnb keeps 32-bit states for tensors smaller than min_8bit_size


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelStates:
    weights_bytes: int
    trainable_params: int
    frozen_params: int
    quantized_params: int
    gradients_bytes: int
    optimizer_states_bytes: int
    optimizer_step_bytes: int  # temporaries inside optimizer.step()
    autocast_cache_bytes: int  # half copies of fp32 weights cast by autocast during forward
    autocast_layer_bytes: int  # the part of it one decoder layer casts (checkpointing frees and recasts it)


def quantized_bytes(numel: int, train: TrainConfig, out_features_total: int, tensors: int = 1) -> int:
    """Storage of `numel` quantized decoder-linear weights (`tensors` matrices, `out_features_total` rows in all)
    under the config's quantization_method and bits, as each library stores them on the GPU."""
    bits, how = train.quant_bits, train.quant_method
    if how is QuantMethod.HQQ:
        # hqq 0.2.8 core/quantize.py Quantizer: W reshaped (group_size, numel / group_size) (axis=0, LLaMA-Factory's
        # HqqConfig) and packed by bit_to_packing (L40-48): 8/6/5-bit one uint8 each (no 5/6-bit packing), 4-bit
        # two per uint8, 2-bit four, 1-bit eight, 3-bit ten per int32 with the 64 rows padded to 70 (bitpack.py
        # pack_3bit_32); scale and zero per group of 64, fp16 on the GPU (core/optimize.py L152-157, quant_zero /
        # quant_scale off): 4 B / 64
        groups = -(-numel // HQQ_GROUP)
        packed = groups * 28 if bits == 3 else numel * {8: 8, 6: 8, 5: 8, 4: 4, 2: 2, 1: 1}[bits] // 8
        return packed + 4 * groups
    if how is QuantMethod.EETQ:
        # transformers integrations/eetq.py EetqLinear: int8 weight (in, out) + fp16 weight_scales (out,)
        return numel + 2 * out_features_total
    if bits == 4:
        # bitsandbytes Params4bit (NF4 or FP4: the same packing): 0.5 B/param + an absmax per block of 64; double
        # quant (compress_statistics): each absmax 1 B + an fp32 absmax per 256 of them, else each fp32
        # (bitsandbytes functional.py quantize_4bit: `absmax` fp32, quantize_blockwise(absmax, blocksize=256))
        # Per tensor, its QuantState keeps the 4-bit code (16 fp32 = 64 B) and, double-quantized, the nested
        # state's dynamic map (256 fp32 = 1 KiB) and its fp32 offset: measured to the byte on CPU (tests/test_lf_keys)
        blocks = -(-numel // NF4_BLOCK)
        if not train.double_quant:
            return numel // 2 + 4 * blocks + 64 * tensors
        return numel // 2 + blocks + 4 * -(-blocks // 256) + (64 + 1024 + 4) * tensors
    # LLM.int8: 1 B/param + fp32 row scale (SCB) per output feature
    return numel + 4 * out_features_total


def packed_bytes(packed: PackedQuant, shapes: list[tuple[int, int, int]], width: int) -> int:
    """Storage of a pre-quantized checkpoint's linears, `shapes` (in_features, out_features, how many), as each
    library registers its buffers; `width` the model dtype (AQLM's codebooks and scales are in it)."""
    b, total = packed.bits, 0
    for n_in, n_out, count in shapes:
        g = n_in if packed.group_size <= 0 else packed.group_size  # -1: one group over all inputs
        groups = -(-n_in // g)
        if packed.method == "awq":
            # gptqmodel AWQuantLinear (nn_modules/qlinear/__init__.py L1769-1788): qweight int32 (in, out x b / 32),
            # qzeros int32 (in // g, out x b / 32), scales fp16 (in // g, out): 4-bit g128 = 0.5 + 2.5 / 128 B/param
            cols = -(-n_out * b // 32)
            one = 4 * n_in * cols + 4 * (n_in // g) * cols + 2 * (n_in // g) * n_out
        elif packed.method == "gptq":
            # gptqmodel PackedGroupedQuantLinear (L933-955): qweight int32 (in x b / 32, out), qzeros int32
            # (ceil(in / g), out x b / 32), scales fp16 (ceil(in / g), out), g_idx int32 (in,)
            one = 4 * -(-n_in * b // 32) * n_out + 4 * groups * -(-n_out * b // 32) + 2 * groups * n_out + 4 * n_in
        else:
            # aqlm 1.1.7 QuantizedLinear (inference.py L39-55): codebooks (num_codebooks, 2^nbits, out_group,
            # in_group) and scales (out / out_group,) in the model dtype; codes (out / out_group, in / in_group,
            # num_codebooks) in the narrowest int holding nbits (utils.py get_int_dtype: int8 <= 8, int16 <= 16)
            code = 1 if packed.nbits_per_codebook <= 8 else 2 if packed.nbits_per_codebook <= 16 else 4
            og, ig = packed.out_group_size, packed.in_group_size
            one = (packed.num_codebooks * 2 ** packed.nbits_per_codebook * og * ig * width
                   + (n_out // og) * (n_in // ig) * packed.num_codebooks * code + (n_out // og) * width)
        total += one * count
    return total


def model_states(lay: Layout) -> ModelStates:
    s, tr = lay.spec, lay.train
    total = s.num_parameters
    linears = s.layer_linears()
    # autocast casts every fp32 argument of F.linear, the bias too (aten/src/ATen/autocast_mode.cpp cached_cast):
    # spec.linear_params_total / top_linear_params
    expert_params = sum(lin.in_features * lin.out_features for lin in s.mlp_linears()) * s.num_experts \
        if s.is_moe else 0  # grouped matmul: no autocast copies (one MoE layer's)
    # rotary inv_freq and original_inv_freq, fp32 (rot_dim / 2) each: transformers 5 LlamaRotaryEmbedding.__init__
    # registers both (`self.original_inv_freq = nn.Buffer(inv_freq.clone(), persistent=False)`)
    buffers = 2 * (s.rotary_dim // 2) * 4
    buffers += s.num_layers * s.family.layer_buffer_elems * lay.load_width  # Qwen-1's logn_tensor (Family)
    # DeepseekV3TopkRouter: the fp32 e_score_correction_bias buffer (E,) and its fp32 weight (E, H), kept fp32
    # whatever the load dtype (_keep_in_fp32_modules_strict, modeling_deepseek_v3.py l.131, l.551)
    # (DeepseekV2TopkRouter l.92: created fp32, which the built model keeps)
    router_fp32 = s.moe_layers * s.num_experts * s.hidden_size if s.family.router != "softmax" else 0
    buffers += s.moe_layers * s.num_experts * 4 if s.family.router == "sigmoid" else 0
    quantized = 0
    # TrainConfig.extra_modules: freeze trains them in place, LoRA a copy of each beside the frozen original (peft
    # ModulesToSaveWrapper deep-copies the module), both in the trainable dtype (LLaMA-Factory's
    # cast_trainable_params_to_fp32, adapter.py L286-288: fp32 unless pure_bf16). A trained fp32 LM head is an
    # autocast leaf: its half copy is cached for the forward (aten/src/ATen/autocast_mode.cpp cached_cast)
    extra = lay.extra_params()
    head_cast = s.vocab_size * s.hidden_size if lay.head_trains and not lay.full and lay.trainable_width == 4 else 0
    vision = s.vision_params  # a VL tower: frozen, kept in the load dtype (memplan.build.model.build_model)
    if tr.method is Method.FULL:
        trainable = total - vision
        weights = trainable * lay.trainable_width + router_fp32 * (4 - lay.trainable_width) + \
            vision * lay.load_width  # the tower as loaded (spec.dtypes)
        ac_layer = s.top_linear_params()
        ac_params = s.linear_params_total() + s.vocab_size * s.hidden_size  # all linears incl. lm_head
    elif tr.method is Method.FREEZE:
        # the trained layers and the extra modules (freeze_extra_modules), cast to the trainable dtype in place
        trainable = (s.params_of_layers(lay.trained_ids) if "all" in tr.trainable_modules else
                     sum(lay.trained_params_of_layer(i) for i in lay.trained_ids)) + extra
        weights = trainable * lay.trainable_width + (total - trainable) * lay.base_width
        # the trained layers are the top ones (DeepSeek: MoE layers with the shared experts' Linears)
        ac_layer = s.top_linear_params() if lay.trainable_width == 4 else 0
        if "all" not in tr.trainable_modules and ac_layer:  # only the trained parts' Linears are autocast leaves
            attn = sum(lin.params for lin in s.attention_linears())
            ac_layer = (attn if lay.part_trains("self_attn") else 0) + \
                (ac_layer - attn if lay.part_trains("mlp") else 0)
        ac_params = ac_layer * lay.trainable_layers + head_cast
    else:
        trainable = lay.lora_params_total()
        ac_layer = lay.lora_params_per_layer() if lay.lora_width == 4 else 0
        if tr.adapter is not Adapter.LORA:  # DoRA's magnitude, OFT's weight: no autocast op casts them
            ac_layer = sum(adapters.autocast_params_per_linear(tr, lin) for lin in linears
                           if lin.name in lay.lora_modules) if lay.lora_width == 4 else 0
            buffers += len(lay.adapted_ids) * sum(adapters.buffer_bytes_per_linear(tr, lin) for lin in linears
                                                  if lin.name in lay.lora_modules)
        ac_params = ac_layer * len(lay.adapted_ids) if tr.adapter is not Adapter.LORA or not ac_layer else trainable
        ac_params += head_cast
        if tr.method is Method.QLORA:
            # decoder linears (all, or the adapted ones where the stack quantizes only those); bnb through
            # transformers skips lm_head, a stack may quantize it too (spec.stacks)
            # each layer's own Linears (Qwen3.5's kinds differ), counted once per layer that has them
            per_layer = [s.layer_linears(i) for i in range(s.num_layers)] if s.layer_types else \
                [linears] * s.num_layers
            qall = [lin for lins in per_layer for lin in lins if lay.quantized(lin.name)]
            qlin = [lin for lin in linears if lay.quantized(lin.name)]
            quantized = sum(lin.in_features * lin.out_features for lin in qall) + \
                expert_params * (s.moe_layers or s.num_layers)
            outs = sum(lin.out_features for lin in qall)
            if lay.quantized_head:
                quantized += s.vocab_size * s.hidden_size
                outs += s.vocab_size
        # the rest (embedding, norms, LM head) at kept_width: the base dtype, or fp32 where the stack upcasts
        if s.packed is not None:  # a pre-quantized checkpoint's own storage (memplan.spec.prequantized)
            stored = packed_bytes(s.packed, [(lin.in_features, lin.out_features, s.num_layers) for lin in qlin],
                                  lay.base_width)
        else:
            stored = quantized_bytes(quantized, tr, outs, len(qall) + lay.quantized_head) if quantized else 0
        weights = (total - quantized) * lay.kept_width + trainable * lay.lora_width + stored + \
            router_fp32 * (4 - lay.kept_width) + extra * lay.trainable_width
        trainable += extra
    if lay.norms_fp32:  # upcast_layernorm: the frozen norms' half weights become fp32 (trained ones are already)
        frozen_layers = s.num_layers - (lay.trainable_layers if tr.method is Method.FREEZE else 0)
        frozen_width = lay.base_width if tr.method is Method.FREEZE else lay.kept_width
        weights += (frozen_layers * _norm_params(lay) + s.hidden_size) * (4 - frozen_width) if not lay.full else 0
    if not lay.amp:
        ac_params = ac_layer = 0
    grads = trainable * (lay.trainable_width if not lay.train.is_lora else lay.lora_width)
    if lay.train.is_lora and extra:  # the copies' gradients in their own dtype
        grads += extra * (lay.trainable_width - lay.lora_width)
    width = grads // trainable if trainable else 4
    if lay.train.is_lora and extra and lay.lora_width != lay.trainable_width and \
            facts(tr.optimizer).states in (States.ADAM, States.ADAM_FP32, States.MOMENTUM, States.NONE):
        # per-element states in each group's dtype (LLaMA-Factory pure_bf16: fp32 adapters, half copies)
        (s1, t1), (s2, t2) = (optimizer_bytes(lay, trainable - extra, lay.lora_width),
                              optimizer_bytes(lay, extra, lay.trainable_width))
        states, step = s1 + s2, t1 + t2
    else:
        states, step = optimizer_bytes(lay, trainable, width)
    if facts(tr.optimizer).per_param and trainable:
        # the step runs in backward, parameter by parameter, each gradient freed after it (LF's layer-wise
        # post-accumulate-grad hooks; LOMO's tensor hooks): one gradient alive at a time, the largest
        grads = largest_grad(lay, width)
        if facts(tr.optimizer).builder[1] == "lomo":
            step = fused_step_bytes(lay, width)
    return ModelStates(weights_bytes=weights + buffers, trainable_params=trainable, frozen_params=total - trainable,
                       quantized_params=quantized, gradients_bytes=grads, optimizer_states_bytes=states,
                       optimizer_step_bytes=step, autocast_cache_bytes=2 * ac_params,
                       autocast_layer_bytes=2 * ac_layer)


def _norm_params(lay: Layout) -> int:
    """A decoder layer's norm weights (memplan.spec.model layer_params: RMSNorms + q / k norms)."""
    s = lay.spec
    qk = (s.q_dim + s.kv_dim if s.family.qk_norm_full else 2 * s.head_dim) if s.qk_norm else 0
    return s.norms_per_layer * s.hidden_size + qk


def optimizer_bytes(lay: Layout, trainable: int, width: int) -> tuple[int, int]:
    """(state bytes, step temporary bytes) for `trainable` params whose grads/states have `width` bytes."""
    opt = facts(lay.train.optimizer)
    step = trainable * width if opt.foreach_copy else 0  # foreach: _foreach_sqrt(exp_avg_sq) is one more copy
    rule = opt.states
    if opt.projection is not Projection.NONE or rule in (States.ADAM_MINI, States.MUON, States.ADAM_4BIT):
        return special_states(lay, width)
    if rule is States.ADAM:
        return 2 * trainable * width, step  # exp_avg + exp_avg_sq in the param dtype
    if rule is States.ADAM_FP32:
        return 2 * trainable * 4, step  # bitsandbytes 32-bit: fp32 states whatever the param dtype
    if rule is States.ADAM_8BIT:
        # per tensor, 2 states x (1 B + 4 B absmax / 256); fused kernel, no temporaries. A tensor of fewer than
        # min_8bit_size (4096) elements keeps fp32 states (bitsandbytes optim/optimizer.py Optimizer2State.init_state)
        sizes = [(r * (c or 1), k) for r, c, k in _trainable_shapes(lay)]
        if sum(n * k for n, k in sizes) != trainable:  # shapes not enumerated (MoE experts...): all 8-bit
            sizes = [(trainable, 1)]
        states = sum(k * (2 * n * 4 if n < OPT8_MIN_SIZE else 2 * (n + 4 * -(-n // OPT8_BLOCK))) for n, k in sizes)
        if lay.device == "cpu":
            # the CPU kernel is not fused (bitsandbytes backends/cpu/ops.py _optimizer_update_8bit_blockwise_cpu
            # L469-577): per tensor, both states dequantized to fp32, grad * gnorm_scale, p.float() (a copy
            # unless fp32), sqrt(state2) and the denominator: 6 fp32 copies of the largest tensor (5 for fp32)
            largest = max((n for n, _ in sizes if n >= OPT8_MIN_SIZE), default=0)
            step = max(step, largest * 4 * (5 if width == 4 else 6))
        return states, step
    if rule is States.NONE:
        return 0, step
    if rule is States.MOMENTUM:
        return trainable * width, step  # momentum_buffer
    if rule is States.FACTORED:
        return _adafactor(lay)
    raise AssertionError(f"no state rule for {rule}")


def _adafactor(lay: Layout) -> tuple[int, int]:
    """HF Adafactor (beta1=None): factored row/col second moments for matrices, full for vectors."""
    states = 0
    shapes = _trainable_shapes(lay)
    for rows, cols, n in shapes:
        states += n * ((rows + cols) if cols else rows) * 4
    biggest = max((r * (c or 1) for r, c, _ in shapes), default=0)
    return states, 3 * biggest * 4  # update = grad**2 (fp32), approx, update*grad: per tensor, fp32


def _trainable_shapes(lay: Layout) -> list[tuple[int, int, int]]:
    """(rows, cols or 0, count) of every trainable tensor."""
    s = lay.spec
    h = s.hidden_size
    if lay.train.is_lora:
        out = []
        for lin in s.layer_linears():
            if lin.name in lay.lora_modules:  # in how many layers (Qwen3.5: its own layer kind's)
                count = sum(lin in s.layer_linears(i) for i in lay.adapted_ids) if s.layer_types else \
                    len(lay.adapted_ids)
                out += [(rows, cols, count) for rows, cols in adapters.trainable_shapes(lay.train, lin)]
        return out + lay.extra_shapes()
    ids = list(lay.trained_ids) if s.layer_types else [s.num_layers - 1] * lay.trainable_layers
    shapes = []
    for lins in dict.fromkeys(s.layer_linears(i) for i in ids) if s.layer_types else [s.layer_linears()]:
        n = sum(s.layer_linears(i) == lins for i in ids) if s.layer_types else lay.trainable_layers
        trained = lay.trained_linear_names()
        lins = tuple(lin for lin in lins if lin.name in trained)
        layer = [(lin.out_features, lin.in_features, 1) for lin in lins]
        layer += [(lin.out_features, 0, 1) for lin in lins if lin.bias]  # qwen2's q/k/v biases
        layer += [(h, 0, sum(lay.part_trains(p) for p in ("input_layernorm", "post_attention_layernorm"))
                   * s.norms_per_layer // 2)]
        shapes += [(r, c, k * n) for r, c, k in layer]
    if lay.full:
        shapes += [(s.vocab_size, h, 1 if s.tie_word_embeddings else 2), (h, 0, s.family.norm_tensors)]
    return shapes + lay.extra_shapes()
