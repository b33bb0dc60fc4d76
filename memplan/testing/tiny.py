"""Small real model configs of several architectures, for CPU ground truth in tests and benchmarks.

Sized so that activations, logits and weights all matter (as they do for a 7B model at long sequence), while one
measured reference step stays under a second on two CPU cores.
"""

from __future__ import annotations

from memplan.spec.model import ModelSpec

_BASE = dict(hidden_size=256, intermediate_size=704, num_attention_heads=8, num_key_value_heads=4,
             num_hidden_layers=3, vocab_size=4096, max_position_embeddings=4096, rms_norm_eps=1e-5)

_QWEN3_VL_TEXT = dict(**_BASE, head_dim=32,
                      rope_scaling={"rope_type": "default", "mrope_interleaved": True, "mrope_section": [6, 5, 5]})
_QWEN3_VL_VISION = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=256,
                        patch_size=16, num_position_embeddings=64, deepstack_visual_indexes=[0])
_QWEN35_TEXT = dict(**{**_BASE, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2},
                    head_dim=64, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=32,
                    linear_value_head_dim=48, linear_conv_kernel_dim=4, full_attention_interval=4,
                    layer_types=["linear_attention"] * 3 + ["full_attention"],
                    rope_parameters=dict(rope_type="default", rope_theta=10000000, partial_rotary_factor=0.25,
                                         mrope_interleaved=True, mrope_section=[4, 2, 2]))
_QWEN35_VISION = dict(depth=1, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=256, patch_size=16,
                      spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                      deepstack_visual_indexes=[])

TINY_CONFIGS: dict[str, dict] = {
    "llama": dict(model_type="llama", **_BASE),
    "mistral": dict(model_type="mistral", **{**_BASE, "num_key_value_heads": 2}, sliding_window=None),
    "qwen2": dict(model_type="qwen2", **_BASE, tie_word_embeddings=True),
    "gemma2": dict(model_type="gemma2", **{**_BASE, "num_attention_heads": 4, "num_key_value_heads": 2},
                   head_dim=64, attn_logit_softcapping=50.0, final_logit_softcapping=30.0, query_pre_attn_scalar=64,
                   sliding_window=4096, hidden_activation="gelu_pytorch_tanh"),
    "phi3": dict(model_type="phi3", **{**_BASE, "num_key_value_heads": 8}, pad_token_id=0, bos_token_id=1,
                 eos_token_id=2, sliding_window=None),
    "qwen3": dict(model_type="qwen3", **_BASE, head_dim=32, tie_word_embeddings=True),
    # a sliding window shorter than the sequences tested: sdpa then takes an explicit mask
    "mistral-sw": dict(model_type="mistral", **{**_BASE, "num_key_value_heads": 2}, sliding_window=64),
    "mixtral": dict(model_type="mixtral", **{**_BASE, "intermediate_size": 352}, num_local_experts=4,
                    num_experts_per_tok=2, sliding_window=None),
    # GLM-4 (model_type glm): q/k/v biases by default, fused gate_up, half-rotary rope
    # Gemma3 text: sandwich + q/k Gemma norms, a window of 64 on 2 of every 3 layers (tests run longer sequences)
    "gemma3_text": dict(model_type="gemma3_text", **{**_BASE, "num_attention_heads": 4, "num_key_value_heads": 2},
                        head_dim=64, query_pre_attn_scalar=64, sliding_window=64, sliding_window_pattern=3,
                        hidden_activation="gelu_pytorch_tanh"),
    # DeepSeek-V3 MLA (q LoRA 96, latent 64, rope 16 + nope 32 per head, v 32), every layer dense: analytic
    "deepseek_v3": dict(model_type="deepseek_v3", **{**_BASE, "num_key_value_heads": 8}, q_lora_rank=96,
                        kv_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32,
                        first_k_dense_replace=3),
    # DeepSeek-V3 with MoE layers: one dense layer, then two MoE ones (4 routed experts of width 128, top-2, sigmoid
    # router, one shared expert); "deepseek_v3-moe-noq": q_proj directly (V2-Lite's q_lora_rank null), 2 shared
    # experts, every layer MoE
    "deepseek_v3-moe": dict(model_type="deepseek_v3", **{**_BASE, "num_key_value_heads": 8}, q_lora_rank=96,
                            kv_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32,
                            first_k_dense_replace=1, moe_intermediate_size=128, n_routed_experts=4,
                            num_experts_per_tok=2, n_shared_experts=1, n_group=1, topk_group=1),
    "deepseek_v3-moe-noq": dict(model_type="deepseek_v3", **{**_BASE, "num_key_value_heads": 8}, q_lora_rank=None,
                                kv_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32,
                                first_k_dense_replace=0, moe_intermediate_size=128, n_routed_experts=4,
                                num_experts_per_tok=2, n_shared_experts=2, n_group=2, topk_group=1),
    # DeepSeek-V2: V3's MLA with a complex rope, a softmax router (greedy top-2 of 4, no renormalisation); V2-Lite's
    # shape: no q LoRA, one dense layer then MoE ones with 2 shared experts
    "deepseek_v2": dict(model_type="deepseek_v2", **{**_BASE, "num_key_value_heads": 8}, q_lora_rank=None,
                        kv_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32,
                        first_k_dense_replace=1, moe_intermediate_size=128, n_routed_experts=4, num_experts_per_tok=2,
                        n_shared_experts=2, n_group=1, topk_group=1, topk_method="greedy", norm_topk_prob=False),
    # OLMo-2: post-norms only, q/k norms over the whole projections
    "olmo2": dict(model_type="olmo2", **_BASE, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    # StarCoder2: LayerNorm, c_fc/c_proj GELU MLP, biases everywhere, tied; "starcoder2-drop" adds its dropouts
    "starcoder2": dict(model_type="starcoder2", **_BASE, hidden_act="gelu_pytorch_tanh", norm_epsilon=1e-5),
    "starcoder2-drop": dict(model_type="starcoder2", **_BASE, hidden_act="gelu_pytorch_tanh", norm_epsilon=1e-5,
                            embedding_dropout=0.1, residual_dropout=0.1, attention_dropout=0.1),
    "glm": dict(model_type="glm", **_BASE, head_dim=32, partial_rotary_factor=0.5, pad_token_id=0, eos_token_id=2),
    # Qwen2.5-VL on text: a qwen2 decoder with M-RoPE (sections 4/6/6 of head_dim / 2 = 16) and a small frozen
    # vision tower (2 blocks, h64) whose weights count
    "qwen2_5_vl": dict(model_type="qwen2_5_vl", architectures=["Qwen2_5_VLForConditionalGeneration"], **_BASE,
                       tie_word_embeddings=True, rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]},
                       vision_config=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2,
                                          out_hidden_size=256, fullatt_block_indexes=[1])),
    # Qwen2-VL on text: the same qwen2 decoder with M-RoPE, its own ViT (2 LayerNorm blocks, width 64, mlp_ratio 2)
    "qwen2_vl": dict(model_type="qwen2_vl", architectures=["Qwen2VLForConditionalGeneration"], **_BASE,
                     tie_word_embeddings=True, rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]},
                     vision_config=dict(depth=2, embed_dim=64, hidden_size=256, num_heads=2, mlp_ratio=2)),
    # Qwen3-VL on text: the decoder nested in text_config (qwen3: q/k norms, head_dim 32), interleaved M-RoPE
    # (sections 6/5/5 of head_dim / 2), a small tower with one deepstack merger; "qwen3_vl_moe": 4 experts of width
    # 128, top-2, an untied LM head
    "qwen3_vl": dict(model_type="qwen3_vl", architectures=["Qwen3VLForConditionalGeneration"],
                     tie_word_embeddings=True, text_config=_QWEN3_VL_TEXT, vision_config=_QWEN3_VL_VISION),
    "qwen3_vl_moe": dict(model_type="qwen3_vl_moe", architectures=["Qwen3VLMoeForConditionalGeneration"],
                         tie_word_embeddings=False, vision_config=_QWEN3_VL_VISION,
                         text_config={**_QWEN3_VL_TEXT, "intermediate_size": 352, "moe_intermediate_size": 128,
                                      "num_experts": 4, "num_experts_per_tok": 2}),
    # Qwen3.5 (composite config, decoder dims in text_config): 3 Gated DeltaNet layers (2 key / 4 value heads of
    # 32 / 48: repeat_interleave to the value heads) then one gated full-attention layer (4 q / 2 kv heads of 64,
    # partial rope 0.25), a small frozen vision tower; "qwen3_5_moe": 4 experts of 128, top-2, a gated shared expert
    "qwen3_5": dict(model_type="qwen3_5", architectures=["Qwen3_5ForConditionalGeneration"],
                    tie_word_embeddings=False, text_config=dict(model_type="qwen3_5_text", **_QWEN35_TEXT),
                    vision_config=_QWEN35_VISION),
    "qwen3_5_moe": dict(model_type="qwen3_5_moe", architectures=["Qwen3_5MoeForConditionalGeneration"],
                        tie_word_embeddings=False,
                        text_config=dict(model_type="qwen3_5_moe_text", **{**_QWEN35_TEXT, "intermediate_size": None},
                                         num_experts=4, num_experts_per_tok=2, moe_intermediate_size=128,
                                         shared_expert_intermediate_size=128),
                        vision_config=_QWEN35_VISION),
    # gpt-oss: 4 experts of width 128 with biases, top-2, attention sinks, q/k/v/o biases, layers sliding (64) /
    # full / sliding; yarn rope (GptOssConfig's default rope_parameters)
    "gpt_oss": dict(model_type="gpt_oss", **{**_BASE, "intermediate_size": 128}, head_dim=32, num_local_experts=4,
                    num_experts_per_tok=2, sliding_window=64),
    # Llama 4 text (Scout's shape): every layer MoE (4 experts of width 128, top-1, a shared expert), layer 3 NoPE
    # (no_rope_layer_interval 4), rope layers L2-normalised, chunks of 8192 (no mask at the tested lengths)
    "llama4_text": dict(model_type="llama4_text", **{**_BASE, "intermediate_size": 128, "num_hidden_layers": 4},
                        head_dim=32, intermediate_size_mlp=352, num_local_experts=4, num_experts_per_tok=1),
}

# a smaller llama (hidden 128, 2 layers, vocab 2048) for tests that run many real probe steps (probe, tune, scale)
SMALL_LLAMA: dict = dict(model_type="llama", hidden_size=128, intermediate_size=352, num_attention_heads=4,
                         num_key_value_heads=2, num_hidden_layers=2, vocab_size=2048)


def tiny_spec(arch: str) -> ModelSpec:
    return ModelSpec.from_config_dict(dict(TINY_CONFIGS[arch]), name=f"tiny-{arch}")
