#!/usr/bin/env bash
# LLaMA-Factory 0.9.5 in a virtualenv of its own: its argument parser for tests/test_llamafactory_parser.py, its
# training (run_exp on CPU, memplan/testing/lf_truth.py) for tests/test_llamafactory_train.py. llamafactory pins
# transformers <= 5.6 and peft <= 0.18.1, so it cannot share memplan's environment.
# llamafactory goes in with --no-deps, beside only what `from llamafactory.hparams import get_train_args` really
# imports: torch (the CPU wheel on this disk; PyPI's torchvision / torchaudio, which llamafactory lists, do not
# import beside it; the parser never needs them, and lf_truth.py gives a text-only run an empty torchaudio module
# for data/mm_plugin.py's top-level import), transformers / peft / accelerate / datasets / trl at the
# versions llamafactory allows, omegaconf, and deepspeed, which HF TrainingArguments imports to read a DeepSpeed JSON.
# Usage: .ci/llamafactory_venv.sh DIR  ->  builds DIR (kept when it already works) and prints DIR/bin/python.
# Takes about 3-6 minutes on 2 cores.
set -euo pipefail
VENV="${1:?usage: $0 DIR}"
PY="$VENV/bin/python"
if [ -x "$PY" ] && "$PY" -c "import llamafactory.hparams, deepspeed" >/dev/null 2>&1; then
    echo "$PY"
    exit 0
fi
python -m venv "$VENV"
# pip's status is kept; only this machine's notes about its local package folders are left out of the log
pip_install() { "$PY" -m pip install --quiet --disable-pip-version-check "$@" >&2 2> >(grep -v "^WARNING: Location" >&2); }
pip_install "torch==2.13.0" setuptools wheel
pip_install "transformers==5.6.0" "peft==0.18.1" "accelerate==1.11.0" "datasets==4.0.0" "trl==0.24.0" omegaconf pyyaml
pip_install --no-build-isolation "deepspeed==0.19.8"  # an sdist: built against the venv's torch
pip_install --no-deps "llamafactory==0.9.5"
DS_ACCELERATOR=cpu "$PY" -c "from llamafactory.hparams import get_train_args; import deepspeed" >/dev/null 2>&1 || {
    echo "$0: the LLaMA-Factory venv at $VENV does not import get_train_args" >&2
    exit 1
}
echo "$PY"
