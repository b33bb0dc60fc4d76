import pytest

from memplan.errors import ConfigError
from memplan.predict.estimator import estimate
from memplan.spec.catalog import resolve_model
from memplan.spec.train import Attention, Method, Optimizer, Precision, TrainConfig

M7 = resolve_model("llama-2-7b")


def test_terms_sum_to_peak():
    bd = estimate(M7, TrainConfig(method=Method.FULL, checkpointing=False))
    assert sum(t.bytes for t in bd.terms) == bd.peak_allocated_bytes
    assert bd.peak_reserved_bytes >= bd.peak_allocated_bytes
    assert bd.total_bytes == bd.peak_reserved_bytes + bd.cuda_context_bytes


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


def test_every_catalog_model_estimates_quickly():
    from memplan.spec.catalog import catalog_entries

    for e in catalog_entries():
        if "bloom" in e.hf_id:
            continue
        bd = estimate(resolve_model(e.hf_id), TrainConfig())
        assert bd.peak_allocated_bytes > resolve_model(e.hf_id).num_parameters  # > 1 B/param for bf16 LoRA
