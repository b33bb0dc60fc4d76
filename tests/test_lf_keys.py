"""LLaMA-Factory keys that change memory (issue #16): each modelled where its source makes the effect knowable
(checked against the CPU truth of the real step, or byte for byte against the real storage), else named with the
reason in one warning line; the README's key table is the code's."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from memplan.errors import ConfigError
from memplan.formats import llamafactory as lf
from memplan.formats.llamafactory import config_from_llamafactory, key_table_markdown, read_llamafactory
from memplan.predict.estimator import estimate
from memplan.predict.layout import Layout
from memplan.predict.weights import model_states, quantized_bytes
from memplan.spec.catalog import resolve_model
from memplan.spec.model import ModelSpec
from memplan.spec.stacks import Stack
from memplan.spec.train import Method, Precision, QuantMethod, TrainConfig
from memplan.testing.tiny import TINY_CONFIGS, tiny_spec

ROOT = Path(__file__).resolve().parents[1]
BASE = {"model_name_or_path": "meta-llama/Meta-Llama-3-8B", "do_train": True}


def _spec4() -> ModelSpec:
    return ModelSpec.from_config_dict(dict(TINY_CONFIGS["llama"], num_hidden_layers=4), name="tiny-llama4")


# ---- freeze: which layers train ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("n", "pro", "ids"), [(2, False, [2, 3]), (-1, False, [0]), (-3, False, [0, 1, 2]),
                                               (9, False, [0, 1, 2, 3]), (-9, False, [0, 1, 2, 3]),
                                               (2, True, [1, 3]), (4, True, [0, 1, 2, 3]), (1, True, [3])])
def test_trainable_layer_ids_follow_llamafactory(n: int, pro: bool, ids: list[int]) -> None:
    """model/adapter.py _setup_freeze_tuning: last N, first -N, or LLaMA Pro's stride - 1, 2 x stride - 1, ..."""
    train = TrainConfig(method=Method.FREEZE, freeze_trainable_layers=n, llama_pro=pro)
    assert list(train.trainable_layer_ids(4)) == ids


def test_llama_pro_needs_a_divisor_and_freeze_a_nonzero_count() -> None:
    with pytest.raises(ConfigError, match="must divide the 4 layers"):
        TrainConfig(method=Method.FREEZE, freeze_trainable_layers=3, llama_pro=True).trainable_layer_ids(4)
    with pytest.raises(ConfigError, match="non-zero"):
        TrainConfig(method=Method.FREEZE, freeze_trainable_layers=0)


def test_training_the_first_layers_keeps_the_frozen_ones_above_on_the_backward_path() -> None:
    """Same parameter count, more activations: every layer above the lowest trained one saves what its input's
    gradient needs; LLaMA-Factory checkpoints only layers with trainable parameters, so those frozen layers save
    their tape even with checkpointing (the HF stack checkpoints them: only their inputs)."""
    spec = resolve_model("llama-3-8b")
    kw = dict(method=Method.FREEZE, seq_len=1024, batch_size=2, stack=Stack.LLAMAFACTORY)
    last, first = (estimate(spec, TrainConfig(freeze_trainable_layers=n, **kw)) for n in (2, -2))
    assert first.trainable_params == last.trainable_params
    assert first.term("activations") > 10 * last.term("activations")
    hf = estimate(spec, TrainConfig(freeze_trainable_layers=-2, **{**kw, "stack": Stack.HF}))
    assert last.term("activations") < hf.term("activations") < first.term("activations")


@pytest.mark.integration  # 30-60 s each on two shared cores
@pytest.mark.parametrize(("n", "ckpt", "pro"), [(-1, False, False), (-2, True, False), (2, True, True)],
                         ids=["first1-nockpt", "first2-ckpt", "llama-pro-ckpt"])
def test_freeze_layer_sets_within_half_a_percent_of_the_cpu_step(n: int, ckpt: bool, pro: bool) -> None:
    """Measured: -0.00 %, -0.33 %, -0.35 % (tiny llama, 4 layers, bf16, LLaMA-Factory's checkpointing)."""
    from memplan.testing.truth import measure_cpu_peak

    spec = _spec4()
    train = TrainConfig(method=Method.FREEZE, precision=Precision.BF16, batch_size=1, seq_len=256,
                        checkpointing=ckpt, freeze_trainable_layers=n, llama_pro=pro, stack=Stack.LLAMAFACTORY)
    truth = measure_cpu_peak(spec, train).peak_bytes
    predicted = estimate(spec, train, device="cpu").peak_allocated_bytes
    assert abs(predicted - truth) / truth < 0.005, (predicted, truth)


def test_freeze_keys_are_read(tmp_path: Path) -> None:
    raw = {**BASE, "finetuning_type": "freeze", "freeze_trainable_layers": -4}
    assert list(config_from_llamafactory(raw).train.trainable_layer_ids(32)) == [0, 1, 2, 3]
    pro = config_from_llamafactory({**raw, "freeze_trainable_layers": 8, "use_llama_pro": True})
    assert list(pro.train.trainable_layer_ids(32)) == [3, 7, 11, 15, 19, 23, 27, 31] and not pro.not_modelled
    with pytest.raises(ConfigError, match="use_llama_pro is only valid"):
        config_from_llamafactory({**BASE, "finetuning_type": "full", "use_llama_pro": True})
    lora = config_from_llamafactory({**BASE, "finetuning_type": "lora", "use_llama_pro": True})
    assert lora.train.llama_pro and not lora.not_modelled  # the adapters on the expanded blocks only
    assert list(lora.train.trainable_layer_ids(32)) == [15, 31]


# ---- quantization_bit / quantization_method / quantization_type / double_quantization -------------------------
@pytest.mark.parametrize(("double", "kind", "bits"), [(True, "nf4", 4), (False, "nf4", 4), (False, "fp4", 4)])
def test_bitsandbytes_4bit_storage_is_byte_exact(double: bool, kind: str, bits: int) -> None:
    """The real Params4bit and QuantState tensors of a built tiny model (bitsandbytes 0.50 quantizes on CPU)."""
    from memplan.build.model import build_model
    from memplan.testing.truth import _resident

    spec = tiny_spec("llama")
    train = TrainConfig(method=Method.QLORA, precision=Precision.BF16, double_quant=double, quant_type=kind,
                        quant_bits=bits)
    model = build_model(spec, train)
    real = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in _resident(model)}.values())
    assert model_states(Layout.of(spec, train, "cpu")).weights_bytes == real


def test_hqq_and_eetq_storage_per_weight() -> None:
    """hqq 0.2.8 bit_to_packing + fp16 scale and zero per 64; EETQ int8 + fp16 per output channel."""
    n, rows = 4096 * 4096, 4096

    def per_weight(method: QuantMethod, bits: int) -> float:
        train = TrainConfig(method=Method.QLORA, quant_method=method, quant_bits=bits)
        return quantized_bytes(n, train, rows) / n

    assert per_weight(QuantMethod.HQQ, 4) == 0.5 + 4 / 64
    assert per_weight(QuantMethod.HQQ, 2) == 0.25 + 4 / 64
    assert per_weight(QuantMethod.HQQ, 3) == (28 + 4) / 64  # ten 3-bit values per int32, 64 rows padded to 70
    assert per_weight(QuantMethod.HQQ, 6) == per_weight(QuantMethod.HQQ, 8) == 1 + 4 / 64  # no 5/6-bit packing
    assert per_weight(QuantMethod.EETQ, 8) == 1 + 2 * rows / n
    nf4 = TrainConfig(method=Method.QLORA)
    assert quantized_bytes(n, nf4.with_(double_quant=False), rows) - quantized_bytes(n, nf4, rows) == \
        3 * n // 64 - 4 * (n // 64 // 256) - 1028  # fp32 absmax per 64 vs an 8-bit one + fp32 per 256


def test_hqq_saves_each_linears_dequantized_weight_for_backward() -> None:
    """hqq's default backend (forward_pytorch) matmuls a fresh dequantized weight, which autograd saves."""
    spec = resolve_model("llama-3-8b")
    kw = dict(method=Method.QLORA, checkpointing=False, seq_len=512, stack=Stack.LLAMAFACTORY)  # no k-bit upcast
    bnb, hqq = (estimate(spec, TrainConfig(quant_method=m, **kw)) for m in (QuantMethod.BNB, QuantMethod.HQQ))
    dequantized = sum(lin.in_features * lin.out_features for lin in spec.layer_linears()) * spec.num_layers * 2
    # every layer's but the first's q / k / v (their input needs no grad): a bf16 copy of the decoder linears
    assert dequantized > hqq.term("activations") - bnb.term("activations") > (spec.num_layers - 1) / spec.num_layers \
        * dequantized


@pytest.mark.parametrize(("extra", "error"), [
    ({"quantization_bit": 3}, "quantization_bit must be one of 4/8 with bnb"),
    ({"quantization_bit": 4, "quantization_method": "eetq"}, "quantization_bit must be one of 8 with eetq"),
    ({"quantization_bit": 4, "quantization_method": "gptq"}, "quantization_method 'gptq'"),
    ({"quantization_bit": 4, "quantization_type": "int4"}, "quantization_type must be nf4 or fp4"),
    ({"stage": "ppo"}, "stage ppo is not modelled"),
])
def test_quantization_and_stage_values_llamafactory_refuses_or_memplan_does_not_model(extra, error) -> None:
    with pytest.raises(ConfigError, match=re.escape(error)):
        config_from_llamafactory({**BASE, "finetuning_type": "lora", **extra})


def test_quantization_keys_are_read() -> None:
    raw = {**BASE, "quantization_bit": 2, "quantization_method": "hqq"}
    train = config_from_llamafactory(raw).train
    assert (train.method, train.quant_method, train.quant_bits) == (Method.QLORA, QuantMethod.HQQ, 2)
    raw = {**BASE, "quantization_bit": 4, "double_quantization": False, "quantization_type": "fp4"}
    lfc = config_from_llamafactory(raw)
    assert (lfc.train.double_quant, lfc.train.quant_type, lfc.not_modelled) == (False, "fp4", ())


# ---- warnings name the reason ------------------------------------------------------------------------------------
def test_a_key_not_modelled_is_warned_with_its_reason(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**BASE, "use_badam": True, "resize_vocab": True}))
    with pytest.warns(UserWarning) as seen:
        read_llamafactory(path)
    text = str(seen[0].message)
    assert "use_badam=true (BAdam trains one block" in text and "resize_vocab=true (the embedding and head grow" in text


# ---- the README's table is the code's ----------------------------------------------------------------------------
def test_readme_key_table_matches_the_code() -> None:
    text = (ROOT / "README.md").read_text()
    table = text.split("<!-- lf-keys:start -->\n")[1].split("\n<!-- lf-keys:end -->")[0]
    assert table == key_table_markdown(), "regenerate: python -c \"from memplan.formats.llamafactory import " \
                                          "key_table_markdown as k; print(k())\""


def test_every_key_the_reader_reads_is_in_the_table() -> None:
    """A key read in the reader's source (raw.get / raw[...] / _bool(raw, ...)) has a MODELLED row."""
    source = Path(lf.__file__).read_text() + Path(lf.__file__).with_name("llamafactory_rules.py").read_text()
    read = set(re.findall(r"\br(?:aw)?(?:\.get\(|\[)\"(\w+)\"", source))
    read |= set(re.findall(r"_(?:bool|true|false)\(r(?:aw)?, \"(\w+)\"", source))
    read |= {key for key, _, _ in lf._INTS}
    assert read and read <= set(lf.MODELLED) | set(lf.NOT_MODELLED), sorted(read - set(lf.MODELLED))
    assert {k.split("=")[0] for k in lf.WHY_NOT} <= set(lf.MODELLED) | set(lf.NOT_MODELLED)  # no stale reason


@pytest.mark.parametrize("train", [
    TrainConfig(method=Method.QLORA, quant_method=QuantMethod.HQQ, quant_bits=3),
    TrainConfig(method=Method.QLORA, double_quant=False, quant_type="fp4"),
    TrainConfig(method=Method.FREEZE, freeze_trainable_layers=-3),
    TrainConfig(method=Method.FREEZE, freeze_trainable_layers=8, llama_pro=True),
], ids=["hqq3", "bnb-fp4-nodq", "first3", "llama-pro"])
def test_the_new_knobs_round_trip_through_an_export(train: TrainConfig) -> None:
    spec = resolve_model("llama-3-8b")
    back = config_from_llamafactory(lf.llamafactory_yaml(spec, train.with_(stack=Stack.LLAMAFACTORY))).train
    assert back == train.with_(stack=Stack.LLAMAFACTORY, precision=back.precision, lora_alpha=back.lora_alpha)


# ---- upcast_lmhead_output -------------------------------------------------------------------------------------
def test_upcast_lmhead_output_keeps_fp32_logits_instead_of_half_plus_upcast() -> None:
    spec = resolve_model("llama-3-8b")
    kw = dict(seq_len=1024, batch_size=2, stack=Stack.LLAMAFACTORY)
    plain, hooked = (dict(estimate(spec, TrainConfig(upcast_lmhead_output=u, **kw)).moments)["forward"]
                     for u in (False, True))
    assert plain - hooked == 2 * 1024 * spec.vocab_size * 2  # the half (B, S, V) logits no longer kept
    fp32 = TrainConfig(precision=Precision.FP32, **kw)
    # no flag over an fp32 checkpoint: no half head, so LLaMA-Factory registers no hook; over llama-3's bf16 one
    # the head stays bf16 (memplan.spec.dtypes) and the hook is registered
    spec32 = dataclasses.replace(spec, checkpoint_dtype="float32")
    assert estimate(spec32, fp32).moments == estimate(spec32, fp32.with_(upcast_lmhead_output=True)).moments
    assert estimate(spec, fp32).moments != estimate(spec, fp32.with_(upcast_lmhead_output=True)).moments
    assert config_from_llamafactory({**BASE, "upcast_lmhead_output": True}).train.upcast_lmhead_output


@pytest.mark.integration  # two profiled steps, ~40 s on two shared cores
def test_upcast_lmhead_output_moves_the_forward_by_what_the_cpu_step_measures() -> None:
    """Measured: the forward phase's peak drops by exactly B x S x V x 2 bytes (4,194,304 B here), as estimated."""
    from memplan.testing.truth import measure_cpu_peak

    spec = tiny_spec("llama")
    train = TrainConfig(precision=Precision.BF16, batch_size=2, seq_len=256, stack=Stack.LLAMAFACTORY)
    measured, predicted = [], []
    for t in (train, train.with_(upcast_lmhead_output=True)):
        measured.append(measure_cpu_peak(spec, t).phase_peaks["forward:2"])
        predicted.append(dict(estimate(spec, t, device="cpu").moments)["forward"])
    assert measured[0] - measured[1] == predicted[0] - predicted[1] == 2 * 256 * spec.vocab_size * 2


# ---- upcast_layernorm ---------------------------------------------------------------------------------------
def test_upcast_layernorm_widens_the_frozen_norm_weights() -> None:
    spec = resolve_model("llama-3-8b")
    norms = (2 * spec.num_layers + 1) * spec.hidden_size  # two RMSNorms per layer + the final one
    kw = dict(seq_len=1024, stack=Stack.LLAMAFACTORY)
    plain, up = (estimate(spec, TrainConfig(upcast_layernorm=u, **kw)) for u in (False, True))
    assert up.term("weights") - plain.term("weights") == norms * 2  # bf16 -> fp32
    assert config_from_llamafactory({**BASE, "upcast_layernorm": True}).train.upcast_layernorm


@pytest.mark.integration  # four profiled steps, ~1 min on two shared cores
@pytest.mark.parametrize("method", [Method.LORA, Method.FREEZE])
def test_upcast_layernorm_moves_the_peak_by_what_the_cpu_step_measures(method: Method) -> None:
    """Measured (tiny llama, bf16, no checkpointing): +3,584 B LoRA, +1,536 B freeze, the norm weights only. The
    fp32 norm output costs no saved bytes: peft casts a LoRA input to fp32 anyway (_cast_input_dtype) and autocast
    saves the same half copy for lora_A; a frozen base linear saves no input."""
    from memplan.testing.truth import measure_cpu_peak

    spec = tiny_spec("llama")
    train = TrainConfig(method=method, precision=Precision.BF16, batch_size=2, seq_len=256, checkpointing=False,
                        stack=Stack.LLAMAFACTORY)
    measured, predicted = [], []
    for t in (train, train.with_(upcast_layernorm=True)):
        measured.append(measure_cpu_peak(spec, t).peak_bytes)
        predicted.append(estimate(spec, t, device="cpu").peak_allocated_bytes)
    assert measured[1] - measured[0] == predicted[1] - predicted[0] > 0
    assert abs(predicted[1] - measured[1]) / measured[1] < 0.005


@pytest.mark.parametrize("train", [
    TrainConfig(method=Method.FREEZE, freeze_trainable_layers=-2, checkpointing=False),
    TrainConfig(method=Method.LORA, freeze_trainable_layers=2, llama_pro=True, checkpointing=False),
], ids=["freeze-first2", "lora-llama-pro"])
def test_the_exact_mode_traces_depth_dependent_layer_sets_at_the_real_depth(train: TrainConfig) -> None:
    """The first N layers and LLaMA Pro's blocks depend on the depth, so no depth line: one trace of all 4 layers,
    the analytic estimate within 0.1 % of it (measured: -0.000 %, +0.056 % at b2 x s64; LoRA under LLaMA-Factory's
    checkpointing: tests/test_llamafactory_train.py)."""
    from memplan.trace.exact import exact_estimate

    train = train.with_(batch_size=2, seq_len=64, precision=Precision.BF16)
    exact, analytic = exact_estimate(_spec4(), train, device="cpu"), estimate(_spec4(), train, device="cpu")
    assert analytic.trainable_params == exact.trainable_params
    assert abs(analytic.peak_allocated_bytes / exact.peak_allocated_bytes - 1) < 0.001


@pytest.mark.integration  # two profiled steps, ~30 s on two shared cores
def test_rope_scaling_costs_no_memory_on_the_cpu_step() -> None:
    """Measured: 36,500,084 B without scaling and with linear, dynamic and yarn (factor 2) alike."""
    from memplan.testing.truth import measure_cpu_peak

    base = dict(TINY_CONFIGS["llama"], max_position_embeddings=128)
    scaled = dict(base, max_position_embeddings=256,
                  rope_scaling={"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 128})
    train = TrainConfig(precision=Precision.BF16, batch_size=2, seq_len=256, stack=Stack.LLAMAFACTORY)
    peaks = {measure_cpu_peak(ModelSpec.from_config_dict(c, name="tiny-rope"), train).peak_bytes
             for c in (base, scaled)}
    assert len(peaks) == 1
