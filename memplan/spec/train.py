"""TrainConfig: every knob of one training configuration, validated at once (ConfigError lists every problem)."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from enum import Enum

from memplan.errors import ConfigError, Problem
from memplan.spec.families import Family
from memplan.spec.optimizers import Optimizer, facts
from memplan.spec.parallel import PARALLEL_FIELDS, Offload, Parallelism, Sharding, positive_int
from memplan.spec.stacks import Stack
from memplan.spec.visual import VisualInput


class Method(str, Enum):
    FULL = "full"
    FREEZE = "freeze"  # LLaMA-Factory finetuning_type=freeze: only the last N layers train
    LORA = "lora"
    QLORA = "qlora"


class Adapter(str, Enum):
    """The adapter a LoRA / QLoRA method trains on the frozen (or quantized) base (LLaMA-Factory finetuning_type
    lora / oft, use_dora): memplan.predict.adapters has each one's memory."""

    LORA = "lora"  # peft LoraConfig
    DORA = "dora"  # peft LoraConfig(use_dora=True): a magnitude vector per output and the weight's norm
    OFT = "oft"  # peft OFTConfig: block-diagonal Cayley-Neumann rotations of each target linear's input


class Precision(str, Enum):
    FP32 = "fp32"
    FP16 = "fp16"  # AMP: fp32 master weights, fp16 autocast (README "The memory model")
    BF16 = "bf16"  # AMP with bf16
    PURE_BF16 = "pure_bf16"  # weights, grads, states all bf16


class Attention(str, Enum):
    AUTO = "auto"  # what transformers picks: sdpa, or eager where the model refuses sdpa (gemma2)
    SDPA = "sdpa"
    EAGER = "eager"
    FLASH_ATTENTION_2 = "flash_attention_2"


class Stage(str, Enum):
    """The training objective (LLaMA-Factory's `stage`) where it changes memory."""

    SFT = "sft"  # next-token loss (pt: the same step)
    DPO = "dpo"  # chosen + rejected in one batch, plus a no-grad reference forward (memplan.predict.estimator)
    KTO = "kto"  # target rows with grad, a mismatched KL batch under no_grad, the reference's forwards of both
    RM = "rm"  # chosen + rejected in one batch through a value head; the loss skips the vocabulary


class ProjType(str, Enum):
    """Which side of a target matrix (m x n) GaLore / APOLLO project (galore_projector.py project): std keeps
    the larger dimension (m >= n: G @ P.T with P (r, n); else P.T @ G with P (m, r)), reverse_std the smaller,
    right / left always that side."""

    STD = "std"
    REVERSE_STD = "reverse_std"
    RIGHT = "right"
    LEFT = "left"


class QuantMethod(str, Enum):
    """On-the-fly quantization of a QLoRA base (LLaMA-Factory's quantization_method, model_args.py L279)."""

    BNB = "bnb"  # bitsandbytes: 4-bit NF4/FP4 (Linear4bit) or 8-bit LLM.int8 (Linear8bitLt)
    HQQ = "hqq"  # hqq HQQLinear, group_size 64, scale and zero kept in fp16 (memplan.predict.weights)
    EETQ = "eetq"  # EETQ W8A16: int8 weight + fp16 per-output-channel scale
    # pre-quantized checkpoints (memplan.spec.prequantized): their storage is the checkpoint's, never chosen here
    AWQ = "awq"  # gptqmodel AwqGEMMLinear (transformers 5 integrations/awq.py)
    GPTQ = "gptq"  # gptqmodel TorchQuantLinear (its training path)
    AQLM = "aqlm"  # aqlm QuantizedLinear

    @property
    def prequantized(self) -> bool:
        """A checkpoint's own storage (quantization_config), not a method that quantizes on the fly."""
        return self in (QuantMethod.AWQ, QuantMethod.GPTQ, QuantMethod.AQLM)


# the bit widths LLaMA-Factory 0.9.5 accepts per method (model/model_utils/quantization.py configure_quantization:
# bnb 8 or 4 L187-203, "Bitsandbytes only accepts 4-bit or 8-bit"; hqq L208-209; eetq L219-220)
# Pre-quantized: the widths the kernels serve: gptqmodel AwqGEMMLinear SUPPORTS_BITS [4] (nn_modules/qlinear/
# gemm_awq.py L117); GPTQConfig "supported numbers are (2, 3, 4, 8)" (transformers utils/quantization_config.py);
# AQLM nbits_per_codebook x num_codebooks / in_group_size of the codebook shapes aqlm 1.1.7's kernels select
# (inference_kernels/kernel_selector.py: 1x16 and 2x8 over 8 inputs: 2 bits; 1x8 over 8 and 1x16 over 16: 1 bit)
QUANT_BITS: dict[QuantMethod, tuple[int, ...]] = {QuantMethod.BNB: (4, 8), QuantMethod.HQQ: (1, 2, 3, 4, 5, 6, 8),
                                                  QuantMethod.EETQ: (8,), QuantMethod.AWQ: (4,),
                                                  QuantMethod.GPTQ: (2, 3, 4, 8), QuantMethod.AQLM: (1, 2)}

ALL_LINEAR = "all-linear"
# VisualInput's fields, given flat to TrainConfig.with_ (the CLI's --images / --image-max-pixels)
VISUAL_FIELDS = ("images", "image_max_pixels", "image_min_pixels", "tower_trains", "projector_trains")
# the decoder-layer sub-modules TrainConfig.trainable_modules may name ("all": every one)
FREEZE_MODULES = ("all", "self_attn", "mlp", "input_layernorm", "post_attention_layernorm")
# the non-layer modules TrainConfig.extra_modules may name (their names in every transformers family memplan models)
EXTRA_MODULES = ("embed_tokens", "lm_head")


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
    adapter: Adapter = Adapter.LORA  # what the LoRA / QLoRA methods train (QLoRA + oft: LLaMA-Factory's QOFT)
    oft_block_size: int = 32  # OFT: block size (LLaMA-Factory oft_block_size, peft OFTConfig); 0 to give oft_rank
    oft_rank: int = 0  # OFT: blocks per layer (peft `r`), the other way to size it: exactly one of the two is set
    pissa_init: bool = False  # LoRA initialised from each target's SVD (peft init_lora_weights="pissa[_niter_k]")
    pissa_iter: int = 16  # LLaMA-Factory pissa_iter: fast-SVD iterations, -1 for the full SVD
    liger_kernel: bool = False  # Liger's fused kernels (LLaMA-Factory enable_liger_kernel): predict/kernels.py
    offload_checkpoints: bool = False  # checkpointed layer inputs kept in host memory (use_unsloth_gc)
    quant_method: QuantMethod = QuantMethod.BNB
    # bitsandbytes 4-bit only: nested 8-bit absmax (bnb_4bit_use_double_quant, LLaMA-Factory double_quantization)
    double_quant: bool = True
    quant_type: str = "nf4"  # bitsandbytes 4-bit data type, nf4 or fp4: the same packing (quantization_type)
    # freeze: the last N layers train; negative, the first |N| (LLaMA-Factory adapter.py _setup_freeze_tuning);
    # llama_pro: every (num_layers / N)-th layer, the expanded blocks, train (freeze) or carry the adapters (LoRA:
    # model_utils/misc.py find_expanded_modules): `trainable_layer_ids`
    freeze_trainable_layers: int = 2
    llama_pro: bool = False
    # modules outside the decoder layers that train whole (EXTRA_MODULES): freeze, in place (LLaMA-Factory
    # freeze_extra_modules, adapter.py _setup_freeze_tuning); LoRA / QLoRA, as peft modules_to_save: a trainable copy
    # beside the frozen original (additional_target, _setup_lora_tuning; peft utils/other.py ModulesToSaveWrapper)
    extra_modules: tuple[str, ...] = ()
    # freeze: the sub-modules of each trained layer that train (LLaMA-Factory freeze_trainable_modules: the first
    # name under the layer, matched as `.{idx}.{name}`); FREEZE_MODULES
    trainable_modules: tuple[str, ...] = ("all",)
    parallel: Parallelism = Parallelism()  # ranks, nodes, sharding, offload (memplan.spec.parallel)
    # the training stack (memplan.spec.stacks): hf unless the input names one (a LLaMA-Factory YAML: llamafactory)
    stack: Stack = Stack.HF
    # evaluation during training (HF Trainer / LLaMA-Factory do_eval, val_size, eval_strategy): the eval micro-batch
    # (per_device_eval_batch_size), 0 for none. A no-grad forward of that batch after a step: a run phase
    eval_batch_size: int = 0
    # DPO (LLaMA-Factory stage: dpo): each micro-batch row is a chosen + rejected pair; dpo_reference False for the
    # reference-free losses (pref_loss orpo / simpo: finetuning_args.py use_ref_model)
    stage: Stage = Stage.SFT
    dpo_reference: bool = True
    # GaLore / APOLLO (optimizers with a Projection): the rank, the target modules (LLaMA-Factory galore_target /
    # apollo_target: "all" = every decoder linear) and the projected side; LLaMA-Factory's defaults
    proj_rank: int = 16
    proj_targets: tuple[str, ...] = (ALL_LINEAR,)
    proj_type: ProjType = ProjType.STD
    # LLaMA-Factory upcast_lmhead_output: a forward hook casts the LM head's output to fp32
    # (model_utils/checkpointing.py prepare_model_for_training L200-204, _fp32_forward_post_hook)
    upcast_lmhead_output: bool = False
    # LLaMA-Factory upcast_layernorm: 1-D norm weights cast to fp32 (prepare_model_for_training L171-175)
    upcast_layernorm: bool = False
    # the images a vision-language run feeds its tower (memplan.spec.visual); None: text-only inputs
    visual: VisualInput | None = None

    def __post_init__(self) -> None:
        problems: list[str | Problem] = []
        for name in ("batch_size", "grad_accum", "seq_len", "lora_rank"):
            problems += positive_int(name, getattr(self, name))
        n = self.freeze_trainable_layers
        if not isinstance(n, int) or isinstance(n, bool) or n == 0 or (self.llama_pro and n < 0):
            problems.append(Problem("freeze_trainable_layers", f"{{}} must be a non-zero integer (positive with "
                                                               f"llama_pro), got {n!r}"))
        if self.llama_pro and self.method is Method.FULL:  # finetuning_args.py L592-593 refuses the same
            problems.append(Problem("llama_pro", "{} is only valid for freeze or LoRA training (it picks the expanded "
                                                 "blocks that train)"))
        if self.lora_alpha is not None:
            problems += positive_int("lora_alpha", self.lora_alpha)
        if unknown := [m for m in self.extra_modules if m not in EXTRA_MODULES]:
            problems.append(Problem("extra_modules", f"{{}} {','.join(map(str, unknown))}: memplan models "
                                                     f"{' and '.join(EXTRA_MODULES)}"))
        if not self.trainable_modules or [m for m in self.trainable_modules if m not in FREEZE_MODULES]:
            problems.append(Problem("trainable_modules", f"{{}} {','.join(map(str, self.trainable_modules))}: memplan "
                                                         f"models {', '.join(FREEZE_MODULES)}"))
        elif "all" not in self.trainable_modules and self.method is not Method.FREEZE:
            problems.append(Problem("trainable_modules", "{} apply to freeze training (the trained layers' parts)"))
        if self.extra_modules and self.method is Method.FULL:
            problems.append(Problem("extra_modules", "{} apply to freeze or LoRA training (full trains every module)"))
        if not isinstance(self.eval_batch_size, int) or isinstance(self.eval_batch_size, bool) or \
                self.eval_batch_size < 0:
            problems.append(Problem("eval_batch_size", f"{{}} must be 0 (no evaluation) or a positive integer, got "
                                                       f"{self.eval_batch_size!r}"))
        if not isinstance(self.lora_dropout, (int, float)) or not 0.0 <= self.lora_dropout < 1.0:
            problems.append(Problem("lora_dropout", f"{{}} must be in [0, 1), got {self.lora_dropout!r}"))
        if self.quant_type not in ("nf4", "fp4"):
            problems.append(Problem("quant_type", f"{{}} must be nf4 or fp4, got {self.quant_type!r}"))
        bits = QUANT_BITS.get(self.quant_method, ())
        if self.quant_bits not in bits:
            problems.append(Problem("quant_bits", f"{{}} must be one of {'/'.join(map(str, bits))} with "
                                                  f"{self.quant_method.value}, got {self.quant_bits!r}"))
        if self.attn is Attention.FLASH_ATTENTION_2 and self.precision is Precision.FP32:
            problems.append(Problem("attn", "{} flash_attention_2 needs fp16/bf16 (it has no fp32 kernel): use bf16 "
                                            "or sdpa"))
        problems += self._optimizer_problems()
        if self.adapter is Adapter.OFT and (self.oft_rank != 0) == (self.oft_block_size != 0):
            # peft OFTConfig.__post_init__ (tuners/oft/config.py L189-196) raises the same
            problems.append(Problem("oft_block_size", "{} and oft_rank: give exactly one of them (the other 0): "
                                                      "rank x block size = in_features"))
        for name in ("oft_block_size", "oft_rank"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                problems.append(Problem(name, f"{{}} must be a non-negative integer, got {getattr(self, name)!r}"))
        if self.adapter is not Adapter.LORA and not self.is_lora:
            problems.append(Problem("adapter", f"{{}} {self.adapter.value} is an adapter: it needs method lora or "
                                               "qlora"))
        if self.pissa_init and self.method is Method.QLORA:
            # peft LoraLayer.pissa_init refuses a 4/8-bit weight (tuners/lora/layer.py L432-436); LLaMA-Factory
            # points to scripts/pissa_init.py, which initialises the full model and quantizes the residual later
            problems.append(Problem("pissa_init", "{} needs an unquantized base (peft initialises PiSSA from the "
                                                  "weights' SVD): initialise it on the unquantized model"))
        if self.pissa_init and (self.adapter is Adapter.OFT or not self.is_lora):
            problems.append(Problem("pissa_init", "{} is only valid for LoRA training (LLaMA-Factory "
                                                  "finetuning_args.py)"))
        if self.offload_checkpoints and not self.checkpointing:
            problems.append(Problem("offload_checkpoints", "{} offloads the checkpointed layer inputs: it needs "
                                                           "checkpointing on"))
        if not self.lora_targets:
            problems.append(Problem("lora_targets", "{} is empty: name modules (q_proj,v_proj) or all-linear"))
        if self.visual is not None:
            problems += self.visual.problems()
        if problems:
            raise ConfigError(problems)

    def _optimizer_problems(self) -> list[str | Problem]:
        """What LLaMA-Factory refuses whatever the engine (finetuning_args.py __post_init__, trainer_utils.py
        _create_galore_optimizer); GaLore under DeepSpeed or torchrun: memplan.formats.llamafactory_rules."""
        opt, out = facts(self.optimizer), positive_int("proj_rank", self.proj_rank)
        if opt.full_only and self.is_lora:
            out.append(Problem("optimizer", f"{{}} {self.optimizer.value} trains full weights: use method full or "
                                            "freeze (LLaMA-Factory: cannot use LoRA with GaLore, APOLLO or BAdam)"))
        if opt.per_param and self.grad_accum > 1:
            out.append(Problem("grad_accum", f"{{}} must be 1 with {self.optimizer.value} (its step runs inside "
                                             f"backward: no gradient accumulation), got {self.grad_accum}"))
        if not self.proj_targets:
            out.append(Problem("proj_targets", "{} is empty: name modules (q_proj,v_proj) or all-linear"))
        return out

    # ---- the parallel layout, read through (memplan.spec.parallel.Parallelism) -------------------------------
    @property
    def gpus(self) -> int:
        return self.parallel.gpus

    @property
    def nodes(self) -> int:
        return self.parallel.nodes

    @property
    def sharding(self) -> Sharding:
        return self.parallel.sharding

    @property
    def offload(self) -> Offload:
        return self.parallel.offload

    @property
    def ds_reduce_bucket(self) -> int | None:
        return self.parallel.ds_reduce_bucket

    def trainable_layer_ids(self, num_layers: int) -> range:
        """The decoder layers that train, as LLaMA-Factory picks them: their own weights (full: all; freeze, model/
        adapter.py _setup_freeze_tuning: N > 0 the last N, N < 0 the first |N|) or their adapters (LoRA / QLoRA:
        all). llama_pro (freeze or LoRA: model_utils/misc.py find_expanded_modules): every stride-th from stride - 1
        (stride = L / N; LLaMA-Factory refuses L not divisible by N), the expanded blocks."""
        n = self.freeze_trainable_layers
        if self.method is Method.FULL or (self.is_lora and not self.llama_pro):
            return range(num_layers)
        if self.llama_pro:
            if num_layers % n:
                raise ConfigError(Problem("freeze_trainable_layers", f"{{}} {n} must divide the {num_layers} layers "
                                                                     "with llama_pro"))
            stride = num_layers // n
            return range(stride - 1, num_layers + stride - 1, stride)
        return range(max(0, num_layers - n), num_layers) if n > 0 else range(min(-n, num_layers))

    def check_extra_modules(self, tie_word_embeddings: bool) -> None:
        """Freeze over tied embeddings has no lm_head parameter to name (named_parameters lists the tied weight
        once, as embed_tokens): LLaMA-Factory raises "Module lm_head is not found" (adapter.py
        _setup_freeze_tuning); train embed_tokens, the same tensor."""
        if tie_word_embeddings and self.method is Method.FREEZE and "lm_head" in self.extra_modules:
            raise ConfigError(Problem("extra_modules", "{} lm_head (freeze_extra_modules): the model ties it to "
                                                       "embed_tokens, which has the "
                                                       "only parameter (LLaMA-Factory: Module lm_head is not found); "
                                                       "name embed_tokens"))

    @property
    def fsdp_version(self) -> int:
        return self.parallel.fsdp_version

    @property
    def is_lora(self) -> bool:
        return self.method in (Method.LORA, Method.QLORA)

    @property
    def has_reference(self) -> bool:
        """A preference stage that runs a reference (DPO unless reference-free; KTO always)."""
        return self.stage is Stage.KTO or (self.stage is Stage.DPO and self.dpo_reference)

    @property
    def separate_reference(self) -> bool:
        """The reference is a second, frozen model: LLaMA-Factory's create_ref_model (train/trainer_utils.py
        L136-146) loads one unless finetuning_type is lora (whose policy disables its adapters instead): full,
        freeze and OFT (QOFT: with the same quantization_bit, ModelArguments.copyfrom(model_args))."""
        return self.has_reference and (not self.is_lora or self.adapter is Adapter.OFT)

    @property
    def gpus_per_node(self) -> int:
        return self.parallel.gpus_per_node

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.gpus

    @property
    def alpha(self) -> int:
        return self.lora_alpha if self.lora_alpha is not None else 2 * self.lora_rank

    def with_(self, **changes: object) -> TrainConfig:
        """A copy with some knobs changed (validated again); the parallel fields may be given flat (gpus=8)."""
        flat = {k: changes.pop(k) for k in list(changes) if k in PARALLEL_FIELDS}
        if flat:
            changes["parallel"] = replace(changes.get("parallel", self.parallel), **flat)  # type: ignore[arg-type]
        seen = {k: changes.pop(k) for k in list(changes) if k in VISUAL_FIELDS}  # images=2: the visual input's
        if seen:
            changes["visual"] = replace(changes.get("visual") or self.visual or VisualInput(), **seen)  # type: ignore
        return replace(self, **changes)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, object]:
        """Flat JSON-ready dict (the parallel fields beside the others): probe requests, cache keys, studies."""
        out: dict[str, object] = {}
        for f in fields(self):
            if f.name not in ("parallel", "visual"):
                out[f.name] = _plain(getattr(self, f.name))
        out.update((name, _plain(getattr(self.parallel, name))) for name in PARALLEL_FIELDS)
        out["lora_alpha"] = self.alpha
        if self.visual is not None:  # text-only runs keep their keys as they were
            out["visual"] = {f.name: getattr(self.visual, f.name) for f in fields(self.visual)}
        return out


def _plain(value: object) -> object:
    return value.value if isinstance(value, Enum) else list(value) if isinstance(value, tuple) else value


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


# the fields whose values are choices (enums): one table for every reader of flat values (JSON, the CLI)
CHOICES: dict[str, type[Enum]] = {"method": Method, "precision": Precision, "optimizer": Optimizer,
                                  "attn": Attention, "sharding": Sharding, "offload": Offload, "stack": Stack,
                                  "stage": Stage, "proj_type": ProjType, "adapter": Adapter,
                                  "quant_method": QuantMethod}


def train_from_dict(data: dict[str, object]) -> TrainConfig:
    """Inverse of TrainConfig.to_dict (unknown keys such as effective_batch are ignored)."""
    kw: dict[str, object] = {}
    for name in [f.name for f in fields(TrainConfig) if f.name not in ("parallel", "visual")] + list(PARALLEL_FIELDS):
        if name in data:
            value = data[name]
            kw[name] = CHOICES[name](value) if name in CHOICES else tuple(value) if name in (
                "lora_targets", "proj_targets", "extra_modules", "trainable_modules") else value  # type: ignore[arg-type]
    if isinstance(data.get("visual"), dict):
        kw["visual"] = VisualInput(**data["visual"])  # type: ignore[arg-type]
    return TrainConfig().with_(**kw)
