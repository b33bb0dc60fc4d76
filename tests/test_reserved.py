"""Peak reserved memory: the exact mode replays its traced allocations through the caching-allocator model (and
deepens the traced events to the real depth); the analytic path replays a sketch; `memplan trace` prints it."""

import dataclasses
import json

import pytest

from memplan.cli import main
from memplan.predict.allocator import ALLOC, FREE, replay
from memplan.predict.estimator import estimate
from memplan.spec.catalog import resolve_model
from memplan.spec.train import Method, Precision, TrainConfig
from memplan.testing.tiny import tiny_spec
from memplan.trace.deepen import deepen
from memplan.trace.exact import exact_estimate
from memplan.trace.step import trace_depth

MIB = 2**20


def _layered(layers: int) -> list[tuple[str, int, int, int]]:
    """A step of a `layers`-deep toy model: per-layer weights, a forward that keeps one activation per layer and
    frees the previous layer's output, a backward that frees them in reverse, gradients passed down."""
    ev: list[tuple[str, int, int, int]] = []
    ids = iter(range(1, 10**6))

    def new(nbytes: int) -> int:
        ev.append((ALLOC, key := next(ids), nbytes, 0))
        return key

    def free(key: int, nbytes: int) -> None:
        ev.append((FREE, key, nbytes, 0))

    for _ in range(layers):
        new(12 * MIB)  # a weight
    x = new(3 * MIB)
    kept = []
    for _ in range(layers):
        kept.append(new(7 * MIB))  # saved for backward
        y = new(3 * MIB)
        free(x, 3 * MIB)
        x = y
    g = new(3 * MIB)
    free(x, 3 * MIB)
    for k in reversed(kept):
        tmp = new(11 * MIB)
        g2 = new(3 * MIB)
        free(tmp, 11 * MIB)
        free(g, 3 * MIB)
        free(k, 7 * MIB)
        g = g2
    free(g, 3 * MIB)
    return ev


def test_deepened_events_replay_like_the_deep_ones():
    """deepen(2 layers, 3 layers, 5 more) replays exactly as the 8-layer sequence itself."""
    made = deepen(_layered(2), _layered(3), 5)
    assert made is not None and len(made) == len(_layered(8))
    assert replay(made) == replay(_layered(8))


def test_a_trace_reports_the_replay_of_its_events():
    tr = trace_depth(tiny_spec("llama"), TrainConfig(method=Method.FULL, batch_size=2, seq_len=128), 2)
    stats = replay(tr.events)
    assert stats.peak_requested_bytes == tr.peak  # the events are the tracker's live bytes, in order
    assert tr.peak_reserved == stats.peak_reserved_bytes >= stats.peak_allocated_bytes >= tr.peak
    assert tr.reserved_allocated == stats.allocated_at_peak_reserved_bytes


def test_exact_reserved_is_the_replay_at_the_real_depth():
    spec = tiny_spec("llama")
    deep = dataclasses.replace(spec, num_layers=6, config={**spec.config, "num_hidden_layers": 6})
    cfg = TrainConfig(method=Method.LORA, batch_size=2, seq_len=128, checkpointing=False)
    bd = exact_estimate(deep, cfg, device="cpu")
    full = trace_depth(deep, cfg, 6)  # what the deepened 2- and 3-layer events stand for
    assert "deepened" in bd.reserved_explain
    assert bd.peak_reserved_bytes == full.peak_reserved >= bd.peak_allocated_bytes
    assert bd.fragmentation_bytes == full.peak_reserved - full.reserved_allocated


def test_analytic_reserved_comes_from_the_allocator_model():
    bd = estimate(resolve_model("llama-2-7b"), TrainConfig(batch_size=1, seq_len=2048))
    assert bd.peak_reserved_bytes >= bd.peak_allocated_bytes
    assert bd.peak_reserved_bytes != int(bd.peak_allocated_bytes * 1.05) + 40 * MIB  # not the old constant


def test_trace_command_prints_the_replayed_reserved(capsys, tmp_path, monkeypatch):
    from memplan.cli import render

    monkeypatch.setattr(render.console, "width", 400)  # one line per row
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                               "num_attention_heads": 4, "num_hidden_layers": 4, "vocab_size": 100}))
    assert main(["trace", "--model", str(cfg), "--seq-len", "64", "--explain"]) == 0
    out = capsys.readouterr().out
    assert "peak reserved" in out and "replayed through the caching-allocator model" in out
    assert main(["trace", "--model", str(cfg), "--seq-len", "64", "--json"]) == 0
    memory = json.loads(capsys.readouterr().out)["memory"]
    full = trace_depth(resolve_model(str(cfg)), TrainConfig(seq_len=64), 4)  # the CLI's defaults, at full depth
    from memplan.predict.allocator import allocation_size
    from memplan.predict.cuda import cuda_workspace_requests

    workspaces = sum(allocation_size(n) for n in cuda_workspace_requests())  # the CUDA-only cuBLAS segments
    assert memory["peak_reserved_bytes"] == full.peak_reserved + workspaces >= memory["peak_allocated_bytes"]
    assert memory["fragmentation_bytes"] == full.peak_reserved - full.reserved_allocated


def _sketch(name: str, **train: object) -> tuple[object, list[tuple[str, int, int, int]]]:
    from memplan.predict.layout import Layout
    from memplan.predict.reserve import sketch_events
    from memplan.predict.weights import model_states

    spec = resolve_model(name)
    lay = Layout.of(spec, TrainConfig(**train))
    return spec, list(sketch_events(lay, model_states(lay)))


@pytest.mark.parametrize(("precision", "ckpt", "copies"), [
    (Precision.BF16, False, 1),  # cast in forward, kept for the layer's backward (the graph saves it)
    (Precision.BF16, True, 2),  # cast in forward (autocast's cache), cast again when the backward recomputes
    (Precision.FP32, False, 0),  # no autocast
])
def test_the_sketch_makes_autocast_weight_copies(precision, ckpt, copies):
    """Full fine-tuning under AMP: each decoder layer's fp32 MLP weights get a half copy (without them the
    analytic reserved of Llama-3.2-1B full bf16 missed the replay by -15 %, allocator_catalog.md)."""
    spec, events = _sketch("meta-llama/Llama-3.2-1B", method=Method.FULL, precision=precision, batch_size=1,
                           seq_len=384, checkpointing=ckpt)  # 384 tokens: no activation of a weight's size
    gate = next(lin for lin in spec.layer_linears() if lin.name == "gate_proj")
    same = sum(1 for lin in spec.layer_linears() if lin.params == gate.params)  # gate, up, down
    made = sum(1 for kind, _, nbytes, _ in events if kind == ALLOC and nbytes == gate.params * 2)
    assert made == copies * same * spec.num_layers


def test_the_sketch_has_the_loss_and_optimizer_phases():
    """The (B, S, V) fp32 loss tensors (upcast, log-probs and the two gradients) and foreach AdamW's
    _foreach_sqrt copy of each trained tensor after backward."""
    spec, events = _sketch("meta-llama/Llama-3.2-1B", method=Method.FULL, precision=Precision.BF16, batch_size=1,
                           seq_len=384)
    n, v = 384, spec.vocab_size
    assert sum(1 for kind, _, nbytes, _ in events if kind == ALLOC and nbytes == n * v * 4) == 4
    gate = next(lin for lin in spec.layer_linears() if lin.name == "gate_proj")
    last_grad_free = max(i for i, (kind, _, nbytes, _) in enumerate(events)
                         if kind == FREE and nbytes == gate.params * 4 and i > len(events) // 2)
    step = [e for e in events[:last_grad_free] if e[0] == ALLOC and e[2] == gate.params * 4]
    assert len(step) >= 4 * spec.num_layers  # two states, the gradient and the step's copy per layer


@pytest.mark.parametrize(("name", "method", "precision", "batch", "seq", "ckpt"), [
    ("meta-llama/Llama-3.2-1B", Method.FULL, Precision.BF16, 2, 1024, False),  # autocast copies, foreach step
    ("microsoft/Phi-3-mini-4k-instruct", Method.LORA, Precision.BF16, 2, 1024, True),  # recompute, LoRA branch
    ("meta-llama/Llama-3.2-3B", Method.FREEZE, Precision.BF16, 2, 1024, True),  # frozen layers below
])
def test_analytic_reserved_agrees_with_the_exact_replay(name, method, precision, batch, seq, ckpt):
    """The analytic reserved (a full-depth sketch) within 2 % of the exact mode's replay: rows of
    benchmarks/results/allocator_catalog.md."""
    spec = resolve_model(name)
    cfg = TrainConfig(method=method, precision=precision, batch_size=batch, seq_len=seq, checkpointing=ckpt)
    exact = exact_estimate(spec, cfg)
    analytic = estimate(spec, cfg)
    assert abs(analytic.peak_reserved_bytes / exact.peak_reserved_bytes - 1) <= 0.02


def test_tape_lifetimes_follow_the_programs_references():
    """A storage is made where the program makes it and dropped where its last reference (views included) goes;
    the input, made before the recording, and parameters are not counted."""
    from memplan.predict.tape import DROPPED, MADE, T, Tape, param

    tape = Tape()
    x = T(10, 2, True)
    with tape.recording() as rec:
        a = tape.new(x)
        b = tape.mul(a, param(10, 4, True))  # saves a
        del a  # saved, yet dropped here: what a checkpointed forward does with it
        v = b.view(5)
        del b  # the view still holds the storage
        y = tape.new(v, width=4)
        del v
        x.view(3)  # a view of the untracked input
    assert [(kind, nbytes) for kind, _, nbytes in rec.events] == [
        (MADE, 20), (MADE, 40), (DROPPED, 20), (MADE, 20), (DROPPED, 40)]
    assert y.nbytes == 20 and len(tape.saved) == 1
    del y
    assert len(rec.events) == 5  # nothing recorded once the recording closed


# ---- the sketch of the newer families: each layer its own kind and parameters ------------------------------------

@pytest.mark.parametrize("name", ["mixtral-8x7b-v0.1", "qwen3-30b-a3b", "deepseek-v2-lite", "qwen3.5-4b",
                                  "llama-4-scout-17b-16e-instruct", "qwen2-vl-7b-instruct", "gpt-oss-20b"])
@pytest.mark.parametrize("method", [Method.LORA, Method.FULL])
def test_the_sketch_loads_the_models_weights(name, method):
    """The load's requests add up to the estimator's weights: per-layer Linears (Qwen3.5's Gated DeltaNet or
    attention), the 3D experts once, the shared experts once (Llama 4), the wrapped experts' adapters (Mixtral,
    Qwen3-MoE), DeepSeek's fp32 routers, a VL tower (Qwen2-VL, Qwen3.5). Before: -3 % to +24 % on these."""
    from memplan.predict.layout import Layout
    from memplan.predict.reserve import _all_layer_params, _load, _Program
    from memplan.predict.weights import model_states

    spec = resolve_model(name)
    lay = Layout.of(spec, TrainConfig(method=method, batch_size=1, seq_len=512))
    p = _Program()
    _load(p, lay, _all_layer_params(lay, 1.0, spec.num_layers), 1.0, quantizer=False)
    weights = model_states(lay).weights_bytes  # (its rotary / router-bias buffers are not requests of the load)
    assert abs(sum(n for n, _ in p.sizes) / weights - 1) < 1e-4


@pytest.mark.parametrize("arch", ["gemma3_text", "qwen3_5", "llama4_text", "deepseek_v3-moe"])
def test_the_sketch_runs_each_layer_as_its_own_kind(arch):
    """Each decoder layer's program saves what activations.layers_saved gives for that layer (Gemma 3's global
    layers no sdpa mask, Qwen3.5's full-attention layer no Gated DeltaNet, Llama 4's NoPE layer, DeepSeek's dense
    layer): the sketch once ran every layer as the first kind."""
    from memplan.predict.activations import layers_saved
    from memplan.predict.layout import Layout
    from memplan.predict.reserve import _layer_kind, _program
    from memplan.predict.tape import MADE

    spec = tiny_spec(arch)
    lay = Layout.of(spec, TrainConfig(method=Method.FULL, precision=Precision.FP32, batch_size=2, seq_len=256))
    hidden = 2 * 256 * spec.hidden_size * 4
    saved = []
    for i in range(spec.num_layers):
        prog = _program(lay, _layer_kind(lay, i))
        saved.append(sum(n for kind, key, n in prog.events if kind == MADE and key in prog.saved)
                     + hidden * prog.input_saved)
    assert len(set(saved)) > 1  # the kinds differ here
    want = layers_saved(lay, range(spec.num_layers), batch=2, seq=256, trains=True, x_rg=True)
    assert abs(sum(saved) - want) < spec.num_layers  # (a mean over kinds, floored, where layers_saved takes one)


@pytest.mark.parametrize(("ckpt", "per_layer"), [(False, 4), (True, 6)])
def test_the_sketch_has_peft_s_merged_expert_weights(ckpt, per_layer):
    """LoRA on all-linear wraps Mixtral's experts: each forward computes the merged gate_up (E, 2I, H) twice (the
    parametrization's check, then the cached one; again when checkpointing recomputes), and the backward makes
    its gradient (and the weight itself, bf16, is loaded)."""
    spec, events = _sketch("mistralai/Mixtral-8x7B-v0.1", method=Method.LORA, precision=Precision.BF16,
                           batch_size=1, seq_len=256, checkpointing=ckpt)
    gate_up = spec.num_experts * 2 * spec.moe_intermediate_size * spec.hidden_size * 2
    made = sum(1 for kind, _, nbytes, _ in events if kind == ALLOC and nbytes == gate_up)
    assert made == per_layer * spec.num_layers


@pytest.mark.parametrize("ckpt", [False, True])
def test_the_sketch_frees_the_merged_expert_weights_where_their_gradients_are_made(ckpt):
    """The sketch's live peak is the analytic one (Mixtral 8x7B LoRA, b1 x s1024): each merged weight goes once its
    gradient is made, as in the exact trace (held to the layer's end, the sketch was 0.85 GiB over at 3 layers)."""
    from memplan.predict.cuda import cuda_workspace_requests

    name = "mistralai/Mixtral-8x7B-v0.1"
    train = dict(method=Method.LORA, precision=Precision.BF16, batch_size=1, seq_len=1024, checkpointing=ckpt)
    _, events = _sketch(name, **train)
    live = estimate(resolve_model(name), TrainConfig(**train)).peak_allocated_bytes - sum(cuda_workspace_requests())
    assert abs(replay(events).peak_requested_bytes / live - 1) < 0.003
