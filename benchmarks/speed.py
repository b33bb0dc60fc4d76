"""`memplan fit` over the whole space for a 7B model vs `python -c "import torch"`, both in fresh interpreters.

    python benchmarks/speed.py   # -> benchmarks/results/speed.json
Goal (issue #3): the fit finishes faster than importing torch. Also records the per-estimate time.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
FIT = [sys.executable, "-m", "memplan", "fit", "--model", "llama-2-7b", "--gpu", "24GB", "--method", "lora",
       "--lora-rank", "8-64", "--optimizer", "adamw,adamw_8bit", "--global-batch", "64", "--json"]
TORCH = [sys.executable, "-c", "import torch"]


def walls(cmd: list[str], runs: int = 5) -> list[float]:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        done = subprocess.run(cmd, check=False, capture_output=True, text=True)
        times.append(time.perf_counter() - t0)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed: {done.stderr.strip()[-500:]}")
    return times


def wall(cmd: list[str], runs: int = 5) -> float:
    return statistics.median(walls(cmd, runs))


def per_estimate_us() -> float:
    from memplan.predict.estimator import estimate
    from memplan.spec.catalog import resolve_model
    from memplan.spec.train import TrainConfig

    spec, cfg = resolve_model("llama-2-7b"), TrainConfig()
    n = 2000
    t0 = time.perf_counter()
    for _ in range(n):
        estimate(spec, cfg)
    return (time.perf_counter() - t0) / n * 1e6


if __name__ == "__main__":
    searched = json.loads(subprocess.run(FIT, capture_output=True, text=True, check=False).stdout)["searched"]
    fit_s, torch_s = wall(FIT), wall(TORCH)
    out = {"command": "python benchmarks/speed.py", "fit_cmd": " ".join(FIT[1:]), "configurations": searched,
           "fit_wall_s": round(fit_s, 3), "import_torch_wall_s": round(torch_s, 3),
           "ratio_fit_over_import_torch": round(fit_s / torch_s, 3), "estimate_us": round(per_estimate_us(), 1)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "speed.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
