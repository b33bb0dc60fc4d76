"""The verdict band: how far real GPU peaks have exceeded memplan's estimates, by method class.

The numbers are not chosen here: `python benchmarks/band.py` derives them from the published GPU measurements in
shared/reference (90th percentile of measured / estimate - 1 per class, each row with its own stack) and writes
`band.json`; `benchmarks/results/band.md` has the method, every residual and the leave-one-source-out coverage.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from memplan.spec.train import Method


@lru_cache(maxsize=1)
def _bands() -> dict[str, float]:
    data = json.loads((Path(__file__).with_name("band.json")).read_text())
    return {str(k): float(v) for k, v in data["bands"].items()}


def band_for(method: Method) -> float:
    """The fraction by which a run of this method may exceed its estimate (benchmarks/results/band.md)."""
    bands = _bands()
    return bands["qlora"] if method is Method.QLORA else bands["dense"]
