"""The search space expanded: every configuration with micro x accum x GPUs == global_batch over the open knobs."""

from __future__ import annotations

import itertools
import math
import warnings

from memplan.errors import ConfigError
from memplan.spec.hardware import GPU
from memplan.spec.parallel import Offload, Sharding
from memplan.spec.space import SearchSpace
from memplan.spec.train import Attention, Precision, TrainConfig

MAX_CANDIDATES = 200_000  # a search larger than this is refused (it would take minutes and print nothing)


def divisors(n: int) -> list[int]:
    """Every divisor of n, ascending, in O(sqrt n) (a global batch of 10^12 must not scan 10^12 numbers)."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return small + [n // d for d in reversed(small) if d * d != n]


def micro_batches(global_batch: int, gpus: int) -> list[int]:
    if global_batch % gpus:
        raise ConfigError(f"--global-batch {global_batch} is not divisible by {gpus} GPUs: "
                          f"use a multiple of {gpus}")
    return divisors(global_batch // gpus)


def search_space(base: TrainConfig, gpu: GPU, space: SearchSpace) -> list[TrainConfig]:
    """Every configuration with micro x accum x GPUs == space.global_batch over the open knobs (GPU counts and their
    shardings too, when given)."""
    precisions = space.precisions or ((Precision.BF16, Precision.PURE_BF16) if gpu.bf16 else (Precision.FP16,))
    if any(p in (Precision.BF16, Precision.PURE_BF16) for p in precisions) and not gpu.bf16:
        raise ConfigError(f"{gpu.name} has no bf16 support: use --precision fp16 or fp32")
    attns = space.attentions or (base.attn,)
    if Attention.FLASH_ATTENTION_2 in attns and not gpu.bf16:  # flash-attn 2 needs Ampere or newer, like bf16
        raise ConfigError(f"{gpu.name} cannot run flash_attention_2 (needs an Ampere or newer GPU): use sdpa")
    gb = space.global_batch
    layouts = _layouts(base, space, gb)
    per_layout = len(precisions) * len(space.checkpointing or (False, True)) * len(space.lora_ranks or (1,)) * \
        len(space.optimizers or (1,)) * len(attns)
    total = sum(len(micro_batches(gb, n)) for n, _, _ in layouts) * per_layout
    if total > MAX_CANDIDATES:
        raise ConfigError(f"the search has {total:,} configurations (more than {MAX_CANDIDATES:,}): fix some knobs "
                          "(--precision, --checkpointing, fewer ranks, optimizers or GPU counts)")
    out = []
    for n, shard, off in layouts:
        for b, prec, ckpt, rank, opt, attn in itertools.product(
                micro_batches(gb, n), precisions, space.checkpointing or (False, True),
                space.lora_ranks or (base.lora_rank,), space.optimizers or (base.optimizer,), attns):
            if prec is Precision.FP32 and attn is Attention.FLASH_ATTENTION_2:
                continue  # no fp32 kernel
            try:
                out.append(base.with_(batch_size=b, grad_accum=gb // (b * n), precision=prec,
                                      checkpointing=ckpt, lora_rank=rank, optimizer=opt, attn=attn, gpus=n,
                                      sharding=shard, offload=off))
            except ConfigError:
                continue  # a combination TrainConfig refuses (layer-wise GaLore with accumulation, say)
    return out


def _layouts(base: TrainConfig, space: SearchSpace, global_batch: int) -> list[tuple[int, Sharding, Offload]]:
    """(GPUs, sharding, offload) to search. One GPU: as given (ZeRO / offload only when asked for); several: DDP,
    ZeRO 1/2/3 and FSDP full_shard / shard_grad_op (hybrid_shard with several nodes) unless given."""
    out = []
    counts = space.gpu_counts or (base.gpus,)
    dropped = [n for n in counts if n % base.nodes or global_batch % n] if len(counts) > 1 else []
    if dropped and len(dropped) < len(counts):
        warnings.warn(f"--gpus {','.join(map(str, dropped))} left out: {global_batch} is not divisible by that many "
                      f"GPUs (or --nodes {base.nodes} does not divide them)", stacklevel=3)
    for n in counts:
        if n in dropped:
            continue  # a single count that does not divide the batch gets micro_batches' own message
        if space.shardings:
            options = list(space.shardings)
        elif n == 1:
            options = [base.sharding]
        else:
            options = [Sharding.NONE, Sharding.ZERO1, Sharding.ZERO2, Sharding.ZERO3, Sharding.FULL_SHARD,
                       Sharding.SHARD_GRAD_OP] + ([Sharding.HYBRID_SHARD] if base.nodes > 1 else [])
        for shard in options:
            for off in space.offloads or (base.offload,):
                if off is Offload.PARAMS and not shard.shards_params:
                    continue
                if off is not Offload.NONE and shard in (Sharding.NONE, Sharding.NO_SHARD):
                    continue
                out.append((n, shard, off))
    if not out:
        raise ConfigError(f"no GPU count in {counts} divides --global-batch {global_batch} (and --nodes "
                          f"{base.nodes}) with the sharding asked for")
    return out
