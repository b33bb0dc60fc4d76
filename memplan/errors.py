"""Typed errors and exit codes. The library raises these; only `memplan.cli` turns them into one line + exit code."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum


class ExitCode(IntEnum):
    """Exit status of every `memplan` command (usable as a guard in scripts)."""

    OK = 0  # fits / success
    DOES_NOT_FIT = 1
    BAD_INPUT = 2
    PROBE_FAILED = 3  # the probe crashed or timed out (not an OOM)


class MemplanError(Exception):
    """Base class: a problem the user can fix. `str(err)` is one line naming the problem and the fix."""

    exit_code = ExitCode.BAD_INPUT


@dataclass(frozen=True, slots=True)
class Problem:
    """A bad value of one field; `text` has `{}` where the field's name goes, spelled by each front end (a CLI
    flag, a LLaMA-Factory key, a Python argument)."""

    field: str
    text: str

    def spell(self, names: Mapping[str, str] | None = None) -> str:
        return self.text.replace("{}", (names or {}).get(self.field) or cli_flag(self.field))


def cli_flag(field: str) -> str:
    """The command-line spelling of a TrainConfig / search field: batch_size -> --batch-size."""
    return "--" + field.replace("_", "-")


class ConfigError(MemplanError):
    """One or more bad configuration values; collects every problem so the user fixes them all at once.
    `str()` spells field names as CLI flags; `respelled(names)` as another front end does."""

    def __init__(self, problems: list[str | Problem] | str | Problem):
        self.keyed = [problems] if isinstance(problems, (str, Problem)) else list(problems)
        self.problems = [p.spell() if isinstance(p, Problem) else p for p in self.keyed]
        super().__init__("; ".join(self.problems))

    def respelled(self, names: Mapping[str, str], prefix: str = "") -> ConfigError:
        """The same problems with fields named by `names` (field -> the front end's name), each after `prefix`."""
        return ConfigError([prefix + (p.spell(names) if isinstance(p, Problem) else p) for p in self.keyed])


class UnknownModel(MemplanError):
    """A model name that is neither in the catalog, a local config, nor resolvable through transformers."""


class UnsupportedModel(MemplanError):
    """An architecture the analytic formulas do not know (the exact mode `--exact` may)."""


class UnknownGPU(MemplanError):
    """A GPU name or size that cannot be parsed."""


class MissingExtra(MemplanError):
    """An optional dependency group is not installed."""
