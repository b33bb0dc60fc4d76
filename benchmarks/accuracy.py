"""Analytic estimate vs the exact CPU allocator peak of real training steps (NOTES §3), on small real models.

    python benchmarks/accuracy.py            # all configurations -> benchmarks/results/accuracy.{csv,md}
    python benchmarks/accuracy.py --quick    # the fast subset the tests use

Goal (issue #2): median |error| <= 2 %, worst <= 5 %.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

from memplan.predict.estimator import estimate
from memplan.spec.stacks import Stack
from memplan.spec.train import Attention, Method, Optimizer, Precision, Stage, TrainConfig
from memplan.testing.tiny import tiny_spec
from memplan.testing.truth import measure_cpu_peak

RESULTS = Path(__file__).parent / "results"


def configurations(quick: bool = False) -> list[tuple[str, TrainConfig]]:
    """(arch, config) pairs spanning precision, method, optimizer, checkpointing, attention, batch and sequence."""
    out: list[tuple[str, TrainConfig]] = []
    archs = ["llama", "mistral", "qwen2", "gemma2", "phi3", "qwen3"]
    base = [  # method, precision, checkpointing, optimizer, batch, seq
        ("full", "fp32", False, "adamw", 2, 256),
        ("full", "bf16", False, "adamw", 2, 256),
        ("full", "pure_bf16", True, "adamw", 1, 512),
        ("lora", "bf16", False, "adamw", 2, 256),
        ("lora", "bf16", True, "adamw", 4, 256),
        ("lora", "fp32", False, "adamw", 1, 512),
        ("lora", "pure_bf16", False, "adamw", 2, 128),
        ("freeze", "bf16", False, "adamw", 2, 256),
    ]
    for arch in archs:
        for method, prec, ckpt, opt, b, s in base[: 3 if quick else None]:
            out.append((arch, TrainConfig(method=Method(method), precision=Precision(prec), checkpointing=ckpt,
                                          optimizer=Optimizer(opt), batch_size=b, seq_len=s)))
    if quick:
        return out
    extra = [  # one-off knobs on llama / qwen2
        ("llama", dict(method="full", precision="fp32", optimizer="sgd", batch_size=4, seq_len=512,
                       checkpointing=False)),
        ("llama", dict(method="full", precision="bf16", optimizer="sgd_momentum", checkpointing=True)),
        ("llama", dict(method="full", precision="fp32", optimizer="adafactor", checkpointing=False)),
        ("qwen2", dict(method="full", precision="fp16", optimizer="adamw", checkpointing=False)),
        ("llama", dict(method="lora", precision="bf16", attn="eager", checkpointing=False)),
        ("mistral", dict(method="lora", precision="fp32", attn="eager", checkpointing=True)),
        ("llama", dict(method="lora", precision="bf16", lora_rank=64, lora_targets=("q_proj", "v_proj"),
                       checkpointing=False)),
        ("qwen2", dict(method="lora", precision="bf16", lora_dropout=0.1, checkpointing=False)),
        ("llama", dict(method="lora", precision="fp16", lora_rank=16, checkpointing=True, batch_size=8, seq_len=128)),
        ("phi3", dict(method="lora", precision="bf16", lora_targets=("qkv_proj", "o_proj"), checkpointing=False)),
        ("mistral", dict(method="lora", precision="bf16", lora_dropout=0.05, checkpointing=True, batch_size=4)),
        ("llama", dict(method="freeze", precision="bf16", checkpointing=True, freeze_trainable_layers=1)),
        # sliding window shorter than the sequence: explicit sdpa mask, repeat_kv copies
        ("mistral-sw", dict(method="lora", precision="pure_bf16", batch_size=2, seq_len=512, checkpointing=False)),
        ("mistral-sw", dict(method="full", precision="bf16", checkpointing=False)),
        ("mistral-sw", dict(method="full", precision="fp32", checkpointing=True)),
        # gradient accumulation: later micro-steps run with every gradient alive
        ("llama", dict(method="full", precision="fp32", grad_accum=2, batch_size=4, seq_len=128,
                       checkpointing=False)),
        ("qwen2", dict(method="lora", precision="bf16", grad_accum=2, checkpointing=False)),
        ("gemma2", dict(method="freeze", precision="bf16", grad_accum=3, checkpointing=False)),
        ("phi3", dict(method="full", precision="pure_bf16", grad_accum=2, checkpointing=True)),
        # MoE (transformers 5 grouped experts; peft 0.21 wraps expert parameters under all-linear LoRA)
        ("mixtral", dict(method="full", precision="fp32", checkpointing=False)),
        ("mixtral", dict(method="full", precision="bf16", checkpointing=False)),
        ("mixtral", dict(method="lora", precision="bf16", checkpointing=False)),
        ("mixtral", dict(method="lora", precision="bf16", checkpointing=True, batch_size=4)),
        ("mixtral", dict(method="freeze", precision="bf16", checkpointing=False)),
        # QLoRA for real (bitsandbytes 0.50 NF4 on CPU) under each stack; 8-bit optimizers; DPO pairs + reference
        ("llama", dict(method="qlora", precision="bf16", stack="hf", checkpointing=True)),
        ("llama", dict(method="qlora", precision="bf16", stack="hf", checkpointing=False)),
        ("qwen2", dict(method="qlora", precision="bf16", stack="hf", checkpointing=True)),
        ("gemma2", dict(method="qlora", precision="bf16", stack="hf", checkpointing=True)),
        ("phi3", dict(method="qlora", precision="bf16", stack="hf", checkpointing=False)),
        ("llama", dict(method="qlora", precision="bf16", stack="llamafactory", checkpointing=True)),
        ("mistral", dict(method="qlora", precision="pure_bf16", stack="reference", checkpointing=False)),
        ("llama", dict(method="qlora", precision="fp16", stack="hf", lora_dropout=0.1, checkpointing=True)),
        ("llama", dict(method="lora", precision="bf16", optimizer="adamw_8bit", checkpointing=False)),
        ("qwen2", dict(method="full", precision="pure_bf16", optimizer="paged_adamw_8bit", checkpointing=True)),
        ("llama", dict(method="lora", precision="bf16", stage="dpo", checkpointing=True, batch_size=1)),
        ("llama", dict(method="full", precision="bf16", stage="dpo", checkpointing=False, batch_size=1)),
    ]
    for arch, kw in extra:
        kw = {"batch_size": 2, "seq_len": 256, **kw}
        for key, enum in (("method", Method), ("precision", Precision), ("optimizer", Optimizer), ("attn", Attention),
                          ("stack", Stack), ("stage", Stage)):
            if key in kw:
                kw[key] = enum(kw[key])
        out.append((arch, TrainConfig().with_(**kw)))
    return out


def run(quick: bool) -> list[dict[str, object]]:
    rows = []
    for arch, cfg in configurations(quick):
        spec = tiny_spec(arch)
        truth = measure_cpu_peak(spec, cfg)
        t0 = time.perf_counter()
        est = estimate(spec, cfg, device="cpu")
        est_us = (time.perf_counter() - t0) * 1e6
        err = 100.0 * (est.peak_allocated_bytes / truth.peak_bytes - 1.0)
        rows.append(dict(arch=arch, method=cfg.method.value, precision=cfg.precision.value,
                         checkpointing=cfg.checkpointing, optimizer=cfg.optimizer.value, attn=cfg.attn.value,
                         grad_accum=cfg.grad_accum, stack=cfg.stack.value, stage=cfg.stage.value,
                         lora=f"r{cfg.lora_rank}:{'+'.join(cfg.lora_targets)}:d{cfg.lora_dropout}" if cfg.is_lora
                         else "", batch=cfg.batch_size, seq=cfg.seq_len, truth_bytes=truth.peak_bytes,
                         truth_phase=f"{truth.phase}:{truth.step}", estimate_bytes=est.peak_allocated_bytes,
                         estimate_phase=est.phase, error_pct=round(err, 3), estimate_us=round(est_us, 1)))
        print(f"{arch:8s} {cfg.method.value:6s} {cfg.precision.value:9s} ckpt={int(cfg.checkpointing)} "
              f"{cfg.optimizer.value:12s} b={cfg.batch_size} s={cfg.seq_len:4d} err={err:+6.2f}%", flush=True)
    return rows


MOE = {"mixtral"}


def _summary(rows: list[dict[str, object]], label: str) -> str:
    errs = [abs(float(r["error_pct"])) for r in rows]
    return (f"{label}: {len(rows)} configurations, {len({r['arch'] for r in rows})} architectures, "
            f"median |error| {statistics.median(errs):.2f} %, worst {max(errs):.2f} %")


def write(rows: list[dict[str, object]], name: str) -> str:
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / f"{name}.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary = "; ".join(_summary([r for r in rows if (r["arch"] in MOE) == moe], label)
                        for moe, label in ((False, "dense"), (True, "MoE")) if any((r["arch"] in MOE) == moe
                                                                                 for r in rows))
    lines = ["# Analytic estimate vs CPU allocator truth\n", "Command: `python benchmarks/accuracy.py`\n",
             f"{summary}\n", "| arch | method | precision | ckpt | optimizer | attn | lora | batch | accum | seq | "
             "truth MiB | truth phase | estimate MiB | error % |", "|" + "---|" * 14]
    for r in rows:
        lines.append(f"| {r['arch']} | {r['method']} | {r['precision']} | {r['checkpointing']} | {r['optimizer']} | "
                     f"{r['attn']} | {r['lora']} | {r['batch']} | {r['grad_accum']} | {r['seq']} | "
                     f"{int(r['truth_bytes']) / 2**20:.2f} | "
                     f"{r['truth_phase']} | {int(r['estimate_bytes']) / 2**20:.2f} | {r['error_pct']:+.2f} |")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    return summary


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    result = run(args.quick)
    print(write(result, "accuracy_quick" if args.quick else "accuracy"))
    sys.exit(0)
