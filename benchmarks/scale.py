"""Per-rank memory under data parallelism: vs DeepSpeed's model-state estimators, and how memory per rank falls
with the GPU count for 7B, 13B and 70B under each sharding (published multi-GPU rows: benchmarks/published.py).

    python benchmarks/scale.py   # -> benchmarks/results/scale.md, scale_per_rank.csv
"""

from __future__ import annotations

import csv
from pathlib import Path

from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

from memplan.predict.estimator import estimate
from memplan.predict.layout import Layout
from memplan.predict.sharding import largest_unit_params, model_state_bytes
from memplan.predict.weights import model_states
from memplan.spec.catalog import resolve_model
from memplan.spec.train import Method, Offload, Precision, Sharding, TrainConfig

RESULTS = Path(__file__).parent / "results"
GIB = 2**30
MODELS = ("llama-2-7b", "llama-2-13b", "llama-2-70b")
LAYOUTS = [("DDP", Sharding.NONE, Offload.NONE), ("ZeRO-1", Sharding.ZERO1, Offload.NONE),
           ("ZeRO-2", Sharding.ZERO2, Offload.NONE), ("ZeRO-3", Sharding.ZERO3, Offload.NONE),
           ("ZeRO-3 + offload optimizer", Sharding.ZERO3, Offload.OPTIMIZER),
           ("ZeRO-3 + offload params", Sharding.ZERO3, Offload.PARAMS),
           ("FSDP full_shard", Sharding.FULL_SHARD, Offload.NONE),
           ("FSDP shard_grad_op", Sharding.SHARD_GRAD_OP, Offload.NONE)]
COUNTS = (1, 2, 4, 8, 16, 32, 64)


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


if __name__ == "__main__":
    RESULTS.mkdir(exist_ok=True)
    table = per_rank()
    with open(RESULTS / "scale_per_rank.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    cols = list(table[0])
    lines = ["# Per-rank memory under data parallelism\n", "Command: `python benchmarks/scale.py`\n",
             "## Model states vs DeepSpeed's estimators\n",
             "GPU bytes per rank of model states alone (full fine-tuning, bf16, AdamW) from memplan's per-rank "
             "model (memplan/predict/sharding.py) and from `estimate_zero2_model_states_mem_needs` / "
             "`estimate_zero3_model_states_mem_needs` (deepspeed, largest layer = max(decoder layer, embedding)). "
             "The differences are memplan's rotary buffers.\n", *deepspeed_rows(), "",
             "Published multi-GPU measurements: benchmarks/results/published.md (benchmarks/published.py).\n",
             "## Memory per rank (GiB, nvidia-smi total) as the GPU count grows\n",
             "Full fine-tuning, bf16 mixed precision, AdamW, micro-batch 1, seq 2048, checkpointing on; 8 GPUs per "
             "node.\n", "| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in table]
    (RESULTS / "scale.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
