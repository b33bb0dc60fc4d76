"""Parallelism: how one configuration spreads over GPUs (ranks, nodes, sharding engine, offload), and the
defaults of the engines memplan models (DDP, DeepSpeed ZeRO, torch FSDP) that every stage reads."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from memplan.errors import ConfigError, Problem

DS_REDUCE_BUCKET = 500_000_000  # elements: DeepSpeed zero_optimization.reduce_bucket_size default
DS_MAX_LIVE_PARAMS = 1_000_000_000  # stage3_max_live_parameters default (also in LLaMA-Factory's configs)
DDP_BUCKET_MB = 25  # torch DDP bucket_cap_mb default (the buckets together copy every gradient)


class Sharding(str, Enum):
    """How model states are split over data-parallel ranks (NONE with several GPUs is plain DDP)."""

    NONE = "none"
    ZERO1 = "zero1"  # DeepSpeed: optimizer states (and fp32 master weights) partitioned
    ZERO2 = "zero2"  # + gradients
    ZERO3 = "zero3"  # + parameters, gathered layer by layer
    FULL_SHARD = "full_shard"  # torch FSDP: parameters, gradients, states sharded; units gathered when used
    SHARD_GRAD_OP = "shard_grad_op"  # FSDP: gradients and states sharded; parameters kept after forward
    HYBRID_SHARD = "hybrid_shard"  # FSDP full_shard inside a node, replicated across nodes
    NO_SHARD = "no_shard"  # FSDP without sharding (DDP-like)

    @property
    def is_deepspeed(self) -> bool:
        return self in (Sharding.ZERO1, Sharding.ZERO2, Sharding.ZERO3)

    @property
    def is_fsdp(self) -> bool:
        """A torch FSDP sharding strategy (FSDP1's ShardingStrategy names; Parallelism.fsdp_version says which)."""
        return self in (Sharding.FULL_SHARD, Sharding.SHARD_GRAD_OP, Sharding.HYBRID_SHARD, Sharding.NO_SHARD)

    @property
    def is_fsdp2(self) -> bool:
        """A strategy FSDP2 `fully_shard` has (no_shard is FSDP1's DDP-like mode: no FSDP2 equivalent)."""
        return self in (Sharding.FULL_SHARD, Sharding.SHARD_GRAD_OP, Sharding.HYBRID_SHARD)

    @property
    def shards_params(self) -> bool:
        return self in (Sharding.ZERO3, Sharding.FULL_SHARD, Sharding.HYBRID_SHARD)


class Offload(str, Enum):
    NONE = "none"
    OPTIMIZER = "optimizer"  # optimizer states (+ fp32 master weights and grads) in host memory
    PARAMS = "params"  # + the parameter shards (ZeRO-3 / FSDP full or hybrid shard only)


PARALLEL_FIELDS = ("gpus", "nodes", "sharding", "offload", "ds_reduce_bucket", "fsdp_version")
# accelerate's FullyShardedDataParallelPlugin: `fsdp_version` defaults to FSDP_VERSION or "1" (accelerate 1.15
# utils/dataclasses.py __post_init__); LLaMA-Factory's examples/accelerate/fsdp_config.yaml names none (FSDP1),
# its fsdp2_config.yaml says 2. (HF TrainingArguments' own `fsdp` key defaults to fsdp_config version 2 in
# transformers 5.24: memplan.formats.llamafactory reads that.)
FSDP_VERSION = 1
FSDP_VERSIONS = (1, 2)


def positive_int(name: str, value: object) -> list[Problem]:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        return [Problem(name, f"{{}} must be a positive integer, got {value!r}")]
    return []


@dataclass(frozen=True, slots=True, kw_only=True)
class Parallelism:
    """Data-parallel layout of one configuration; memory is estimated per rank."""

    gpus: int = 1  # data-parallel ranks in all (world size)
    nodes: int = 1
    sharding: Sharding = Sharding.NONE
    offload: Offload = Offload.NONE
    # DeepSpeed zero_optimization.reduce_bucket_size in elements; None = "auto", which HF Trainer fills with
    # hidden_size^2 (LLaMA-Factory's example DeepSpeed configs say auto)
    ds_reduce_bucket: int | None = None
    # torch FSDP flavour under a FSDP sharding: 1 = FullyShardedDataParallel (flat parameters, as accelerate
    # wraps by default), 2 = fully_shard (per-parameter DTensors); ignored for DDP / DeepSpeed
    fsdp_version: int = FSDP_VERSION

    def __post_init__(self) -> None:
        problems = positive_int("gpus", self.gpus) + positive_int("nodes", self.nodes)
        bucket = self.ds_reduce_bucket
        if bucket is not None and (not isinstance(bucket, int) or isinstance(bucket, bool) or bucket <= 0):
            problems.append(Problem("ds_reduce_bucket", f"DeepSpeed reduce_bucket_size must be a positive integer "
                                                        f"or auto, got {bucket!r}"))
        if not problems and self.gpus % self.nodes:
            problems.append(Problem("gpus", f"{{}} {self.gpus} is not a multiple of --nodes {self.nodes}: --gpus "
                                            "counts every GPU"))
        if self.fsdp_version not in FSDP_VERSIONS:
            problems.append(Problem("fsdp_version", f"{{}} must be 1 (FullyShardedDataParallel) or 2 (fully_shard), "
                                                    f"got {self.fsdp_version!r}"))
        elif self.fsdp_version == 2 and self.sharding is Sharding.NO_SHARD:
            problems.append(Problem("fsdp_version", "{} 2 has no no_shard (FSDP1's DDP-like mode): use --fsdp-version "
                                                    "1, or DDP without --fsdp"))
        if self.offload is Offload.PARAMS and not self.sharding.shards_params:
            problems.append(Problem("offload", "{} params needs sharded parameters: --zero 3 or --fsdp "
                                               "full_shard|hybrid_shard"))
        if self.offload is not Offload.NONE and self.sharding in (Sharding.NONE, Sharding.NO_SHARD):
            problems.append(Problem("offload", "{} needs ZeRO (--zero 1|2|3) or FSDP sharding (--fsdp full_shard|...)"))
        if problems:
            raise ConfigError(problems)

    @property
    def gpus_per_node(self) -> int:
        return self.gpus // self.nodes

    @property
    def is_single(self) -> bool:
        """One GPU, nothing sharded or offloaded."""
        return self.gpus == 1 and self.sharding is Sharding.NONE and self.offload is Offload.NONE

    @property
    def fsdp1(self) -> bool:
        """torch FullyShardedDataParallel (FSDP1) wraps the model."""
        return self.sharding.is_fsdp and self.fsdp_version == 1

    @property
    def fsdp2(self) -> bool:
        """torch fully_shard (FSDP2) wraps the model."""
        return self.sharding.is_fsdp2 and self.fsdp_version == 2

    @property
    def traceable(self) -> bool:
        """The exact mode traces one GPU, or one FSDP1 / FSDP2 rank under a fake process group; DDP, ZeRO,
        offload and FSDP1's no_shard and shard_grad_op are analytic only (FSDP1 shard_grad_op on fake tensors:
        "AssertionError: If skipped using sharded views, the unsharded flat parameter should be allocated",
        torch 2.13 _flat_param.py _writeback_orig_params)."""
        fsdp = self.fsdp2 or (self.fsdp1 and self.sharding in (Sharding.FULL_SHARD, Sharding.HYBRID_SHARD))
        return self.offload is Offload.NONE and (fsdp or self.is_single)

    def reduce_bucket(self, hidden_size: int) -> int:
        """reduce_bucket_size in elements: the DeepSpeed JSON's, or what HF Trainer fills for "auto"
        (hidden_size^2, transformers.integrations.deepspeed)."""
        return self.ds_reduce_bucket if self.ds_reduce_bucket is not None else hidden_size * hidden_size
