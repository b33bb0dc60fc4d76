"""The speed model behind fit's ranking and tune's seeds: the time of one micro-step on one GPU as matmul FLOPs at
a utilisation plus memory- and link-bound terms (LoRA's elementwise traffic, 4-bit dequantisation, the gathers
of sharded parameters), or the host's per-layer dispatch time where that is longer. Calibrated on published
throughput ratios (benchmarks/speed_published.py -> benchmarks/results/speed_published.md). One replaceable
function: predicted_tokens_per_s."""

from __future__ import annotations

from dataclasses import dataclass, field

from memplan.predict.layout import Layout
from memplan.predict.weights import model_states
from memplan.spec.hardware import GPU
from memplan.spec.model import ModelSpec
from memplan.spec.parallel import Offload, Sharding
from memplan.spec.stacks import Stack
from memplan.spec.train import Method, Precision, QuantMethod, TrainConfig

# FlashAttention-2's accounting (Dao-AILab/flash-attention benchmarks/benchmark_flash_attention.py L27-30):
# forward 4·S²·heads·head_dim / 2 (causal) per sequence, backward 2.5x that (it recomputes QK^T and runs 4 more)
ATTN_BWD_PER_FWD = 2.5
# torchao NF4 (torchtune's QLoRA) dequantises per weight use: read 0.5 B packed (+ 1/64 scale), write 2 B bf16,
# and the matmul reads those 2 B again: 4.5 B per weight per use, derived, not fitted; its torchtune row agrees
# (tt32-qlora, residual in benchmarks/results/speed_published.md)
TORCHAO_NF4_BYTES = 4.5
BANDWIDTH_FALLBACK_GBS = 900.0  # a GPU given only by its size ("24GB"): a mid-range card's memory bandwidth


@dataclass(frozen=True, slots=True, kw_only=True)
class SpeedConstants:
    """The model's constants. Fitted ones (CALIBRATED below) come from benchmarks/speed_published.py."""

    mfu_peak: float  # matmul FLOPs utilisation of a large micro-batch (the only absolute-speed constant)
    layer_overhead_s: float  # host seconds per decoder layer per micro-step (forward + backward): python, launches
    half_tokens: float  # tokens per micro-batch at which the GPU reaches half of mfu_peak (GEMM shapes, per-step
    # costs that do not grow with tokens: optimizer step, norms of small batches)
    lora_bytes_per_feature: float  # memory traffic per token per (in + out) feature of an adapted linear, per
    # forward-equivalent pass: dropout, the rank-r matmuls' inputs and outputs, the scale and the add
    dequant_bytes: dict[str, float] = field(default_factory=dict)  # 4-bit kernels: bytes per weight per use
    link_gbs: float  # effective GB/s of the parameter gathers and gradient reduce-scatters of the
    # strategies that shard parameters (FSDP full / hybrid shard, ZeRO-3), what does not overlap compute
    # data-parallel scaling per GPU of the others: gradient all-reduce / reduce-scatter overlaps backward
    # (uncalibrated: no published row memplan can state, see README); 1.0 where link_gbs models the traffic
    scaling: dict[Sharding, float] = field(default_factory=dict)
    offload_slowdown: dict[Offload, float] = field(default_factory=dict)


UNCALIBRATED_SCALING = {Sharding.NONE: 0.97, Sharding.NO_SHARD: 0.97, Sharding.ZERO1: 0.97, Sharding.ZERO2: 0.95,
                        Sharding.SHARD_GRAD_OP: 0.93, Sharding.ZERO3: 0.85, Sharding.FULL_SHARD: 0.87,
                        Sharding.HYBRID_SHARD: 0.9}  # the model before calibration (main 598f0f5)
GATHERED = (Sharding.ZERO3, Sharding.FULL_SHARD, Sharding.HYBRID_SHARD)  # link_gbs models their traffic
UNCALIBRATED_OFFLOAD = {Offload.NONE: 1.0, Offload.OPTIMIZER: 2.0, Offload.PARAMS: 3.0}

# Fitted by `python benchmarks/speed_published.py` on 69 published throughput ratios from 6 sources (torchtune
# README x2, Qwen README, ms-swift Benchmark.md, fms-acceleration's A100 reference CSV, LitGPT config_hub; least
# squares on log ratios within each source, each source weighted equally; mfu_peak from the absolute tokens/s).
# Median ratio error 4.3 % fitted, 10.0 % leave-one-source-out (uncalibrated model: 10.3 %); every row's residual
# is in benchmarks/results/speed_published.md. layer_overhead_s is identified by the Qwen README rows only (the
# only host-bound small micro-batches), link_gbs by fms-acceleration's 2-GPU FSDP rows only; bnb and GPTQ
# dequantisation cost 15 and 23 B-equivalents per weight use (sources disagree: LitGPT's bnb rows alone say ~10,
# fms' ~70; torchao's derived 4.5 matches torchtune's row). HQQ, EETQ, AWQ and AQLM have no published training
# throughput here and take bnb's value. DDP / ZeRO-1/2 / shard_grad_op scaling and the offload slowdowns have no
# published row memplan can state: uncalibrated (UNCALIBRATED_SCALING, UNCALIBRATED_OFFLOAD).
CALIBRATED = SpeedConstants(
    mfu_peak=0.711, layer_overhead_s=0.00255, half_tokens=405.0, lora_bytes_per_feature=6.09,
    dequant_bytes={"bnb": 14.8, "gptq": 22.8, "torchao": TORCHAO_NF4_BYTES}, link_gbs=72.0,
    scaling={**UNCALIBRATED_SCALING, **{k: 1.0 for k in GATHERED}}, offload_slowdown=UNCALIBRATED_OFFLOAD)


def predicted_tokens_per_s(spec: ModelSpec, train: TrainConfig, gpu: GPU) -> float:
    """Training tokens per second of all ranks together: micro-batch tokens over `step_time_s`, times the GPUs
    and the sharding's efficiency."""
    return tokens_per_s(spec, train, gpu, CALIBRATED)


def tokens_per_s(spec: ModelSpec, train: TrainConfig, gpu: GPU, c: SpeedConstants) -> float:
    """`predicted_tokens_per_s` with the given constants (the calibration benchmark varies them)."""
    return rate_of(step_terms(spec, train, gpu), train, c)


@dataclass(frozen=True, slots=True, kw_only=True)
class StepTerms:
    """What one micro-step costs before any constant applies (the calibration reuses them)."""

    tokens: int  # micro-batch tokens on one GPU
    flops: float  # matmul FLOPs
    peak_flops: float
    bandwidth: float  # bytes/s
    passes: int  # forward-equivalents: forward 1, backward 2, the recomputed forward 1
    weight_uses: int  # reads of each weight: forward, backward, recompute
    lora_features: int  # in + out features summed over the adapted linears
    quantized_params: int  # 4-bit weights dequantised per use (0 unless QLoRA)
    quant_kernel: str
    layers: int
    link_bytes: int = 0  # per micro-step per rank: parameter gathers (forward, backward) + gradient reduce-scatter


def step_terms(spec: ModelSpec, train: TrainConfig, gpu: GPU) -> StepTerms:
    lay = Layout.of(spec, train)
    qlora = train.method is Method.QLORA
    return StepTerms(
        tokens=train.batch_size * train.seq_len,
        flops=train.batch_size * train.seq_len * flops_per_token(spec, train, lay),
        peak_flops=_peak_flops(gpu, train.precision), bandwidth=(gpu.bandwidth_gbs or BANDWIDTH_FALLBACK_GBS) * 1e9,
        passes=3 + (1 if train.checkpointing else 0), weight_uses=2 + (1 if train.checkpointing else 0),
        lora_features=_lora_features(spec, lay), quantized_params=_quantized_params(spec, lay) if qlora else 0,
        quant_kernel=_quant_kernel(train), layers=spec.num_layers, link_bytes=_link_bytes(lay))


def step_time_s(spec: ModelSpec, train: TrainConfig, gpu: GPU, c: SpeedConstants) -> float:
    """Seconds of one micro-step (forward + backward, the recomputed forward under checkpointing) on one GPU."""
    return time_of(step_terms(spec, train, gpu), c)


def time_of(t: StepTerms, c: SpeedConstants) -> float:
    """The GPU's time: matmuls at mfu_peak, less efficient below half_tokens, plus LoRA's elementwise traffic, the
    dequantisation of every 4-bit weight per use and the sharded parameters' link traffic; or the host's, where
    longer."""
    gpu_s = (t.tokens + c.half_tokens) / t.tokens * t.flops / (t.peak_flops * c.mfu_peak)
    gpu_s += t.tokens * t.lora_features * c.lora_bytes_per_feature * t.passes / t.bandwidth
    gpu_s += t.quantized_params * c.dequant_bytes.get(t.quant_kernel, 0.0) * t.weight_uses / t.bandwidth
    gpu_s += t.link_bytes / (c.link_gbs * 1e9)
    # the host dispatches kernels asynchronously: a step takes the longer of the host's work (python, launches,
    # autograd, hooks: per layer) and the GPU's. Small micro-batches are host-bound (Qwen README: 1.8B LoRA at
    # 256, 512 and 1024 tokens all 1.0-1.1 s/it, then time grows with tokens)
    host_s = c.layer_overhead_s * t.layers * t.passes / 3
    return max(gpu_s, host_s)


def rate_of(t: StepTerms, train: TrainConfig, c: SpeedConstants) -> float:
    """Tokens per second of all ranks from one rank's step terms."""
    rate = t.tokens / time_of(t, c) / c.offload_slowdown.get(train.offload, 1.0)
    if train.gpus > 1:  # all ranks together
        rate *= train.gpus * c.scaling.get(train.sharding, 0.9)
    return rate


def flops_per_token(spec: ModelSpec, train: TrainConfig, lay: Layout | None = None) -> float:
    """Matmul FLOPs per token: forward 2 per weight (the input embedding is a lookup, not a matmul) + causal
    attention; backward 2 per weight for input gradients + 2.5x the attention + 2 per trained weight; checkpointing
    runs the forward again. LoRA adds its rank-r matmuls: 2r(in+out) forward, twice that backward."""
    lay = lay or Layout.of(spec, train)
    n_mm = spec.num_parameters - (0 if spec.tie_word_embeddings else spec.embedding_params)
    if spec.is_moe:  # only routed experts run per token
        expert = sum(lin.params for lin in spec.mlp_linears())
        n_mm -= spec.moe_layers * (spec.num_experts - spec.experts_per_token) * expert
    attn = 2 * spec.num_layers * spec.q_dim * train.seq_len  # causal QK^T + PV per token, forward
    lora = 2 * train.lora_rank * _lora_features(spec, lay)
    fwd = 2 * n_mm + attn + lora
    if train.method is Method.FULL:
        weight_grads = 2 * n_mm
    elif train.method is Method.FREEZE:
        weight_grads = 2 * n_mm * len(train.trainable_layer_ids(spec.num_layers)) / spec.num_layers
    else:
        weight_grads = lora
    backward = 2 * n_mm + ATTN_BWD_PER_FWD * attn + lora + weight_grads
    return fwd + backward + (fwd if train.checkpointing else 0)


def _link_bytes(lay: Layout) -> int:
    """Bytes one rank receives per micro-step where parameters are sharded: every unit's parameters gathered
    before forward and again before backward (FSDP FULL_SHARD / ZeRO-3; recomputation runs inside the backward
    gather) and the gradients reduce-scattered, each (g - 1) / g of the whole (ring collectives)."""
    g, sharding = lay.train.gpus, lay.train.sharding
    if g <= 1 or sharding not in GATHERED:
        return 0
    st = model_states(lay)
    return int((2 * st.weights_bytes + st.gradients_bytes) * (g - 1) / g)


def _lora_features(spec: ModelSpec, lay: Layout) -> int:
    """Sum of in + out features over every adapted linear of the model (0 without LoRA)."""
    return spec.num_layers * sum(lin.in_features + lin.out_features for lin in spec.layer_linears()
                                 if lin.name in lay.lora_modules)


def _quantized_params(spec: ModelSpec, lay: Layout) -> int:
    """Weights a QLoRA step dequantises: every decoder linear (only the adapted ones where the stack quantizes
    just those), and the LM head where the stack quantizes it too."""
    if lay.only_quantized is not None:
        n = spec.num_layers * sum(lin.params for lin in spec.layer_linears() if lin.name in lay.only_quantized)
    else:
        n = spec.layers_params
    return n + (spec.vocab_size * spec.hidden_size if lay.quantized_head else 0)


def _quant_kernel(train: TrainConfig) -> str:
    """Which dequantisation kernel a QLoRA base runs: torchtune's torchao NF4, GPTQ's, or bitsandbytes' (the
    others, HQQ / EETQ / AWQ / AQLM, have no published throughput here: bnb's constant stands in)."""
    if train.stack is Stack.TORCHTUNE:
        return "torchao"
    return "gptq" if train.quant_method is QuantMethod.GPTQ else "bnb"


def _peak_flops(gpu: GPU, precision: Precision) -> float:
    if precision is Precision.FP32:
        return (gpu.fp32_tflops or 19.5) * 1e12
    return (gpu.dense_bf16_tflops or (gpu.fp32_tflops or 19.5) * 4) * 1e12


__all__ = ["CALIBRATED", "SpeedConstants", "StepTerms", "flops_per_token", "predicted_tokens_per_s", "rate_of",
           "step_terms", "step_time_s", "time_of", "tokens_per_s"]
