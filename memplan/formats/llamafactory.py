"""LLaMA-Factory training YAML: read it into (model, TrainConfig) keeping every key memplan does not model, and
write a plan back with the input's other keys kept in place.

Defaults are LLaMA-Factory's own (hparams/finetuning_args.py, model_args.py) and HF Seq2SeqTrainingArguments':
finetuning_type lora, lora_rank 8, lora_alpha 2 x rank, lora_target all, cutoff_len 2048, per-device batch 8,
accumulation 1, optim adamw_torch_fused (transformers 5.6's default with torch >= 2.8), flash_attn auto, no
bf16/fp16 (fp32), checkpointing on.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from memplan.errors import ConfigError
from memplan.formats.deepspeed import deepspeed_candidates, deepspeed_config, read_deepspeed
from memplan.formats.llamafactory_rules import (  # noqa: F401 - NOT_TRAINING, REJECTED, launch_world: public here
    NOT_TRAINING,
    REJECTED,
    fsdp_on,
    launch_from_text,
    launch_line,
    launch_world,
    not_training,
    predicts_with_generate,
    rejections,
)
from memplan.formats.llamafactory_visual import visual_from_yaml
from memplan.spec import optimizers
from memplan.spec.generation import Generation
from memplan.spec.model import ModelSpec
from memplan.spec.parallel import Offload, Sharding
from memplan.spec.stacks import Stack
from memplan.spec.train import (
    ALL_LINEAR,
    EXTRA_MODULES,
    FREEZE_MODULES,
    Adapter,
    Attention,
    Method,
    Precision,
    ProjType,
    Stage,
    TrainConfig,
)

# TrainConfig field -> the YAML key that carries it (problems are spelled with these names)
KEYS = {"method": "finetuning_type", "batch_size": "per_device_train_batch_size",
        "grad_accum": "gradient_accumulation_steps", "seq_len": "cutoff_len", "checkpointing":
        "disable_gradient_checkpointing", "optimizer": "optim", "attn": "flash_attn", "lora_rank": "lora_rank",
        "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout", "lora_targets": "lora_target",
        "quant_bits": "quantization_bit", "freeze_trainable_layers": "freeze_trainable_layers",
        "quant_method": "quantization_method", "quant_type": "quantization_type",
        "double_quant": "double_quantization", "llama_pro": "use_llama_pro",
        "precision": "bf16/fp16/pure_bf16", "gpus": "--gpus", "nodes": "--nodes", "sharding": "deepspeed",
        "offload": "deepspeed offload", "ds_reduce_bucket": "reduce_bucket_size",
        "fsdp_version": "fsdp_config version", "proj_rank": "galore_rank", "proj_targets": "galore_target",
        "proj_type": "galore_proj_type",
        "adapter": "finetuning_type/use_dora", "oft_block_size": "oft_block_size", "oft_rank": "oft_rank",
        "pissa_init": "pissa_init", "pissa_iter": "pissa_iter", "liger_kernel": "enable_liger_kernel",
        "offload_checkpoints": "use_unsloth_gc", "extra_modules": "freeze_extra_modules/additional_target",
        "trainable_modules": "freeze_trainable_modules"}
# (YAML key, TrainConfig field, LLaMA-Factory's default) of the integer knobs
_INTS = (("per_device_train_batch_size", "batch_size", 8), ("gradient_accumulation_steps", "grad_accum", 1),
         ("cutoff_len", "seq_len", 2048), ("lora_rank", "lora_rank", 8),
         ("freeze_trainable_layers", "freeze_trainable_layers", 2))
# ModelArguments.flash_attn, LLaMA-Factory's AttentionFunction (extras/constants.py): auto, disabled (eager), sdpa,
# fa2, fa3; fa3's kernel saves what fa2's does (q, k, v, out, softmax_lse): estimated as flash_attention_2. The
# first name of each is what an export writes.
_ATTN: dict[Attention, tuple[str, ...]] = {Attention.AUTO: ("auto",), Attention.SDPA: ("sdpa",),
                                           Attention.EAGER: ("disabled",),
                                           Attention.FLASH_ATTENTION_2: ("fa2", "fa3")}
# Keys that change memory but are not modelled yet, with the values memplan does model (LLaMA-Factory's defaults:
# hparams/finetuning_args.py, model_args.py, data_args.py, training_args.py at its HEAD). Present with another value,
# they are named in one warning line, never silently ignored. use_reentrant_gc: model_utils/checkpointing.py passes
# it to gradient_checkpointing_enable (memplan models transformers' non-reentrant checkpoint).
NOT_MODELLED: dict[str, tuple[object, ...]] = {
    "stage": ("sft", "pt", "dpo", "rm", "kto"), "ref_model": (None,),
    "pref_loss": ("sigmoid", "hinge", "ipo", "orpo", "simpo"),
    "use_badam": (False,), "apollo_proj": ("random",), "use_unsloth": (False,),
    "fp8": (False,), "mixture_of_depths": (None,), "neat_packing": (False,),
    "shift_attn": (False,),
    "resize_vocab": (False,), "predict_with_generate": (False,), "use_kt": (False,),
    # Megatron-Core runs (hparams/megatron_bridge_args.py l.32-48, finetuning_args.py l.476 use_mca)
    "use_mca": (False,), "tensor_model_parallel_size": (1,), "pipeline_model_parallel_size": (1,),
    "expert_model_parallel_size": (1,), "context_parallel_size": (1,),
    "freeze_language_model": (False,),  # vision-language runs (memplan.formats.llamafactory_visual)
}
_MEGATRON = ("Megatron-Core parallelism (LLaMA-Factory's mcore path, hparams/megatron_bridge_args.py) splits each "
             "layer's weights and activations over the tensor-parallel ranks, the layers over pipeline stages, the "
             "experts and the sequence over their groups: not modelled, the estimate is one data-parallel GPU "
             "holding the whole model under the HF Trainer")
# Why each of these keys (the ones this table's values leave out) is not modelled, in the warning line and README.
# A key without an entry reads "not modelled yet".
WHY_NOT: dict[str, str] = {
    "freeze_trainable_modules": "a name other than all / self_attn / mlp / input_layernorm / "
                                "post_attention_layernorm: the estimate trains whole layers",
    "freeze_extra_modules": "a name other than embed_tokens / lm_head (norm: LLaMA-Factory's substring match trains "
                            "every norm of every layer, which also checkpoints the frozen layers) is left out of the "
                            "estimate",
    "additional_target": "a name other than embed_tokens / lm_head (norm: peft's endswith match copies every "
                         "*norm module of every layer) is left out of the estimate",
    "fp8": "fp8 mixed precision through accelerate (train/fp8_utils.py create_fp8_kwargs: torchao, TE or MS-AMP "
           "by fp8_backend): each backend's fp8 weight copies and scales are not modelled",
    "mixture_of_depths": "MoD routes a fraction of the tokens through each layer (model_utils/mod.py): activations "
                         "shrink by the routing capacity, not modelled",
    "neat_packing": "packed sequences with per-sequence attention masks (data/processor/supervised.py): the "
                    "estimate takes every row cutoff_len tokens long (packing: the same shapes, modelled)",
    "shift_attn": "LongLoRA's shifted sparse attention (model_utils/longlora.py) splits attention into groups: "
                  "not modelled (its memory is at most the estimate's attention)",
    "resize_vocab": "the embedding and head grow to len(tokenizer) rounded up to a multiple of 64 (model_utils/"
                    "embedding.py resize_embedding_layer L308); the tokenizer is not read, the config's vocab is used",
    "predict_with_generate": "generation during evaluation of a training run (KV cache, max_new_tokens) is not "
                             "modelled; a prediction run (do_predict without do_train) is",
    "use_badam": "BAdam trains one block at a time (train/trainer_utils.py _create_badam_optimizer: the others "
                 "frozen, one block's fp32 copy, gradients and states): not modelled, the full step is estimated",
    "apollo_proj": "APOLLO's SVD projector (a full SVD per update) is not modelled: the random projector is",
    "use_unsloth": "Unsloth's own patched model and kernels (its fused ops save other tensors): not modelled",
    "use_kt": "KTransformers' AMX MoE backend (hparams/model_args.py L469-472, kt_config): the routed experts' "
              "weights and compute run on the CPU, so the GPU holds far less than the estimate, which keeps every "
              "expert on the GPU",
    **{key: _MEGATRON for key in ("use_mca", "tensor_model_parallel_size", "pipeline_model_parallel_size",
                                  "expert_model_parallel_size", "context_parallel_size")},
    "ref_model": "a separate reference model (its weights beside the policy) is not modelled: the policy's own "
                 "weights serve as the reference",
    "freeze_language_model": "a frozen decoder under a trained tower (model_utils/visual.py get_forbidden_modules): "
                             "not modelled, the decoder trains as finetuning_type says",
}
# The keys memplan reads into the estimate, with what each sets (the README's key table is rendered from these,
# NOT_MODELLED and WHY_NOT: `key_table`)
MODELLED: dict[str, str] = {
    "model_name_or_path": "the model (a catalog name, a hub id, a local folder with config.json)",
    "stage": "sft / pt: the SFT step; dpo: chosen + rejected pairs and the reference forward; rm: chosen + "
             "rejected pairs through a value head (no vocabulary loss in backward); kto: the target rows, a no-grad KL "
             "batch and the reference's forwards of both; ppo refused",
    "pref_loss": "orpo / simpo: DPO without the reference forward",
    "finetuning_type": "full, freeze, lora or oft (with quantization_bit: QLoRA / QOFT)",
    "bf16": "AMP bf16: fp32 trainable weights, bf16 autocast; the frozen base in the checkpoint's dtype "
            "(memplan.spec.dtypes)", "fp16": "AMP fp16",
    "pure_bf16": "trainable weights, gradients and optimizer states in the checkpoint's dtype (bf16); LoRA "
                 "adapters fp32 (peft's autocast_adapter_dtype); no autocast",
    "per_device_train_batch_size": "the micro-batch", "gradient_accumulation_steps": "micro-steps per step",
    "cutoff_len": "the sequence length (every row at it)",
    "disable_gradient_checkpointing": "LLaMA-Factory's reentrant checkpointing of trained layers, on by default",
    "optim": "the optimizer (memplan.spec.optimizers)", "optim_args": "its arguments (8-bit, ...)",
    "flash_attn": "the attention kernel: auto, disabled (eager), sdpa, fa2, fa3",
    "lora_rank": "LoRA rank", "lora_alpha": "(read for the export; no memory)", "lora_dropout": "dropout's mask",
    "lora_target": "which linears carry adapters",
    "quantization_bit": "QLoRA's base storage: bnb 4/8, hqq 1/2/3/4/5/6/8, eetq 8",
    "quantization_method": "bnb, hqq (packed + fp16 scale/zero per 64), eetq (int8 + fp16 scales); awq, gptq, aqlm "
                           "refused (a checkpoint's own quantization_config: memplan.spec.prequantized)",
    "quantization_type": "bnb 4-bit nf4 or fp4 (the same storage)",
    "double_quantization": "bnb 4-bit: 8-bit absmax with an fp32 one per 256, else fp32 absmax per 64",
    "freeze_trainable_layers": "freeze: the last N layers train; negative, the first -N (frozen layers above them "
                               "save their input-gradient tape, unchecked)",
    "freeze_trainable_modules": "freeze: only these sub-modules of the trained layers train (self_attn, mlp, "
                                "input_layernorm, post_attention_layernorm; model/adapter.py _setup_freeze_tuning "
                                "`.{idx}.{name}`): their weights, gradients and states, and what their backward saves",
    "freeze_extra_modules": "freeze: embed_tokens / lm_head train in place (model/adapter.py _setup_freeze_tuning; "
                            "fp32 weight, gradient and optimizer states; a trained embedding puts every layer on the "
                            "backward path and makes the residual stream fp32 under autocast)",
    "additional_target": "LoRA / OFT: peft modules_to_save of embed_tokens / lm_head, a trainable fp32 copy beside "
                         "the frozen original (peft utils/other.py ModulesToSaveWrapper; LLaMA-Factory casts it, "
                         "adapter.py L286-288)",
    "use_llama_pro": "only the expanded blocks (every L/N-th layer, N = freeze_trainable_layers) train: freeze, their "
                     "weights; LoRA / OFT, their adapters alone (model_utils/misc.py find_expanded_modules)",
    "deepspeed": "ZeRO stage and offload from its JSON (looked for in the working directory, then the YAML's folder "
                 "and each above it)", "fsdp": "FSDP sharding strategy and offload",
    "fsdp_config": "its version: 1 (FSDP1) or 2 (FSDP2 fully_shard); unset, HF Trainer's default 2 "
                   "(transformers 5 training_args.py)",
    "do_eval": "the evaluation phase", "eval_strategy": "the evaluation phase",
    "per_device_eval_batch_size": "the evaluation forward's batch; a prediction run's generation batch",
    "rope_scaling": "any type (linear, dynamic, yarn, llama3; model_utils/rope.py configure_rope): no memory of its "
                    "own, the rotary tables have cutoff_len's shape (the CPU step measured equal to the byte)",
    "upcast_layernorm": "1-D norm weights in fp32 (model_utils/checkpointing.py L171-175): fp32 norm outputs under "
                        "autocast, each following linear casting its own half copy",
    "upcast_lmhead_output": "the LM head's output cast to fp32 by a forward hook (model_utils/checkpointing.py "
                            "L200-204): fp32 logits kept, the loss's upcast a no-op",
    "use_reentrant_gc": "either value: the llamafactory stack's checkpointing (measured within 168 B)",
    "evaluation_strategy": "eval_strategy's older name", "output_dir": "kept in the export (no memory)",
    "do_train": "false: refused, not a training run (memplan.formats.llamafactory_rules NOT_TRAINING)",
    "do_predict": "without do_train, with predict_with_generate (stage sft): inference memory (memplan.predict."
                  "generation: weights in the eval dtype, KV cache, last logits); without predict_with_generate "
                  "refused",
    "max_new_tokens": "a prediction run: the generated positions the KV cache holds (default 1024)",
    "num_beams": "a prediction run: rows generate runs and caches per prompt (default 1)",
    "infer_dtype": "a prediction run without bf16 / fp16: the eval dtype (auto: 2 bytes on a GPU)",
    "export_dir": "refused: an export (merge) config", "task": "refused: an evaluation-task config",
    "infer_backend": "refused: a chat / API config",
    "use_galore": "GaLore over AdamW: Adam states of each target's rank-r projected gradient + its projector "
                  "(memplan.spec.optimizers)",
    "galore_layerwise": "the step inside backward per parameter: one gradient alive at a time",
    "galore_rank": "the projection rank", "galore_target": "the projected linears (all: every decoder linear)",
    "galore_proj_type": "which side of each matrix is projected (std, reverse_std, left, right)",
    "use_apollo": "APOLLO over AdamW: low-rank random-projection states", "apollo_layerwise": "as galore_layerwise",
    "apollo_rank": "the projection rank", "apollo_target": "the projected linears",
    "apollo_proj_type": "which side of each matrix is projected",
    "use_adam_mini": "Adam-mini: one second moment per block / head, the first moment full",
    "use_muon": "Muon: one momentum buffer for 2-D hidden matrices, AdamW for the rest",
    "use_dora": "DoRA: a magnitude per output, the weight norm; each linear materialises its weight in forward",
    "pissa_init": "LoRA from each target's SVD: a load-phase transient (training as LoRA)",
    "pissa_iter": "fast-SVD iterations (-1: the full SVD)",
    "oft_rank": "OFT: blocks per layer (finetuning_type: oft; with quantization_bit: QOFT)",
    "oft_block_size": "OFT: the rotation's block size",
    "enable_liger_kernel": "Liger's fused linear cross-entropy (no logits, chunked), RMSNorm, SwiGLU for the model "
                           "types LLaMA-Factory patches (memplan.predict.kernels)",
    "use_unsloth_gc": "checkpointed layer inputs offloaded to host memory (UnslothGradientCheckpointing)",
    # vision-language runs (memplan.formats.llamafactory_visual, memplan.spec.visual, memplan.predict.vision)
    "template": "a Qwen-VL template (qwen2_vl, qwen3_vl, qwen3_vl_nothink, qwen3_5 ...) feeds the dataset's images to "
                "the vision tower; any other: text only",
    "dataset": "with a Qwen-VL template: images per sample (mllm_demo: 2; other image datasets 1; text ones 0; a "
               "dataset not in LLaMA-Factory's dataset_info.json: 1, said in the output)",
    "image_max_pixels": "each image's pixels (a square after LLaMA-Factory's resize, then the processor's "
                        "smart_resize): vision patches and visual tokens",
    "image_min_pixels": "each image's least pixels",
    "freeze_vision_tower": "true (default): the tower frozen (its forward still saves its tape where peft's "
                           "enable_input_require_grads hooks patch_embed: Qwen2-VL / Qwen2.5-VL LoRA with "
                           "checkpointing); false: warned, not modelled",
    "freeze_multi_modal_projector": "true (default): the merger frozen; false: warned, not modelled",
}


def key_table() -> list[tuple[str, str, str]]:
    """(key, status, what) of every LLaMA-Factory key memplan reads or warns about, sorted by key."""
    rows = []
    for key in sorted({*MODELLED, *NOT_MODELLED}):
        values = ", ".join("null" if v is None else _yaml_value(v) for v in NOT_MODELLED.get(key, ()))
        if key in MODELLED and key in NOT_MODELLED:
            why = "; ".join(f"{k.split('=')[1]}: {v}" for k, v in WHY_NOT.items() if k.startswith(f"{key}=")) \
                or WHY_NOT.get(key, "not modelled yet")
            status, what = f"modelled: {values}; else warned", f"{MODELLED[key]}. Else: {why}"
        elif key in MODELLED and key not in WHY_NOT:
            status, what = "modelled", MODELLED[key]
        elif key in MODELLED:
            status, what = "modelled; warned where noted", f"{MODELLED[key]}. Warned: {WHY_NOT[key]}"
        else:
            status, what = f"warned unless {values}", WHY_NOT.get(key, "not modelled yet")
        rows.append((key, status, what.rstrip(". ")))
    return rows


def key_table_markdown() -> str:
    """The README's table of LLaMA-Factory keys (between its `lf-keys` markers; tests/test_lf_keys.py checks it)."""
    lines = ["| key | status | what memplan does with it |", "|---|---|---|"]
    lines += [f"| `{k}` | {status} | {what.replace('|', '/')} |" for k, status, what in key_table()]
    return "\n".join(lines)


# use_reentrant_gc (either value) is the llamafactory stack's checkpointing (memplan.spec.stacks: both flavours
# measured within 168 B); do_eval / eval_strategy / val_size / per_device_eval_batch_size: the eval run phase.
# LLaMA-Factory's optimizer switches (hparams/finetuning_args.py GaloreArguments, ApolloArguments, use_adam_mini,
# use_muon): a plan that changes the optimizer writes them anew
_OPTIM_KEYS = ("use_galore", "galore_layerwise", "galore_rank", "galore_target", "galore_proj_type", "use_apollo",
               "apollo_layerwise", "apollo_rank", "apollo_target", "apollo_proj_type", "use_adam_mini", "use_muon")
_PLAN_OWNED = ("bf16", "fp16", "pure_bf16", "quantization_bit", "quantization_method", "quantization_type",
               "double_quantization", "lora_rank", "lora_alpha", "lora_dropout",
               "lora_target", "freeze_trainable_layers", "deepspeed", "fsdp", "fsdp_config", *_OPTIM_KEYS,
               "finetuning_type", "use_dora", "pissa_init", "pissa_iter", "oft_rank", "oft_block_size",
               "enable_liger_kernel", "use_unsloth_gc")
# HF TrainingArguments.fsdp (transformers training_args.py FSDPOption): the sharding strategy of each option. LLaMA-
# Factory passes it through to HF Trainer (its TrainingArguments extends Seq2SeqTrainingArguments:
# hparams/training_args.py); examples/extras/fp8/llama3_fp8_fsdp_sft.yaml sets `fsdp: [full_shard, auto_wrap]`.
_FSDP = {"full_shard": Sharding.FULL_SHARD, "shard_grad_op": Sharding.SHARD_GRAD_OP,
         "hybrid_shard": Sharding.HYBRID_SHARD, "no_shard": Sharding.NO_SHARD}


@dataclass(frozen=True, slots=True, kw_only=True)
class LlamaFactoryConfig:
    """What memplan read from the YAML, and the YAML itself (`raw`, every key as written)."""

    model: str  # model_name_or_path
    train: TrainConfig
    raw: dict[str, Any] = field(default_factory=dict)
    output_dir: str | None = None
    deepspeed: str | None = None  # path of a DeepSpeed JSON, kept as written
    not_modelled: tuple[str, ...] = ()  # `key=value` of keys that change memory and are not modelled yet
    gpus_from: str | None = None  # where train.gpus came from (the environment, the launch line); None: not said
    # a prediction run (do_predict + predict_with_generate): estimated as inference (memplan.predict.generation)
    generation: Generation | None = None


# ---- reading --------------------------------------------------------------------------------------------------
def _bool(raw: dict[str, Any], key: str, default: bool = False) -> bool:
    value = raw.get(key, default)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    return value


def _method(raw: dict[str, Any]) -> Method:
    kind = str(raw.get("finetuning_type", "lora")).lower()
    bits = raw.get("quantization_bit")
    if kind not in ("full", "freeze", "lora", "oft"):
        raise ConfigError(f"finetuning_type {kind!r}: choose one of full, freeze, lora, oft")
    if bits is not None:
        if kind not in ("lora", "oft"):  # model/adapter.py init_adapter L331-332 refuses the same
            raise ConfigError(f"quantization_bit with finetuning_type {kind}: quantized models train LoRA or OFT "
                              "adapters only (finetuning_type: lora or oft)")
        return Method.QLORA
    return Method.LORA if kind == "oft" else Method(kind)


def _adapter(raw: dict[str, Any]) -> dict[str, Any]:
    """The adapter fields (model/adapter.py _setup_lora_tuning L255-313): OFT (finetuning_type oft: OFTConfig with
    r=oft_rank, oft_block_size; its target_modules come from lora_target, oft_target is not read there;
    module_dropout is stored by peft 0.21 but never applied in forward), DoRA (use_dora), PiSSA (pissa_init,
    pissa_iter)."""
    out: dict[str, Any] = {}
    if str(raw.get("finetuning_type", "lora")).lower() == "oft":
        out["adapter"] = Adapter.OFT
        out["oft_rank"] = raw.get("oft_rank", 0)  # finetuning_args.py L143-150 defaults
        out["oft_block_size"] = raw.get("oft_block_size", 32)
    elif _bool(raw, "use_dora"):
        out["adapter"] = Adapter.DORA
    if _bool(raw, "pissa_init"):
        out["pissa_init"] = True
        out["pissa_iter"] = raw.get("pissa_iter", 16)
    return out


def _precision(raw: dict[str, Any]) -> Precision:
    if _bool(raw, "pure_bf16"):
        return Precision.PURE_BF16
    bf16, fp16 = _bool(raw, "bf16"), _bool(raw, "fp16")
    if bf16 and fp16:
        raise ConfigError("bf16 and fp16 are both true: choose one")
    return Precision.BF16 if bf16 else Precision.FP16 if fp16 else Precision.FP32


def _targets(value: Any) -> tuple[str, ...]:
    names = value if isinstance(value, list) else str(value).split(",")
    names = [str(n).strip() for n in names if str(n).strip()]
    return (ALL_LINEAR,) if names in ([], ["all"]) else tuple(names)


def _fsdp(raw: dict[str, Any]) -> dict[str, Any]:
    """HF's `fsdp` key (a space-separated string or a list of FSDPOption) -> Parallelism fields; `offload` is
    FSDP's CPUOffload(offload_params=True): parameters, gradients and the optimizer step on the host."""
    value = raw.get("fsdp")
    if value in (None, "", False, []):
        return {}
    options = value if isinstance(value, list) else str(value).split()
    options = [str(o).strip().lower() for o in options]
    strategies = [o for o in options if o in _FSDP]
    unknown = [o for o in options if o not in (*_FSDP, "offload", "auto_wrap")]
    if unknown or len(strategies) > 1:
        raise ConfigError(f"fsdp {' '.join(options)!r}: memplan models one of {', '.join(_FSDP)}, with offload and "
                          "auto_wrap")
    if raw.get("deepspeed"):
        raise ConfigError("fsdp and deepspeed are both set: HF Trainer runs one engine, give one")
    out: dict[str, Any] = {"sharding": _FSDP[strategies[0]] if strategies else Sharding.FULL_SHARD,
                           "fsdp_version": _fsdp_config_version(raw.get("fsdp_config"))}
    if "offload" in options:
        out["offload"] = Offload.PARAMS
    return out


# HF TrainingArguments' `fsdp` key wraps with fsdp_config's `version` (an `fsdp_` prefix is dropped first):
# `int(self.fsdp_config.get("version", 2))` in transformers 5.x (training_args.py, read in 5.16 and 5.24; 4.x
# defaulted to 1). accelerate's own launch config (examples/accelerate/fsdp_config.yaml) is not a training YAML key.
_FSDP_CONFIG_VERSION = 2


def _fsdp_config_version(value: Any) -> int:
    """fsdp_config: a mapping or the path of a JSON file (HF Trainer opens it from the launch directory)."""
    if value is None:
        return _FSDP_CONFIG_VERSION
    if isinstance(value, str):
        import json

        try:
            value = json.loads(Path(value).read_text())
        except (OSError, ValueError) as err:
            raise ConfigError(f"fsdp_config {value!r}: cannot read it as a JSON file ({type(err).__name__}); HF "
                              "Trainer opens it relative to the launch directory") from None
    if not isinstance(value, dict):
        raise ConfigError(f"fsdp_config must be a mapping or a JSON file path, got {value!r}")
    version = value.get("version", value.get("fsdp_version", _FSDP_CONFIG_VERSION))
    if str(version).strip() not in ("1", "2"):
        raise ConfigError(f"fsdp_config version {version!r}: torch FSDP versions are 1 and 2")
    return int(str(version).strip())


def _optimizer(raw: dict[str, Any], keys: dict[str, str]) -> dict[str, Any]:
    """`optim` and the switches over it (trainer_utils.py create_custom_optimizer: use_galore, use_apollo,
    use_adam_mini, use_muon; *_layerwise) -> the optimizer and its projection knobs; `keys` learns which YAML keys
    carry them (a problem in proj_rank names apollo_rank under use_apollo)."""
    flags = {k: _bool(raw, k) for k in ("use_galore", "use_apollo", "use_adam_mini", "use_muon",
                                        "galore_layerwise", "apollo_layerwise")}
    # no `optim`: transformers 5.6 TrainingArguments' default, adamw_torch_fused with torch >= 2.8
    # (training_args.py L811-816; LLaMA-Factory 0.9.5 sets none). GaLore / APOLLO are read over adamw_torch, the
    # only AdamW their builders take (train/trainer_utils.py L239, L330)
    projected = flags["use_galore"] or flags["use_apollo"]
    optim = str(raw.get("optim", "adamw_torch" if projected else "adamw_torch_fused"))
    base = optimizers.from_hf(optim, str(raw.get("optim_args", "")))
    if base is None:
        raise ConfigError(f"optim {optim!r} is not modelled: use one of {', '.join(optimizers.hf_names())}")
    on = [k for k in ("use_galore", "use_apollo", "use_adam_mini", "use_muon") if flags[k]]
    if flags["use_galore"] and flags["use_apollo"]:  # finetuning_args.py L618
        raise ConfigError("use_galore and use_apollo are both true: LLaMA-Factory refuses them together")
    chosen = optimizers.from_llamafactory(base, flags)
    if chosen is None:
        raise ConfigError(f"{on[0]} with optim {optim!r} is not modelled: memplan models it over adamw_torch "
                          "(GaLore's 8-bit and Adafactor variants are not)")
    out: dict[str, Any] = {"optimizer": chosen}
    if on:
        keys["optimizer"] = on[0]
    prefix = on[0].removeprefix("use_") if on and on[0] in ("use_galore", "use_apollo") else ""
    if prefix:
        keys.update(proj_rank=f"{prefix}_rank", proj_targets=f"{prefix}_target", proj_type=f"{prefix}_proj_type")
        out["proj_rank"] = raw.get(f"{prefix}_rank", 16)
        out["proj_targets"] = _targets(raw.get(f"{prefix}_target", "all"))
        kind = str(raw.get(f"{prefix}_proj_type", "std")).lower()
        if kind not in {p.value for p in ProjType}:
            raise ConfigError(f"{prefix}_proj_type {kind!r} is not modelled: use one of "
                              f"{', '.join(p.value for p in ProjType)}")
        out["proj_type"] = ProjType(kind)
    return out


def _evaluates(raw: dict[str, Any]) -> bool:
    """Evaluation during the run: HF Trainer evaluates every eval_steps / epoch unless eval_strategy is "no"
    (transformers trainer.py _maybe_log_save_evaluate); LLaMA-Factory runs trainer.evaluate() after training when
    do_eval is set beside do_train (src/llamafactory/train/sft/workflow.py L146, `if training_args.do_eval`)."""
    strategy = str(raw.get("eval_strategy", raw.get("evaluation_strategy", "no"))).lower()
    return strategy in ("steps", "epoch") or raw.get("do_eval") is True


def not_a_config(raw: dict[str, Any]) -> str | None:
    """Why a YAML mapping is no LLaMA-Factory config at all (none of its keys is an argument memplan knows LLaMA-
    Factory's dataclasses define: every training YAML names model_name_or_path, which ModelArguments requires), or
    None. examples/extras/multi_tokens/tokens_cfg.yaml is such a file: "<|token|>": description pairs, what
    new_special_tokens_config names (hparams/model_args.py L83, loaded with OmegaConf.load at L220)."""
    if not raw or any(k in MODELLED or k in NOT_MODELLED for k in raw):
        return None
    tokens = all(isinstance(v, str) for v in raw.values())
    return (f"not a LLaMA-Factory training config: none of its {len(raw)} keys is a LLaMA-Factory argument "
            "(a training YAML names model_name_or_path, stage, finetuning_type ...)"
            + ("; its token: description pairs are what new_special_tokens_config points at" if tokens else ""))


def config_from_llamafactory(raw: dict[str, Any]) -> LlamaFactoryConfig:
    """A parsed YAML mapping -> LlamaFactoryConfig; every problem in the modelled fields is reported at once."""
    problems: list[str] = []
    if (why := not_training(raw)) is not None:
        raise ConfigError(why)
    if not raw.get("model_name_or_path"):
        problems.append("model_name_or_path is missing")
    kw: dict[str, Any] = {}
    for name, fn in (("method", _method), ("precision", _precision)):
        try:
            kw[name] = fn(raw)
        except ConfigError as err:
            problems.extend(err.problems)
    keys = dict(KEYS)
    try:
        kw.update(_optimizer(raw, keys))
    except ConfigError as err:
        problems.extend(err.problems)
    attn = str(raw.get("flash_attn", "auto")).lower()
    kernel = next((a for a, names in _ATTN.items() if attn in names), None)
    if kernel is None:
        problems.append(f"flash_attn {attn!r}: choose one of {', '.join(n for ns in _ATTN.values() for n in ns)}")
    else:
        kw["attn"] = kernel
    try:  # LLaMA-Factory enables checkpointing itself unless disabled; HF's gradient_checkpointing is not read
        kw["checkpointing"] = not _bool(raw, "disable_gradient_checkpointing")
    except ConfigError as err:
        problems.extend(err.problems)
    for key, name, default in _INTS:
        kw[name] = raw.get(key, default)
    if raw.get("lora_alpha") is not None:
        kw["lora_alpha"] = raw["lora_alpha"]
    try:
        kw["lora_dropout"] = float(raw.get("lora_dropout", 0.0) or 0.0)
    except (TypeError, ValueError):
        problems.append(f"lora_dropout must be a number in [0, 1), got {raw['lora_dropout']!r}")
    kw["lora_targets"] = _targets(raw.get("lora_target", "all"))
    extras_warned = _extra_modules(raw, kw)
    try:
        kw.update(_adapter(raw))
        # model_args.py: enable_liger_kernel (model_utils/liger_kernel.py), use_unsloth_gc (checkpointing.py
        # UnslothGradientCheckpointing, only where checkpointing is on: prepare_model_for_training L184-191)
        kw["liger_kernel"] = _bool(raw, "enable_liger_kernel")
        kw["offload_checkpoints"] = _bool(raw, "use_unsloth_gc") and kw.get("checkpointing", True)
    except ConfigError as err:
        problems.extend(err.problems)
    kw["stack"] = Stack.LLAMAFACTORY  # its own model preparation (memplan.spec.stacks)
    if str(raw.get("stage", "sft")).lower() == "ppo":
        problems.append("stage ppo is not modelled: its step holds the policy with a value head, the reward model "
                        "and the reference, and generates rollouts (train/ppo/trainer.py); memplan estimates sft, "
                        "pt, dpo, kto and rm")
    if str(raw.get("stage", "sft")).lower() == "dpo":  # train/dpo/workflow.py; finetuning_args.py L593
        kw["stage"] = Stage.DPO
        kw["dpo_reference"] = str(raw.get("pref_loss", "sigmoid")).lower() not in ("orpo", "simpo")
    if str(raw.get("stage", "sft")).lower() == "kto":  # train/kto/workflow.py: a reference always (L57-60)
        kw["stage"] = Stage.KTO
    if str(raw.get("stage", "sft")).lower() == "rm":  # train/rm/workflow.py run_rm: load_model(add_valuehead=True)
        kw["stage"] = Stage.RM
    try:
        kw["upcast_lmhead_output"] = _bool(raw, "upcast_lmhead_output")
        kw["upcast_layernorm"] = _bool(raw, "upcast_layernorm")
    except ConfigError as err:
        problems.extend(err.problems)
    if _evaluates(raw):
        try:
            kw["eval_batch_size"] = int(raw.get("per_device_eval_batch_size", 8))  # HF TrainingArguments default
        except (TypeError, ValueError):
            problems.append(f"per_device_eval_batch_size must be an integer, got {raw['per_device_eval_batch_size']!r}")
    if raw.get("quantization_bit") is not None:
        kw["quant_bits"] = raw["quantization_bit"]
        problems += _quantization(raw, kw)
    if kw.get("method") in (Method.FREEZE, Method.LORA, Method.QLORA):
        try:
            kw["llama_pro"] = _bool(raw, "use_llama_pro")
        except ConfigError as err:
            problems.extend(err.problems)
    elif raw.get("use_llama_pro") is True and kw.get("method") is Method.FULL:  # finetuning_args.py L612-613
        problems.append("use_llama_pro is only valid for freeze or lora training (LLaMA-Factory "
                        "hparams/finetuning_args.py)")
    train = None
    if not problems:
        try:
            train = TrainConfig(**kw)
            if parallel := _fsdp(raw):
                train = train.with_(**parallel)
        except ConfigError as err:
            problems.extend(err.respelled(keys).problems)
    visual_warnings: tuple[str, ...] = ()
    if train is not None and not problems:
        try:
            visual, visual_warnings = visual_from_yaml(raw)
            train = train.with_(visual=visual) if visual is not None else train
        except ConfigError as err:
            problems.extend(err.problems)
    if problems or train is None:
        raise ConfigError(problems)
    generation = _generation(raw) if predicts_with_generate(raw) else None
    unmodelled = tuple(_warning(k, raw[k]) for k, modelled in NOT_MODELLED.items()
                       if k in raw and raw[k] not in modelled and not (generation and k == "predict_with_generate"))
    unmodelled += extras_warned + visual_warnings
    return LlamaFactoryConfig(model=str(raw["model_name_or_path"]), train=train, raw=dict(raw),
                              output_dir=raw.get("output_dir"), deepspeed=raw.get("deepspeed"),
                              not_modelled=unmodelled, generation=generation)


def _extra_modules(raw: dict[str, Any], kw: dict[str, Any]) -> tuple[str, ...]:
    """freeze_trainable_modules -> TrainConfig.trainable_modules (freeze; "all" when a name is not modelled);
    freeze_extra_modules (freeze) or additional_target (LoRA / OFT) -> TrainConfig.extra_modules: the names
    memplan models (EXTRA_MODULES); the warning line of any other name. Each key is read by its own method only
    (finetuning_args.py split_arg: comma-separated; adapter.py reads freeze_extra_modules in _setup_freeze_tuning,
    additional_target in _setup_lora_tuning)."""
    method = kw.get("method")
    warned: tuple[str, ...] = ()
    if method is Method.FREEZE and raw.get("freeze_trainable_modules") not in (None, "", []):
        parts = _targets(raw["freeze_trainable_modules"])
        parts = ("all",) if parts == (ALL_LINEAR,) else parts
        if set(parts) <= set(FREEZE_MODULES):
            kw["trainable_modules"] = parts
        else:  # estimated as all (whole layers), named in the warning line
            warned += (_warning("freeze_trainable_modules", raw["freeze_trainable_modules"]),)
    key = "freeze_extra_modules" if method is Method.FREEZE else "additional_target" if method in (
        Method.LORA, Method.QLORA) else None
    if key is None or raw.get(key) in (None, "", []):
        return warned
    names = _targets(raw[key])
    kw["extra_modules"] = tuple(n for n in names if n in EXTRA_MODULES)
    other = [n for n in names if n not in EXTRA_MODULES]
    return warned + ((_warning(key, ",".join(other)),) if other else ())


def _generation(raw: dict[str, Any]) -> Generation:
    """The generation of a prediction run: per_device_eval_batch_size (HF default 8), cutoff_len, max_new_tokens
    and num_beams (hparams/generating_args.py defaults 1024, 1); the eval dtype is compute_dtype: bf16 / fp16 when
    set (hparams/parser.py L640-643), else infer_dtype when given, else infer_optim_dtype (model/patcher.py
    L375-379, extras/misc.py L241-248): bf16 for a bf16 checkpoint on a bf16 GPU, else fp16 on any GPU: 2 bytes."""
    problems = []
    values = {}
    for key, default in (("per_device_eval_batch_size", 8), ("cutoff_len", 2048), ("max_new_tokens", 1024),
                         ("num_beams", 1)):
        value = raw.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            problems.append(f"{key} must be a positive integer, got {value!r}")
        values[key] = value
    infer = str(raw.get("infer_dtype", "auto")).lower()
    if infer not in ("auto", "float16", "bfloat16", "float32"):
        problems.append(f"infer_dtype {infer!r}: choose auto, float16, bfloat16 or float32")
    if problems:
        raise ConfigError(problems)
    half = _bool(raw, "bf16") or _bool(raw, "fp16") or _bool(raw, "pure_bf16") or infer != "float32"
    return Generation(batch_size=values["per_device_eval_batch_size"], prompt_len=values["cutoff_len"],
                      new_tokens=values["max_new_tokens"], num_beams=values["num_beams"], width=2 if half else 4)


def _warning(key: str, value: Any) -> str:
    why = WHY_NOT.get(f"{key}={_yaml_value(value)}", WHY_NOT.get(key))
    return f"{key}={_yaml_value(value)}" + (f" ({why})" if why else "")


def _quantization(raw: dict[str, Any], kw: dict[str, Any]) -> list[str]:
    """quantization_method / quantization_type / double_quantization of an on-the-fly quantized base
    (model_utils/quantization.py configure_quantization); the bits each method takes are checked by TrainConfig."""
    from memplan.spec.train import QuantMethod

    problems: list[str] = []
    how = str(raw.get("quantization_method", "bnb")).lower()
    try:
        kw["quant_method"] = QuantMethod(how)
    except ValueError:
        kw["quant_method"] = None
    if kw["quant_method"] is None or kw["quant_method"].prequantized:  # quantization.py L177-227: bnb, hqq, eetq
        problems.append(f"quantization_method {how!r}: LLaMA-Factory quantizes on the fly with bnb, hqq or eetq "
                        "(an AWQ / GPTQ / AQLM checkpoint brings its own quantization_config: name it as "
                        "model_name_or_path, without quantization_bit)")
    kw["quant_type"] = str(raw.get("quantization_type", "nf4")).lower()
    try:
        kw["double_quant"] = _bool(raw, "double_quantization", True)
    except ConfigError as err:
        problems.extend(err.problems)
    return problems


def _yaml_value(value: Any) -> str:
    return "true" if value is True else "false" if value is False else str(value)


def cli_overrides(args: list[str]) -> dict[str, Any]:
    """`key=value` arguments after the YAML (`llamafactory-cli train cfg.yaml per_device_train_batch_size=4`):
    LLaMA-Factory merges them over the YAML with OmegaConf.from_cli (hparams/parser.py read_args); values are
    typed as YAML scalars, as OmegaConf types them."""
    import yaml

    out: dict[str, Any] = {}
    for arg in args:
        key, eq, value = arg.partition("=")
        if eq and key.strip().lstrip("-").replace("_", "").replace(".", "").isalnum():
            try:
                out[key.strip().lstrip("-")] = yaml.safe_load(value) if value.strip() else None
            except yaml.YAMLError:
                out[key.strip().lstrip("-")] = value
    return out


def _load_yaml(text: str, where: str) -> Any:
    """yaml.safe_load, warning on a key given twice at the top level (the last value wins silently otherwise)."""
    import warnings

    import yaml

    node = yaml.compose(text, Loader=yaml.SafeLoader)
    if isinstance(node, yaml.MappingNode):
        keys = [k.value for k, _ in node.value if isinstance(k, yaml.ScalarNode)]
        twice = sorted({k for k in keys if keys.count(k) > 1})
        if twice:
            warnings.warn(f"--config {where}: {', '.join(twice)} given more than once: the last value is used",
                          stacklevel=3)
    return yaml.safe_load(text)


def read_llamafactory(path: str | Path, overrides: dict[str, Any] | None = None,
                      env: Mapping[str, str] | None = None) -> LlamaFactoryConfig:
    """Read a LLaMA-Factory training YAML (and the DeepSpeed JSON it names), with command-line `overrides` merged
    over it as LLaMA-Factory does; the GPU count comes from `env` (the launcher's NPROC_PER_NODE x NNODES) or else
    from the launch line an export wrote. A missing file or malformed YAML is a ConfigError (one line)."""
    import yaml

    path = Path(path)
    text = ""
    try:
        text = path.read_bytes().decode("utf-8")
        raw = _load_yaml(text, str(path))
    except OSError as err:
        raise ConfigError(f"--config {path}: {err.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--config {path}: not a UTF-8 text file") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"--config {path}: malformed YAML{where}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {path}: expected a mapping of LLaMA-Factory arguments")
    if (why := not_a_config(raw)) is not None:
        raise ConfigError(f"--config {path}: {why}")
    raw = {**raw, **(overrides or {})}
    try:
        lf = config_from_llamafactory(raw)
        if lf.deepspeed:  # the ZeRO stage and offload come from the DeepSpeed JSON the YAML names
            lf = replace(lf, train=lf.train.with_(**read_deepspeed(str(lf.deepspeed), path.parent)))
        world, source = launch_world(env or {}), "the environment's NPROC_PER_NODE x NNODES"
        if world is None:
            world, source = launch_from_text(text), "the YAML's launch line"
        if world is not None:
            lf = replace(lf, train=lf.train.with_(gpus=world[0], nodes=world[1]), gpus_from=source)
        if lf.not_modelled:
            import warnings

            warnings.warn(f"--config {path}: not modelled yet, the estimate leaves out what they change: "
                          f"{'; '.join(lf.not_modelled)}", stacklevel=2)
        return lf
    except ConfigError as err:
        raise err.respelled(KEYS, prefix=f"--config {path}: ") from None


# ---- writing --------------------------------------------------------------------------------------------------
def allowed(spec: ModelSpec, base: dict[str, Any] | None) -> Callable[[TrainConfig], bool]:
    """For fit: a candidate whose export over `base` LLaMA-Factory accepts. The rules read only the precision,
    method, engine and whether it is distributed, so each such combination is judged once (a search has up to
    200,000 candidates)."""
    seen: dict[tuple[object, ...], bool] = {}

    def accept(t: TrainConfig) -> bool:
        key = (t.precision, t.method, t.quant_bits, t.quant_method, t.sharding, t.offload, t.gpus > 1)
        if key not in seen:
            seen[key] = not rejections(llamafactory_yaml(spec, t, base, deepspeed="ds.json"), t)
        return seen[key]
    return accept


def _hub_id(spec: ModelSpec) -> str:
    """The hub id a catalog model is downloaded by (memplan's short names mean nothing to LLaMA-Factory)."""
    from memplan.spec.catalog import SAME_AS, find_entry

    if spec.config.get("_name_or_path"):
        return str(spec.config["_name_or_path"])
    entry = find_entry(spec.name)  # a checkpoint sharing an entry's config (SAME_AS) keeps its own hub id
    return entry.hf_id if entry is not None and spec.name.lower() not in SAME_AS else spec.name


def llamafactory_yaml(spec: ModelSpec, train: TrainConfig, base: dict[str, Any] | None = None, *,
                      deepspeed: str | None = None) -> dict[str, Any]:
    """A LLaMA-Factory training YAML with the plan's knobs and engine (`deepspeed`: the JSON path for a ZeRO plan,
    else the base's); every other key of `base` is kept as it was, in place."""
    opt = optimizers.facts(train.optimizer)
    plan: dict[str, Any] = dict(
        finetuning_type="full" if train.method is Method.FULL else
        "freeze" if train.method is Method.FREEZE else "lora",
        per_device_train_batch_size=train.batch_size, gradient_accumulation_steps=train.grad_accum,
        cutoff_len=train.seq_len, disable_gradient_checkpointing=not train.checkpointing,
        optim=opt.hf_optim if not opt.lf_flag else optimizers.facts(opt.lf_base or optimizers.Optimizer.ADAMW).hf_optim,
        flash_attn=_ATTN[train.attn][0])
    if opt.optim_args:
        plan["optim_args"] = opt.optim_args
    plan.update(_optimizer_keys(train))
    if train.precision is Precision.PURE_BF16:
        plan["pure_bf16"] = True
    elif train.precision in (Precision.BF16, Precision.FP16):
        plan[train.precision.value] = True
    if train.is_lora:
        plan.update(lora_rank=train.lora_rank, lora_alpha=train.alpha, lora_dropout=train.lora_dropout,
                    lora_target="all" if ALL_LINEAR in train.lora_targets else ",".join(train.lora_targets))
        if train.adapter is Adapter.OFT:
            plan.update(finetuning_type="oft", oft_rank=train.oft_rank, oft_block_size=train.oft_block_size)
        elif train.adapter is Adapter.DORA:
            plan["use_dora"] = True
        if train.pissa_init:
            plan.update(pissa_init=True, pissa_iter=train.pissa_iter)
    if train.liger_kernel:
        plan["enable_liger_kernel"] = True
    if train.offload_checkpoints:
        plan["use_unsloth_gc"] = True
    if train.method is Method.QLORA:
        plan["quantization_bit"] = train.quant_bits
        if train.quant_method.value != "bnb":
            plan["quantization_method"] = train.quant_method.value
        if not train.double_quant:
            plan["double_quantization"] = False
        if train.quant_type != "nf4":
            plan["quantization_type"] = train.quant_type
    if train.method is Method.FREEZE and "all" not in train.trainable_modules:
        plan["freeze_trainable_modules"] = ",".join(train.trainable_modules)
    if train.extra_modules:
        plan["freeze_extra_modules" if train.method is Method.FREEZE else "additional_target"] = \
            ",".join(train.extra_modules)
    if train.method is Method.FREEZE or train.llama_pro:  # LoRA reads the blocks' count from it too
        plan["freeze_trainable_layers"] = train.freeze_trainable_layers
    if train.llama_pro:
        plan["use_llama_pro"] = True
    base = base or {}
    if train.sharding.is_deepspeed:
        plan["deepspeed"] = deepspeed or base.get("deepspeed")
        if not plan["deepspeed"]:
            raise ConfigError(f"a {train.sharding.value} plan needs a DeepSpeed JSON: write it with "
                              "write_llamafactory, or pass deepspeed=PATH")
    elif fsdp_on(train):  # transformers FSDPOption names; auto_wrap wraps each decoder layer (_no_split_modules)
        name = next(k for k, v in _FSDP.items() if v is train.sharding)
        plan["fsdp"] = f"{name} auto_wrap" + (" offload" if train.offload is Offload.PARAMS else "")
        if base.get("fsdp_config") is not None:
            plan["fsdp_config"] = base["fsdp_config"]
        if train.fsdp_version != _fsdp_config_version(plan.get("fsdp_config")):  # HF Trainer's default is 2
            kept = plan.get("fsdp_config") if isinstance(plan.get("fsdp_config"), dict) else {}
            plan["fsdp_config"] = {**{k: v for k, v in kept.items() if k not in ("version", "fsdp_version")},
                                   "version": train.fsdp_version}
    owned = {*_PLAN_OWNED, *plan}
    out = {"model_name_or_path": _hub_id(spec)}
    for key, value in base.items():  # the input's order and its other keys, untouched
        if key not in owned:
            out[key] = value
        elif key in plan:
            out[key] = plan[key]
    out.update((k, v) for k, v in plan.items() if k not in out)
    return out


def _optimizer_keys(train: TrainConfig) -> dict[str, Any]:
    """The LLaMA-Factory switches that select the plan's optimizer over `optim` (use_galore: true, ...)."""
    opt = optimizers.facts(train.optimizer)
    if not opt.lf_flag:
        return {}
    out: dict[str, Any] = {opt.lf_flag: True}
    if opt.projection is not optimizers.Projection.NONE:
        prefix = opt.lf_flag.removeprefix("use_")
        out.update({f"{prefix}_layerwise": opt.per_param, f"{prefix}_rank": train.proj_rank,
                    f"{prefix}_target": "all" if ALL_LINEAR in train.proj_targets else ",".join(train.proj_targets),
                    f"{prefix}_proj_type": train.proj_type.value})
    return out


# the export template of a plan without --config (packaged; the project's configs/templates/ links to it)
SFT_TEMPLATE = Path(__file__).resolve().parent / "templates" / "sft.yaml"  # configs/templates/sft.yaml links here


def sft_template() -> dict[str, Any]:
    """configs/templates/sft.yaml: a complete `sft` training config whose dataset, template and output_dir are
    CHANGE_ME placeholders."""
    import yaml

    try:
        return yaml.safe_load(SFT_TEMPLATE.read_text())
    except OSError:
        raise ConfigError(f"the export template {SFT_TEMPLATE} is missing: export from a checkout of memplan, or "
                          "give --config train.yaml as the base") from None


def write_llamafactory(spec: ModelSpec, train: TrainConfig, path: Path, base: dict[str, Any] | None = None,
                       base_dir: Path | None = None) -> list[Path]:
    """Write the plan as a YAML LLaMA-Factory launches as written: its first line the launch command (GPU count),
    the engine's keys, and for a ZeRO plan a DeepSpeed JSON beside it unless the base's JSON (found as written or
    in `base_dir`) already says the plan's stage and offload. Refused (ConfigError, nothing written) when
    LLaMA-Factory would reject the result. Returns the files written."""
    import json

    import yaml

    ds_file, reuse, current = None, None, (base or {}).get("deepspeed")
    if train.sharding.is_deepspeed:
        try:
            got = read_deepspeed(str(current), base_dir or Path.cwd()) if current else {}
        except ConfigError:
            got = {}
        if got.get("sharding") is train.sharding and got.get("offload", Offload.NONE) is train.offload:
            # reused; HF Trainer opens it from the working directory, so a JSON found beside the input YAML
            # (or in a folder above it) is named by that path
            reuse = str(next(p for p in deepspeed_candidates(str(current), base_dir or Path.cwd()) if p.is_file()))
        else:
            ds_file = path.with_name(f"{path.stem}.ds_{train.sharding.value}.json")
    data = llamafactory_yaml(spec, train, base, deepspeed=str(ds_file) if ds_file else reuse)
    if problems := rejections(data, train):
        raise ConfigError(f"nothing written to {path}: " + "; ".join(problems))
    text = launch_line(train, str(path)) + "\n" + yaml.safe_dump(data, sort_keys=False)
    written = []
    try:
        if ds_file is not None:
            ds_file.write_text(json.dumps(deepspeed_config(train, spec.hidden_size, auto_batch=True), indent=2)
                               + "\n")
            written.append(ds_file)
        path.write_text(text)
    except OSError as err:
        raise ConfigError(f"cannot write {path}: {err.strerror}") from None
    return [*written, path]
