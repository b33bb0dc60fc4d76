"""On-disk cache of probe results, keyed by everything that changes the measurement."""

from __future__ import annotations

import hashlib
import json
import os
from importlib import metadata
from pathlib import Path
from typing import Any

from memplan.probe.result import ProbeResult


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
    path = cache_dir() / f"{key}.json"
    try:
        return ProbeResult.from_dict({**json.loads(path.read_text()), "cached": True})
    except (OSError, ValueError, TypeError, KeyError):
        return None


def store(key: str, result: ProbeResult) -> None:
    directory = cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{key}.tmp"
    tmp.write_text(json.dumps({**result.to_dict(), "cached": False}))
    tmp.replace(directory / f"{key}.json")  # atomic: concurrent probes never read half a file
