"""FSDP2 as HF Trainer / accelerate apply it (accelerate.utils.fsdp_utils.fsdp2_prepare_model): `fully_shard` on
each module class the model names in `_no_split_modules` (its decoder layers), then on the root; half parameters
gathered under AMP (MixedPrecisionPolicy), layers kept gathered after forward for shard_grad_op. FSDP1
(FullyShardedDataParallel, accelerate's default fsdp_version): `fsdp1_wrap_model`. The exact trace (under a fake
process group) and the probe's ranks wrap models with these functions."""

from __future__ import annotations

from typing import Any

from memplan.spec.train import TrainConfig


def fully_shard_model(model: Any, mesh: Any, train: TrainConfig) -> None:
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from memplan.build.model import compute_dtype

    amp = train.precision.value in ("fp16", "bf16")
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype(train), reduce_dtype=torch.float32) if amp else \
        MixedPrecisionPolicy()
    reshard = train.sharding.value != "shard_grad_op"
    kw: dict[str, Any] = {"reshard_after_forward": reshard, "mp_policy": policy}
    if train.offload.value != "none":  # probes on CUDA (the trace refuses offload): shards live on the host
        from torch.distributed.fsdp import CPUOffloadPolicy

        kw["offload_policy"] = CPUOffloadPolicy()
    layers = set(getattr(model, "_no_split_modules", None) or ())
    for module in model.modules():
        if type(module).__name__ in layers:
            fully_shard(module, mesh=mesh, **kw)
    fully_shard(model, mesh=mesh, **kw)


def fsdp1_wrap_model(model: Any, train: TrainConfig, device: str, process_group: Any = None,
                     device_mesh: Any = None) -> Any:
    """FSDP1 `FullyShardedDataParallel` as accelerate 1.15 prepares it (accelerator.py prepare_model, fsdp_version 1)
    under HF Trainer (transformers 5.24) with LLaMA-Factory's examples/accelerate/fsdp_config.yaml:
    transformer_auto_wrap_policy over `_no_split_modules` (FullyShardedDataParallelPlugin.set_auto_wrap_policy);
    for a peft model HF Trainer's update_fsdp_plugin_peft swaps in peft's `fsdp_auto_wrap_policy`, which also
    wraps every leaf module with a trainable weight (each lora_A / lora_B) as its own unit; under bf16/fp16 AMP
    MixedPrecision(param_dtype=reduce_dtype=buffer_dtype=half) (plugin.set_mixed_precision); backward_prefetch
    BACKWARD_PRE, use_orig_params and sync_module_states true, limit_all_gathers true (the config's and the
    plugin's defaults; sync_module_states, an initialisation broadcast, needs GPU tensors: FSDP1 refuses CPU
    modules with it, so it is off on CPU). Returns the wrapped model (FSDP1 wraps; it does not shard in place)."""
    import functools

    import torch
    from torch.distributed.fsdp import BackwardPrefetch, MixedPrecision, ShardingStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    from memplan.build.model import compute_dtype
    from memplan.spec.stacks import stack_facts

    stack = stack_facts(train.stack)
    names = set(getattr(model, "_no_split_modules", None) or ())
    classes = {type(m) for m in model.modules() if type(m).__name__ in names}
    if stack.fsdp1_policy == "torchtune":
        policy = functools.partial(_torchtune_policy, layers=tuple(classes), adapters=train.method.value != "full")
    elif hasattr(model, "peft_config"):
        from peft.utils.other import fsdp_auto_wrap_policy

        policy = fsdp_auto_wrap_policy(model)
    else:
        policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=classes)
    amp = train.precision.value in ("fp16", "bf16")
    half = compute_dtype(train)
    mixed = MixedPrecision(param_dtype=half, reduce_dtype=half, buffer_dtype=half) if amp else None
    kw: dict[str, Any] = {}
    if train.offload.value != "none":  # probes on CUDA (the trace refuses offload): parameters on the host
        from torch.distributed.fsdp import CPUOffload

        kw["cpu_offload"] = CPUOffload(offload_params=True)
    if device_mesh is not None:
        kw["device_mesh"] = device_mesh
    return FSDP(model, process_group=process_group, sharding_strategy=ShardingStrategy[train.sharding.name],
                auto_wrap_policy=policy, mixed_precision=mixed, backward_prefetch=BackwardPrefetch.BACKWARD_PRE,
                forward_prefetch=False, use_orig_params=stack.fsdp1_use_orig_params,
                sync_module_states=device == "cuda",
                limit_all_gathers=True, device_id=torch.device(device), **kw)


def _torchtune_policy(module: Any, recurse: bool, layers: tuple[type, ...], adapters: bool, **_: Any) -> bool:
    """torchtune@fef3ed1: lora_finetune_distributed.py wraps with torchtune/utils/_distributed.py
    lora_fsdp_wrap_policy (L286-297: a unit for every module whose weight requires grad, LoRA's A and B, and every
    decoder layer); full_finetune_distributed.py L273 with ModuleWrapPolicy({TransformerDecoderLayer})."""
    if recurse:
        return True
    weight = getattr(module, "weight", None)
    if adapters and getattr(weight, "requires_grad", False):
        return True
    return isinstance(module, layers)
