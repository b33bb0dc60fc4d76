"""LLaMA-Factory's own training on CPU, its allocator peak measured as memplan.testing.truth measures the reference
step: the ground truth of the `llamafactory` stack (issue #17).

Runs with LLaMA-Factory 0.9.5's virtualenv python (.ci/llamafactory_venv.sh; llamafactory pins transformers <= 5.6
and cannot share memplan's environment), the worktree on PYTHONPATH:

    python -m memplan.testing.lf_truth fixture DIR CONFIG.json SAMPLES CUTOFF [DTYPE ...]
        DIR/model: a random-weight model of CONFIG.json (transformers' config keys) saved in bf16, as hub
        checkpoints mostly are (config.json's `dtype` says it), and a word-level tokenizer; DIR/model_DTYPE the same
        weights saved in each DTYPE named (float32: Gemma-2's and OLMo-2's checkpoints);
        DIR/data: SAMPLES alpaca rows whose prompt and answer are each CUTOFF words, registered as `tiny` in
        dataset_info.json, so LLaMA-Factory's truncation (infer_seqlen) makes every row exactly CUTOFF tokens
    python -m memplan.testing.lf_truth train RUN.yaml OUT.json [RUN2.yaml OUT2.json ...]
        llamafactory.train.tuner.run_exp on each RUN.yaml (LLaMA-Factory's own keys) in turn, in one process;
        OUT.json gets its peak

`sft_yaml` and `measure` are the memplan side (memplan's own environment): the YAML of a case, and the driver run in
LLaMA-Factory's venv.

The profiled window is HF Trainer's training loop (on_train_begin .. on_train_end): the model is loaded and prepared
by LLaMA-Factory before it, so the peak is the resident parameters and buffers plus the running maximum of the
CPU allocator's events inside, as in measure_cpu_peak.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")
ROOT = Path(__file__).resolve().parents[2]


def sft_yaml(folder: Path, name: str, cutoff: int, **keys: Any) -> Path:
    """A LLaMA-Factory SFT YAML over the fixture in `folder`: two optimizer steps of micro-batch 2 on CPU, no eval
    or save, bf16 unless `keys` say otherwise; written to folder/NAME.yaml. `memplan estimate --config` reads the
    same file."""
    import yaml

    cfg = dict(model_name_or_path=str(folder / "model"), stage="sft", do_train=True, finetuning_type="lora",
               lora_target="all", dataset="tiny", dataset_dir=str(folder / "data"), template="empty",
               cutoff_len=cutoff, overwrite_cache=True, output_dir=str(folder / f"out_{name}"),
               overwrite_output_dir=True, per_device_train_batch_size=2, gradient_accumulation_steps=1, max_steps=2,
               learning_rate=1.0e-4, bf16=True, logging_steps=1, save_strategy="no", report_to="none",
               flash_attn="sdpa", use_cpu=True)  # use_cpu: HF TrainingArguments refuses bf16 on CPU without it
    cfg.update(keys)
    if cfg["finetuning_type"] != "lora":
        cfg.pop("lora_target")
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def lf_python(wait_s: float = 1800.0) -> str | None:
    """LLaMA-Factory's venv python ($MEMPLAN_LF_PYTHON), None when unset. .ci/run builds the venv beside the first
    tests and sets $MEMPLAN_LF_READY to the file its build writes its exit status to: wait for it here (the first
    test that needs the venv), and fail with the build's log when the build failed."""
    import time

    python, ready = os.environ.get("MEMPLAN_LF_PYTHON"), os.environ.get("MEMPLAN_LF_READY")
    if python and ready:
        deadline = time.monotonic() + wait_s
        while not os.path.exists(ready) or not Path(ready).read_text().strip():
            if time.monotonic() > deadline:
                raise RuntimeError(f"the LLaMA-Factory venv build did not finish within {wait_s:g} s ({ready})")
            time.sleep(2)
        if Path(ready).read_text().strip() != "0":
            log = Path(ready + ".log")
            raise RuntimeError("the LLaMA-Factory venv build failed:\n" +
                               (log.read_text()[-4000:] if log.exists() else "(no log)"))
    return python


def measure(lf_python: str, folder: Path, *argv: str, timeout_s: int = 1200) -> None:
    """Run this driver (`fixture ...` or `train ...`) with LLaMA-Factory's python, offline, the hub and datasets
    cache in folder/hf; raises with the driver's last output lines when it fails."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu",
           "HF_HOME": str(folder / "hf"), "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run([lf_python, "-m", "memplan.testing.lf_truth", *argv], env=env, capture_output=True,
                         text=True, timeout=timeout_s)
    if out.returncode != 0:
        raise RuntimeError(f"lf_truth {argv[0]} failed ({out.returncode}):\n" + (out.stdout + out.stderr)[-4000:])


def write_fixture(folder: Path, config: dict[str, Any], samples: int, cutoff: int, dtypes: tuple[str, ...] = ()
                  ) -> None:
    """The model folder (config, random weights in bf16, tokenizer), one more per dtype in `dtypes`
    (folder/model_DTYPE), and the registered dataset."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    cfg = dict(config)
    vocab = int(cfg["vocab_size"])
    words = [f"w{i}" for i in range(vocab - len(SPECIALS))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate((*SPECIALS, *words))}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    cfg.update(bos_token_id=1, eos_token_id=2, pad_token_id=3)
    torch.manual_seed(0)
    # saved in bf16 (and `dtypes`), as hub checkpoints are: LLaMA-Factory 0.9.5 loads the checkpoint's own dtype
    # (model/loader.py L155 `init_kwargs["torch_dtype"] = "auto"`), whatever bf16 / fp16 the YAML asks for
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    for name, dtype in (("model", "bfloat16"), *((f"model_{d}", d) for d in dtypes)):
        model.to(getattr(torch, dtype)).save_pretrained(folder / name)
        fast.save_pretrained(folder / name)
    rows = [{"instruction": " ".join(words[(7 * i + 3 * j) % len(words)] for j in range(cutoff)), "input": "",
             "output": " ".join(words[(5 * i + 11 * j) % len(words)] for j in range(cutoff))} for i in range(samples)]
    (folder / "data").mkdir(parents=True, exist_ok=True)
    (folder / "data" / "tiny.json").write_text(json.dumps(rows))
    (folder / "data" / "dataset_info.json").write_text(json.dumps({"tiny": {"file_name": "tiny.json"}}))


def _stub_torchaudio() -> None:
    """llamafactory/data/mm_plugin.py L30 imports torchaudio at the top and uses it only to read audio inputs
    (_regularize_audios, L316-321); PyPI's torchaudio wheels do not load beside the venv's torch 2.13 CPU wheel
    ("Could not load this library: .../_torchaudio.so"), so a text-only run gets an empty module. It goes in after
    the libraries that probe for torchaudio at import have found none (transformers' is_torchaudio_available is
    cached); a later probe raises ("torchaudio.__spec__ is None") rather than taking the stub for torchaudio."""
    import datasets  # noqa: F401  (its config probes the audio backends at import)
    import transformers.utils.import_utils as hf_imports

    hf_imports.is_torchaudio_available()
    sys.modules.setdefault("torchaudio", types.ModuleType("torchaudio"))


def _adamw_foreach() -> Any:
    """On a GPU torch.optim.AdamW takes the foreach path by default (torch/optim/optimizer.py
    _default_to_fused_or_foreach), on a CPU the for-loop: ask for foreach, as memplan.build.model.build_optimizer
    does for the CPU truth, so the step measured is the GPU's step. HF Trainer passes no foreach for adamw_torch
    (transformers 5.6 trainer.py get_optimizer_cls_and_kwargs); adamw_torch_fused passes fused=True, kept."""
    from unittest import mock

    import torch
    from transformers import Trainer

    original = Trainer.get_optimizer_cls_and_kwargs

    def with_foreach(args: Any, model: Any = None) -> tuple[Any, dict[str, Any]]:
        cls, kwargs = original(args, model)
        if cls is torch.optim.AdamW and not kwargs.get("fused"):
            kwargs = {**kwargs, "foreach": True}
        return cls, kwargs

    return mock.patch.object(Trainer, "get_optimizer_cls_and_kwargs", staticmethod(with_foreach))


def _bf16_device() -> Any:
    """LLaMA-Factory refuses pure_bf16 where transformers finds no bf16 GPU (hparams/parser.py L380-382:
    `is_torch_bf16_gpu_available()`, imported into the parser at L31), so on a CPU the check answers yes; the run
    itself is the CPU's (pure_bf16 sets no TrainingArguments flag: no autocast, parser.py L512-515)."""
    from unittest import mock

    return mock.patch("llamafactory.hparams.parser.is_torch_bf16_gpu_available", lambda: True)


def _recording_lengths(lengths: list[int]) -> Any:
    """LLaMA-Factory's SFT collator (data/collator.py SFTDataCollatorWith4DAttentionMask, pad_to_multiple_of=8 in
    train/sft/workflow.py), each batch's padded length appended to `lengths`."""
    from unittest import mock

    from llamafactory.data import collator

    original = collator.SFTDataCollatorWith4DAttentionMask.__call__

    def recording(self: Any, features: Any) -> Any:
        batch = original(self, features)
        lengths.append(int(batch["input_ids"].shape[-1]))
        return batch

    return mock.patch.object(collator.SFTDataCollatorWith4DAttentionMask, "__call__", recording)


def _profiler_callback() -> Any:
    """A TrainerCallback that profiles the CPU allocator from on_train_begin to on_train_end."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    from memplan.testing.truth import no_stray_frees, resident_bytes

    class Profiled(TrainerCallback):
        def __init__(self) -> None:
            self.baseline = 0
            self.events: list = []
            self.steps: list[int] = []  # the profiler clock (ns) at each optimizer step's end
            self.trainable = 0

        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            self.baseline = resident_bytes([*model.parameters(), *model.buffers()])
            self.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            self._guard = no_stray_frees()
            self._guard.__enter__()
            self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._prof.__enter__()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            from torch.autograd.profiler import record_function

            with record_function(f"step_end:{state.global_step}"):
                pass

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self._prof.__exit__(None, None, None)
            self._guard.__exit__(None, None, None)
            self.events = list(self._prof.profiler.kineto_results.events())

    return Profiled()


def train(run_yaml: Path, out: Path) -> dict[str, Any]:
    """LLaMA-Factory's run_exp on the YAML, profiled; the peak and what it was measured on, written to `out`."""
    _stub_torchaudio()
    import yaml
    from llamafactory.train.tuner import run_exp

    from memplan.testing.truth import cpu_memory_events

    cb = _profiler_callback()
    lengths: list[int] = []
    with _adamw_foreach(), _recording_lengths(lengths), _bf16_device():
        run_exp(yaml.safe_load(run_yaml.read_text()), callbacks=[cb])
    live, peak, peak_ns = 0, 0, 0
    for ts, nbytes in cpu_memory_events(cb.events):
        live += nbytes
        if live > peak:
            peak, peak_ns = live, ts
    marks = sorted(e.start_ns() for e in cb.events if e.name().startswith("step_end:"))
    running = [(e.duration_ns(), e.name()) for e in cb.events if e.name() != "[memory]"
               and e.start_ns() <= peak_ns <= e.start_ns() + e.duration_ns()]
    result = {"peak_bytes": cb.baseline + peak, "baseline_bytes": cb.baseline, "trainable": cb.trainable,
              "peak_step": 1 + sum(m < peak_ns for m in marks), "peak_op": min(running)[1] if running else "",
              "batch_lengths": lengths}
    out.write_text(json.dumps(result, indent=1))
    return result


def main(argv: list[str]) -> int:
    if argv[0] == "fixture":
        write_fixture(Path(argv[1]), json.loads(Path(argv[2]).read_text()), int(argv[3]), int(argv[4]), tuple(argv[5:]))
    elif argv[0] == "train":
        for run_yaml, out in zip(argv[1::2], argv[2::2], strict=True):
            train(Path(run_yaml), Path(out))
    else:
        raise SystemExit(f"usage: {__doc__}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
