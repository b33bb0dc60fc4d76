"""The verdict band: how far real GPU peaks have exceeded memplan's estimates, by method class.

The numbers are not chosen here: `python benchmarks/band.py` derives them from the published GPU measurements in
shared/reference (90th percentile of measured / estimate - 1 per class, each row with its own stack) and writes
`band.json`; `benchmarks/results/band.md` has the method, every residual and the leave-one-source-out coverage.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from memplan.spec.train import Method, TrainConfig


@lru_cache(maxsize=1)
def _bands() -> dict[str, float]:
    data = json.loads((Path(__file__).with_name("band.json")).read_text())
    return {str(k): float(v) for k, v in data["bands"].items()}


def band_for(train: TrainConfig) -> float:
    """The fraction by which such a run may exceed its estimate (benchmarks/results/band.md): a run on more than
    one GPU has its own (the published multi-GPU rows), else by method."""
    bands = _bands()
    if train.gpus > 1 and "multi_gpu" in bands:
        return max(bands["multi_gpu"], _by_method(train.method))
    return _by_method(train.method)


def _by_method(method: Method) -> float:
    bands = _bands()
    return bands["qlora"] if method is Method.QLORA else bands["dense"]
