"""Qwen-1 (QWenLMHeadModel, remote code): the family's dimensions and LoRA roles, offline. Its analytic terms are
checked against the real code in benchmarks/qwen1_check.py (the code is not shipped, so not here)."""

from __future__ import annotations

from memplan.predict.layout import Layout
from memplan.spec.catalog import resolve_model
from memplan.spec.model import ModelSpec
from memplan.spec.train import TrainConfig

QWEN1 = dict(model_type="qwen", architectures=["QWenLMHeadModel"], hidden_size=128, num_hidden_layers=2,
             num_attention_heads=4, kv_channels=32, intermediate_size=688, vocab_size=4096, no_bias=True,
             tie_word_embeddings=False)
# the same decoder in Qwen2's terms: q/k/v biases (Qwen-1's c_attn bias, split three ways), no o_proj / MLP bias,
# the MLP as wide as QWenMLP's intermediate_size // 2, RMSNorms, an untied head
QWEN2 = dict(model_type="qwen2", hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
             intermediate_size=344, vocab_size=4096, tie_word_embeddings=False)


def test_qwen1_is_qwen2_in_parameters_and_its_lora_roles_map() -> None:
    q1, q2 = ModelSpec.from_config_dict(QWEN1), ModelSpec.from_config_dict(QWEN2)
    assert q1.family.remote_code and q1.analytic and q1.intermediate_size == 344
    # c_attn's bias (3 h) is q/k/v's: every parameter agrees
    assert q1.num_parameters == q2.num_parameters
    # c_proj fills both o_proj and down_proj (peft's suffix match), w1 / w2 the up / gate projections: the same
    # adapters as Qwen2's o_proj, gate/up/down
    lora1 = Layout.of(q1, TrainConfig(method="lora", lora_targets=("c_proj", "w1", "w2")))
    lora2 = Layout.of(q2, TrainConfig(method="lora", lora_targets=("o_proj", "gate_proj", "up_proj", "down_proj")))
    assert lora1.lora_modules == lora2.lora_modules and lora1.lora_params_total() == lora2.lora_params_total()
    # c_attn is one adapter on the fused projection: r (h + 3 h) per layer, fewer than Qwen2's three
    r, h = 8, 128
    fused = Layout.of(q1, TrainConfig(method="lora", lora_rank=r, lora_targets=("c_attn",))).lora_params_total()
    assert fused == 2 * r * (h + 3 * h) < Layout.of(q2, TrainConfig(
        method="lora", lora_rank=r, lora_targets=("q_proj", "k_proj", "v_proj"))).lora_params_total()


def test_qwen_7b_catalog_count() -> None:
    # Qwen/Qwen-7B's safetensors index: 15,442,649,088 bytes of bf16
    assert resolve_model("Qwen/Qwen-7B").num_parameters == 7_721_324_544


def test_qwen1_loss_terms_agree_with_transformers_5_where_its_code_does_the_same() -> None:
    """Under autocast both losses hold the half logits, one fp32 copy and fp32 log-probs: Qwen-1's shifted
    `.contiguous()` is the logits themselves at batch 1 (a (1, S-1, V) slice of a contiguous tensor is contiguous)
    and cross_entropy makes the fp32 copy ForCausalLMLoss's `logits.float()` makes. At batch 2 the shift is a real
    (B, S-1, V) copy in the logits' dtype; without autocast Qwen-1's log-probs stay in that dtype."""
    from memplan.predict.activations import head_saved
    from memplan.predict.weights import model_states
    from memplan.spec.train import Method, Precision

    q1, q2 = ModelSpec.from_config_dict(QWEN1), ModelSpec.from_config_dict(QWEN2)
    amp = TrainConfig(method=Method.LORA, precision=Precision.BF16, seq_len=128, lora_targets=("c_proj", "w1", "w2"))
    amp2 = amp.with_(lora_targets=("o_proj", "gate_proj", "up_proj", "down_proj"))
    h1, h2 = head_saved(Layout.of(q1, amp), batch=1, seq=128), head_saved(Layout.of(q2, amp2), batch=1, seq=128)
    assert (h1.logits_bytes, h1.upcast_bytes, h1.logprobs_bytes) == (h2.logits_bytes, h2.upcast_bytes,
                                                                      h2.logprobs_bytes)
    b1, b2 = head_saved(Layout.of(q1, amp), batch=2, seq=128), head_saved(Layout.of(q2, amp2), batch=2, seq=128)
    assert b1.upcast_bytes - b2.upcast_bytes == 2 * 128 * 4096 * 2  # the shifted bf16 copy
    pure = amp.with_(precision=Precision.PURE_BF16)
    p1 = head_saved(Layout.of(q1, pure), batch=1, seq=128)
    assert p1.logprobs_bytes == 128 * 4096 * 2 and p1.upcast_bytes == 0
    # the same adapters train: the same optimizer states
    assert model_states(Layout.of(q1, amp)).optimizer_states_bytes == \
        model_states(Layout.of(q2, amp2)).optimizer_states_bytes


def test_qwen1_errors_name_its_own_modules_and_why_the_exact_mode_cannot_build_it() -> None:
    import pytest

    from memplan.errors import ConfigError, UnsupportedModel
    from memplan.predict.estimator import estimate
    from memplan.trace.exact import exact_estimate

    spec = resolve_model("qwen-7b")
    with pytest.raises(ConfigError, match="choose from c_attn,c_proj,w1,w2 or all-linear"):
        estimate(spec, TrainConfig(lora_targets=("q_proj",)))
    # transformers 5 ships no "qwen" and memplan no remote code: one clear refusal, not transformers' own error
    with pytest.raises(UnsupportedModel, match="cannot build it here.*drop --exact"):
        exact_estimate(spec, TrainConfig(), trust_remote_code=True)
