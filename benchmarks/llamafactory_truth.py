"""memplan (stack llamafactory; analytic and exact, CPU kernels) against LLaMA-Factory 0.9.5's own training on CPU:
`llamafactory.train.tuner.run_exp` in its own virtualenv, the allocator peak measured as memplan's CPU truth is
(memplan/testing/lf_truth.py), on a tiny llama saved in bf16 like a hub checkpoint (and in fp32, as Gemma-2's and
OLMo-2's are), every row cutoff_len tokens.

    MEMPLAN_LF_PYTHON=$(bash .ci/llamafactory_venv.sh /tmp/lfvenv) python benchmarks/llamafactory_truth.py [CASE ...]

Writes benchmarks/results/llamafactory_truth.md (and .json with the raw measurements). Named CASEs are measured
again and the others' LLaMA-Factory peaks read from that JSON (LLaMA-Factory's side does not change with memplan's
code); every estimate is recomputed.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from memplan.formats.llamafactory import read_llamafactory  # noqa: E402
from memplan.predict.estimator import estimate  # noqa: E402
from memplan.spec.catalog import resolve_model  # noqa: E402
from memplan.testing.lf_truth import measure, sft_yaml  # noqa: E402
from memplan.testing.tiny import TINY_CONFIGS  # noqa: E402
from memplan.trace.exact import exact_estimate  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "llamafactory_truth.md"
CUTOFF = 128
NOGC = {"disable_gradient_checkpointing": True}
FP32_CHECKPOINT = {"model_name_or_path": "model_float32"}  # lf_truth.write_fixture's fp32 copy (Gemma-2, OLMo-2)
CASES = {  # name: LLaMA-Factory keys over lf_truth.sft_yaml's (LoRA all, bf16, checkpointing, no `optim`)
    "lora bf16": {}, "lora bf16 no-gc": NOGC,
    "full bf16": {"finetuning_type": "full"}, "full bf16 no-gc": {"finetuning_type": "full", **NOGC},
    "full bf16 adamw_torch": {"finetuning_type": "full", "optim": "adamw_torch"},
    "freeze bf16": {"finetuning_type": "freeze"},
    "full fp32": {"finetuning_type": "full", "bf16": False},  # fp32: no precision flag
    "lora fp32": {"bf16": False}, "lora fp32 no-gc": {"bf16": False, **NOGC},
    # LLaMA-Factory's parameter dtypes (memplan.spec.dtypes): the checkpoint's dtype for the frozen base
    "lora pure_bf16": {"bf16": False, "pure_bf16": True},
    "freeze pure_bf16": {"finetuning_type": "freeze", "bf16": False, "pure_bf16": True},
    "full pure_bf16": {"finetuning_type": "full", "bf16": False, "pure_bf16": True},
    "lora bf16 fp32-ckpt": FP32_CHECKPOINT, "lora bf16 no-gc fp32-ckpt": {**FP32_CHECKPOINT, **NOGC},
    "freeze bf16 fp32-ckpt": {"finetuning_type": "freeze", **FP32_CHECKPOINT},
}


def main(argv: list[str]) -> int:
    lf_python = os.environ["MEMPLAN_LF_PYTHON"]
    earlier = json.loads(OUT.with_suffix(".json").read_text()) if OUT.with_suffix(".json").exists() else {}
    if argv == ["all"]:
        todo = list(CASES)
    else:  # the named cases, else the ones never measured
        todo = argv or [n for n in CASES if n not in earlier]
    folder = Path(tempfile.mkdtemp(prefix="lf_truth_"))
    (folder / "cfg.json").write_text(json.dumps(TINY_CONFIGS["llama"]))
    measure(lf_python, folder, "fixture", str(folder), str(folder / "cfg.json"), "4", str(CUTOFF), "float32")
    slug = {name: name.replace(" ", "_") for name in CASES}
    model = {"model_float32": str(folder / "model_float32")}
    yamls = {name: sft_yaml(folder, slug[name], CUTOFF, **{k: model.get(v, v) for k, v in keys.items()})
             for name, keys in CASES.items()}
    # one LLaMA-Factory process for every case: measured byte-identical to a process per case (bf16 LoRA / full,
    # then an fp32 checkpoint, no flag and pure_bf16 LoRA, in that order), as tests/test_llamafactory_train.py runs
    pairs = [a for n in todo for a in (str(yamls[n]), str(folder / f"{slug[n]}.json"))]
    measure(lf_python, folder, "train", *pairs, timeout_s=3000)
    for name in set(CASES) - set(todo):
        keep = {k: v for k, v in earlier[name].items() if k not in ("analytic", "exact", "optimizer")}
        (folder / f"{slug[name]}.json").write_text(json.dumps(keep))
    rows, raw = [], {}
    for name, path in yamls.items():
        truth = json.loads((folder / f"{slug[name]}.json").read_text())
        lf = read_llamafactory(path)
        spec = resolve_model(lf.model)
        analytic = estimate(spec, lf.train, device="cpu")
        exact = exact_estimate(spec, lf.train, device="cpu").peak_allocated_bytes
        t = truth["peak_bytes"]
        raw[name] = {**truth, "analytic": analytic.peak_allocated_bytes, "exact": exact,
                     "optimizer": lf.train.optimizer.value}
        rows.append(f"| {name} | {spec.checkpoint_dtype} | {lf.train.optimizer.value} | {t:,} | "
                    f"{truth['peak_step']} `{truth['peak_op']}` | "
                    f"{analytic.peak_allocated_bytes:,} | {100 * (analytic.peak_allocated_bytes / t - 1):+.2f} % | "
                    f"{exact:,} | {100 * (exact / t - 1):+.2f} % | {analytic.phase} |")
    OUT.write_text(
        "# memplan vs LLaMA-Factory 0.9.5's own CPU training peak\n\n"
        "`MEMPLAN_LF_PYTHON=$(bash .ci/llamafactory_venv.sh /tmp/lfvenv) python benchmarks/llamafactory_truth.py`"
        f": tiny llama ({json.dumps(TINY_CONFIGS['llama'])}) saved in bf16 (fp32-ckpt: the same saved in fp32), "
        f"4 alpaca rows each cut to cutoff_len "
        f"{CUTOFF} (no padding), micro-batch 2, 2 optimizer steps of `llamafactory.train.tuner.run_exp` (stage sft, "
        "template empty, flash_attn sdpa, use_cpu); peak = resident parameters and buffers at on_train_begin + "
        "the running maximum of the CPU allocator's events to on_train_end. AdamW without `fused` is run with "
        "foreach=True (the GPU's default path), as memplan's CPU truth does. memplan reads the same YAML "
        "(stack llamafactory) and predicts for PyTorch's CPU kernels (`device=\"cpu\"`). LLaMA-Factory peaks "
        f"measured in this run: {', '.join(todo) or 'none'}; the others are the JSON's earlier measurements.\n\n"
        "| case | checkpoint | optimizer read | LLaMA-Factory peak B | peak at step, op | analytic B | Δ | exact B | "
        "Δ | analytic phase |\n|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    OUT.with_suffix(".json").write_text(json.dumps(raw, indent=1) + "\n")
    print(OUT.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
