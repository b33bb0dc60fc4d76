"""`memplan fit`: search the open knobs for a fixed effective batch, drop what does not fit, rank by speed.

Everything here is pure Python over the analytic estimator: thousands of configurations in well under a second.
The speed model (`predicted_tokens_per_s`) is one replaceable function; probes (the tune stage) correct it later.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field

from memplan.errors import ConfigError
from memplan.predict.breakdown import Breakdown
from memplan.predict.estimator import estimate
from memplan.spec.hardware import GPU
from memplan.spec.model import ModelSpec
from memplan.spec.train import Attention, Method, Offload, Optimizer, Precision, Sharding, TrainConfig

DEFAULT_MARGIN = 0.05  # keep 5 % of the card free: allocator variance, eval batches, other processes
MFU_PEAK = 0.45  # model-FLOPs utilisation a well-fed HF Trainer step reaches on a large micro-batch
MFU_HALF_TOKENS = 1024  # tokens per micro-batch at which utilisation reaches half of MFU_PEAK
QLORA_SLOWDOWN = 1.35  # dequantising NF4 weights in every matmul (bitsandbytes kernels)
# data-parallel scaling per GPU (uncalibrated assumptions, like MFU_PEAK): gradient all-reduce / reduce-scatter
# overlaps backward; parameter all-gathers (ZeRO-3, FSDP) and host transfers (offload, over PCIe) do not fully
SCALING = {Sharding.NONE: 0.97, Sharding.NO_SHARD: 0.97, Sharding.ZERO1: 0.97, Sharding.ZERO2: 0.95,
           Sharding.SHARD_GRAD_OP: 0.93, Sharding.ZERO3: 0.85, Sharding.FULL_SHARD: 0.87, Sharding.HYBRID_SHARD: 0.9}
OFFLOAD_SLOWDOWN = {Offload.NONE: 1.0, Offload.OPTIMIZER: 2.0, Offload.PARAMS: 3.0}


@dataclass(frozen=True, slots=True, kw_only=True)
class Candidate:
    train: TrainConfig
    breakdown: Breakdown
    fits: bool
    tokens_per_s: float  # predicted, per GPU

    @property
    def total_bytes(self) -> int:
        return self.breakdown.total_bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class Suggestion:
    change: str  # e.g. "turn on gradient checkpointing"
    candidate: Candidate


@dataclass(frozen=True, slots=True, kw_only=True)
class FitResult:
    model: ModelSpec
    gpu: GPU
    margin: float
    global_batch: int
    usable_bytes: int
    ranked: tuple[Candidate, ...]  # fitting candidates, fastest first
    searched: int
    best_effort: Candidate  # the smallest-memory candidate when nothing fits
    suggestions: tuple[Suggestion, ...] = field(default=())

    @property
    def fits(self) -> bool:
        return bool(self.ranked)

    @property
    def best(self) -> Candidate | None:
        return self.ranked[0] if self.ranked else None

    @property
    def fewest_gpus(self) -> Candidate | None:
        """The fitting candidate with the fewest GPUs (the fastest among those)."""
        return min(self.ranked, key=lambda c: (c.train.gpus, -c.tokens_per_s)) if self.ranked else None


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
        weight_grads = 2 * n_params * min(train.freeze_trainable_layers, spec.num_layers) / spec.num_layers
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


def usable_bytes(gpu: GPU, margin: float) -> int:
    """The card's memory less the safety margin; the margin must be in [0, 0.5)."""
    if not 0.0 <= margin < 0.5:
        raise ConfigError(f"--margin must be in [0, 0.5), got {margin}")
    return int(gpu.memory_bytes * (1.0 - margin))


def _micro_batches(global_batch: int, gpus: int) -> list[int]:
    if global_batch % gpus:
        raise ConfigError(f"--global-batch {global_batch} is not divisible by {gpus} GPUs: "
                          f"use a multiple of {gpus}")
    per_gpu = global_batch // gpus
    return [b for b in range(1, per_gpu + 1) if per_gpu % b == 0]


def search_space(base: TrainConfig, gpu: GPU, *, global_batch: int, precisions: list[Precision] | None = None,
                 checkpointing: list[bool] | None = None, lora_ranks: list[int] | None = None,
                 optimizers: list[Optimizer] | None = None, attentions: list[Attention] | None = None,
                 gpu_counts: list[int] | None = None, shardings: list[Sharding] | None = None,
                 offloads: list[Offload] | None = None) -> list[TrainConfig]:
    """Every configuration with micro x accum x GPUs == global_batch over the open knobs (GPU counts and their
    shardings too, when given)."""
    if precisions is None:
        precisions = [Precision.BF16, Precision.PURE_BF16] if gpu.bf16 else [Precision.FP16]
    if any(p in (Precision.BF16, Precision.PURE_BF16) for p in precisions) and not gpu.bf16:
        raise ConfigError(f"{gpu.name} has no bf16 support: use --precision fp16 or fp32")
    attns = attentions or [base.attn]
    if Attention.FLASH_ATTENTION_2 in attns and not gpu.bf16:  # flash-attn 2 needs Ampere or newer, like bf16
        raise ConfigError(f"{gpu.name} cannot run flash_attention_2 (needs an Ampere or newer GPU): use sdpa")
    out = []
    for n, shard, off in _layouts(base, gpu_counts, shardings, offloads, global_batch):
        for b, prec, ckpt, rank, opt, attn in itertools.product(
                _micro_batches(global_batch, n), precisions,
                checkpointing if checkpointing is not None else [False, True],
                lora_ranks or [base.lora_rank], optimizers or [base.optimizer], attns):
            if prec is Precision.FP32 and attn is Attention.FLASH_ATTENTION_2:
                continue  # no fp32 kernel
            out.append(base.with_(batch_size=b, grad_accum=global_batch // (b * n), precision=prec,
                                  checkpointing=ckpt, lora_rank=rank, optimizer=opt, attn=attn, gpus=n,
                                  sharding=shard, offload=off))
    return out


def _layouts(base: TrainConfig, counts: list[int] | None, shardings: list[Sharding] | None,
             offloads: list[Offload] | None, global_batch: int) -> list[tuple[int, Sharding, Offload]]:
    """(GPUs, sharding, offload) to search. One GPU: as given (ZeRO / offload only when asked for); several: DDP,
    ZeRO 1/2/3 and FSDP full_shard / shard_grad_op (hybrid_shard with several nodes) unless given."""
    out = []
    counts = counts or [base.gpus]
    for n in counts:
        if n % base.nodes or global_batch % n and len(counts) > 1:
            continue  # a single count that does not divide the batch gets _micro_batches' own message
        if shardings:
            options = shardings
        elif n == 1:
            options = [base.sharding]
        else:
            options = [Sharding.NONE, Sharding.ZERO1, Sharding.ZERO2, Sharding.ZERO3, Sharding.FULL_SHARD,
                       Sharding.SHARD_GRAD_OP] + ([Sharding.HYBRID_SHARD] if base.nodes > 1 else [])
        for shard in options:
            for off in offloads or [base.offload]:
                if off is Offload.PARAMS and not shard.shards_params:
                    continue
                if off is not Offload.NONE and shard in (Sharding.NONE, Sharding.NO_SHARD):
                    continue
                out.append((n, shard, off))
    if not out:
        raise ConfigError(f"no GPU count in {counts} divides --global-batch {global_batch} (and --nodes "
                          f"{base.nodes}) with the sharding asked for")
    return out


def evaluate(spec: ModelSpec, train: TrainConfig, gpu: GPU, usable: int) -> Candidate:
    bd = estimate(spec, train)
    return Candidate(train=train, breakdown=bd, fits=bd.total_bytes <= usable,
                     tokens_per_s=predicted_tokens_per_s(spec, train, gpu))


def fit(spec: ModelSpec, base: TrainConfig, gpu: GPU, *, global_batch: int, margin: float = DEFAULT_MARGIN,
        **space: object) -> FitResult:
    """Rank every fitting configuration by predicted speed; when none fits, suggest the cheapest changes."""
    usable = usable_bytes(gpu, margin)
    configs = search_space(base, gpu, global_batch=global_batch, **space)  # type: ignore[arg-type]
    cands = [evaluate(spec, t, gpu, usable) for t in configs]
    ranked = sorted((c for c in cands if c.fits), key=lambda c: (-c.tokens_per_s, c.total_bytes))
    smallest = min(cands, key=lambda c: (c.total_bytes, not c.train.checkpointing))
    suggestions = () if ranked else tuple(_suggest(spec, smallest.train, gpu, usable))
    return FitResult(model=spec, gpu=gpu, margin=margin, global_batch=global_batch, usable_bytes=usable,
                     ranked=tuple(ranked), searched=len(cands), best_effort=smallest, suggestions=suggestions)


def _suggest(spec: ModelSpec, start: TrainConfig, gpu: GPU, usable: int) -> list[Suggestion]:
    """Cheapest changes (one knob at a time, then combined) from the smallest-memory configuration."""
    changes: list[tuple[str, dict[str, object]]] = [
        ("gradient checkpointing", dict(checkpointing=True)),
        ("micro-batch 1, more accumulation", dict(batch_size=1, grad_accum=start.effective_batch // start.gpus)),
        ("8-bit AdamW", dict(optimizer=Optimizer.ADAMW_8BIT)),
    ]
    if start.method in (Method.FULL, Method.FREEZE):
        changes.append(("LoRA", dict(method=Method.LORA)))
    if start.method is not Method.QLORA:
        changes.append(("QLoRA 4-bit", dict(method=Method.QLORA, quant_bits=4)))
    if start.seq_len > 512:
        changes.append((f"seq {start.seq_len // 2}", dict(seq_len=start.seq_len // 2)))
    out = [Suggestion(change=label, candidate=evaluate(spec, start.with_(**change), gpu, usable))
           for label, change in changes]
    combined: dict[str, object] = dict(changes[0][1])
    for i in range(1, len(changes)):  # cumulative: the first i+1 changes together
        combined.update(changes[i][1])
        label = " + ".join(lbl for lbl, _ in changes[: i + 1])
        out.append(Suggestion(change=label, candidate=evaluate(spec, start.with_(**combined), gpu, usable)))
    for n in (2, 4, 8):  # more GPUs, model states sharded (ZeRO-3 / FSDP full_shard), effective batch kept
        per_rank = start.effective_batch // n
        micro = min(start.batch_size, per_rank)
        if per_rank and start.effective_batch % n == 0 and per_rank % micro == 0:
            t = start.with_(gpus=n, batch_size=micro, grad_accum=per_rank // micro, sharding=Sharding.ZERO3)
            out.append(Suggestion(change=f"{n} GPUs, DeepSpeed ZeRO-3", candidate=evaluate(spec, t, gpu, usable)))
    fitting = sorted((s for s in out if s.candidate.fits), key=lambda s: -s.candidate.tokens_per_s)
    rest = sorted((s for s in out if not s.candidate.fits), key=lambda s: s.candidate.total_bytes)
    return (fitting + rest)[:10]


def recheck_exact(res: FitResult, top: int = 3) -> FitResult:
    """Re-estimate the `top` ranked candidates with the exact mode (fake-tensor traces); drop those that no longer
    fit and keep the order by predicted speed. Needs the `trace` extra."""
    from memplan.trace.exact import exact_estimate

    checked = []
    for cand in res.ranked[:top]:
        fsdp = cand.train.sharding.is_fsdp2
        if (cand.train.gpus > 1 or cand.train.sharding is not Sharding.NONE) and not fsdp or \
                cand.train.offload is not Offload.NONE:
            checked.append(cand)  # DDP / ZeRO / offload: per-rank memory is analytic only
            continue
        bd = exact_estimate(res.model, cand.train)
        checked.append(dataclasses.replace(cand, breakdown=bd, fits=bd.total_bytes <= res.usable_bytes))
    ranked = tuple(c for c in checked if c.fits) + res.ranked[top:]
    return dataclasses.replace(res, ranked=ranked)
