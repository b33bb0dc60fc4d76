"""What `memplan trace --timeline` costs on a 7B model: wall seconds of `memplan trace` with and without it in fresh
interpreters (alternating, median and best of --runs), the page's size, and in-process the labelled trace of one
depth against the plain one and the page's build. Writes benchmarks/results/timeline_speed.json.

    python benchmarks/timeline_speed.py [--model llama-2-7b] [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "timeline_speed.json"


def _wall(args: list[str]) -> tuple[float, float]:
    """Wall seconds of one fresh `memplan trace`, and its CPU seconds (user + sys, the forked child's included:
    less sensitive than wall time to other processes on a shared machine)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "memplan", "trace", *args], check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def _in_process(model: str) -> dict:
    """One depth (3 layers) traced plain and labelled, best of 3 each; the page built from an exact run."""
    from memplan.spec.catalog import resolve_model
    from memplan.spec.train import TrainConfig
    from memplan.trace.exact import exact_run
    from memplan.trace.step import trace_depth
    from memplan.trace.timeline import render_html, timeline_data

    spec, train = resolve_model(model), TrainConfig()
    trace_depth(spec, train, 1)  # warm: imports and first-call caches
    best: dict[str, float] = {}
    for _ in range(3):
        for labels in (False, True):
            start = time.perf_counter()
            trace_depth(spec, train, 3, labels=labels)
            key = "trace_3_layers_labelled_s" if labels else "trace_3_layers_plain_s"
            best[key] = min(best.get(key, 1e9), round(time.perf_counter() - start, 3))
    run = exact_run(spec, train, labels=True)
    start = time.perf_counter()
    page = render_html(timeline_data(run, spec, model))
    best["page_build_s"] = round(time.perf_counter() - start, 3)
    best["page_bytes"] = len(page.encode())
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-2-7b")
    parser.add_argument("--runs", type=int, default=5)
    opts = parser.parse_args()
    page = Path(tempfile.mkdtemp()) / "step.html"
    load = os.getloadavg()[0]
    plain, timeline = [], []
    for _ in range(opts.runs):  # alternating, so a busy moment of the machine hits both alike
        plain.append(_wall(["--model", opts.model]))
        timeline.append(_wall(["--model", opts.model, "--timeline", str(page)]))
    def summary(runs: list[tuple[float, float]]) -> dict:
        walls, cpus = [w for w, _ in runs], [c for _, c in runs]
        return {"wall_median": round(statistics.median(walls), 2), "wall_best": round(min(walls), 2),
                "cpu_median": round(statistics.median(cpus), 2), "cpu_best": round(min(cpus), 2)}

    result = {
        "command": f"python benchmarks/timeline_speed.py --model {opts.model} --runs {opts.runs}",
        "what": "memplan trace (defaults: LoRA, bf16, b1 x s2048, checkpointing) in fresh interpreters, wall "
                "seconds including imports, alternating plain and --timeline; then in-process: one 3-layer depth "
                "traced plain and labelled (best of 3), and the page built from the exact run's traces; cpu: user + "
                "sys seconds of the process and its forked child",
        "cpus": os.cpu_count(),
        "load_average_at_start": load,
        "plain_s": summary(plain),
        "timeline_s": summary(timeline),
        "page_bytes": page.stat().st_size,
        "in_process": _in_process(opts.model),
    }
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
