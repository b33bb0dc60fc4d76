"""memplan's tuner vs the alternatives, side by side, on CPU with small models and a simulated capacity.

    python benchmarks/tuner.py   # -> benchmarks/results/tuner.{csv,md}

Every configuration is measured once (a real in-process probe: exact live bytes against the capacity, tokens/s)
and every strategy reads the same measurements, so they are compared on identical numbers:
  oracle       exhaustive search of the whole space (the reference best)
  memplan      the tuner (memplan.tune.study.tune) with a budget of 25 % of the oracle's probes
  lightning    BatchSizeFinder: double the micro-batch until OOM, then bisect; pass/fail only, checkpointing and
               the kernel fixed, accumulation untouched (so the effective batch drifts)
  accelerate   find_executable_batch_size: start at the global batch, x0.9 on each OOM, accumulation untouched
Goal (issue #6): memplan >= 97 % of the oracle's tokens/s with <= 25 % of its probes, effective batch kept.
"""

from __future__ import annotations

import csv
import functools
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from memplan.predict.estimator import estimate
from memplan.probe.inprocess import probe_in_process
from memplan.probe.launch import ProbeOptions
from memplan.probe.result import ProbeResult, ProbeStatus
from memplan.spec.hardware import GPU
from memplan.spec.space import SearchSpace
from memplan.spec.train import Attention, Method, Precision, TrainConfig
from memplan.testing.tiny import tiny_spec
from memplan.tune.study import tune

RESULTS = Path(__file__).parent / "results"
ATTNS = [Attention.SDPA, Attention.EAGER]


@dataclass
class Memo:
    """Measures each configuration once; counts the probes and the wall time each strategy would have spent."""

    spec: object
    capacity: int
    table: dict[tuple, tuple[ProbeResult, float]] = field(default_factory=dict)

    def measure(self, t: TrainConfig) -> tuple[ProbeResult, float]:
        key = (t.batch_size, t.checkpointing, t.attn, t.grad_accum)
        if key not in self.table:
            import time

            t0 = time.perf_counter()
            res = probe_in_process(self.spec, t, ProbeOptions(steps=2, warmup=1, capacity_bytes=self.capacity))
            self.table[key] = (res, time.perf_counter() - t0)
        return self.table[key]


@dataclass
class Run:
    probes: int = 0
    ooms: int = 0
    wall_s: float = 0.0

    def probe(self, memo: Memo, t: TrainConfig) -> ProbeResult:
        res, wall = memo.measure(t)
        self.probes += 1
        self.ooms += res.status is ProbeStatus.OOM
        self.wall_s += wall
        return res


def space(base: TrainConfig, gb: int) -> list[TrainConfig]:
    return [base.with_(batch_size=b, grad_accum=gb // b, checkpointing=c, attn=a)
            for b in range(1, gb + 1) if gb % b == 0 for c in (False, True) for a in ATTNS]


def oracle(memo: Memo, cands: list[TrainConfig]) -> tuple[Run, TrainConfig | None, float]:
    run, best, speed = Run(), None, 0.0
    for t in cands:
        res = run.probe(memo, t)
        if res.status is ProbeStatus.OK and res.tokens_per_s > speed:
            best, speed = t, res.tokens_per_s
    return run, best, speed


def lightning(memo: Memo, base: TrainConfig, gb: int) -> tuple[Run, TrainConfig | None, float]:
    run, ok, bad, b = Run(), 0, None, 1
    accum = base.grad_accum  # untouched: the user's value (1)
    while b <= gb:
        if run.probe(memo, base.with_(batch_size=b, grad_accum=accum)).status is ProbeStatus.OK:
            ok, b = b, b * 2
        else:
            bad = b
            break
    if bad is not None:
        lo, hi = ok, bad
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if run.probe(memo, base.with_(batch_size=mid, grad_accum=accum)).status is ProbeStatus.OK:
                lo = mid
            else:
                hi = mid
        ok = lo
    if not ok:
        return run, None, 0.0
    chosen = base.with_(batch_size=ok, grad_accum=accum)
    return run, chosen, memo.measure(chosen)[0].tokens_per_s


def accelerate(memo: Memo, base: TrainConfig, gb: int) -> tuple[Run, TrainConfig | None, float]:
    run, b = Run(), gb
    while b >= 1:
        t = base.with_(batch_size=b, grad_accum=base.grad_accum)
        res = run.probe(memo, t)
        if res.status is ProbeStatus.OK:
            return run, t, res.tokens_per_s
        b = int(b * 0.9) if int(b * 0.9) < b else b - 1
    return run, None, 0.0


def scenarios() -> list[tuple[str, TrainConfig, int, float]]:
    """(arch, base, global batch, capacity position between the smallest and the largest predicted peak)."""
    # sdpa, the kernel `auto` resolves to here, so that every strategy reads the same measurements
    full = TrainConfig(method=Method.FULL, precision=Precision.FP32, seq_len=128, attn=Attention.SDPA)
    lora = TrainConfig(method=Method.LORA, precision=Precision.FP32, seq_len=256, attn=Attention.SDPA)
    return [("llama", full, 16, 0.45), ("qwen2", lora, 8, 0.35), ("mistral", full, 8, 0.6)]


def main() -> list[dict[str, object]]:
    rows = []
    for arch, base, gb, where in scenarios():
        spec = tiny_spec(arch)
        cands = space(base, gb)
        peaks = sorted(estimate(spec, t, device="cpu").peak_allocated_bytes for t in cands)
        cap = int(peaks[0] + where * (peaks[-1] - peaks[0]))
        memo = Memo(spec, cap)
        o_run, o_best, o_speed = oracle(memo, cands)
        with tempfile.TemporaryDirectory() as tmp:
            m_run = Run()
            res = tune(spec, base, GPU(name="sim", memory_bytes=cap), functools.partial(m_run.probe, memo),
                       space=SearchSpace(global_batch=gb, precisions=(Precision.FP32,), attentions=tuple(ATTNS)),
                       usable_bytes=cap, device="cpu", storage=f"sqlite:///{tmp}/s.db",
                       n_probes=max(1, len(cands) // 4))
        m_best = res.best.train if res.best else None
        m_speed = memo.measure(m_best)[0].tokens_per_s if m_best else 0.0
        for name, (run, best, speed) in {"oracle": (o_run, o_best, o_speed), "memplan": (m_run, m_best, m_speed),
                                         "lightning": lightning(memo, base, gb),
                                         "accelerate": accelerate(memo, base, gb)}.items():
            rows.append(dict(scenario=f"{arch} {base.method.value} gb={gb} cap={cap / 2**20:.1f}MiB",
                             strategy=name, space=len(cands), probes=run.probes, ooms=run.ooms,
                             wall_s=round(run.wall_s, 2), chosen=_describe(best),
                             tokens_per_s=round(speed, 1), vs_oracle=round(speed / o_speed, 3) if o_speed else 0,
                             probes_vs_oracle=round(run.probes / o_run.probes, 3),
                             effective_batch_kept=bool(best) and best.batch_size * best.grad_accum == gb))
            print(rows[-1], flush=True)
    return rows


def _describe(t: TrainConfig | None) -> str:
    if t is None:
        return "none"
    return f"micro {t.batch_size} x accum {t.grad_accum}, ckpt {'on' if t.checkpointing else 'off'}, {t.attn.value}"


if __name__ == "__main__":
    table = main()
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / "tuner.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    lines = ["# Tuner vs alternatives (CPU, small models, simulated capacity)\n",
             "Command: `python benchmarks/tuner.py`\n", (__doc__ or "").split("\n\n")[1] + "\n",
             "| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
    lines += ["| " + " | ".join(str(v) for v in r.values()) + " |" for r in table]
    (RESULTS / "tuner.md").write_text("\n".join(lines) + "\n")
