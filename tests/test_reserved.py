"""Peak reserved memory: the exact mode replays its traced allocations through the caching-allocator model (and
deepens the traced events to the real depth); the analytic path replays a sketch; `memplan trace` prints it."""

import dataclasses
import json

from memplan.cli import main
from memplan.predict.allocator import ALLOC, FREE, replay
from memplan.predict.estimator import estimate
from memplan.spec.catalog import resolve_model
from memplan.spec.train import Method, TrainConfig
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
