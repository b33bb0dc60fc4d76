"""The torchtune and LitGPT stacks (memplan.spec.stacks, issue #17): what each one quantizes, and torchao's NF4
quantizer's load-time temporaries measured on the CPU allocator."""

from __future__ import annotations

import pytest

from memplan.predict.estimator import estimate
from memplan.predict.layout import Layout
from memplan.predict.weights import model_states, quantized_bytes
from memplan.spec.catalog import resolve_model
from memplan.spec.packages import torchao_version
from memplan.spec.stacks import STACKS, Stack
from memplan.spec.train import Method, Precision, TrainConfig

QLORA = TrainConfig(method=Method.QLORA, precision=Precision.PURE_BF16, batch_size=2, seq_len=512, lora_rank=8)


def _weights(model: str, train: TrainConfig) -> int:
    return model_states(Layout.of(resolve_model(model), train)).weights_bytes


def test_torchtune_quantizes_only_the_adapted_linears() -> None:
    """torchtune's llama2 builders make q/k/v/output_proj LoRALinear(quantize_base) only when targeted: the other
    projections stay bf16 nn.Linear. With q,v adapted, k and o (4096 x 4096 each, 32 layers) are half, not 4-bit."""
    spec = resolve_model("llama-2-7b")
    qv = QLORA.with_(lora_targets=("q_proj", "v_proj"))
    ref = qv.with_(stack=Stack.REFERENCE)  # bitsandbytes through transformers, no k-bit upcast
    extra = _weights("llama-2-7b", qv.with_(stack=Stack.TORCHTUNE)) - _weights("llama-2-7b", ref)
    kept = 2 * spec.hidden_size * spec.hidden_size * spec.num_layers  # k_proj + o_proj per layer
    mlp = sum(lin.params for lin in spec.layer_linears() if lin.name in ("gate_proj", "up_proj", "down_proj"))
    mlp *= spec.num_layers
    q_all = sum(lin.params for lin in spec.layer_linears()) * spec.num_layers
    # the difference is those weights at 2 B instead of their 4-bit storage (the packing is per tensor group)
    layers = spec.num_layers  # 7 matrices a layer 4-bit under the reference stack, 2 (q, v) under torchtune's
    expected = 2 * (kept + mlp) - (quantized_bytes(q_all, qv, 0, tensors=7 * layers)
                                   - quantized_bytes(q_all - kept - mlp, qv, 0, tensors=2 * layers))
    assert abs(extra - expected) <= 8 * spec.num_layers * 16  # block rounding of the absmax terms
    # all linears adapted (the QLoRA tutorial's config): the same base as the reference stack
    every = QLORA.with_(lora_targets=("all-linear",))
    assert _weights("llama-2-7b", every.with_(stack=Stack.TORCHTUNE)) == \
        _weights("llama-2-7b", every.with_(stack=Stack.REFERENCE))


def test_litgpt_quantizes_the_lm_head() -> None:
    """Fabric's BitsandbytesPrecision replaces torch.nn.Linear at init: LitGPT's LM head is 4-bit too."""
    spec = resolve_model("llama-2-7b")
    qv = QLORA.with_(lora_targets=("q_proj", "v_proj"))
    ref = qv.with_(stack=Stack.REFERENCE)
    saved = _weights("llama-2-7b", ref) - _weights("llama-2-7b", qv.with_(stack=Stack.LITGPT))
    head = spec.vocab_size * spec.hidden_size
    assert saved == pytest.approx(2 * head - head * 0.5 - head / 64, rel=0.01)  # bf16 -> NF4 (+ absmax)


def _pinning(monkeypatch, variable: str, cached):
    """Pin a package version the estimate reads (memplan.spec.packages: `variable`, memoized by `cached`),
    restored after the test."""
    def pin(version: str) -> None:
        monkeypatch.setenv(variable, version)
        cached.cache_clear()
    yield pin
    monkeypatch.delenv(variable, raising=False)
    cached.cache_clear()


@pytest.fixture
def torchao(monkeypatch):
    yield from _pinning(monkeypatch, "MEMPLAN_TORCHAO_VERSION", torchao_version)


def test_torchtune_qlora_peaks_at_the_load(torchao) -> None:
    """torchao 0.1: quantizing the largest weight (the MLP's 11008 x 4096) holds (numel, 16) bf16 comparisons
    twice: the run's allocated peak is the load, above the training step, and the reserved peak at least the
    load's replay. torchao 0.2+ compares 1024**2 elements at a time: the step is the peak again."""
    torchao("0.1")
    spec = resolve_model("llama-2-7b")
    train = QLORA.with_(lora_targets=("all-linear",), stack=Stack.TORCHTUNE)
    bd = estimate(spec, train)
    largest = max(lin.params for lin in spec.layer_linears())
    load = dict(bd.phases)["load"]
    assert load == model_states(Layout.of(spec, train)).weights_bytes + 68 * largest
    assert bd.phase == "load" and bd.peak_allocated_bytes == load > dict(bd.phases)["step"]
    assert bd.peak_reserved_bytes > bd.peak_allocated_bytes
    # bitsandbytes' quantizer (through transformers) holds only the half weight: that run peaks in the step
    assert estimate(spec, train.with_(stack=Stack.REFERENCE)).phase != "load"
    torchao("0.2.0")
    chunked = estimate(spec, train)
    assert dict(chunked.phases)["load"] == load - 64 * (largest - 1024**2)
    assert chunked.phase != "load"


def test_torchao_nf4_quantizer_temporaries_on_the_cpu_allocator() -> None:
    """The CPU allocator's peak of torchao's to_nf4 on a bf16 weight already in place (smaller than one chunk, where
    the installed torchao runs torchao 0.1's whole-tensor code path), against the stack's temporaries without the
    device copy (the first 2 B: on CPU the weight is already there)."""
    torch = pytest.importorskip("torch")
    nf4 = pytest.importorskip("torchao.quantization.quantize_.workflows.nf4.nf4_tensor")
    from torch.profiler import ProfilerActivity, profile

    n = 1376 * 512
    w = torch.randn(1376, 512, dtype=torch.bfloat16)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        packed = nf4.to_nf4(w)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    # scaled blocks + (n, 16) bf16 twice, + the uint8 index buffer torchao 0.2+ preallocates (0.1: int64 indices,
    # made after the comparisons are freed); the rest (absmax, scalers) under 0.1 B/element
    derived = (sum(STACKS[Stack.TORCHTUNE].quantize_load_transients[1:]) + 1) * n
    assert n <= 1024**2 and peak == pytest.approx(derived, rel=0.002)  # measured 67.05 B/element
    assert packed.quantized_data.numel() == n // 2


def test_published_rows_name_their_stack() -> None:
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "published.py"
    spec = importlib.util.spec_from_file_location("published", path)
    published = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(published)  # type: ignore[union-attr]
    assert published.stack_of("torchtune lora_finetune_single_device") is Stack.TORCHTUNE
    assert published.stack_of("LitGPT finetune lora/full (Lightning Fabric)") is Stack.LITGPT
    assert published.stack_of("HF Trainer (transformers ~4.16)") is Stack.HF


def test_exact_mode_refuses_the_analytic_only_stacks() -> None:
    """The exact mode builds the transformers model (memplan.build.model): torchtune's and LitGPT's own model code
    and quantizers are not traced, so it says so instead of tracing another stack."""
    from memplan.errors import UnsupportedModel
    from memplan.trace.exact import exact_run

    for stack in (Stack.TORCHTUNE, Stack.LITGPT):
        with pytest.raises(UnsupportedModel, match=f"{stack.value} stack"):
            exact_run(resolve_model("llama-2-7b"), QLORA.with_(stack=stack))


@pytest.fixture
def bnb_era(monkeypatch):
    from memplan.spec.packages import bitsandbytes_version

    yield from _pinning(monkeypatch, "MEMPLAN_BITSANDBYTES_VERSION", bitsandbytes_version)


def test_litgpt_next_forward_runs_beside_the_previous_graph(bnb_era) -> None:
    """LitGPT's fit loop holds `logits` (fp32: Fabric's convert_output) until the next forward returns, and with it
    the graph, whose bitsandbytes 0.42 MatMul4Bit nodes keep every 4-bit linear's input in ctx.tensors: per layer
    both norm outputs, the attention output and the MLP product (layer 0's q/k/v input needs no grad), plus the LM
    head's input. The next forward's end is then the peak."""
    from memplan.predict.estimator import held_bytes

    spec = resolve_model("llama-2-7b")
    train = QLORA.with_(lora_rank=32, lora_targets=("q_proj", "v_proj"), stack=Stack.LITGPT, checkpointing=False)
    n, h, i, L = 2 * 512, spec.hidden_size, spec.intermediate_size, spec.num_layers
    bnb_era("0.43.1")
    lay = Layout.of(spec, train)
    assert held_bytes(lay) == 2 * n * (L * (3 * h + i) - h) + 2 * n * h  # bf16
    old_bd = estimate(spec, train)
    old = dict(old_bd.moments)
    assert max(old, key=old.__getitem__) == "forward previous" and old_bd.phase == "forward"
    bnb_era("0.43.2")  # (None, B): nothing held; the previous fp32 logits still are
    assert held_bytes(Layout.of(spec, train)) == 0
    new_bd = estimate(spec, train)
    new = dict(new_bd.moments)
    # the previous graph's held inputs, and this step's own (those no other op saves)
    own = old_bd.term("activations") - new_bd.term("activations")
    assert 0 < own < held_bytes(lay)
    head_input = 2 * n * h  # this step's 4-bit LM head input (counted with the head's saved tensors)
    assert old["forward previous"] - new["forward previous"] == held_bytes(lay) + own + head_input
    previous_logits = n * spec.vocab_size * 4
    assert new["forward previous"] - new["forward"] <= previous_logits < held_bytes(lay) < \
        old["forward previous"] - old["forward"]
    # stacks whose loop drops the output before the next forward have no such moment
    assert "forward previous" not in dict(estimate(spec, train.with_(stack=Stack.HF)).moments)


@pytest.mark.integration
@pytest.mark.parametrize("stack", [Stack.REFERENCE, Stack.HF])
def test_bnb_042_held_inputs_on_the_cpu_allocator(bnb_era, monkeypatch, stack) -> None:
    """bitsandbytes 0.42's MatMul4Bit.forward (`ctx.tensors = (A, B)`, autograd/_functions.py L522-523) on the
    installed kernels: after backward, dropping the output frees its logits, the loss and exactly what
    memplan's tape says the ctx attributes hold (autograd released everything saved_for_backward already)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.autograd import _functions as bnb_functions
    from torch.profiler import ProfilerActivity, profile

    from memplan.build.model import build_model
    from memplan.predict.estimator import held_bytes
    from memplan.spec.model import ModelSpec

    forward = bnb_functions.MatMul4Bit.forward

    def forward_042(ctx, A, B, out=None, bias=None, quant_state=None):  # noqa: N803 (bitsandbytes' names)
        y = forward(ctx, A, B, out, bias, quant_state)
        if any(ctx.needs_input_grad[:2]):
            ctx.tensors = (A, B)
        return y

    monkeypatch.setattr(bnb_functions.MatMul4Bit, "forward", staticmethod(forward_042))
    bnb_era("0.43.1")
    spec = ModelSpec.from_config_dict(dict(
        model_type="llama", hidden_size=256, intermediate_size=704, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=3, vocab_size=512, max_position_embeddings=512, tie_word_embeddings=False), name="t")
    train = TrainConfig(method=Method.QLORA, precision=Precision.PURE_BF16, batch_size=2, seq_len=64, stack=stack,
                        lora_targets=("q_proj", "v_proj"), checkpointing=False)
    torch.manual_seed(0)
    model = build_model(spec, train, device="cpu")
    ids = torch.randint(0, spec.vocab_size, (2, 64))
    marks = (12345, 12347)  # two marker allocations of sizes nothing else has
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = model(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
        torch.empty(marks[0], dtype=torch.uint8)
        dropped = out.logits.untyped_storage().nbytes() + out.loss.untyped_storage().nbytes()
        del out
        torch.empty(marks[1], dtype=torch.uint8)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live, at = 0, []
    for _, nbytes in events:
        live += nbytes
        if nbytes in marks:
            at.append(live - nbytes)
    held = held_bytes(Layout.of(spec, train, "cpu"))
    assert held > 0 and at[0] - at[1] == dropped + held  # measured to the byte (bf16 and upcast fp32 streams)


def _published():  # noqa: ANN202
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "published.py"
    spec = importlib.util.spec_from_file_location("published", path)
    published = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(published)  # type: ignore[union-attr]
    return published


def test_an_unnamed_statistic_of_torchtune_is_compared_as_reserved() -> None:
    """torchtune's memory_stats_log prints peak active, allocated and reserved at once (STACKS logged_stats): a
    'Peak Memory per GPU' naming none is one of them, and the run's reserved is at least it. A named statistic and
    a stack that logs nothing of its own keep the single-GPU table's rule."""
    published = _published()
    assert STACKS[Stack.TORCHTUNE].logged_stats == ("active", "allocated", "reserved")
    assert published.compared_multi("'Peak Memory per GPU' (torch stat not stated)", Stack.TORCHTUNE) == \
        "peak_reserved_bytes"
    assert published.compared_multi("peak memory active (torch active_bytes.all.peak)", Stack.TORCHTUNE) == \
        "peak_allocated_bytes"
    assert published.compared_multi("'Peak Memory per GPU'", Stack.HF) == "peak_allocated_bytes"


def test_every_multi_gpu_row_under_by_more_than_ten_percent_has_its_residual() -> None:
    """benchmarks/published.py's multi-GPU table: each row more than 10 % under is named in MULTI_RESIDUALS (its
    mechanism, or that it is unexplained), and each left-out row says why."""
    published = _published()
    if not published.DEFAULT_CSV.exists():
        pytest.skip("shared/reference/published_measurements.csv is not here")
    rows = published.compare_multi(published.DEFAULT_CSV)
    assert {r["id"] for r in rows} == set(published.MULTI_ROWS)
    named = " ".join(published.MULTI_RESIDUALS)
    for r in rows:
        if float(r["error_pct"]) < -10:
            assert str(r["id"]) in named, r
    assert not set(published.MULTI_ROWS) & {i for k in published.MULTI_LEFT_OUT for i in k.split(", ")}
