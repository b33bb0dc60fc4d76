"""On-disk cache of probe results, keyed by everything that changes the measurement."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from importlib import metadata
from pathlib import Path
from typing import Any

from memplan.probe.result import ProbeResult, ProbeStatus


def cache_dir() -> Path:
    """$MEMPLAN_CACHE_DIR, else ~/.cache/memplan/probes."""
    env = os.environ.get("MEMPLAN_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "memplan" / "probes"


def _version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "-"


def cache_key(request: dict[str, Any], device_name: str) -> str:
    """sha256 of the model config, the knobs, steps, capacity, the device and the torch/transformers/peft versions."""
    material = {"request": request, "device": device_name,
                "versions": {p: _version(p) for p in ("torch", "transformers", "peft", "bitsandbytes")}}
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:32]


def load(key: str) -> ProbeResult | None:
    """The cached result, or None when there is none or the entry is unreadable or not a sane result (a bad entry
    is a cache miss, never an error: the probe runs again)."""
    path = cache_dir() / f"{key}.json"
    try:
        result = ProbeResult.from_dict({**json.loads(path.read_text()), "cached": True})
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
    return result if _sane(result) else None


def _sane(r: ProbeResult) -> bool:
    ints = (r.peak_allocated_bytes, r.peak_reserved_bytes, *r.rank_peak_bytes)
    floats = (r.step_time_s, r.tokens_per_s, *r.losses)
    return all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ints) and \
        all(isinstance(v, (int, float)) and v >= 0 for v in floats[:2]) and \
        all(isinstance(v, (int, float)) for v in floats[2:]) and isinstance(r.device, str) and \
        isinstance(r.error, str) and (r.status is not ProbeStatus.OK or r.peak_allocated_bytes > 0)


def store(key: str, result: ProbeResult) -> str | None:
    """Keep the result for next time; best effort: a cache that cannot be written returns the reason (the caller
    warns) and the measurement is still returned to the user."""
    directory = cache_dir()
    tmp = directory / f".{key}.{os.getpid()}.tmp"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({**result.to_dict(), "cached": False}))
        tmp.replace(directory / f"{key}.json")  # atomic: concurrent probes never read half a file
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        return f"probe cache {directory} not written ({err.strerror or type(err).__name__}): the result is not kept"
    return None
