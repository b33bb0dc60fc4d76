"""Child processes that never outlive memplan: each starts in its own session, and stopping one stops its whole
tree (torchrun starts every rank in a session of its own, so a process group alone does not reach them).

`spawn` starts a command; `stop` signals the child's process group and every descendant, waits, then kills what
is left and reaps the child. Descendants are read from /proc (Linux); elsewhere the process group is signalled.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any


def spawn(argv: list[str], **popen: Any) -> subprocess.Popen:
    """Popen in a new session (its own process group), so a terminal's Ctrl-C reaches memplan only."""
    return subprocess.Popen(argv, start_new_session=True, **popen)


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children first), from /proc; [] where /proc is not there."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _signal_tree(proc: subprocess.Popen, pids: list[int], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def stop(proc: subprocess.Popen, *, first: int = signal.SIGTERM, grace_s: float = 10.0) -> int:
    """Stop `proc` and everything it started: `first` to the tree (a training saves, torchrun closes its ranks),
    up to `grace_s` seconds, then SIGKILL to whatever is left; the child is reaped last, so its pid (and process
    group id) cannot have been reused by an unrelated process while it is signalled. Returns its exit status."""
    if proc.returncode is None:  # not reaped yet: its pid is still its own
        tree = descendants(proc.pid)
        _signal_tree(proc, tree, first)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and (_running(proc) or _alive(tree)):
            time.sleep(0.05)
        _signal_tree(proc, tree + descendants(proc.pid), signal.SIGKILL)
    return proc.wait()


def running(proc: subprocess.Popen) -> bool:
    """Still running (a zombie is not), without reaping it."""
    return proc.returncode is None and _running(proc)


def _running(proc: subprocess.Popen) -> bool:
    try:
        state = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return proc.poll() is None  # no /proc: ask (and reap) the usual way
    return state not in ("Z", "X")


def _alive(pids: list[int]) -> bool:
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in ("Z", "X"):
            return True
    return False
