"""The analytic estimate vs published GPU measurements (shared/reference/published_measurements.csv).

    python benchmarks/published.py [path/to/published_measurements.csv]   # -> benchmarks/results/published.{csv,md}

Only rows memmplan can state in its own knobs are used (single GPU, a catalog model, no torch.compile, chunked
cross-entropy, optimizer-in-backward or activation offloading). Each row is compared with the matching number:
peak allocated / active -> peak_allocated_bytes, peak reserved -> peak_reserved_bytes, nvidia-smi -> total_bytes.
Most sources use their own model code (torchtune, LitGPT) and variable-length data (max 512 tokens): the estimate
at the maximum length is then an upper bound of what the run could reach. Read the error column with that in mind.
"""

from __future__ import annotations

import csv
import os
import statistics
import sys
from pathlib import Path

from memplan.predict.estimator import estimate
from memplan.spec.catalog import resolve_model
from memplan.spec.packages import bitsandbytes_version, torchao_version
from memplan.spec.stacks import Stack
from memplan.spec.train import Method, Precision, TrainConfig

RESULTS = Path(__file__).parent / "results"
DEFAULT_CSV = Path(__file__).resolve().parents[2] / "shared" / "reference" / "published_measurements.csv"
QV = ("q_proj", "v_proj")
ALL = ("all-linear",)
PURE = Precision.PURE_BF16

# row id -> (catalog model, knobs). Targets "all (incl. lm head)" are approximated by all-linear. Left out: row 28
# (7B full fine-tune at 13.9 GB: torchtune's optimizer-in-backward frees each gradient at once), rows 10, 12-19
# (unpacked baseline, torch.compile, chunked CE, offloading), multi-GPU rows (the sharding issue) and BERT/Qwen-1.
ROWS: dict[str, tuple[str, dict[str, object]]] = {
    "11": ("llama-3.2-3b", dict(method=Method.FULL, precision=PURE, batch_size=2, seq_len=4096, checkpointing=False)),
    "20": ("llama-2-7b", dict(method=Method.LORA, precision=PURE, batch_size=2, seq_len=512, lora_rank=8,
                              lora_targets=QV)),
    "21": ("llama-2-7b", dict(method=Method.LORA, precision=PURE, batch_size=2, seq_len=512, lora_rank=8,
                              lora_targets=ALL)),
    "22": ("llama-2-7b", dict(method=Method.LORA, precision=PURE, batch_size=2, seq_len=512, lora_rank=64,
                              lora_targets=QV)),
    "23": ("llama-2-7b", dict(method=Method.LORA, precision=PURE, batch_size=2, seq_len=512, lora_rank=64,
                              lora_targets=ALL)),
    "24": ("llama-2-7b", dict(method=Method.QLORA, precision=PURE, batch_size=2, seq_len=512, lora_rank=8,
                              lora_targets=ALL)),
    "25": ("llama-3-8b", dict(method=Method.LORA, precision=PURE, batch_size=2, seq_len=512, lora_rank=8,
                              lora_targets=QV)),
    "27": ("llama-2-7b", dict(method=Method.LORA, precision=PURE, batch_size=2, seq_len=512, lora_rank=8,
                              lora_targets=QV)),
    "104": ("tinyllama-1.1b-intermediate-step-1431k-3t", dict(method=Method.FULL, precision=PURE, batch_size=4,
                                                              seq_len=512, checkpointing=False)),
    "105": ("tinyllama-1.1b-intermediate-step-1431k-3t", dict(method=Method.LORA, precision=PURE, batch_size=8,
                                                              seq_len=512, checkpointing=False, lora_rank=32,
                                                              lora_targets=ALL)),
    "107": ("llama-2-7b", dict(method=Method.LORA, precision=PURE, batch_size=2, seq_len=512, checkpointing=False,
                              lora_rank=32, lora_targets=QV)),
    "108": ("llama-2-7b", dict(method=Method.QLORA, precision=PURE, batch_size=2, seq_len=512, checkpointing=False,
                              lora_rank=32, lora_targets=QV)),
    "109": ("llama-3-8b", dict(method=Method.LORA, precision=PURE, batch_size=1, seq_len=512, checkpointing=False,
                              lora_rank=32, lora_targets=QV)),
    "110": ("llama-3-8b", dict(method=Method.QLORA, precision=PURE, batch_size=2, seq_len=512, checkpointing=False,
                              lora_rank=32, lora_targets=QV)),
    "111": ("mistral-7b-v0.1", dict(method=Method.LORA, precision=PURE, batch_size=2, seq_len=512,
                                    checkpointing=False, lora_rank=32, lora_targets=QV)),
    "112": ("mistral-7b-v0.1", dict(method=Method.QLORA, precision=PURE, batch_size=2, seq_len=512,
                                    checkpointing=False, lora_rank=32, lora_targets=QV)),
    "114": ("llama-3.2-3b", dict(method=Method.LORA, precision=PURE, batch_size=1, seq_len=512, checkpointing=False,
                                 lora_rank=32, lora_targets=QV)),
}


def compared_value(metric: str) -> str:
    m = metric.lower()
    if "reserved" in m:
        return "peak_reserved_bytes"
    if "nvidia-smi" in m or "nvml" in m:
        return "total_bytes"
    return "peak_allocated_bytes"  # max_memory_allocated, active, or unstated 'peak memory'


def stack_of(framework: str) -> Stack:
    """The row's own training stack (memplan.spec.stacks): HF Trainer / TRL / PEFT scripts are `hf`, LLaMA-Factory is
    `llamafactory`, torchtune and LitGPT their own entries (each one's QLoRA quantizer and what it quantizes)."""
    f = framework.lower()
    if "llama-factory" in f or "llamafactory" in f:
        return Stack.LLAMAFACTORY
    if "torchtune" in f:
        return Stack.TORCHTUNE
    if "litgpt" in f:
        return Stack.LITGPT
    if any(k in f for k in ("hf trainer", "transformers", "trl", "peft")):
        return Stack.HF
    return Stack.REFERENCE


def _quantizer_era(row: dict[str, str]) -> None:
    """bitsandbytes 4-bit rows: whether the run's NF4 linear kept its input for backward (memplan.spec.packages):
    bitsandbytes before 0.43.2 (July 2024) did. torchao's NF4 (torchtune) never does: its stack entry says so."""
    keeps = "bitsandbytes" in row["quantization"].lower() and row["source_date"] < "2024-07"
    os.environ["MEMPLAN_BITSANDBYTES_VERSION"] = "0.43.1" if keeps else "0.43.2"
    bitsandbytes_version.cache_clear()
    # torchao's NF4 quantizer compares in chunks since 0.2 (May 2024); torchtune pinned torchao==0.1 before
    os.environ["MEMPLAN_TORCHAO_VERSION"] = "0.1" if row["source_date"] < "2024-05" else "0.2"
    torchao_version.cache_clear()


def compare(path: Path) -> list[dict[str, object]]:
    """One dict per comparable row: the row's facts, the estimate (with the row's own stack) and the error."""
    rows = {r["id"]: r for r in csv.DictReader(open(path, newline=""))}
    out = []
    for rid, (model, knobs) in ROWS.items():
        r = rows[rid]
        stack = stack_of(r["framework"])
        _quantizer_era(r)
        bd = estimate(resolve_model(model), TrainConfig(stack=stack).with_(**knobs))  # type: ignore[arg-type]
        key = compared_value(r["metric"])
        est_gib = bd.memory_dict()[key] / 2**30
        measured = float(r["measured_gib"])
        out.append(dict(id=rid, grade=r["grade"], source=r["source_name"][:40], model=model,
                        method=knobs["method"].value, batch=knobs["batch_size"], seq=knobs["seq_len"],
                        seq_kind=r["seq_len_kind"][:30], metric=r["metric"][:50], compared=key,
                        stack=stack.value, measured_gib=round(measured, 3), estimate_gib=round(est_gib, 3),
                        error_pct=round(100 * (est_gib / measured - 1), 1)))
    return out


def main(path: Path) -> str:
    out = compare(path)
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / "published.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(out[0]))
        writer.writeheader()
        writer.writerows(out)
    errs = [abs(float(o["error_pct"])) for o in out]
    summary = f"{len(out)} rows: median |error| {statistics.median(errs):.1f} %, worst {max(errs):.1f} %"
    lines = ["# Analytic estimate vs published GPU measurements\n", "Command: `python benchmarks/published.py`\n",
             (__doc__ or "").split("\n\n")[2].replace("\n", " ") + "\n", summary + "\n",
             "| id | grade | source | model | method | batch | seq | seq kind | metric | compared | stack "
             "| measured GiB | estimate GiB | error % |", "|" + "---|" * 14]
    lines += ["| " + " | ".join(str(o[k]) for k in out[0]) + " |" for o in out]
    (RESULTS / "published.md").write_text("\n".join(lines) + "\n")
    return summary


if __name__ == "__main__":
    print(main(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_CSV))
