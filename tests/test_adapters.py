"""Adapters beyond LoRA (OFT, DoRA, PiSSA), Liger's kernels and Unsloth's offloaded checkpointing (issue #16
part 3): the shapes against peft's real modules, the estimate against the CPU-allocator peak of real peft steps,
the formulas of what cannot run on a CPU (Liger's triton kernels, the host offload) term by term, and the
LLaMA-Factory keys that carry them."""

from __future__ import annotations

import pytest
import yaml

from memplan.errors import ConfigError
from memplan.formats.llamafactory import config_from_llamafactory, llamafactory_yaml, read_llamafactory
from memplan.predict import adapters
from memplan.predict.activations import layer_saved
from memplan.predict.estimator import estimate
from memplan.predict.kernels import flce_chunk_rows, fused_ce
from memplan.predict.layout import Layout
from memplan.spec.catalog import resolve_model
from memplan.spec.model import Linear, ModelSpec
from memplan.spec.stacks import Stack
from memplan.spec.train import Adapter, Method, Precision, Stage, TrainConfig
from memplan.testing.tiny import SMALL_LLAMA, tiny_spec

SMALL = ModelSpec.from_config_dict(dict(SMALL_LLAMA), name="small-llama")


# ---- shapes: the estimate's trainable parameters are those of peft's real modules --------------------------------
@pytest.mark.parametrize("knobs", [
    dict(adapter=Adapter.OFT, oft_block_size=32), dict(adapter=Adapter.OFT, oft_block_size=48),  # 48: adjusted
    dict(adapter=Adapter.OFT, oft_block_size=0, oft_rank=3), dict(adapter=Adapter.DORA, lora_rank=4)])
def test_trainable_parameters_and_buffers_are_peft_modules(knobs):
    torch = pytest.importorskip("torch")
    from memplan.build.model import build_model

    train = TrainConfig(precision=Precision.FP32, **knobs)
    model = build_model(SMALL, train)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    bd = estimate(SMALL, train, device="cpu")
    assert bd.trainable_params == trainable
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    assert bd.term("weights") == params + buffers
    del torch


def test_oft_block_rule_follows_peft():
    """adjust_oft_parameters: a block size that does not divide in_features moves to the nearest divisor."""
    t = TrainConfig(adapter=Adapter.OFT, oft_block_size=48)
    assert adapters.oft_blocks(t, 128) == (4, 32)  # 32 is nearer 48 than 64
    assert adapters.oft_blocks(t, 4096) == (128, 32)  # 32 and 64 equally near: peft takes the lower
    assert adapters.oft_blocks(t, 352) == (8, 44)  # the warning peft prints: "Adjusted `oft_block_size` to (44)"
    assert adapters.oft_blocks(TrainConfig(adapter=Adapter.OFT, oft_block_size=0, oft_rank=3), 128) == (2, 64)
    lin = Linear(name="q_proj", in_features=4096, out_features=4096)
    assert adapters.params_per_linear(TrainConfig(adapter=Adapter.OFT), lin) == 128 * 32 * 31 // 2


# ---- against the CPU allocator's peak of real peft steps ---------------------------------------------------------
@pytest.mark.parametrize(("spec", "knobs"), [
    (SMALL, dict(adapter=Adapter.OFT, checkpointing=False)),
    (SMALL, dict(adapter=Adapter.OFT, checkpointing=True)),
    (SMALL, dict(adapter=Adapter.OFT, precision=Precision.FP32, checkpointing=False)),
    (SMALL, dict(adapter=Adapter.DORA, checkpointing=False)),
    (SMALL, dict(adapter=Adapter.DORA, checkpointing=True)),
    (SMALL, dict(adapter=Adapter.DORA, precision=Precision.FP32, checkpointing=False)),
    # short sequences: DoRA's materialised weight (no grad, in every wrapped linear's forward) is the peak
    (tiny_spec("llama"), dict(adapter=Adapter.DORA, checkpointing=False, batch_size=1, seq_len=32)),
    (tiny_spec("llama"), dict(adapter=Adapter.DORA, checkpointing=True, batch_size=1, seq_len=32)),
])
def test_adapter_estimate_matches_the_real_step(spec, knobs):
    pytest.importorskip("peft")
    from memplan.testing.truth import measure_cpu_peak

    train = TrainConfig(**{"precision": Precision.BF16, "batch_size": 2, "seq_len": 128, **knobs})
    truth = measure_cpu_peak(spec, train)
    bd = estimate(spec, train, device="cpu")
    assert abs(bd.peak_allocated_bytes / truth.peak_bytes - 1) < 0.01, (bd.moments, truth.phase_peaks)
    if knobs.get("seq_len") == 32 and not knobs["checkpointing"]:
        assert bd.phase == truth.phase == "forward"  # the weight materialised, not the loss


def test_qoft_estimate_matches_the_real_step():
    """QOFT: peft wraps bitsandbytes' Linear4bit with the same OFT rotation (tuners/oft/model.py
    _get_tuner_layer_class, the quantization backend's linear); measured -0.30 %."""
    pytest.importorskip("bitsandbytes")
    from memplan.testing.truth import measure_cpu_peak

    train = TrainConfig(method=Method.QLORA, adapter=Adapter.OFT, precision=Precision.BF16, batch_size=2,
                        seq_len=128, stack=Stack.LLAMAFACTORY)
    truth = measure_cpu_peak(SMALL, train)
    assert abs(estimate(SMALL, train, device="cpu").peak_allocated_bytes / truth.peak_bytes - 1) < 0.01


def test_qdora_estimate_matches_the_real_step():
    """QLoRA + DoRA: the 4-bit weight dequantized in every wrapped linear's forward (measured -0.99 %, the
    materialised weight at the peak)."""
    pytest.importorskip("bitsandbytes")
    from memplan.testing.truth import measure_cpu_peak

    train = TrainConfig(method=Method.QLORA, adapter=Adapter.DORA, precision=Precision.BF16, batch_size=1,
                        seq_len=32, checkpointing=False, stack=Stack.LLAMAFACTORY)
    truth = measure_cpu_peak(SMALL, train)
    assert truth.phase == "forward"
    assert abs(estimate(SMALL, train, device="cpu").peak_allocated_bytes / truth.peak_bytes - 1) < 0.0125


def test_dora_materialised_weight_is_a_moment():
    """Without DoRA's transient the short-sequence estimate would miss the peak by far (it is the forward's)."""
    spec = tiny_spec("llama")
    train = TrainConfig(adapter=Adapter.DORA, batch_size=1, seq_len=32, checkpointing=False)
    moments = dict(estimate(spec, train, device="cpu").moments)
    assert moments["forward adapter"] > 1.15 * moments["forward"]
    assert "forward adapter" in dict(estimate(spec, train.with_(adapter=Adapter.LORA), device="cpu").moments)
    assert dict(estimate(spec, train.with_(adapter=Adapter.LORA), device="cpu").moments)["forward adapter"] < \
        moments["forward"]


@pytest.mark.integration
@pytest.mark.parametrize("pissa_iter", [16, -1])
def test_pissa_initialisation_is_a_load_phase(pissa_iter):
    """peft's pissa_init runs while the model is built: measured around the real build (~40 s under the profiler).
    Fast SVD: within 3 % (measured +2.1 %: the adapters not yet initialised are still in the base dtype, peft
    upcasts them afterwards); the full SVD's LAPACK workspace is not counted, so the estimate is a lower bound."""
    torch = pytest.importorskip("torch")
    from torch.profiler import ProfilerActivity, profile

    from memplan.build.model import build_model

    spec = SMALL
    train = TrainConfig(pissa_init=True, pissa_iter=pissa_iter, batch_size=1, seq_len=32)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        build_model(spec, train)
    live = peak = 0
    for _, nbytes in sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                            if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU):
        live += nbytes
        peak = max(peak, live)
    load = dict(estimate(spec, train, device="cpu").moments)["load"]
    plain = dict(estimate(spec, train.with_(pissa_init=False), device="cpu").moments)["load"]
    assert load > plain
    if pissa_iter == -1:
        assert plain < load <= peak
    else:
        assert abs(load / peak - 1) < 0.03


def test_pissa_is_refused_on_a_quantized_base():
    with pytest.raises(ConfigError, match="pissa-init needs an unquantized base"):
        TrainConfig(method=Method.QLORA, pissa_init=True)
    with pytest.raises(ConfigError, match="pissa-init is only valid for LoRA"):
        TrainConfig(adapter=Adapter.OFT, pissa_init=True)


def test_exact_mode_traces_peft_oft_and_dora():
    pytest.importorskip("peft")
    from memplan.trace.exact import exact_estimate

    for adapter in (Adapter.OFT, Adapter.DORA):
        train = TrainConfig(adapter=adapter, batch_size=2, seq_len=128, checkpointing=False)
        exact = exact_estimate(tiny_spec("llama"), train, device="cpu").peak_allocated_bytes
        assert abs(estimate(tiny_spec("llama"), train, device="cpu").peak_allocated_bytes / exact - 1) < 0.01


# ---- Liger's kernels: the source's rules on shapes ---------------------------------------------------------------
def test_liger_chunk_rule():
    # the worked example in fused_linear_cross_entropy.py: BT = 4096 * 4, V = 32000, H = 4096 -> 2048
    assert flce_chunk_rows(4096 * 4, 32000, 4096) == 2048
    assert flce_chunk_rows(2048, 128256, 4096) == 64  # inc 32 -> 64 rows
    f = fused_ce(tokens=2048, vocab=128256, hidden=4096, input_width=2, compute_width=2, head_width=4,
                 head_trains=False)
    assert f.chunk_bytes == 64 * 128256 * 2 and f.grad_input_bytes == 2048 * 4096 * 2 and f.grad_weight_bytes == 0


def test_liger_saves_less_per_layer_by_its_kernels():
    """RMSNorm saves X itself (not an fp32 copy) + rstd; SwiGLU saves gate and up, not the activation."""
    spec = resolve_model("llama-2-7b")
    train = TrainConfig(batch_size=1, seq_len=1024, checkpointing=False)
    n, h, i = 1024, spec.hidden_size, spec.intermediate_size
    plain = layer_saved(Layout.of(spec, train), batch=1, seq=1024, trains=False, x_rg=True)
    liger = layer_saved(Layout.of(spec, train.with_(liger_kernel=True)), batch=1, seq=1024, trains=False, x_rg=True)
    # two norms: fp32 copy (4 B) -> their bf16 input (2 B); the MLP: silu's output (2 B) no longer saved
    assert plain - liger == 2 * n * h * (4 - 2) + n * i * 2


def test_liger_fused_cross_entropy_drops_the_logits():
    spec = resolve_model("llama-3-8b")  # vocab 128k: the fp32 (B, S, V) tensors dominate without it
    train = TrainConfig(batch_size=4, seq_len=2048)
    plain, liger = estimate(spec, train), estimate(spec, train.with_(liger_kernel=True))
    nv = 4 * 2048 * spec.vocab_size
    # the forward's end held the bf16 logits, their fp32 upcast and the fp32 log-probs: 10 B per (B, S, V) entry
    assert dict(plain.moments)["forward"] - dict(liger.moments)["forward"] > 0.9 * 10 * nv
    assert plain.peak_allocated_bytes - liger.peak_allocated_bytes > 2 * nv * 4  # the fp32 gradients pair at least
    # a stage that needs the logits (DPO) keeps them: LLaMA-Factory turns the fused loss off there
    dpo = train.with_(stage=Stage.DPO, batch_size=1)
    saved = estimate(spec, dpo).peak_allocated_bytes - estimate(spec, dpo.with_(liger_kernel=True)).peak_allocated_bytes
    assert 0 <= saved < nv * 4 / 4
    # a model type LLaMA-Factory does not patch: no effect
    ds = tiny_spec("deepseek_v3")
    assert estimate(ds, TrainConfig(liger_kernel=True)).peak_allocated_bytes == \
        estimate(ds, TrainConfig()).peak_allocated_bytes


# ---- Unsloth's offloaded checkpointing ---------------------------------------------------------------------------
def test_unsloth_checkpointing_moves_the_layer_inputs_to_the_host():
    spec = resolve_model("llama-2-7b")
    train = TrainConfig(batch_size=4, seq_len=2048)
    plain, off = estimate(spec, train), estimate(spec, train.with_(offload_checkpoints=True))
    per_layer = 4 * 2048 * spec.hidden_size * 2
    assert off.host_bytes == spec.num_layers * per_layer
    # on the device: all but the bottom input (a leaf: its AccumulateGrad holds it); one back per recompute
    assert dict(plain.moments)["forward"] - dict(off.moments)["forward"] == (spec.num_layers - 1) * per_layer
    assert dict(plain.moments)["backward bottom"] - dict(off.moments)["backward bottom"] == -per_layer
    assert plain.peak_allocated_bytes - off.peak_allocated_bytes >= (spec.num_layers - 2) * per_layer
    # on a CPU the host copy is the tensor itself
    assert estimate(spec, train.with_(offload_checkpoints=True), device="cpu").peak_allocated_bytes == \
        estimate(spec, train, device="cpu").peak_allocated_bytes
    with pytest.raises(ConfigError, match="offload-checkpoints offloads"):
        TrainConfig(offload_checkpoints=True, checkpointing=False)


def test_unsloth_checkpointing_builds_and_steps():
    """The builder's copy of LLaMA-Factory's UnslothGradientCheckpointing runs a real step (on a CPU its host
    copy is the tensor itself: the same peak as LLaMA-Factory's reentrant checkpointing)."""
    pytest.importorskip("peft")
    from memplan.testing.truth import measure_cpu_peak

    train = TrainConfig(stack=Stack.LLAMAFACTORY, batch_size=2, seq_len=64)
    off = measure_cpu_peak(SMALL, train.with_(offload_checkpoints=True))
    plain = measure_cpu_peak(SMALL, train)
    assert off.losses == pytest.approx(plain.losses, rel=1e-3)
    assert abs(off.peak_bytes / plain.peak_bytes - 1) < 0.01


# ---- LLaMA-Factory keys ------------------------------------------------------------------------------------------
def _yaml(**keys) -> dict:
    return {"model_name_or_path": "meta-llama/Meta-Llama-3-8B-Instruct", "stage": "sft", "do_train": True,
            "bf16": True, **keys}


def test_llamafactory_reads_the_adapter_keys():
    oft = config_from_llamafactory(_yaml(finetuning_type="oft", oft_block_size=32, oft_target="all")).train
    assert (oft.method, oft.adapter, oft.oft_block_size, oft.oft_rank) == (Method.LORA, Adapter.OFT, 32, 0)
    qoft = config_from_llamafactory(_yaml(finetuning_type="oft", quantization_bit=4)).train
    assert (qoft.method, qoft.adapter) == (Method.QLORA, Adapter.OFT)
    dora = config_from_llamafactory(_yaml(use_dora=True)).train
    assert dora.adapter is Adapter.DORA
    pissa = config_from_llamafactory(_yaml(pissa_init=True, pissa_iter=-1)).train
    assert pissa.pissa_init and pissa.pissa_iter == -1
    kernels = config_from_llamafactory(_yaml(enable_liger_kernel=True, use_unsloth_gc=True)).train
    assert kernels.liger_kernel and kernels.offload_checkpoints
    no_gc = config_from_llamafactory(_yaml(use_unsloth_gc=True, disable_gradient_checkpointing=True)).train
    assert not no_gc.offload_checkpoints  # LLaMA-Factory only wraps the checkpointing it enables
    lf = config_from_llamafactory(_yaml(finetuning_type="oft", use_unsloth_gc=True, enable_liger_kernel=True))
    assert lf.not_modelled == ()


@pytest.mark.parametrize("knobs", [dict(adapter=Adapter.OFT, oft_block_size=16),
                                   dict(method=Method.QLORA, adapter=Adapter.OFT, oft_block_size=0, oft_rank=8),
                                   dict(adapter=Adapter.DORA), dict(pissa_init=True, pissa_iter=4),
                                   dict(liger_kernel=True, offload_checkpoints=True)])
def test_llamafactory_export_round_trips(knobs):
    spec = resolve_model("llama-3-8b")
    train = TrainConfig(precision=Precision.BF16, lora_alpha=16, **knobs)  # an export writes alpha out
    data = llamafactory_yaml(spec, train)
    assert config_from_llamafactory(data).train == train.with_(stack=Stack.LLAMAFACTORY)


def test_llamafactory_adapter_errors_name_the_key(tmp_path, capsys):
    from memplan.cli import main

    path = tmp_path / "oft.yaml"
    path.write_text(yaml.safe_dump(_yaml(finetuning_type="oft", oft_rank=4, oft_block_size=32)))
    with pytest.raises(ConfigError, match="oft_block_size"):
        read_llamafactory(path)
    assert main(["estimate", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "oft_block_size" in err and "Traceback" not in err
    path.write_text(yaml.safe_dump(_yaml(finetuning_type="oft", quantization_bit=4, pissa_init=True)))
    assert main(["estimate", "--config", str(path)]) == 2
    assert "pissa_init" in capsys.readouterr().err


def test_cli_knobs(capsys):
    import json

    from memplan.cli import main

    assert main(["estimate", "--model", "llama-3-8b", "--method", "qlora", "--adapter", "oft", "--oft-block-size",
                 "16", "--liger-kernel", "--offload-checkpoints", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["config"]["adapter"] == "oft" and data["config"]["oft_block_size"] == 16
    assert data["config"]["liger_kernel"] and data["config"]["offload_checkpoints"]
    assert main(["estimate", "--model", "llama-3-8b", "--adapter", "vera"]) == 2
    err = capsys.readouterr().err
    assert "--adapter" in err and "lora|dora|oft" in err and "Traceback" not in err
