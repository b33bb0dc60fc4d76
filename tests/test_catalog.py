"""The catalog of the models people fine-tune now (issue 16): every entry's parameter count is checked (the formulas'
against the published total, or against shared/model_configs/count.py's where none was published; an exact-only
architecture's real transformers model, built on the meta device, against the same figures), and every
architecture estimates: analytic (gemma3_text, against the CPU truth) or through the exact mode (VL models too)."""

import json

import pytest

from memplan.cli import main
from memplan.errors import ConfigError
from memplan.predict.estimator import estimate
from memplan.spec.catalog import catalog_entries, catalog_param_count, find_entry, resolve_model
from memplan.spec.model import ModelSpec
from memplan.spec.train import Attention, Method, Precision, TrainConfig
from memplan.testing.tiny import TINY_CONFIGS, tiny_spec

ENTRIES = {e.hf_id: e for e in catalog_entries()}
ANALYTIC = [e for e in ENTRIES.values() if resolve_model(e.hf_id).analytic]
EXACT_ONLY = [e for e in ENTRIES.values() if not resolve_model(e.hf_id).analytic]
# the models LLaMA-Factory's examples use today (issue 16), each with a verified config in shared/model_configs
CURRENT = ["Qwen/Qwen3-4B-Instruct-2507", "Qwen/Qwen3-1.7B", "Qwen/Qwen3-14B", "Qwen/Qwen3-32B",
           "Qwen/Qwen3-235B-A22B", "Qwen/Qwen3-30B-A3B-Instruct-2507", "Qwen/Qwen2-1.5B-Instruct",
           "Qwen/Qwen2.5-VL-3B-Instruct", "Qwen/Qwen2.5-VL-7B-Instruct", "Qwen/Qwen3-VL-4B-Instruct",
           "openai/gpt-oss-20b", "openai/gpt-oss-120b", "deepseek-ai/DeepSeek-V2-Lite", "deepseek-ai/DeepSeek-V3",
           "meta-llama/Llama-4-Scout-17B-16E-Instruct", "google/gemma-3-1b-pt", "google/gemma-3-4b-pt",
           "google/gemma-3-12b-pt", "google/gemma-3-27b-pt", "microsoft/phi-4", "mistralai/Mistral-Small-24B-Base-2501",
           "mistralai/Ministral-8B-Instruct-2410", "mistralai/Mixtral-8x22B-v0.1", "01-ai/Yi-34B",
           "allenai/OLMo-2-1124-7B", "bigcode/starcoder2-7b", "codellama/CodeLlama-7b-hf", "codellama/CodeLlama-34b-hf",
           "Qwen/Qwen3-VL-30B-A3B-Instruct", "Qwen/Qwen3.5-35B-A3B", "Qwen/Qwen3.5-397B-A17B",
           "Qwen/Qwen3-235B-A22B-Instruct-2507", "Qwen/Qwen2-VL-7B-Instruct",
           "Qwen/Qwen3.5-4B"]


def _expected(entry) -> int:
    """The published total, else the shared count.py's own count from the same fields."""
    expected = catalog_param_count(entry)
    assert expected
    return expected


def _assert_formula_matches_exact(spec: ModelSpec, train: TrainConfig, tolerance: float) -> None:
    """The analytic estimate of `train` has the exact trace's trainable parameters and its peak within
    `tolerance`."""
    from memplan.trace.exact import exact_estimate

    exact = exact_estimate(spec, train, device="cpu")
    analytic = estimate(spec, train, device="cpu")
    assert analytic.trainable_params == exact.trainable_params
    assert abs(analytic.peak_allocated_bytes / exact.peak_allocated_bytes - 1) < tolerance


def test_the_current_models_are_in_the_catalog():
    assert set(CURRENT) <= set(ENTRIES)


@pytest.mark.parametrize("entry", ANALYTIC, ids=lambda e: e.short_name)
def test_analytic_count_equals_the_published_or_counted_total(entry):
    spec = resolve_model(entry.hf_id)
    # the checkpoint's e_score_correction_bias (E,) per MoE layer is a buffer in transformers 5, not a parameter
    bias = spec.moe_layers * spec.num_experts if spec.family.router == "sigmoid" else 0
    assert spec.num_parameters + bias == _expected(entry)


@pytest.mark.parametrize("entry", EXACT_ONLY, ids=lambda e: e.short_name)
def test_exact_only_entry_builds_the_model_of_its_published_count(entry):
    """The real model, built on the meta device from the shipped config, has the published parameters."""
    from memplan.build.model import build_model

    spec = resolve_model(entry.hf_id)
    model = build_model(spec, TrainConfig(method=Method.FULL, precision=Precision.FP32), device="meta")
    n = sum(p.numel() for p in model.parameters())
    if spec.model_type == "deepseek_v3":  # the checkpoint's e_score_correction_bias is a buffer in transformers 5
        n += sum(b.numel() for name, b in model.named_buffers() if name.endswith("e_score_correction_bias"))
    assert n == _expected(entry)


def test_llama4_is_its_text_decoder():
    """The shared copy has only text_config (its count is the text decoder's); transformers 5.24 cannot train the
    VL class on text, so the text decoder (Llama4ForCausalLM) is what is built and traced: analytic (every layer
    MoE, 36 rope + chunked layers, 12 NoPE ones)."""
    spec = resolve_model("llama-4-scout-17b-16e-instruct")
    assert spec.model_type == "llama4_text" and spec.num_layers == 48 and "vision" in spec.family.limits
    assert spec.analytic and (spec.rope_layers, spec.windowed_layers, spec.shared_intermediate) == (36, 36, 8192)


def test_deepseek_v2_lite_has_no_q_lora():
    """DeepseekV2Config defaults q_lora_rank to 1536; the real file (and the published count) have none."""
    assert resolve_model("deepseek-v2-lite").config["q_lora_rank"] is None


@pytest.mark.parametrize("needle,expected", [
    ("qwen3", {"qwen3-4b-instruct-2507", "qwen3-30b-a3b-instruct-2507", "qwen3-vl-4b-instruct", "qwen3-235b-a22b"}),
    ("gemma-3", {"gemma-3-1b-pt", "gemma-3-4b-pt", "gemma-3-12b-pt", "gemma-3-27b-pt"}),
    ("deepseek", {"deepseek-v2-lite", "deepseek-v3", "deepseek-llm-7b-base"}),
    ("gpt-oss", {"gpt-oss-20b", "gpt-oss-120b"}),
    ("vl", {"qwen2.5-vl-3b-instruct", "qwen2.5-vl-7b-instruct", "qwen3-vl-4b-instruct"})])
def test_models_search_finds_the_new_entries(capsys, needle, expected):
    assert main(["models", "--search", needle, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["models"]
    assert expected <= {r["name"] for r in rows} and all(r["parameters"] for r in rows)
    if needle == "deepseek":  # the analytic count: the checkpoint's 671,026,419,200 less 58 x 256 buffers
        assert {r["name"]: r["parameters"] for r in rows}["deepseek-v3"] == 671_026_419_200 - 58 * 256


def test_qwen2_vl_7b_is_the_flat_instruct_file():
    """The original 4.41.2 layout: text keys at the top level, the ViT's own keys (embed_dim / mlp_ratio) nested."""
    spec = resolve_model("Qwen/Qwen2-VL-7B-Instruct")
    assert spec.model_type == "qwen2_vl" and spec.num_layers == 28 and spec.analytic and not spec.tie_word_embeddings
    assert spec.config["vision_config"]["embed_dim"] == 1280 and catalog_param_count(ENTRIES[
        "Qwen/Qwen2-VL-7B-Instruct"]) == 8_291_375_616 == spec.num_parameters


def test_qwen3_5_4b_is_dense_hybrid_and_tied():
    """8 x (3 Gated DeltaNet + 1 full attention) layers, a dense MLP, one tied 248320 x 2560 embedding."""
    spec = resolve_model("Qwen/Qwen3.5-4B")
    text = spec.config["text_config"]
    assert spec.model_type == "qwen3_5" and spec.num_layers == 32 and spec.tie_word_embeddings
    assert [i for i, t in enumerate(text["layer_types"]) if t == "full_attention"] == list(range(3, 32, 4))


@pytest.mark.parametrize("name,fp8", [("deepseek-ai/DeepSeek-V3-0324", True),
                                      ("deepseek-ai/DeepSeek-V3-0324-BF16", False),
                                      ("opensourcerelease/DeepSeek-V3-bf16", False)])
def test_deepseek_v3_0324_is_the_v3_entry_under_its_own_name(name, fp8):
    """Its model card: 'The model structure of DeepSeek-V3-0324 is exactly the same as DeepSeek-V3'; a BF16 cast
    (LLaMA-Factory's ktransformers examples, at HEAD and in the llama3 tree) keeps the shapes and drops the FP8
    storage."""
    v3, spec = resolve_model("deepseek-ai/DeepSeek-V3"), resolve_model(name)
    assert find_entry(name).hf_id == "deepseek-ai/DeepSeek-V3" and spec.name == name
    assert {k: v for k, v in spec.config.items() if k != "quantization_config"} == \
        {k: v for k, v in v3.config.items() if k != "quantization_config"}
    assert bool(spec.quantization) is fp8 and ("quantization_config" in spec.config) is fp8
    from memplan.formats.llamafactory import _hub_id

    assert _hub_id(spec) == name and _hub_id(v3) == "deepseek-ai/DeepSeek-V3"  # an exported YAML names its own


def test_the_short_names_resolve():
    assert resolve_model("Qwen/Qwen3-4B-Instruct-2507").num_parameters == 4_022_468_096
    assert resolve_model("gemma-3-1b-it").num_parameters == 999_885_952  # -it resolves to the -pt entry
    assert find_entry("google/gemma-3-27b-it").hf_id == "google/gemma-3-27b-pt"
    assert resolve_model("codellama-7b").num_parameters == 6_738_546_688  # 32016 rows: 16 infilling tokens


# ---- gemma3_text: analytic from its family entry -------------------------------------------------------------------

def test_gemma3_text_parameter_count_equals_the_built_model():
    from memplan.build.model import build_model

    spec = tiny_spec("gemma3_text")
    model = build_model(spec, TrainConfig(method=Method.FULL, precision=Precision.FP32), device="meta")
    assert sum(p.numel() for p in model.parameters()) == spec.num_parameters
    assert spec.windowed_layers == 2 and spec.tie_word_embeddings  # sliding_window_pattern 3 over 3 layers


def test_layer_types_count_the_windowed_layers_and_are_cut_with_the_depth():
    """A config re-saved by transformers lists layer_types; a cut model lists only the layers it builds."""
    types = ["sliding_attention", "full_attention"] * 2
    spec = ModelSpec.from_config_dict({**TINY_CONFIGS["gemma3_text"], "num_hidden_layers": 4, "layer_types": types})
    assert spec.windowed_layers == 2
    cut = spec.with_layers(3)
    assert cut.config["layer_types"] == types[:3] and cut.windowed_layers == 2
    assert resolve_model("gemma-3-1b-pt").windowed_layers == 22  # 26 layers, every 6th full


def test_gemma3_full_layers_take_no_sliding_mask():
    """Past the window, sdpa takes an explicit mask (and repeat_kv copies) in sliding layers only: the estimate
    lies between every layer windowed and none."""
    t = TrainConfig(method=Method.FULL, precision=Precision.FP32, batch_size=2, seq_len=256, checkpointing=False)
    spec = tiny_spec("gemma3_text")
    every = ModelSpec.from_config_dict({**TINY_CONFIGS["gemma3_text"], "sliding_window_pattern": 10})
    none = ModelSpec.from_config_dict({**TINY_CONFIGS["gemma3_text"], "sliding_window": 4096})
    peaks = [estimate(s, t, device="cpu").peak_allocated_bytes for s in (none, spec, every)]
    assert peaks[0] < peaks[1] < peaks[2]


GEMMA3_CASES = [dict(method=Method.FULL, precision=Precision.FP32, checkpointing=False),
                dict(method=Method.LORA, precision=Precision.BF16, checkpointing=True),
                dict(method=Method.FREEZE, precision=Precision.FP32, checkpointing=False),
                dict(method=Method.FULL, precision=Precision.BF16, checkpointing=False, attn=Attention.EAGER),
                dict(method=Method.FULL, precision=Precision.FP32, checkpointing=False, seq_len=64)]


@pytest.mark.integration
@pytest.mark.parametrize("kw", GEMMA3_CASES)
def test_gemma3_text_from_its_table_entry_matches_the_cpu_truth(kw):
    """Measured: -0.25 % (full fp32), +0.12 % (LoRA bf16 checkpointed), +0.09 % (freeze), -0.25 % (eager bf16),
    -0.002 % (seq 64, inside the window): the second rotary cos/sin pair is what the formulas leave out."""
    from memplan.testing.truth import measure_cpu_peak

    spec, train = tiny_spec("gemma3_text"), TrainConfig(**{"batch_size": 2, "seq_len": 256, **kw})
    truth = measure_cpu_peak(spec, train).peak_bytes
    assert abs(estimate(spec, train, device="cpu").peak_allocated_bytes / truth - 1) < 0.005


# ---- olmo2: analytic from its family entry ----------------------------------------------------------------------

def test_olmo2_parameter_count_equals_the_built_model():
    from memplan.build.model import build_model

    spec = tiny_spec("olmo2")
    model = build_model(spec, TrainConfig(method=Method.FULL, precision=Precision.FP32), device="meta")
    assert sum(p.numel() for p in model.parameters()) == spec.num_parameters  # q/k norms over the projections


OLMO2_CASES = [dict(method=Method.FULL, precision=Precision.FP32, checkpointing=False),
               dict(method=Method.LORA, precision=Precision.BF16, checkpointing=True),
               dict(method=Method.LORA, precision=Precision.BF16, checkpointing=False),
               dict(method=Method.FREEZE, precision=Precision.FP32, checkpointing=False),
               dict(method=Method.FULL, precision=Precision.BF16, checkpointing=False, attn=Attention.EAGER)]


@pytest.mark.integration
@pytest.mark.parametrize("kw", OLMO2_CASES)
def test_olmo2_from_its_table_entry_matches_the_cpu_truth(kw):
    """Measured: -0.061 %, -0.239 %, -0.101 %, -0.088 %, -0.054 %."""
    from memplan.testing.truth import measure_cpu_peak

    spec, train = tiny_spec("olmo2"), TrainConfig(batch_size=2, seq_len=256, **kw)
    truth = measure_cpu_peak(spec, train).peak_bytes
    assert abs(estimate(spec, train, device="cpu").peak_allocated_bytes / truth - 1) < 0.005


# ---- starcoder2: analytic from its family entry -----------------------------------------------------------------

def test_starcoder2_parameter_count_equals_the_built_model():
    from memplan.build.model import build_model

    for arch in ("starcoder2", "starcoder2-drop"):
        spec = tiny_spec(arch)
        model = build_model(spec, TrainConfig(method=Method.FULL, precision=Precision.FP32), device="meta")
        assert sum(p.numel() for p in model.parameters()) == spec.num_parameters  # LayerNorm biases, Linear biases


STARCODER2_CASES = [("starcoder2", dict(method=Method.FULL, precision=Precision.BF16, checkpointing=False)),
                    ("starcoder2-drop", dict(method=Method.LORA, precision=Precision.BF16, checkpointing=True)),
                    ("starcoder2-drop", dict(method=Method.FULL, precision=Precision.FP32, checkpointing=False)),
                    ("starcoder2-drop", dict(method=Method.FREEZE, precision=Precision.PURE_BF16, checkpointing=True)),
                    ("starcoder2", dict(method=Method.LORA, precision=Precision.BF16, checkpointing=False,
                                        attn=Attention.EAGER))]


@pytest.mark.integration
@pytest.mark.parametrize("arch,kw", STARCODER2_CASES)
def test_starcoder2_formula_matches_the_exact_trace(arch, kw):
    """Measured: +0.02 %, -0.00 %, -0.00 %, -0.00 %, +0.04 % (b2 x s256). Not here: full fine-tuning with
    checkpointing and attention dropout on CPU (-2.5 ... -4 %, README Limits)."""

    spec, train = tiny_spec(arch), TrainConfig(batch_size=2, seq_len=256, **kw)
    _assert_formula_matches_exact(spec, train, 0.005)


def test_a_dropout_outside_0_1_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match="residual_dropout must be a probability"):
        ModelSpec.from_config_dict({**TINY_CONFIGS["starcoder2"], "residual_dropout": 1.5})


# ---- VL models: the exact mode on the text decoder, the vision tower's weights frozen ------------------------------

TINY_VL = dict(model_type="qwen2_5_vl", architectures=["Qwen2_5_VLForConditionalGeneration"], hidden_size=256,
               intermediate_size=704, num_attention_heads=8, num_key_value_heads=4, num_hidden_layers=3,
               vocab_size=4096, max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=True,
               rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]},
               vision_config=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=256,
                                  fullatt_block_indexes=[1]))


QWEN25_VL_CASES = [dict(method=m, precision=Precision.BF16, checkpointing=ck)
                   for m in (Method.LORA, Method.FULL) for ck in (False, True)]
VL_TINY = ("qwen2_5_vl", "qwen2_vl", "qwen3_vl", "qwen3_vl_moe")


@pytest.mark.parametrize("arch", VL_TINY)
def test_vl_vision_params_equal_the_built_tower(arch):
    """memplan.spec.vision's formula for each tower = the built model's visual.* parameters; a nested text_config
    (Qwen3-VL) gives the decoder, tied by the outer key."""
    from memplan.build.model import build_model

    spec = tiny_spec(arch)
    model = build_model(spec, TrainConfig(method=Method.FULL, precision=Precision.FP32), device="meta")
    assert spec.vision_params == sum(p.numel() for n, p in model.named_parameters() if "visual." in n) > 0
    assert spec.num_parameters == sum(p.numel() for p in model.parameters()) and spec.analytic
    assert spec.tie_word_embeddings == (model.get_output_embeddings().weight is model.get_input_embeddings().weight)


def test_vl_parameter_counts_equal_the_published_totals():
    """The HF API's / safetensors totals (catalog _param_count), each the transformers meta count too."""
    for hf_id in ("Qwen/Qwen2.5-VL-7B-Instruct", "Qwen/Qwen2.5-VL-3B-Instruct", "Qwen/Qwen2-VL-7B-Instruct",
                  "Qwen/Qwen3-VL-4B-Instruct", "Qwen/Qwen3-VL-30B-A3B-Instruct"):
        spec = resolve_model(hf_id)
        assert spec.analytic and spec.num_parameters == json.loads(ENTRIES[hf_id].path.read_text())["_param_count"]
    assert resolve_model("Qwen/Qwen3-VL-4B-Instruct").vision_params == 415_347_712  # the built tower's


# measured analytic vs exact (tiny configs, b2 x s256, bf16; ckpt off / on): qwen3_vl full -0.000 / -0.750 %,
# LoRA +0.022 / -0.001 %, freeze -0.000 / -0.000 %; qwen3_vl_moe full -0.111 / -0.000 %, LoRA -0.198 / -0.000 %,
# freeze -0.930 / -0.555 % (a qwen3_moe decoder of the same dims: -0.924 / -0.566 %, the text formulas' own gap);
# qwen2_vl full +0.003 / -0.750 %, LoRA +0.023 / +0.005 %, freeze +0.003 / +0.004 %. CI traces a covering subset
# of the cheapest traces (Qwen3-VL-MoE LoRA is checked against the CPU truth in tests/test_trace.py).
VL_CASES = [("qwen3_vl", dict(method=Method.FREEZE, checkpointing=True)),
            ("qwen3_vl_moe", dict(method=Method.FREEZE, checkpointing=False)),
            ("qwen2_vl", dict(method=Method.LORA, checkpointing=False))]


@pytest.mark.integration
@pytest.mark.parametrize("arch,kw", VL_CASES, ids=[f"{a}-{k['method'].value}-ckpt{k['checkpointing']}"
                                                   for a, k in VL_CASES])
def test_vl_formulas_match_the_exact_trace(arch, kw):

    spec, train = tiny_spec(arch), TrainConfig(batch_size=2, seq_len=256, precision=Precision.BF16, **kw)
    _assert_formula_matches_exact(spec, train, 0.01)


def test_a_split_mrope_section_must_cover_half_the_head():
    with pytest.raises(ConfigError, match="mrope_section"):
        ModelSpec.from_config_dict({**TINY_VL, "rope_scaling": {"type": "mrope", "mrope_section": [8, 8, 8]}})


@pytest.mark.integration
@pytest.mark.parametrize("kw", QWEN25_VL_CASES, ids=lambda kw: f"{kw['method'].value}-ckpt{kw['checkpointing']}")
def test_qwen2_5_vl_formula_matches_the_exact_trace(kw):
    """Measured (b2 x s256, bf16): LoRA +0.023 % / +0.005 % (ckpt), full +0.003 % / -0.750 % (ckpt)."""

    spec, train = tiny_spec("qwen2_5_vl"), TrainConfig(batch_size=2, seq_len=256, **kw)
    _assert_formula_matches_exact(spec, train, 0.01)


@pytest.mark.integration
@pytest.mark.parametrize("kw", QWEN25_VL_CASES[3:], ids=lambda kw: f"{kw['method'].value}-ckpt{kw['checkpointing']}")
def test_qwen2_5_vl_formula_matches_the_cpu_truth(kw):
    """Measured (b2 x s256, bf16): LoRA +0.022 % / -0.039 % (ckpt), full +0.003 % / -0.771 % (ckpt); 30-75 s each,
    so CI measures the worst one (the exact trace, which equals the CPU truth, checks all four above)."""
    from memplan.testing.truth import measure_cpu_peak

    spec, train = tiny_spec("qwen2_5_vl"), TrainConfig(batch_size=2, seq_len=256, **kw)
    truth = measure_cpu_peak(spec, train).peak_bytes
    assert abs(estimate(spec, train, device="cpu").peak_allocated_bytes / truth - 1) < 0.01


def test_a_nested_text_config_gives_the_decoder_dims_and_is_cut_in_place():
    spec = resolve_model("qwen3-vl-4b-instruct")
    assert (spec.num_layers, spec.hidden_size, spec.vocab_size) == (36, 2560, 151936)
    cut = spec.with_layers(2)
    assert cut.num_layers == 2 and cut.config["text_config"]["num_hidden_layers"] == 2
    assert "num_hidden_layers" not in cut.config


@pytest.mark.parametrize("method", [Method.FULL, Method.LORA])
def test_vl_model_estimates_with_its_vision_tower_frozen(method):
    """The same trainable parameters as the text decoder alone (a qwen2 of the same dims): LLaMA-Factory freezes
    the vision tower and the merger, and LoRA never targets them; the note says what is not costed."""
    from memplan.trace.exact import estimate_any

    vl = ModelSpec.from_config_dict(dict(TINY_VL), name="tiny-qwen2.5-vl")
    text = ModelSpec.from_config_dict({**TINY_VL, "model_type": "qwen2", "architectures": None}, name="tiny-qwen2")
    train = TrainConfig(method=method, batch_size=2, seq_len=128, precision=Precision.FP32, checkpointing=False)
    bd = estimate_any(vl, train)
    assert bd.method == "analytic" and "text-only inputs unless images are given" in bd.note
    assert bd.trainable_params == estimate(text, train).trainable_params
    assert bd.peak_allocated_bytes > estimate(text, train, device="cpu").peak_allocated_bytes  # + vision weights
    from memplan.build.model import build_model

    built = build_model(vl, train.with_(method=Method.FULL), device="meta")
    assert vl.num_parameters == sum(p.numel() for p in built.parameters()) > text.num_parameters  # the tower


@pytest.mark.integration
def test_a_local_vl_config_estimates_without_a_traceback(capsys, tmp_path):
    """Issue 16: a local Qwen3-VL config.json (nested text_config / vision_config) crashed in the exact fallback."""
    (tmp_path / "config.json").write_text(ENTRIES["Qwen/Qwen3-VL-4B-Instruct"].path.read_text())
    assert main(["estimate", "--model", str(tmp_path), "--seq-len", "256", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model"]["parameters"] == 4_437_815_808 and "not costed" in data["note"]


def test_exact_only_models_say_so_in_one_line_when_transformers_cannot_build_them(capsys, tmp_path):
    # Llama 4 with dense MLPs between its MoE layers (Maverick's interleave): exact mode only
    cfg = {**TINY_CONFIGS["llama4_text"], "interleave_moe_layer_step": 2, "num_key_value_heads": 3}
    assert not ModelSpec.from_config_dict(cfg).analytic  # 3 kv heads for 4 query heads: the shapes do not match
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    code = main(["estimate", "--model", str(tmp_path), "--seq-len", "64"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err


# ---- DeepSeek: dense layers first, then MoE --------------------------------------------------------------------

TINY_DEEPSEEK = dict(model_type="deepseek_v3", hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
                     num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=7, vocab_size=2048,
                     q_lora_rank=None, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=32,
                     n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, n_group=1, topk_group=1,
                     first_k_dense_replace=3, max_position_embeddings=1024)


def test_deepseek_depths_are_traced_past_the_dense_layers():
    """first_k_dense_replace dense layers lead: traces of 1-3 layers would be all dense and extrapolate the wrong
    layer; the traced depths start past them and land on the full-depth trace."""
    from memplan.trace.exact import exact_estimate
    from memplan.trace.step import trace_depth

    spec = ModelSpec.from_config_dict(dict(TINY_DEEPSEEK), name="tiny-deepseek-v3")
    assert spec.dense_prefix == 3 and spec.analytic and spec.dense_layers == 3 and spec.moe_layers == 4
    train = TrainConfig(method=Method.FULL, precision=Precision.FP32, batch_size=2, seq_len=64, checkpointing=False)
    full = trace_depth(spec, train, spec.num_layers).peak
    assert abs(exact_estimate(spec, train, device="cpu").peak_allocated_bytes / full - 1) < 1e-3


# ---- pre-quantized checkpoints ---------------------------------------------------------------------------------

@pytest.mark.parametrize("quant", [{"quant_method": "bitsandbytes", "load_in_4bit": True}, {"quant_method": "hqq"},
                                   {"quant_method": "quanto", "weights": "int4"}])
def test_a_quantized_storage_not_modelled_is_refused_in_one_line(capsys, tmp_path, quant):
    (tmp_path / "config.json").write_text(json.dumps({**TINY_CONFIGS["llama"], "quantization_config": quant}))
    assert main(["estimate", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and quant["quant_method"] in err and "--method qlora" in err


def test_a_dequantized_checkpoint_says_how_it_is_costed():
    """gpt-oss's MXFP4 and DeepSeek-V3's FP8 train dequantized (transformers' quantizers); the note says so."""
    from memplan.trace.exact import estimate_any

    assert "MXFP4" in resolve_model("gpt-oss-20b").quantization and "FP8" in resolve_model("deepseek-v3").quantization
    fp8 = ModelSpec.from_config_dict({**TINY_CONFIGS["llama"], "quantization_config": {
        "quant_method": "fp8", "weight_block_size": [128, 128]}}, name="tiny-fp8")
    train = TrainConfig(method=Method.LORA, batch_size=2, seq_len=64)
    bd = estimate_any(fp8, train)
    assert fp8.analytic and "FP8" in bd.note  # trained dequantized: the unquantized model's formulas
    assert bd.peak_allocated_bytes == estimate_any(tiny_spec("llama"), train).peak_allocated_bytes


# ---- MLA in the formulas (DeepSeek-V3 attention, dense layers) -------------------------------------------------

def test_mla_parameter_count_equals_the_built_model():
    """Dense MLA layers, and DeepSeek-V3's dense layers then MoE ones (router, routed and shared experts)."""
    from memplan.build.model import build_model

    for cfg in ({}, {"q_lora_rank": None}, TINY_CONFIGS["deepseek_v3-moe"], TINY_CONFIGS["deepseek_v3-moe-noq"],
                TINY_CONFIGS["deepseek_v2"]):
        spec = ModelSpec.from_config_dict({**TINY_CONFIGS["deepseek_v3"], **cfg})
        model = build_model(spec, TrainConfig(method=Method.FULL, precision=Precision.FP32), device="meta")
        assert spec.analytic and sum(p.numel() for p in model.parameters()) == spec.num_parameters
    assert resolve_model("deepseek-v2-lite").num_parameters == 15_706_484_224  # the published count
    v3 = resolve_model("deepseek-v3")
    assert v3.analytic and (v3.dense_layers, v3.moe_layers, v3.shared_intermediate) == (3, 58, 2048)


def test_mla_needs_every_dimension_given():
    """DeepseekV3Config's defaults are DeepSeek-V3's own (q_lora_rank 1536): a config must say each one."""
    from memplan.errors import ConfigError

    cfg = {k: v for k, v in TINY_CONFIGS["deepseek_v3"].items() if k not in ("q_lora_rank", "v_head_dim")}
    with pytest.raises(ConfigError, match="v_head_dim.*q_lora_rank"):
        ModelSpec.from_config_dict(cfg)


MLA_CASES = [({}, dict(method=Method.FULL, precision=Precision.FP32, checkpointing=False)),
             ({"q_lora_rank": None}, dict(method=Method.LORA, precision=Precision.BF16, checkpointing=False)),
             ({}, dict(method=Method.LORA, precision=Precision.FP32, checkpointing=False, attn=Attention.EAGER)),
             ({}, dict(method=Method.LORA, precision=Precision.BF16, checkpointing=True)),
             ({"q_lora_rank": None}, dict(method=Method.FULL, precision=Precision.BF16, checkpointing=False)),
             ({}, dict(method=Method.FREEZE, precision=Precision.FP32, checkpointing=False))]


@pytest.mark.parametrize("extra,kw", [pytest.param(*c, marks=[pytest.mark.integration] if i > 2 else [])
                                      for i, c in enumerate(MLA_CASES)])
def test_mla_formula_matches_the_exact_trace(extra, kw):
    """Measured: -0.029 %, -0.019 %, -0.044 %, -0.063 %, -0.030 %, -0.042 % (the CPU kernels: v's head size
    differs from q/k's, so sdpa takes torch's math path there; the CUDA estimate takes the memory-efficient
    kernel's saved tensors, not checked on a GPU). peft's all-linear leaves the dense MLP out on deepseek_v3."""

    spec = ModelSpec.from_config_dict({**TINY_CONFIGS["deepseek_v3"], **extra}, name="tiny-mla")
    train = TrainConfig(batch_size=2, seq_len=256, **kw)
    _assert_formula_matches_exact(spec, train, 0.002)


# ---- DeepSeek-V3 MoE layers in the formulas: dense layers first, then MoE (sigmoid router, shared experts) ----------

DEEPSEEK_CASES = [("deepseek_v3-moe", dict(method=Method.LORA, precision=Precision.BF16, checkpointing=False)),
                  ("deepseek_v3-moe", dict(method=Method.FULL, precision=Precision.BF16, checkpointing=True)),
                  ("deepseek_v3-moe", dict(method=Method.LORA, precision=Precision.BF16, checkpointing=True)),
                  ("deepseek_v3-moe", dict(method=Method.FULL, precision=Precision.BF16, checkpointing=False)),
                  ("deepseek_v3-moe", dict(method=Method.FULL, precision=Precision.FP32, checkpointing=False)),
                  ("deepseek_v3-moe", dict(method=Method.FREEZE, precision=Precision.BF16, checkpointing=False)),
                  ("deepseek_v3-moe-noq", dict(method=Method.LORA, precision=Precision.BF16, checkpointing=False)),
                  ("deepseek_v3-moe-noq", dict(method=Method.LORA, precision=Precision.BF16, checkpointing=True)),
                  ("deepseek_v3-moe-noq", dict(method=Method.FULL, precision=Precision.BF16, checkpointing=False)),
                  ("deepseek_v2", dict(method=Method.FULL, precision=Precision.BF16, checkpointing=False)),
                  ("deepseek_v2", dict(method=Method.LORA, precision=Precision.BF16, checkpointing=False)),
                  ("deepseek_v2", dict(method=Method.LORA, precision=Precision.BF16, checkpointing=True)),
                  ("deepseek_v2", dict(method=Method.FULL, precision=Precision.BF16, checkpointing=True)),
                  ("deepseek_v2", dict(method=Method.FREEZE, precision=Precision.BF16, checkpointing=False)),
                  ("deepseek_v2", dict(method=Method.LORA, precision=Precision.BF16, checkpointing=False,
                                       attn=Attention.EAGER))]


# CI traces a covering subset (each family, LoRA / checkpointing / freeze); the docstrings keep every case measured
_DEEPSEEK_TRACED = (0, 2, 5, 7, 11, 13)


@pytest.mark.parametrize("arch,kw", [pytest.param(*DEEPSEEK_CASES[i], marks=[pytest.mark.integration] if n else [])
                                     for n, i in enumerate(_DEEPSEEK_TRACED)])
def test_deepseek_moe_formula_matches_the_exact_trace(arch, kw):
    """Measured (b2 x s256, all DEEPSEEK_CASES): -0.000 %, -0.000 %, -0.168 %, +0.006 %, +0.006 %, -0.74 %, -0.028 %,
    +0.086 %, -0.016 %; DeepSeek-V2 (complex rope, softmax router): -0.041 %, -0.040 %, -0.254 %, -0.000 %, -0.700
    %, -0.039 %. Freeze is the worst (a moment inside a trained layer's backward, not walked op by op). The routed
    experts run transformers' grouped_mm: their saved rows are tokens x top-k whatever the routing, so the exact
    trace and the formulas agree without a balance assumption."""

    spec, train = tiny_spec(arch), TrainConfig(batch_size=2, seq_len=256, **kw)
    _assert_formula_matches_exact(spec, train, 0.01)


@pytest.mark.integration
@pytest.mark.parametrize("arch,kw", [DEEPSEEK_CASES[i] for i in (1, 11)])
def test_deepseek_moe_formula_matches_the_cpu_truth(arch, kw):
    """Measured (cases 0, 1, 2, 3, 6, 7, 9, 10, 11, 12; CI runs 1 and 11): -0.000 %, -0.000 %, -0.210 %,
    +0.006 %, -0.028 %, +0.046 % (V3, real sigmoid routing, random
    weights); V2: -0.041 %, -0.041 %, -0.295 %, -0.000 %."""
    from memplan.testing.truth import measure_cpu_peak

    spec, train = tiny_spec(arch), TrainConfig(batch_size=2, seq_len=256, **kw)
    truth = measure_cpu_peak(spec, train).peak_bytes
    assert abs(estimate(spec, train, device="cpu").peak_allocated_bytes / truth - 1) < 0.01


def test_deepseek_moe_needs_its_expert_dimensions():
    """DeepseekV3Config's defaults (256 routed experts, 3 dense layers) are DeepSeek-V3's: a config with MoE layers
    must give each one."""
    cfg = {k: v for k, v in TINY_CONFIGS["deepseek_v3-moe"].items() if k not in ("n_routed_experts",
                                                                                 "first_k_dense_replace")}
    with pytest.raises(ConfigError, match="n_routed_experts.*first_k_dense_replace"):
        ModelSpec.from_config_dict(cfg)


# ---- gpt-oss in the formulas: attention sinks (eager), biased router and experts, the clamped SwiGLU -------------

def test_gpt_oss_parameter_count_equals_the_built_model():
    """q/k/v/o biases, sinks (heads,), the router's bias, the experts' gate_up / down biases; the catalog entries'
    published totals are checked by test_analytic_count_equals_the_published_or_counted_total."""
    from memplan.build.model import build_model

    spec = tiny_spec("gpt_oss")
    model = build_model(spec, TrainConfig(method=Method.FULL, precision=Precision.FP32), device="meta")
    assert spec.analytic and sum(p.numel() for p in model.parameters()) == spec.num_parameters
    assert resolve_model("gpt-oss-20b").analytic and resolve_model("gpt-oss-120b").windowed_layers == 18


# each case measured (b2 x s256, analytic vs exact), the first two of each model traced here:
# gpt-oss LoRA bf16 +0.022 %, full bf16 ckpt -0.000 %, freeze bf16 -0.001 %, LoRA bf16 ckpt -0.000 %, full bf16
# -0.001 %, freeze bf16 ckpt -0.000 %, full fp32 -0.000 % (s640: LoRA +0.008 %, full -0.001 %, freeze -0.001 %;
# gpt-oss-20b b1: LoRA checkpointed s1024 -0.000 %, full s1024 -0.000 %); Llama 4 text LoRA bf16 ckpt -0.001 %,
# full bf16 -0.000 %, LoRA bf16 +0.018 %, freeze bf16 -0.000 %, full bf16 ckpt -0.000 %, freeze bf16 ckpt -0.000 %,
# full fp32 -0.000 % (s640: LoRA +0.008 %, full / freeze / LoRA checkpointed -0.000 %). CPU truth of both:
# tests/test_trace.py (full fp32 b1 x s64)
MOE_FORMULA_CASES = [
    ("gpt_oss", dict(method=Method.LORA, precision=Precision.BF16, checkpointing=False)),
    ("gpt_oss", dict(method=Method.FULL, precision=Precision.BF16, checkpointing=True)),
    ("llama4_text", dict(method=Method.LORA, precision=Precision.BF16, checkpointing=True)),
    ("llama4_text", dict(method=Method.FULL, precision=Precision.BF16, checkpointing=False)),
]


@pytest.mark.parametrize(("arch", "kw"), MOE_FORMULA_CASES,
                         ids=[f"{a}-{k['method'].value}-ckpt{k['checkpointing']}" for a, k in MOE_FORMULA_CASES])
def test_gpt_oss_and_llama4_formulas_match_the_exact_trace(arch, kw):
    """gpt-oss (sinks, biased router / experts, clamped SwiGLU) and Llama 4 text (every expert on every token, a
    shared expert, rope + L2 norm / NoPE layers: the exact mode traces whole periods of 4 layers,
    Family.layer_period_default) within 1 % of the exact trace, the same trainable parameters."""

    spec, train = tiny_spec(arch), TrainConfig(batch_size=2, seq_len=256, **kw)
    _assert_formula_matches_exact(spec, train, 0.01)


# ---- Llama 4 text in the formulas: every expert on every token, a shared expert, rope + L2 norm / NoPE layers -------

def test_llama4_parameter_count_equals_the_built_model_and_dense_interleave_stays_exact():
    from memplan.build.model import build_model

    spec = tiny_spec("llama4_text")
    model = build_model(spec, TrainConfig(method=Method.FULL, precision=Precision.FP32), device="meta")
    assert spec.analytic and sum(p.numel() for p in model.parameters()) == spec.num_parameters
    assert spec.layer_period == 4 and [spec.uses_rope(i) for i in range(4)] == [True, True, True, False]
    # Maverick's dense MLPs between the MoE layers are not in the formulas: the exact mode traces them
    assert not ModelSpec.from_config_dict({**TINY_CONFIGS["llama4_text"], "interleave_moe_layer_step": 2}).analytic


# ---- Qwen3.5: linear-attention and full-attention layers in a period; flash-attn 2 in the exact mode ---------------

def _tiny_qwen3_5_moe(layers: int = 8, period: int = 2) -> dict:
    types = [("linear_attention", "full_attention")[(i + 1) % period == 0] for i in range(layers)]
    return dict(model_type="qwen3_5_moe", architectures=["Qwen3_5MoeForConditionalGeneration"],
                tie_word_embeddings=False,
                text_config=dict(model_type="qwen3_5_moe_text", hidden_size=64, num_hidden_layers=layers,
                                 layer_types=types, full_attention_interval=period, num_attention_heads=2,
                                 num_key_value_heads=1, head_dim=32, linear_num_key_heads=2, linear_num_value_heads=2,
                                 linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4,
                                 num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                 shared_expert_intermediate_size=32, vocab_size=512, max_position_embeddings=512,
                                 attn_output_gate=True,
                                 rope_parameters=dict(rope_type="default", rope_theta=10000000,
                                                      partial_rotary_factor=0.25, mrope_interleaved=True,
                                                      mrope_section=[2, 1, 1])),
                vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                                   patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                                   num_position_embeddings=64, deepstack_visual_indexes=[]))


def test_qwen3_5_period_is_read_from_the_text_config():
    spec = resolve_model("Qwen/Qwen3.5-35B-A3B")
    assert (spec.layer_period, spec.num_layers, spec.hidden_size) == (4, 40, 2048)
    assert spec.with_layers(8).config["text_config"]["layer_types"] == ["linear_attention"] * 3 + ["full_attention"] \
        + ["linear_attention"] * 3 + ["full_attention"]
    assert ModelSpec.from_config_dict(_tiny_qwen3_5_moe(layers=2, period=4)).layer_period == 1  # not one period deep


@pytest.mark.integration
def test_qwen3_5_traces_whole_periods_and_lands_on_the_full_depth():
    """Depths 3, 5, 7 of a 9-layer [linear, full] x 4 + linear model (one layer first, so the real depth is whole
    periods past it) extrapolate to its 9-layer trace to the byte; the line through 1 and 2 layers would not."""
    from memplan.trace.exact import exact_run
    from memplan.trace.step import trace_depth

    spec = ModelSpec.from_config_dict(_tiny_qwen3_5_moe(layers=9), name="tiny-qwen3.5-moe")
    train = TrainConfig(method=Method.FULL, precision=Precision.FP32, batch_size=1, seq_len=64, checkpointing=False)
    run = exact_run(spec, train, device="cpu")
    assert [t.layers for t in run.traces] == [3, 5, 7]
    full = trace_depth(spec, train, 9)
    assert run.breakdown.peak_allocated_bytes == full.peak and run.breakdown.params == full.params
    one, two = trace_depth(spec, train, 1), trace_depth(spec, train, 2)  # a per-layer line: 1 + 8 x (2 - 1)
    assert one.peak + (two.peak - one.peak) * 8 != full.peak
    # the formulas, layer kind by layer kind (measured +0.10 %: no repeat_interleave, one sample, one chunk)
    assert abs(estimate(spec, train, device="cpu").peak_allocated_bytes / full.peak - 1) < 0.01
    assert "linear-attention" in run.breakdown.note and "not costed" in run.breakdown.note


@pytest.mark.integration
def test_flash_attention_2_is_traced_as_sdpa_without_flash_attn():
    """transformers refuses flash_attention_2 without the flash_attn package (always so on a CPU trace)."""
    import importlib.util

    from memplan.trace.exact import estimate_any

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash_attn is installed: the exact mode runs it")
    spec = tiny_spec("llama")
    train = TrainConfig(method=Method.LORA, precision=Precision.BF16, batch_size=2, seq_len=64)
    fa2 = estimate_any(spec, train.with_(attn=Attention.FLASH_ATTENTION_2), exact=True)
    sdpa = estimate_any(spec, train.with_(attn=Attention.SDPA), exact=True)
    assert fa2.peak_allocated_bytes == sdpa.peak_allocated_bytes and "traced as sdpa" in fa2.note


@pytest.mark.parametrize("name,method", [("TechxGenus/Meta-Llama-3-8B-Instruct-AWQ", "awq"),
                                         ("TechxGenus/Meta-Llama-3-8B-Instruct-GPTQ", "gptq"),
                                         ("ISTA-DASLab/Meta-Llama-3-8B-Instruct-AQLM-2Bit-1x16", "aqlm")])
def test_a_pre_quantized_repository_says_what_it_assumed(capsys, monkeypatch, name, method):
    """LLaMA-Factory's train_qlora examples (issue 16): no config.json of these repositories is on disk, so their
    quantization_config is assumed from the name and the library's defaults, in one warning line
    (memplan.spec.prequantized), and the QLoRA step over that storage is estimated."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["estimate", "--model", name, "--json"]) == 0
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and f"assumed: {method}" in err and "meta-llama/Meta-Llama-3-8B's" in err, err
    cfg = json.loads(out)["config"]
    assert (cfg["method"], cfg["quant_method"]) == ("qlora", method)


def test_qwen2_vl_estimates_with_its_vision_tower_frozen():
    """Qwen2-VL (LLaMA-Factory's megatron/qwen2_vl_full.yaml): analytic, the tower frozen: the trainable parameters
    are a qwen2 decoder's of the same dims, the tower's weights counted."""
    cfg = {**TINY_VL, "model_type": "qwen2_vl", "architectures": ["Qwen2VLForConditionalGeneration"],
           "vision_config": dict(depth=1, embed_dim=64, hidden_size=256, num_heads=2, mlp_ratio=2)}
    vl = ModelSpec.from_config_dict(cfg, name="tiny-qwen2-vl")
    text = ModelSpec.from_config_dict({**TINY_VL, "model_type": "qwen2", "architectures": None}, name="tiny-qwen2")
    train = TrainConfig(method=Method.LORA, batch_size=1, seq_len=64, precision=Precision.FP32, checkpointing=False)
    bd = estimate(vl, train)
    assert bd.method == "analytic" and "not costed" in bd.note
    assert bd.trainable_params == estimate(text, train).trainable_params and vl.num_parameters > text.num_parameters


@pytest.mark.integration
def test_flash_attention_2_on_an_exact_only_model_is_traced_as_sdpa():
    """flash_attention_2 (LLaMA-Factory's fa2) on a model only the exact mode knows: traced as sdpa, no analytic
    delta asked of formulas it has none of (was "not in the analytic formulas" after the whole trace)."""
    from memplan.trace.exact import estimate_any

    vl = ModelSpec.from_config_dict({**TINY_CONFIGS["llama4_text"], "interleave_moe_layer_step": 2},
                                    name="tiny-llama4-interleaved")  # Maverick's dense + MoE layers: exact only
    assert not vl.analytic
    half = TrainConfig(method=Method.LORA, batch_size=1, seq_len=64, precision=Precision.BF16, checkpointing=False)
    fa2 = estimate_any(vl, half.with_(attn=Attention.FLASH_ATTENTION_2))
    assert fa2.method == "exact" and "traced as sdpa" in fa2.note
    assert fa2.peak_allocated_bytes == estimate_any(vl, half.with_(attn=Attention.SDPA)).peak_allocated_bytes


@pytest.mark.integration
@pytest.mark.parametrize("kw", [dict(method=Method.LORA, precision=Precision.BF16, checkpointing=True)])
def test_qwen3_5_exact_mode_and_formula_match_the_cpu_truth(kw):
    """The real Qwen3.5-MoE step (Gated DeltaNet on torch's chunked fallback, MoE with the gated shared expert, the
    frozen tower) under the CPU profiler, b1 x s128. Measured: exact -0.11 %, the formulas +0.001 %; the dense
    qwen3_5 (LoRA bf16 checkpointed, b2 x s256) +0.19 % and qwen3_5_moe full bf16 +0.28 % (b2 x s256, 160-250 s
    each on loaded cores, so not in CI). Earlier, on the hidden-64 `_tiny_qwen3_5_moe(layers=4)` at b2 x s128, the
    exact mode measured -0.0006 % (full fp32), -0.64 % (LoRA bf16 checkpointed), -0.003 % (LoRA fp32); there the
    formulas are -5.3 % on the checkpointed LoRA (the MoE recompute's gather / index transients, a fixed cost that
    a hidden size of 64 makes large)."""
    from memplan.testing.truth import measure_cpu_peak
    from memplan.trace.exact import exact_estimate

    spec, train = tiny_spec("qwen3_5_moe"), TrainConfig(batch_size=1, seq_len=128, **kw)
    truth = measure_cpu_peak(spec, train).peak_bytes
    assert abs(exact_estimate(spec, train, device="cpu").peak_allocated_bytes / truth - 1) < 0.01
    assert abs(estimate(spec, train, device="cpu").peak_allocated_bytes / truth - 1) < 0.01


def test_qwen3_5_parameter_counts_equal_the_built_model_and_the_published_totals():
    """Gated DeltaNet and full-attention layers, the MoE's gated shared expert, the qwen3_5 vision tower: the formula
    counts equal the built models (LoRA's all-linear adapters too: peft wraps no qwen3_5_moe router / experts) and
    the catalog's published totals."""
    from memplan.build.model import build_model
    from memplan.predict.layout import Layout

    for arch in ("qwen3_5", "qwen3_5_moe"):
        spec = tiny_spec(arch)
        model = build_model(spec, TrainConfig(method=Method.FULL, precision=Precision.FP32), device="meta")
        assert spec.analytic and spec.num_parameters == sum(p.numel() for p in model.parameters())
        assert spec.vision_params == sum(p.numel() for n, p in model.named_parameters() if "visual." in n) > 0
        lora = TrainConfig(method=Method.LORA, precision=Precision.FP32)
        model = build_model(spec, lora, device="meta")
        assert Layout.of(spec, lora).lora_params_total() == sum(p.numel() for p in model.parameters()
                                                                if p.requires_grad)
    for hf_id in ("Qwen/Qwen3.5-4B", "Qwen/Qwen3.5-35B-A3B", "Qwen/Qwen3.5-397B-A17B"):
        spec = resolve_model(hf_id)
        assert spec.analytic and spec.num_parameters == json.loads(ENTRIES[hf_id].path.read_text())["_param_count"]


QWEN35_CASES = [("qwen3_5", dict(method=Method.FULL, precision=Precision.FP32, checkpointing=False)),
                ("qwen3_5", dict(method=Method.FULL, precision=Precision.BF16, checkpointing=False)),
                ("qwen3_5", dict(method=Method.LORA, precision=Precision.BF16, checkpointing=True)),
                ("qwen3_5", dict(method=Method.LORA, precision=Precision.FP32, checkpointing=False)),
                ("qwen3_5", dict(method=Method.FREEZE, precision=Precision.BF16, checkpointing=False)),
                ("qwen3_5_moe", dict(method=Method.FULL, precision=Precision.FP32, checkpointing=False)),
                ("qwen3_5_moe", dict(method=Method.LORA, precision=Precision.BF16, checkpointing=True)),
                ("qwen3_5_moe", dict(method=Method.FREEZE, precision=Precision.FP32, checkpointing=False))]


@pytest.mark.parametrize("arch,kw", [QWEN35_CASES[4]])
def test_qwen3_5_formula_matches_the_exact_trace(arch, kw):
    """Measured (b2 x s256, QWEN35_CASES): +0.242 %, +0.391 %, +0.240 %, +0.338 %, +0.505 %; MoE +0.148 %, +0.246 %,
    +0.201 %; also full fp32 / LoRA fp32 with checkpointing -0.000 % / +0.382 %, freeze bf16 checkpointed +0.184 %,
    full bf16 checkpointed -0.000 % (s256) / -0.072 % (s512), LoRA bf16 s160 (padded to whole chunks) +0.774 %.
    CI traces the fastest (freeze; the MoE's LoRA checkpointed is traced against the CPU truth below); Qwen3.5-4B
    LoRA b1 x s1024: +0.02 % (checkpointed)
    and +0.03 % against traces of 390-490 s. The Gated DeltaNet runs torch's chunked fallback in both."""

    spec, train = tiny_spec(arch), TrainConfig(batch_size=2, seq_len=256, **kw)
    _assert_formula_matches_exact(spec, train, 0.01)
