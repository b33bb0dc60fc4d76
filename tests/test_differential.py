"""Analytic == exact (issue 17 item 3): the analytic estimate (`device="cpu"`, PyTorch's CPU kernels) against the
exact mode (a fake-tensor trace of the real transformers model) on random tiny configurations drawn with a fixed
seed: random dimensions and depth (1-6 layers), every tiny family, every knob, every stack. Both give the peak
allocated bytes of the same reference step; they must agree within 1 %.

The exact mode equals the CPU allocator's truth (tests/test_trace.py), so a difference here is an analytic formula
missing (or double-counting) a mechanism. Configurations the exact mode refuses are skipped with its reason;
those still outside 1 % are listed in XFAIL with the measured difference and the suspected mechanism (strict: a
fixed one fails until it is taken off the list).
"""

from __future__ import annotations

import random

import pytest

from memplan.errors import MemplanError
from memplan.predict.estimator import estimate
from memplan.spec.model import ModelSpec
from memplan.spec.optimizers import Optimizer, facts
from memplan.spec.stacks import Stack
from memplan.spec.train import ALL_LINEAR, Attention, Method, Precision, TrainConfig
from memplan.testing.tiny import TINY_CONFIGS
from memplan.trace.exact import exact_estimate

TOLERANCE = 0.01
SEED = 20261201
CASES = 48  # ~0.3-3 s of tracing each on two cores

# case number -> the measured analytic / exact - 1 and the mechanism suspected (measured 2026-12-01; 8 of the 33
# traced cases). Each is a moment inside one layer's backward that the analytic moments do not walk op by op.
# the families the draw (and so the XFAIL indices) was made over; families added later (gemma3_text, olmo2,
# deepseek_v3) are checked against the exact mode and the CPU truth in tests/test_catalog.py
ARCHS = ("gemma2", "glm", "llama", "mistral", "mistral-sw", "mixtral", "phi3", "qwen2", "qwen3")
XFAIL: dict[int, str] = {
    1: "-6.55 %: qwen3 LoRA bf16, checkpointed (fp32 adapters): the recomputed layer holds more than its saved "
       "tensors: peft's `x = self._cast_input_dtype(x, lora_A.weight.dtype)` fp32 input copies of q/k/v/o stay "
       "alive until each LoRA forward returns, and the q/k norms' fp32 temporaries",
    2: "+3.48 %: qwen2 LoRA bf16 + eager + dropout 0.1, no checkpointing: the top layer's moment charges every "
       "saved tensor and the MLP's three (B, S, I) gradients at once; with LoRA on gate/q only, the MLP's "
       "saved tensors are fewer than the tape's product saves suppose (suspected)",
    13: "-1.48 %: mistral (sliding window 64 = seq 64) LoRA bf16, no checkpointing, b3 x s64: the peak is in "
        "the top layer's down/up projections' LoRA backward (fp32 adapter-input gradient), not at the product",
    21: "-3.76 %: glm freeze bf16, checkpointed, s16: the peak is at the end of the lowest trained layer's "
        "backward (its input-norm backward, every gradient already made); no analytic moment models it "
        "(the optimizer moment wins instead)",
    24: "-4.46 %: glm freeze pure_bf16, checkpointed, s64: as case 21 (measured: the input layernorm's fp32 "
        "backward temporaries on top of all gradients)",
    26: "-4.65 %: glm LoRA bf16, eager, checkpointed, one layer: the recomputed layer's attention backward (the "
        "(B, H, S, S) fp32 softmax and its gradient) exceeds the MLP moment; not modelled",
    42: "+12.94 %: mixtral full fp32, checkpointed: the MoE layer's recompute/backward moment (routed rows x "
        "experts_per_token buffers + the whole recomputed tape) over-counts what is alive at once",
    43: "-3.09 %: mistral LoRA pure_bf16, no checkpointing, accumulation 3: the lowest layer's backward with "
        "every LoRA gradient alive; the LoRA down/up backward's gradient buffers beyond the product's three",
}


def draw(rng: random.Random, arch: str | None = None) -> tuple[str, ModelSpec, TrainConfig]:
    """One random tiny configuration: a family of memplan.testing.tiny (drawn from ARCHS unless given) with random
    dimensions, and every knob."""
    arch = arch or rng.choice(ARCHS)
    cfg = dict(TINY_CONFIGS[arch])
    head_dim, kv = rng.choice([16, 32, 64]), rng.choice([1, 2, 4])
    heads = kv * rng.choice([1, 2, 4])
    cfg.update(num_attention_heads=heads, num_key_value_heads=kv, hidden_size=heads * head_dim,
               intermediate_size=16 * rng.randint(4, 64), num_hidden_layers=rng.randint(1, 6),
               vocab_size=rng.choice([256, 512, 1000, 2048, 4096, 8192, 16384]))
    if "head_dim" in cfg:
        cfg["head_dim"] = head_dim
    if "query_pre_attn_scalar" in cfg:
        cfg["query_pre_attn_scalar"] = head_dim
    spec = ModelSpec.from_config_dict(cfg, name=f"rand-{arch}")
    # QLoRA is traced as LoRA plus the analytic NF4 terms, so it compares little: drawn rarely
    method = rng.choice([Method.FULL, Method.FREEZE, Method.LORA, Method.LORA,
                         Method.QLORA if rng.random() < 0.3 else Method.LORA])
    names = sorted({lin.name for lin in spec.layer_linears()})
    targets = (ALL_LINEAR,) if rng.random() < 0.5 else tuple(sorted(rng.sample(names, rng.randint(1, len(names)))))
    train = TrainConfig(
        method=method, precision=rng.choice(list(Precision)), checkpointing=rng.random() < 0.5,
        optimizer=rng.choice(DRAWN_OPTIMIZERS), attn=rng.choice([Attention.SDPA, Attention.EAGER, Attention.AUTO]),
        lora_rank=rng.choice([1, 4, 8, 16]), lora_targets=targets, lora_dropout=rng.choice([0.0, 0.0, 0.1]),
        batch_size=rng.randint(1, 4), seq_len=rng.choice([16, 64, 128, 256, 384]),
        grad_accum=rng.choice([1, 1, 2, 3]), freeze_trainable_layers=rng.randint(1, spec.num_layers + 1),
        stack=rng.choice(TRACED_STACKS))
    return arch, spec, train


# the stacks the XFAIL list was measured on (the draws stay those); trl came later and is checked against CPU truth
# in tests/test_stacks.py; torchtune's and LitGPT's model code and quantizers are analytic only (memplan.spec.stacks)
TRACED_STACKS = [Stack.HF, Stack.LLAMAFACTORY, Stack.REFERENCE]
# the optimizers the XFAIL list was measured on (LLaMA-Factory's GaLore, APOLLO, Adam-mini, Muon, LOMO and torchao's
# 4-bit are checked against their packages' real steps in test_optimizers_lf; drawing them would move every draw)
DRAWN_OPTIMIZERS = [Optimizer(n) for n in ("adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "sgd",
                                           "sgd_momentum", "adafactor")]


def refused(spec: ModelSpec, train: TrainConfig) -> str:
    """Why the exact mode cannot trace this configuration ("" when it can)."""
    if facts(train.optimizer).states.value == "adam_8bit":
        return ("bitsandbytes' 8-bit optimizer step reads tensor values (absmax, the step count) that fake tensors "
                "do not have: DataDependentOutputException")
    if spec.is_moe and train.is_lora and train.lora_dropout and ALL_LINEAR in train.lora_targets:
        return "peft 0.21 refuses lora_dropout on the wrapped expert parameters (lora.ParamWrapper)"
    return ""


def _label(i: int, arch: str, spec: ModelSpec, t: TrainConfig) -> str:
    return (f"{i}-{arch}-L{spec.num_layers}-h{spec.hidden_size}-v{spec.vocab_size}-{t.method.value}-"
            f"{t.precision.value}-{'ckpt' if t.checkpointing else 'nockpt'}-{t.optimizer.value}-{t.stack.value}")


def _cases() -> list:
    rng = random.Random(SEED)
    out = []
    for i in range(CASES):
        arch, spec, train = draw(rng)
        marks = [pytest.mark.xfail(reason=XFAIL[i], strict=True)] if i in XFAIL else []
        out.append(pytest.param(spec, train, id=_label(i, arch, spec, train), marks=marks))
    return out


def compare(spec: ModelSpec, train: TrainConfig) -> float:
    """analytic / exact - 1 for the peak allocated bytes, skipping what either side refuses (with its reason)."""
    why = refused(spec, train)
    if why:
        pytest.skip(why)
    try:
        analytic = estimate(spec, train, device="cpu").peak_allocated_bytes
    except MemplanError as err:  # a combination the estimator refuses (gemma2 with sdpa, ...)
        pytest.skip(f"the estimator refuses it: {err}")
    exact = exact_estimate(spec, train, device="cpu").peak_allocated_bytes
    return analytic / exact - 1


@pytest.mark.integration
@pytest.mark.parametrize("spec,train", _cases())
def test_analytic_equals_exact_on_random_configs(spec, train):
    diff = compare(spec, train)
    assert abs(diff) <= TOLERANCE, f"analytic {100 * diff:+.2f} % from exact"


# families made analytic after the draw above (issue 16), drawn the same way with their own seed so that the XFAIL
# indices above stay those; each one's tiny config (memplan.testing.tiny), every knob
LATER_ARCHS = ("starcoder2", "starcoder2-drop")
LATER_SEED = 20261202
LATER_CASES = 12
# measured 2026-12-01 (each also run on a llama of the same dimensions, to tell a family's gap from a shared one)
LATER_XFAIL: dict[int, str] = {
    0: "-7.89 %: freeze pure_bf16, LLaMA-Factory, Adafactor: shared, a llama of the same dimensions is -6.89 % "
       "(the freeze moments, as cases 21 / 24 above)",
    4: "+7.14 %: freeze fp32 + Adafactor, h64 / I880: the optimizer moment; the same llama is exact (not isolated: "
       "the Adafactor temporaries of c_fc against llama's gate/up)",
    6: "-12.43 %: LoRA pure_bf16 eager, checkpointed: the recomputed layer's attention backward ((B, H, S, S) fp32 "
       "softmax and its gradients) exceeds the MLP moment, which StarCoder2's single up projection makes smaller "
       "than a gated MLP's (the same llama: -1.08 %; as case 26 above)",
    10: "-1.93 %: full fp32 eager, s16, accumulation 2: 113 kB missing, the same llama is exact (not isolated)",
}


def _later_cases() -> list:
    rng = random.Random(LATER_SEED)
    out = []
    for i in range(LATER_CASES):
        arch = LATER_ARCHS[i % len(LATER_ARCHS)]
        _, spec, train = draw(rng, arch)
        marks = [pytest.mark.xfail(reason=LATER_XFAIL[i], strict=True)] if i in LATER_XFAIL else []
        out.append(pytest.param(spec, train, id=_label(i, arch, spec, train), marks=marks))
    return out


@pytest.mark.integration
@pytest.mark.parametrize("spec,train", _later_cases())
def test_later_families_analytic_equals_exact_on_random_configs(spec, train):
    diff = compare(spec, train)
    assert abs(diff) <= TOLERANCE, f"analytic {100 * diff:+.2f} % from exact"


def _tiny(arch: str, **dims: int) -> ModelSpec:
    return ModelSpec.from_config_dict({**TINY_CONFIGS[arch], **dims}, name=f"tiny-{arch}")


SMOKE = [  # each once outside 1 %, by the mechanism named
    # issue 17's example: checkpointing, small model (the recomputed layer's backward)
    (_tiny("phi3"), TrainConfig(method=Method.LORA, precision=Precision.PURE_BF16, optimizer=Optimizer.SGD,
                                checkpointing=True, batch_size=1, seq_len=256)),
    # accumulation: the optimizer step's gradients were counted twice (+20.0 %)
    (_tiny("phi3", num_hidden_layers=4, hidden_size=256, num_attention_heads=16, num_key_value_heads=4,
           intermediate_size=112), TrainConfig(method=Method.FULL, precision=Precision.BF16, checkpointing=False,
                                               batch_size=2, seq_len=16, grad_accum=2)),
    # freeze + checkpointing: frozen layers below the trained ones keep no input
    (_tiny("llama"), TrainConfig(method=Method.FREEZE, precision=Precision.BF16, checkpointing=True,
                                 freeze_trainable_layers=2, batch_size=2, seq_len=256)),
    # freeze of every layer: the exact mode used to find no depth to trace (IndexError)
    (_tiny("llama", num_hidden_layers=2), TrainConfig(method=Method.FREEZE, freeze_trainable_layers=2,
                                                      checkpointing=False, batch_size=2, seq_len=64)),
]


# freeze + checkpointing with one trained layer of four and accumulation: was +10.75 % (every frozen layer's
# input counted), then -9.1 %: transformers' checkpointing turns input grads on, so the three frozen layers below the
# trained one keep their checkpointed inputs too (estimator._freeze_activations); now within 1 %
SMOKE.append(pytest.param(
    _tiny("mistral", num_hidden_layers=4, hidden_size=128, intermediate_size=224, vocab_size=256),
    TrainConfig(method=Method.FREEZE, precision=Precision.FP32, checkpointing=True, freeze_trainable_layers=1,
                optimizer=Optimizer.PAGED_ADAMW_32BIT, batch_size=3, seq_len=256, grad_accum=2)))


@pytest.mark.parametrize("spec,train", SMOKE, ids=[f"smoke{i}" for i in range(len(SMOKE))])
def test_analytic_equals_exact_smoke(spec, train):
    diff = compare(spec, train)
    assert abs(diff) <= TOLERANCE, f"analytic {100 * diff:+.2f} % from exact"
