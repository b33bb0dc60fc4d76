"""The training-stack table: what each stack does to the model before its training step, one entry per stack.

The same model and knobs take different memory under different stacks: peft's `prepare_model_for_kbit_training`
(the canonical HF + PEFT QLoRA recipe) casts every half-precision parameter that is not 4-bit to fp32, so the
embedding, norms and LM head of a QLoRA model become fp32 and, under autocast, the residual stream with them.
The analytic estimator (memplan.predict.layout), the model builder (memplan.build.model: the exact trace, the
probe and the CPU ground truth) and the readers of each input format all read `STACKS`. Adding a stack is one
entry here plus its branch in `memplan.build.model.prepare_for_stack` (and a CPU-truth test).

Checkpointing flavour: LLaMA-Factory checkpoints reentrantly (`use_reentrant_gc` defaults to true), transformers 5
non-reentrantly. Measured on the CPU allocator (tiny llama, LoRA bf16, batch 2 x 256, real peft): 36,500,084 B
reentrant vs 36,500,252 B non-reentrant, so the flavour is recorded (the builder reproduces it) but no formula
depends on it. Full fine-tuning differs at the bottom layer's backward (tiny llama, fp32, fused AdamW, batch 2 x 128,
peak at aten::mul in backward 2): 69,818,436 B reentrant vs 69,546,180 B non-reentrant (+272,256 B, about one
(B, S, H) fp32 tensor); the analytic estimate (68,974,720 B) is below both, the exact mode (69,803,268 B) traces it.
LLaMA-Factory 0.9.5's own run_exp measured 69,822,548 B (benchmarks/results/llamafactory_truth.md).

Parameter dtypes: memplan.spec.dtypes `param_dtypes(stack, precision, checkpoint dtype, method)` gives the frozen
weights', the trainable weights' and the adapters' dtype and whether autocast runs; the analytic layout
(memplan.predict.layout) and the model builder (memplan.build.model, memplan.build.step) read it, so both sides
agree. Every stack but LLaMA-Factory loads the base in the precision flag's compute dtype (fp32 without one), casts
what trains to fp32 unless pure_bf16 and autocasts under bf16 / fp16. LLaMA-Factory 0.9.5 (no ZeRO-3, no BAdam)
loads the checkpoint's own dtype D whatever the flag, so with D known (config.json `dtype`) its frozen base is D: a
bf16 flag over an fp32 checkpoint (Gemma-2, OLMo-2) trains an fp32 base under autocast, no flag over a bf16
checkpoint a bf16 base with fp32 adapters and no autocast (freeze there fails: spec.dtypes dtype_warning); its LoRA
adapters are fp32 under pure_bf16 too. The rule and its sources, file and line, are in memplan.spec.dtypes
(memplan.spec.train imports this table, so the rule lives beside it).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from memplan.spec.packages import nf4_chunk_elements


class Stack(str, Enum):
    HF = "hf"  # HF Trainer + peft (prepare_model_for_kbit_training for k-bit models)
    LLAMAFACTORY = "llamafactory"  # llamafactory-cli train: its own model preparation
    REFERENCE = "reference"  # memplan's reference step (README "The memory model"), no stack preparation
    TORCHTUNE = "torchtune"  # torchtune lora_finetune_single_device: torchao NF4 (QLoRA), its own model code
    LITGPT = "litgpt"  # LitGPT finetune/lora.py: Lightning Fabric's BitsandbytesPrecision (QLoRA)
    TRL = "trl"  # TRL >= 1.0 SFTTrainer + peft: no k-bit upcast, QLoRA adapters cast to bf16


@dataclass(frozen=True, slots=True, kw_only=True)
class StackFacts:
    name: Stack
    title: str
    kbit_upcast: bool  # k-bit models: every fp16/bf16 parameter that is not 4-bit storage is cast to fp32
    reentrant_checkpointing: bool  # torch.utils.checkpoint(use_reentrant=...) of the checkpointed layers
    source: str  # where the behaviour is, file and lines in the version read
    explain: str  # one line for --explain
    # QLoRA only. Bytes per element of each tensor alive at once while one base weight is quantized on its way in
    # (the load phase; their sum times the largest quantized tensor is the load's transient): the half weight on the
    # device for bitsandbytes' quantize_4bit
    quantize_load_transients: tuple[int, ...] = (2,)
    packed_with: int = 1  # how many of those (the first ones) are still alive when the packed result is made;
    # the later ones are made per chunk where the quantizer chunks (chunked_quantizer)
    chunked_quantizer: bool = False  # torchao's NF4: chunks since 0.2 (memplan.spec.packages nf4_chunk_elements)
    device_init: bool = False  # the model is first built (and quantized) on the GPU, then each weight replaced from
    # the checkpoint: two quantization passes, each new packed weight made before the old one is freed
    quantizes_lm_head: bool = False  # the LM head is 4-bit too (bitsandbytes via transformers / peft skips it)
    quantizes_only_adapted: bool = False  # only the linears that carry an adapter are 4-bit; the rest stay half
    nf4_keeps_input: bool | None = None  # the 4-bit linear saves its input for backward; None: bitsandbytes'
    # version decides (memplan.spec.packages)
    traced: bool = True  # the exact mode builds this stack's model (memplan.build.model); False: analytic only
    kbit_adapters_bf16: bool = False  # k-bit models: the trainable adapters are cast to bf16 (not peft's fp32)
    quantizes_from_half: bool = False  # 4-bit weights quantized from an fp16 copy whatever the model dtype, so
    # bitsandbytes' dequantize_4bit returns fp16 (QuantState.dtype) and `.to(grad_output.dtype)` makes a bf16 copy
    holds_previous_output: bool = False  # the training loop keeps the last micro-step's output (and through its
    # grad_fn the whole graph) until the next forward returns: that forward, the optimizer step and evaluation run
    # beside those logits and every tensor a ctx attribute holds (bitsandbytes < 0.43.2 MatMul4Bit's inputs)
    output_fp32: bool = False  # the model's float outputs are returned cast to fp32 (the logits: a (B, S, V) fp32
    # copy made while the half ones still exist; the half ones freed once the copy is bound)
    # Distributed recipes under FSDP1 (memplan.build.shard.fsdp1_wrap_model): which wrap policy makes the units
    # ("peft": HF Trainer's update_fsdp_plugin_peft / accelerate's transformer policy; "torchtune": its own
    # lora_fsdp_wrap_policy / ModuleWrapPolicy, the same units: every decoder layer, every module with a trainable
    # weight, the root) and FullyShardedDataParallel(use_orig_params=...)
    fsdp1_policy: str = "peft"
    fsdp1_use_orig_params: bool = True
    # the statistics the stack's own memory logger prints at once: a 'peak memory' it reports without naming one
    # is one of them (empty: the stack prints none)
    logged_stats: tuple[str, ...] = ()


STACKS: dict[Stack, StackFacts] = {f.name: f for f in (
    StackFacts(
        name=Stack.HF, title="HF Trainer + peft", kbit_upcast=True, reentrant_checkpointing=False,
        # peft 0.21.2 src/peft/utils/other.py prepare_model_for_kbit_training, L204-209: `param.data =
        # param.data.to(torch.float32)` for fp16/bf16 params whose class is not Params4bit (int8 weights are not
        # half, so they stay). transformers 5.24 Trainer re-enables checkpointing (trainer.py L1503-1515) with
        # use_reentrant=False (modeling_utils.py _activation_checkpointing_enable L3158).
        source="peft/utils/other.py:prepare_model_for_kbit_training L204-209; "
               "transformers/modeling_utils.py:_activation_checkpointing_enable L3158",
        explain="k-bit models: peft's prepare_model_for_kbit_training casts embedding, norms and LM head to fp32"),
    StackFacts(
        name=Stack.LLAMAFACTORY, title="LLaMA-Factory", kbit_upcast=False, reentrant_checkpointing=True,
        # LLaMA-Factory src/llamafactory/model/model_utils/checkpointing.py (HEAD ff6d4d12e): prepare_model_for_
        # training L163-204 (no k-bit upcast; upcast_layernorm / upcast_lmhead_output are off by default);
        # _gradient_checkpointing_enable L126-154 with use_reentrant=model_args.use_reentrant_gc (default True,
        # L43-46); custom_gradient_checkpointing_func L100-123 checkpoints only modules with trainable parameters
        # and sets requires_grad on their hidden-states input.
        source="LLaMA-Factory src/llamafactory/model/model_utils/checkpointing.py L43-46, L100-154, L163-204",
        explain="LLaMA-Factory: no k-bit upcast; reentrant checkpointing of trainable layers only"),
    StackFacts(
        name=Stack.TORCHTUNE, title="torchtune", kbit_upcast=False, reentrant_checkpointing=False,
        # Read at the QLoRA tutorial's commit 0914d5c (2024-04-15, torchao==0.1). recipes/lora_finetune_single_device
        # .py _setup_model L254-268: the model is built on the GPU in bf16, then load_state_dict copies each CPU bf16
        # weight in. torchtune/modules/peft/lora.py LoRALinear._create_weight_and_bias: to_nf4(nn.Linear(...).weight)
        # only where quantize_base; models/llama2/_component_builders.py L327-354: q/k/v/output_proj are LoRALinear
        # (quantized) only when targeted, plain nn.Linear otherwise, and L235 the LM head is never quantized.
        # torchtune/utils/_register_nf4_dispatch_ops.py inplace_copy: to_nf4(args[0][1].to(dest_tensor.device)) -> the
        # bf16 weight on the GPU (2 B) + torchao nf4tensor.py NF4Tensor.from_tensor: convert_to_norm_float_weight's
        # scaled_blocks (2 B) and quantize_tensor_nearest's `diff = (value - nf4).abs()`: (numel, 16) bf16, twice
        # (the difference and its abs, 32 + 32 B). Unchanged in torchao 0.18; measured on the CPU allocator:
        # 67.05 B/element above the input (tests/test_pubstacks.py). LinearNF4.forward keeps `ctx.nf4_weight` only,
        # not its input.
        # The packed uint8 data is made after the two (numel, 16) tensors are freed, while the bf16 weight and
        # scaled_blocks are alive (convert_to_norm_float_weight). Built under `with self._device` on the GPU (each
        # layer deep-copied from the first: transformer.py _get_clones; the NF4 clone dequantizes and re-quantizes,
        # _register_nf4_dispatch_ops.py clone), then load_state_dict replaces every NF4 weight.
        # torchao 0.2+ compares in chunks of 1024**2 elements (memplan.spec.packages).
        # Distributed recipes, read at fef3ed1 (2024-04-16) and 0217d44 (2024-05-09): recipes/lora_finetune_
        # distributed.py _setup_model L279-349 (fef3ed1): rank 0 builds the model on the CPU and loads the
        # checkpoint, the other ranks build it on the meta device; FSDP(auto_wrap_policy=utils.lora_fsdp_wrap_policy(
        # {TransformerDecoderLayer}), FULL_SHARD, mixed_precision=None, sync_module_states=True, param_init_fn=
        # to_empty), use_orig_params left False; torchtune/utils/_distributed.py lora_fsdp_wrap_policy L270-299:
        # a unit for every module whose `weight.requires_grad` (LoRA's A and B) and every decoder layer.
        # full_finetune_distributed.py L271-288: ModuleWrapPolicy({TransformerDecoderLayer}) (0217d44 L293-300:
        # get_full_finetune_fsdp_wrap_policy, the same with memory_efficient_fsdp_wrap False as llama2/7B_full.yaml
        # sets it). Loading is not in the step's statistics: train() starts with utils.cleanup_before_training
        # (utils/memory.py L34-37: gc.collect, empty_cache, reset_peak_memory_stats). memory_stats_log (fef3ed1
        # utils/memory.py L186-188; get_memory_stats at 0217d44 L198-200) prints active_bytes.all.peak,
        # max_memory_allocated and max_memory_reserved together, /1e9.
        quantize_load_transients=(2, 2, 32, 32), packed_with=2, chunked_quantizer=True, device_init=True,
        quantizes_only_adapted=True, nf4_keeps_input=False, traced=False,
        fsdp1_policy="torchtune", fsdp1_use_orig_params=False, logged_stats=("active", "allocated", "reserved"),
        source="torchtune@0914d5c recipes/lora_finetune_single_device.py L254-268; torchtune/modules/peft/lora.py "
               "_create_weight_and_bias; torchtune/utils/_register_nf4_dispatch_ops.py inplace_copy; torchao 0.1 "
               "torchao/dtypes/nf4tensor.py quantize_tensor_nearest, LinearNF4.forward; torchtune@fef3ed1 "
               "recipes/lora_finetune_distributed.py L279-349, torchtune/utils/_distributed.py L270-299, "
               "torchtune/utils/memory.py L34-37, L186-188",
        explain="torchtune: torchao NF4 on adapted linears only; quantizing each weight on load holds (numel, 16) "
                "bf16 comparisons"),
    StackFacts(
        name=Stack.LITGPT, title="LitGPT", kbit_upcast=False, reentrant_checkpointing=False,
        # Read at litgpt 41dece20 (2024-03-15; lightning @75553845, bitsandbytes 0.42.0). litgpt/finetune/lora.py
        # L166-189: GPT built under fabric.init_module (BitsandbytesPrecision.module_init_context replaces
        # torch.nn.Linear by _NF4Linear: lightning/fabric/plugins/precision/bitsandbytes.py L129-144), so every
        # Linear, the LM head included, is 4-bit; load_checkpoint quantizes each weight in _quantize_on_load_hook
        # (L159-166) via _Linear4bit.quantize (L326-341): `weight.contiguous().to(device=device, dtype=torch.half)`
        # then bnb.functional.quantize_4bit: one half copy on the GPU.
        # fabric.init_module(empty_init=(devices > 1)): on one GPU the layers are built there and quantized at once
        # (_Linear4bit.__init__ L305-314), then replaced on load.
        # The fit loop (lora.py L266-270 at 41dece20, L267-271 at 58c5b188) binds `logits = model(input_ids,
        # lm_head_chunk_size=128)`, backpropagates, and rebinds `logits` only when the next forward returns (`loss`
        # becomes a float at L282): the previous micro-step's logits and graph live through that forward (full.py
        # L219-233 the same). Those logits are fp32: Fabric's _FabricModule.forward returns
        # `precision.convert_output(output)` (lightning@75553845 src/lightning/fabric/wrappers.py L142-145), which
        # both BitsandbytesPrecision (bitsandbytes.py L155-156) and HalfPrecision (half.py L61-62) make
        # `_convert_fp_tensor(..., dst_type=torch.get_default_dtype())`, fp32 outside the forward context.
        quantize_load_transients=(2,), device_init=True, quantizes_lm_head=True, traced=False,
        quantizes_from_half=True, holds_previous_output=True, output_fp32=True,
        source="litgpt@41dece20 litgpt/finetune/lora.py L166-189, L266-282; lightning@75553845 src/lightning/"
               "fabric/plugins/precision/bitsandbytes.py L129-144, L155-166, L326-341; fabric/wrappers.py L137-148",
        explain="LitGPT: Fabric's bitsandbytes plugin quantizes every Linear, the LM head included; its loop holds "
                "the last fp32 logits and their graph through the next forward"),
    StackFacts(
        name=Stack.TRL, title="TRL SFTTrainer (>= 1.0)", kbit_upcast=False, reentrant_checkpointing=False,
        # trl 1.16.0 trl/trainer/sft_trainer.py: SFTTrainer never calls prepare_model_for_kbit_training (only the
        # experimental ORPO / CPO trainers do); get_peft_model with peft's default fp32 adapters (L868), then for a
        # 4/8-bit model every trainable parameter but DoRA's magnitude `param.data = param.data.to(torch.bfloat16)`
        # (L908-911); enable_input_require_grads under checkpointing (L899-900), transformers' own non-reentrant
        # checkpointing otherwise.
        kbit_adapters_bf16=True,
        source="trl 1.16.0 trl/trainer/sft_trainer.py L868, L899-900, L908-911",
        explain="TRL SFTTrainer: no k-bit upcast; QLoRA adapters, their gradients and states in bf16"),
    StackFacts(
        name=Stack.REFERENCE, title="memplan reference step", kbit_upcast=False, reentrant_checkpointing=False,
        source="memplan/build/step.py reference_step",
        explain="memplan's reference step: the model as built, transformers' own checkpointing"),
)}

assert set(STACKS) == set(Stack), "every Stack needs its STACKS entry"


def stack_facts(stack: Stack) -> StackFacts:
    return STACKS[stack]


def quantize_temporaries(stack: Stack, elements: int) -> list[int]:
    """Bytes of each temporary alive at once while the stack quantizes one base weight of `elements` on load."""
    f = STACKS[stack]
    chunk = nf4_chunk_elements() if f.chunked_quantizer else None
    per_chunk = min(elements, chunk) if chunk else elements
    return [b * (elements if i < f.packed_with else per_chunk) for i, b in enumerate(f.quantize_load_transients)]

