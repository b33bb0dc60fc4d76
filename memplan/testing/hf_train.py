"""A real HF Trainer run on a tiny model, driven by a LLaMA-Factory-style YAML, on CPU with a simulated device.

`python -m memplan.testing.hf_train train.yaml` is what the run/retune tests launch under `memplan run`. The YAML
holds LLaMA-Factory keys (model_name_or_path: a folder with config.json, per_device_train_batch_size,
gradient_accumulation_steps, disable_gradient_checkpointing, cutoff_len, output_dir, save_steps, max_steps,
resume_from_checkpoint) plus three keys of this script's own, which memplan keeps as unknown fields:
`memplan_capacity_bytes` (the simulated device: the live-bytes tracker raises an OOM past it), `short_len` and
`long_from` (samples from this index on are cutoff_len tokens long: the late long sample that OOMs a run).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def dataset(n: int, short_len: int, long_len: int, long_from: int, vocab: int) -> list[dict[str, list[int]]]:
    out = []
    for i in range(n):
        length = long_len if i >= long_from else short_len
        ids = [(7 * i + 3 * j) % (vocab - 1) + 1 for j in range(length)]
        out.append({"input_ids": ids, "labels": ids})
    return out


def collate(batch: list[dict[str, list[int]]]) -> dict[str, Any]:
    """Pad to the longest sample of the batch (pad 0, label -100), as LLaMA-Factory's collator does."""
    import torch

    width = max(len(b["input_ids"]) for b in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        ids[i, :n] = torch.tensor(b["input_ids"])
        labels[i, :n] = torch.tensor(b["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def build_trainer(cfg: dict[str, Any]) -> Any:
    """The Trainer the YAML describes (tiny model from its config folder, sequential sampler)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    torch.manual_seed(int(cfg.get("seed", 0)))
    config = AutoConfig.from_pretrained(cfg["model_name_or_path"])
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    micro, accum = int(cfg.get("per_device_train_batch_size", 8)), int(cfg.get("gradient_accumulation_steps", 1))
    max_steps = int(cfg["max_steps"])
    data = dataset(max_steps * micro * accum, int(cfg.get("short_len", 16)), int(cfg.get("cutoff_len", 2048)),
                   int(cfg.get("long_from", 10**9)), config.vocab_size)
    args = TrainingArguments(
        output_dir=cfg["output_dir"], per_device_train_batch_size=micro, gradient_accumulation_steps=accum,
        max_steps=max_steps, save_steps=int(cfg.get("save_steps", 2)), save_strategy="steps",
        learning_rate=float(cfg.get("learning_rate", 1e-3)), logging_steps=1, report_to=[],
        seed=int(cfg.get("seed", 0)),
        gradient_checkpointing=not cfg.get("disable_gradient_checkpointing", False), use_cpu=True,
        train_sampling_strategy="sequential", dataloader_num_workers=0, disable_tqdm=True)

    class Steps(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            print(f"hf_train: step {state.global_step} done micro={args.per_device_train_batch_size} "
                  f"accum={args.gradient_accumulation_steps}", flush=True)

    return Trainer(model=model, args=args, train_dataset=data, data_collator=collate, callbacks=[Steps()])


def simulated_device(trainer: Any, capacity: int | None) -> Any:
    """The live-bytes tracker with the model's parameters and buffers counted, or a no-op context."""
    import contextlib

    if capacity is None:
        return contextlib.nullcontext()
    from memplan.trace.tracker import LiveBytes

    mode = LiveBytes(capacity_bytes=capacity)
    mode.seed([*trainer.model.parameters(), *trainer.model.buffers()])
    return mode


def main(argv: list[str]) -> int:
    import yaml

    cfg = yaml.safe_load(Path(argv[0]).read_text())
    for arg in argv[1:]:  # key=value after the YAML win, as LLaMA-Factory's read_args merges OmegaConf.from_cli
        key, _, value = arg.partition("=")
        cfg[key] = yaml.safe_load(value)
    trainer = build_trainer(cfg)
    capacity = cfg.get("memplan_capacity_bytes")
    with simulated_device(trainer, int(capacity) if capacity else None):
        trainer.train(resume_from_checkpoint=cfg.get("resume_from_checkpoint"))
    print("hf_train: finished " + json.dumps({"global_step": trainer.state.global_step}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
