import pytest

from memplan.errors import ConfigError
from memplan.fit import PROGRESS_EVERY, fit, search_space
from memplan.spec.catalog import resolve_model
from memplan.spec.hardware import resolve_gpu
from memplan.spec.space import SearchSpace
from memplan.spec.train import Method, Precision, TrainConfig


def _fit(model, gpu, method, seq=2048, gb=16, **kw):
    return fit(resolve_model(model), TrainConfig().with_(method=method, seq_len=seq, **kw), resolve_gpu(gpu),
               SearchSpace(global_batch=gb))


def test_full_7b_does_not_fit_24gb_and_suggests():
    res = _fit("llama-2-7b", "24GB", Method.FULL)
    assert not res.fits
    assert any(s.candidate.fits for s in res.suggestions)
    assert res.suggestions[0].candidate.fits  # fitting changes come first


def test_lora_7b_fits_24gb_at_2048():
    res = _fit("llama-2-7b", "24GB", Method.LORA)
    assert res.fits and res.best.total_bytes <= res.usable_bytes


def test_qlora_7b_between_its_estimate_and_its_band_is_tight():
    """A card that holds the smallest QLoRA configuration's estimate but not its band (published QLoRA runs have
    exceeded their estimates by that much): tight, not fits; a card that holds the band too: fits."""
    from memplan.predict.breakdown import Verdict
    from memplan.spec.hardware import GPU

    spec, train = resolve_model("llama-2-7b"), TrainConfig().with_(method=Method.QLORA, seq_len=1024)
    small = fit(spec, train, resolve_gpu("1GB"), SearchSpace(global_batch=16)).best_effort.breakdown
    assert small.band > 0 and small.upper_bytes > small.total_bytes

    def on(usable: int):
        return fit(spec, train, GPU(name="sim", memory_bytes=int(usable / 0.95) + 1), SearchSpace(global_batch=16))

    tight = on((small.total_bytes + small.upper_bytes) // 2)
    assert not tight.fits and tight.best_effort.verdict is Verdict.TIGHT
    assert tight.best_effort.total_bytes <= tight.usable_bytes < tight.best_effort.breakdown.upper_bytes
    assert on(small.upper_bytes).fits


def test_full_70b_does_not_fit_80gb():
    assert not _fit("llama-2-70b", "a100-80gb", Method.FULL).fits


def test_effective_batch_kept_and_ranked_by_speed():
    res = _fit("llama-3-8b", "a100-80gb", Method.LORA, gb=32)
    assert res.ranked
    assert all(c.train.batch_size * c.train.grad_accum * c.train.gpus == 32 for c in res.ranked)
    speeds = [c.tokens_per_s for c in res.ranked]
    assert speeds == sorted(speeds, reverse=True)


def test_no_bf16_on_t4_and_bad_margin():
    with pytest.raises(ConfigError, match="bf16"):
        fit(resolve_model("llama-2-7b"), TrainConfig(), resolve_gpu("t4"),
            SearchSpace(global_batch=8, precisions=(Precision.BF16,)))
    assert all(c.train.precision is Precision.FP16 for c in
               fit(resolve_model("qwen2.5-0.5b"), TrainConfig(), resolve_gpu("t4"), SearchSpace(global_batch=8)).ranked)
    with pytest.raises(ConfigError, match="margin"):
        fit(resolve_model("llama-2-7b"), TrainConfig(), resolve_gpu("24GB"), SearchSpace(global_batch=8), margin=0.5)


def test_indivisible_global_batch():
    with pytest.raises(ConfigError, match="divisible"):
        fit(resolve_model("llama-2-7b"), TrainConfig().with_(gpus=3), resolve_gpu("24GB"), SearchSpace(global_batch=16))


def test_attention_list_is_searched_and_flash_refused_on_t4():
    from memplan.spec.train import Attention

    res = fit(resolve_model("llama-3-8b"), TrainConfig(), resolve_gpu("a100-80gb"),
              SearchSpace(global_batch=4, attentions=(Attention.SDPA, Attention.EAGER)))
    assert {c.train.attn for c in res.ranked} == {Attention.SDPA, Attention.EAGER}
    same = {(c.train.batch_size, c.train.precision, c.train.checkpointing): c for c in res.ranked
            if c.train.attn is Attention.SDPA}
    for c in res.ranked:  # eager materialises the scores: never less memory than sdpa
        if c.train.attn is Attention.EAGER:
            key = (c.train.batch_size, c.train.precision, c.train.checkpointing)
            assert key not in same or c.total_bytes >= same[key].total_bytes
    with pytest.raises(ConfigError, match="flash_attention_2"):
        fit(resolve_model("llama-2-7b"), TrainConfig(), resolve_gpu("t4"),
            SearchSpace(global_batch=4, precisions=(Precision.FP16,), attentions=(Attention.FLASH_ATTENTION_2,)))


def test_suggestions_include_more_gpus_with_the_effective_batch_kept():
    res = _fit("llama-2-7b", "24GB", Method.FULL)
    gpus = [s for s in res.suggestions if "GPUs" in s.change]
    assert gpus and any(s.candidate.fits for s in gpus)
    for s in gpus:
        t = s.candidate.train
        assert t.gpus > 1 and t.batch_size * t.grad_accum * t.gpus == 16
    # sharding divides the model states: more ranks, less memory per rank
    sizes = sorted((s.candidate.train.gpus, s.candidate.total_bytes) for s in gpus)
    assert [b for _, b in sizes] == sorted((b for _, b in sizes), reverse=True)


def test_a_long_search_reports_progress():
    from memplan.spec.train import Optimizer

    calls = []  # a 16 GB card: the screening pass still sees all 3,880 candidates, few of which fit and are
    # replayed through the allocator sketch (on 80 GB nearly all of them fit and are: minutes in CI)
    res = fit(resolve_model("llama-2-7b"), TrainConfig(), resolve_gpu("16GB"),
              SearchSpace(global_batch=64, lora_ranks=(8, 16, 32, 64, 128), gpu_counts=(1, 2, 4, 8),
                          optimizers=(Optimizer.ADAMW, Optimizer.ADAMW_8BIT)),
              on_progress=lambda done, total: calls.append((done, total)))
    assert res.searched > PROGRESS_EVERY and calls and all(total == res.searched for _, total in calls)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls) and calls[-1][0] <= res.searched


def test_fit_skips_layouts_a_pre_quantized_model_cannot_train() -> None:
    """ZeRO-3 / FSDP over an AWQ checkpoint is refused by LLaMA-Factory (and by the estimate): the search drops
    those candidates instead of failing, and fails with that reason only when nothing else is left."""
    import warnings

    from memplan.spec.train import Sharding

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the assumed quantization_config
        spec = resolve_model("TechxGenus/Meta-Llama-3-8B-Instruct-AWQ")
        res = fit(spec, TrainConfig(), resolve_gpu("24GB"), SearchSpace(global_batch=16, gpu_counts=(1, 2)))
        assert res.ranked and not any(c.train.sharding in (Sharding.ZERO3, Sharding.FULL_SHARD) for c in res.ranked)
        # and says so: how many were left out and why (they were dropped without a word before)
        dropped = sum(int(line.split()[0]) for line in res.left_out)
        assert dropped > 0 and all("incompatible with PTQ" in line for line in res.left_out), res.left_out
        assert len(search_space(TrainConfig(), resolve_gpu("24GB"),
                                SearchSpace(global_batch=16, gpu_counts=(1, 2)))) == res.searched + dropped
        with pytest.raises(ConfigError, match="incompatible with PTQ"):
            fit(spec, TrainConfig(), resolve_gpu("24GB"),
                SearchSpace(global_batch=16, gpu_counts=(2,), shardings=(Sharding.ZERO3,)))


@pytest.mark.parametrize("gpu", ["24GB", "16GB"])
def test_screening_at_the_reserved_lower_bound_changes_nothing(monkeypatch, gpu):
    """fit replays the full-depth reserved sketch only for candidates that fit at reserved's lower bound (and the
    smallest one): its result equals the one with every candidate replayed (the bound made a no-op). 16 GB: a
    card where little fits, so the smallest-memory search matters."""
    import contextlib
    import sys

    fit_module = sys.modules["memplan.fit"]  # the package (memplan.fit the attribute is the function)

    spec, base = resolve_model("llama-2-7b"), TrainConfig()
    space = SearchSpace(global_batch=8, lora_ranks=(8, 64))
    screened = fit(spec, base, resolve_gpu(gpu), space)
    monkeypatch.setattr(fit_module, "reserved_lower_bound", contextlib.nullcontext)
    full = fit(spec, base, resolve_gpu(gpu), space)
    assert screened.ranked == full.ranked and screened.best_effort == full.best_effort
    assert screened.suggestions == full.suggestions and screened.searched == full.searched
