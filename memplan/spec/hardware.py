"""GPUs: the shipped catalog (spec/gpus.csv, from shared/gpus.csv), `--gpu` parsing, and NVML detection (lazy)."""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from memplan.errors import ConfigError, UnknownGPU
from memplan.units import GIB, parse_size

GPU_CSV = Path(__file__).parent / "gpus.csv"
DEFAULT_MARGIN = 0.05  # keep 5 % of the card free: allocator variance, eval batches, other processes


@dataclass(frozen=True, slots=True, kw_only=True)
class GPU:
    name: str
    memory_bytes: int  # what nvidia-smi reports as total (the usable ceiling)
    bf16: bool = True
    dense_bf16_tflops: float | None = None
    fp32_tflops: float | None = None
    bandwidth_gbs: float | None = None  # memory bandwidth, GB/s (gpus.csv): the speed model's memory-bound terms
    key: str = ""  # short catalog key, e.g. "a100-80gb"

    def usable_bytes(self, margin: float = DEFAULT_MARGIN) -> int:
        """The card's memory less the safety margin; the margin must be in [0, 0.5)."""
        if not 0.0 <= margin < 0.5:
            raise ConfigError(f"--margin must be in [0, 0.5), got {margin}")
        return int(self.memory_bytes * (1.0 - margin))


def _key(name: str) -> str:
    """'NVIDIA A100 SXM4 80GB' -> 'a100-sxm4-80gb'; 'NVIDIA GeForce RTX 4090' -> 'rtx4090'."""
    n = name.lower().replace("nvidia ", "").replace("geforce ", "").replace("amd instinct ", "")
    n = re.sub(r"rtx (\d)", r"rtx\1", n)
    return re.sub(r"[^a-z0-9.]+", "-", n).strip("-")


def _float(text: str) -> float | None:
    return float(text) if text.strip() else None


@lru_cache(maxsize=1)
def gpu_catalog() -> dict[str, GPU]:
    """key -> GPU, plus shorter aliases when unambiguous (e.g. 'a100-80gb', 'h100', 'l4', 'rtx4090')."""
    gpus = {}
    with open(GPU_CSV, newline="") as fh:
        for row in csv.DictReader(fh):
            key = _key(row["name"])
            gpus[key] = GPU(name=row["name"], key=key, memory_bytes=int(float(row["memory_gib_nvml"]) * GIB),
                            bf16=row["bf16"].strip() == "yes", dense_bf16_tflops=_float(row["dense_bf16_tflops"]),
                            fp32_tflops=_float(row["fp32_tflops"]),
                            bandwidth_gbs=_float(row["bandwidth_gbs"]))
    aliases: dict[str, list[str]] = {}
    for key in gpus:
        parts = key.split("-")
        # drop form-factor words: a100-sxm4-80gb -> a100-80gb, h100-sxm5-80gb -> h100-80gb and h100
        core = [p for p in parts if p not in ("sxm4", "sxm5", "sxm2", "pcie", "generation", "12gb")]
        for alias in {"-".join(core), core[0]} if any(ch.isdigit() for ch in core[0]) else {"-".join(core)}:
            aliases.setdefault(alias, []).append(key)
    for alias, keys in aliases.items():
        if alias not in gpus:
            # ambiguous aliases pick the SXM (first listed) part only when all share the memory size
            sizes = {gpus[k].memory_bytes for k in keys}
            if len(keys) == 1 or len(sizes) == 1:
                gpus[alias] = gpus[keys[0]]
    return gpus


def resolve_gpu(text: str) -> GPU:
    """--gpu: 'auto' (NVML), a catalog name, or a size such as 24GB / 24GiB / 24564MiB / 80G."""
    value = text.strip()
    if not value:
        raise UnknownGPU("--gpu is empty: use a size (24GB, 80GiB), auto, or a name from `memplan gpus`")
    if value.lower() == "auto":
        return detect_gpu()
    found = gpu_catalog().get(_key(value)) or gpu_catalog().get(value.lower())
    if found:
        return found
    if re.match(r"^\s*\d", value):
        try:
            return GPU(name=f"{value} GPU", memory_bytes=parse_size(value, nominal=True))
        except ConfigError as err:
            raise UnknownGPU(f"--gpu {value!r}: {err}") from None
    close = sorted(k for k in gpu_catalog() if k.startswith(_key(value)))
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise UnknownGPU(f"unknown GPU {value!r}{hint}: use a size (24GB, 80GiB), auto, or a name from `memplan gpus`")


def detect_gpu(index: int = 0) -> GPU:
    """The first NVIDIA GPU through NVML (nvidia-ml-py). A clear error when there is none."""
    try:
        import pynvml
    except ImportError:
        raise UnknownGPU("--gpu auto needs nvidia-ml-py: pip install 'memplan[probe]', or pass a size such as 24GB") \
            from None
    try:
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        name = pynvml.nvmlDeviceGetName(handle)
        name = name.decode() if isinstance(name, bytes) else name
        total = int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)
        major, _ = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
    except Exception as err:  # noqa: BLE001 - any NVML failure means "no usable NVIDIA GPU"
        raise UnknownGPU(f"--gpu auto: no NVIDIA GPU found ({type(err).__name__}); pass a size such as 24GB") \
            from None
    known = next((g for g in gpu_catalog().values() if g.name.lower() in name.lower()), None)
    return GPU(name=name, memory_bytes=total, bf16=major >= 8,
               dense_bf16_tflops=known.dense_bf16_tflops if known else None,
               fp32_tflops=known.fp32_tflops if known else None, key=known.key if known else "")
