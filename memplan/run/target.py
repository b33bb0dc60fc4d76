"""Where a training command keeps its configuration, and how memplan rewrites it for the next attempt.

Two carriers: a LLaMA-Factory YAML named in the command (`llamafactory-cli train train.yaml`): memplan writes a
copy beside it (`train.memplan-1.yaml`, the original is never touched) and points the command at the copy; or HF
`TrainingArguments` flags in the command (`python train.py --per_device_train_batch_size 8 ...`): memplan rewrites
those flags. Either way the next attempt resumes from the newest complete checkpoint in the output dir.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memplan.errors import ConfigError
from memplan.export import HF_OPTIM, llamafactory_yaml
from memplan.spec.llamafactory import OPTIM_FROM_HF, read_llamafactory
from memplan.spec.model import ModelSpec
from memplan.spec.train import Optimizer, Precision, TrainConfig

_CKPT = re.compile(r"^checkpoint-(\d+)$")


def newest_checkpoint(output_dir: str | Path | None) -> Path | None:
    """The `checkpoint-N` folder with the largest N whose trainer_state.json exists (HF Trainer writes it last)."""
    if output_dir is None or not Path(output_dir).is_dir():
        return None
    found = [(int(m.group(1)), p) for p in Path(output_dir).iterdir()
             if (m := _CKPT.match(p.name)) and (p / "trainer_state.json").is_file()]
    return max(found)[1] if found else None


def fresh_optimizer_view(checkpoint: Path) -> Path:
    """A hard-linked copy of `checkpoint` without optimizer and scheduler state: the weights and the trainer state
    resume, the (new, differently shaped) optimizer starts fresh. The checkpoint itself is left as it was."""
    dest = checkpoint.parent / f"memplan-resume-{checkpoint.name}"
    if dest.exists():
        shutil.rmtree(dest)

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(checkpoint, dest, copy_function=link,
                    ignore=shutil.ignore_patterns("optimizer.*", "scheduler.*"))
    return dest


@dataclass(frozen=True, slots=True, kw_only=True)
class YamlTarget:
    """A LLaMA-Factory YAML that the command names among its arguments."""

    path: Path
    argv: tuple[str, ...]
    index: int  # position of the YAML in argv
    raw: dict[str, Any]
    train: TrainConfig
    model: str
    output_dir: str | None

    @classmethod
    def open(cls, path: str | Path, argv: list[str]) -> YamlTarget:
        path = Path(path)
        lf = read_llamafactory(path)
        hits = [i for i, a in enumerate(argv) if Path(a).exists() and Path(a).resolve() == path.resolve()]
        if not hits:
            raise ConfigError(f"the command does not name --config {path}: memplan rewrites a copy of that file and "
                              "points the command at it, so the command must take it as an argument")
        return cls(path=path, argv=tuple(argv), index=hits[0], raw=lf.raw, train=lf.train, model=lf.model,
                   output_dir=lf.output_dir)

    def prepare(self, attempt: int, spec: ModelSpec, train: TrainConfig, resume: Path | None) -> tuple[list[str], str]:
        """The argv of attempt `attempt` (0 = as given) and the config file it reads."""
        if attempt == 0 and resume is None and train == self.train:
            return list(self.argv), str(self.path)
        import yaml

        data = llamafactory_yaml(spec, train, self.raw)
        if resume is not None:
            data["resume_from_checkpoint"] = str(resume)
            data.pop("overwrite_output_dir", None)  # never wipe the checkpoints we resume from
        copy = self.path.with_name(f"{self.path.stem}.memplan-{attempt}{self.path.suffix}")
        copy.write_text(yaml.safe_dump(data, sort_keys=False))
        argv = list(self.argv)
        argv[self.index] = str(copy)
        return argv, str(copy)


def _flag(argv: list[str], name: str) -> tuple[int, int] | None:
    """(start, count) of `--name value`, `--name=value` or a bare boolean `--name` in argv."""
    for i, a in enumerate(argv):
        if a == f"--{name}":
            has_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
            return i, 2 if has_value else 1
        if a.startswith(f"--{name}="):
            return i, 1
    return None


def _value(argv: list[str], name: str) -> str | None:
    hit = _flag(argv, name)
    if hit is None:
        return None
    i, n = hit
    return argv[i].split("=", 1)[1] if "=" in argv[i] else argv[i + 1] if n == 2 else "true"


def _truthy(text: str | None) -> bool | None:
    return None if text is None else text.strip().lower() in ("true", "1", "yes")


def _set(argv: list[str], name: str, value: str) -> list[str]:
    hit = _flag(argv, name)
    if hit is None:
        return [*argv, f"--{name}", value]
    i, n = hit
    return [*argv[:i], f"--{name}", value, *argv[i + n:]]


@dataclass(frozen=True, slots=True, kw_only=True)
class ArgsTarget:
    """HF TrainingArguments flags on the command line (HfArgumentParser style)."""

    argv: tuple[str, ...]
    train: TrainConfig
    model: str | None
    output_dir: str | None

    @classmethod
    def open(cls, argv: list[str], base: TrainConfig) -> ArgsTarget:
        """`base` carries what the flags do not say (method, rank, sequence: memplan's own options); a flag that is
        absent means TrainingArguments' default (batch 8, no accumulation, no checkpointing, adamw_torch, fp32)."""
        changes: dict[str, object] = dict(batch_size=8, grad_accum=1, checkpointing=False,
                                          optimizer=OPTIM_FROM_HF["adamw_torch"], precision=Precision.FP32)
        for flag, knob in (("per_device_train_batch_size", "batch_size"),
                           ("gradient_accumulation_steps", "grad_accum")):
            text = _value(argv, flag)
            if text is not None:
                try:
                    changes[knob] = int(text)
                except ValueError:
                    raise ConfigError(f"--{flag} {text!r} in the command is not an integer") from None
        if (ckpt := _truthy(_value(argv, "gradient_checkpointing"))) is not None:
            changes["checkpointing"] = ckpt
        if (optim := _value(argv, "optim")) is not None:
            if optim not in OPTIM_FROM_HF:
                raise ConfigError(f"--optim {optim} in the command is not modelled: one of {', '.join(OPTIM_FROM_HF)}")
            changes["optimizer"] = OPTIM_FROM_HF[optim]
            if optim == "sgd" and "momentum" in (_value(argv, "optim_args") or ""):
                changes["optimizer"] = Optimizer.SGD_MOMENTUM
        if _truthy(_value(argv, "bf16")):
            changes["precision"] = Precision.BF16
        elif _truthy(_value(argv, "fp16")):
            changes["precision"] = Precision.FP16
        return cls(argv=tuple(argv), train=base.with_(**changes), model=_value(argv, "model_name_or_path"),
                   output_dir=_value(argv, "output_dir"))

    def prepare(self, attempt: int, spec: ModelSpec, train: TrainConfig, resume: Path | None) -> tuple[list[str], str]:
        argv = list(self.argv)
        if attempt == 0 and resume is None and train == self.train:
            return argv, ""
        argv = _set(argv, "per_device_train_batch_size", str(train.batch_size))
        argv = _set(argv, "gradient_accumulation_steps", str(train.grad_accum))
        if train.checkpointing != self.train.checkpointing:
            argv = _set(argv, "gradient_checkpointing", str(train.checkpointing))
        if train.optimizer != self.train.optimizer:
            argv = _set(argv, "optim", HF_OPTIM[train.optimizer])
        if train.method != self.train.method:
            raise ConfigError("a method change cannot be expressed in HF TrainingArguments flags: use a "
                              "LLaMA-Factory --config, or run without --allow-method-change")
        if resume is not None:
            argv = _set(argv, "resume_from_checkpoint", str(resume))
        return argv, ""


def optimizer_changed(before: TrainConfig, after: TrainConfig) -> bool:
    return before.optimizer != after.optimizer or before.method != after.method

