"""LLaMA-Factory's own example configs (issue #16): what made some of them end in a refusal, each fixed where the
behaviour can be known from LLaMA-Factory's or a quantization library's source (benchmarks/llamafactory_examples.py
runs all of them)."""

from __future__ import annotations

import json

import pytest
import yaml

from memplan.errors import ConfigError
from memplan.formats.llamafactory import not_a_config, read_llamafactory
from memplan.spec.parallel import Sharding

BASE = {"model_name_or_path": "meta-llama/Meta-Llama-3-8B", "do_train": True, "finetuning_type": "lora"}


# ---- 1. a DeepSpeed JSON named relative to the LLaMA-Factory checkout ------------------------------------------
def test_deepspeed_path_relative_to_the_checkout_is_found_from_anywhere(tmp_path, monkeypatch):
    """examples/train_full/qwen3vl_full_sft.yaml names examples/deepspeed/ds_z3_config.json (relative to the checkout
    llamafactory-cli runs in): found from the YAML's folder's ancestors when the working directory is elsewhere."""
    checkout = tmp_path / "LLaMA-Factory"
    (checkout / "examples" / "deepspeed").mkdir(parents=True)
    (checkout / "examples" / "train_full").mkdir()
    (checkout / "examples" / "deepspeed" / "ds_z3_config.json").write_text(
        json.dumps({"zero_optimization": {"stage": 3}}))
    cfg = checkout / "examples" / "train_full" / "x.yaml"
    cfg.write_text(yaml.safe_dump({**BASE, "deepspeed": "examples/deepspeed/ds_z3_config.json"}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert read_llamafactory(cfg).train.sharding is Sharding.ZERO3


def test_missing_deepspeed_json_says_where_it_looked(tmp_path, monkeypatch):
    cfg = tmp_path / "x.yaml"
    cfg.write_text(yaml.safe_dump({**BASE, "deepspeed": "examples/deepspeed/none.json"}))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        read_llamafactory(cfg)
    msg = str(err.value)
    assert "none.json: no such file" in msg and "working directory" in msg and "each folder above it" in msg
    assert "\n" not in msg


# ---- 2. a YAML that is no training config --------------------------------------------------------------------
TOKENS = {"<|START_OF_SVG|>": "Marks the beginning of an SVG document", "<|end_of_g|>": "Ends a group element"}


def test_a_token_description_file_is_not_a_training_config(tmp_path):
    """examples/extras/multi_tokens/tokens_cfg.yaml: what new_special_tokens_config names, not a training YAML."""
    cfg = tmp_path / "tokens_cfg.yaml"
    cfg.write_text(yaml.safe_dump(TOKENS))
    with pytest.raises(ConfigError, match="not a LLaMA-Factory training config: none of its 2 keys") as err:
        read_llamafactory(cfg)
    assert "new_special_tokens_config" in str(err.value)
    assert not_a_config(BASE) is None and not_a_config({"stage": "sft"}) is None  # a config missing keys is one


def test_estimate_of_a_token_file_exits_2_in_one_line(tmp_path, capsys):
    from memplan.cli import main

    cfg = tmp_path / "tokens_cfg.yaml"
    cfg.write_text(yaml.safe_dump(TOKENS))
    rc = main(["estimate", "--config", str(cfg)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "not a LLaMA-Factory training config" in err, err


# ---- 3. pre-quantized checkpoints (AWQ, GPTQ, AQLM) ---------------------------------------------------------
def test_packed_storage_is_each_librarys_buffers():
    """Byte counts of the buffers each library registers per Linear (shapes from gptqmodel 7.7
    nn_modules/qlinear/__init__.py and aqlm 1.1.7 inference.py, worked out by hand here)."""
    from memplan.predict.weights import packed_bytes
    from memplan.spec.prequantized import PackedQuant

    awq, gptq = PackedQuant(method="awq", bits=4), PackedQuant(method="gptq", bits=4)
    aqlm = PackedQuant(method="aqlm", bits=2, in_group_size=8, num_codebooks=1, nbits_per_codebook=16)
    # AWQ (4096 -> 14336): qweight int32 4096 x 1792, qzeros int32 32 x 1792, scales fp16 32 x 14336
    assert packed_bytes(awq, [(4096, 14336, 1)], 2) == 4096 * 1792 * 4 + 32 * 1792 * 4 + 32 * 14336 * 2
    # GPTQ (4096 -> 4096): qweight int32 512 x 4096, qzeros int32 32 x 512, scales fp16 32 x 4096, g_idx int32 4096
    assert packed_bytes(gptq, [(4096, 4096, 1)], 2) == 512 * 4096 * 4 + 32 * 512 * 4 + 32 * 4096 * 2 + 4096 * 4
    # AQLM 1x16, in_group 8 (4096 -> 4096): codebooks 1 x 65536 x 1 x 8 fp16, codes int16 4096 x 512 x 1, scales
    assert packed_bytes(aqlm, [(4096, 4096, 1)], 2) == 65536 * 8 * 2 + 4096 * 512 * 2 + 4096 * 2
    assert packed_bytes(awq, [(4096, 14336, 3)], 2) == 3 * packed_bytes(awq, [(4096, 14336, 1)], 2)


@pytest.mark.parametrize(("name", "method", "bits"), [
    ("TechxGenus/Meta-Llama-3-8B-Instruct-AWQ", "awq", 4), ("TechxGenus/Meta-Llama-3-8B-Instruct-GPTQ", "gptq", 4),
    ("ISTA-DASLab/Meta-Llama-3-8B-Instruct-AQLM-2Bit-1x16", "aqlm", 2)])
def test_a_prequantized_repo_without_config_is_its_base_with_assumed_quantization(name, method, bits):
    from memplan.spec.catalog import _assumed_prequantized, resolve_model

    with pytest.warns(UserWarning, match="no config.json on disk, so its quantization_config is assumed") as rec:
        spec = _assumed_prequantized(name)
    assert spec is not None and spec.packed is not None
    assert (spec.packed.method, spec.packed.bits) == (method, bits)
    assert "meta-llama/Meta-Llama-3-8B's" in str(rec[0].message) and "--model" in str(rec[0].message)
    base = resolve_model("meta-llama/Meta-Llama-3-8B")
    assert (spec.hidden_size, spec.num_layers, spec.vocab_size) == (base.hidden_size, base.num_layers,
                                                                    base.vocab_size)


def _llama_config(tmp_path, quant):
    from memplan.spec.catalog import find_entry

    entry = find_entry("meta-llama/Meta-Llama-3-8B")
    cfg = {**json.loads(entry.path.read_text()), "quantization_config": quant}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


def test_a_local_config_json_wins_over_the_assumption(tmp_path, recwarn):
    from memplan.spec.catalog import resolve_model

    folder = _llama_config(tmp_path, {"quant_method": "gptq", "bits": 8, "group_size": 64, "desc_act": False})
    spec = resolve_model(str(folder))
    assert spec.packed is not None and (spec.packed.bits, spec.packed.group_size, spec.packed.assumed) == (8, 64, "")
    assert not [w for w in recwarn if "assumed" in str(w.message)]


def _peak(spec, **kw):
    from memplan.predict.estimator import estimate
    from memplan.spec.stacks import Stack
    from memplan.spec.train import TrainConfig

    return estimate(spec, TrainConfig(stack=Stack.LLAMAFACTORY, seq_len=1024).with_(**kw))


def test_each_kernel_keeps_what_its_source_saves(tmp_path):
    """Without checkpointing every layer's saved tensors stay: GPTQ's matmul keeps each linear's dequantized weight
    (gptqmodel torch.py L370-376), AWQ's Function keeps only the packed buffers (gemm_awq.py L59), AQLM keeps the
    input (aqlm inference.py L107-113); with the same storage, GPTQ sits above AWQ by about those weights."""
    from memplan.spec.catalog import resolve_model

    specs = {m: resolve_model(str(_llama_config(tmp_path / m, {"quant_method": m, "bits": 4}
                                                if m != "aqlm" else {"quant_method": m})))
             for m in ("awq", "gptq", "aqlm") if (tmp_path / m).mkdir() is None}
    acts = {m: _peak(s, checkpointing=False).terms for m, s in specs.items()}
    act = {m: next(t.bytes for t in terms if t.name == "activations") for m, terms in acts.items()}
    spec = specs["gptq"]
    weights_per_layer = sum(lin.in_features * lin.out_features for lin in spec.layer_linears()) * 2  # bf16 copies
    assert act["gptq"] - act["awq"] == pytest.approx(spec.num_layers * weights_per_layer, rel=0.02)
    assert act["awq"] < act["aqlm"] < act["gptq"]


def test_prequantized_training_follows_llamafactorys_refusals(tmp_path):
    from memplan.spec.catalog import resolve_model
    from memplan.spec.parallel import Sharding as Sh
    from memplan.spec.train import Method, QuantMethod

    spec = resolve_model(str(_llama_config(tmp_path, {"quant_method": "awq", "bits": 4, "group_size": 128})))
    assert _peak(spec).peak_allocated_bytes < _peak(resolve_model("meta-llama/Meta-Llama-3-8B")).peak_allocated_bytes
    with pytest.raises(ConfigError, match="quantized models train LoRA or OFT adapters only"):
        _peak(spec, method=Method.FULL)
    with pytest.raises(ConfigError, match="incompatible with PTQ-quantized models"):
        _peak(spec, sharding=Sh.ZERO3, gpus=2)
    with pytest.raises(ConfigError, match="quantization_method awq: AWQ is a pre-quantized checkpoint's storage"):
        _peak(resolve_model("meta-llama/Meta-Llama-3-8B"), method=Method.QLORA, quant_method=QuantMethod.AWQ)
    with pytest.warns(UserWarning, match="quantization_bit 4 .bnb. over the pre-quantized"):
        _peak(spec, method=Method.QLORA)


@pytest.mark.parametrize("method", ["awq", "gptq", "aqlm"])
def test_llamafactory_on_the_fly_quantization_refuses_packed_methods(method):
    from memplan.formats.llamafactory import config_from_llamafactory

    with pytest.raises(ConfigError, match=f"quantization_method '{method}': LLaMA-Factory quantizes on the fly"):
        config_from_llamafactory({**BASE, "quantization_bit": 4, "quantization_method": method})
    assert config_from_llamafactory({**BASE, "quantization_bit": 4, "quantization_method": "hqq"}).train.quant_bits == 4


# ---- 4. a prediction run: inference memory ---------------------------------------------------------------------
PREDICT = {"model_name_or_path": "meta-llama/Meta-Llama-3-8B-Instruct", "stage": "sft", "do_predict": True,
           "finetuning_type": "lora", "cutoff_len": 2048, "per_device_eval_batch_size": 1,
           "predict_with_generate": True}  # examples/extras/nlg_eval/llama3_lora_predict.yaml's memory keys


def test_a_predict_config_is_estimated_as_generation():
    """weights in the eval dtype, the KV cache of cutoff_len + max_new_tokens (1024 by default) positions, one
    layer's cache grown by cat and the last position's logits; no gradients or optimizer states."""
    from memplan.formats.llamafactory import config_from_llamafactory
    from memplan.predict.generation import generation_estimate
    from memplan.spec.catalog import resolve_model

    lf = config_from_llamafactory(PREDICT)
    gen = lf.generation
    assert gen is not None and (gen.batch_size, gen.prompt_len, gen.new_tokens, gen.width) == (1, 2048, 1024, 2)
    assert not lf.not_modelled  # predict_with_generate is what is estimated here, not a key left out
    spec = resolve_model(PREDICT["model_name_or_path"])
    bd = generation_estimate(spec, gen)
    terms = {t.name: t.bytes for t in bd.terms}
    one_position = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * 2  # K + V, every layer, bf16
    ws = terms["cuda_workspaces"]
    logits = 2 * spec.vocab_size * 4 + spec.vocab_size * 2  # fp32 copy + softmax, the bf16 original
    layer = one_position // spec.num_layers
    # the last step: the whole cache, one layer's grown copy, the logits
    assert dict(bd.phases)["decode"] - dict(bd.phases)["load"] - ws == (one_position + layer) * 3072 + logits
    assert terms["weights"] == spec.num_parameters * 2 + 2 * (spec.rotary_dim // 2) * 4
    assert "gradients" not in terms and "optimizer_states" not in terms and bd.trainable_params == 0
    four = generation_estimate(spec, type(gen)(**{**{k: getattr(gen, k) for k in gen.__slots__}, "batch_size": 4}))
    assert dict(four.phases)["decode"] - dict(four.phases)["load"] - ws == 4 * ((one_position + layer) * 3072
                                                                                + logits)


@pytest.mark.parametrize(("change", "needle"), [
    ({"predict_with_generate": False}, "without predict_with_generate"),
    ({"do_predict": False, "do_eval": True, "predict_with_generate": False}, "an evaluation-only run"),
])
def test_other_non_training_configs_keep_their_refusal(change, needle):
    from memplan.formats.llamafactory import config_from_llamafactory

    with pytest.raises(ConfigError, match=f"not a training run: .*{needle}"):
        config_from_llamafactory({**PREDICT, **change})


def test_estimate_of_a_predict_yaml_prints_inference(tmp_path, capsys):
    from memplan.cli import main

    cfg = tmp_path / "predict.yaml"
    cfg.write_text(yaml.safe_dump(PREDICT))
    assert main(["estimate", "--config", str(cfg), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["method"] == "inference" and set(out["phases"]) == {"load", "prefill", "decode"}
    assert out["memory"]["kv_cache"] > 0 and out["model"]["trainable_parameters"] == 0


def test_use_kt_is_named_not_ignored():
    """examples/ktransformers/*: the experts run on the CPU under KTransformers; never silently dropped."""
    from memplan.formats.llamafactory import config_from_llamafactory

    lf = config_from_llamafactory({**BASE, "use_kt": True})
    assert any(w.startswith("use_kt=true (KTransformers") for w in lf.not_modelled)
    assert not config_from_llamafactory(BASE).not_modelled


def test_megatron_parallelism_is_named_not_ignored():
    """examples/megatron/*: tensor / pipeline parallel sizes split the model over GPUs under Megatron-Core; the
    estimate (one data-parallel GPU) names them instead of answering as if they were not there."""
    from memplan.formats.llamafactory import config_from_llamafactory

    lf = config_from_llamafactory({**BASE, "tensor_model_parallel_size": 4, "pipeline_model_parallel_size": 2,
                                   "sequence_parallel": True})
    named = {w.split("=")[0] for w in lf.not_modelled}
    assert named == {"tensor_model_parallel_size", "pipeline_model_parallel_size"}
    assert all("Megatron-Core" in w for w in lf.not_modelled)
    assert not config_from_llamafactory({**BASE, "tensor_model_parallel_size": 1}).not_modelled


def test_offline_a_cached_config_json_wins_over_the_assumption(tmp_path, monkeypatch, recwarn):
    """HF_HUB_OFFLINE: a pre-quantized repository is read from the hub cache's config.json when there is one (no
    transformers import), else assumed."""
    from memplan.spec import catalog

    folder = _llama_config(tmp_path, {"quant_method": "awq", "bits": 4, "group_size": 64})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(catalog, "_cached_config", lambda name: folder / "config.json")
    spec = catalog.resolve_model("someone/Some-Llama-AWQ")
    assert spec.packed is not None and spec.packed.group_size == 64 and not spec.packed.assumed
    monkeypatch.setattr(catalog, "_cached_config", lambda name: None)
    with pytest.warns(UserWarning, match="assumed: awq"):
        assert catalog.resolve_model("TechxGenus/Meta-Llama-3-8B-Instruct-AWQ").packed.group_size == 128
