"""The optimizer table: every fact memplan uses about an optimizer, in one entry per optimizer.

The estimator (state bytes, step temporaries, DeepSpeed's fp32 partition), the model builder (which class HF
Trainer creates for `optim`), the readers and writers of HF `optim` / LLaMA-Factory YAML names, and the re-planner
of `memplan run` all read `OPTIMIZERS`. Adding an optimizer is one entry here (plus a test); an Optimizer without
an entry fails the table check at import.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Optimizer(str, Enum):
    ADAMW = "adamw"
    ADAMW_8BIT = "adamw_8bit"
    PAGED_ADAMW_8BIT = "paged_adamw_8bit"
    PAGED_ADAMW_32BIT = "paged_adamw_32bit"
    SGD = "sgd"
    SGD_MOMENTUM = "sgd_momentum"
    ADAFACTOR = "adafactor"


class States(str, Enum):
    """How an optimizer's state bytes follow the trainable parameters."""

    NONE = "none"  # plain SGD
    MOMENTUM = "momentum"  # one buffer in the parameter's dtype
    ADAM = "adam"  # exp_avg + exp_avg_sq in the parameter's dtype
    ADAM_FP32 = "adam_fp32"  # two fp32 buffers whatever the parameter's dtype (bitsandbytes 32-bit states)
    ADAM_8BIT = "adam_8bit"  # two uint8 buffers + an fp32 absmax per 256 elements (bitsandbytes blockwise)
    FACTORED = "factored"  # Adafactor: fp32 row + column second moments per matrix, full for vectors

    @property
    def follows_param_width(self) -> bool:
        """States in the parameter's dtype: DeepSpeed's optimizer then holds them in fp32 (its partition)."""
        return self in (States.MOMENTUM, States.ADAM)


@dataclass(frozen=True, slots=True, kw_only=True)
class OptimizerFacts:
    name: Optimizer
    states: States
    foreach_copy: bool  # torch foreach step: _foreach_sqrt(exp_avg_sq) is one more state-sized temporary
    hf_optim: str  # transformers TrainingArguments.optim written on export (LLaMA-Factory's `optim` too)
    hf_aliases: tuple[str, ...] = ()  # other `optim` names read as this optimizer
    optim_args: str = ""  # the HF `optim_args` that select it among equal names ("momentum=0.9")
    builder: tuple[str, str, tuple[tuple[str, object], ...]]  # (module, class, kwargs) HF Trainer builds
    bitsandbytes: bool = False  # needs bitsandbytes (the `qlora` extra)
    smaller: Optimizer | None = None  # what `memplan run` may switch to after an OOM (same update, less memory)
    explain: str  # the state formula, as `--explain` prints it


_NO_DECAY = (("weight_decay", 0.0),)
# Sources: transformers/trainer.py Trainer.get_optimizer_cls_and_kwargs (OptimizerNames -> class and kwargs);
# bitsandbytes/optim/optimizer.py Optimizer2State.init_state (8-bit: uint8 states + absmax per 256; 32-bit or a
# tensor below min_8bit_size: fp32 states; paged buffers fall back to ordinary ones on CPU).
OPTIMIZERS: dict[Optimizer, OptimizerFacts] = {f.name: f for f in (
    OptimizerFacts(name=Optimizer.ADAMW, states=States.ADAM, foreach_copy=True, hf_optim="adamw_torch",
                   hf_aliases=("adamw_torch_fused", "adamw_hf", "adamw_torch_xla", "adamw_apex_fused"),
                   builder=("torch.optim", "AdamW", (*_NO_DECAY, ("foreach", True))), smaller=Optimizer.ADAMW_8BIT,
                   explain="2 states (exp_avg, exp_avg_sq) x param width"),
    OptimizerFacts(name=Optimizer.ADAMW_8BIT, states=States.ADAM_8BIT, foreach_copy=False, hf_optim="adamw_bnb_8bit",
                   hf_aliases=("adamw_8bit",), builder=("bitsandbytes.optim", "AdamW8bit", _NO_DECAY),
                   bitsandbytes=True, explain="2 states x (1 B + 4 B absmax / 256)"),
    OptimizerFacts(name=Optimizer.PAGED_ADAMW_8BIT, states=States.ADAM_8BIT, foreach_copy=False,
                   hf_optim="paged_adamw_8bit", builder=("bitsandbytes.optim", "PagedAdamW8bit", _NO_DECAY),
                   bitsandbytes=True, explain="2 states x (1 B + 4 B absmax / 256), paged"),
    OptimizerFacts(name=Optimizer.PAGED_ADAMW_32BIT, states=States.ADAM_FP32, foreach_copy=False,
                   hf_optim="paged_adamw_32bit", builder=("bitsandbytes.optim", "PagedAdamW32bit", _NO_DECAY),
                   bitsandbytes=True, smaller=Optimizer.PAGED_ADAMW_8BIT,
                   explain="2 fp32 states (bitsandbytes 32-bit), paged; fused kernel, no temporaries"),
    OptimizerFacts(name=Optimizer.SGD, states=States.NONE, foreach_copy=False, hf_optim="sgd",
                   builder=("torch.optim", "SGD", (("foreach", True),)), explain="none"),
    OptimizerFacts(name=Optimizer.SGD_MOMENTUM, states=States.MOMENTUM, foreach_copy=False, hf_optim="sgd",
                   optim_args="momentum=0.9", builder=("torch.optim", "SGD", (("momentum", 0.9), ("foreach", True))),
                   explain="1 momentum buffer x param width"),
    # Trainer's optim=adafactor: scale_parameter=False, relative_step=False
    OptimizerFacts(name=Optimizer.ADAFACTOR, states=States.FACTORED, foreach_copy=False, hf_optim="adafactor",
                   builder=("transformers.optimization", "Adafactor",
                            (("scale_parameter", False), ("relative_step", False))),
                   explain="factored second moment: rows + cols per matrix, fp32"),
)}
assert set(OPTIMIZERS) == set(Optimizer), "every Optimizer needs an OPTIMIZERS entry"


def facts(optimizer: Optimizer) -> OptimizerFacts:
    return OPTIMIZERS[optimizer]


def hf_names() -> tuple[str, ...]:
    """Every HF / LLaMA-Factory `optim` name memplan models."""
    return tuple(dict.fromkeys(n for f in OPTIMIZERS.values() for n in (f.hf_optim, *f.hf_aliases)))


def from_hf(optim: str, optim_args: str = "") -> Optimizer | None:
    """An HF `optim` name (with its `optim_args`) -> the Optimizer; None for a name memplan does not model."""
    named = [f for f in OPTIMIZERS.values() if optim in (f.hf_optim, *f.hf_aliases)]
    chosen = [f for f in named if f.optim_args and f.optim_args.split("=")[0] in optim_args]
    plain = [f for f in named if not f.optim_args]
    pick = chosen or plain
    return pick[0].name if pick else None
