"""The speed model (memplan.fit.speed) keeps the orderings the published throughput shows, and the calibration
benchmark's data file (benchmarks/data/published_throughput.csv) parses, every row with its source."""

import importlib.util
import sys
from pathlib import Path

import pytest

from memplan.fit.speed import predicted_tokens_per_s
from memplan.spec.catalog import resolve_model
from memplan.spec.hardware import gpu_catalog
from memplan.spec.model import ModelSpec
from memplan.spec.parallel import Parallelism, Sharding
from memplan.spec.stacks import Stack
from memplan.spec.train import Method, Precision, QuantMethod, TrainConfig

A100 = gpu_catalog()["a100-80gb"]
LLAMA7 = resolve_model("llama-2-7b")
LORA = TrainConfig(method=Method.LORA, batch_size=2, seq_len=2048, lora_targets=("q_proj", "v_proj"))
BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "speed_published.py"


def speed(train: TrainConfig, spec: ModelSpec = LLAMA7) -> float:
    return predicted_tokens_per_s(spec, train, A100)


@pytest.mark.parametrize("quant", [dict(), dict(quant_method=QuantMethod.GPTQ), dict(stack=Stack.TORCHTUNE)],
                         ids=["bnb", "gptq", "torchao"])
def test_qlora_is_slower_than_lora_at_equal_batch(quant):
    """Every source with both: torchtune 0.98, LitGPT 0.69-0.75, ms-swift 0.48-0.56, Qwen 0.40-0.95."""
    lora = LORA.with_(**quant)
    assert speed(lora.with_(method=Method.QLORA)) < speed(lora)


def test_torchao_nf4_costs_less_than_bitsandbytes():
    """torchtune's QLoRA lost 2 % against its LoRA; bnb-based stacks lose 25-45 %."""
    q = LORA.with_(method=Method.QLORA)
    assert speed(q) < speed(q.with_(stack=Stack.TORCHTUNE)) < speed(LORA)


@pytest.mark.parametrize("method", [Method.FULL, Method.LORA])
def test_checkpointing_is_slower_by_about_a_forward(method):
    """torchtune full 0.79, ms-swift LoRA 0.70: the recomputed forward costs a third of LoRA's step, a quarter of
    a full fine-tune's (its backward also computes weight gradients)."""
    on = LORA.with_(method=method, checkpointing=True)
    ratio = speed(on) / speed(on.with_(checkpointing=False))
    assert 0.6 < ratio < 0.85
    if method is Method.FULL:
        assert ratio > speed(LORA.with_(checkpointing=True)) / speed(LORA.with_(checkpointing=False))


def test_throughput_rises_with_micro_batch_and_saturates():
    """fms-acceleration: micro-batch 4 -> 8 at 4096 tokens gains 1-3 %; Qwen README: short micro-batches are
    host-bound (1.8B LoRA at 256 and 512 tokens both 1.0 s/it)."""
    rates = [speed(LORA.with_(batch_size=b, seq_len=256)) for b in (1, 2, 4, 8, 16)]
    assert rates == sorted(rates) and len(set(rates)) == len(rates)
    gains = [b / a for a, b in zip(rates, rates[1:], strict=False)]
    assert gains[-1] < gains[0] and gains[-1] < 1.1


def test_small_micro_batches_are_host_bound():
    """Doubling a short micro-batch of a small model doubles tokens/s (the step time is the host's, as the Qwen
    README's 1.8B LoRA rows show), a large one barely moves it."""
    tiny = resolve_model("tinyllama-1.1b-intermediate-step-1431k-3t")
    small = speed(LORA.with_(batch_size=1, seq_len=128), tiny)
    assert speed(LORA.with_(batch_size=1, seq_len=256), tiny) / small == pytest.approx(2.0, rel=0.01)
    large = speed(LORA.with_(batch_size=4, seq_len=4096))
    assert speed(LORA.with_(batch_size=8, seq_len=4096)) / large < 1.05


def test_lora_is_faster_than_full_and_more_targets_cost_more():
    """fms-acceleration Mistral-7B 1.09, torchtune 3B 1.13; ms-swift all-linear vs c_attn 0.75."""
    assert speed(LORA) > speed(LORA.with_(method=Method.FULL))
    assert speed(LORA.with_(lora_targets=("all-linear",))) < speed(LORA)


def test_sharded_parameters_scale_less_than_linearly_and_less_for_short_micro_batches():
    """fms-acceleration, Mistral-7B FSDP full_shard on 2 A100s: 1.97x one GPU at micro-batch 4; per-device tokens/s
    8 % lower at micro-batch 2 than at 4 (the gathers do not shrink with the batch)."""
    full = LORA.with_(method=Method.FULL, precision=Precision.PURE_BF16, batch_size=4, seq_len=4096)
    two = full.with_(parallel=Parallelism(gpus=2, sharding=Sharding.FULL_SHARD))
    assert 1.5 < speed(two) / speed(full) < 2.0
    assert speed(two.with_(batch_size=2)) < speed(two)
    assert speed(two.with_(batch_size=2)) / speed(two) < speed(full.with_(batch_size=2)) / speed(full)


def test_gradient_accumulation_does_not_change_tokens_per_s():
    """ms-swift: GA 1 to 64 all 4.26-4.33 samples/s."""
    assert speed(LORA.with_(grad_accum=16)) == speed(LORA)


def _bench():
    spec = importlib.util.spec_from_file_location("speed_published", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["speed_published"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_the_published_throughput_file_parses_and_every_row_has_a_source():
    bench = _bench()
    text = bench.DATA.read_text()
    assert "Left out" in text  # the rows not used, with their reasons, are in the file itself
    raw = bench.read_rows()
    ids = [r["id"] for r in raw]
    assert len(ids) == len(set(ids)) and len(ids) > 50
    by_id = dict(zip(ids, raw, strict=True))
    for r in raw:
        ref = r["source_ref"]
        assert r["source"] and ref.startswith("github ") and "@" in ref and (" L" in ref or "(" in ref), r["id"]
        assert float(r["measured"]) > 0 and float(r["tokens_per_s"]) > 0, r["id"]
        if r["compare"]:  # a ratio: its base is in the same source, on the same GPU
            base = by_id[r["base"]]
            assert base["source"] == r["source"] and base["gpu"] == r["gpu"], r["id"]
            assert r["unit"] == base["unit"] or {r["unit"], base["unit"]} <= {"tokens/s", "tokens/s per device"}
    rows = bench.load()  # every row is a configuration memplan states: catalog model or built config, its GPU
    assert len(rows) == len(raw) and all(row.terms.flops > 0 for row in rows)
    assert len(bench.ratio_pairs(rows)) == sum(1 for r in raw if r["compare"])
