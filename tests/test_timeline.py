"""`memplan trace --timeline`: the labels of the full depth's events, the self-contained page, the CLI, and the
page as a browser renders it (headless Chromium, Debian's `chromium` package; skipped where it is absent)."""

import dataclasses
import json
import re
import shutil
import subprocess

import pytest

from memplan.cli import main
from memplan.predict.allocator import ALLOC
from memplan.spec.train import Method, TrainConfig
from memplan.testing.tiny import tiny_spec
from memplan.trace.exact import exact_run
from memplan.trace.step import trace_depth
from memplan.trace.timeline import describe, full_depth_events, render_html, timeline_data

CFG = TrainConfig(method=Method.LORA, batch_size=2, seq_len=128, checkpointing=True)


def _deep(layers: int = 6):
    spec = tiny_spec("llama")
    return dataclasses.replace(spec, num_layers=layers, config={**spec.config, "num_hidden_layers": layers})


def _first_peak(events) -> int:
    """The first event at which live bytes reach their maximum."""
    live, best, at = 0, -1, 0
    for i, (kind, _key, nbytes, _stream) in enumerate(events):
        live += nbytes if kind == ALLOC else -nbytes
        if live > best:
            best, at = live, i
    return at


@pytest.mark.parametrize("checkpointing", [True, False])
def test_deepened_labels_equal_a_full_depth_trace(checkpointing):
    """The 6-layer events deepened from 2 and 3 traced layers name the same phase, module and op, allocation by
    allocation, as a trace of all 6 layers (copies of the repeated layer renumbered, the final norm kept last)."""
    spec, cfg = _deep(), CFG.with_(checkpointing=checkpointing)
    made = full_depth_events(exact_run(spec, cfg, labels=True), spec)
    full = trace_depth(spec, cfg, 6, labels=True)
    assert "deepen" in made.how
    assert [lb for e, lb in zip(made.events, made.labels, strict=True) if e[0] == ALLOC] == \
        [full.labels[i] for i, e in enumerate(full.events) if e[0] == ALLOC]
    assert any(".layers.5." in lb[1] for lb in made.labels if lb)  # the last copy's number


@pytest.fixture(scope="module")
def page_and_truth():
    """The timeline of the 6-layer model (deepened from 2 and 3 layers) and the peak label a 6-layer trace gives."""
    spec = _deep()
    data = timeline_data(exact_run(spec, CFG, labels=True), spec, "tiny llama")
    full = trace_depth(spec, CFG, 6, labels=True)
    at = _first_peak(full.events)
    expected = f"peak {full.peak / 2**20:.1f} MiB {describe(full.labels[at])}"  # a tiny model: under a GiB
    return data, render_html(data), full, expected


def test_page_is_self_contained_and_names_the_peak(page_and_truth):
    data, page, full, expected = page_and_truth
    assert data["peak"]["bytes"] == full.peak  # the replayed live bytes peak where the tracker's did
    assert data["peak"]["label"] == expected and re.fullmatch(r"peak \d+\.\d MiB during \w+ at aten::\w+ in \S+",
                                                               expected)
    assert json.dumps(expected)[1:-1] in page
    for reference in ("http://", "https://", "<link", " src=", "@import", "url("):
        assert reference not in page, reference
    assert data["reserved_peak"] == full.peak_reserved  # the allocator replay of the same events
    assert {p[2] for p in data["phases"]} >= {"forward", "loss", "backward", "optimizer"}
    assert [r[2] for r in data["layers"]][:6] == [f"layer {n}" for n in range(6)]
    assert data["top"] and data["top"][0]["bytes"] >= data["top"][-1]["bytes"] > 0


def test_trace_command_writes_the_timeline(tmp_path, capsys):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                               "num_attention_heads": 4, "num_hidden_layers": 4, "vocab_size": 100}))
    page = tmp_path / "step.html"
    assert main(["trace", "--model", str(cfg), "--seq-len", "64", "--timeline", str(page), "--json"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["method"] == "exact" and f"timeline: {page}" in out.err
    assert "during" in page.read_text() and "peak " in page.read_text()
    for bad in (str(tmp_path / "step.png"), str(tmp_path / "missing" / "step.html")):
        assert main(["trace", "--model", str(cfg), "--seq-len", "64", "--timeline", bad]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("memplan: error: --timeline") and "\n" not in err


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.integration
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install chromium; .ci/run does)")
def test_chromium_renders_the_peak_label(tmp_path, page_and_truth):
    """The page opened from a file in headless Chromium: its inline script writes the peak label into the DOM."""
    _data, page, _full, expected = page_and_truth
    path = tmp_path / "step.html"
    path.write_text(page, encoding="utf-8")
    out = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                          "--disable-component-update", "--disable-sync", "--no-first-run",
                          f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", path.as_uri()],
                         capture_output=True, text=True, timeout=120)
    dom = out.stdout
    assert 'data-rendered="1"' in dom, out.stderr[-2000:]  # the script ran to its end
    label = re.search(r'<p id="peak-label">(.*?)</p>', dom)
    assert label is not None and label.group(1) == expected
    assert dom.count("<polyline") == 2 and "peak-mark" in dom  # the two curves and the peak's marker were drawn
