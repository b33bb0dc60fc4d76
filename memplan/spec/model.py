"""ModelSpec: the torch-free dimensions of a decoder LLM, from the shipped catalog, a local config.json or the hub.

Derived fields (head_dim, biases, tying, the sliding window) follow what transformers builds for each model_type;
the per-family facts are in `memplan.spec.families.FAMILIES`, each with its source.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memplan.errors import ConfigError, UnsupportedModel
from memplan.spec.families import FAMILIES, Family, family_of, type_of_architecture
from memplan.spec.prequantized import PackedQuant, packed_from_config, storage_note
from memplan.spec.vision import vision_params, vision_tensors

CATALOG_DIR = Path(__file__).parent / "catalog"

@dataclass(frozen=True, slots=True, kw_only=True)
class Linear:
    """One nn.Linear of a decoder layer: module name (as peft targets it), shape, bias."""

    name: str
    in_features: int
    out_features: int
    bias: bool = False

    @property
    def params(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias else 0)


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelSpec:
    """Dimensions of a decoder-only causal LM; `config` keeps the raw config.json for the exact mode."""

    name: str
    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    family: Family  # what the model_type builds beyond the config (memplan.spec.families)
    qkv_bias: bool = False
    out_bias: bool = False  # o_proj and the MLP's Linears have biases too (StarCoder2 use_bias)
    embedding_dropout: float = 0.0  # dropout probabilities applied in training (Family.dropout_keys)
    residual_dropout: float = 0.0
    attention_dropout: float = 0.0
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    dense_layers: int = 0  # leading layers with a dense MLP before the MoE ones (DeepSeek first_k_dense_replace)
    shared_intermediate: int = 0  # DeepSeek: the shared experts' MLP width beside the routed ones (0: none)
    sliding_window: int | None = None
    windowed_layers: int | None = None  # layers that use the window (None: all of them; Gemma3: 5 of every 6)
    attn_softcap: float | None = None  # Gemma2 attn_logit_softcapping: tanh(scores / cap) * cap
    final_softcap: float | None = None  # Gemma2 final_logit_softcapping on the logits
    remote_code: bool = False
    max_positions: int | None = None  # max_position_embeddings: longer sequences run past the trained positions
    q_lora_rank: int = 0  # MLA (DeepSeek-V3): 0 = q_proj directly
    kv_lora_rank: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    quantization: str = ""  # how a pre-quantized checkpoint (config.json quantization_config) is costed
    # an AWQ / GPTQ / AQLM checkpoint's packed storage (memplan.spec.prequantized): trained as QLoRA over it
    packed: PackedQuant | None = None
    # the checkpoint's saved dtype (config.json `dtype`, transformers 4's `torch_dtype`): what LLaMA-Factory loads
    # whatever the YAML's precision (model/loader.py L155 torch_dtype="auto"); None where the config names none
    checkpoint_dtype: str | None = None
    # Qwen3.5 hybrid layers (Family.linear_attention): each layer's type from text_config layer_types
    # ("linear_attention": a Gated DeltaNet, "full_attention": gated softmax attention); () when all are alike
    layer_types: tuple[str, ...] = ()
    # the Gated DeltaNet's dims (Qwen3_5GatedDeltaNet.__init__, modeling_qwen3_5.py l.501-548): linear_num_key_heads,
    # linear_num_value_heads, linear_key_head_dim, linear_value_head_dim, linear_conv_kernel_dim
    gdn_key_heads: int = 0
    gdn_value_heads: int = 0
    gdn_key_dim: int = 0
    gdn_value_dim: int = 0
    gdn_conv: int = 0
    config: dict[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    # ---- family facts ------------------------------------------------------------------------------------------
    @property
    def analytic(self) -> bool:
        """False: an architecture the formulas do not know (only the exact mode can trace it)."""
        return self.family.analytic

    @property
    def qk_norm(self) -> bool:
        return self.family.qk_norm

    @property
    def fused_qkv(self) -> bool:
        return self.family.fused_qkv

    @property
    def fused_gate_up(self) -> bool:
        return self.family.fused_gate_up

    @property
    def rope_concat(self) -> bool:
        """rope output made by torch.cat: a fresh (B, H, S, D) tensor."""
        return self.family.rope_concat

    @property
    def mask_types(self) -> int:
        return self.family.mask_types

    @property
    def norms_per_layer(self) -> int:
        return self.family.norms_per_layer

    def seq_warning(self, seq_len: int) -> str | None:
        """A sequence longer than the model's positions trains (memory is as estimated) but past what the model
        learned: worth a warning, not an error (rope scaling extends it)."""
        if self.max_positions and seq_len > self.max_positions:
            return (f"--seq-len {seq_len} is longer than {self.name}'s max_position_embeddings {self.max_positions}: "
                    "the estimate holds, the model may not (rope_scaling)")
        return None

    @property
    def dense_prefix(self) -> int:
        """Leading layers unlike the rest (DeepSeek's first_k_dense_replace dense MLPs before the MoE layers)."""
        key = self.family.dense_prefix_key
        prefix = int(self.config.get(key) or 0) if key else 0
        return prefix if prefix < self.num_layers else 0  # every layer dense: all alike

    @property
    def layer_period(self) -> int:
        """How many layers repeat as a unit (Qwen3.5: full_attention_interval, 3 linear-attention + 1 full); 1 when
        every layer is alike."""
        key = self.family.layer_period_key
        text = self.config.get("text_config")
        cfg = text if isinstance(text, dict) else self.config
        period = int(cfg.get(key) or self.family.layer_period_default) if key else 1
        return period if 1 < period <= self.num_layers else 1

    # ---- derived -------------------------------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def rotary_dim(self) -> int:
        """Width of the rotary cos/sin: head_dim x partial_rotary_factor (transformers 5 compute_default_rope_
        parameters: `dim = int(head_dim * partial_rotary_factor)`, read from rope_parameters or the config)."""
        # MLA: DeepseekV3Config sets head_dim = qk_rope_head_dim (configuration_deepseek_v3.py l.123, V2's l.124),
        # the rotary embedding's dim (modeling_deepseek_v3.py l.87)
        if self.family.mla:
            return self.qk_rope_head_dim
        text = self.config.get("text_config")
        cfg = text if isinstance(text, dict) else self.config  # a VL model's decoder: its nested text_config
        rope = cfg.get("rope_parameters") or {}
        factor = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
        return int(self.head_dim * (factor if factor is not None else 1.0))

    def is_linear_layer(self, layer: int) -> bool:
        """Decoder layer `layer` is a Gated DeltaNet (Qwen3.5 layer_types "linear_attention")."""
        return bool(self.layer_types) and self.layer_types[layer] == "linear_attention"

    @property
    def gdn_conv_dim(self) -> int:
        """The causal conv1d's channels: q, k and v (Qwen3_5GatedDeltaNet.conv_dim = key_dim * 2 + value_dim)."""
        return 2 * self.gdn_key_heads * self.gdn_key_dim + self.gdn_value_heads * self.gdn_value_dim

    def gdn_linears(self) -> tuple[Linear, ...]:
        """Qwen3_5GatedDeltaNet's nn.Linear (modeling_qwen3_5.py l.539-545): in_proj_qkv, in_proj_z, in_proj_b,
        in_proj_a, out_proj, none with a bias."""
        h, v, nv = self.hidden_size, self.gdn_value_heads * self.gdn_value_dim, self.gdn_value_heads
        return (Linear(name="in_proj_qkv", in_features=h, out_features=self.gdn_conv_dim),
                Linear(name="in_proj_z", in_features=h, out_features=v),
                Linear(name="in_proj_b", in_features=h, out_features=nv),
                Linear(name="in_proj_a", in_features=h, out_features=nv),
                Linear(name="out_proj", in_features=v, out_features=h))

    @property
    def gdn_other_params(self) -> int:
        """A Gated DeltaNet's parameters besides its Linears (l.522-537): conv1d weight (conv_dim, 1, kernel), no
        bias; dt_bias and A_log (value heads each); the gated RMSNorm's weight (value head dim)."""
        return self.gdn_conv_dim * self.gdn_conv + 2 * self.gdn_value_heads + self.gdn_value_dim

    def attention_linears(self, layer: int | None = None) -> tuple[Linear, ...]:
        """One layer's token mixer Linears (layer None: the top layer's); a Qwen3.5 linear-attention layer's are
        the Gated DeltaNet's."""
        h, b = self.hidden_size, self.qkv_bias
        if layer is not None and self.is_linear_layer(layer):
            return self.gdn_linears()
        if self.family.mla:
            return self._mla_linears()
        if self.fused_qkv:
            qkv = (Linear(name="qkv_proj", in_features=h, out_features=self.q_dim + 2 * self.kv_dim, bias=b),)
        else:
            # Qwen3_5Attention (modeling_qwen3_5.py l.754-756): q_proj makes the query and its output gate
            gate = 2 if self.family.linear_attention else 1
            qkv = (
                Linear(name="q_proj", in_features=h, out_features=gate * self.q_dim, bias=b),
                Linear(name="k_proj", in_features=h, out_features=self.kv_dim, bias=b),
                Linear(name="v_proj", in_features=h, out_features=self.kv_dim, bias=b),
            )
        return (*qkv, Linear(name="o_proj", in_features=self.q_dim, out_features=h, bias=self.out_bias))

    def _mla_linears(self) -> tuple[Linear, ...]:
        """DeepseekV3Attention.__init__ (modeling_deepseek_v3.py l.370-400): q directly or through the q LoRA, the
        joint kv compression with the shared rope key, its expansion, o_proj; attention_bias on the a-projections
        and o_proj."""
        h, b, nh, qk = self.hidden_size, self.qkv_bias, self.num_heads, self.head_dim
        nope = self.head_dim - self.qk_rope_head_dim
        q: tuple[Linear, ...] = (Linear(name="q_proj", in_features=h, out_features=nh * qk),) if not self.q_lora_rank \
            else (Linear(name="q_a_proj", in_features=h, out_features=self.q_lora_rank, bias=b),
                  Linear(name="q_b_proj", in_features=self.q_lora_rank, out_features=nh * qk))
        return (*q, Linear(name="kv_a_proj_with_mqa", in_features=h,
                           out_features=self.kv_lora_rank + self.qk_rope_head_dim, bias=b),
                Linear(name="kv_b_proj", in_features=self.kv_lora_rank, out_features=nh * (nope + self.v_head_dim)),
                Linear(name="o_proj", in_features=nh * self.v_head_dim, out_features=h, bias=b))

    def mlp_linears(self) -> tuple[Linear, ...]:
        """The dense MLP of one layer (for MoE: one expert, repeated `num_experts` times)."""
        h = self.hidden_size
        i = self.moe_intermediate_size if self.is_moe else self.intermediate_size
        if not self.family.gated_mlp:  # Starcoder2MLP: c_fc -> act -> c_proj
            return (Linear(name="c_fc", in_features=h, out_features=i, bias=self.out_bias),
                    Linear(name="c_proj", in_features=i, out_features=h, bias=self.out_bias))
        if self.fused_gate_up:
            up: tuple[Linear, ...] = (Linear(name="gate_up_proj", in_features=h, out_features=2 * i),)
        else:
            up = (Linear(name="gate_proj", in_features=h, out_features=i),
                  Linear(name="up_proj", in_features=h, out_features=i))
        return (*up, Linear(name="down_proj", in_features=i, out_features=h))

    def layer_linears(self, layer: int | None = None) -> tuple[Linear, ...]:
        """Every nn.Linear of one decoder layer that peft's 'all-linear' would wrap (MoE experts excluded); layer
        None: of every kind of layer (Qwen3.5: the Gated DeltaNet's and the full attention's, its names)."""
        if layer is None and self.layer_types:
            return self.gdn_linears() + self.layer_linears(self.num_layers - 1)
        if self.is_moe:  # Qwen3.5-MoE's gated shared expert, Llama 4's shared_expert: Linears of the layer
            mlp = self._shared_gate_linears() + (self.shared_linears() if self.family.shared_in_all_linear else ())
        else:
            mlp = self.mlp_linears()
        return self.attention_linears(layer) + mlp

    def _shared_gate_linears(self) -> tuple[Linear, ...]:
        """Qwen3.5-MoE's shared expert and its gate (Qwen3_5MoeSparseMoeBlock, modeling_qwen3_5_moe.py l.916-919):
        Linears beside the routed experts; none elsewhere (DeepSeek's shared experts are counted apart)."""
        if not self.family.shared_expert_gate:
            return ()
        return self.dense_mlp_linears(self.shared_intermediate, "shared_expert.") + (
            Linear(name="shared_expert_gate", in_features=self.hidden_size, out_features=1),)

    def shared_linears(self) -> tuple[Linear, ...]:
        """An MoE layer's shared expert(s) (DeepSeek's shared_experts, Llama 4's shared_expert); () without."""
        if not self.shared_intermediate:
            return ()
        return self.dense_mlp_linears(self.shared_intermediate, self.family.shared_prefix)

    @property
    def routed_rows(self) -> int:
        """Rows each token gives the routed experts: num_experts_per_tok (grouped_mm on the gathered tokens), or
        every expert (Llama4TextMoe l.170-172: `hidden_states.repeat(num_experts, 1)` times the sigmoid scores)."""
        return self.num_experts if self.family.moe_block == "llama4" else self.experts_per_token

    def is_windowed_layer(self, layer: int) -> bool:
        """Decoder layer `layer` attends within the sliding window (spec.model _windowed; every layer where
        windowed_layers is None)."""
        if self.windowed_layers is None:
            return True
        text = self.config.get("text_config")
        return bool(_windowed(text if isinstance(text, dict) else self.config, self.family, layer))

    def uses_rope(self, layer: int) -> bool:
        """Llama 4: no_rope_layers[layer] (1: rope; default every no_rope_layer_interval-th layer NoPE,
        configuration_llama4.py l.168-172); every other family rotates every layer."""
        return not self.family.nope_layers or _uses_rope(self.config, layer)

    @property
    def rope_layers(self) -> int:
        return sum(self.uses_rope(i) for i in range(self.num_layers))

    def dense_mlp_linears(self, inter: int, prefix: str = "") -> tuple[Linear, ...]:
        """A SwiGLU MLP of width `inter` (DeepseekV3MLP, modeling_deepseek_v3.py l.104-117): a DeepSeek dense
        layer's (intermediate_size) or the shared experts of an MoE layer (`prefix` "shared_experts.")."""
        h = self.hidden_size
        return (Linear(name=prefix + "gate_proj", in_features=h, out_features=inter),
                Linear(name=prefix + "up_proj", in_features=h, out_features=inter),
                Linear(name=prefix + "down_proj", in_features=inter, out_features=h))

    @property
    def moe_layers(self) -> int:
        """Decoder layers with the sparse MoE MLP (all of them but DeepSeek's leading dense ones)."""
        return self.num_layers - self.dense_layers if self.is_moe else 0

    def linear_params_total(self) -> int:
        """Parameters of every nn.Linear in the decoder layers (autocast casts each per forward): attention in each
        layer, the dense MLPs, the shared experts; the routed experts are 3D parameters (grouped_mm, no autocast)."""
        if self.layer_types:
            return sum(sum(lin.params for lin in self.layer_linears(i)) for i in range(self.num_layers))
        n = sum(lin.params for lin in self.layer_linears()) * self.num_layers
        if self.dense_layers:
            n += sum(lin.params for lin in self.dense_mlp_linears(self.intermediate_size)) * self.dense_layers
        if self.shared_intermediate and not self.family.shared_in_all_linear:
            n += sum(lin.params for lin in self.shared_linears()) * self.moe_layers
        return n + self.bmm_expert_params * self.moe_layers

    @property
    def bmm_expert_params(self) -> int:
        """One MoE layer's expert (and router) parameters that autocast casts: Llama4TextExperts' torch.bmm (an
        autocast op, modeling_llama4.py l.79-82) and its nn.Linear router; the grouped_mm experts: none."""
        if self.family.moe_block != "llama4":
            return 0
        return self.num_experts * (3 * self.hidden_size * self.moe_intermediate_size + self.hidden_size)

    def top_linear_params(self) -> int:
        """The nn.Linear parameters of the top decoder layer (an MoE one where there are any)."""
        n = sum(lin.params for lin in self.layer_linears(self.num_layers - 1))
        if self.shared_intermediate and not self.family.shared_expert_gate and not self.family.shared_in_all_linear:
            n += sum(lin.params for lin in self.shared_linears())  # DeepSeek's shared experts
        return n + self.bmm_expert_params

    @property
    def layer_params(self) -> int:
        """Parameters of one decoder layer: the top one, or the largest where layers differ (Qwen3.5: a Gated
        DeltaNet layer, the unit FSDP gathers); `params_of_layer` for any."""
        if self.layer_types:
            return max(self.params_of_layer(i) for i in {self.layer_types.index(t) for t in self.layer_types})
        return self.params_of_layer(self.num_layers - 1)

    def params_of_layers(self, ids: range | list[int]) -> int:
        """Parameters of these decoder layers (freeze's trained ones)."""
        if not self.layer_types and not self.dense_layers:
            return len(ids) * self.layer_params
        return sum(self.params_of_layer(i) for i in ids)

    def params_of_layer(self, layer: int) -> int:
        """Parameters of decoder layer `layer` (DeepSeek's dense prefix aside: dense_layer_params)."""
        h = self.hidden_size
        if layer < self.dense_layers:
            return self.dense_layer_params
        if self.is_linear_layer(layer):  # Gated DeltaNet, 2 zero-centred RMSNorms and the MLP
            return sum(lin.params for lin in self.gdn_linears()) + self.gdn_other_params + 2 * h + self._mlp_params
        n = sum(lin.params for lin in self.attention_linears())
        n += self.norms_per_layer * h  # RMSNorm weights: 2 per layer (4 in gemma2); LayerNorm: weight + bias
        if self.qk_norm:  # q_norm, k_norm (OLMo-2: over the whole projections)
            n += self.q_dim + self.kv_dim if self.family.qk_norm_full else 2 * self.head_dim
        n += self.q_lora_rank + self.kv_lora_rank  # MLA: q_a_layernorm, kv_a_layernorm (0 otherwise)
        n += self.num_heads if self.family.attention_sinks else 0  # GptOssAttention.sinks (num_heads,)
        return n + self._mlp_params

    @property
    def _mlp_params(self) -> int:
        """One layer's MLP: dense, or the router + experts (+ shared experts, + Qwen3.5-MoE's shared_expert_gate)."""
        h = self.hidden_size
        mlp = sum(lin.params for lin in self.mlp_linears())
        if not self.is_moe:
            return mlp
        n = h * self.num_experts + self.num_experts * mlp  # router Linear(h, E) + E SwiGLU experts
        if self.family.moe_block == "gpt_oss":  # GptOssTopKRouter.bias (E,) (modeling_gpt_oss.py l.121), the
            # experts' gate_up_proj_bias (E, 2I) and down_proj_bias (E, H) (l.71-74)
            n += self.num_experts * (1 + 2 * self.moe_intermediate_size + h)
        n += sum(lin.params for lin in self.dense_mlp_linears(self.shared_intermediate)) \
            if self.shared_intermediate else 0  # DeepSeek's shared experts, Qwen3.5-MoE's / Llama 4's shared_expert
        return n + (h if self.family.shared_expert_gate else 0)  # Linear(h, 1)

    @property
    def dense_layer_params(self) -> int:
        """A DeepSeek leading dense layer: the MoE layer's attention and norms, a DeepseekV3MLP(intermediate_size)."""
        return sum(lin.params for lin in self.attention_linears()) + self._layer_norm_params + \
            sum(lin.params for lin in self.dense_mlp_linears(self.intermediate_size))

    @property
    def _layer_norm_params(self) -> int:
        """RMSNorm weights of one layer: input / post-attention, q / k norms, MLA's q_a / kv_a norms."""
        n = self.norms_per_layer * self.hidden_size
        if self.qk_norm:
            n += self.q_dim + self.kv_dim if self.family.qk_norm_full else 2 * self.head_dim
        return n + self.q_lora_rank + self.kv_lora_rank

    @property
    def layers_params(self) -> int:
        """Parameters of all decoder layers (DeepSeek: dense ones first, then MoE ones)."""
        if self.layer_types:
            return self.params_of_layers(range(self.num_layers))
        return self.moe_layers * self.layer_params + (self.num_layers - self.moe_layers) * \
            (self.dense_layer_params if self.dense_layers else self.layer_params)

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def head_params(self) -> int:
        """Final norm + lm_head (0 extra when tied to the embedding)."""
        return self.family.norm_tensors * self.hidden_size + (
            0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size)

    @property
    def vision_params(self) -> int:
        """The vision tower and merger of a VL model (0 for a text model), frozen (Family.frozen_modules)."""
        return vision_params(self.family.vision, self.config.get("vision_config"))

    @property
    def vision_tensors(self) -> tuple[int, ...]:
        """Element counts of the vision tower's parameters, one per tensor in load order (spec.vision)."""
        return vision_tensors(self.family.vision, self.config.get("vision_config"))

    @property
    def num_parameters(self) -> int:
        """Exact parameter count from the shapes (buffers such as rotary inv_freq excluded), a VL tower included."""
        return self.embedding_params + self.layers_params + self.head_params + self.vision_params

    # ---- constructors -------------------------------------------------------------------------------------------
    def with_layers(self, layers: int) -> ModelSpec:
        """The same model cut to `layers` decoder layers, in the config too (a VL model's nested text_config)."""
        def cut(cfg: dict[str, Any]) -> dict[str, Any]:  # layer_types must list exactly the layers built
            types = cfg.get("layer_types")
            return {**cfg, "num_hidden_layers": layers,
                    **({"layer_types": types[:layers]} if isinstance(types, list) else {})}

        text = self.config.get("text_config")
        if isinstance(text, dict) and "num_hidden_layers" in text:
            config = {**self.config, "text_config": cut(text)}
        else:
            config = cut(self.config)
        windowed = self.windowed_layers
        if windowed is not None:  # the cut keeps the first layers' types (a VL model's: its decoder's)
            nested = config.get("text_config")
            windowed = _windowed_layers(nested if isinstance(nested, dict) and "num_hidden_layers" in nested
                                        else config, self.family)
        return dataclasses.replace(self, num_layers=layers, config=config, windowed_layers=windowed,
                                   layer_types=self.layer_types[:layers],
                                   dense_layers=min(self.dense_layers, layers) if self.is_moe else 0)

    @classmethod
    def _generic(cls, cfg: dict[str, Any], mtype: str, name: str, quantization: str = "") -> ModelSpec:
        """An architecture the formulas do not know: keep the config for the exact mode, rough dims for display
        (a VL model's decoder dims from its nested text_config)."""
        raw = cfg
        if isinstance(cfg.get("text_config"), dict):
            cfg = {**cfg, **cfg["text_config"]}
        hidden = _first(cfg, "hidden_size", "n_embed", "n_embd", "d_model", default=0)
        heads = _first(cfg, "num_attention_heads", "n_head", default=1)
        return cls(name=name, model_type=mtype, hidden_size=hidden,
                   num_layers=_first(cfg, "num_hidden_layers", "n_layer", "num_layers", default=0),
                   num_heads=heads, num_kv_heads=_first(cfg, "num_key_value_heads", default=heads),
                   head_dim=hidden // heads if heads else 0,
                   intermediate_size=_first(cfg, "intermediate_size", "n_inner", "ffn_dim", default=4 * hidden),
                   vocab_size=_first(cfg, "vocab_size", default=0),
                   tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
                   family=dataclasses.replace(family_of(mtype), analytic=False),
                   # auto_map on a type with a family entry is an old pointer: transformers builds its own class
                   remote_code=family_of(mtype).remote_code if mtype in FAMILIES else "auto_map" in raw,
                   quantization=quantization,
                   config={k: v for k, v in raw.items() if not k.startswith("_") or k == "_name_or_path"})

    @classmethod
    def from_config_dict(cls, cfg: dict[str, Any], *, name: str | None = None) -> ModelSpec:
        """Build from a transformers config.json dict; raises ConfigError naming every missing/bad field."""
        mtype = cfg.get("model_type") or type_of_architecture((cfg.get("architectures") or [""])[0])
        label = name or cfg.get("_name_or_path") or "config.json"
        if not mtype:
            raise ConfigError(f"{label}: config.json has no model_type; add one (e.g. \"model_type\": \"llama\")")
        fam = family_of(mtype)
        if fam.text_model and isinstance(cfg.get("text_config"), dict):  # the text decoder alone
            text = {**cfg["text_config"], "model_type": fam.text_model}
            outer = {k: cfg[k] for k in ("_name_or_path", "quantization_config") if k in cfg}
            return cls.from_config_dict({**outer, **text}, name=name)
        raw = cfg  # what `config` keeps, the exact mode's input (hf_config)
        if fam.analytic and fam.vision and isinstance(cfg.get("text_config"), dict):
            cfg = _decoder_view(cfg, fam, mtype)
        q = cfg.get("quantization_config")
        packed = packed_from_config(q, str(name or label)) if isinstance(q, dict) else None
        quant = "" if packed else _quantization(cfg, str(name or label))
        # dense layers mixed into an MoE model (qwen3_moe decoder_sparse_step / mlp_only_layers): the formulas
        # assume every layer sparse, so only the exact mode traces it
        mixed = fam.moe and (cfg.get("decoder_sparse_step") not in (None, 1) or bool(cfg.get("mlp_only_layers")))
        # Llama 4's dense layers between the MoE ones (interleave_moe_layer_step > 1, Maverick; or a moe_layers list)
        mixed = mixed or (fam.moe_block == "llama4" and (cfg.get("interleave_moe_layer_step") not in (None, 1)
                                                         or cfg.get("moe_layers") is not None))
        prefix = cfg.get(fam.dense_prefix_key) if fam.dense_prefix_key else None
        if fam.dense_prefix_key and not fam.shared_experts_key:  # dense then MoE layers, not in the formulas
            mixed = mixed or prefix is None or prefix < cfg.get("num_hidden_layers", 0)
        if packed and (not fam.analytic or mixed):  # the exact mode builds bitsandbytes layers only
            raise UnsupportedModel(f"{name or label}: a pre-quantized {packed.describe()} {mtype} checkpoint; memplan "
                                   "models packed storage for the architectures of its analytic formulas only, and "
                                   f"{mtype} is traced by the exact mode, which builds no {packed.method.upper()} "
                                   f"layers ({storage_note(packed.method)})")
        # a checkpoint transformers trains dequantized (MXFP4, FP8 below compute capability 8.9: DEQUANTIZED) is the
        # unquantized model: analytic where the family is, the note saying how it is costed
        if not fam.analytic or mixed:
            return cls._generic(raw, mtype, str(name or label), quant)
        required = ["hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", fam.intermediate_key]
        if fam.mla:  # DeepseekV3Config's defaults (q_lora_rank 1536, ...) are another model's: each must be given
            required += ["kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim"]
        # DeepSeek with MoE layers: the Config's defaults (256 routed experts, 3 dense layers...) are DeepSeek-V3's
        # own, so each must be given (first_k_dense_replace may be 0)
        sparse = fam.dense_prefix_key is not None and fam.shared_experts_key is not None and \
            (prefix is None or prefix < cfg.get("num_hidden_layers", 0))
        if sparse:
            required += ["n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", fam.shared_experts_key]
        problems = [f"{label}: missing {k}" for k in required if k not in cfg]
        if sparse and prefix is None:
            problems.append(f"{label}: missing first_k_dense_replace (0 when every layer is MoE)")
        if fam.mla and "q_lora_rank" not in cfg:
            problems.append(f"{label}: missing q_lora_rank (null for a direct q_proj)")
        problems += [f"{label}: {k} must be a positive integer, got {cfg[k]!r}" for k in required
                     if k in cfg and (not isinstance(cfg[k], int) or isinstance(cfg[k], bool) or cfg[k] <= 0)]
        # the optional dimensions the formulas read: positive integers when present (null means the default)
        problems += [f"{label}: {k} must be a positive integer, got {cfg[k]!r}" for k in _OPTIONAL_INTS
                     if cfg.get(k) is not None and (not isinstance(cfg[k], int) or isinstance(cfg[k], bool)
                                                    or cfg[k] <= 0)]
        problems += [f"{label}: {k} must be a probability in [0, 1), got {cfg[k]!r}" for k in fam.dropout_keys or ()
                     if cfg.get(k) is not None and (not isinstance(cfg[k], (int, float)) or isinstance(cfg[k], bool)
                                                    or not 0 <= cfg[k] < 1)]
        if problems:
            raise ConfigError(problems)
        heads = cfg["num_attention_heads"]
        kv = cfg.get("num_key_value_heads") or heads
        if not cfg.get("head_dim") and cfg["hidden_size"] % heads:  # transformers refuses to build it
            raise ConfigError(f"{label}: hidden_size {cfg['hidden_size']} is not a multiple of num_attention_heads "
                              f"{heads} (and no head_dim is given)")
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
        if fam.mla:  # the q/k head: its no-rope and rope parts
            head_dim = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
        if heads % kv:
            raise ConfigError(f"{label}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        section = rope.get("mrope_section", [16, 24, 24])  # Qwen2VLRotaryEmbedding's default (l.104)
        if fam.mrope == "sections" and sum(section) != head_dim // 2:  # transformers' split fails in forward
            raise ConfigError(f"{label}: mrope_section {section} must sum to head_dim / 2 = {head_dim // 2}")
        experts = (cfg.get("num_local_experts") or cfg.get("num_experts") or cfg.get("n_routed_experts") or 0) \
            if fam.moe else 0
        # DeepSeek with every layer dense (first_k_dense_replace >= layers)
        if fam.dense_prefix_key and fam.shared_experts_key and not sparse:
            experts = 0
        tied = cfg.get("tie_word_embeddings")
        bias = fam.qkv_bias if fam.qkv_bias is not None else cfg.get(fam.bias_key, fam.attention_bias_default)
        drops = [float(cfg.get(k) or 0.0) for k in fam.dropout_keys] if fam.dropout_keys else [0.0, 0.0, 0.0]
        return cls(
            name=name or cfg.get("_name_or_path") or mtype,
            model_type=mtype,
            family=fam,
            hidden_size=cfg["hidden_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=kv,
            head_dim=head_dim,
            # None where a config has no dense MLP (Qwen3.5 MoE: kept as read); Qwen-1 states twice its width
            intermediate_size=(cfg.get("intermediate_size", 0) or 0) // fam.mlp_width_divisor
            if cfg.get("intermediate_size", 0) else cfg.get("intermediate_size", 0),
            vocab_size=cfg["vocab_size"],
            tie_word_embeddings=bool(fam.tied_default if tied is None else tied),
            qkv_bias=bool(bias),
            out_bias=bool(bias) and fam.out_bias,
            embedding_dropout=drops[0], residual_dropout=drops[1], attention_dropout=drops[2],
            num_experts=experts,
            experts_per_token=(cfg.get("num_experts_per_tok") or 0) if experts else 0,
            moe_intermediate_size=(cfg.get("moe_intermediate_size") or cfg.get("intermediate_size", 0))
            if experts else 0,
            dense_layers=min(int(prefix or 0), cfg["num_hidden_layers"]) if experts and fam.shared_experts_key else 0,
            shared_intermediate=(cfg[fam.shared_experts_key] if fam.shared_expert_gate else
                                 cfg["moe_intermediate_size"] * cfg[fam.shared_experts_key])
            if experts and fam.shared_experts_key else cfg["intermediate_size"] if experts and fam.moe_block == "llama4"
            else 0,
            sliding_window=_sliding_window(cfg, fam),
            windowed_layers=_windowed_layers(cfg, fam),
            attn_softcap=cfg.get("attn_logit_softcapping") or None,
            final_softcap=cfg.get("final_logit_softcapping") or None,
            remote_code=fam.remote_code,
            checkpoint_dtype=_checkpoint_dtype(raw),
            max_positions=cfg.get("max_position_embeddings"),
            q_lora_rank=(cfg.get("q_lora_rank") or 0) if fam.mla else 0,
            kv_lora_rank=cfg["kv_lora_rank"] if fam.mla else 0,
            qk_rope_head_dim=cfg["qk_rope_head_dim"] if fam.mla else 0,
            v_head_dim=cfg["v_head_dim"] if fam.mla else 0,
            config={k: v for k, v in raw.items() if not k.startswith("_") or k == "_name_or_path"},
            packed=packed,
            **_gdn_dims(cfg, fam),
            quantization=quant,
        )


_OPTIONAL_INTS = ("num_key_value_heads", "head_dim", "intermediate_size", "moe_intermediate_size", "sliding_window",
                  "num_local_experts", "num_experts", "num_experts_per_tok", "max_position_embeddings")


def _decoder_view(cfg: dict[str, Any], fam: Family, mtype: str) -> dict[str, Any]:
    """A composite VL config.json with the decoder's keys in text_config (Qwen3-VL; Qwen2-VL / 2.5-VL as transformers
    >= 4.52 saves them) seen flat, for the dimensions; ModelSpec.config keeps the file as it is. The embeddings tie by
    the outer config (modeling_utils.py l.2492 reads the composite model's config), or text_config's where the
    Config class forwards it (Family.tie_from_text)."""
    text = cfg["text_config"]
    tied = bool(cfg.get("tie_word_embeddings")) or (fam.tie_from_text and bool(text.get("tie_word_embeddings")))
    return {**cfg, **text, "model_type": mtype, "tie_word_embeddings": tied}


def _gdn_dims(cfg: dict[str, Any], fam: Family) -> dict[str, Any]:
    """Qwen3.5's layer types and Gated DeltaNet dims (Qwen3_5TextConfig defaults: 16 key heads, 32 value heads,
    128 each, kernel 4; layer_types every full_attention_interval-th full, configuration_qwen3_5.py l.111-116)."""
    if not fam.linear_attention:
        return {}
    types = cfg.get("layer_types") or [
        "full_attention" if (i + 1) % int(cfg.get("full_attention_interval") or 4) == 0 else "linear_attention"
        for i in range(cfg["num_hidden_layers"])]
    return dict(layer_types=tuple(types), gdn_key_heads=cfg.get("linear_num_key_heads", 16),
                gdn_value_heads=cfg.get("linear_num_value_heads", 32), gdn_key_dim=cfg.get("linear_key_head_dim", 128),
                gdn_value_dim=cfg.get("linear_value_head_dim", 128), gdn_conv=cfg.get("linear_conv_kernel_dim", 4))


def _sliding_window(cfg: dict[str, Any], fam: Family) -> int | None:
    """The window transformers really applies (Qwen2/3 only with use_sliding_window; MistralConfig's default).
    Llama 4's rope layers attend within chunks of attention_chunk_size (Llama4TextConfig default 8192, l.158):
    an explicit mask as a window's once the sequence is longer."""
    if fam.nope_layers:
        return cfg.get("attention_chunk_size", 8192)
    if not fam.sliding or (fam.sliding_window_flag and not cfg.get(fam.sliding_window_flag)):
        return None
    return cfg.get("sliding_window", fam.sliding_window_default)


# quantization_config.quant_method of checkpoints memplan costs, and how: the trained model holds these weights
# dequantized to the training dtype (the exact mode builds that model)
DEQUANTIZED = {
    # transformers quantizer_mxfp4.py l.209-213: MXFP4 is not trainable; training loads Mxfp4Config(dequantize=True)
    "mxfp4": "the checkpoint's MXFP4 experts are costed dequantized to the training dtype, as transformers must "
             "load them to train (Mxfp4Config(dequantize=True))",
    # quantizer_finegrained_fp8.py l.38-57: dequantized without a GPU of compute capability >= 8.9; trainable in FP8
    "fp8": "the checkpoint's FP8 weights are costed dequantized to the training dtype (as transformers loads them "
           "below compute capability 8.9); on H100-class GPUs a frozen FP8 base (1 byte + 128x128 block scales) "
           "holds about half those weight bytes",
}


def _quantization(cfg: dict[str, Any], label: str) -> str:
    """How a pre-quantized checkpoint is costed (DEQUANTIZED), or a one-line refusal for storage not modelled."""
    q = cfg.get("quantization_config")
    if not q:
        return ""
    method = str(q.get("quant_method", "")).lower() if isinstance(q, dict) else ""
    if method in DEQUANTIZED:
        return DEQUANTIZED[method]
    bits = q.get("bits") or (4 if q.get("load_in_4bit") else 8 if q.get("load_in_8bit") else None) \
        if isinstance(q, dict) else None
    raise UnsupportedModel(
        f"{label}: its weights are pre-quantized ({method or 'unknown method'}{f', {bits}-bit' if bits else ''}), a "
        "storage memplan does not model yet (AWQ, GPTQ and AQLM it does); estimate the unquantized model "
        f"with --method qlora --quant-bits {8 if bits == 8 else 4} (bitsandbytes: about the same weight bytes) or "
        "--method lora")


def _uses_rope(cfg: dict[str, Any], layer: int) -> bool:
    """Llama 4's no_rope_layers[layer] (1: rope), default all but every no_rope_layer_interval-th (l.168-172)."""
    flags = cfg.get("no_rope_layers")
    if isinstance(flags, list) and layer < len(flags):
        return bool(flags[layer])
    return (layer + 1) % int(cfg.get("no_rope_layer_interval") or 4) != 0


def _windowed_layers(cfg: dict[str, Any], fam: Family) -> int | None:
    """How many layers attend within the window (None: all of them, or no per-layer pattern): `_windowed`."""
    flags = [_windowed(cfg, fam, i) for i in range(cfg["num_hidden_layers"])]
    return None if None in flags else sum(flags)


def _windowed(cfg: dict[str, Any], fam: Family, layer: int) -> bool | None:
    """Layer `layer` attends within the window: config.json's layer_types, else the family's pattern (Llama 4: its
    rope layers are chunked, configuration_llama4.py l.187-191; Gemma 3: all but every sliding_window_pattern-th);
    None: no per-layer pattern (every layer attends alike)."""
    types = cfg.get("layer_types")
    if isinstance(types, list):
        return layer < len(types) and types[layer] in ("sliding_attention", "chunked_attention")
    if fam.nope_layers:
        return _uses_rope(cfg, layer) if cfg.get("attention_chunk_size", 8192) else None
    if not fam.window_pattern:
        return None
    every = cfg.get("sliding_window_pattern") or fam.window_pattern
    return bool((layer + 1) % every)


def _first(cfg: dict[str, Any], *keys: str, default: Any = None) -> Any:
    return next((cfg[k] for k in keys if cfg.get(k) is not None), default)


def load_config_file(path: Path) -> dict[str, Any]:
    """Read a config.json, turning malformed JSON into a ConfigError."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read {path}: {err}") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON (line {err.lineno}: {err.msg})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return data


def _checkpoint_dtype(cfg: dict[str, Any]) -> str | None:
    """config.json's `dtype` (transformers 5) or `torch_dtype` (4.x), a composite model's text_config's otherwise:
    "bfloat16", "float16", "float32"; None when absent."""
    for c in (cfg, cfg.get("text_config") or {}):
        value = c.get("dtype") or c.get("torch_dtype")
        if value:
            return str(value).removeprefix("torch.")
    return None
