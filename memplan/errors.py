"""Typed errors and exit codes. The library raises these; only `memplan.cli` turns them into one line + exit code."""

from __future__ import annotations

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


class ConfigError(MemplanError):
    """One or more bad configuration values; collects every problem so the user fixes them all at once."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


class UnknownModel(MemplanError):
    """A model name that is neither in the catalog, a local config, nor resolvable through transformers."""


class UnsupportedModel(MemplanError):
    """An architecture the analytic formulas do not know (the exact mode `--exact` may)."""


class UnknownGPU(MemplanError):
    """A GPU name or size that cannot be parsed."""


class MissingExtra(MemplanError):
    """An optional dependency group is not installed."""
