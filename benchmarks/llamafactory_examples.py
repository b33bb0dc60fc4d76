"""LLaMA-Factory's own example training YAMLs, estimated as a user would (`memplan estimate --config`, offline):
which get an estimate, which name keys not modelled, which fail and why, and that none ends in a traceback.

    python benchmarks/llamafactory_examples.py EXAMPLES_DIR [--label NAME]

EXAMPLES_DIR is a LLaMA-Factory checkout's `examples/` (not shipped here: its files are LLaMA-Factory's). Writes
benchmarks/results/llamafactory_examples.md.
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


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("examples", type=Path)
    ap.add_argument("--label", default="LLaMA-Factory HEAD")
    ap.add_argument("--timeout", type=float, default=300.0)
    args = ap.parse_args()
    files = sorted(p for p in args.examples.rglob("*.yaml")
                   if any(str(p.relative_to(args.examples)).startswith(t) for t in TRAINING))
    rows, counts = [], {"estimated": 0, "warned": 0, "refused": 0, "timeout": 0, "traceback": 0}
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
            "timeout" if proc.returncode == 124 else "refused"
        counts[kind] += 1
        counts["warned"] += "warning:" in err and proc.returncode == 0
        rows.append(f"| `{path.relative_to(args.examples)}` | {proc.returncode} | {kind} | {wall:.1f} s | "
                    f"{err[:160].replace('|', '/')} |")
    n = len(files)
    OUT.write_text("\n".join([
        f"# LLaMA-Factory example configs ({args.label})", "",
        f"`python benchmarks/llamafactory_examples.py EXAMPLES_DIR --label '{args.label}'`, with `HF_HUB_OFFLINE=1`: "
        f"{n} training YAMLs; {counts['estimated']} estimated ({counts['warned']} of them naming keys not modelled "
        f"yet), {counts['refused']} refused in one line, {counts['timeout']} over {args.timeout:.0f} s, "
        f"{counts['traceback']} tracebacks.", "",
        "| config | exit | outcome | wall | stderr |", "|---|---|---|---|---|", *rows, ""]))
    print(f"{n} configs: {counts} -> {OUT}")
    return 1 if counts["traceback"] else 0


if __name__ == "__main__":
    sys.exit(main())
