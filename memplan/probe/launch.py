"""Run a probe in a child process with a timeout; a crash, OOM or hang there is reported, never raised."""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import tempfile
import threading
import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memplan._proc import running, spawn, stop
from memplan.probe import cache
from memplan.probe.oom import Exceptions, classify_failure
from memplan.probe.parallel import check_probeable
from memplan.probe.result import ProbeResult, ProbeStatus
from memplan.spec.model import ModelSpec
from memplan.spec.train import TrainConfig

PROGRESS = "memplan-progress: "


@dataclass(frozen=True, slots=True, kw_only=True)
class ProbeOptions:
    steps: int = 3  # measured optimizer steps
    warmup: int = 1  # optimizer steps before measuring (the first allocates the optimizer states)
    device: str = "cpu"  # cpu or cuda
    capacity_bytes: int | None = None  # cpu: simulated device size (exceeding it is an OOM)
    gpu_memory_bytes: int | None = None  # cuda: cap the process to this size (set_per_process_memory_fraction)
    gpu_fraction: float | None = None  # cuda: or cap it to this fraction of the card
    timeout_s: float = 600.0
    use_cache: bool = True
    seed: int = 0


def request_for(spec: ModelSpec, train: TrainConfig, opts: ProbeOptions) -> dict[str, Any]:
    return {"config": spec.config, "name": spec.name, "train": train.to_dict(), "steps": opts.steps,
            "warmup": opts.warmup, "device": opts.device, "capacity_bytes": opts.capacity_bytes,
            "gpu_memory_bytes": opts.gpu_memory_bytes, "gpu_fraction": opts.gpu_fraction, "seed": opts.seed}


def probe(spec: ModelSpec, train: TrainConfig, opts: ProbeOptions | None = None, *,
          on_progress: Callable[[str], None] | None = None) -> ProbeResult:
    """Measure `train` on `spec` with real steps in a fresh interpreter (cached on disk unless use_cache=False)."""
    opts = opts or ProbeOptions()
    if opts.steps <= 0 or opts.warmup < 0:
        from memplan.errors import ConfigError

        raise ConfigError("--steps must be positive and --warmup not negative")
    if train.separate_reference:
        from memplan.errors import ConfigError

        raise ConfigError("probing DPO / KTO with a separate reference model (full / freeze) is not supported yet: the "
                          "estimate models it; probe a LoRA DPO run, or a reference-free loss (orpo / simpo)")
    check_probeable(train, opts.device)
    request = request_for(spec, train, opts)
    key = cache.cache_key(request, _device_name(opts.device))
    if opts.use_cache and (hit := cache.load(key)) is not None:
        return hit
    result = launch(request, timeout_s=opts.timeout_s, on_progress=on_progress)
    if result.status in (ProbeStatus.OK, ProbeStatus.OOM):  # errors and timeouts are worth retrying
        problem = cache.store(key, result)
        if problem:
            warnings.warn(problem, stacklevel=2)
    return result


def launch(request: dict[str, Any], *, timeout_s: float, on_progress: Callable[[str], None] | None = None,
           argv: list[str] | None = None) -> ProbeResult:
    """Spawn the worker (or `argv`, for tests) on `request`; collect its result file or classify its failure."""
    with tempfile.TemporaryDirectory(prefix="memplan-probe-") as tmp:
        req_path, res_path = Path(tmp) / "request.json", Path(tmp) / "result.json"
        req_path.write_text(json.dumps(request))
        ranks = int(request.get("train", {}).get("gpus", 1))
        ranked = ranks > 1 or request.get("train", {}).get("sharding", "none") != "none"  # needs a process group
        if argv is None and ranked:  # one process per GPU, as the training would run
            argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
                    "-m", "memplan.probe._worker"]
        cmd = (argv or [sys.executable, "-m", "memplan.probe._worker"]) + [str(req_path), str(res_path)]
        proc = spawn(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                     errors="replace")
        tail: deque[str] = deque(maxlen=200)
        reader = threading.Thread(target=_read, args=(proc, tail, on_progress), daemon=True)
        reader.start()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            stop(proc, first=signal.SIGKILL, grace_s=5)  # the worker and every rank torchrun started
            reader.join(timeout=5)
            return ProbeResult(status=ProbeStatus.TIMEOUT, device=request["device"],
                               error=f"probe did not finish within {timeout_s:g} s")
        finally:  # interrupted (Ctrl-C, SIGTERM): nothing of the probe outlives the caller
            if running(proc):
                stop(proc, first=signal.SIGTERM, grace_s=5)
        reader.join(timeout=5)
        text = "".join(tail)
        if ranked:
            merged = _merge_ranks([res_path.with_name(f"{res_path.name}.rank{r}") for r in range(ranks)])
            if merged is not None:
                return merged
        if proc.returncode == 0 and res_path.is_file():
            return ProbeResult.from_dict(json.loads(res_path.read_text()))
        status = classify_failure(proc.returncode, text)
        if status is ProbeStatus.OK:  # exit 0 without a result file
            status = ProbeStatus.ERROR
        return ProbeResult(status=status, device=request["device"], error=_last_error_line(text, proc.returncode))


def _merge_ranks(paths: list[Path]) -> ProbeResult | None:
    """Per-rank results -> one: OOM if any rank ran out of memory, the peak of the fullest rank, the slowest
    rank's step time, tokens/s of all ranks together. None when no rank wrote a result (a crash)."""
    results = [ProbeResult.from_dict(json.loads(p.read_text())) for p in paths if p.is_file()]
    if not results:
        return None
    oom = next((r for r in results if r.status is ProbeStatus.OOM), None)
    if oom is not None:
        return oom
    if len(results) < len(paths) or any(r.status is not ProbeStatus.OK for r in results):
        return next((r for r in results if r.status is not ProbeStatus.OK), None)
    worst = max(results, key=lambda r: r.peak_allocated_bytes)
    slowest = max(r.step_time_s for r in results)
    tokens = sum(r.tokens_per_s * r.step_time_s for r in results)  # tokens per step, all ranks
    return dataclasses.replace(worst, step_time_s=slowest, tokens_per_s=tokens / slowest if slowest else 0.0,
                               peak_reserved_bytes=max(r.peak_reserved_bytes for r in results),
                               rank_peak_bytes=tuple(r.peak_allocated_bytes for r in results))


def _read(proc: subprocess.Popen, tail: deque[str], on_progress: Callable[[str], None] | None) -> None:
    assert proc.stderr is not None
    for line in proc.stderr:
        if line.startswith(PROGRESS):
            if on_progress:
                on_progress(line[len(PROGRESS):].strip())
        else:
            tail.append(line)


def _last_error_line(text: str, returncode: int | None) -> str:
    """The exception that ended the child (the last traceback's last line), else its last output line."""
    ended = Exceptions.of(text).lines
    if ended:
        return ended[-1].strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else f"probe process exited with status {returncode}"


def _device_name(device: str) -> str:
    """A cache-key name for the device, without importing torch in this process (nvidia-smi through NVML)."""
    if device != "cuda":
        return "cpu"
    try:
        from memplan.spec.hardware import detect_gpu

        return detect_gpu().name
    except Exception:  # noqa: BLE001 - no NVML: the worker will report the error itself
        return "cuda"
