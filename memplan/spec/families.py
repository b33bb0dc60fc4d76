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
    post_norms: bool = False  # OLMo-2: RMSNorm only after attention and after the MLP (none before), w * x in fp32
    qk_norm_full: bool = False  # OLMo-2: q_norm / k_norm over the whole projection (RMSNorm(heads * head_dim))
    tied_default: bool = False  # tie_word_embeddings when the config does not say
    act: str = "silu"
    mask_types: int = 1  # attention masks built per forward (eager materialises each as (B, 1, S, S))
    moe: bool = False  # sparse MoE MLP: num_local_experts / num_experts, num_experts_per_tok
    intermediate_key: str = "intermediate_size"  # the config key that must be present for the MLP width
    sdpa: bool = True  # the transformers class accepts attn_implementation="sdpa" (`_supports_sdpa`)
    remote_code: bool = False  # the architecture lives in the repository's own code (trust_remote_code)
    sliding_window_default: int | None = None  # the Config class's sliding_window when config.json lacks it
    sliding_window_flag: str | None = None  # a config flag that must be true for the window to apply
    # every Nth layer attends fully, the rest within the window, unless config.json lists layer_types (Gemma3:
    # sliding_window_pattern, default 6); 0: every layer windowed
    window_pattern: int = 0
    mla: bool = False  # multi-head latent attention (DeepSeek: q_lora_rank, kv_lora_rank, rope/nope split)
    auto_class: str = "AutoModelForCausalLM"  # the transformers Auto class that builds it (VL: ImageTextToText)
    # modules LLaMA-Factory freezes by default and never targets with LoRA (finetuning_args.py freeze_vision_tower
    # = True, freeze_multi_modal_projector = True): a module name containing one of these stays frozen
    frozen_modules: tuple[str, ...] = ()
    dense_prefix_key: str | None = None  # config key: how many leading layers are dense before the MoE ones
    text_model: str | None = None  # build only the text decoder: text_config as this model_type
    # Linear names peft's all-linear does not wrap although they exist: peft 0.21 remaps them to fused MoE expert
    # parameters (utils/transformers_weight_conversion.py l.402-420, via transformers conversion_mapping.py l.55-56)
    all_linear_skips: tuple[str, ...] = ()
    lora_exclude: tuple[str, ...] = ()  # Linear subclasses peft's all-linear must not wrap (they return tuples)
    limits: str = ""  # what the estimate does not model for this type, said in the note of every estimate
    # config key: the layer types repeat with this period (Qwen3.5: full_attention_interval, 3 linear-attention
    # layers then a full one); the exact mode traces whole periods so the line through them is the model's
    layer_period_key: str | None = None
    layer_period_default: int = 1  # the period when the config lacks that key (Llama 4: no_rope_layer_interval 4)
    layer_norm: bool = False  # nn.LayerNorm (weight and bias) in place of RMSNorm (StarCoder2)
    gated_mlp: bool = True  # False: one up projection, the activation, one down projection (c_fc, c_proj)
    bias_key: str = "attention_bias"  # the config key of the q/k/v biases (StarCoder2: use_bias)
    out_bias: bool = False  # the same bias on o_proj and the MLP's Linears too (StarCoder2's use_bias)
    # config keys of the dropout probabilities the model applies in training (model.train()): after the embedding,
    # after o_proj and after the MLP (the residual branches), inside attention on the probabilities
    dropout_keys: tuple[str, str, str] | None = None
    # DeepSeek MoE layers: a dense MLP of moe_intermediate_size x n_shared_experts beside the routed experts
    shared_experts_key: str | None = None
    # the MoE router: "softmax" (Mixtral: softmax(logits.float()) then top-k), "sigmoid" (DeepSeek-V3: an fp32
    # weight, sigmoid scores, the chosen ones gathered and renormalised)
    router: str = "softmax"
    rope_complex: bool = False  # DeepSeek-V2's apply_rotary_emb: complex freqs_cis, outputs `type_as` the input
    # saving a full / freeze checkpoint (save_pretrained) reverts transformers 5's fused MoE expert parameters to
    # the checkpoint's per-expert layout first, for the whole state dict at once (modeling_utils.py l.3539-3540
    # revert_weight_conversion): Concatenate(dim=1)'s reverse is Chunk(dim=1), whose `chunk.contiguous()`
    # (core_model_loading.py l.134, l.228-229) copies each layer's gate_up_proj (conversion_mapping.py l.1359-1371
    # mixtral, l.1386-1394 qwen2_moe, which qwen3_moe / deepseek_v2 / deepseek_v3 / qwen3_5_moe_text use, l.26-38)
    save_copies_gate_up: bool = False
    vision: str = ""  # the vision tower whose parameters ModelSpec.vision_params counts (frozen, never trained)
    # position ids (3, B, S) and cos/sin (B, S, rotary_dim) per forward: the multimodal RoPE (Qwen-VL) makes them
    # per sample, not (1, S, rotary_dim) as LlamaRotaryEmbedding does (predict.estimator._rope_bytes). "sections":
    # the frequencies split by mrope_section, which must sum to head_dim / 2 (Qwen2VLRotaryEmbedding
    # .recomposition_frequencies, modeling_qwen2_vl.py l.142); "interleaved": Qwen3-VL's strided assignment (l.410-419)
    mrope: str = ""
    # a composite VL config forwards text_config's tie_word_embeddings to the outer config (Qwen2-VL / 2.5-VL BC:
    # configuration_qwen2_vl.py l.184-188); Qwen3-VL ties only by the outer key (Qwen3VLConfig l.140, default false)
    tie_from_text: bool = False
    sliding: bool = True  # False: the decoder never windows attention, whatever config.json's sliding_window says
    # peft 0.21's all-linear also wraps an MoE's router and 3D expert parameters, through its v4 -> v5 target remap
    # keyed by model_type (peft utils/transformers_weight_conversion.py _convert_peft_config_moe l.402-420, via
    # transformers conversion_mapping.py _MODEL_TO_CONVERSION_PATTERN); False: a type not in that table
    lora_wraps_experts: bool = True
    # Qwen3.5: layer_types mix Gated DeltaNet layers (activations.gated_deltanet) with full attention whose q_proj
    # also makes a sigmoid output gate (Qwen3_5Attention l.742-815); decoder dims read from text_config
    linear_attention: bool = False
    # Qwen3_5RMSNorm (l.835-852): `x.float()` normalised, times (1 + weight.float()), cast back (Gemma's norm)
    zero_centered_norms: bool = False
    # Qwen3.5-MoE: one shared expert of shared_expert_intermediate_size (shared_experts_key) scaled by
    # sigmoid(shared_expert_gate(x)), a Linear(hidden, 1) (Qwen3_5MoeSparseMoeBlock l.913-933)
    shared_expert_gate: bool = False
    # GptOssRMSNorm (modeling_gpt_oss.py l.53-60): `(self.weight * hidden_states).to(input_dtype)`, the weight times
    # the fp32 normalised input (OLMo-2's and Gemma's order), not Llama's `weight * hidden_states.to(input_dtype)`
    norm_mul_fp32: bool = False
    # learned attention sinks (GptOssAttention.sinks, one per head, l.263): eager_attention_forward (l.205-227)
    # concatenates them to the masked scores as one more key column, (B, H, S, S + 1), before the softmax
    attention_sinks: bool = False
    # the rotary cos/sin are (1, S, rotary_dim / 2): GptOssRotaryEmbedding.forward (l.174-180) takes `emb = freqs`
    # without Llama's cat((freqs, freqs)); _apply_rotary_emb (l.195-203) rotates the two halves
    rope_half: bool = False
    # the MoE block: "" (Mixtral's: a bias-free router Linear, softmax, then top-k; SwiGLU experts), "gpt_oss"
    # (GptOssMLP l.131-145: a router with a bias, top-k of the logits then softmax over the k; GptOssExperts with
    # biases and a clamped SwiGLU, `_apply_gate` l.79-85), "llama4" (modeling_llama4.py Llama4TextMoe l.156-175:
    # a sigmoid router, every expert on every token through torch.bmm, which autocasts; a shared expert)
    moe_block: str = ""
    # Llama 4's text attention (modeling_llama4.py Llama4TextAttention.forward l.341-372): the layers listed 1 in
    # no_rope_layers (default: all but every no_rope_layer_interval-th, configuration_llama4.py l.168-172) rotate q/k
    # and L2-normalise them (Llama4TextL2Norm l.106-118, use_qk_norm, no weight); the others (NoPE) scale q by the
    # attn_temperature_tuning factor instead
    nope_layers: bool = False
    # the shared expert's Linears: their module prefix, and whether peft's all-linear adapts them (it does where
    # peft remaps nothing: Llama 4's Llama4TextMLP shared_expert; DeepSeek's all-linear maps gate/up/down onto the
    # fused routed experts, Family.all_linear_skips)
    shared_prefix: str = "shared_experts."
    shared_in_all_linear: bool = False
    # the architecture's own nn.Linear names for the roles the formulas use (qkv_proj, o_proj, gate_proj, up_proj,
    # down_proj): LoRA targets name the real modules and are mapped onto the roles, one name filling every role it
    # has (Qwen-1's c_proj is both the attention's output and the MLP's down projection, as peft's suffix match)
    module_names: tuple[tuple[str, str], ...] = ()
    mlp_width_divisor: int = 1  # the config's intermediate_size over the MLP's width (QWenMLP: // 2)
    # Qwen-1's rotary (modeling_qwen.py RotaryEmbedding l.1272-1313, apply_rotary_pos_emb l.1324-1346): fp32 cos/sin
    # cached as module state for max(2 S, 16) positions, (1, 2S, 1, D) each, kept across steps; q and k rotated as
    # `t.float()` copies and cast back `.type_as(t)` (the input's dtype, whatever the stream's); the products save
    # only cos / sin views
    rope_fp32_cache: bool = False
    # the attention gives sdpa an explicit causal mask, torch.tril of a (S, S) bool made in each layer (QWenAttention
    # .forward l.500-531), never is_causal; flash-attn (Attention.FLASH_ATTENTION_2) takes none
    sdpa_causal_mask: bool = False
    # the model computes its own loss as transformers 4 models did (QWenLMHeadModel.forward l.1063-1070):
    # `lm_logits[..., :-1, :].contiguous()`, a (B, S-1, V) copy in the logits' dtype (the logits themselves at
    # batch 1), then CrossEntropyLoss on it: under autocast an fp32 copy and fp32 log-probs (measured on CPU; on
    # CUDA log_softmax(dtype=float32) converts a bf16 input first, SoftMax.cpp: not checked on a GPU), without it
    # log-probs in the logits' dtype; not transformers 5's ForCausalLMLoss `logits.float()`
    shifted_loss: bool = False
    # buffers each attention layer registers, in the load dtype: Qwen-1's masked_bias (a scalar) and logn_tensor,
    # (1, 32767, 1, 1) made by torch.tensor of a Python list (modeling_qwen.py l.251, l.289-294)
    layer_buffer_elems: int = 0

    def roles(self, names: tuple[str, ...]) -> tuple[str, ...]:
        """LoRA target names as the formulas' roles (module_names): a real module name becomes every role it
        fills; others stay as they are."""
        table = self.module_names
        return tuple(r for n in names for r in ([role for role, real in table if real == n] or [n]))

    @property
    def norm_tensors(self) -> int:
        """Parameters of one norm, each (hidden,): RMSNorm's weight, LayerNorm's weight and bias."""
        return 2 if self.layer_norm else 1

    @property
    def norms_per_layer(self) -> int:
        """Norm parameter tensors of one decoder layer, each (hidden,)."""
        return (4 if self.sandwich_norms else 2) * self.norm_tensors


_VL_LIMITS = ("text-only inputs: image/video tokens (image_max_pixels) are not costed; the vision tower and "
              "projector are frozen (LLaMA-Factory's freeze_vision_tower / freeze_multi_modal_projector defaults) "
              "and only their weights are counted")
# the Qwen-VL towers whose image forward is costed (memplan.spec.visual, memplan.predict.vision): text-only until
# images are given; videos and a trained tower are not modelled
_VL_IMAGES = ("text-only inputs unless images are given (--images N, or a LLaMA-Factory Qwen-VL template and "
              "dataset); videos are not costed; the vision tower and projector are frozen (LLaMA-Factory's "
              "freeze_vision_tower / freeze_multi_modal_projector defaults)")

# the linear-attention layers as torch's fallbacks run them (CPU, or a GPU without the kernels): the analytic tape
# (activations.gated_deltanet) and the exact trace alike; transformers runs the fla / causal-conv1d kernels on a GPU
# where they are installed, whose saved tensors differ
_GDN_LIMITS = ("; linear-attention layers costed as torch's chunked gated-delta-rule fallback runs them (a GPU with "
               "fla / causal-conv1d installed runs other kernels: not checked)")

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
    # Gemma3 text (modeling_gemma3.py): Gemma2's 4 norms x * (1 + w) (Gemma3RMSNorm, l.119-131; Gemma3DecoderLayer
    # l.362-371), q_norm/k_norm Gemma3RMSNorm(head_dim) (l.310), tied (Gemma3TextConfig l.88), gelu_pytorch_tanh
    # (l.80); layer_types sliding except every 6th (configuration_gemma3.py l.105-110); sdpa supported (l.413)
    # with a full and a sliding mask per forward (l.527); no softcapping by default
    Family(model_type="gemma3_text", architectures=("Gemma3ForCausalLM",), sandwich_norms=True, qk_norm=True,
           tied_default=True, act="gelu", mask_types=2, window_pattern=6),
    Family(model_type="mixtral", moe=True, save_copies_gate_up=True),
    Family(model_type="qwen3_moe", moe=True, save_copies_gate_up=True, qk_norm=True,
           intermediate_key="moe_intermediate_size",
           sliding_window_flag="use_sliding_window"),
    # GlmAttention: q/k/v bias=config.attention_bias (GlmConfig default True), o_proj none; GlmMLP.gate_up_proj
    # chunked; apply_rotary_pos_emb rotates partial_rotary_factor of head_dim and concatenates the rest
    Family(model_type="glm", attention_bias_default=True, fused_gate_up=True, rope_concat=True),
    # Starcoder2 (modeling_starcoder2.py): llama's attention with rope, q/k/v/o Linear(bias=config.use_bias)
    # (l.153-156); nn.LayerNorm input / post-attention norms (l.212-213) and final norm (l.323); Starcoder2MLP
    # c_fc -> gelu_pytorch_tanh -> c_proj, bias=use_bias (l.57-66); dropout after the embedding (l.368),
    # after o_proj (l.199) and the MLP (l.66), attention_dropout on the probabilities (l.191); the sliding
    # window when sliding_window is set (l.358). Starcoder2Config: use_bias True, tie_word_embeddings True
    Family(model_type="starcoder2", architectures=("Starcoder2ForCausalLM",), layer_norm=True, gated_mlp=False,
           act="gelu", bias_key="use_bias", attention_bias_default=True, out_bias=True, tied_default=True,
           dropout_keys=("embedding_dropout", "residual_dropout", "attention_dropout")),
    # wqkv + wo, w1/w3/w2 (trust_remote_code)
    Family(model_type="internlm2", fused_qkv=True, remote_code=True),
    # Qwen-1 (QWenLMHeadModel, trust_remote_code; Qwen/Qwen-7B modeling_qwen.py / configuration_qwen.py, the
    # revision with flash_attn_func and the sdpa path): QWenAttention.c_attn = Linear(h, 3 h) with its bias always
    # (l.269), c_proj Linear(h, h, bias=not no_bias) (l.271-273); QWenMLP w1, w2 Linear(h, intermediate_size // 2),
    # `c_proj(w1(x) * silu(w2(x)))` (l.558-575): w2 is the gate; RMSNorm ln_1 / ln_2 / ln_f as LlamaRMSNorm in the
    # torch path (l.1349-1363: `_norm(x.float()).type_as(x) * weight`); lm_head untied. Modelled: its torch path
    # with sdpa (an explicit mask) or flash_attn_func (Attention.FLASH_ATTENTION_2, l.182-192); flash-attn's fused
    # rotary and rms_norm kernels (used on CUDA when their extensions are installed) are not
    Family(model_type="qwen", architectures=("QWenLMHeadModel",), fused_qkv=True, qkv_bias=True, remote_code=True,
           module_names=(("qkv_proj", "c_attn"), ("o_proj", "c_proj"), ("gate_proj", "w2"), ("up_proj", "w1"),
                         ("down_proj", "c_proj")),
           mlp_width_divisor=2, rope_fp32_cache=True, sdpa_causal_mask=True, shifted_loss=True,
           layer_buffer_elems=1 + 32767,
           limits="Qwen-1's own kernels on CUDA (flash-attn's rotary and rms_norm extensions) costed as its torch "
                  "path; no_bias false (biases on c_proj / the MLP) is not modelled"),
    # BloomForCausalLM: ALiBi + LayerNorm, not in the formulas; `_supports_sdpa = False`
    Family(model_type="bloom", analytic=False, sdpa=False),
    # ---- exact mode only: structures the tape programs do not have --------------------------------------------
    # Olmo2 (modeling_olmo2.py): q_norm / k_norm = Olmo2RMSNorm(heads * head_dim) on the projections (l.213-229),
    # post_attention / post_feedforward norms only (l.285-316), Olmo2RMSNorm multiplies in fp32 then casts (l.60-65)
    Family(model_type="olmo2", architectures=("Olmo2ForCausalLM",), qk_norm=True, qk_norm_full=True,
           post_norms=True),
    Family(model_type="gpt_bigcode", analytic=False),  # multi-query attention, fused c_attn, LayerNorm, GELU
    # DeepseekV2 (modeling_deepseek_v2.py): V3's MLA (DeepseekV2Attention l.290-420) but rope by apply_rotary_emb
    # (l.259-272: view_as_complex of a float copy, times the complex freqs_cis made once per forward by
    # DeepseekV2RotaryEmbedding l.214-219, `.type_as(xq)`); a dense MLP while layer_idx < first_k_dense_replace
    # (l.428), else DeepseekV2Moe (l.120-137): DeepseekV2TopkRouter (l.86-117: fp32 weight, `F.linear(h.float(),
    # w.float())`, softmax fp32, greedy or group-limited top-k, x routed_scaling_factor; no renormalisation), the
    # grouped_mm DeepseekV2Experts (@use_experts_implementation, l.46-83), shared experts
    Family(model_type="deepseek_v2", moe=True, mla=True, dense_prefix_key="first_k_dense_replace",
           save_copies_gate_up=True,
           all_linear_skips=("gate_proj", "up_proj", "down_proj"), shared_experts_key="n_shared_experts",
           router="softmax_fp32", rope_complex=True,
           limits="MoE layers costed with the routed rows as a whole (tokens x num_experts_per_tok, whatever the "
                  "routing balance: the grouped_mm experts); QLoRA / freeze of the mixed dense + MoE layers not "
                  "checked against the exact trace"),
    # DeepseekV3Attention (modeling_deepseek_v3.py l.349-481): MLA in the formulas (activations.mla_attention);
    # DeepseekV3DecoderLayer (l.486-500): a DeepseekV3MLP(intermediate_size) while layer_idx < first_k_dense_replace,
    # else DeepseekV3MoE (l.201-222): the DeepseekV3TopkRouter (l.120-158: fp32 weight kept by
    # _keep_in_fp32_modules_strict l.551, sigmoid scores, grouped top-k on the scores + e_score_correction_bias, a
    # buffer), the fused DeepseekV3Experts (l.162-198, @use_experts_implementation: grouped_mm) and a shared
    # DeepseekV3MLP(moe_intermediate_size x n_shared_experts) on the layer's input
    Family(model_type="deepseek_v3", moe=True, mla=True, dense_prefix_key="first_k_dense_replace",
           save_copies_gate_up=True,
           all_linear_skips=("gate_proj", "up_proj", "down_proj"), shared_experts_key="n_shared_experts",
           router="sigmoid",
           limits="MoE layers costed with the routed rows as a whole (tokens x num_experts_per_tok, whatever the "
                  "routing balance: the grouped_mm experts); QLoRA / freeze of the mixed dense + MoE layers not "
                  "checked against the exact trace"),
    # gpt-oss (modeling_gpt_oss.py): q/k/v/o Linear(bias=attention_bias, GptOssConfig default True, l.246-257);
    # attention sinks; alternating sliding / full layer_types (configuration_gpt_oss.py l.84-87): two eager
    # masks per forward (GptOssModel.forward l.463-466); `_supports_sdpa = False` (l.379): eager on CPU and where
    # no flash kernel is installed; GptOssMLP (l.131-145); the final and layer norms GptOssRMSNorm. The experts'
    # LoRA: none (lora_wraps_experts); the router is no nn.Linear (GptOssTopKRouter, l.115-128), so never adapted
    Family(model_type="gpt_oss", moe=True, sdpa=False, attention_bias_default=True, out_bias=True, mask_types=2,
           norm_mul_fp32=True, attention_sinks=True, rope_half=True, moe_block="gpt_oss", lora_wraps_experts=False,
           limits="eager attention (transformers 5.24 has no sdpa for the sinks; a flash-attention kernel from the "
                  "hub saves far less); MoE layers costed with the routed rows as a whole (tokens x "
                  "num_experts_per_tok, whatever the routing: the grouped_mm experts)"),
    # vision-language models: the text decoder on text-only inputs, the vision tower's weights counted (frozen)
    # Qwen2.5-VL on text (modeling_qwen2_5_vl.py): Qwen2_5_VLTextModel is a qwen2 decoder, q/k/v bias (l.625-628);
    # with no image the position ids are arange(S).view(1, 1, -1).expand(3, B, -1) (l.803-804), one int64 (S)
    # storage; Qwen2_5_VLRotaryEmbedding (l.530-546) gives cos/sin (B, S, head_dim) in the stream dtype
    Family(model_type="qwen2_5_vl", auto_class="AutoModelForImageTextToText", qkv_bias=True,
           sliding_window_flag="use_sliding_window", frozen_modules=("visual.",), vision="qwen2_5_vl", mrope="sections",
           tie_from_text=True, limits=_VL_IMAGES),
    # Qwen2-VL (modeling_qwen2_vl.py): Qwen2VLTextModel is Qwen2.5-VL's decoder (q/k/v bias, o_proj none,
    # l.504-507; text-only position ids arange(S).view(1, 1, -1).expand(3, B, -1), l.766-767; Qwen2VLRotaryEmbedding
    # cos/sin (B, S, head_dim), l.88-136), its window only with use_sliding_window; the ViT of
    # memplan.spec.vision._qwen2_vl, visual.* frozen (LLaMA-Factory _register_composite_model("qwen2_vl"))
    Family(model_type="qwen2_vl", architectures=("Qwen2VLForConditionalGeneration",),
           auto_class="AutoModelForImageTextToText", qkv_bias=True, sliding_window_flag="use_sliding_window",
           frozen_modules=("visual.",), vision="qwen2_vl", mrope="sections", tie_from_text=True, limits=_VL_IMAGES),
    # Qwen3-VL on text (modeling_qwen3_vl.py): Qwen3VLTextModel, the decoder dims nested in text_config, is a qwen3
    # decoder (q_norm / k_norm RMSNorm(head_dim) before the transpose, l.496-511; no bias by default) with
    # create_causal_mask only (no window, l.801); position ids arange(S).view(1, 1, -1).expand(4, B, -1) (l.790-791),
    # one int64 (S) storage; Qwen3VLTextRotaryEmbedding (l.358-419) returns the interleaved-mrope cos/sin (B, S,
    # head_dim) in the stream dtype. Deepstack visual embeds are added only when an image is given (l.827)
    Family(model_type="qwen3_vl", architectures=("Qwen3VLForConditionalGeneration",),
           auto_class="AutoModelForImageTextToText", qk_norm=True, sliding=False, frozen_modules=("visual.",),
           vision="qwen3_vl", mrope="interleaved", limits=_VL_IMAGES),
    # Qwen3-VL-MoE (modeling_qwen3_vl_moe.py): Qwen3-VL's tower and deepstack mergers, a qwen3_moe text decoder:
    # Qwen3VLMoeTextSparseMoeBlock (l.172-183) = Qwen3VLMoeTextTopKRouter (l.153-169: a (E, H) weight, softmax fp32,
    # top-k renormalised) + the grouped_mm Qwen3VLMoeTextExperts (fused 3D gate_up_proj / down_proj, l.114-151);
    # Qwen3VLMoeTextConfig sets sliding_window None (configuration_qwen3_vl_moe.py l.116). Its model_type is not in
    # transformers' qwen2_moe conversion family (conversion_mapping.py l.1450-1461: a check_dims Transpose, which
    # returns the parameter itself when the shapes agree, core_model_loading.py l.372-375, so saving copies
    # nothing), hence peft's all-linear wraps only the attention Linears (a built tiny model: no router or expert
    # adapters)
    Family(model_type="qwen3_vl_moe", architectures=("Qwen3VLMoeForConditionalGeneration",), moe=True,
           intermediate_key="moe_intermediate_size", lora_wraps_experts=False,
           auto_class="AutoModelForImageTextToText", qk_norm=True, sliding=False, frozen_modules=("visual.",),
           vision="qwen3_vl", mrope="interleaved", limits=_VL_IMAGES),
    # Qwen3.5 (modeling_qwen3_5.py / modeling_qwen3_5_moe.py): layer_types alternate Gated DeltaNet linear
    # attention (Qwen3_5GatedDeltaNet, l.500-656: in_proj_qkv -> causal conv1d + silu -> the chunked gated delta rule,
    # on CPU torch's fallback torch_chunk_gated_delta_rule, l.287-426; a gated RMSNorm, out_proj) with gated full
    # attention every full_attention_interval-th layer (q_norm / k_norm zero-centred, partial rope, o_proj on
    # attn * sigmoid(gate)); M-RoPE cos/sin (B, S, rotary_dim) per forward (l.182-201); MoE: the qwen3_moe softmax
    # router and grouped_mm experts plus a gated shared expert; the vision tower visual.* frozen (LLaMA-Factory
    # _register_composite_model("qwen3_5"))
    Family(model_type="qwen3_5", auto_class="AutoModelForImageTextToText", qk_norm=True, rope_concat=True,
           frozen_modules=("visual.",), layer_period_key="full_attention_interval", vision="qwen3_5",
           mrope="interleaved", linear_attention=True, zero_centered_norms=True, limits=_VL_LIMITS + _GDN_LIMITS),
    Family(model_type="qwen3_5_moe", moe=True, save_copies_gate_up=True, qk_norm=True, rope_concat=True,
           intermediate_key="moe_intermediate_size", shared_experts_key="shared_expert_intermediate_size",
           shared_expert_gate=True, lora_wraps_experts=False, auto_class="AutoModelForImageTextToText",
           frozen_modules=("visual.",),
           layer_period_key="full_attention_interval", vision="qwen3_5", mrope="interleaved", linear_attention=True,
           zero_centered_norms=True, limits=_VL_LIMITS + _GDN_LIMITS),
    Family(model_type="gemma3", analytic=False, auto_class="AutoModelForImageTextToText",
           frozen_modules=("vision_tower.", "multi_modal_projector."), limits=_VL_LIMITS),
    # Llama 4 (modeling_llama4.py): transformers 5.24's Llama4ForConditionalGeneration.forward cannot train on text
    # (it reads `outputs.image_outputs` of the language model's output, which has none: l.1318), so the text decoder
    # is built alone from text_config, Llama4ForCausalLM. MoE with a shared expert, chunked attention and NoPE
    # layers (no_rope_layers, l.318); Llama4Router is an nn.Linear returning a tuple (l.141-152), which peft's LoRA
    # forward cannot wrap (it reads result.dtype): the router is left out of all-linear
    Family(model_type="llama4", analytic=False, text_model="llama4_text"),
    # Llama4TextDecoderLayer (l.394-443): Llama4TextMoe (l.156-175) on every interleave_moe_layer_step-th layer
    # (step 1 here: a step > 1 or an explicit moe_layers list interleaves dense MLPs, traced by the exact mode);
    # the rope is DeepSeek-V2's complex one (apply_rotary_emb l.225-234: xq.float(), a complex freqs_cis, `.type_as`);
    # sdpa is supported (l.451), chunked attention (attention_chunk_size) on the rope layers
    Family(model_type="llama4_text", moe=True, lora_exclude=("feed_forward.router",), rope_complex=True,
           nope_layers=True, moe_block="llama4", lora_wraps_experts=False, shared_prefix="shared_expert.",
           layer_period_key="no_rope_layer_interval", layer_period_default=4,
           shared_in_all_linear=True,
           limits="the text decoder only: the vision tower and projector are not counted (the shipped config has "
                  "no vision_config) and image tokens are not costed; every expert runs on every token (Llama4TextMoe "
                  "repeats the tokens num_local_experts times, the sigmoid scores zero the unrouted ones)"),
)}


def family_of(model_type: str) -> Family:
    """The table's entry, or a non-analytic family for a model_type the formulas do not know."""
    return FAMILIES.get(model_type) or Family(model_type=model_type, analytic=False)


def type_of_architecture(architecture: str) -> str | None:
    return next((f.model_type for f in FAMILIES.values() if architecture in f.architectures), None)
