"""What makes the real transformers model run its training step on fake tensors (README "Exact mode"): fake CPU
parameters swapped in for the meta ones, no packed-sequence detection (transformers would build a full mask),
grouped-matmul experts the meta kernel refuses, torch's fake process group for FSDP ranks, and quiet logs."""

from __future__ import annotations

import contextlib
from typing import Any

from memplan.spec.train import TrainConfig


@contextlib.contextmanager
def fake_process_group(train: TrainConfig):  # noqa: ANN202
    """FSDP configs: torch's fake process group (rank 0 of the shard group; collectives do nothing) and its
    device mesh, built outside FakeTensorMode. Yields None for everything else."""
    if not (train.parallel.fsdp2 or train.parallel.fsdp1):
        yield None
        return
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    world = train.gpus_per_node if train.sharding.value == "hybrid_shard" else train.gpus
    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        yield init_device_mesh("cpu", (world,))
    finally:
        dist.destroy_process_group()


def fake_parameters(model: Any, torch: Any) -> None:
    """Replace meta parameters and buffers by fake CPU tensors of the same dtype, keeping tied weights tied."""
    memo: dict[int, Any] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                if id(p) not in memo:
                    memo[id(p)] = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="cpu"),
                                                     requires_grad=p.requires_grad)
                module._parameters[name] = memo[id(p)]
        for name, b in list(module._buffers.items()):
            if b is not None:
                if id(b) not in memo:
                    memo[id(b)] = torch.empty(b.shape, dtype=b.dtype, device="cpu")
                module._buffers[name] = memo[id(b)]


@contextlib.contextmanager
def quiet():  # noqa: ANN202
    """transformers' deprecation warnings and config notices are not the user's business here, nor the fake-tensor
    mode's log of an op that failed (the error itself is raised, and reported in one line)."""
    import logging
    import warnings

    import transformers

    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    fake_level = fake_log.level
    fake_log.setLevel(logging.CRITICAL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            transformers.logging.set_verbosity(level)
            fake_log.setLevel(fake_level)


@contextlib.contextmanager
def fake_friendly_experts():  # noqa: ANN202
    """MoE experts in transformers 5 run as grouped matmuls over the T x k routed rows, so their memory does not
    depend on the routing. torch's meta kernel for grouped_mm accepts bf16 only (a CUDA rule) while the CPU kernel
    takes any dtype; on fake tensors of other dtypes a stand-in with aten's autograd behaviour runs instead: it
    saves the input only when the weight needs a gradient (and the weight only when the input does), returns
    (S, out), and computes in backward only the gradients that are needed (transformers' own fallback op saves
    and computes both, which over-counts frozen experts)."""
    try:
        import transformers.integrations.moe as moe
    except ImportError:  # a transformers without MoE integrations: nothing to patch
        yield
        return
    import torch
    from torch._subclasses.fake_tensor import FakeTensor

    class GroupedMM(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, input: Any, weight: Any, offs: Any) -> Any:  # noqa: ARG004
            # derivatives.yaml: grad_input needs the weight, grad_weight needs the input; each saved only if needed
            need_input, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            ctx.save_for_backward(input if need_weight else None, weight if need_input else None)
            ctx.shapes = ((input.shape, input.dtype), (weight.shape, weight.dtype))  # shapes only, no references
            return input.new_empty(input.size(0), weight.size(-1))

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            (in_shape, in_dtype), (w_shape, w_dtype) = ctx.shapes
            return (grad.new_empty(in_shape, dtype=in_dtype) if ctx.needs_input_grad[0] else None,
                    grad.new_empty(w_shape, dtype=w_dtype) if ctx.needs_input_grad[1] else None, None)

    original = moe._grouped_mm

    def grouped_mm(input: Any, weight: Any, offs: Any) -> Any:
        if isinstance(weight, FakeTensor) and weight.dtype != torch.bfloat16:
            return GroupedMM.apply(input.to(weight.dtype), weight, offs)
        return original(input, weight, offs=offs)

    moe._grouped_mm = grouped_mm
    try:
        yield
    finally:
        moe._grouped_mm = original


@contextlib.contextmanager
def no_packed_sequence_detection():  # noqa: ANN202
    """Under fake tensors transformers thinks it is tracing and builds a full (B,1,S,S) mask instead of
    `is_causal` (the forward peak was 6.5 % too high)."""
    import transformers.masking_utils as mu

    original = mu.find_packed_sequence_indices
    mu.find_packed_sequence_indices = lambda *args, **kwargs: None
    try:
        yield
    finally:
        mu.find_packed_sequence_indices = original


@contextlib.contextmanager
def constant_indices(on: bool = True):  # noqa: ANN202
    """A vision-language step's small integer inputs (token ids, image_grid_thw, M-RoPE position ids, the tower's
    cu_seqlens and window index) made by torch.tensor inside FakeTensorMode keep their values as fake-tensor
    constants, and ops on constants only are computed on them (torch/_subclasses/fake_tensor.py: lift_fresh and
    all-constant ops keep a constant when `numel() <= CONSTANT_NUMEL_LIMIT`, 1 by default): the data-dependent
    steps of the tower and the placeholder mask (`.tolist()` of the chunk lengths, `input_ids == image_token_id`,
    Qwen3-VL's deepstack `hidden_states[visual_pos_masks]`) then see real values. Tensors with a fake input stay
    fake, so no weight or activation is ever computed."""
    if not on:
        yield
        return
    from torch._subclasses import fake_tensor

    old = fake_tensor.CONSTANT_NUMEL_LIMIT
    fake_tensor.CONSTANT_NUMEL_LIMIT = 1 << 24
    try:
        yield
    finally:
        fake_tensor.CONSTANT_NUMEL_LIMIT = old
