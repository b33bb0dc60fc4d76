"""Analytic estimate vs the exact mode (fake-tensor trace) on every catalog model at realistic sizes, and the exact
mode's wall time for a 7B and a 70B model including imports.

    python benchmarks/exact_vs_analytic.py   # -> benchmarks/results/exact_vs_analytic.{csv,md}, exact_speed.json
    python benchmarks/exact_vs_analytic.py --speed-only [--label NAME]   # -> exact_speed.json alone
"""

from __future__ import annotations

import csv
import json
import statistics
import sys
import time
from pathlib import Path

from memplan.predict.estimator import estimate
from memplan.spec.catalog import catalog_entries, resolve_model
from memplan.spec.train import Method, Precision, TrainConfig
from memplan.trace.exact import exact_estimate

RESULTS = Path(__file__).parent / "results"
CONFIGS = [  # method, precision, batch, seq, checkpointing
    (Method.FULL, Precision.BF16, 1, 512, False),
    (Method.LORA, Precision.BF16, 4, 4096, True),
    (Method.LORA, Precision.PURE_BF16, 8, 8192, False),
    (Method.QLORA, Precision.BF16, 2, 2048, True),
    (Method.FREEZE, Precision.FP32, 2, 1024, False),
]
SPEED = ("llama-2-7b", "llama-2-70b")


def compare() -> list[dict[str, object]]:
    rows = []
    for entry in catalog_entries():
        spec = resolve_model(entry.hf_id)
        if not spec.analytic or spec.remote_code:
            continue  # exact-only, or code we do not run
        for method, prec, b, s, ckpt in CONFIGS:
            cfg = TrainConfig(method=method, precision=prec, batch_size=b, seq_len=s, checkpointing=ckpt)
            t0 = time.perf_counter()
            exact = exact_estimate(spec, cfg)
            dt = time.perf_counter() - t0
            analytic = estimate(spec, cfg)
            diff = 100 * (analytic.peak_allocated_bytes / exact.peak_allocated_bytes - 1)
            rows.append(dict(model=entry.short_name, method=method.value, precision=prec.value, batch=b, seq=s,
                             checkpointing=ckpt, exact_gib=round(exact.peak_allocated_bytes / 2**30, 3),
                             analytic_gib=round(analytic.peak_allocated_bytes / 2**30, 3), diff_pct=round(diff, 3),
                             exact_phase=exact.phase, analytic_phase=analytic.phase, trace_s=round(dt, 2)))
            print(rows[-1], flush=True)
    return rows


def speed(runs: int = 7) -> dict[str, object]:
    """Median and best wall seconds of fresh interpreters (this machine's timings drift by ~10 % run to run)."""
    import importlib.metadata
    import importlib.util
    import os

    from speed import walls  # benchmarks/speed.py: wall seconds of fresh interpreters

    def stats(cmd: list[str]) -> dict[str, float]:
        times = walls(cmd, runs)
        return {"median": round(statistics.median(times), 2), "best": round(min(times), 2)}

    imports = "import os, torch, transformers, peft; from transformers import LlamaForCausalLM; os._exit(0)"
    out: dict[str, object] = {
        "python": sys.executable, "cpus": os.cpu_count(),
        "distributions": len(list(importlib.metadata.distributions())),
        "scipy (transformers imports it when present)": importlib.util.find_spec("scipy") is not None,
        "imports only (torch, transformers + llama model code, peft; exit without teardown, as memplan)":
            stats([sys.executable, "-c", imports])}
    for name in SPEED:
        trace = ["trace", "--model", name, "--seq-len", "2048", "--json"]
        out[name] = stats([sys.executable, "-m", "memplan", *trace])
        # the same with the deepest depth traced in turn rather than in a forked child (as on one CPU)
        out[f"{name}, no fork"] = stats([sys.executable, "-c", "import os, sys; os.cpu_count = lambda: 1; "
                                         f"sys.argv = ['memplan', *{trace!r}]; from memplan.cli import run; run()"])
    for name in SPEED:  # the trace alone: in this process, imports done, after one warm-up trace
        spec, cfg = resolve_model(name), TrainConfig(seq_len=2048)
        exact_estimate(spec, cfg)
        t0 = time.perf_counter()
        exact_estimate(spec, cfg)
        out[f"{name} trace only (in-process, warm)"] = round(time.perf_counter() - t0, 2)
    return out


if __name__ == "__main__":
    RESULTS.mkdir(exist_ok=True)
    label = sys.argv[sys.argv.index("--label") + 1] if "--label" in sys.argv else "dev"
    timings = speed()
    path = RESULTS / "exact_speed.json"
    previous = json.loads(path.read_text()).get("environments", {}) if path.exists() else {}
    path.write_text(json.dumps(
        {"command": "python benchmarks/exact_vs_analytic.py --speed-only [--label NAME] (per environment: dev = "
                    "this repo's .[dev] install; clean-venv = a fresh venv with only `pip install torch==2.13.0 "
                    "-e .[trace]`, run with that venv's python)",
         "what": "memplan trace --seq-len 2048 in fresh interpreters, wall seconds including imports (median and "
                 "best of 7), on a 2-core CPU machine; and the trace alone in-process",
         "environments": {**previous, label: timings}}, indent=2) + "\n")
    if "--speed-only" in sys.argv:
        sys.exit(0)
    table = compare()
    with open(RESULTS / "exact_vs_analytic.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    diffs = [abs(float(r["diff_pct"])) for r in table]
    over = [r for r in table if abs(float(r["diff_pct"])) > 3]
    lines = ["# Analytic vs exact (fake-tensor trace of the real transformers model)\n",
             "Command: `python benchmarks/exact_vs_analytic.py`\n",
             f"{len(table)} configurations of {len({r['model'] for r in table})} catalog models: median |diff| "
             f"{statistics.median(diffs):.3f} %, worst {max(diffs):.3f} %, {len(over)} above 3 %.\n",
             f"Exact-mode wall time with imports (seq 2048): see exact_speed.json ({label})\n",
             "| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
    lines += ["| " + " | ".join(str(v) for v in r.values()) + " |" for r in table]
    (RESULTS / "exact_vs_analytic.md").write_text("\n".join(lines) + "\n")
    print(lines[2])
