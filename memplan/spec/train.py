"""TrainConfig: every knob of one training configuration, validated at once (ConfigError lists every problem)."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from enum import Enum

from memplan.errors import ConfigError
from memplan.spec.families import Family
from memplan.spec.optimizers import Optimizer


class Method(str, Enum):
    FULL = "full"
    FREEZE = "freeze"  # LLaMA-Factory finetuning_type=freeze: only the last N layers train
    LORA = "lora"
    QLORA = "qlora"


class Precision(str, Enum):
    FP32 = "fp32"
    FP16 = "fp16"  # AMP: fp32 master weights, fp16 autocast (see NOTES §2)
    BF16 = "bf16"  # AMP with bf16
    PURE_BF16 = "pure_bf16"  # weights, grads, states all bf16


class Attention(str, Enum):
    AUTO = "auto"  # what transformers picks: sdpa, or eager where the model refuses sdpa (gemma2)
    SDPA = "sdpa"
    EAGER = "eager"
    FLASH_ATTENTION_2 = "flash_attention_2"


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
    def is_fsdp2(self) -> bool:
        """Wrapped with torch's FSDP2 `fully_shard` (no_shard is FSDP1's DDP-like mode: no FSDP2 equivalent)."""
        return self in (Sharding.FULL_SHARD, Sharding.SHARD_GRAD_OP, Sharding.HYBRID_SHARD)

    @property
    def shards_params(self) -> bool:
        return self in (Sharding.ZERO3, Sharding.FULL_SHARD, Sharding.HYBRID_SHARD)


class Offload(str, Enum):
    NONE = "none"
    OPTIMIZER = "optimizer"  # optimizer states (+ fp32 master weights and grads) in host memory
    PARAMS = "params"  # + the parameter shards (ZeRO-3 / FSDP full or hybrid shard only)


ALL_LINEAR = "all-linear"


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainConfig:
    """One configuration; defaults follow LLaMA-Factory's (lora, bf16, checkpointing on, cutoff_len 2048)."""

    method: Method = Method.LORA
    precision: Precision = Precision.BF16
    batch_size: int = 1  # micro-batch per GPU
    grad_accum: int = 1
    seq_len: int = 2048
    checkpointing: bool = True
    optimizer: Optimizer = Optimizer.ADAMW
    attn: Attention = Attention.AUTO
    lora_rank: int = 8
    lora_alpha: int | None = None  # None: 2 x rank
    lora_targets: tuple[str, ...] = (ALL_LINEAR,)
    lora_dropout: float = 0.0
    quant_bits: int = 4
    freeze_trainable_layers: int = 2
    gpus: int = 1  # data-parallel ranks in all (world size)
    nodes: int = 1
    sharding: Sharding = Sharding.NONE
    offload: Offload = Offload.NONE
    # DeepSpeed zero_optimization.reduce_bucket_size in elements; None = "auto", which HF Trainer fills with
    # hidden_size^2 (LLaMA-Factory's example DeepSpeed configs say auto)
    ds_reduce_bucket: int | None = None

    def __post_init__(self) -> None:
        problems = []
        for name in ("batch_size", "grad_accum", "seq_len", "lora_rank", "freeze_trainable_layers", "gpus", "nodes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                problems.append(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        bucket = self.ds_reduce_bucket
        if bucket is not None and (not isinstance(bucket, int) or isinstance(bucket, bool) or bucket <= 0):
            problems.append(f"DeepSpeed reduce_bucket_size must be a positive integer or auto, got {bucket!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            problems.append(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if self.quant_bits not in (4, 8):
            problems.append(f"--quant-bits must be 4 or 8 (bitsandbytes NF4 or int8), got {self.quant_bits}")
        if self.attn is Attention.FLASH_ATTENTION_2 and self.precision is Precision.FP32:
            problems.append("--attn flash_attention_2 needs fp16/bf16 (it has no fp32 kernel): use --precision bf16 "
                            "or --attn sdpa")
        if isinstance(self.gpus, int) and isinstance(self.nodes, int) and self.nodes > 0 and self.gpus % self.nodes:
            problems.append(f"--gpus {self.gpus} is not a multiple of --nodes {self.nodes}: --gpus counts every GPU")
        if self.offload is Offload.PARAMS and not self.sharding.shards_params:
            problems.append("--offload params needs sharded parameters: --zero 3 or --fsdp full_shard|hybrid_shard")
        if self.offload is not Offload.NONE and self.sharding in (Sharding.NONE, Sharding.NO_SHARD):
            problems.append("--offload needs ZeRO (--zero 1|2|3) or FSDP sharding (--fsdp full_shard|...)")
        if not self.lora_targets:
            problems.append("--lora-targets is empty: name modules (q_proj,v_proj) or all-linear")
        if problems:
            raise ConfigError(problems)

    @property
    def is_lora(self) -> bool:
        return self.method in (Method.LORA, Method.QLORA)

    @property
    def gpus_per_node(self) -> int:
        return self.gpus // self.nodes

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.gpus

    @property
    def alpha(self) -> int:
        return self.lora_alpha if self.lora_alpha is not None else 2 * self.lora_rank

    def with_(self, **changes: object) -> TrainConfig:
        """A copy with some knobs changed (validated again)."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.value if isinstance(value, Enum) else list(value) if isinstance(value, tuple) else value
        out["lora_alpha"] = self.alpha
        return out


def parse_choice(enum: type[Enum], value: str, option: str) -> Enum:
    """'BF16' -> Precision.BF16; unknown names raise ConfigError listing the choices."""
    try:
        return enum(str(value).strip().lower())
    except ValueError:
        choices = "|".join(m.value for m in enum)  # type: ignore[attr-defined]
        raise ConfigError(f"unknown {option} {value!r}: choose one of {choices}") from None


def resolve_attention(family: Family, attn: Attention) -> Attention:
    """The kernel transformers will really run: AUTO -> sdpa, or eager where the family refuses sdpa."""
    if attn is Attention.AUTO:
        return Attention.SDPA if family.sdpa else Attention.EAGER
    if attn is Attention.SDPA and not family.sdpa:
        raise ConfigError(f"{family.model_type} does not support --attn sdpa in transformers 5 (softcapping): "
                          "use --attn eager or flash_attention_2")
    return attn


def train_from_dict(data: dict[str, object]) -> TrainConfig:
    """Inverse of TrainConfig.to_dict (unknown keys such as effective_batch are ignored)."""
    kinds = {"method": Method, "precision": Precision, "optimizer": Optimizer, "attn": Attention,
             "sharding": Sharding, "offload": Offload}
    kw: dict[str, object] = {}
    for f in fields(TrainConfig):
        if f.name in data:
            value = data[f.name]
            kw[f.name] = kinds[f.name](value) if f.name in kinds else tuple(value) if f.name == "lora_targets" \
                else value  # type: ignore[arg-type]
    return TrainConfig(**kw)  # type: ignore[arg-type]
