"""The model-family table: what a transformers `model_type` builds that its config.json does not say.

One `Family` per model_type, read by ModelSpec (dimensions), the estimator's tape programs (norms, rope, masks,
softcapping, MoE), attention resolution (sdpa support) and the exact mode (remote code). Adding a family the
formulas can express is one entry here plus a tiny config in `memplan/testing/tiny.py` checked against the CPU
truth; a model_type without an entry is not analytic (the exact mode traces it). Sources: transformers 5.x
`models/<type>/modeling_<type>.py` and `configuration_<type>.py`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class Family:
    model_type: str
    analytic: bool = True  # False: only the exact mode can trace it
    architectures: tuple[str, ...] = ()  # config.json `architectures` that mean this type when model_type is absent
    qkv_bias: bool | None = None  # q/k/v Linear bias: True/False always, None: the config's attention_bias
    attention_bias_default: bool = False  # attention_bias when the config does not say (the Config class default)
    qk_norm: bool = False  # RMSNorm(head_dim) on q and k (Qwen3)
    fused_qkv: bool = False  # one qkv_proj Linear
    fused_gate_up: bool = False  # one gate_up_proj Linear, chunked
    rope_concat: bool = False  # apply_rotary_pos_emb concatenates (partial rope): a fresh (B, H, S, D) tensor
    sandwich_norms: bool = False  # Gemma2: RMSNorm after attention and after the MLP too (4 per layer), x * (1 + w)
    tied_default: bool = False  # tie_word_embeddings when the config does not say
    act: str = "silu"
    mask_types: int = 1  # attention masks built per forward (eager materialises each as (B, 1, S, S))
    moe: bool = False  # sparse MoE MLP: num_local_experts / num_experts, num_experts_per_tok
    intermediate_key: str = "intermediate_size"  # the config key that must be present for the MLP width
    sdpa: bool = True  # the transformers class accepts attn_implementation="sdpa" (`_supports_sdpa`)
    remote_code: bool = False  # the architecture lives in the repository's own code (trust_remote_code)
    sliding_window_default: int | None = None  # the Config class's sliding_window when config.json lacks it
    sliding_window_flag: str | None = None  # a config flag that must be true for the window to apply

    @property
    def norms_per_layer(self) -> int:
        return 4 if self.sandwich_norms else 2


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family(model_type="llama", architectures=("LlamaForCausalLM",)),
    # MistralConfig.sliding_window defaults to 4096
    Family(model_type="mistral", architectures=("MistralForCausalLM",), sliding_window_default=4096),
    # Qwen2Attention: q/k/v Linear(bias=True), o_proj bias=False; the window applies only with use_sliding_window
    Family(model_type="qwen2", architectures=("Qwen2ForCausalLM",), qkv_bias=True,
           sliding_window_flag="use_sliding_window"),
    Family(model_type="qwen3", qk_norm=True, sliding_window_flag="use_sliding_window"),
    # Gemma2: 4 norms/layer (x * (1 + w)), tied, two eager masks per forward (full + sliding, create_*_mask),
    # `_supports_sdpa = False` (softcapping)
    Family(model_type="gemma2", sandwich_norms=True, tied_default=True, act="gelu", mask_types=2, sdpa=False),
    # Phi3Attention.qkv_proj, Phi3MLP.gate_up_proj; apply_rotary_pos_emb concatenates the rotary part (partial rope)
    Family(model_type="phi3", fused_qkv=True, fused_gate_up=True, rope_concat=True),
    Family(model_type="mixtral", moe=True),
    Family(model_type="qwen3_moe", moe=True, qk_norm=True, intermediate_key="moe_intermediate_size",
           sliding_window_flag="use_sliding_window"),
    # GlmAttention: q/k/v bias=config.attention_bias (GlmConfig default True), o_proj none; GlmMLP.gate_up_proj
    # chunked; apply_rotary_pos_emb rotates partial_rotary_factor of head_dim and concatenates the rest
    Family(model_type="glm", attention_bias_default=True, fused_gate_up=True, rope_concat=True),
    # wqkv + wo, w1/w3/w2 (trust_remote_code)
    Family(model_type="internlm2", fused_qkv=True, remote_code=True),
    # BloomForCausalLM: ALiBi + LayerNorm, not in the formulas; `_supports_sdpa = False`
    Family(model_type="bloom", analytic=False, sdpa=False),
)}


def family_of(model_type: str) -> Family:
    """The table's entry, or a non-analytic family for a model_type the formulas do not know."""
    return FAMILIES.get(model_type) or Family(model_type=model_type, analytic=False)


def type_of_architecture(architecture: str) -> str | None:
    return next((f.model_type for f in FAMILIES.values() if architecture in f.architectures), None)
