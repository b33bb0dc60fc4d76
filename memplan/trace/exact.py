"""The exact mode: the real transformers model's reference step traced on fake tensors at a few depths and
extrapolated to the real one; the same Breakdown as the analytic estimator. No memory, no GPU, no weights."""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass

from memplan.build.visual import has_images
from memplan.errors import ConfigError, MemplanError, UnsupportedModel
from memplan.predict.band import band_for
from memplan.predict.breakdown import Breakdown, Term
from memplan.predict.cuda import CUDA_CONTEXT_BYTES, with_cuda_terms
from memplan.predict.estimator import estimate
from memplan.spec.model import ModelSpec
from memplan.spec.optimizers import Projection, facts
from memplan.spec.stacks import stack_facts
from memplan.spec.train import Attention, Method, TrainConfig
from memplan.trace.depth import extrapolate
from memplan.trace.fork import trace_depths
from memplan.trace.step import Trace, trace_depth


def exact_mode_available() -> bool:
    """torch and transformers importable (checked without importing them)."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers", "peft"))


def estimate_any(spec: ModelSpec, train: TrainConfig, *, exact: bool = False, trust_remote_code: bool = False,
                 by_module: bool = False, device: str = "cuda") -> Breakdown:
    """The analytic estimate (for `device`'s kernels); the exact mode when asked for, or when the architecture is
    not in the formulas (then `Breakdown.note` says so). Without the trace extra, an unknown architecture is the
    analytic error."""
    if by_module and not exact:
        raise ConfigError("--by-module needs the exact mode: add --exact (or use memplan trace)")
    if not exact and spec.analytic:
        return estimate(spec, train, device=device)
    if not exact and not exact_mode_available():
        estimate(spec, train)  # raises the clear "not in the analytic formulas" error
    why = (f"{spec.model_type} is not in the analytic formulas" if not spec.family.analytic else
           f"{spec.name} is a pre-quantized checkpoint" if spec.quantization else
           f"{spec.name} mixes layer kinds (dense and MoE) the analytic formulas do not")
    if not exact and not train.parallel.traceable:  # the user never asked for --exact: say why it fell back
        layout = train.sharding.value if train.sharding.value != "none" else "DDP"
        raise UnsupportedModel(f"{why}, and the exact mode it falls back to traces one GPU, or one FSDP rank: "
                               f"{layout} over {train.gpus} GPUs is not estimated for it (try --fsdp full_shard, "
                               "or one GPU)")
    bd = exact_estimate(spec, train, trust_remote_code=trust_remote_code, by_module=by_module)
    if exact:
        return bd
    limits = f"; {bd.note}" if bd.note else ""  # what the trace leaves out for this type (Family.limits)
    return dataclasses.replace(bd, note=f"{why}: using the exact mode (fake-tensor trace){limits}")


def _registered(model_type: str) -> bool:
    """transformers' AutoConfig knows this model_type (shipped, or registered in this process)."""
    from transformers import CONFIG_MAPPING

    return model_type in CONFIG_MAPPING


def exact_estimate(spec: ModelSpec, train: TrainConfig, *, trust_remote_code: bool = False,
                   by_module: bool = False, device: str = "cuda") -> Breakdown:
    """Peak memory from traces of the real model, extrapolated in depth; same Breakdown as the analytic one.
    device="cpu": the traced step as it is (PyTorch's CPU kernels), without the CUDA-only terms."""
    return exact_run(spec, train, trust_remote_code=trust_remote_code, by_module=by_module,
                     device=device).breakdown


@dataclass(frozen=True, slots=True, kw_only=True)
class ExactRun:
    """The exact mode's Breakdown and the traces behind it (what `memplan trace --timeline` draws)."""

    breakdown: Breakdown
    traces: list[Trace]  # the traced depths, shallowest first
    full: Trace  # the real depth: one of the traces, a trace at full depth, or the line through them (no events)
    traced_train: TrainConfig  # what was traced (QLoRA: as LoRA)


def exact_run(spec: ModelSpec, train: TrainConfig, *, trust_remote_code: bool = False, by_module: bool = False,
              labels: bool = False, device: str = "cuda") -> ExactRun:
    """`exact_estimate` with its traces; labels: every allocation event named by its phase, module and op."""
    if spec.remote_code and not trust_remote_code:
        raise UnsupportedModel(f"{spec.name}: model_type {spec.model_type!r} needs trust_remote_code; "
                               "pass --trust-remote-code to run its code")
    if spec.remote_code and not _registered(spec.model_type):
        # memplan ships no remote code and builds the model from its config alone (build.model.hf_config)
        raise UnsupportedModel(f"{spec.name}: transformers has no {spec.model_type!r} model and memplan ships none "
                               "of its remote code, so the exact mode cannot build it here (register the model's "
                               "classes with transformers' Auto classes in-process, as benchmarks/qwen1_check.py "
                               "does); the analytic estimate models it: drop --exact")
    if not stack_facts(train.stack).traced:
        raise UnsupportedModel(f"the exact mode builds the transformers model; the {train.stack.value} stack's own "
                               "model code and quantizer are modelled analytically only: drop --exact")
    note = ""
    traced_train = train
    if train.method is Method.QLORA:  # bitsandbytes cannot run on fake CPU tensors: trace LoRA, model the rest
        traced_train = train.with_(method=Method.LORA)
        note = "; QLoRA: traced as LoRA, NF4/int8 storage and saved inputs of quantized linears added analytically"
    swapped = ""
    no_fa2 = importlib.util.find_spec("flash_attn") is None
    if train.attn is Attention.FLASH_ATTENTION_2 and spec.family.sdpa and no_fa2:
        # transformers refuses flash_attention_2 without the flash_attn package (never there on a CPU trace): trace
        # sdpa, whose CPU kernel (_scaled_dot_product_flash_attention_for_cpu) saves what flash-attn 2's backward
        # keeps, the output and its logsumexp, and no (S, S) scores
        traced_train = traced_train.with_(attn=Attention.SDPA)
        swapped = "flash_attention_2 traced as sdpa (flash_attn is not installed here; both keep no (S, S) scores)"
    analytic = dict(liger_kernel=False, offload_checkpoints=False, pissa_init=False)
    if any(getattr(train, k) for k in analytic):
        # Liger's triton kernels and the host offload of use_unsloth_gc only exist on a GPU (a CPU copy is the
        # tensor itself), and PiSSA's SVD is a load-phase transient: traced without them, their delta analytic
        traced_train = traced_train.with_(**analytic)
        note += "; " + ", ".join(k for k in analytic if getattr(train, k)) + ": traced without, added analytically"
    if has_images(spec, train) and train.stage.value != "sft":
        raise UnsupportedModel("the exact mode feeds images to sft / pt steps only (its DPO / KTO / RM steps take "
                               "token ids): the analytic estimate costs the policy's image forward (drop --exact)")
    if train.separate_reference:
        raise UnsupportedModel("the exact mode does not build DPO's / KTO's separate reference model (full / "
                               "freeze / OFT) yet: the analytic estimate models it (drop --exact)")
    if facts(train.optimizer).projection is not Projection.NONE:
        raise UnsupportedModel("the exact mode does not trace GaLore / APOLLO steps (their projectors read gradient "
                               "values: SVD, norms): the analytic estimate models them (drop --exact)")
    if not train.parallel.traceable:
        raise UnsupportedModel("the exact mode traces one GPU's step, or one FSDP rank (fake process group); "
                               "per-rank memory under DDP / ZeRO / offload is analytic (so is FSDP1 no_shard / "
                               "shard_grad_op: FSDP1 cannot run them on fake tensors): drop --exact")
    if spec.is_moe or spec.family.moe:
        note += ("; MoE: experts run as grouped matmuls over the tokens x experts_per_token routed rows, so memory "
                 "does not depend on how the router balances them")
    # the depth line adds frozen layers below the trained ones; the first N layers or LLaMA Pro's blocks (freeze
    # or LoRA) depend on the depth itself: traced at the real depth
    real_depth = train.llama_pro or (train.method is Method.FREEZE and train.freeze_trainable_layers < 0)
    first = min(train.freeze_trainable_layers, spec.num_layers) if train.method is Method.FREEZE else 0
    if train.sharding.is_fsdp:  # FSDP's prefetching only settles from three layers on (measured on 7B:
        first += 2  # the backward peak grows 0.73, 0.40, 0.40 GiB from 2 to 5 layers)
    first += spec.dense_prefix  # the line starts past the leading dense layers (they are in every traced depth)
    if has_images(spec, train) and spec.family.vision == "qwen3_vl":  # the decoder layers that add deepstack
        # features (Qwen3VLTextModel.forward l.827-832: layer_idx < len(deepstack_visual_embeds)) differ from the rest
        first += len((spec.config.get("vision_config") or {}).get("deepstack_visual_indexes", (8, 16, 24)))
    # (freeze training every layer: no frozen layer to add, so the real depth is the one traced)
    step = spec.layer_period  # whole periods of mixed layer types (Qwen3.5: 4) added per depth: the line is the model's
    first += (spec.num_layers - first) % step  # and the real depth a whole number of periods past the first one
    depths = [d for d in (first + step, first + 2 * step, first + 3 * step)
              if d <= spec.num_layers and not real_depth] or [spec.num_layers]
    if traced_train != train.with_(attn=traced_train.attn) and not spec.analytic:  # the delta below needs formulas
        raise UnsupportedModel(f"{spec.name}: the exact mode traces this configuration without what it cannot run on "
                               f"fake tensors{note} and adds that analytically, but {spec.model_type} is not in the "
                               "analytic formulas: not estimated")
    try:
        traces = trace_depths(spec, traced_train, depths, by_module, labels)
    except MemplanError:
        raise
    except Exception as err:  # noqa: BLE001 - transformers' and torch's own errors about the config: one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ConfigError(f"{spec.name}: transformers cannot build or run this config on fake tensors: "
                          f"{type(err).__name__}: {first[:300]}{'...' if len(first) > 300 else ''}") from None
    full = extrapolate(traces, spec.num_layers)
    deepened = full is not None and traces[-1].layers < spec.num_layers
    if full is None:  # not linear in depth (mixed layer types): trace the real depth
        full = trace_depth(spec, traced_train, spec.num_layers, by_module, labels)
        note += "; traced at full depth (per-layer memory not linear)"
    elif full.reserved_extrapolated:  # the traced events did not deepen (depth.py _reserved): replay the real depth
        full = trace_depth(spec, traced_train, spec.num_layers, by_module, labels)
        note += "; traced at full depth (the traced allocation events did not extend to the extrapolated peak)"
        deepened = False
    peak, weights, states, reserved = full.peak, full.weights, full.states, full.peak_reserved
    wanted = train.with_(attn=traced_train.attn)  # flash_attention_2 traced as sdpa keeps what it keeps: no delta
    if traced_train != wanted:  # what the trace leaves out (QLoRA's storage, Liger, offload, PiSSA): analytic
        delta_w = _analytic(spec, wanted, "weights") - _analytic(spec, traced_train, "weights")
        delta_peak = estimate(spec, wanted).peak_allocated_bytes - estimate(spec, traced_train).peak_allocated_bytes
        peak, weights = peak + delta_peak, weights + delta_w
        reserved += delta_peak  # the quantized storage's own rounding is not replayed
    acts = max(full.forward_end - weights - states, 0) if full.forward_end else 0
    terms = [Term(name="weights", bytes=weights, explain="parameters and buffers of the real model" + note),
             Term(name="optimizer_states", bytes=states, explain="torch optimizer state tensors after two steps"),
             Term(name="gradients", bytes=0, explain="included in transient"),
             Term(name="activations", bytes=min(acts, peak - weights - states),
                  explain="live at the end of step 2's forward, beyond weights and states")]
    terms.append(Term(name="transient", bytes=peak - sum(t.bytes for t in terms),
                      explain=f"the rest of the peak, during {full.phase}"))
    frag = full.peak_reserved - full.reserved_allocated
    bd = Breakdown(terms=tuple(terms), peak_allocated_bytes=peak, peak_reserved_bytes=reserved,
                     cuda_context_bytes=CUDA_CONTEXT_BYTES, phase=full.phase, trainable_params=full.trainable,
                     params=full.params,
                     note="; ".join(n for n in (spec.family.limits, spec.quantization, swapped) if n),
                     fragmentation_bytes=frag,
                     reserved_explain="the traced allocations replayed through the caching-allocator model "
                                      f"({(reserved - peak) / 2**30:.2f} GiB over the allocated peak; "
                                      f"at least {frag / 2**30:.2f} GiB unallocated while it stood at its peak)"
                                      + (f"; events deepened from {traces[-2].layers} and {traces[-1].layers} "
                                         "layers" if deepened else ""),
                     by_module=tuple(sorted(full.by_module.items(), key=lambda kv: -kv[1])),
                     method="exact", band=band_for(train))
    bd = with_cuda_terms(bd) if device == "cuda" else bd  # the cuBLAS workspaces (predict/cuda.py CUDA_TERMS)
    return ExactRun(breakdown=bd, traces=traces, full=full, traced_train=traced_train)


def _analytic(spec: ModelSpec, train: TrainConfig, term: str) -> int:
    return estimate(spec, train).term(term)
