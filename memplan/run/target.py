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
from memplan.formats.hf import config_from_flags, flag_value, rewrite_flags, set_flag
from memplan.formats.llamafactory import cli_overrides, llamafactory_yaml, read_llamafactory
from memplan.spec.model import ModelSpec
from memplan.spec.train import TrainConfig

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

    overrides: tuple[str, ...] = ()  # the command's `key=value` arguments after the YAML (merged into `raw`)

    @classmethod
    def open(cls, path: str | Path, argv: list[str]) -> YamlTarget:
        """The YAML as the command will run it: `llamafactory-cli train cfg.yaml key=value ...` merges the
        key=value arguments after the YAML over it (LLaMA-Factory's read_args), so memplan plans from the merge."""
        path = Path(path)
        hits = [i for i, a in enumerate(argv) if Path(a).exists() and Path(a).resolve() == path.resolve()]
        if not hits:
            raise ConfigError(f"the command does not name --config {path}: memplan rewrites a copy of that file and "
                              "points the command at it, so the command must take it as an argument")
        after = argv[hits[0] + 1:]
        overrides = cli_overrides(after)
        lf = read_llamafactory(path, overrides)
        tokens = tuple(a for a in after if "=" in a and a.partition("=")[0].strip().lstrip("-") in overrides)
        return cls(path=path, argv=tuple(argv), index=hits[0], raw=lf.raw, train=lf.train, model=lf.model,
                   output_dir=lf.output_dir, overrides=tokens)

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
        # the copy carries the overrides merged with the plan: passing them again would undo the plan
        head, tail = argv[: self.index + 1], argv[self.index + 1:]
        return head + [a for a in tail if a not in self.overrides], str(copy)


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
        absent means TrainingArguments' default (memplan.formats.hf)."""
        return cls(argv=tuple(argv), train=config_from_flags(argv, base), model=flag_value(argv, "model_name_or_path"),
                   output_dir=flag_value(argv, "output_dir"))

    def prepare(self, attempt: int, spec: ModelSpec, train: TrainConfig, resume: Path | None) -> tuple[list[str], str]:
        argv = list(self.argv)
        if attempt == 0 and resume is None and train == self.train:
            return argv, ""
        argv = rewrite_flags(argv, self.train, train)
        if resume is not None:
            argv = set_flag(argv, "resume_from_checkpoint", str(resume))
        return argv, ""


def optimizer_changed(before: TrainConfig, after: TrainConfig) -> bool:
    return before.optimizer != after.optimizer or before.method != after.method

