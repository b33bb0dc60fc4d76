"""Build the real transformers model (plus the peft wrapper) and its optimizer for a ModelSpec and TrainConfig,
with the precision semantics HF Trainer / LLaMA-Factory set up (README "The memory model")."""

from __future__ import annotations

import re
from typing import Any

from memplan._imports import try_import
from memplan.build.visual import has_images
from memplan.spec.dtypes import COMPUTE_DTYPE, param_dtypes
from memplan.spec.model import ModelSpec
from memplan.spec.optimizers import facts
from memplan.spec.stacks import Stack, stack_facts
from memplan.spec.train import Adapter, Method, Stage, TrainConfig, resolve_attention


def hf_config(spec: ModelSpec, train: TrainConfig) -> Any:
    transformers = try_import("transformers")
    cfg = dict(spec.config)
    cfg.pop("architectures", None)
    cfg.pop("auto_map", None)
    model_type = cfg.pop("model_type", spec.model_type)
    config = transformers.AutoConfig.for_model(model_type, **cfg)
    config._attn_implementation = resolve_attention(spec.family, train.attn).value
    config.use_cache = False
    return config


def compute_dtype(train: TrainConfig) -> Any:
    torch = try_import("torch")
    return getattr(torch, COMPUTE_DTYPE[train.precision])


def build_model(spec: ModelSpec, train: TrainConfig, *, device: str = "cpu") -> Any:
    """Random-weight model on `device` ("meta" for tracing), with dtypes, trainable flags, LoRA and checkpointing."""
    torch = try_import("torch")
    transformers = try_import("transformers")
    if train.method is Method.QLORA and device == "meta":
        from memplan.errors import ConfigError

        # Params4bit refuses a FakeTensor ("Creating a new Tensor subclass Params4bit but the raw Tensor object is
        # already associated to a python object of type FakeTensor"): the exact mode traces QLoRA as LoRA
        raise ConfigError("QLoRA cannot be built on the meta device (bitsandbytes quantizes real tensors)")
    train.check_extra_modules(spec.tie_word_embeddings)
    half = compute_dtype(train)
    dt = param_dtypes(train.stack, train.precision, spec.checkpoint_dtype, train.method)  # spec.dtypes
    load_dtype = getattr(torch, dt.frozen)  # the stack's load: the compute dtype, or LLaMA-Factory's checkpoint's
    with torch.device(device):
        model = getattr(transformers, spec.family.auto_class).from_config(hf_config(spec, train), dtype=load_dtype)
    model.train()
    if train.method is Method.QLORA:
        if train.quant_method.value != "bnb":
            from memplan.errors import ConfigError

            raise ConfigError(f"quantization_method {train.quant_method.value}: memplan builds bitsandbytes "
                              "quantized models only (hqq / eetq are estimated analytically)")
        _quantize_linears(model, train, half, device)
    prepare_for_stack(model, train)
    if train.is_lora:
        peft = try_import("peft")
        targets: Any = "all-linear" if train.lora_targets == ("all-linear",) else list(train.lora_targets)
        # a VL model's vision tower is never an adapter target (peft fullmatches a str exclude_modules)
        skip = spec.family.frozen_modules + spec.family.lora_exclude
        if train.llama_pro:
            targets = expanded_modules(model, spec, train, targets, skip)
        if lf_input_grads(train):
            # LLaMA-Factory enables checkpointing before the adapters (model/patcher.py patch_model ->
            # prepare_model_for_training, then adapter.py init_adapter), so peft's PeftModel.__init__ sees
            # is_gradient_checkpointing and calls enable_input_require_grads (peft_model.py L184-185 in 0.21,
            # L136-137 in LLaMA-Factory's 0.18.1; _prepare_model_for_gradient_checkpointing skips quantized models):
            # the embedding's output requires grad
            model.enable_input_require_grads()
        frozen = "|".join(f".*{re.escape(f)}.*" for f in skip) or None
        lcfg = adapter_config(train, targets, frozen)
        # peft makes the adapters in the base layer's dtype and upcasts half ones to fp32 with autocast_adapter_dtype
        # (peft tuners_utils.py cast_adapter_dtype); the stack's rule says which (spec.dtypes)
        model = peft.get_peft_model(model, lcfg, autocast_adapter_dtype=dt.adapters == "float32")
        for name, p in model.named_parameters():  # modules_to_save copies: LLaMA-Factory's cast of what trains
            if ".modules_to_save." in name and p.requires_grad:  # (adapter.py L286-288; fp32 unless pure_bf16)
                p.data = p.data.to(getattr(torch, dt.trainable))
        if train.method is Method.QLORA and stack_facts(train.stack).kbit_adapters_bf16:
            for name, p in model.named_parameters():  # TRL SFTTrainer (trl/trainer/sft_trainer.py L908-911)
                if p.requires_grad and "lora_magnitude_vector" not in name:
                    p.data = p.data.to(torch.bfloat16)
    else:
        trainable = _trainable_prefixes(spec, train)
        for name, p in model.named_parameters():
            p.requires_grad_((trainable is None or any(t in name for t in trainable))
                             and not any(f in name for f in spec.family.frozen_modules))
            if p.requires_grad and p.dtype != getattr(torch, dt.trainable):
                p.data = p.data.to(getattr(torch, dt.trainable))  # fp32 master weights unless pure_bf16
    if train.checkpointing:
        enable_checkpointing(model, train)
        if train.is_lora and stack_facts(train.stack).name is Stack.LLAMAFACTORY and has_images(spec, train):
            # LLaMA-Factory enables checkpointing before its adapters (model/patcher.py patch_model ->
            # prepare_model_for_training, then init_adapter), so peft's get_peft_model sees a checkpointing model
            # and calls enable_input_require_grads (peft_model.py l.184-185, l.728-735): a forward hook on every
            # sub-model's input embeddings, the text embedding and Qwen2-VL / 2.5-VL's vision patch_embed
            # (`_input_embed_layer = "patch_embed"`, modeling_qwen2_5_vl.py l.389; transformers modeling_utils.py
            # l.2147-2177), so the frozen tower records its graph. Text-only runs: the same bytes, left as built
            model.enable_input_require_grads()
    if train.stage is Stage.RM:
        model.v_head = value_head(spec.hidden_size, device)
    return model


def value_head(hidden_size: int, device: str) -> Any:
    """trl 0.24's ValueHead (trl/models/modeling_value_head.py L22-59), which LLaMA-Factory's reward stage puts on
    the (adapted) model: `AutoModelForCausalLMWithValueHead.from_pretrained(model)` after init_adapter (model/
    loader.py L183-185). No kwargs, so dropout 0.1 (L29-34), and nn.Linear(hidden, 1) in the default dtype (fp32),
    trainable; its forward casts its input to that dtype (L55-56)."""
    torch = try_import("torch")

    class ValueHead(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.dropout = torch.nn.Dropout(0.1)
            self.summary = torch.nn.Linear(hidden_size, 1, dtype=torch.float32)

        def forward(self, hidden_states: Any) -> Any:
            output = self.dropout(hidden_states)
            if output.dtype != self.summary.weight.dtype:
                output = output.to(self.summary.weight.dtype)
            return self.summary(output)

    with torch.device(device):
        return ValueHead()


def lf_input_grads(train: TrainConfig) -> bool:
    """LLaMA-Factory's LoRA / OFT under checkpointing: peft turns the input embedding's output grads on."""
    return train.is_lora and train.checkpointing and train.method is not Method.QLORA and \
        stack_facts(train.stack).name is Stack.LLAMAFACTORY


def expanded_modules(model: Any, spec: ModelSpec, train: TrainConfig, targets: Any, skip: tuple[str, ...]
                     ) -> list[str]:
    """LLaMA Pro under LoRA: the full names of the target modules inside the expanded blocks, as LLaMA-Factory
    passes them to peft (model_utils/misc.py find_expanded_modules: `target in name` and `.{idx}.` in name for each
    trained idx; lora_target all is find_all_linear_modules' leaf names of every *Linear* module but lm_head)."""
    torch = try_import("torch")
    if targets == "all-linear":
        targets = sorted({name.split(".")[-1] for name, m in model.named_modules()
                          if isinstance(m, torch.nn.Linear) and "lm_head" not in name
                          and not any(f in name for f in skip)})
    layers = [f".{i}." for i in train.trainable_layer_ids(spec.num_layers)]
    return [name for name, _ in model.named_modules()
            if any(t in name for t in targets) and any(layer in name for layer in layers)]


def adapter_config(train: TrainConfig, targets: Any, exclude: str | None) -> Any:
    """The peft config LLaMA-Factory builds (src/llamafactory/model/adapter.py _setup_lora_tuning L255-313): LoRA
    with use_dora / init_lora_weights "pissa" (pissa_iter -1) or "pissa_niter_{pissa_iter}", or OFTConfig with
    r=oft_rank, oft_block_size (module_dropout is stored but never applied in peft 0.21's OFT forward)."""
    peft = try_import("peft")
    if train.adapter is Adapter.OFT:
        return peft.OFTConfig(r=train.oft_rank, oft_block_size=train.oft_block_size, target_modules=targets,
                              task_type="CAUSAL_LM", exclude_modules=exclude,
                              modules_to_save=list(train.extra_modules) or None)
    init: Any = True
    if train.pissa_init:
        init = "pissa" if train.pissa_iter == -1 else f"pissa_niter_{train.pissa_iter}"
    return peft.LoraConfig(r=train.lora_rank, lora_alpha=train.alpha, lora_dropout=train.lora_dropout,
                           target_modules=targets, task_type="CAUSAL_LM", exclude_modules=exclude,
                           use_dora=train.adapter is Adapter.DORA, init_lora_weights=init,
                           modules_to_save=list(train.extra_modules) or None)


def prepare_for_stack(model: Any, train: TrainConfig) -> None:
    """The stack's own preparation of the loaded model, before the adapters (memplan.spec.stacks)."""
    torch = try_import("torch")
    if train.upcast_layernorm:  # prepare_model_for_training L171-175; LAYERNORM_NAMES = {"norm", "ln"}
        for name, param in model.named_parameters():
            if param.ndim == 1 and any(n in name for n in ("norm", "ln")):
                param.data = param.data.to(torch.float32)
    head = model.get_output_embeddings()
    if train.upcast_lmhead_output and isinstance(head, torch.nn.Linear) and head.weight.dtype != torch.float32:
        # LLaMA-Factory prepare_model_for_training L200-204: `output_layer.register_forward_hook(
        # _fp32_forward_post_hook)`, which returns `output.to(torch.float32)`
        head.register_forward_hook(lambda module, args, output: output.to(torch.float32))
    if train.method is Method.QLORA and stack_facts(train.stack).kbit_upcast:
        peft = try_import("peft")
        # peft's own function (the HF + PEFT QLoRA recipe): fp16/bf16 parameters that are not Params4bit -> fp32.
        # Its checkpointing part is left to enable_checkpointing, as HF Trainer re-enables it afterwards anyway.
        peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def enable_checkpointing(model: Any, train: TrainConfig) -> None:
    """Checkpoint every decoder layer as the stack does."""
    if stack_facts(train.stack).name is not Stack.LLAMAFACTORY:
        model.activation_checkpointing_enable()  # transformers 5 default: use_reentrant=False + input grads
        return
    # LLaMA-Factory's own wrapper (src/llamafactory/model/model_utils/checkpointing.py L100-154, HEAD ff6d4d12e;
    # llamafactory itself pins transformers <= 5.6 and cannot be imported beside memplan's): reentrant checkpoint,
    # only for modules with trainable parameters, whose hidden-states input is set to require grad
    import functools

    torch = try_import("torch")
    from torch.utils.checkpoint import checkpoint

    reentrant = functools.partial(checkpoint, use_reentrant=True)  # use_reentrant_gc defaults to true
    if train.offload_checkpoints:  # use_unsloth_gc: the layer input kept in host memory (offload_to_host)
        reentrant = _unsloth_checkpoint(torch)

    def custom_gradient_checkpointing_func(func: Any, *args: Any, **kwargs: Any) -> Any:
        inner = func.func if isinstance(func, functools.partial) else func
        # transformers 5.24 passes partial(forward, self, **kwargs) (modeling_layers.py L123), older ones a bound
        # __call__: the module is the method's __self__ or the partial's first argument
        module = getattr(inner, "__self__", None) or func.args[0]
        if any(p.requires_grad for p in module.parameters()):
            for arg in args:
                if torch.is_tensor(arg) and torch.is_floating_point(arg):
                    arg.requires_grad_(True)
                    break  # LLaMA-Factory: "assume the first tensor is always the hidden states"
            return reentrant(func, *args, **kwargs)
        return func(*args, **kwargs)

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=custom_gradient_checkpointing_func)


def _unsloth_checkpoint(torch: Any) -> Any:
    """LLaMA-Factory's UnslothGradientCheckpointing (model_utils/checkpointing.py
    get_unsloth_gradient_checkpointing_func, HEAD): the layer runs under no_grad, its input hidden states are
    saved as a host copy (`.to("cpu", non_blocking=True)`), brought back to the layer's device for the recompute
    in backward. The device is read off the input (LLaMA-Factory writes "cuda"); on a CPU it is the same tensor."""

    class UnslothGradientCheckpointing(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, forward_function: Any, hidden_states: Any, *args: Any) -> Any:
            saved = hidden_states.to("cpu", non_blocking=True)
            with torch.no_grad():
                outputs = forward_function(hidden_states, *args)
            ctx.save_for_backward(saved)
            ctx.forward_function, ctx.args, ctx.device = forward_function, args, hidden_states.device
            return outputs

        @staticmethod
        def backward(ctx: Any, grad_output: Any) -> Any:
            (hidden_states,) = ctx.saved_tensors
            hidden_states = hidden_states.to(ctx.device, non_blocking=True).detach()
            hidden_states.requires_grad_(True)
            with torch.enable_grad():
                outputs = ctx.forward_function(hidden_states, *ctx.args)
                output = outputs[0] if isinstance(outputs, tuple) else outputs
            torch.autograd.backward(output, grad_output)
            return (None, hidden_states.grad) + (None,) * len(ctx.args)

    def apply(func: Any, *args: Any, **kwargs: Any) -> Any:
        if kwargs:  # transformers 5 passes the layer's keyword arguments bound in `func` (a partial)
            import functools

            func = functools.partial(func, **kwargs)
        return UnslothGradientCheckpointing.apply(func, *args)

    return apply


def _quantize_linears(model: Any, train: TrainConfig, half: Any, device: str) -> None:
    """Swap every decoder nn.Linear (not lm_head) for a bitsandbytes Linear4bit (NF4, double quant) or Linear8bitLt,
    as transformers' BitsAndBytesConfig(load_in_4bit/8bit) does; the weights are quantised when moved to `device`
    (bitsandbytes 0.50 quantizes on the CPU too)."""
    torch = try_import("torch")
    bnb = try_import("bitsandbytes")
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, torch.nn.Linear) or name == "lm_head":
                continue
            weight = child.weight.data.to("cpu", half)
            if train.quant_bits == 4:
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=half, compress_statistics=train.double_quant,
                                      quant_type=train.quant_type)
                q.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=train.double_quant,
                                             quant_type=train.quant_type)
            else:
                q = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                                        has_fp16_weights=False)
                q.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
            if child.bias is not None:
                q.bias = torch.nn.Parameter(child.bias.data.to(half), requires_grad=False)
            setattr(parent, name, q.to(device))
    if device == "cuda":
        torch.cuda.empty_cache()


def _trainable_prefixes(spec: ModelSpec, train: TrainConfig) -> list[str] | None:
    """What a parameter's name contains when it trains (LLaMA-Factory _setup_freeze_tuning matches substrings):
    the trained layers' prefix, freeze_extra_modules' names."""
    if train.method is Method.FULL:
        return None
    parts = [""] if "all" in train.trainable_modules else list(train.trainable_modules)  # `.{idx}.{name}`
    return [f"layers.{i}.{part}" for i in train.trainable_layer_ids(spec.num_layers) for part in parts] + \
        list(train.extra_modules)


def build_optimizer(model: Any, train: TrainConfig) -> Any:
    """The optimizer HF Trainer would create for `optim` (memplan.spec.optimizers), foreach=True as on a GPU."""
    module, name, kwargs = facts(train.optimizer).builder
    if module == "memplan.build.optimizers":  # built on the model (LLaMA-Factory's create_custom_optimizer)
        from memplan.build import optimizers

        return getattr(optimizers, name)(model, train, **dict(kwargs))
    params = [p for p in model.parameters() if p.requires_grad]
    return getattr(try_import(module), name)(params, lr=1e-5, **dict(kwargs))


def build_reference_model(spec: ModelSpec, train: TrainConfig, *, device: str = "cpu") -> Any:
    """The frozen reference of a full / freeze / OFT DPO or KTO run, or None (LoRA disables the policy's adapters
    instead; the reference-free losses need none): LLaMA-Factory's create_ref_model (train/trainer_utils.py
    L116-148) loads the model again, not trainable — load_model(is_trainable=False): compute dtype, requires_grad
    off, eval mode."""
    if not train.separate_reference:
        return None
    torch = try_import("torch")
    transformers = try_import("transformers")
    with torch.device(device):
        ref = transformers.AutoModelForCausalLM.from_config(hf_config(spec, train), dtype=compute_dtype(train))
    if train.method is Method.QLORA:  # QOFT: the same quantization_bit (ModelArguments.copyfrom(model_args))
        _quantize_linears(ref, train, compute_dtype(train), device)
    ref.requires_grad_(False)
    return ref.eval()
