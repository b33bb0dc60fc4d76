"""Recognise an out-of-memory failure from a process's exit status and output. Pure; tested on recorded text.

A failure is classified on the exception that ended the run: the last line of each Python traceback in the output
(per rank: torchrun prefixes `[rankN]: `), wherever it appears in the output, however much teardown follows it.
Only when the output holds no traceback (a C++ abort, a killed process) are the OOM signatures searched in the
output's tail.
"""

from __future__ import annotations

import re
from collections import deque

from memplan.probe.result import ProbeStatus

# signatures of OOM across PyTorch/CUDA/ROCm versions, the caching allocator, cuBLAS/cuDNN and our simulation
OOM_SIGNATURES = (
    "CUDA out of memory",
    "torch.OutOfMemoryError",
    "torch.cuda.OutOfMemoryError",
    "OutOfMemoryError",
    "HIP out of memory",
    "CUBLAS_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_ALLOC_FAILED",
    "cudaErrorMemoryAllocation",
    "DefaultCPUAllocator: can't allocate memory",
    "memplan: simulated out of memory",
)
_RANK = re.compile(r"^(\[(?:rank|default)\d*\]:\s?)")


def is_oom_text(text: str) -> bool:
    return any(sig in text for sig in OOM_SIGNATURES)


class Exceptions:
    """Fed the output line by line, keeps the exception line that ends each traceback (and the output's tail)."""

    def __init__(self, tail_lines: int = 400) -> None:
        self.lines: list[str] = []  # the final line of every traceback seen
        self.tail: deque[str] = deque(maxlen=tail_lines)
        self._open: dict[str, bool] = {}  # rank prefix -> inside a traceback

    def feed(self, line: str) -> None:
        self.tail.append(line)
        text = line.rstrip("\n")
        m = _RANK.match(text)
        rank, body = (m.group(1), text[m.end():]) if m else ("", text)
        if body.startswith("Traceback (most recent call last)"):
            self._open[rank] = True
        elif self._open.get(rank) and body.strip() and not body[0].isspace():  # the first line out of the frames
            self.lines.append(body)
            self._open[rank] = False

    @classmethod
    def of(cls, text: str) -> Exceptions:
        out = cls()
        for line in text.splitlines():
            out.feed(line)
        return out


def classify_failure(returncode: int | None, text: str | Exceptions) -> ProbeStatus:
    """ok for exit 0; oom when the exception that ended the run (any rank's) is an out-of-memory error, or, with no
    traceback in the output, when its tail carries an OOM signature; error otherwise."""
    if returncode == 0:
        return ProbeStatus.OK
    seen = text if isinstance(text, Exceptions) else Exceptions.of(text)
    if seen.lines:
        return ProbeStatus.OOM if any(is_oom_text(line) for line in seen.lines) else ProbeStatus.ERROR
    return ProbeStatus.OOM if is_oom_text("".join(seen.tail)) else ProbeStatus.ERROR
