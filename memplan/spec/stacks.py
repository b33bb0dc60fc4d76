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
depends on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Stack(str, Enum):
    HF = "hf"  # HF Trainer + peft (prepare_model_for_kbit_training for k-bit models)
    LLAMAFACTORY = "llamafactory"  # llamafactory-cli train: its own model preparation
    REFERENCE = "reference"  # memplan's reference step (README "The memory model"), no stack preparation


@dataclass(frozen=True, slots=True, kw_only=True)
class StackFacts:
    name: Stack
    title: str
    kbit_upcast: bool  # k-bit models: every fp16/bf16 parameter that is not 4-bit storage is cast to fp32
    reentrant_checkpointing: bool  # torch.utils.checkpoint(use_reentrant=...) of the checkpointed layers
    source: str  # where the behaviour is, file and lines in the version read
    explain: str  # one line for --explain


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
        name=Stack.REFERENCE, title="memplan reference step", kbit_upcast=False, reentrant_checkpointing=False,
        source="memplan/build/step.py reference_step",
        explain="memplan's reference step: the model as built, transformers' own checkpointing"),
)}

assert set(STACKS) == set(Stack), "every Stack needs its STACKS entry"


def stack_facts(stack: Stack) -> StackFacts:
    return STACKS[stack]
