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
    ADAMW_FUSED = "adamw_fused"  # torch.optim.AdamW(fused=True): transformers >= 5 with torch >= 2.8 by default
    ADAMW_8BIT = "adamw_8bit"
    PAGED_ADAMW_8BIT = "paged_adamw_8bit"
    PAGED_ADAMW_32BIT = "paged_adamw_32bit"
    SGD = "sgd"
    SGD_MOMENTUM = "sgd_momentum"
    ADAFACTOR = "adafactor"
    # LLaMA-Factory's memory-saving optimizers (train/trainer_utils.py create_custom_optimizer) and transformers'
    # OptimizerNames of the same algorithms
    GALORE_ADAMW = "galore_adamw"
    GALORE_ADAMW_LAYERWISE = "galore_adamw_layerwise"
    APOLLO_ADAMW = "apollo_adamw"
    APOLLO_ADAMW_LAYERWISE = "apollo_adamw_layerwise"
    ADAM_MINI = "adam_mini"
    MUON = "muon"
    LOMO = "lomo"
    ADALOMO = "adalomo"
    ADAMW_4BIT = "adamw_4bit"


class States(str, Enum):
    """How an optimizer's state bytes follow the trainable parameters."""

    NONE = "none"  # plain SGD
    MOMENTUM = "momentum"  # one buffer in the parameter's dtype
    ADAM = "adam"  # exp_avg + exp_avg_sq in the parameter's dtype
    ADAM_FP32 = "adam_fp32"  # two fp32 buffers whatever the parameter's dtype (bitsandbytes 32-bit states)
    ADAM_8BIT = "adam_8bit"  # two uint8 buffers + an fp32 absmax per 256 elements (bitsandbytes blockwise)
    FACTORED = "factored"  # Adafactor: fp32 row + column second moments per matrix, full for vectors
    ADAM_MINI = "adam_mini"  # exp_avg full; one second moment per attention head (q, k) or row (the rest)
    MUON = "muon"  # LF's Muon: a momentum buffer for hidden 2-D matrices, AdamW's two for the rest
    ADAM_4BIT = "adam_4bit"  # torchao AdamW4bit: two 4-bit states + an fp32 scale per 128 elements

    @property
    def follows_param_width(self) -> bool:
        """States in the parameter's dtype: DeepSpeed's optimizer then holds them in fp32 (its partition)."""
        return self in (States.MOMENTUM, States.ADAM)


class Projection(str, Enum):
    """Low-rank gradient projection of the 2-D target weights: the states follow the projected gradient."""

    NONE = "none"
    SVD = "svd"  # GaLore: P from torch.linalg.svd of the gradient (galore_torch/galore_projector.py)
    RANDOM = "random"  # APOLLO: a seeded Gaussian P (apollo_torch/random_projector.py)


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
    projection: Projection = Projection.NONE  # the states rule applies to the projected gradient of targets
    # the step runs per parameter inside backward (LLaMA-Factory's *_layerwise register_post_accumulate_grad_hook,
    # LOMO's fused backward): one gradient alive at a time, no optimizer phase after backward
    per_param: bool = False
    full_only: bool = False  # LLaMA-Factory refuses it with LoRA (finetuning_args.py __post_init__)
    lf_flag: str = ""  # the LLaMA-Factory key that selects it over `optim` (use_galore), "" for an `optim` name
    lf_base: Optimizer | None = None  # the `optim` LLaMA-Factory reads beside lf_flag (GaLoreAdamW: adamw_torch)


_NO_DECAY = (("weight_decay", 0.0),)
_LF = "memplan.build.optimizers"  # builders that take the model (LLaMA-Factory's create_custom_optimizer)
# Sources: transformers/trainer.py Trainer.get_optimizer_cls_and_kwargs (OptimizerNames -> class and kwargs);
# bitsandbytes/optim/optimizer.py Optimizer2State.init_state (8-bit: uint8 states + absmax per 256; 32-bit or a
# tensor below min_8bit_size: fp32 states; paged buffers fall back to ordinary ones on CPU).
OPTIMIZERS: dict[Optimizer, OptimizerFacts] = {f.name: f for f in (
    OptimizerFacts(name=Optimizer.ADAMW, states=States.ADAM, foreach_copy=True, hf_optim="adamw_torch",
                   hf_aliases=("adamw_hf", "adamw_torch_xla", "adamw_apex_fused"),
                   builder=("torch.optim", "AdamW", (*_NO_DECAY, ("foreach", True))), smaller=Optimizer.ADAMW_8BIT,
                   explain="2 states (exp_avg, exp_avg_sq) x param width"),
    # transformers 5.6 Trainer.get_optimizer_cls_and_kwargs: adamw_torch_fused -> AdamW(fused=True); torch's
    # _fused_adamw_ updates every tensor in place (torch/optim/adamw.py -> adam.py _fused_adam): no state-sized
    # temporary. TrainingArguments.optim defaults to it with torch >= 2.8 (transformers 5.6 training_args.py
    # L811-816), so a LLaMA-Factory 0.9.5 YAML without `optim` runs it (measured: benchmarks/results/
    # llamafactory_truth.md, full fine-tuning within 0.5 % of LLaMA-Factory's CPU peak, +22 % as foreach)
    OptimizerFacts(name=Optimizer.ADAMW_FUSED, states=States.ADAM, foreach_copy=False, hf_optim="adamw_torch_fused",
                   builder=("torch.optim", "AdamW", (*_NO_DECAY, ("fused", True))), smaller=Optimizer.ADAMW_8BIT,
                   explain="2 states (exp_avg, exp_avg_sq) x param width; fused in place, no temporaries"),
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
    # GaLore (galore_torch/adamw.py AdamW.step): Adam states of the projected gradient (r x max(m, n)) of each 2-D
    # target weight and its projector P (GaLoreProjector.get_orthogonal_matrix: a slice of the SVD's U or Vh, which
    # keeps the whole min(m, n)^2 fp32 factor alive unless cast to a half dtype); plain Adam for the rest
    OptimizerFacts(name=Optimizer.GALORE_ADAMW, states=States.ADAM, foreach_copy=False, hf_optim="galore_adamw",
                   builder=(_LF, "galore", ()), projection=Projection.SVD, full_only=True, lf_flag="use_galore",
                   lf_base=Optimizer.ADAMW, explain="2 states x rank x max(m, n) per projected matrix + its "
                                                    "projector; 2 states x param width for the rest"),
    OptimizerFacts(name=Optimizer.GALORE_ADAMW_LAYERWISE, states=States.ADAM, foreach_copy=False,
                   hf_optim="galore_adamw_layerwise", builder=(_LF, "galore", (("layerwise", True),)),
                   projection=Projection.SVD, per_param=True, full_only=True, lf_flag="use_galore",
                   lf_base=Optimizer.ADAMW, explain="GaLore states; the step runs per parameter in backward"),
    # APOLLO (apollo_torch/apollo.py AdamW.step, random_projector.py): a seeded Gaussian P (r x n or m x r) in the
    # parameter's dtype, Adam states of the projected gradient, one norm scalar per matrix
    OptimizerFacts(name=Optimizer.APOLLO_ADAMW, states=States.ADAM, foreach_copy=False, hf_optim="apollo_adamw",
                   builder=(_LF, "apollo", ()), projection=Projection.RANDOM, full_only=True,
                   lf_flag="use_apollo", lf_base=Optimizer.ADAMW,
                   explain="2 states x rank x max(m, n) + a random projector per target matrix; Adam for the rest"),
    OptimizerFacts(name=Optimizer.APOLLO_ADAMW_LAYERWISE, states=States.ADAM, foreach_copy=False,
                   hf_optim="apollo_adamw_layerwise", builder=(_LF, "apollo", (("layerwise", True),)),
                   projection=Projection.RANDOM, per_param=True, full_only=True, lf_flag="use_apollo",
                   lf_base=Optimizer.ADAMW, explain="APOLLO states; the step runs per parameter in backward"),
    # Adam-mini (adam_mini/adam_mini.py Adam_mini.step): m full; v one value per head (q, k), per row (embedding,
    # lm_head, v, o, MLP) or per tensor (norms). Its q/k views fail on LoRA adapters: full / freeze only
    OptimizerFacts(name=Optimizer.ADAM_MINI, states=States.ADAM_MINI, foreach_copy=False, hf_optim="",
                   builder=(_LF, "adam_mini", ()), full_only=True, lf_flag="use_adam_mini",
                   explain="exp_avg x param width + one second moment per head / row / tensor"),
    # LLaMA-Factory's Muon (third_party/muon/muon.py Muon.step): momentum_buffer for 2-D params outside the
    # embedding and lm_head, AdamW moment1 + moment2 for the rest, all zeros_like(grad)
    OptimizerFacts(name=Optimizer.MUON, states=States.MUON, foreach_copy=False, hf_optim="",
                   builder=(_LF, "muon", ()), lf_flag="use_muon",
                   explain="1 momentum x width for hidden matrices, 2 Adam states x width for the rest"),
    # LOMO / AdaLomo (lomo_optim lomo.py, adalomo.py fuse_update): a tensor hook per parameter applies the update
    # as each gradient arrives in backward (Trainer.training_step calls optimizer.fused_backward); AdaLomo keeps
    # fp32 row + column second moments per matrix (`torch.zeros(..., dtype=torch.float32)`)
    OptimizerFacts(name=Optimizer.LOMO, states=States.NONE, foreach_copy=False, hf_optim="lomo",
                   builder=(_LF, "lomo", ()), per_param=True, explain="none; gradients applied in backward"),
    OptimizerFacts(name=Optimizer.ADALOMO, states=States.FACTORED, foreach_copy=False, hf_optim="adalomo",
                   builder=(_LF, "lomo", (("ada", True),)), per_param=True,
                   explain="factored second moment: rows + cols per matrix, fp32; gradients applied in backward"),
    # torchao AdamW4bit (torchao/optim/adam.py _AdamBase._new_buffer, subclass_4bit.py OptimState4bit.zeros): a
    # tensor of >= 4096 elements divisible by 128 gets uint8 codes (n / 2) + fp32 scales (n / 128) + a 16-entry
    # fp32 qmap per state; others zeros_like(p)
    OptimizerFacts(name=Optimizer.ADAMW_4BIT, states=States.ADAM_4BIT, foreach_copy=False,
                   hf_optim="adamw_torch_4bit", builder=("torchao.optim", "AdamW4bit", _NO_DECAY),
                   explain="2 states x (0.5 B + 4 B / 128) + 2 x 64 B qmap per tensor"),
)}
assert set(OPTIMIZERS) == set(Optimizer), "every Optimizer needs an OPTIMIZERS entry"


def facts(optimizer: Optimizer) -> OptimizerFacts:
    return OPTIMIZERS[optimizer]


def hf_names() -> tuple[str, ...]:
    """Every HF / LLaMA-Factory `optim` name memplan models."""
    return tuple(dict.fromkeys(n for f in OPTIMIZERS.values() for n in (f.hf_optim, *f.hf_aliases) if n))


def from_llamafactory(optim: Optimizer, flags: dict[str, bool]) -> Optimizer | None:
    """LLaMA-Factory's choice (trainer_utils.py create_custom_optimizer): the entry selected by the first set flag
    among use_galore / use_apollo / use_adam_mini / use_muon (`*_layerwise` too) over the `optim` it reads; `optim`
    itself without one; None for a combination it raises on (GaLore over lion, say) or memplan does not model."""
    on = [k for k in ("use_galore", "use_apollo", "use_adam_mini", "use_muon") if flags.get(k)]
    if not on:
        return optim
    layerwise = bool(flags.get(on[0].removeprefix("use_") + "_layerwise"))
    pick = [f.name for f in OPTIMIZERS.values() if f.lf_flag == on[0] and f.per_param == layerwise
            and f.lf_base in (None, optim)]
    return pick[0] if pick else None


def from_hf(optim: str, optim_args: str = "") -> Optimizer | None:
    """An HF `optim` name (with its `optim_args`) -> the Optimizer; None for a name memplan does not model."""
    named = [f for f in OPTIMIZERS.values() if f.hf_optim and optim in (f.hf_optim, *f.hf_aliases)]
    chosen = [f for f in named if f.optim_args and f.optim_args.split("=")[0] in optim_args]
    plain = [f for f in named if not f.optim_args]
    pick = chosen or plain
    return pick[0].name if pick else None
