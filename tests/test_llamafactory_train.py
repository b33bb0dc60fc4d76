"""LLaMA-Factory 0.9.5's own training (llamafactory.train.tuner.run_exp: its model loading and preparation, SFT
collator and CustomSeq2SeqTrainer) on CPU in its own virtualenv (MEMPLAN_LF_PYTHON, built by
.ci/llamafactory_venv.sh), its allocator peak measured as memplan's CPU truth is (memplan/testing/lf_truth.py):
the analytic and the exact estimate of the same YAML (stack llamafactory) within 1 % of it."""

import json
import os

import pytest

from memplan.formats.llamafactory import read_llamafactory
from memplan.predict.estimator import estimate
from memplan.spec.catalog import resolve_model
from memplan.spec.optimizers import Optimizer
from memplan.spec.stacks import Stack
from memplan.testing.lf_truth import lf_python, measure, sft_yaml
from memplan.testing.tiny import SMALL_LLAMA

LF_PYTHON = os.environ.get("MEMPLAN_LF_PYTHON")
needs_lf = pytest.mark.skipif(not LF_PYTHON, reason="MEMPLAN_LF_PYTHON is unset: build LLaMA-Factory 0.9.5's "
                              "virtualenv with `.ci/llamafactory_venv.sh DIR` and set it to DIR/bin/python")
CUTOFF = 64  # every row is cutoff_len tokens (lf_truth.write_fixture); a multiple of the collator's 8: no padding
# the cases run in one LLaMA-Factory process (CI time); benchmarks/llamafactory_truth.py runs the wider matrix.
# The last three are LLaMA-Factory's parameter dtypes (memplan.spec.dtypes): an fp32 checkpoint under bf16 autocast
# (an fp32 frozen base), no flag over the bf16 one (a bf16 base, fp32 adapters, no autocast), pure_bf16 (the same:
# peft upcasts the adapters)
FP32_CHECKPOINT = "model_float32"  # lf_truth.write_fixture's fp32 copy of the model
CASES = {"lora_bf16_gc": {}, "full_bf16_gc": {"finetuning_type": "full"},
         "lora_bf16_fp32_checkpoint": {"model_name_or_path": FP32_CHECKPOINT}, "lora_no_flag": {"bf16": False},
         "lora_pure_bf16": {"bf16": False, "pure_bf16": True},
         # the keys that change which parameters train (tests/test_lf_trainable.py): LoRA on LLaMA Pro's expanded
         # block (layer 1 of 2) beside a trained lm_head copy (peft modules_to_save); under LLaMA-Factory's
         # checkpointing peft makes the embedding's output require grad, so the frozen layer 0 saves its tape.
         # Measured: analytic -0.076 %, exact -0.075 %. (freeze_trainable_modules mlp + freeze_extra_modules
         # embed_tokens on freeze_trainable_layers 1, run the same way: -0.07 % both; not in CI, ~15 s a case)
         "lora_pro_head": {"use_llama_pro": True, "freeze_trainable_layers": 1, "additional_target": "lm_head"}}


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lf_train")
    (folder / "cfg.json").write_text(json.dumps(SMALL_LLAMA))
    python = lf_python()  # .ci/run: waits for the venv built beside the first tests
    measure(python, folder, "fixture", str(folder), str(folder / "cfg.json"), "4", str(CUTOFF), "float32")
    model = {FP32_CHECKPOINT: str(folder / FP32_CHECKPOINT)}
    yamls = {name: sft_yaml(folder, name, CUTOFF, **{k: model.get(v, v) for k, v in keys.items()})
             for name, keys in CASES.items()}
    measure(python, folder, "train", *(a for n, y in yamls.items() for a in (str(y), str(folder / f"{n}.json"))))
    return {name: (yamls[name], json.loads((folder / f"{name}.json").read_text())) for name in CASES}


@needs_lf
@pytest.mark.integration
@pytest.mark.parametrize("case", list(CASES))
def test_estimates_within_one_percent_of_llamafactorys_own_cpu_peak(measured, case) -> None:
    pytest.importorskip("transformers")
    from memplan.trace.exact import exact_estimate

    path, truth = measured[case]
    assert truth["batch_lengths"] == [CUTOFF, CUTOFF]  # the measured batches are the estimated shape
    lf = read_llamafactory(path)
    assert lf.train.stack is Stack.LLAMAFACTORY and lf.train.seq_len == CUTOFF
    assert lf.train.optimizer is Optimizer.ADAMW_FUSED  # no `optim`: transformers 5.6's default
    spec = resolve_model(lf.model)
    assert spec.checkpoint_dtype == ("float32" if FP32_CHECKPOINT in lf.model else "bfloat16")  # spec.dtypes' D
    assert truth["trainable"] == estimate(spec, lf.train, device="cpu").trainable_params
    for how, got in (("analytic", estimate(spec, lf.train, device="cpu").peak_allocated_bytes),
                     ("exact", exact_estimate(spec, lf.train, device="cpu").peak_allocated_bytes)):
        assert abs(got - truth["peak_bytes"]) / truth["peak_bytes"] < 0.01, (how, got, truth)
