"""The probe's result: what a few real training steps measured."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum


class ProbeStatus(str, Enum):
    OK = "ok"
    OOM = "oom"
    ERROR = "error"
    TIMEOUT = "timeout"


@dataclass(frozen=True, slots=True, kw_only=True)
class ProbeResult:
    status: ProbeStatus
    device: str  # "cpu" or the CUDA device name
    peak_allocated_bytes: int = 0  # CPU: exact live-bytes peak; CUDA: torch.cuda.max_memory_allocated
    peak_reserved_bytes: int = 0  # CUDA: max_memory_reserved; CPU: equal to allocated (no caching allocator)
    nvml_used_bytes: int | None = None  # what nvidia-smi shows for the device at the end (CUDA only)
    step_time_s: float = 0.0  # median over the measured optimizer steps
    tokens_per_s: float = 0.0  # micro-batch x seq x accumulation / step time
    losses: tuple[float, ...] = ()
    error: str = ""  # the failure's message (oom / error / timeout)
    rank_peak_bytes: tuple[int, ...] = ()  # several GPUs (torchrun): each rank's peak; the peak above is the max
    cached: bool = field(default=False, compare=False)

    def to_dict(self) -> dict[str, object]:
        out = asdict(self)
        out["status"] = self.status.value
        out["losses"] = list(self.losses)
        out["rank_peak_bytes"] = list(self.rank_peak_bytes)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> ProbeResult:
        kw = dict(data)
        kw["status"] = ProbeStatus(kw["status"])
        kw["losses"] = tuple(kw.get("losses") or ())  # type: ignore[arg-type]
        kw["rank_peak_bytes"] = tuple(kw.get("rank_peak_bytes") or ())  # type: ignore[arg-type]
        return cls(**kw)  # type: ignore[arg-type]
