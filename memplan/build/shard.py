"""FSDP2 as HF Trainer / accelerate apply it (accelerate.utils.fsdp_utils.fsdp2_prepare_model): `fully_shard` on
each module class the model names in `_no_split_modules` (its decoder layers), then on the root; half parameters
gathered under AMP (MixedPrecisionPolicy), layers kept gathered after forward for shard_grad_op. The exact trace
(under a fake process group) and the probe's ranks wrap models with this one function."""

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
