"""Per-rank memory under data parallelism: vs DeepSpeed's model-state estimators, vs published multi-GPU
measurements, and how memory per rank falls with the GPU count for 7B, 13B and 70B under each sharding.

    python benchmarks/scale.py   # -> benchmarks/results/scale.md, scale_per_rank.csv
"""

from __future__ import annotations

import csv
import statistics
from pathlib import Path

from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

from memplan.predict.estimator import estimate
from memplan.predict.layout import Layout
from memplan.predict.sharding import largest_unit_params, model_state_bytes
from memplan.predict.weights import model_states
from memplan.spec.catalog import resolve_model
from memplan.spec.stacks import Stack
from memplan.spec.train import Method, Offload, Precision, Sharding, TrainConfig

RESULTS = Path(__file__).parent / "results"
PUBLISHED = Path(__file__).resolve().parents[2] / "shared" / "reference" / "published_measurements.csv"
GIB = 2**30
MODELS = ("llama-2-7b", "llama-2-13b", "llama-2-70b")
LAYOUTS = [("DDP", Sharding.NONE, Offload.NONE), ("ZeRO-1", Sharding.ZERO1, Offload.NONE),
           ("ZeRO-2", Sharding.ZERO2, Offload.NONE), ("ZeRO-3", Sharding.ZERO3, Offload.NONE),
           ("ZeRO-3 + offload optimizer", Sharding.ZERO3, Offload.OPTIMIZER),
           ("ZeRO-3 + offload params", Sharding.ZERO3, Offload.PARAMS),
           ("FSDP full_shard", Sharding.FULL_SHARD, Offload.NONE),
           ("FSDP shard_grad_op", Sharding.SHARD_GRAD_OP, Offload.NONE)]
COUNTS = (1, 2, 4, 8, 16, 32, 64)
QV, QKV, PURE = ("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj"), Precision.PURE_BF16
# published multi-GPU rows memplan can state (torchtune, FSDP per GPU): id -> (model, knobs). Left out: 36 (paged
# 32-bit AdamW), 43/44 (rank and targets not stated), 126/127 (Qwen-1 remote code; total vs per-GPU unclear).
ROWS = {
    "26": ("llama-2-7b", dict(method=Method.LORA, precision=PURE, batch_size=2, seq_len=512, grad_accum=32,
                              checkpointing=False, lora_targets=QV, gpus=2, sharding=Sharding.FULL_SHARD)),
    "29": ("llama-2-7b", dict(method=Method.FULL, precision=PURE, batch_size=2, seq_len=512, checkpointing=True,
                              gpus=4, sharding=Sharding.FULL_SHARD)),
    "32": ("llama-2-7b", dict(method=Method.LORA, precision=PURE, batch_size=4, seq_len=2048, checkpointing=False,
                              lora_targets=QV, gpus=2, sharding=Sharding.FULL_SHARD)),
    "34": ("llama-2-7b", dict(method=Method.FULL, precision=PURE, batch_size=4, seq_len=2048, checkpointing=True,
                              gpus=4, sharding=Sharding.FULL_SHARD)),
    "35": ("llama-2-70b", dict(method=Method.LORA, precision=PURE, batch_size=4, seq_len=4096, checkpointing=True,
                               lora_rank=16, lora_targets=QKV, gpus=8, sharding=Sharding.FULL_SHARD)),
    "42": ("llama-3.1-70b", dict(method=Method.FULL, precision=PURE, batch_size=2, seq_len=2048, checkpointing=True,
                                 gpus=8, sharding=Sharding.FULL_SHARD, offload=Offload.PARAMS)),
}


def deepspeed_rows() -> list[str]:
    out = ["| model | stage | GPUs | offload | memplan GiB/rank | DeepSpeed GiB/rank | diff |", "|---" * 7 + "|"]
    for name in MODELS:
        spec = resolve_model(name)
        for stage, offloads in ((Sharding.ZERO2, (Offload.NONE, Offload.OPTIMIZER)),
                                (Sharding.ZERO3, (Offload.NONE, Offload.OPTIMIZER, Offload.PARAMS))):
            for n in (8, 64):
                for off in offloads:
                    t = TrainConfig().with_(method=Method.FULL, precision=Precision.BF16, gpus=n, nodes=max(1, n // 8),
                                    sharding=stage, offload=off)
                    lay = Layout.of(spec, t)
                    ours, _ = model_state_bytes(lay, model_states(lay))
                    if stage is Sharding.ZERO2:
                        _, ds = estimate_zero2_model_states_mem_needs(spec.num_parameters, n // t.nodes, t.nodes,
                                                                      off is not Offload.NONE, 1.5)
                    else:
                        _, ds, _ = estimate_zero3_model_states_mem_needs(
                            spec.num_parameters, largest_unit_params(lay), n // t.nodes, t.nodes,
                            off is not Offload.NONE, off is Offload.PARAMS, True, 1.5)
                    out.append(f"| {name} | {stage.value} | {n} | {off.value} | {ours / GIB:.3f} | {ds / GIB:.3f} "
                               f"| {100 * (ours / ds - 1):+.5f} % |")
    return out


def per_rank() -> list[dict[str, object]]:
    rows = []
    for name in MODELS:
        spec = resolve_model(name)
        for label, shard, off in LAYOUTS:
            row: dict[str, object] = {"model": name, "layout": label}
            for n in COUNTS:
                if n == 1 and shard is Sharding.NONE:
                    t = TrainConfig(method=Method.FULL, precision=Precision.BF16, seq_len=2048)
                else:
                    t = TrainConfig().with_(method=Method.FULL, precision=Precision.BF16, seq_len=2048, gpus=n,
                                    nodes=max(1, n // 8), sharding=shard, offload=off)
                row[f"{n} GPUs"] = round(estimate(spec, t).total_bytes / GIB, 1)
            rows.append(row)
    return rows


# torchtune's distributed recipes wrapped with FSDP1 (FullyShardedDataParallel) until its v0.2 (July 2024) moved
# them to FSDP2 fully_shard: the rows dated before run FSDP1, row 42 (2024-09) FSDP2
FSDP_VERSION = {"26": 1, "29": 1, "32": 1, "34": 1, "35": 1, "42": 2}


def published() -> tuple[list[str], list[float]]:
    rows = {r["id"]: r for r in csv.DictReader(open(PUBLISHED, newline=""))}
    out = ["| id | model | config | measured GiB/GPU | memplan peak allocated GiB | error |", "|---" * 6 + "|"]
    errors = []
    for rid, (name, knobs) in ROWS.items():
        r = rows[rid]
        t = TrainConfig().with_(**knobs, stack=Stack.TORCHTUNE,  # type: ignore[arg-type]
                                fsdp_version=FSDP_VERSION[rid])
        ours = estimate(resolve_model(name), t).peak_allocated_bytes / GIB
        measured = float(r["measured_gib"])
        err = 100 * (ours / measured - 1)
        errors.append(abs(err))
        what = (f"{t.method.value} {t.precision.value} micro {t.batch_size} seq {t.seq_len} "
                f"ckpt {'on' if t.checkpointing else 'off'}, {t.gpus} GPUs {t.sharding.value} FSDP{t.fsdp_version}"
                + (f" + offload {t.offload.value}" if t.offload is not Offload.NONE else ""))
        out.append(f"| {rid} | {name} | {what} | {measured:.2f} | {ours:.2f} | {err:+.1f} % |")
    return out, errors


if __name__ == "__main__":
    RESULTS.mkdir(exist_ok=True)
    table = per_rank()
    with open(RESULTS / "scale_per_rank.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    pub, errors = published()
    cols = list(table[0])
    lines = ["# Per-rank memory under data parallelism\n", "Command: `python benchmarks/scale.py`\n",
             "## Model states vs DeepSpeed's estimators\n",
             "GPU bytes per rank of model states alone (full fine-tuning, bf16, AdamW) from memplan's per-rank "
             "model (memplan/predict/sharding.py) and from `estimate_zero2_model_states_mem_needs` / "
             "`estimate_zero3_model_states_mem_needs` (deepspeed, largest layer = max(decoder layer, embedding)). "
             "The differences are memplan's rotary buffers.\n", *deepspeed_rows(), "",
             "## Published multi-GPU measurements (torchtune, FSDP, per GPU)\n",
             "torchtune's rows run pure bf16 on FSDP with variable-length data (<= the stated length): the estimate "
             f"at the full length is an upper bound. Median |error| {statistics.median(errors):.1f} %.\n", *pub, "",
             "## Memory per rank (GiB, nvidia-smi total) as the GPU count grows\n",
             "Full fine-tuning, bf16 mixed precision, AdamW, micro-batch 1, seq 2048, checkpointing on; 8 GPUs per "
             "node.\n", "| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in table]
    (RESULTS / "scale.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
