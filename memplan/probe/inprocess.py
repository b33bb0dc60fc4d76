"""A probe in the current process: the same measurement as the child worker, without the isolation.

For tests and benchmarks that run many small CPU probes (a fresh interpreter costs seconds of imports each). A
crash here is the caller's crash: `memplan probe` and the tuner's default evaluator use the child process.
"""

from __future__ import annotations

from memplan.probe.launch import ProbeOptions, request_for
from memplan.probe.result import ProbeResult, ProbeStatus
from memplan.spec.model import ModelSpec
from memplan.spec.train import TrainConfig


def probe_in_process(spec: ModelSpec, train: TrainConfig, opts: ProbeOptions | None = None) -> ProbeResult:
    import torch

    opts = opts or ProbeOptions()

    from memplan.probe._worker import run

    try:
        return run(request_for(spec, train, opts), report=lambda _: None)
    except torch.OutOfMemoryError as err:
        return ProbeResult(status=ProbeStatus.OOM, device=opts.device, error=str(err).splitlines()[0])
