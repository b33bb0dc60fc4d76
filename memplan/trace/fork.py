"""Trace several depths, the deepest in a forked child when the process is cold: its imports and trace run on the
other core while this process imports and traces the rest (the imports are most of a cold trace's wall time;
forking after torch is imported can deadlock in the CPU kernels' thread pool, so a warm process traces in turn)."""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import sys
import threading
from typing import Any

from memplan.spec.model import ModelSpec
from memplan.spec.train import TrainConfig
from memplan.trace import step
from memplan.trace.step import Trace


def trace_depths(spec: ModelSpec, train: TrainConfig, depths: list[int], by_module: bool,
                 labels: bool = False) -> list[Trace]:
    """Trace each depth. Cold (torch not imported yet, one thread, fork and a second CPU available), the deepest
    depth is traced by a child forked before any import: its imports and trace run on the other core while this
    process imports and traces the rest. The imports are most of a cold trace's wall time (forking after torch is
    imported can deadlock, so a warm process traces in turn)."""
    cold = "torch" not in sys.modules and threading.active_count() == 1 and hasattr(os, "fork")
    if len(depths) < 2 or not cold or (os.cpu_count() or 1) < 2:
        return [step.trace_depth(spec, train, d, by_module, labels) for d in depths]
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: trace, send the Trace (or the error) back, leave without running any cleanup
        os.close(read)
        try:
            result: Any = step.trace_depth(spec, train, depths[-1], by_module, labels)
        except BaseException as err:  # noqa: BLE001 (re-raised in the parent)
            result = err
        try:
            data = pickle.dumps(result)
        except Exception:  # noqa: BLE001 an error pickle cannot carry: its type and message
            data = pickle.dumps(RuntimeError(f"{type(result).__name__}: {result}"))
        with contextlib.suppress(OSError), os.fdopen(write, "wb") as pipe:
            pipe.write(data)
        os._exit(0)
    os.close(write)
    try:
        with os.fdopen(read, "rb") as pipe:  # closed however this ends
            traces = [step.trace_depth(spec, train, d, by_module, labels) for d in depths[:-1]]
            data = pipe.read()
    finally:
        with contextlib.suppress(ProcessLookupError):
            if os.waitpid(pid, os.WNOHANG) == (0, 0):  # still running: this process failed first
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
    last = pickle.loads(data) if data else RuntimeError("the forked trace died without a result")
    if isinstance(last, BaseException):
        raise last
    return [*traces, last]
