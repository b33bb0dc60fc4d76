"""Where every parameter lives: dtype width, trainable or not, LoRA adapters (README "The memory model")."""

from __future__ import annotations

from dataclasses import dataclass

from memplan.errors import ConfigError, Problem
from memplan.predict.adapters import params_per_linear
from memplan.spec.dtypes import ParamDtypes, param_dtypes
from memplan.spec.model import ModelSpec
from memplan.spec.packages import linear4bit_keeps_input
from memplan.spec.stacks import stack_facts
from memplan.spec.train import ALL_LINEAR, Attention, Method, TrainConfig, resolve_attention


@dataclass(frozen=True, slots=True, kw_only=True)
class Layout:
    """Derived once per estimate: widths in bytes and which modules train."""

    spec: ModelSpec
    train: TrainConfig
    attn: Attention
    amp: bool
    compute_width: int  # linear outputs: autocast's half (2), else the weights' own width (spec.dtypes)
    base_width: int  # frozen/base weights (the decoder linears a QLoRA model quantizes, before quantization)
    kept_width: int  # frozen weights that are never quantized (embedding, norms, LM head) and, for LoRA/freeze,
    # the embedding output ("stream"): base_width, or fp32 where the stack upcasts a k-bit model (spec.stacks)
    trainable_width: int  # weights that train: fp32 master copies except under pure_bf16 (spec.dtypes)
    lora_width: int  # adapters: fp32 (peft upcasts) except under pure_bf16 outside LLaMA-Factory (spec.dtypes)
    load_width: int = 4  # what the stack loads the base in: the frozen weights (a full run's frozen VL tower too)
    frozen_cast: bool = False  # autocast casts each frozen weight per call (its dtype is not autocast's: an fp32
    # or fp16 checkpoint under LLaMA-Factory's bf16), a copy the matmul saves when its input needs a gradient
    lora_modules: frozenset[str]
    device: str = "cuda"  # cuda, or cpu to compare with CPU measurements (dropout keeps a full-width noise there)
    trainable_layers: int  # decoder layers whose own weights train (full: all; freeze: N; LoRA: 0)
    trained_ids: range = range(0)  # which ones (TrainConfig.trainable_layer_ids: freeze's last / first N, LLaMA Pro)
    adapted_ids: range = range(0)  # LoRA / QLoRA: the decoder layers carrying adapters (all, or LLaMA Pro's blocks)
    linear4bit_keeps_input: bool = True  # bitsandbytes < 0.43.2 (memplan.spec.packages), or the stack's own NF4
    quantized_head: bool = False  # QLoRA: the stack quantizes the LM head too (spec.stacks)
    only_quantized: frozenset[str] | None = None  # QLoRA: the only decoder linears that are 4-bit, where the stack
    # quantizes just the adapted ones (spec.stacks); None: every decoder linear

    def quantized(self, name: str) -> bool:
        """Is decoder linear `name` 4-bit?"""
        return self.train.method is Method.QLORA and (self.only_quantized is None or name in self.only_quantized)

    @classmethod
    def of(cls, spec: ModelSpec, train: TrainConfig, device: str = "cuda", dtypes: ParamDtypes | None = None
           ) -> Layout:
        """`dtypes`: the parameter dtypes where the caller knows them better than the stack's rule (DeepSpeed's
        half module); else memplan.spec.dtypes param_dtypes of the stack, precision and checkpoint dtype."""
        dt = dtypes or param_dtypes(train.stack, train.precision, spec.checkpoint_dtype, train.method)
        amp = dt.autocast
        full = train.method is Method.FULL
        trainable_width = dt.trainable_width
        names = {lin.name for lin in spec.layer_linears()}
        if not train.is_lora:
            lora: frozenset[str] = frozenset()
        elif ALL_LINEAR in train.lora_targets:
            lora = frozenset(names - set(spec.family.all_linear_skips))
        else:
            lora = frozenset(spec.family.roles(train.lora_targets))  # real module names as roles (Qwen-1)
        base_width = trainable_width if full else dt.frozen_width
        stack = stack_facts(train.stack)
        qlora = train.method is Method.QLORA
        # a pre-quantized checkpoint: its config decides what is quantized (every decoder linear, not the LM head:
        # transformers' modules_to_not_convert default); peft's k-bit preparation casts nothing for GPTQ / AQLM
        # (peft utils/other.py prepare_model_for_kbit_training L184-205), AWQ it does
        packed = spec.packed
        upcast = qlora and stack.kbit_upcast and not (packed and packed.method in ("gptq", "aqlm"))
        keeps = linear4bit_keeps_input() if stack.nf4_keeps_input is None else stack.nf4_keeps_input
        ids = train.trainable_layer_ids(spec.num_layers)
        train.check_extra_modules(spec.tie_word_embeddings)
        lay = cls(
            spec=spec, train=train, attn=resolve_attention(spec.family, train.attn), amp=amp,
            # no autocast: a linear computes in its weights' dtype (full: the trained ones; else the frozen base's)
            compute_width=2 if amp else base_width,
            base_width=base_width,
            kept_width=4 if upcast else base_width,
            trainable_width=trainable_width,
            lora_width=2 if qlora and stack.kbit_adapters_bf16 else dt.adapters_width,
            load_width=dt.frozen_width,
            frozen_cast=dt.frozen_cast and not full,
            lora_modules=lora,
            device=device,
            linear4bit_keeps_input=keeps,
            quantized_head=qlora and stack.quantizes_lm_head and not spec.tie_word_embeddings and not packed,
            only_quantized=lora if qlora and stack.quantizes_only_adapted and not packed else None,
            trainable_layers=0 if train.is_lora else len(ids),
            trained_ids=range(0) if train.is_lora else ids,
            adapted_ids=ids if train.is_lora else range(0),
        )
        lay._check_parts()
        return lay

    @property
    def full(self) -> bool:
        return self.train.method is Method.FULL

    @property
    def embedding_trains(self) -> bool:
        """The input embedding trains: full, or TrainConfig.extra_modules (freeze: itself; LoRA: its copy)."""
        return self.full or "embed_tokens" in self.train.extra_modules

    @property
    def head_trains(self) -> bool:
        """The LM head's weight trains: full; lm_head among the extra modules; or, under freeze, the embedding it
        is tied to (one tensor). A LoRA copy of a tied embedding is its own tensor: the head stays frozen."""
        extra = self.train.extra_modules
        tied = self.spec.tie_word_embeddings and not self.train.is_lora and "embed_tokens" in extra
        return self.full or "lm_head" in extra or tied

    @property
    def tied_trains(self) -> bool:
        """One trained tensor is both the embedding and the LM head (tied weights, full or freeze)."""
        return self.spec.tie_word_embeddings and self.embedding_trains and self.head_trains and \
            not self.train.is_lora

    def part_trains(self, part: str) -> bool:
        """Does this sub-module of a trained layer train (TrainConfig.trainable_modules; "all": every one)?"""
        return "all" in self.train.trainable_modules or part in self.train.trainable_modules

    def _check_parts(self) -> None:
        s, parts = self.spec, set(self.train.trainable_modules) - {"all"}
        if parts and (s.layer_types or s.family.linear_attention):
            raise ConfigError(Problem("trainable_modules", f"{{}} {','.join(sorted(parts))}: {s.model_type}'s "
                                                           "layers of two kinds are modelled for all only"))
        norms = parts & {"input_layernorm", "post_attention_layernorm"}
        if norms and (s.family.sandwich_norms or s.family.post_norms or s.family.layer_norm):
            raise ConfigError(Problem("trainable_modules", f"{{}} {','.join(sorted(norms))}: {s.model_type}'s "
                                                           "norms are modelled under all only (self_attn, mlp are)"))

    def trained_params_of_layer(self, layer: int) -> int:
        """Parameters that train in trained decoder layer `layer`: all of them, or its trainable_modules' (self_attn:
        the attention's Linears, q / k norms, MLA's a-norms, sinks; mlp: the MLP, router and experts; each norm)."""
        s = self.spec
        total = s.params_of_layer(layer)
        if "all" in self.train.trainable_modules:
            return total
        qk = (s.q_dim + s.kv_dim if s.family.qk_norm_full else 2 * s.head_dim) if s.qk_norm else 0
        attn = sum(lin.params for lin in s.attention_linears()) + qk + s.q_lora_rank + s.kv_lora_rank + (
            s.num_heads if s.family.attention_sinks else 0)
        norms = s.norms_per_layer * s.hidden_size
        parts = {"self_attn": attn, "mlp": total - attn - norms, "input_layernorm": norms // 2,
                 "post_attention_layernorm": norms // 2}
        return sum(n for part, n in parts.items() if self.part_trains(part))

    def trained_linear_names(self) -> set[str]:
        """The decoder Linears that train in a trained layer (freeze's trainable_modules)."""
        s = self.spec
        attn = {lin.name for lin in s.attention_linears()}
        return {lin.name for lin in s.layer_linears()
                if self.part_trains("self_attn" if lin.name in attn else "mlp")}

    def extra_params(self) -> int:
        """Parameters of the extra modules that train (freeze: in place; LoRA: the copies beside the originals)."""
        vh = self.spec.vocab_size * self.spec.hidden_size
        extra = self.train.extra_modules
        head = "lm_head" in extra and (self.train.is_lora or not self.spec.tie_word_embeddings)
        return vh * ("embed_tokens" in extra) + vh * head

    def extra_shapes(self) -> list[tuple[int, int, int]]:
        """(rows, cols, count) of the extra modules' trainable tensors: one (V, H) each."""
        n = self.extra_params() // (self.spec.vocab_size * self.spec.hidden_size)
        return [(self.spec.vocab_size, self.spec.hidden_size, n)] if n else []

    @property
    def stream_width(self) -> int:
        """dtype of the residual stream: the embedding's (a trained one: fp32 master weights under AMP; else
        kept_width)."""
        return self.trainable_width if self.embedding_trains else self.kept_width

    @property
    def logits_width(self) -> int:
        """The LM head's output: autocast's half dtype, else the head weight's own (an upcast head: fp32)."""
        return self.compute_width if self.amp else (self.trainable_width if self.head_trains else self.kept_width)

    @property
    def norms_fp32(self) -> bool:
        """upcast_layernorm under autocast: every norm weight fp32, so `weight * x.to(input_dtype)` (transformers
        LlamaRMSNorm.forward; mul has no autocast rule) returns fp32 and each linear after it casts its own copy."""
        return self.train.upcast_layernorm and self.amp

    @property
    def head_output_fp32(self) -> bool:
        """upcast_lmhead_output's hook is registered (LLaMA-Factory registers it while the head is still in the
        load dtype, before any fp32 cast: a half load, spec.dtypes) and returns fp32 logits."""
        return self.train.upcast_lmhead_output and self.load_width == 2

    @property
    def head_cast_bytes(self) -> int:
        """A frozen LM head not in autocast's dtype (fp32, or fp16 under bf16: spec.dtypes): F.linear casts the
        weight to half on every call (autocast caches only leaf tensors that require grad:
        aten/src/ATen/autocast_mode.cpp cached_cast), and the matmul saves that copy for the head's input gradient."""
        if self.amp and not self.head_trains and (self.kept_width == 4 or self.frozen_cast) and \
                self.compute_width == 2:
            return self.spec.vocab_size * self.spec.hidden_size * 2
        return 0

    @property
    def experts_wrapped(self) -> bool:
        """LoRA on all-linear wraps an MoE's router and 3D expert parameters too (Family.lora_wraps_experts)."""
        return self.train.is_lora and ALL_LINEAR in self.train.lora_targets and self.spec.family.lora_wraps_experts

    @property
    def sparse_layers(self) -> bool:
        """Only some decoder layers train (freeze; LoRA under LLaMA Pro): the layers below the lowest trained one are
        off the backward path, the frozen ones above it on it (estimator._sparse_activations)."""
        return self.train.method is Method.FREEZE or len(self.adapted_ids) < self.spec.num_layers and \
            self.train.is_lora

    def lora_params_total(self) -> int:
        """Adapter parameters of the adapted decoder layers (DeepSeek's leading dense layers have no MoE adapters)."""
        s, ids = self.spec, self.adapted_ids
        if s.layer_types:  # Qwen3.5: Gated DeltaNet and full-attention layers adapt different Linears
            return sum(self.lora_params_per_layer(layer=i) for i in ids)
        dense = sum(i < s.num_layers - s.moe_layers for i in ids) if s.dense_layers else 0
        return (len(ids) - dense) * self.lora_params_per_layer() + dense * self.lora_params_per_layer(moe=False)

    def lora_params_per_layer(self, *, moe: bool = True, layer: int | None = None) -> int:
        """One layer's adapter parameters (moe=False: a DeepSeek dense layer's; all-linear skips its MLP); layer:
        that decoder layer's (None: the top one's)."""
        s, r = self.spec, self.train.lora_rank
        n = sum(params_per_linear(self.train, lin) for lin in s.layer_linears(s.num_layers - 1 if layer is None
                                                                               else layer)
                if lin.name in self.lora_modules)
        if not moe:
            return n + sum(params_per_linear(self.train, lin) for lin in s.dense_mlp_linears(s.intermediate_size)
                           if lin.name in self.lora_modules)
        if s.shared_intermediate and not s.family.shared_expert_gate and not s.family.shared_in_all_linear:
            # DeepSeek's (Qwen3.5's and Llama 4's shared experts are among the layer's Linears already)
            n += sum(params_per_linear(self.train, lin) for lin in s.shared_linears() if lin.name in self.lora_modules)
        if s.is_moe and self.experts_wrapped:
            # peft 0.21 also wraps the router and the 3D expert parameters (shapes read off a built model):
            # router A (r, H) + B (E, r); gate_up A (2Er, H) + B (2I, 2Er); down A (Er, I) + B (H, Er)
            e, h, i = s.num_experts, s.hidden_size, s.moe_intermediate_size
            n += r * (h + e) + 2 * e * r * (h + 2 * i) + e * r * (i + h)
        return n
