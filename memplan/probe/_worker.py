"""The probe's child process: build the model, run real training steps, measure, write a JSON result.

    python -m memplan.probe._worker REQUEST.json RESULT.json
    torchrun --nproc-per-node N -m memplan.probe._worker REQUEST.json RESULT.json   # each rank: RESULT.json.rankR

Runs in a fresh interpreter so that a CUDA OOM, a crash or a hang never harms the caller. Progress goes to stderr
as `memplan-progress: <stage>` lines. Under torchrun the model is wrapped in DDP, FSDP2 or DeepSpeed ZeRO
(memplan.probe.parallel; gloo on CPU, nccl on CUDA) after measuring starts, so buckets and shards are counted, and
every rank writes its own result.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from memplan.build.model import build_model, build_optimizer
from memplan.probe import parallel
from memplan.probe.result import ProbeResult, ProbeStatus
from memplan.spec.model import ModelSpec
from memplan.spec.train import train_from_dict
from memplan.trace.tracker import LiveBytes


def progress(stage: str) -> None:
    print(f"memplan-progress: {stage}", file=sys.stderr, flush=True)


def run(req: dict[str, Any], report: Callable[[str], None] = progress) -> ProbeResult:
    spec = ModelSpec.from_config_dict(req["config"], name=req["name"])
    train = train_from_dict(req["train"])
    device = req["device"]
    torch.manual_seed(req.get("seed", 0))
    if device == "cuda":
        return _run_cuda(spec, train, req, report)
    report("build")
    model = build_model(spec, train, device="cpu")
    ids = torch.randint(0, spec.vocab_size, (train.batch_size, train.seq_len))  # full length: the worst case
    ids, visual = _visual(model, spec, train, ids, "cpu")
    tracker = LiveBytes(capacity_bytes=req.get("capacity_bytes"))
    tracker.seed(list(model.parameters()) + list(model.buffers()) + [ids] + list((visual or {}).values()))
    with tracker:
        wrapped = parallel.wrap(model, train, "cpu", lambda m: build_optimizer(m, train))
    del model
    if parallel.host_built(train):
        tracker.reset_peak()
    with tracker:
        times, losses = _steps(wrapped, train, ids, req, lambda: None, report, visual)
    return _result(train, "cpu", times, losses, tracker.peak, tracker.peak)


def _run_cuda(spec: ModelSpec, train: Any, req: dict[str, Any], report: Callable[[str], None]) -> ProbeResult:
    if not torch.cuda.is_available():
        raise RuntimeError("--device cuda: torch sees no CUDA device")
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    if req.get("gpu_memory_bytes"):  # answer "would it fit on a smaller card" on this one
        torch.cuda.set_per_process_memory_fraction(min(1.0, req["gpu_memory_bytes"] / total))
    elif req.get("gpu_fraction"):
        torch.cuda.set_per_process_memory_fraction(req["gpu_fraction"])
    report("build")
    host_built = parallel.host_built(train)
    model = build_model(spec, train, device="cpu" if host_built else "cuda")
    ids = torch.randint(0, spec.vocab_size, (train.batch_size, train.seq_len), device="cuda")
    ids, visual = _visual(model, spec, train, ids, "cuda")
    torch.cuda.reset_peak_memory_stats()
    wrapped = parallel.wrap(model, train, "cuda", lambda m: build_optimizer(m, train))
    del model
    if host_built:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, losses = _steps(wrapped, train, ids, req, torch.cuda.synchronize, report, visual)
    return _result(train, torch.cuda.get_device_name(0), times, losses, torch.cuda.max_memory_allocated(),
                   torch.cuda.max_memory_reserved(), _nvml_used())


def _visual(model: Any, spec: ModelSpec, train: Any, ids: Any, device: str) -> tuple[Any, dict[str, Any] | None]:
    """A VL step with images: the collator's batch (memplan.build.visual) on `device`; else (ids, None)."""
    from memplan.build.visual import has_images, visual_batch

    if not has_images(spec, train):
        return ids, None
    batch = visual_batch(model, spec, train)
    return batch["input_ids"].to(device), {k: batch[k].to(device) for k in ("pixel_values", "image_grid_thw",
                                                                             "position_ids")}


def _steps(wrapped: parallel.Wrapped, train: Any, ids: Any, req: dict[str, Any], sync: Any,
           report: Callable[[str], None], visual: dict[str, Any] | None = None) -> tuple[list, list]:
    times, losses = [], []
    total = req["warmup"] + req["steps"]
    for i in range(total):
        report(f"{'warm-up' if i < req['warmup'] else 'step'} {i + 1}/{total}")
        sync()
        t0 = time.perf_counter()
        losses += wrapped.step(ids, visual)
        sync()
        if i >= req["warmup"]:
            times.append(time.perf_counter() - t0)
    return times, losses


def _result(train: Any, device: str, times: list, losses: list, peak: int, reserved: int,
            nvml: int | None = None) -> ProbeResult:
    step = statistics.median(times) if times else 0.0
    tokens = train.batch_size * train.seq_len * train.grad_accum
    return ProbeResult(status=ProbeStatus.OK, device=device, peak_allocated_bytes=int(peak),
                       peak_reserved_bytes=int(reserved), nvml_used_bytes=nvml, step_time_s=step,
                       tokens_per_s=tokens / step if step else 0.0, losses=tuple(losses))


def _nvml_used() -> int | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).used)
    except Exception:  # noqa: BLE001 - NVML is optional extra information
        return None


def main(argv: list[str]) -> int:
    request, result = Path(argv[0]), Path(argv[1])
    if "LOCAL_RANK" in os.environ:  # under torchrun: one result per rank
        result = result.with_name(f"{result.name}.rank{os.environ.get('RANK', '0')}")
    req = json.loads(request.read_text())
    try:
        res = run(req)
    except torch.OutOfMemoryError as err:
        res = ProbeResult(status=ProbeStatus.OOM, device=req["device"], error=str(err).splitlines()[0])
    result.write_text(json.dumps(res.to_dict()))
    import torch.distributed as dist

    if dist.is_initialized() and res.status is ProbeStatus.OK:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
