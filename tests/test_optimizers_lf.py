"""LLaMA-Factory's memory-saving optimizers (GaLore, APOLLO, their layer-wise forms, Adam-mini, Muon) and
transformers' LOMO / torchao 4-bit: the state formulas against the packages' own states after a real step, the
whole reference step against the CPU allocator's peak, and the YAML / HF names that select them."""

import contextlib
import importlib.util

import pytest

from memplan.errors import ConfigError
from memplan.formats.hf import config_from_flags, hf_training_kwargs
from memplan.formats.llamafactory import config_from_llamafactory, llamafactory_yaml
from memplan.predict.estimator import estimate
from memplan.spec.catalog import resolve_model
from memplan.spec.model import ModelSpec
from memplan.spec.optimizers import Optimizer, from_hf
from memplan.spec.train import ALL_LINEAR, Method, Precision, ProjType, TrainConfig
from memplan.testing.tiny import SMALL_LLAMA

PACKAGE = {Optimizer.GALORE_ADAMW: "galore_torch", Optimizer.GALORE_ADAMW_LAYERWISE: "galore_torch",
           Optimizer.APOLLO_ADAMW: "apollo_torch", Optimizer.APOLLO_ADAMW_LAYERWISE: "apollo_torch",
           Optimizer.ADAM_MINI: "adam_mini", Optimizer.LOMO: "lomo_optim"}


def _needs(opt: Optimizer) -> None:
    if importlib.util.find_spec(PACKAGE[opt]) is None:
        pytest.skip(f"{PACKAGE[opt]} is not installed (pip install 'memplan[dev]')")


def _small() -> ModelSpec:
    return ModelSpec.from_config_dict(dict(SMALL_LLAMA), name="small-llama")


def _train(opt: Optimizer, precision: Precision, **kw: object) -> TrainConfig:
    # batch 1 x 16 tokens: the weights, gradients and states outweigh the activations (the optimizer's moment)
    return TrainConfig(method=Method.FULL, precision=precision, optimizer=opt, batch_size=1, seq_len=16,
                       checkpointing=False, **kw)


def _state_bytes(optimizer: object) -> int:
    """Bytes of every state tensor the optimizer holds, each storage once: its `state` dicts (per parameter for
    a layer-wise DummyOptimizer) and GaLore / APOLLO projectors' matrices."""
    import torch

    inner = getattr(optimizer, "optimizer_dict", None)
    seen: dict[int, int] = {}
    for opt in (inner.values() if inner else [optimizer]):
        for value in (v for st in opt.state.values() for v in st.values()):
            tensors = [value] if isinstance(value, torch.Tensor) else []
            ortho = getattr(value, "ortho_matrix", None)
            tensors += [ortho] if isinstance(ortho, torch.Tensor) else list(ortho or [])
            for t in tensors:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


@pytest.mark.parametrize("precision", [Precision.FP32, Precision.PURE_BF16])
@pytest.mark.parametrize("opt", [Optimizer.GALORE_ADAMW, Optimizer.APOLLO_ADAMW, Optimizer.ADAM_MINI,
                                 Optimizer.GALORE_ADAMW_LAYERWISE])
def test_state_bytes_are_the_packages_own(opt, precision):
    """Two real steps of the package's optimizer, built as LLaMA-Factory builds it: the state bytes to 0.1 %
    (fp32 GaLore keeps each SVD factor whole behind its slice; APOLLO a random projector per matrix)."""
    _needs(opt)
    import torch

    from memplan.build.model import build_model, build_optimizer
    from memplan.build.step import reference_step

    spec, train = _small(), _train(opt, precision, proj_rank=8)
    torch.manual_seed(0)
    model = build_model(spec, train)
    optimizer = build_optimizer(model, train)
    ids = torch.randint(0, spec.vocab_size, (1, 16))
    reference_step(model, optimizer, train, ids, lambda _: contextlib.nullcontext(), record_losses=False)
    real = _state_bytes(optimizer)
    assert real > 0
    assert abs(estimate(spec, train, device="cpu").term("optimizer_states") / real - 1) < 0.001


@pytest.mark.parametrize(("opt", "precision"), [
    (Optimizer.GALORE_ADAMW, Precision.BF16), (Optimizer.GALORE_ADAMW_LAYERWISE, Precision.PURE_BF16),
    (Optimizer.APOLLO_ADAMW_LAYERWISE, Precision.BF16), (Optimizer.ADAM_MINI, Precision.PURE_BF16),
    (Optimizer.ADAM_MINI, Precision.BF16), (Optimizer.LOMO, Precision.FP32), (Optimizer.LOMO, Precision.BF16),
    (Optimizer.LOMO, Precision.PURE_BF16)])
def test_whole_step_peak_within_one_percent_of_the_cpu_allocator(opt, precision):
    """The reference step's peak with the package's real optimizer: the layer-wise / LOMO step runs inside
    backward with one gradient alive (measured within 0.2 %); GaLore's step-1 SVD is not a term (-0.4 % at
    pure bf16, where it is the peak)."""
    _needs(opt)
    from memplan.testing.truth import measure_cpu_peak

    spec, train = _small(), _train(opt, precision)
    truth = measure_cpu_peak(spec, train)
    assert abs(estimate(spec, train, device="cpu").peak_allocated_bytes / truth.peak_bytes - 1) < 0.01


def test_per_parameter_steps_keep_no_gradients_and_projections_shrink_states():
    """On Llama-3-8B pure bf16: the layer-wise step holds one gradient instead of all, GaLore rank 128 a fraction
    of AdamW's states, LOMO neither states nor gradients."""
    spec = resolve_model("llama-3-8b")
    t = TrainConfig(method=Method.FULL, precision=Precision.PURE_BF16, seq_len=1024)
    adamw, galore = estimate(spec, t), estimate(spec, t.with_(optimizer=Optimizer.GALORE_ADAMW, proj_rank=128))
    layerwise = estimate(spec, t.with_(optimizer=Optimizer.GALORE_ADAMW_LAYERWISE, proj_rank=128))
    lomo = estimate(spec, t.with_(optimizer=Optimizer.LOMO))
    assert galore.term("optimizer_states") < 0.2 * adamw.term("optimizer_states")
    grads = spec.num_parameters * 2
    assert galore.peak_allocated_bytes - layerwise.peak_allocated_bytes > 0.9 * grads
    assert lomo.term("optimizer_states") == 0 and lomo.peak_allocated_bytes < layerwise.peak_allocated_bytes
    assert estimate(spec, t.with_(optimizer=Optimizer.GALORE_ADAMW, proj_rank=256)).term("optimizer_states") > \
        galore.term("optimizer_states")


def test_muon_states_follow_torch_muon_and_adamw_shapes():
    """LLaMA-Factory's Muon (third_party/muon; llamafactory is not importable here): momentum_buffer =
    zeros_like(g) for 2-D params outside embed / lm_head, moment1 + moment2 for the rest: the same shapes as
    torch.optim.Muon's momentum_buffer and AdamW's exp_avg + exp_avg_sq, built over LF's split."""
    torch = pytest.importorskip("torch")
    if not hasattr(torch.optim, "Muon"):
        pytest.skip("torch.optim.Muon needs torch >= 2.9")
    from memplan.build.model import build_model

    spec = _small()
    train = _train(Optimizer.MUON, Precision.FP32)
    model = build_model(spec, train)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    hidden = [p for n, p in named if p.ndim == 2 and "embed" not in n and "lm_head" not in n]
    rest = [p for n, p in named if not any(p is h for h in hidden)]
    opts = [torch.optim.Muon(hidden, lr=1e-5), torch.optim.AdamW(rest, lr=1e-5, foreach=False)]
    for p in hidden + rest:
        p.grad = torch.zeros_like(p)
    for o in opts:
        o.step()
    real = sum(v.untyped_storage().nbytes() for o in opts for st in o.state.values() for k, v in st.items()
               if k != "step")
    assert estimate(spec, train, device="cpu").term("optimizer_states") == real


def test_torchao_4bit_states_follow_its_new_buffer():
    """torchao AdamW4bit._new_buffer, called as its step does (exp_avg signed, exp_avg_sq unsigned)."""
    optim = pytest.importorskip("torchao.optim")
    from memplan.build.model import build_model

    spec = _small()
    for precision in (Precision.FP32, Precision.PURE_BF16):
        train = _train(Optimizer.ADAMW_4BIT, precision)
        params = [p for p in build_model(spec, train).parameters() if p.requires_grad]
        opt = optim.AdamW4bit(params, lr=1e-5)
        real = 0
        for p in params:
            for signed in (True, False):
                b = opt._new_buffer(p, signed)
                real += sum(t.untyped_storage().nbytes() for t in ([b.codes, b.scale, b.qmap]
                                                                    if hasattr(b, "codes") else [b]))
        assert estimate(spec, train, device="cpu").term("optimizer_states") == real


# ---- names: LLaMA-Factory's switches, HF's optim ---------------------------------------------------------------
_YAML = dict(model_name_or_path="meta-llama/Meta-Llama-3-8B-Instruct", stage="sft", do_train=True,
             finetuning_type="full", pure_bf16=True, per_device_train_batch_size=1, gradient_accumulation_steps=1)


@pytest.mark.parametrize(("keys", "opt", "rank"), [
    (dict(use_galore=True, galore_layerwise=True, galore_target="all", galore_rank=128), "galore_adamw_layerwise", 128),
    (dict(use_galore=True), "galore_adamw", 16),
    (dict(use_apollo=True, apollo_layerwise=True, apollo_rank=128, apollo_scale=32.0), "apollo_adamw_layerwise", 128),
    (dict(use_adam_mini=True), "adam_mini", 16), (dict(use_muon=True), "muon", 16), (dict(optim="lomo"), "lomo", 16),
    (dict(optim="adamw_torch_4bit"), "adamw_4bit", 16)])
def test_llamafactory_examples_select_the_optimizer_and_round_trip(keys, opt, rank):
    """examples/extras/{galore,apollo,adam_mini,muon}: the switch picks the entry, its rank is read, the export
    writes the switches back."""
    lf = config_from_llamafactory({**_YAML, **keys})
    assert lf.train.optimizer is Optimizer(opt) and lf.train.proj_rank == rank and not lf.not_modelled
    out = llamafactory_yaml(resolve_model("llama-3-8b"), lf.train, lf.raw)
    assert config_from_llamafactory(out).train == lf.train
    if lf.train.optimizer is Optimizer.GALORE_ADAMW_LAYERWISE:
        assert out["optim"] == "adamw_torch" and out["use_galore"] is True and out["galore_layerwise"] is True


@pytest.mark.parametrize(("keys", "named"), [
    (dict(use_galore=True, finetuning_type="lora"), "use_galore"),
    (dict(use_galore=True, galore_layerwise=True, gradient_accumulation_steps=8), "gradient_accumulation_steps"),
    (dict(use_apollo=True, apollo_rank=0), "apollo_rank"),
    (dict(use_galore=True, galore_proj_type="full"), "galore_proj_type"),
    (dict(use_galore=True, optim="adamw_8bit"), "use_galore"),
    (dict(use_galore=True, use_apollo=True), "use_apollo")])
def test_what_llamafactory_refuses_is_one_error_naming_the_yaml_key(keys, named):
    with pytest.raises(ConfigError) as err:
        config_from_llamafactory({**_YAML, **keys})
    assert named in str(err.value) and len(err.value.problems) == 1


def test_badam_and_apollo_svd_stay_a_warning():
    lf = config_from_llamafactory({**_YAML, "use_badam": True, "use_apollo": True, "apollo_proj": "svd"})
    assert {item.split(" (")[0] for item in lf.not_modelled} == {"use_badam=true", "apollo_proj=svd"}
    assert all("not modelled" in item for item in lf.not_modelled)  # each with its reason


def test_hf_optim_names_and_galore_arguments():
    """transformers OptimizerNames: galore_* / apollo_* read their rank from optim_args (transformers' default
    128) and need optim_target_modules; Adam-mini has no HF name to export."""
    assert from_hf("galore_adamw_layerwise") is Optimizer.GALORE_ADAMW_LAYERWISE
    assert from_hf("adalomo") is Optimizer.ADALOMO and from_hf("adamw_torch_4bit") is Optimizer.ADAMW_4BIT
    assert from_hf("galore_adamw_8bit") is None  # not modelled: refused by the readers
    base = TrainConfig(method=Method.FULL)
    read = config_from_flags(["t.py", "--optim", "apollo_adamw", "--optim_target_modules", "all-linear"], base)
    assert read.optimizer is Optimizer.APOLLO_ADAMW and read.proj_rank == 128 and read.proj_targets == (ALL_LINEAR,)
    read = config_from_flags(["t.py", "--optim", "galore_adamw", "--optim_args", "rank=64,proj_type=left",
                              "--optim_target_modules", "q_proj,v_proj"], base)
    assert (read.proj_rank, read.proj_type, read.proj_targets) == (64, ProjType.LEFT, ("q_proj", "v_proj"))
    with pytest.raises(ConfigError, match="optim_target_modules"):
        config_from_flags(["t.py", "--optim", "galore_adamw"], base)
    with pytest.raises(ConfigError, match="LLaMA-Factory"):
        hf_training_kwargs(base.with_(optimizer=Optimizer.ADAM_MINI))


def test_cli_knobs_set_the_projection_and_refuse_lora(capsys):
    import json

    from memplan.cli import main

    args = ["estimate", "--model", "llama-3-8b", "--method", "full", "--optimizer", "galore_adamw", "--json"]
    states = []
    for rank in ("64", "256"):
        assert main([*args, "--proj-rank", rank, "--proj-targets", "q_proj,v_proj"]) == 0
        out = json.loads(capsys.readouterr().out)
        states.append(out["memory"]["optimizer_states"])
    assert states[0] < states[1]
    assert main(["estimate", "--model", "llama-3-8b", "--optimizer", "galore_adamw"]) == 2
    assert "method full or freeze" in capsys.readouterr().err
