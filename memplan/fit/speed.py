"""The speed model behind fit's ranking: FLOPs per token over a utilisation curve (uncalibrated constants;
probes correct it per study). One replaceable function."""

from __future__ import annotations

from memplan.spec.hardware import GPU
from memplan.spec.model import ModelSpec
from memplan.spec.parallel import Offload, Sharding
from memplan.spec.train import Method, Precision, TrainConfig

MFU_PEAK = 0.45  # model-FLOPs utilisation a well-fed HF Trainer step reaches on a large micro-batch
MFU_HALF_TOKENS = 1024  # tokens per micro-batch at which utilisation reaches half of MFU_PEAK
QLORA_SLOWDOWN = 1.35  # dequantising NF4 weights in every matmul (bitsandbytes kernels)
# data-parallel scaling per GPU (uncalibrated assumptions, like MFU_PEAK): gradient all-reduce / reduce-scatter
# overlaps backward; parameter all-gathers (ZeRO-3, FSDP) and host transfers (offload, over PCIe) do not fully
SCALING = {Sharding.NONE: 0.97, Sharding.NO_SHARD: 0.97, Sharding.ZERO1: 0.97, Sharding.ZERO2: 0.95,
           Sharding.SHARD_GRAD_OP: 0.93, Sharding.ZERO3: 0.85, Sharding.FULL_SHARD: 0.87, Sharding.HYBRID_SHARD: 0.9}
OFFLOAD_SLOWDOWN = {Offload.NONE: 1.0, Offload.OPTIMIZER: 2.0, Offload.PARAMS: 3.0}



def predicted_tokens_per_s(spec: ModelSpec, train: TrainConfig, gpu: GPU) -> float:
    """FLOPs model: forward 2N + attention, backward 2x that (input grads) + 2N weight grads for what trains,
    one more forward when recomputing; utilisation rises with tokens per micro-batch. Several GPUs: the sum over
    ranks, scaled by the sharding's assumed efficiency."""
    n_params = spec.num_parameters
    if spec.is_moe:  # only routed experts run per token
        dense = spec.num_parameters - spec.num_layers * spec.num_experts * sum(
            lin.params for lin in spec.mlp_linears())
        n_params = dense + spec.num_layers * spec.experts_per_token * sum(lin.params for lin in spec.mlp_linears())
    attn = 2 * spec.num_layers * spec.q_dim * train.seq_len  # causal QK^T + PV per token, forward
    fwd = 2 * n_params + attn
    if train.method is Method.FULL:
        weight_grads = 2 * n_params
    elif train.method is Method.FREEZE:
        weight_grads = 2 * n_params * len(train.trainable_layer_ids(spec.num_layers)) / spec.num_layers
    else:
        weight_grads = 0  # adapters' weight grads are negligible
    # forward + input-gradient backward (same cost) + weight gradients + the recomputed forward
    flops = 2 * fwd + weight_grads + (fwd if train.checkpointing else 0)
    peak = _peak_flops(gpu, train.precision)
    tokens = train.batch_size * train.seq_len
    mfu = MFU_PEAK * tokens / (tokens + MFU_HALF_TOKENS)
    rate = peak * mfu / flops / OFFLOAD_SLOWDOWN[train.offload]
    if train.gpus > 1:  # all ranks together
        rate *= train.gpus * SCALING[train.sharding]
    return rate / QLORA_SLOWDOWN if train.method is Method.QLORA else rate


def _peak_flops(gpu: GPU, precision: Precision) -> float:
    if precision is Precision.FP32:
        return (gpu.fp32_tflops or 19.5) * 1e12
    return (gpu.dense_bf16_tflops or (gpu.fp32_tflops or 19.5) * 4) * 1e12
