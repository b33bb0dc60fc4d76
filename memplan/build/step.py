"""The reference step (README "The memory model", as HF Trainer runs it): for each optimizer step, `grad_accum`
micro-steps of `loss = model(input_ids=ids, labels=ids).loss; loss.backward()`, then `optimizer.step();
zero_grad(set_to_none=True)`. Trainer's compute_loss keeps only the loss, so the logits are released before
backward. The exact trace, the probe and the CPU ground truth all run this function."""

from __future__ import annotations

import contextlib
from typing import Any

from memplan._imports import try_import
from memplan.build.model import compute_dtype
from memplan.spec.dtypes import param_dtypes
from memplan.spec.train import Stage, TrainConfig

PHASES = ("forward", "backward", "optimizer")


def reference_step(model: Any, optimizer: Any, train: TrainConfig, ids: Any, mark: Any, steps: int = 2,
                   record_losses: bool = True, first: int = 1, ref_model: Any = None,
                   visual: dict[str, Any] | None = None) -> list[float]:
    """Run `steps` optimizer steps of the reference step, numbered from `first`; `mark(name)` returns a context
    manager per phase. record_losses=False for fake tensors, whose values cannot be read. A DPO config's loss is
    `dpo_loss` (`ref_model`: the frozen reference of a full / freeze run; LoRA disables its adapters instead).
    `visual`: a vision-language SFT step's other model inputs (memplan.build.visual.visual_batch: pixel_values,
    image_grid_thw, position_ids and the tower's precomputed indices), passed beside input_ids every micro-step."""
    torch = try_import("torch")
    amp = param_dtypes(train.stack, train.precision, None, train.method).autocast  # spec.dtypes: the flag decides
    if train.stage is Stage.DPO:
        pairs = torch.cat([ids, ids.flip(0)])  # chosen rows, then the rejected: the same tokens reversed

        def loss_of() -> Any:
            return dpo_loss(model, train, pairs, ref_model)
    elif train.stage is Stage.KTO:
        kl = ids.flip(0)  # the KL batch: each prompt with another row's response (the same shape)

        def loss_of() -> Any:
            return kto_loss(model, train, ids, kl, ref_model)
    elif train.stage is Stage.RM:
        pairs = torch.cat([ids, ids.flip(0)])

        def loss_of() -> Any:
            return rm_loss(model, train, pairs)
    else:
        extra = dict(visual or {})

        def loss_of() -> Any:
            return model(input_ids=ids, labels=ids, use_cache=False, **extra).loss
    losses = []
    for step in range(first, first + steps):
        for _ in range(train.grad_accum):
            with mark(f"forward:{step}"):
                ctx = torch.autocast("cpu", dtype=compute_dtype(train)) if amp else contextlib.nullcontext()
                with ctx:
                    loss = loss_of()
            with mark(f"backward:{step}"):
                (loss / train.grad_accum).backward()
            if record_losses:
                losses.append(float(loss.detach()))
            del loss
        with mark(f"optimizer:{step}"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return losses


def _log_softmax(sliced: Any) -> Any:
    """`sliced.log_softmax(-1)` with the copy its kernel makes of a non-contiguous input made here instead
    (aten/src/ATen/native/SoftMax.cpp host_softmax, and the CUDA kernel, take `input.contiguous()`): the same bytes
    for the same time, and visible to a fake-tensor trace, whose meta kernel allocates no such copy."""
    return sliced.contiguous().log_softmax(-1)


def _kto_logps(model: Any, ids: Any) -> tuple[Any, Any]:
    """LLaMA-Factory's KTOTrainer.forward (train/kto/trainer.py L110-143 at ff6d4d12e): fp32 logits, then
    get_batch_logps (trainer_utils.py L592-630). Returns (fp32 logits, per-row log-probs)."""
    torch = try_import("torch")
    logits = model(input_ids=ids, return_dict=True, use_cache=False).logits.to(torch.float32)
    labels = ids[:, 1:].clone()
    per_token = torch.gather(_log_softmax(logits[:, :-1, :]), dim=2, index=labels.unsqueeze(2)).squeeze(2)
    return logits, per_token.sum(-1)


def _kto_concatenated(model: Any, ids: Any, kl: Any) -> tuple[Any, Any, Any, Any, Any]:
    """concatenated_forward (L145-161): the target rows with grad, the KL rows under no_grad, then the target's
    logits and log-probs split by kto_tags. Boolean indexing copies; index_select makes the same copies with shapes
    a fake tensor can trace (the first half of the rows desirable)."""
    torch = try_import("torch")
    logits, logps = _kto_logps(model, ids)
    with torch.no_grad():
        _, kl_logps = _kto_logps(model, kl)
    rows = ids.size(0)
    chosen = torch.arange(0, (rows + 1) // 2)
    rejected = torch.arange((rows + 1) // 2, rows)
    return (logps.index_select(0, chosen), logps.index_select(0, rejected), logits.index_select(0, chosen),
            logits.index_select(0, rejected), kl_logps)


def kto_loss(model: Any, train: TrainConfig, ids: Any, kl: Any, ref_model: Any = None) -> Any:
    """LLaMA-Factory's KTO loss (kto/trainer.py get_batch_loss_metrics L220-270): the policy's concatenated forward,
    then the reference's under no_grad (compute_reference_log_probs L163-180: the policy with its adapters disabled
    for LoRA), TRL's kto_loss (beta pref_beta 0.1, weights 1). The policy's chosen / rejected logits live until the
    metrics are taken, at the end."""
    torch = try_import("torch")
    p_c, p_r, logits_c, logits_r, p_kl = _kto_concatenated(model, ids, kl)
    reference = ref_model if ref_model is not None else model
    off = contextlib.nullcontext() if ref_model is not None else model.disable_adapter()
    with torch.no_grad(), off:
        r_c, r_r, _, _, r_kl = _kto_concatenated(reference, ids, kl)
    beta = 0.1
    kl_term = (p_kl - r_kl).mean().clamp(min=0)
    chosen = 1 - torch.nn.functional.sigmoid(beta * ((p_c - r_c) - kl_term))
    rejected = 1 - torch.nn.functional.sigmoid(beta * (kl_term - (p_r - r_r)))
    loss = torch.cat((chosen, rejected), 0).nanmean()
    del logits_c, logits_r
    return loss


def rm_loss(model: Any, train: TrainConfig, pairs: Any) -> Any:
    """LLaMA-Factory's reward step (train/rm/trainer.py PairwiseTrainer.compute_loss L88-110 at ff6d4d12e) through
    trl 0.24's AutoModelForCausalLMWithValueHead.forward (trl/models/modeling_value_head.py L131-183): the
    pairwise collator's batch (chosen rows, then rejected) goes in with its labels, so the model computes its own
    LM loss too (unused); the value head reads `hidden_states[-1]` (the final norm's output: transformers
    utils/output_capturing.py L370-379); trl upcasts the logits to fp32 and returns (logits, loss, values), of
    which compute_loss keeps the values. The score is each row's value at its last token."""
    torch = try_import("torch")
    out = model(input_ids=pairs, labels=pairs, output_hidden_states=True, return_dict=True, use_cache=False)
    lm_logits = out.logits
    value = model.v_head(out.hidden_states[-1]).squeeze(-1)
    if lm_logits.dtype != torch.float32:
        lm_logits = lm_logits.float()
    del out, lm_logits  # trl's return tuple, unpacked as `_, _, values`
    half = train.batch_size
    last = torch.full((half, 1), pairs.size(1) - 1, dtype=torch.long)  # attention_mask.sum(-1) - 1: full rows
    chosen, rejected = value.split(half, dim=0)
    chosen_scores = chosen.gather(dim=-1, index=last).squeeze()
    rejected_scores = rejected.gather(dim=-1, index=last).squeeze()
    return -torch.nn.functional.logsigmoid(chosen_scores.float() - rejected_scores.float()).mean()


def _batch_logps(model: Any, ids: Any) -> tuple[Any, Any]:
    """LLaMA-Factory's concatenated_forward + get_batch_logps (src/llamafactory/train/dpo/trainer.py L219-252,
    train/trainer_utils.py L592-630 at HEAD ff6d4d12e): fp32 logits of the whole pair batch, log_softmax over the
    vocabulary, the label's log-prob gathered and summed per row. Returns (per-row log-probs, the fp32 logits the
    trainer keeps in its output dict until the loss is computed)."""
    torch = try_import("torch")
    logits = model(input_ids=ids, return_dict=True, use_cache=False).logits.to(torch.float32)
    labels = ids[:, 1:].clone()
    per_token = torch.gather(_log_softmax(logits[:, :-1, :]), dim=2, index=labels.unsqueeze(2)).squeeze(2)
    return per_token.sum(-1), logits


def dpo_loss(model: Any, train: TrainConfig, pairs: Any, ref_model: Any = None) -> Any:
    """LLaMA-Factory's DPO loss (dpo/trainer.py get_batch_loss_metrics L277-300): the policy's forward over chosen
    + rejected (PairwiseDataCollatorWithPadding: 2 x micro-batch rows), then the reference's under no_grad (the
    policy with its adapters disabled for LoRA, compute_reference_log_probs L255-275), the sigmoid preference
    loss. The policy's fp32 logits stay alive (the trainer's output dict) until the loss is made."""
    torch = try_import("torch")
    half = train.batch_size
    logps, logits = _batch_logps(model, pairs)
    ref_c = ref_r = torch.zeros((), dtype=torch.float32)
    if train.dpo_reference:
        reference = ref_model if ref_model is not None else model
        off = contextlib.nullcontext() if ref_model is not None else model.disable_adapter()
        with torch.no_grad(), off:
            ref, _ = _batch_logps(reference, pairs)
        ref_c, ref_r = ref.split(half, dim=0)
    chosen, rejected = logps.split(half, dim=0)
    # sigmoid loss (dpo/trainer.py compute_preference_loss -> TRL dpo_loss), beta 0.1
    loss = -torch.nn.functional.logsigmoid(0.1 * ((chosen - rejected) - (ref_c - ref_r))).mean()
    del logits, logps
    return loss
