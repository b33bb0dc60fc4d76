"""Parameter dtypes per training stack, one torch-free rule (memplan.spec.stacks says why stacks differ): what the
frozen, trainable and adapter weights are and whether autocast runs, read by the analytic layout
(memplan.predict.layout) and the model builder (memplan.build.model / step), so analytic == exact."""

from __future__ import annotations

from dataclasses import dataclass

from memplan.spec.stacks import Stack
from memplan.spec.train import Method, Precision

# the precision flag's compute dtype: autocast's under bf16 / fp16, the load dtype where the stack loads in it
COMPUTE_DTYPE = {Precision.FP32: "float32", Precision.FP16: "float16", Precision.BF16: "bfloat16",
                 Precision.PURE_BF16: "bfloat16"}
DTYPE_WIDTH = {"float32": 4, "float16": 2, "bfloat16": 2}  # bytes per element


@dataclass(frozen=True, slots=True, kw_only=True)
class ParamDtypes:
    """The dtypes of a stack's parameters before its first step, and whether it autocasts: torch dtype names."""

    frozen: str  # the weights that do not train (the frozen base of LoRA / freeze; QLoRA's kept embedding/norms/head)
    trainable: str  # the weights that train (full, freeze's trained layers)
    adapters: str  # LoRA / DoRA / OFT adapter weights
    autocast: bool  # forward under torch.autocast in `compute`
    compute: str  # the flag's compute dtype: autocast's, and the quantized linears' compute_dtype

    @property
    def frozen_width(self) -> int:
        return DTYPE_WIDTH[self.frozen]

    @property
    def trainable_width(self) -> int:
        return DTYPE_WIDTH[self.trainable]

    @property
    def adapters_width(self) -> int:
        return DTYPE_WIDTH[self.adapters]

    @property
    def frozen_cast(self) -> bool:
        """Autocast casts each frozen weight on every call (it caches only leaf tensors that require grad:
        aten/src/ATen/autocast_mode.cpp cached_cast): the frozen dtype is not the compute dtype."""
        return self.autocast and self.frozen != self.compute


def param_dtypes(stack: Stack, precision: Precision, checkpoint_dtype: str | None, method: Method) -> ParamDtypes:
    """The parameter dtypes `stack` trains with under `precision` over a checkpoint saved in `checkpoint_dtype`
    (ModelSpec.checkpoint_dtype; None: unknown, read as the flag's compute dtype, as before this rule)."""
    compute = COMPUTE_DTYPE[precision]
    autocast = precision in (Precision.BF16, Precision.FP16)  # TrainingArguments bf16 / fp16: accelerate autocast
    trainable = "bfloat16" if precision is Precision.PURE_BF16 else "float32"
    if stack is not Stack.LLAMAFACTORY:
        # the base loaded in the compute dtype (HF Trainer scripts' torch_dtype, torchtune / LitGPT precision)
        return ParamDtypes(frozen=compute, trainable=trainable, adapters=trainable, autocast=autocast,
                           compute=compute)
    # LLaMA-Factory 0.9.5: model/loader.py L155 `init_kwargs["torch_dtype"] = "auto"`: the checkpoint's dtype D
    # whatever the flag (compute_dtype, hparams/parser.py L512-515 / model/patcher.py L321-325, never reaches the
    # load). model/adapter.py init_adapter L313-325: cast_trainable_params_to_fp32 unless pure_bf16 (or BAdam,
    # or ZeRO-3 without quantization), applied in _setup_full_tuning L51-52, _setup_freeze_tuning L133-134 and
    # after get_peft_model in _setup_lora_tuning L286-288; without the cast the trainables stay D. LoRA / OFT:
    # get_peft_model (L284) keeps peft 0.18.1's autocast_adapter_dtype=True (peft/mapping_func.py L35; PeftModel
    # __init__ peft_model.py L131-134 -> tuners/tuners_utils.py cast_adapter_dtype L1976-2006: float16 / bfloat16
    # adapter weights -> float32), so the adapters are fp32 under pure_bf16 as well. Autocast: only
    # TrainingArguments bf16 / fp16 (pure_bf16 sets neither: parser.py L512-515 reads it for compute_dtype alone).
    # QLoRA keeps the compute dtype for what is not quantized (memplan builds its 4-bit linears from it:
    # memplan.build.model _quantize_linears); LLaMA-Factory's "auto" load of those over an fp32 checkpoint is not
    # modelled (not measured: the LLaMA-Factory venv has no bitsandbytes)
    d = compute if method is Method.QLORA or checkpoint_dtype not in DTYPE_WIDTH else checkpoint_dtype
    return ParamDtypes(frozen=d, trainable=d if precision is Precision.PURE_BF16 else "float32", adapters="float32",
                       autocast=autocast, compute=compute)


def dtype_warning(stack: Stack, precision: Precision, checkpoint_dtype: str | None, method: Method) -> str | None:
    """One line where the stack cannot run the combination at all, with the fix; None where it runs."""
    dt = param_dtypes(stack, precision, checkpoint_dtype, method)
    if method is Method.FREEZE and not dt.autocast and dt.frozen != dt.trainable:
        # the trained layers' fp32 output meets a frozen D weight with no autocast to reconcile them: LLaMA-Factory
        # 0.9.5's run_exp on CPU (tiny llama, bf16 checkpoint, freeze, no flag) raised at the frozen LM head
        # (modeling_llama.py L487 -> F.linear) "expected m1 and m2 to have the same dtype, but got: float !=
        # c10::BFloat16"
        return (f"{stack.value}: freeze training with no bf16 / fp16 over a {dt.frozen} checkpoint fails in its "
                f"first forward ({dt.trainable} trained layers feed {dt.frozen} frozen weights, no autocast: a dtype "
                "mismatch); add bf16: true")
    return None


def deepspeed_half(precision: Precision) -> ParamDtypes:
    """DeepSpeed's bf16 / fp16 engine: the whole module in the half dtype, whatever the stack loaded (0.19.8
    deepspeed/runtime/engine.py _configure_distributed_model L2080-2088 `_cast_module_mixed_precision(param_dtype,
    ...)`), no autocast; the fp32 master copies live in its optimizer (memplan.predict.sharding)."""
    half = COMPUTE_DTYPE[precision]
    return ParamDtypes(frozen=half, trainable=half, adapters=half, autocast=False, compute=half)
