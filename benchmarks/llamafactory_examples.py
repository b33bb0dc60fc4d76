"""LLaMA-Factory's own example training YAMLs, estimated as a user would (`memplan estimate --config`, offline):
which get an estimate, which name keys not modelled, which fail and why, and that none ends in a traceback.

    python benchmarks/llamafactory_examples.py EXAMPLES_DIR [--label NAME] [--timeout S] [--out FILE.md]

EXAMPLES_DIR is a LLaMA-Factory checkout's `examples/` (not shipped here: its files are LLaMA-Factory's). Writes
benchmarks/results/llamafactory_examples.md (or --out). A YAML under the training folders that is no LLaMA-Factory
config at all (memplan.formats.llamafactory.not_a_config: a token-description file) is listed, not counted.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).parent / "results" / "llamafactory_examples.md"
TRAINING = ("train_full", "train_lora", "train_qlora", "extras", "ascend", "ktransformers/train_lora", "megatron")


# Why the hub models the examples name stay refused (no config.json on disk, no honest way to establish one), and
# what else a reader of a row should know; written under the table
NOTES = (
    "`Qwen/Qwen3.5-4B`, `Qwen/Qwen2-VL-7B-Instruct`: in the catalog from public config copies with their parameter "
    "counts checked (the catalog files' `_source`); `deepseek-ai/DeepSeek-V3-0324(-BF16)`: the V3 entry under its own "
    "name (its model card: the structure is exactly DeepSeek-V3's; -BF16 without the FP8 storage); "
    "`opensourcerelease/DeepSeek-V3-bf16`: the V3 entry cast to BF16, as KTransformers' and LLaMA-Factory's docs say.",
    "`OpenMOSS-Team/MOSS-VL-Instruct-0708`: a remote-code model transformers 5.24 does not ship, and no copy of its "
    "config.json was found: refused.",
    "`/path/to/...` (`/path/to/DeepSeek-V3.1-source`), `models/llama3-8b-pro`: placeholders or outputs of another "
    "LLaMA-Factory step (llama_pro's expanded checkpoint): refused as unknown models, offline in about a second "
    "(no transformers import when the hub cache has no config.json).",
    "Every training YAML now answers analytically (Qwen3.5, Qwen3-VL / -MoE, Qwen2-VL, gpt-oss and Llama 4 are in "
    "the formulas): the slowest command took 1.5 s here; a DeepSpeed / FSDP YAML without a GPU count is estimated "
    "on one GPU with a one-line warning (`fit` searches 1-8 GPUs).",
    "Pre-quantized AWQ / GPTQ / AQLM repositories: their quantization_config is assumed from the name and the "
    "library's defaults (one warning line, memplan.spec.prequantized), their dimensions are the catalog base's.",
    "`use_kt: true` (KTransformers: experts on the CPU) and Megatron-Core's parallel sizes (`megatron/*`) are named "
    "in the not-modelled warning.",
)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("examples", type=Path)
    ap.add_argument("--label", default="LLaMA-Factory HEAD")
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    found = sorted(p for p in args.examples.rglob("*.yaml")
                   if any(str(p.relative_to(args.examples)).startswith(t) for t in TRAINING))
    skipped = [p for p in found if _not_a_config(p)]
    files = [p for p in found if p not in skipped]
    rows, counts = [], {"estimated": 0, "warned": 0, "refused": 0, "not training": 0, "timeout": 0, "traceback": 0}
    for path in files:
        t0 = time.perf_counter()
        # its own process group: a timeout must also end the exact mode's forked trace child (left running before)
        child = subprocess.Popen([sys.executable, "-m", "memplan", "estimate", "--config", str(path), "--json"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                                 cwd=args.examples.parent, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        try:
            out, errs = child.communicate(timeout=args.timeout)
            proc = subprocess.CompletedProcess([], child.returncode, out, errs)
        except subprocess.TimeoutExpired:  # the exact mode of a big MoE / VL model on a loaded machine
            os.killpg(child.pid, signal.SIGKILL)
            child.communicate()
            proc = subprocess.CompletedProcess([], 124, "", f"timed out after {args.timeout} s")
        wall = time.perf_counter() - t0
        err = " ".join(proc.stderr.split())
        kind = "traceback" if "Traceback" in proc.stderr else "estimated" if proc.returncode == 0 else \
            "timeout" if proc.returncode == 124 else "not training" if "not a training run" in err else "refused"
        counts[kind] += 1
        counts["warned"] += "warning:" in err and proc.returncode == 0
        rows.append(f"| `{path.relative_to(args.examples)}` | {proc.returncode} | {kind} | {wall:.1f} s | "
                    f"{err[:160].replace('|', '/')} |")
    n = len(files)
    command = f"python benchmarks/llamafactory_examples.py EXAMPLES_DIR --label '{args.label}' " \
              f"--timeout {args.timeout:g}" + (f" --out {args.out}" if args.out != OUT else "")
    not_counted = ("Not counted, no LLaMA-Factory config: " + ", ".join(
        f"`{p.relative_to(args.examples)}`" for p in skipped) + ".") if skipped else ""
    args.out.write_text("\n".join([
        f"# LLaMA-Factory example configs ({args.label})", "",
        f"`{command}`, with `HF_HUB_OFFLINE=1`: "
        f"{n} YAMLs in the training folders; {counts['estimated']} estimated ({counts['warned']} of them naming keys "
        f"not modelled yet), {counts['not training']} recognised as not a training run (an evaluation task: "
        f"refused in one line, as issue 16 asks), {counts['refused']} refused in one line, {counts['timeout']} over "
        f"{args.timeout:.0f} s, {counts['traceback']} tracebacks: {counts['estimated']} of "
        f"{n - counts['not training']} training runs estimated "
        f"({100 * counts['estimated'] / max(1, n - counts['not training']):.0f} %).", "",
        *([not_counted, ""] if not_counted else []),
        "| config | exit | outcome | wall | stderr |", "|---|---|---|---|---|", *rows, "", "Notes:", "",
        *(f"- {n}" for n in NOTES), ""]))
    print(f"{n} configs: {counts} -> {args.out}")
    return 1 if counts["traceback"] else 0


def _not_a_config(path: Path) -> bool:
    """memplan's own rule (the one `memplan estimate --config` refuses with), on the YAML as parsed."""
    import yaml

    from memplan.formats.llamafactory import not_a_config

    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return False  # memplan says why in its row
    return isinstance(raw, dict) and not_a_config(raw) is not None


if __name__ == "__main__":
    sys.exit(main())
