"""memplan's speed model against published training throughput (benchmarks/data/published_throughput.csv).

    python benchmarks/speed_published.py             # -> benchmarks/results/speed_published.{md,csv}
    python benchmarks/speed_published.py --no-fit    # the constants in speed.py, printed only

Compares RATIOS within one source (same GPU, same code: checkpointing on/off, full vs LoRA vs QLoRA, micro-batch,
sequence length, LoRA targets, GPU count); absolute tokens/s only as a secondary figure. Fits the speed model's
constants (memplan.fit.speed.SpeedConstants) by least squares on log ratios, each source weighted equally, and
reports every row before (the uncalibrated model as it was) and after calibration, and leave-one-source-out:
each source predicted by constants fitted on the others only.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from memplan.fit.speed import CALIBRATED, UNCALIBRATED_SCALING, SpeedConstants, StepTerms, rate_of, step_terms
from memplan.spec.catalog import resolve_model
from memplan.spec.hardware import GPU, gpu_catalog
from memplan.spec.model import ModelSpec
from memplan.spec.parallel import Offload, Parallelism, Sharding
from memplan.spec.stacks import Stack
from memplan.spec.train import Attention, Method, Precision, QuantMethod, TrainConfig

HERE = Path(__file__).parent
DATA = HERE / "data" / "published_throughput.csv"
RESULTS = HERE / "results"
# Qwen-1 (QWenLMHeadModel, remote code) as the llama-like qwen2 layout it is (tech_memo.md L60-63 @2df8e8ac: untied
# embedding, rotary, bias only on QKV, RMSNorm, SwiGLU); dims from Qwen/Qwen-1_8B and Qwen/Qwen-7B config.json
# (hidden 2048 / 4096, 24 / 32 layers, 16 / 32 heads, intermediate_size 11008 / 22016 which QWenMLP halves for
# w1 and w2, vocab 151936). Qwen-7B: 7,721,324,544 parameters, as ms-swift's Tuners table prints (7721.3245 M).
QWEN = {
    "qwen-1_8b": dict(model_type="qwen2", hidden_size=2048, intermediate_size=5504, num_hidden_layers=24,
                      num_attention_heads=16, num_key_value_heads=16, vocab_size=151936, tie_word_embeddings=False),
    "qwen-7b": dict(model_type="qwen2", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=32, vocab_size=151936, tie_word_embeddings=False),
}
FITTED = ("layer_overhead_s", "half_tokens", "lora_bytes_per_feature", "bnb", "gptq", "link_gbs")
START = dict(layer_overhead_s=1e-3, half_tokens=500.0, lora_bytes_per_feature=20.0, bnb=10.0, gptq=10.0, link_gbs=100.0)
MFU_START = 0.5  # fixed starts, so that the fit does not depend on the constants in speed.py
HOST_STARTS = (1e-4, 1e-3, 4e-3)
HALF_STARTS = (10.0, 1000.0)
BOUNDS = dict(layer_overhead_s=(1e-6, 0.1), half_tokens=(1.0, 1e5), lora_bytes_per_feature=(0.1, 1e4),
              bnb=(0.1, 1e4), gptq=(0.1, 1e4), link_gbs=(1.0, 1e4))
# ratios whose mechanism the model has no term for: reported, not fitted
NOT_FITTED = {"method+zero3": "full on DeepSpeed ZeRO-3 vs LoRA without: ZeRO-3's own per-step cost",
              "method+gpus": "the same on 2 GPUs: ZeRO-3 scaling", "gpus/nodes": "2 nodes, ZeRO-2: no inter-node term"}


MODEL_NOTE = """memplan.fit.speed: one micro-step on one GPU takes max(GPU time, host time). GPU time = matmul
FLOPs (2 per weight forward, 2 backward for input gradients, 2 more per trained weight, causal attention with
FlashAttention-2's 2.5x backward, LoRA's rank-r matmuls, the forward again under checkpointing) at `mfu_peak`
x tokens / (tokens + `half_tokens`), + LoRA's elementwise traffic (`lora_bytes_per_feature` per token per in+out
feature of each adapted linear per forward-equivalent pass) + 4-bit dequantisation (`dequant_bytes` per weight per
use: bnb and GPTQ fitted, torchao NF4 derived at 4.5 B), both over the GPU's memory bandwidth (gpus.csv), + where
parameters are sharded over several GPUs (FSDP full / hybrid shard, ZeRO-3) the gathers (forward, backward) and
the gradient reduce-scatter at `link_gbs`. Host time = `layer_overhead_s` per decoder layer per micro-step.
Several GPUs: x GPUs (x the assumed efficiency of DDP / ZeRO-1/2 / shard_grad_op).

Identified by one source only: `layer_overhead_s` (Qwen README: the only host-bound rows) and `link_gbs`
(fms-acceleration: the only in-node multi-GPU rows); the fold that leaves that source out keeps the fit's start
value (1e-4..4e-3 s, 100 GB/s), so its LOSO figure tests an assumption.
No published row that memplan can state isolates these, so they keep their assumed values: DDP / ZeRO-1/2 /
shard_grad_op scaling, CPU offload slowdowns (torchtune's 70B offload row states too little), HQQ / EETQ / AWQ /
AQLM dequantisation (bnb's value), attention kernels (eager vs flash: no term), DeepSpeed ZeRO-3's per-step engine
cost (Qwen's 1.8B full rows on one GPU: shown, not fitted), inter-node links (Qwen's 2-node ZeRO-2 rows: shown,
not fitted), the optimizer step, torch.compile, padding of variable-length batches."""


@dataclass(frozen=True, slots=True)
class Row:
    raw: dict[str, str]
    spec: ModelSpec
    train: TrainConfig
    gpu: GPU
    terms: StepTerms  # memplan.fit.speed.step_terms: what the constants multiply

    @property
    def id(self) -> str:
        return self.raw["id"]

    @property
    def source(self) -> str:
        return self.raw["source"]

    def kind(self, base: Row) -> str:
        """What the ratio against `base` measures: the data's `compare`; 'gpus/nodes' across nodes."""
        k = self.raw["compare"]
        return "gpus/nodes" if k == "gpus" and self.train.parallel.nodes > 1 else k

    @property
    def measured(self) -> float:
        return float(self.raw["tokens_per_s"])


def read_rows(path: Path = DATA) -> list[dict[str, str]]:
    """The data file's rows (comment lines starting with # skipped)."""
    with open(path, newline="") as fh:
        return list(csv.DictReader(line for line in fh if not line.startswith("#")))


def model_of(name: str) -> ModelSpec:
    return ModelSpec.from_config_dict(QWEN[name], name=name) if name in QWEN else resolve_model(name)


def config_of(raw: dict[str, str]) -> TrainConfig:
    """The row's configuration in memplan's knobs."""
    targets = tuple(raw["lora_targets"].split(";")) if raw["lora_targets"] else ("all-linear",)
    kw: dict[str, object] = dict(
        method=Method(raw["method"]), precision=Precision(raw["precision"]), stack=Stack(raw["stack"]),
        batch_size=int(raw["batch_size"]), seq_len=int(raw["seq_len"]), grad_accum=int(raw["grad_accum"] or 1),
        checkpointing=raw["checkpointing"] == "true", attn=Attention(raw["attn"] or "auto"),
        offload_checkpoints=raw["offload_checkpoints"] == "true",
        parallel=Parallelism(gpus=int(raw["gpus"]), nodes=int(raw["nodes"] or 1), sharding=Sharding(raw["sharding"]),
                             offload=Offload.NONE))
    if raw["method"] in ("lora", "qlora"):
        kw.update(lora_rank=int(raw["lora_rank"]), lora_targets=targets, lora_dropout=float(raw["lora_dropout"] or 0))
    if raw["quant_method"]:
        kw["quant_method"] = QuantMethod(raw["quant_method"])
    return TrainConfig(**kw)  # type: ignore[arg-type]


def load(path: Path = DATA) -> list[Row]:
    gpus = gpu_catalog()
    out = []
    for raw in read_rows(path):
        spec, train, gpu = model_of(raw["model"]), config_of(raw), gpus[raw["gpu"]]
        out.append(Row(raw, spec, train, gpu, step_terms(spec, train, gpu)))
    return out


def predict(row: Row, c: SpeedConstants) -> float:
    """memplan.fit.speed.tokens_per_s of the row, from its cached step terms."""
    return rate_of(row.terms, row.train, c)


# ---- the model before calibration (memplan/fit/speed.py as it was on main, 598f0f5), for the "before" column ----
def uncalibrated_tokens_per_s(spec: ModelSpec, train: TrainConfig, gpu: GPU) -> float:
    n = spec.num_parameters
    if spec.is_moe:
        dense = n - spec.num_layers * spec.num_experts * sum(lin.params for lin in spec.mlp_linears())
        n = dense + spec.num_layers * spec.experts_per_token * sum(lin.params for lin in spec.mlp_linears())
    fwd = 2 * n + 2 * spec.num_layers * spec.q_dim * train.seq_len
    grads = 2 * n if train.method is Method.FULL else 0
    flops = 2 * fwd + grads + (fwd if train.checkpointing else 0)
    peak = ((gpu.fp32_tflops or 19.5) if train.precision is Precision.FP32 else
            (gpu.dense_bf16_tflops or (gpu.fp32_tflops or 19.5) * 4)) * 1e12
    tokens = train.batch_size * train.seq_len
    rate = peak * 0.45 * tokens / (tokens + 1024) / flops
    if train.gpus > 1:
        rate *= train.gpus * UNCALIBRATED_SCALING.get(train.sharding, 0.9)
    return rate / 1.35 if train.method is Method.QLORA else rate


def constants_of(p: dict[str, float], mfu: float) -> SpeedConstants:
    return replace(CALIBRATED, mfu_peak=mfu, layer_overhead_s=p["layer_overhead_s"], half_tokens=p["half_tokens"],
                   lora_bytes_per_feature=p["lora_bytes_per_feature"],
                   dequant_bytes={**CALIBRATED.dequant_bytes, "bnb": p["bnb"], "gptq": p["gptq"]},
                   link_gbs=p["link_gbs"])


def params_of(c: SpeedConstants) -> dict[str, float]:
    return dict(layer_overhead_s=c.layer_overhead_s, half_tokens=c.half_tokens,
                lora_bytes_per_feature=c.lora_bytes_per_feature, bnb=c.dequant_bytes["bnb"],
                gptq=c.dequant_bytes["gptq"], link_gbs=c.link_gbs)


def ratio_pairs(rows: list[Row]) -> list[tuple[Row, Row, str]]:
    """(row, its base, the ratio's kind) for every row that names a base."""
    by_id = {r.id: r for r in rows}
    pairs = [(r, by_id[r.raw["base"]]) for r in rows if r.raw["compare"]]
    return [(r, b, r.kind(b)) for r, b in pairs]


def log_error(row: Row, base: Row, model) -> float:
    """log(predicted ratio / measured ratio); model(row) -> tokens/s."""
    pred = model(row) / model(base)
    return math.log(pred) - math.log(row.measured / base.measured)


def _weights(items: list, source) -> list[float]:
    counts: dict[str, int] = {}
    for it in items:
        counts[source(it)] = counts.get(source(it), 0) + 1
    return [1.0 / counts[source(it)] for it in items]


def fit(rows: list[Row], triples: list[tuple[Row, Row, str]]) -> tuple[dict[str, float], float]:
    """Constants minimising the source-weighted squared log ratio errors; mfu_peak then from the absolute rows
    (it scales every time term but the fixed ones, so the two steps alternate)."""
    from scipy.optimize import least_squares  # the benchmark's own dependency, not memplan's

    pairs = [(r, b) for r, b, kind in triples if kind not in NOT_FITTED]
    w = [math.sqrt(x) for x in _weights(pairs, lambda p: p[0].source)]
    absolute = [r for r in rows if r.raw["absolute"] == "yes"]
    wa = _weights(absolute, lambda r: r.source)
    lo = [math.log(BOUNDS[k][0]) for k in FITTED]
    hi = [math.log(BOUNDS[k][1]) for k in FITTED]
    p, mfu = dict(START), MFU_START
    for it in range(6):
        def resid(x: list[float], mfu: float = mfu) -> list[float]:
            c = constants_of(dict(zip(FITTED, map(math.exp, x), strict=True)), mfu)
            return [wi * log_error(r, b, lambda row: predict(row, c)) for wi, (r, b) in zip(w, pairs, strict=True)]
        # the host term is a max(): flat where it does not bind, so start it at several values (first pass only)
        starts = [{**p, "layer_overhead_s": h, "half_tokens": n} for h in HOST_STARTS for n in HALF_STARTS] \
            if it == 0 else [p]
        best = None
        for st in starts:
            x0 = [min(max(math.log(st[k]), lo[i] + 1e-9), hi[i] - 1e-9) for i, k in enumerate(FITTED)]
            res = least_squares(resid, x0, bounds=(lo, hi))
            if best is None or res.cost < best.cost:
                best = res
        p = dict(zip(FITTED, map(math.exp, best.x), strict=True))
        if absolute:  # log mfu shifts every absolute prediction: the weighted mean of the log errors fixes it
            c = constants_of(p, mfu)
            err = [math.log(predict(r, c) / r.measured) for r in absolute]
            mfu = min(1.0, mfu * math.exp(-sum(e * x for e, x in zip(err, wa, strict=True)) / sum(wa)))
    return p, mfu


def pct(log_err: float) -> float:
    return 100 * (math.exp(log_err) - 1)


def median_abs(values: list[float]) -> float:
    return statistics.median(abs(v) for v in values) if values else float("nan")


def evaluate(rows: list[Row], fitted: SpeedConstants | None, loso: dict[str, SpeedConstants]) -> list[dict]:
    out = []
    for r, b, kind in ratio_pairs(rows):
        def model(c):
            return lambda row: predict(row, c)
        e = dict(id=r.id, source=r.source, compare=kind, base=b.id, measured_ratio=r.measured / b.measured,
                 before=pct(log_error(r, b, lambda row: uncalibrated_tokens_per_s(row.spec, row.train, row.gpu))),
                 after=pct(log_error(r, b, model(fitted or CALIBRATED))),
                 loso=pct(log_error(r, b, model(loso[r.source]))) if r.source in loso else float("nan"),
                 fitted=kind not in NOT_FITTED)
        e["predicted_ratio"] = e["measured_ratio"] * (1 + e["after"] / 100)
        out.append(e)
    return out


def absolute_rows(rows: list[Row], c: SpeedConstants) -> list[dict]:
    return [dict(id=r.id, source=r.source, measured=r.measured,
                 before=uncalibrated_tokens_per_s(r.spec, r.train, r.gpu),
                 after=predict(r, c)) for r in rows if r.raw["absolute"] == "yes"]


def write(results: list[dict], absolute: list[dict], c: SpeedConstants, loso: dict[str, SpeedConstants],
          command: str, save: bool = True) -> str:
    """benchmarks/results/speed_published.{csv,md} (save=False: the markdown text only)."""
    RESULTS.mkdir(exist_ok=True)
    keys = ["id", "source", "compare", "base", "measured_ratio", "predicted_ratio", "before", "after", "loso", "fitted"]
    with open(RESULTS / "speed_published.csv" if save else "/dev/null", "w", newline="") as fh:
        wr = csv.DictWriter(fh, keys, lineterminator="\n")
        wr.writeheader()
        for e in results:
            wr.writerow({k: (round(v, 4) if isinstance(v, float) else v) for k, v in e.items()})
    fit_rows = [e for e in results if e["fitted"]]
    lines = [f"# Speed model vs published throughput ratios\n\n`{command}` (data: benchmarks/data/"
             "published_throughput.csv, every row with its source). Error = predicted ratio / measured ratio - 1, "
             "a ratio being a row's tokens/s over its base row's (same source, GPU and code). *before*: the "
             "uncalibrated model (main 598f0f5); *after*: calibrated, fitted on all sources; *LOSO*: each source "
             "predicted by constants fitted on the other sources only.\n",
             "| | rows | median abs error before | after | LOSO |", "|---|---|---|---|---|"]
    def summary(label: str, es: list[dict]) -> None:
        lines.append(f"| {label} | {len(es)} | {median_abs([e['before'] for e in es]):.1f} % | "
                     f"{median_abs([e['after'] for e in es]):.1f} % | {median_abs([e['loso'] for e in es]):.1f} % |")
    summary("**all fitted ratios**", fit_rows)
    for src in sorted({e["source"] for e in fit_rows}):
        summary(f"source {src}", [e for e in fit_rows if e["source"] == src])
    for kind in sorted({e["compare"] for e in fit_rows}):
        summary(f"ratio: {kind}", [e for e in fit_rows if e["compare"] == kind])
    for kind, why in NOT_FITTED.items():
        summary(f"not fitted: {kind} ({why})", [e for e in results if e["compare"] == kind])
    lines += ["", "## Model and what stays uncalibrated", "", MODEL_NOTE]
    lines += ["", "## Constants", "", "| constant | before | fitted (all sources) | LOSO range |", "|---|---|---|---|"]
    before = dict(layer_overhead_s="0", half_tokens="1024 (MFU_HALF_TOKENS)", lora_bytes_per_feature="0",
                  bnb="x1.35 (QLORA_SLOWDOWN)",
                  gptq="x1.35 (QLORA_SLOWDOWN)",
                  link_gbs="none (full_shard x0.87, zero3 x0.85)")
    p = params_of(c)
    for k in FITTED:
        vals = [params_of(x)[k] for x in loso.values()] or [float("nan")]
        lines.append(f"| {k} | {before[k]} | {p[k]:.4g} | {min(vals):.4g} - {max(vals):.4g} |")
    mfus = [x.mfu_peak for x in loso.values()] or [float("nan")]
    lines.append(f"| mfu_peak (absolute rows) | 0.45 | {c.mfu_peak:.3f} | {min(mfus):.3f} - {max(mfus):.3f} |")
    lines += ["", "Constants of each leave-one-source-out fit (fitted without that source):", "",
              "| left out | " + " | ".join(FITTED) + " | mfu_peak |", "|---" * (len(FITTED) + 2) + "|"]
    for src, x in sorted(loso.items()):
        lines.append(f"| {src} | " + " | ".join(f"{params_of(x)[k]:.4g}" for k in FITTED) + f" | {x.mfu_peak:.3f} |")
    lines += ["", "## Every ratio", "", "| id | source | ratio | base | measured | predicted | before | after | LOSO |",
              "|---|---|---|---|---|---|---|---|---|"]
    for e in results:
        mark = "" if e["fitted"] else " (not fitted)"
        lines.append(f"| {e['id']} | {e['source']} | {e['compare']}{mark} | {e['base']} | {e['measured_ratio']:.3f} | "
                     f"{e['predicted_ratio']:.3f} | {e['before']:+.1f} % | {e['after']:+.1f} % | {e['loso']:+.1f} % |")
    ab = [math.log(a["after"] / a["measured"]) for a in absolute]
    bb = [math.log(a["before"] / a["measured"]) for a in absolute]
    lines += ["", f"## Absolute tokens/s (secondary)\n\n{len(absolute)} rows with an absolute figure; median abs "
              f"error before {median_abs([pct(x) for x in bb]):.0f} %, after {median_abs([pct(x) for x in ab]):.0f} %"
              " (mfu_peak is the one constant they set).\n", "| id | measured | before | after |", "|---|---|---|---|"]
    for a in absolute:
        lines.append(f"| {a['id']} | {a['measured']:.0f} | {a['before']:.0f} | {a['after']:.0f} |")
    text = "\n".join(lines) + "\n"
    if save:
        (RESULTS / "speed_published.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-fit", action="store_true",
                    help="evaluate the constants in memplan/fit/speed.py only (prints, writes nothing)")
    args = ap.parse_args(argv)
    rows = load()
    pairs = ratio_pairs(rows)
    sources = sorted({r.source for r, _, _ in pairs})
    if args.no_fit:
        c, loso = CALIBRATED, {}
    else:
        p, mfu = fit(rows, pairs)
        c = constants_of(p, mfu)
        loso = {}
        for s in sources:
            others = [r for r in rows if r.source != s]
            ps, ms = fit(others, [pr for pr in pairs if pr[0].source != s])
            loso[s] = constants_of(ps, ms)
        print("fitted:", {k: round(v, 5) for k, v in p.items()}, "mfu_peak", round(mfu, 4))
    results = evaluate(rows, c, loso)
    text = write(results, absolute_rows(rows, c), c, loso, "python benchmarks/speed_published.py", save=not args.no_fit)
    print(text.split("\n## Constants")[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
