"""Probe ranks under torchrun: wrap the model the way the training framework would, then step it.

- plain DDP (`--gpus N`): torch DistributedDataParallel; its gradient buckets are counted.
- FSDP (`--fsdp full_shard|shard_grad_op|hybrid_shard|no_shard`): with `--fsdp-version 1` (accelerate's default)
  FSDP1 FullyShardedDataParallel as accelerate + HF Trainer wrap it (memplan.build.shard.fsdp1_wrap_model); with
  2, FSDP2 `fully_shard` on each decoder layer and the root (the same wrapping the exact mode traces).
  hybrid_shard shards inside a node and replicates across `--nodes`. no_shard (FSDP1 only) is not probed.
- DeepSpeed ZeRO (`--zero 1|2|3`): `deepspeed.initialize` with memplan's optimizer as the client optimizer and
  the bucket sizes the estimator assumes (HF Trainer's "auto" fill unless set). On CPU, DeepSpeed's cpu
  accelerator (gloo).

The peak restarts after FSDP / DeepSpeed have wrapped the model: they take a model built on the host and put only
what each rank keeps on its device (on CPU there is one memory, so the full model built first is not counted).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from memplan.spec.train import Offload, Sharding, TrainConfig


@dataclass(slots=True)
class Wrapped:
    """One optimizer step of the reference step on the wrapped model (returns the micro-steps' losses)."""

    step: Callable[..., list[float]]  # step(ids, visual=None): visual, a VL step's other inputs (build/visual.py)


def host_built(train: TrainConfig) -> bool:
    """FSDP and DeepSpeed take a model built on the host and put on the device only what each rank keeps: the
    peak is measured from after wrapping."""
    return train.sharding is not Sharding.NONE


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_probeable(train: TrainConfig, device: str) -> None:
    """Refuse what a probe cannot run, before any process starts (one line for the user)."""
    from memplan.errors import ConfigError

    if device == "cuda":
        _require_nvidia_gpu()
    if device == "cpu" and train.method.value == "qlora":
        raise ConfigError("a QLoRA probe runs on CUDA (bitsandbytes' quantised linears): use --device cuda, or "
                          "estimate it (memplan estimate --method qlora)")
    if device == "cpu" and train.offload is not Offload.NONE:
        raise ConfigError("offload moves states to host memory: on a cpu probe host and device are one memory; "
                         "probe offload with --device cuda")
    if train.sharding is Sharding.NO_SHARD:  # FSDP1 runs it, but memplan's no_shard terms are not measured yet
        raise ConfigError("--fsdp no_shard is FSDP1's DDP-like mode (FSDP2 has none; memplan estimates it only): "
                          "probe it as DDP, without --fsdp")


def _require_nvidia_gpu() -> None:
    """--device cuda on a machine NVML says has no NVIDIA GPU is the user's error, found before a worker starts
    (without nvidia-ml-py nothing can be told here: the worker reports it)."""
    from memplan.errors import ConfigError

    try:
        import pynvml
    except ImportError:
        return
    try:
        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
    except Exception:  # noqa: BLE001 - no driver, no library, no device: all mean the same here
        count = 0
    if count == 0:
        raise ConfigError("--device cuda: NVML finds no NVIDIA GPU on this machine; probe with --device cpu "
                          "--capacity SIZE (a simulated device), or where a GPU is")


def wrap(model: Any, train: TrainConfig, device: str, build_optimizer: Callable[[Any], Any]) -> Wrapped:
    """Wrap `model` (built on the host, or on `device` for DDP) for this rank and return its step."""
    from memplan.build.step import reference_step

    if train.sharding.is_deepspeed:
        return _deepspeed(model, train, device, build_optimizer)
    if world_size() > 1 or train.sharding is not Sharding.NONE:
        _init_process_group(device)
    if train.parallel.fsdp1:
        model = _fsdp1(model, train, device)
    elif train.parallel.fsdp2:
        _fsdp(model, train, device)
    elif world_size() > 1:
        import torch

        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[torch.cuda.current_device()] if device == "cuda" else None)
    optimizer = build_optimizer(model)

    def step(ids: Any, visual: dict[str, Any] | None = None) -> list[float]:
        return reference_step(model, optimizer, train, ids, lambda _: contextlib.nullcontext(), steps=1,
                              visual=visual)

    return Wrapped(step=step)


def _init_process_group(device: str) -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo" if device == "cpu" else "nccl")


def _fsdp(model: Any, train: TrainConfig, device: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from memplan.build.shard import fully_shard_model

    n = world_size()
    # hybrid_shard: replicate across nodes, shard inside one (FSDP2's HSDP on a 2-D mesh)
    shape = (train.nodes, n // train.nodes) if train.sharding is Sharding.HYBRID_SHARD else (n,)
    names = ("replicate", "shard") if len(shape) == 2 else ("shard",)
    mesh = init_device_mesh(device, shape, mesh_dim_names=names)
    fully_shard_model(model, mesh, train)


def _fsdp1(model: Any, train: TrainConfig, device: str) -> Any:
    from memplan.build.shard import fsdp1_wrap_model

    if train.sharding is not Sharding.HYBRID_SHARD:
        return fsdp1_wrap_model(model, train, device)
    from torch.distributed.device_mesh import init_device_mesh

    n = world_size()  # FSDP1's HYBRID_SHARD takes a 2-D mesh: (replicate across nodes, shard inside one)
    mesh = init_device_mesh(device, (train.nodes, n // train.nodes), mesh_dim_names=("replicate", "shard"))
    return fsdp1_wrap_model(model, train, device, device_mesh=mesh)


def _deepspeed(model: Any, train: TrainConfig, device: str, build_optimizer: Callable[[Any], Any]) -> Wrapped:
    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's cpu accelerator: gloo, host tensors
    try:
        import deepspeed
    except ImportError:
        raise RuntimeError("--zero probes need DeepSpeed: pip install 'memplan[distributed]'") from None
    import logging

    from memplan.formats.deepspeed import deepspeed_config

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    deepspeed.init_distributed(dist_backend="gloo" if device == "cpu" else "nccl", verbose=False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, optimizer=build_optimizer(model),
                                      config=deepspeed_config(train, model.config.hidden_size))

    def step(ids: Any, visual: dict[str, Any] | None = None) -> list[float]:
        losses = []
        for _ in range(train.grad_accum):  # the engine scales the loss and steps at the accumulation boundary
            loss = engine(input_ids=ids, labels=ids, use_cache=False, **(visual or {})).loss
            engine.backward(loss)
            engine.step()
            losses.append(float(loss.detach()))
            del loss
        return losses

    return Wrapped(step=step)
