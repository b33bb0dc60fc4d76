import pytest

from memplan.errors import ConfigError
from memplan.predict.estimator import estimate
from memplan.spec.catalog import catalog_entries, resolve_model
from memplan.spec.train import Attention, Method, Optimizer, Precision, TrainConfig

M7 = resolve_model("llama-2-7b")
ANALYTIC = [e for e in catalog_entries() if resolve_model(e.hf_id).analytic]


@pytest.mark.parametrize("precision,width", [(Precision.FP32, 4), (Precision.BF16, 4), (Precision.PURE_BF16, 2)])
def test_full_adamw_terms_equal_figures_derived_by_hand(precision, width):
    # full fine-tuning with AdamW peaks in optimizer.step(): weights, gradients, exp_avg and exp_avg_sq, and
    # foreach AdamW's _foreach_sqrt(exp_avg_sq) copy, each `width` bytes per parameter (fp32 master weights under
    # bf16 AMP, 2 B under pure bf16), plus the rotary inv_freq and original_inv_freq buffers (head_dim / 2 fp32
    # values each), plus the input ids (1 x 512 int64) still alive, plus the cuBLAS workspaces (CUDA: 2 x 33 MiB)
    n, rotary, ids = M7.num_parameters, 2 * (M7.head_dim // 2) * 4, 8 * 512
    ws = 2 * (32 + 1) * 2**20
    bd = estimate(M7, TrainConfig(method=Method.FULL, precision=precision, checkpointing=False, seq_len=512))
    assert bd.phase == "optimizer" and bd.trainable_params == n
    assert {t.name: t.bytes for t in bd.terms} == {"weights": width * n + rotary, "optimizer_states": 2 * width * n,
                                                   "gradients": width * n, "activations": ids, "transient": width * n,
                                                   "cuda_workspaces": ws}
    assert bd.peak_allocated_bytes == 5 * width * n + rotary + ids + ws
    assert bd.peak_reserved_bytes >= bd.peak_allocated_bytes
    assert bd.total_bytes == bd.peak_reserved_bytes + bd.cuda_context_bytes


def test_lora_terms_equal_figures_derived_by_hand():
    # LoRA rank 16 on every linear of llama-2-7b (32 layers; q, k, v, o: 4096 -> 4096; gate, up: 4096 -> 11008;
    # down: 11008 -> 4096): r x (in + out) per adapter; bf16 base weights, fp32 adapters and AdamW states
    h, i, r = 4096, 11008, 16
    adapters = 32 * r * (4 * (h + h) + 3 * (h + i))
    bd = estimate(M7, TrainConfig(method=Method.LORA, lora_rank=r, precision=Precision.BF16, seq_len=1024))
    assert bd.trainable_params == adapters == 39_976_960
    assert bd.term("weights") == 2 * M7.num_parameters + 4 * adapters + 2 * (M7.head_dim // 2) * 4  # inv_freq x 2
    assert bd.term("optimizer_states") == 2 * 4 * adapters
    assert all(t.bytes >= 0 for t in bd.terms), bd.terms
    assert bd.term("activations") > 0 and bd.phase in ("forward", "backward")
    assert sum(t.bytes for t in bd.terms) == bd.peak_allocated_bytes


def test_full_fp32_adamw_is_at_least_16_bytes_per_param():
    bd = estimate(M7, TrainConfig(method=Method.FULL, precision=Precision.FP32, seq_len=512))
    # weights 4 + grads 4 + 2 states 8 + foreach sqrt temporary 4 = 20 B/param at the optimizer step
    assert bd.peak_allocated_bytes >= 20 * M7.num_parameters
    assert bd.phase == "optimizer"


@pytest.mark.parametrize("knob,small,large", [
    ("checkpointing", True, False), ("batch_size", 1, 4), ("seq_len", 512, 4096), ("lora_rank", 8, 256)])
def test_monotone_in_knobs(knob, small, large):
    base = TrainConfig(method=Method.LORA, checkpointing=False)
    assert estimate(M7, base.with_(**{knob: small})).peak_allocated_bytes < \
        estimate(M7, base.with_(**{knob: large})).peak_allocated_bytes


def test_methods_order():
    peaks = [estimate(M7, TrainConfig(method=m)).peak_allocated_bytes
             for m in (Method.QLORA, Method.LORA, Method.FULL)]
    assert peaks == sorted(peaks)


def test_8bit_optimizer_smaller_states():
    a = estimate(M7, TrainConfig(method=Method.FULL, optimizer=Optimizer.ADAMW))
    b = estimate(M7, TrainConfig(method=Method.FULL, optimizer=Optimizer.ADAMW_8BIT))
    assert b.term("optimizer_states") < a.term("optimizer_states") / 3


def test_bad_inputs():
    with pytest.raises(ConfigError):
        TrainConfig(quant_bits=3)
    with pytest.raises(ConfigError):
        TrainConfig(batch_size=0)
    with pytest.raises(ConfigError, match="flash_attention_2"):
        TrainConfig(precision=Precision.FP32, attn=Attention.FLASH_ATTENTION_2)
    with pytest.raises(ConfigError, match="not in llama layers"):
        estimate(M7, TrainConfig(lora_targets=("qkv_proj",)))


@pytest.mark.parametrize("entry", ANALYTIC, ids=lambda e: e.short_name)
def test_every_catalog_model_has_consistent_terms(entry):
    spec = resolve_model(entry.hf_id)
    n, rotary = spec.num_parameters, 2 * (spec.rotary_dim // 2) * 4
    # a VL tower stays frozen in the load dtype; DeepSeek's routers keep an fp32 weight (_keep_in_fp32_modules_strict)
    # and V3's an fp32 e_score_correction_bias buffer per MoE layer
    vision = spec.vision_params
    router = spec.moe_layers * spec.num_experts * spec.hidden_size if spec.family.router != "softmax" else 0
    rotary += spec.moe_layers * spec.num_experts * 4 if spec.family.router == "sigmoid" else 0
    rotary += spec.num_layers * spec.family.layer_buffer_elems * 2  # Qwen-1's logn_tensor, in the bf16 load dtype
    trained = n - vision
    # full bf16 AMP with AdamW: fp32 master weights, gradients, two states and the foreach step copy coexist
    full = estimate(spec, TrainConfig(method=Method.FULL))
    assert full.trainable_params == trained
    assert full.term("weights") == 4 * trained + 2 * vision + rotary
    assert full.term("optimizer_states") == 2 * 4 * trained
    assert full.peak_allocated_bytes >= 20 * trained + rotary
    # LoRA (the default, all-linear; attention only for MoE, where peft also wraps the experts): r x (in + out)
    # per adapted linear in every layer, over bf16 base weights
    linears = spec.attention_linears() + (() if spec.is_moe else spec.mlp_linears())
    train = TrainConfig(lora_targets=tuple(lin.name for lin in linears)) if spec.is_moe else TrainConfig()
    lora = estimate(spec, train)
    # Qwen3.5: each layer kind's own Linears (the Gated DeltaNet's, or the full attention's)
    names = {lin.name for lin in linears} if spec.is_moe else None  # None: all-linear
    adapters = train.lora_rank * sum(lin.in_features + lin.out_features for i in range(spec.num_layers)
                                     for lin in (spec.layer_linears(i) if spec.layer_types else linears)
                                     if names is None or lin.name in names)
    assert lora.trainable_params == adapters
    assert lora.term("weights") == 2 * n + 4 * adapters + rotary + 2 * router
    assert lora.term("optimizer_states") == 2 * 4 * adapters
    assert lora.peak_allocated_bytes >= lora.term("weights") + lora.term("optimizer_states")
    for bd in (full, lora):
        assert all(t.bytes >= 0 for t in bd.terms), bd.terms
        assert sum(t.bytes for t in bd.terms) == bd.peak_allocated_bytes
