"""The domain tables (spec/optimizers.py, spec/families.py): every member has an entry every stage can read, and
the entries added through the table alone (paged_adamw_32bit, the glm family) match the CPU truth of the real
stack's steps."""

import importlib.util

import pytest

from memplan.errors import ConfigError
from memplan.predict.estimator import estimate
from memplan.spec import optimizers
from memplan.spec.catalog import catalog_entries, resolve_model
from memplan.spec.families import FAMILIES, family_of
from memplan.spec.model import ModelSpec
from memplan.spec.optimizers import OPTIMIZERS, Optimizer
from memplan.spec.train import Method, Precision, TrainConfig
from memplan.testing.tiny import TINY_CONFIGS, tiny_spec

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None


@pytest.mark.parametrize("opt", list(Optimizer))
def test_every_optimizer_has_one_entry_read_back_from_its_hf_name(opt):
    facts = OPTIMIZERS[opt]
    if facts.hf_optim:  # LLaMA-Factory's own (use_adam_mini, use_muon) have no HF `optim` name
        assert optimizers.from_hf(facts.hf_optim, facts.optim_args) is opt
    else:
        assert facts.lf_flag and optimizers.from_llamafactory(Optimizer.ADAMW, {facts.lf_flag: True}) is opt
    assert all(optimizers.from_hf(alias) is opt for alias in facts.hf_aliases)
    module, name, _ = facts.builder
    assert facts.bitsandbytes == module.startswith("bitsandbytes")
    if importlib.util.find_spec(module.split(".")[0]) is not None:
        assert hasattr(importlib.import_module(module), name)
    method = Method.FULL if facts.full_only else Method.LORA
    states = estimate(resolve_model("llama-3-8b"), TrainConfig(optimizer=opt, method=method)).term("optimizer_states")
    assert (states == 0) == (facts.states is optimizers.States.NONE)


def test_unknown_optimizer_names_are_refused():
    assert optimizers.from_hf("lion_32bit") is None
    with pytest.raises(ConfigError, match="--optimizer"):
        from memplan.cli.options import train_config

        train_config({"optimizer": "lion"}, command="estimate")


def test_every_catalog_model_type_is_in_the_family_table_or_not_analytic():
    for entry in catalog_entries():
        spec = resolve_model(entry.hf_id)
        assert spec.family is family_of(spec.model_type) or not spec.analytic
        in_formulas = spec.model_type in FAMILIES and FAMILIES[spec.model_type].analytic
        # DeepSeek-V3's MLA is in the formulas, its MoE layers after the dense ones are not
        assert spec.analytic == in_formulas or (in_formulas and spec.dense_prefix > 0)
    assert not family_of("no_such_type").analytic


def test_family_facts_come_from_the_table_not_the_raw_config():
    """Two specs equal as values estimate the same (softcapping was read from the uncompared raw config)."""
    gemma = tiny_spec("gemma2")
    assert gemma.attn_softcap == 50.0 and gemma.final_softcap == 30.0 and gemma.norms_per_layer == 4
    plain = ModelSpec.from_config_dict({**TINY_CONFIGS["gemma2"], "final_logit_softcapping": None}, name="tiny-gemma2")
    assert plain != gemma
    t = TrainConfig(method=Method.FULL, precision=Precision.FP32, batch_size=2, seq_len=256, checkpointing=False)
    assert estimate(plain, t).peak_allocated_bytes < estimate(gemma, t).peak_allocated_bytes


def test_glm_parameter_count_equals_the_built_model():
    from memplan.build.model import build_model

    spec = tiny_spec("glm")
    model = build_model(spec, TrainConfig(method=Method.FULL, precision=Precision.FP32), device="meta")
    assert sum(p.numel() for p in model.parameters()) == spec.num_parameters
    assert spec.qkv_bias  # GlmConfig.attention_bias defaults to True


GLM_CASES = [dict(method=Method.FULL, precision=Precision.FP32, checkpointing=False),
             dict(method=Method.LORA, precision=Precision.BF16, checkpointing=True),
             dict(method=Method.FREEZE, precision=Precision.FP32, checkpointing=False)]


@pytest.mark.integration
@pytest.mark.parametrize("kw", GLM_CASES)
def test_glm_from_its_table_entry_matches_the_cpu_truth(kw):
    from memplan.testing.truth import measure_cpu_peak

    spec, train = tiny_spec("glm"), TrainConfig(batch_size=2, seq_len=256, **kw)
    truth = measure_cpu_peak(spec, train).peak_bytes
    assert abs(estimate(spec, train, device="cpu").peak_allocated_bytes / truth - 1) < 0.005


@pytest.mark.integration
@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes (the qlora extra) is not installed")
@pytest.mark.parametrize("kw", [dict(method=Method.FULL, precision=Precision.FP32, checkpointing=False),
                                dict(method=Method.FULL, precision=Precision.PURE_BF16, checkpointing=False),
                                dict(method=Method.LORA, precision=Precision.BF16)])
def test_paged_adamw_32bit_from_its_table_entry_matches_a_real_bitsandbytes_step(kw):
    """bitsandbytes' 32-bit states are fp32 whatever the parameter dtype (pure bf16 included), no temporaries."""
    from memplan.testing.truth import measure_cpu_peak

    spec = tiny_spec("llama")
    train = TrainConfig(batch_size=2, seq_len=256, optimizer=Optimizer.PAGED_ADAMW_32BIT, **kw)
    truth = measure_cpu_peak(spec, train).peak_bytes
    assert abs(estimate(spec, train, device="cpu").peak_allocated_bytes / truth - 1) < 0.005


def test_moe_with_dense_layers_mixed_in_is_left_to_the_exact_mode():
    """qwen3_moe's decoder_sparse_step / mlp_only_layers put dense MLPs among the sparse ones: the formulas assume
    every layer sparse, so such a config is not analytic (never silently miscounted)."""
    cfg = dict(model_type="qwen3_moe", hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
               num_key_value_heads=4, head_dim=32, vocab_size=4096, intermediate_size=704,
               moe_intermediate_size=128, num_experts=4, num_experts_per_tok=2)
    assert ModelSpec.from_config_dict(cfg).analytic
    assert not ModelSpec.from_config_dict({**cfg, "mlp_only_layers": [0]}).analytic
    assert not ModelSpec.from_config_dict({**cfg, "decoder_sparse_step": 2}).analytic
