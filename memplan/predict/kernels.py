"""Liger kernels (LLaMA-Factory enable_liger_kernel: model/model_utils/liger_kernel.py apply_liger_kernel, which
calls liger's apply_liger_kernel_to_<model_type>() with its defaults: rope, rms_norm, swiglu and
fused_linear_cross_entropy on; the latter off where the stage needs the logits, DPO among them).

Read at linkedin/Liger-Kernel HEAD ead96b61 (triton kernels: not runnable on a CPU, so these are formulas from the
source, their terms tested on shapes):
  fused linear cross-entropy  ops/fused_linear_cross_entropy.py fused_linear_cross_entropy_forward L21-289: the
      (B*S, V) logits are never materialised; the tokens run in chunks of
      next_power_of_2(ceil(BT / ceil(V / H))) rows (L66-70), each chunk's logits (chunk, V) in the compute dtype
      turned in place into their gradient, projected into grad_input (BT, H) (zeros_like(_input), L72) and, when
      the head trains, grad_weight (V, H) (L77-81); loss_1d (BT,) fp32 (L86). Both gradients are computed in
      forward and saved for backward (L431-435), which only scales them.
  RMSNorm  ops/rms_norm.py LigerRMSNormFunction.forward L657: saves X (its input itself, no fp32 copy) and RSTD
      (one fp32 per row); Y in X's dtype.
  SwiGLU   ops/swiglu.py LigerSiLUMulFunction.forward L262: saves a (gate) and b (up) only; silu is recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from memplan.spec.train import Method

if TYPE_CHECKING:
    from memplan.predict.layout import Layout

FP32 = 4


def next_power_of_2(n: int) -> int:
    """triton.next_power_of_2."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


def flce_chunk_rows(tokens: int, vocab: int, hidden: int) -> int:
    """Rows per chunk (L68-69): inc_factor = ceil(V / H); chunk = next_power_of_2(ceil(BT / inc_factor))."""
    inc = -(-vocab // hidden)
    return next_power_of_2(-(-tokens // inc))


@dataclass(frozen=True, slots=True, kw_only=True)
class FusedCE:
    """Bytes of the fused linear cross-entropy, in place of the logits, their upcast, log-probs and gradient."""

    grad_input_bytes: int  # (BT, H) in the head input's dtype, kept from forward into backward
    grad_weight_bytes: int  # (V, H) in the head weight's dtype, when the head trains (kept the same way)
    chunk_bytes: int  # one chunk's logits (chunk, V), the compute dtype, transient in forward
    chunk_grad_input_bytes: int  # `grad_logits_chunk @ weight` (chunk, H) before it is copied into grad_input
    loss_bytes: int  # loss_1d (BT,) fp32

    @property
    def forward_peak_bytes(self) -> int:
        """Live beside the kept state at the high point of one chunk."""
        return self.grad_input_bytes + self.grad_weight_bytes + self.chunk_bytes + self.chunk_grad_input_bytes + \
            self.loss_bytes


def fused_ce(*, tokens: int, vocab: int, hidden: int, input_width: int, compute_width: int,
             head_width: int, head_trains: bool) -> FusedCE:
    chunk = min(flce_chunk_rows(tokens, vocab, hidden), tokens)  # the last chunk is end_idx-clipped
    return FusedCE(grad_input_bytes=tokens * hidden * input_width,
                   grad_weight_bytes=vocab * hidden * head_width if head_trains else 0,
                   chunk_bytes=chunk * vocab * compute_width, chunk_grad_input_bytes=chunk * hidden * compute_width,
                   loss_bytes=tokens * FP32)

# the model types LLaMA-Factory patches (model_utils/liger_kernel.py L40-104); any other: a warning, no kernel
LIGER_MODEL_TYPES = frozenset({
    "gemma", "gemma2", "gemma3", "gemma3_text", "glm", "glm4", "glm4v", "granite", "llama", "llava", "mistral",
    "mixtral", "mllama", "olmo2", "paligemma", "phi3", "qwen2", "qwen2_vl", "qwen2_5_vl", "qwen3", "qwen3_moe",
    "qwen3_next", "qwen3_5", "qwen3_5_moe", "gpt_oss"})


def liger_applies(model_type: str, liger_kernel: bool) -> bool:
    return liger_kernel and model_type in LIGER_MODEL_TYPES


# ---- Unsloth's gradient checkpointing (LLaMA-Factory use_unsloth_gc) ----------------------------------------------
def offloads_checkpoints(lay: Layout) -> bool:
    """use_unsloth_gc on a GPU (on a CPU the host copy is the tensor itself: nothing moves)."""
    return lay.train.offload_checkpoints and lay.train.checkpointing and lay.device != "cpu"


def offloaded_checkpoint_bytes(lay: Layout) -> int:
    """Host memory the offloaded layer inputs take, per GPU: one (B, S, H) stream-dtype copy per checkpointed
    layer."""
    if not offloads_checkpoints(lay):
        return 0
    tr, s = lay.train, lay.spec
    layers = lay.trainable_layers if tr.method is Method.FREEZE else len(lay.adapted_ids) if tr.is_lora else \
        s.num_layers
    return layers * tr.batch_size * tr.seq_len * s.hidden_size * lay.stream_width
