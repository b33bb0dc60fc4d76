"""GPU validation: probe a matrix of real configurations on a CUDA machine, beside the analytic estimate.

    python benchmarks/gpu_validate.py OUT_DIR [--budget-s 450] [--dry-run]

Writes OUT_DIR/gpu_validate.csv (one row per probe: measured peak allocated / reserved / NVML used, tokens/s,
the estimate's allocated / reserved / total and the signed errors) and OUT_DIR/gpu_validate.md (summary).
Stops launching probes when the budget is spent so that the whole run stays inside 8 minutes on one H100/H200.
--dry-run prints the matrix without touching a GPU. Each probe runs in its own child process (memplan probe).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

from memplan.predict.estimator import estimate
from memplan.probe.launch import ProbeOptions, probe
from memplan.spec.catalog import resolve_model
from memplan.spec.optimizers import Optimizer
from memplan.spec.stacks import Stack
from memplan.spec.train import Method, Precision, Stage, TrainConfig

F, L, Q = Method.FULL, Method.LORA, Method.QLORA
FP32, BF16, PURE = Precision.FP32, Precision.BF16, Precision.PURE_BF16

# (model, method, precision, checkpointing, batch, seq): small models first, so a short budget still covers
# every method and precision; the 7B rows come last.
MATRIX = [
    ("qwen2.5-0.5b", F, FP32, False, 2, 512),
    ("qwen2.5-0.5b", F, BF16, False, 4, 1024),
    ("qwen2.5-0.5b", F, PURE, True, 8, 2048),
    ("qwen2.5-0.5b", L, BF16, False, 4, 2048),
    ("qwen2.5-0.5b", L, BF16, True, 8, 4096),
    ("qwen2.5-0.5b", Q, BF16, True, 4, 2048),
    ("llama-3.2-1b", F, BF16, True, 4, 2048),
    ("llama-3.2-1b", L, PURE, False, 2, 2048),
    ("llama-3.2-1b", Q, BF16, False, 2, 1024),
    ("qwen2.5-1.5b", L, BF16, True, 8, 2048),
    ("qwen2.5-1.5b", F, PURE, False, 1, 1024),
    ("mistral-7b-v0.1", L, BF16, True, 4, 2048),
    ("mistral-7b-v0.1", Q, BF16, True, 4, 2048),
    ("mistral-7b-v0.1", L, PURE, False, 1, 512),
    ("mistral-7b-v0.1", F, PURE, True, 1, 1024),
]
# issue 17: each stack (QLoRA both ways: peft's k-bit upcast or LLaMA-Factory's none), 8-bit AdamW, DPO pairs with
# a reference forward — (model, method, precision, checkpointing, batch, seq, other knobs)
STACK_MATRIX = [
    ("llama-3.2-1b", Q, BF16, True, 4, 2048, dict(stack=Stack.HF)),
    ("llama-3.2-1b", Q, BF16, True, 4, 2048, dict(stack=Stack.LLAMAFACTORY)),
    ("llama-3.2-1b", L, BF16, True, 4, 2048, dict(stack=Stack.LLAMAFACTORY)),
    ("qwen2.5-1.5b", F, BF16, True, 2, 1024, dict(optimizer=Optimizer.ADAMW_8BIT)),
    ("llama-3.2-1b", L, BF16, True, 2, 1024, dict(stage=Stage.DPO)),
    ("mistral-7b-v0.1", Q, BF16, True, 2, 2048, dict(stack=Stack.HF)),
    ("mistral-7b-v0.1", Q, BF16, True, 2, 2048, dict(stack=Stack.LLAMAFACTORY)),
]


def rows(budget_s: float, dry: bool) -> list[dict[str, object]]:
    out, start = [], time.perf_counter()
    for model, method, prec, ckpt, b, s, *more in [*MATRIX, *STACK_MATRIX]:
        spec = resolve_model(model)
        train = TrainConfig(method=method, precision=prec, checkpointing=ckpt, batch_size=b, seq_len=s,
                            **(more[0] if more else {}))
        est = estimate(spec, train)
        row: dict[str, object] = dict(model=model, method=method.value, precision=prec.value, checkpointing=ckpt,
                                      batch=b, seq=s, stack=train.stack.value, stage=train.stage.value,
                                      optimizer=train.optimizer.value, est_allocated=est.peak_allocated_bytes,
                                      est_reserved=est.peak_reserved_bytes, est_total=est.total_bytes)
        if dry:
            print(row)
            out.append(row)
            continue
        left = budget_s - (time.perf_counter() - start)
        if left < 20:
            print(f"budget spent: skipping {model} {method.value} {prec.value}", file=sys.stderr)
            continue
        res = probe(spec, train, ProbeOptions(device="cuda", steps=2, warmup=1, timeout_s=min(left, 120),
                                              use_cache=False))
        row.update(status=res.status.value, device=res.device, allocated=res.peak_allocated_bytes,
                   reserved=res.peak_reserved_bytes, nvml_used=res.nvml_used_bytes or "",
                   tokens_per_s=round(res.tokens_per_s, 1), error=res.error[:120])
        if res.status.value == "ok":
            row.update(err_allocated_pct=round(100 * (est.peak_allocated_bytes / res.peak_allocated_bytes - 1), 2),
                       err_reserved_pct=round(100 * (est.peak_reserved_bytes / res.peak_reserved_bytes - 1), 2),
                       err_total_pct=round(100 * (est.total_bytes / res.nvml_used_bytes - 1), 2)
                       if res.nvml_used_bytes else "")
        print(row, flush=True)
        out.append(row)
    return out


def write(out_dir: Path, table: list[dict[str, object]]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = sorted({k for r in table for k in r}, key=lambda k: list(table[0]).index(k) if k in table[0] else 99)
    with open(out_dir / "gpu_validate.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(table)
    ok = [r for r in table if r.get("status") == "ok"]
    lines = ["# GPU validation\n", "Command: `python benchmarks/gpu_validate.py OUT_DIR`\n",
             f"{len(table)} probes, {len(ok)} ok"]
    for key in ("err_allocated_pct", "err_reserved_pct", "err_total_pct"):
        vals = [abs(float(r[key])) for r in ok if r.get(key) not in (None, "")]
        if vals:
            lines.append(f"- {key}: median |error| {statistics.median(vals):.2f} %, worst {max(vals):.2f} %")
    (out_dir / "gpu_validate.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--budget-s", type=float, default=450.0)
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    write(args.out_dir, rows(args.budget_s, args.dry_run))
