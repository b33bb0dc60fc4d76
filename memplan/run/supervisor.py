"""`memplan run`: launch the training command, watch it, and after an OOM re-plan, rewrite, resume, relaunch.

launch (no shell, output streamed) -> classify (exit status + OOM signatures, memplan.probe.oom) -> policy
(memplan.run.policy.replan) -> rewrite (memplan.run.target) -> relaunch from the newest checkpoint. Every decision
is one JSON line in the log; a failure that is not an OOM ends the run with the command's own exit status.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, TextIO

from memplan._proc import running, spawn, stop
from memplan.errors import ConfigError
from memplan.predict.estimator import estimate
from memplan.probe.oom import Exceptions, classify_failure
from memplan.run.policy import replan
from memplan.run.target import ArgsTarget, YamlTarget, fresh_optimizer_view, newest_checkpoint, optimizer_changed
from memplan.spec.hardware import GPU
from memplan.spec.model import ModelSpec
from memplan.spec.train import TrainConfig

TAIL_LINES = 400  # output lines searched for OOM signatures when the output holds no traceback
STOP_GRACE_S = 30.0  # an interrupted training gets this long to save before it is killed


class AttemptStatus(str, Enum):
    """How one launch of the training command ended (the value is what the decision log holds)."""
    OK = "ok"  # exit status 0
    OOM = "oom"  # failed with an out-of-memory signature in its output: re-planned and retried
    ERROR = "error"  # failed otherwise: not retried


class RunOutcome(str, Enum):
    """How the supervised run ended (the value is what the decision log holds)."""
    FINISHED = "finished"  # the last attempt exited 0
    FAILED = "failed"  # a failure that is not an OOM
    GAVE_UP = "gave_up"  # out of memory with no retries left, or no configuration left to try


@dataclass(frozen=True, slots=True, kw_only=True)
class RunOptions:
    max_retries: int = 3
    log_path: Path | None = None
    gpu: GPU | None = None
    allow_method_change: bool = False
    env: dict[str, str] | None = None  # extra environment for the command


@dataclass(frozen=True, slots=True, kw_only=True)
class Attempt:
    index: int
    argv: tuple[str, ...]
    train: TrainConfig
    config_path: str
    resumed_from: str | None
    returncode: int
    status: AttemptStatus
    duration_s: float


@dataclass(frozen=True, slots=True, kw_only=True)
class RunResult:
    attempts: tuple[Attempt, ...]
    exit_code: int  # 0, or the last command's own status (128 + signal when it was killed)
    log_path: Path
    outcome: RunOutcome
    reason: str = ""


class DecisionLog:
    """Append-only JSON lines: one object per event, with a UTC timestamp."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:  # checked before anything is launched: a run must not start without its log
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a"):
                pass
        except OSError as err:
            raise ConfigError(f"--log {path}: cannot write the decision log there ({err.strerror or err})") from None

    def write(self, event: str, **data: Any) -> None:
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "event": event, **data}
        with self.path.open("a") as fh:
            fh.write(json.dumps(record, default=str) + "\n")


def execute(argv: list[str], echo: Callable[[str], None], env: dict[str, str] | None = None,
            ) -> tuple[int, Exceptions]:
    """Run argv (no shell, its own session) with stdout+stderr merged and streamed line by line; (exit status,
    output tail). Interrupted (Ctrl-C, or SIGTERM from timeout / scancel / systemd / Kubernetes), the command's
    whole tree gets SIGINT and time to save, then SIGKILL; it is reaped before the interrupt goes on."""
    try:
        proc = spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                     errors="replace", env={**os.environ, **(env or {})})
    except FileNotFoundError:
        raise ConfigError(f"command not found: {argv[0]}") from None
    except PermissionError:
        raise ConfigError(f"command is not executable: {argv[0]}") from None
    seen = Exceptions(tail_lines=TAIL_LINES)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            echo(line)
            seen.feed(line)
        rc = proc.wait()
    finally:
        if running(proc):
            stop(proc, first=signal.SIGINT, grace_s=STOP_GRACE_S)
    return (128 - rc if rc < 0 else rc), seen


def open_target(argv: list[str], config: str | None, base: TrainConfig | None) -> YamlTarget | ArgsTarget:
    if not argv:
        raise ConfigError("no command: memplan run [options] -- COMMAND ARGS...")
    if config is not None:
        return YamlTarget.open(config, argv)
    return ArgsTarget.open(argv, base or TrainConfig())


def default_log(target: YamlTarget | ArgsTarget) -> Path:
    if isinstance(target, YamlTarget):
        return target.path.with_name(f"{target.path.stem}.memplan-run.jsonl")
    return Path(target.output_dir or ".") / "memplan-run.jsonl"


def supervise(spec: ModelSpec, target: YamlTarget | ArgsTarget, options: RunOptions,
              echo: Callable[[str], None] | TextIO = sys.stdout.write) -> RunResult:
    """Launch, and on each OOM re-plan with the same effective batch and resume, up to options.max_retries times."""
    if options.max_retries < 0:
        raise ConfigError("--max-retries must be 0 or more")
    write = echo.write if hasattr(echo, "write") else echo  # type: ignore[union-attr]
    log = DecisionLog(options.log_path or default_log(target))
    train, resume, failures, attempts = target.train, None, [], []
    log.write("plan", model=spec.name, config=train.to_dict(), predicted_bytes=estimate(spec, train).total_bytes,
              effective_batch=train.effective_batch, max_retries=options.max_retries)
    while True:
        index = len(attempts)
        argv, config_path = target.prepare(index, spec, train, resume)
        log.write("launch", attempt=index, argv=argv, config_path=config_path, resume_from=resume,
                  config=train.to_dict())
        start = time.monotonic()
        rc, seen = execute(argv, write, options.env)
        status = _attempt_status(rc, seen)
        attempts.append(Attempt(index=index, argv=tuple(argv), train=train, config_path=config_path,
                                resumed_from=str(resume) if resume else None, returncode=rc, status=status,
                                duration_s=round(time.monotonic() - start, 2)))
        log.write("exit", attempt=index, returncode=rc, status=status.value, duration_s=attempts[-1].duration_s)
        if status is AttemptStatus.OK:
            return _finish(log, attempts, 0, RunOutcome.FINISHED)
        if status is not AttemptStatus.OOM:
            return _finish(log, attempts, rc, RunOutcome.FAILED,
                           "the command failed without an out-of-memory error: not retried")
        failures.append(train)
        if index >= options.max_retries:
            return _finish(log, attempts, rc, RunOutcome.GAVE_UP,
                           f"out of memory after {index + 1} attempts (--max-retries {options.max_retries})")
        plan = replan(spec, train, failures, gpu=options.gpu, allow_method_change=options.allow_method_change)
        log.write("replan", attempt=index, failed=train.to_dict(), bound_bytes=plan.bound_bytes,
                  chosen=plan.train.to_dict() if plan.train else None, predicted_bytes=plan.predicted_bytes,
                  reason=plan.reason)
        if plan.train is None:
            return _finish(log, attempts, rc, RunOutcome.GAVE_UP, plan.reason)
        assert plan.train.effective_batch == train.effective_batch  # the policy's promise, kept here too
        resume = newest_checkpoint(target.output_dir)
        if resume is not None and optimizer_changed(train, plan.train):
            resume = fresh_optimizer_view(resume)
            log.write("resume_note", checkpoint=str(resume),
                      note="optimizer changed: weights and trainer state resume; optimizer moments and the LR "
                           "schedule start fresh (the old state does not load into the new optimizer)")
        log.write("resume", attempt=index + 1, checkpoint=str(resume) if resume else None)
        train = plan.train


def _attempt_status(returncode: int, seen: Exceptions) -> AttemptStatus:
    """The probe's classifier (the exception that ended the run: ok, oom or error), as a training run's status."""
    return AttemptStatus(classify_failure(returncode, seen).value)


def _finish(log: DecisionLog, attempts: list[Attempt], code: int, outcome: RunOutcome,
            reason: str = "") -> RunResult:
    log.write("finish", outcome=outcome.value, exit_code=code, attempts=len(attempts), reason=reason)
    return RunResult(attempts=tuple(attempts), exit_code=code, log_path=log.path, outcome=outcome, reason=reason)
