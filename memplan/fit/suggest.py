"""What would make it fit: the cheapest changes from the smallest configuration, one at a time and cumulated."""

from __future__ import annotations

from memplan.fit.result import Suggestion, evaluate
from memplan.spec.hardware import GPU
from memplan.spec.model import ModelSpec
from memplan.spec.optimizers import Optimizer
from memplan.spec.parallel import Sharding
from memplan.spec.train import Method, TrainConfig


def suggest(spec: ModelSpec, start: TrainConfig, gpu: GPU, usable: int) -> list[Suggestion]:
    """Cheapest changes (one knob at a time, then combined) from the smallest-memory configuration."""
    changes: list[tuple[str, dict[str, object]]] = [
        ("gradient checkpointing", dict(checkpointing=True)),
        ("micro-batch 1, more accumulation", dict(batch_size=1, grad_accum=start.effective_batch // start.gpus)),
        ("8-bit AdamW", dict(optimizer=Optimizer.ADAMW_8BIT)),
    ]
    if start.method in (Method.FULL, Method.FREEZE):
        changes.append(("LoRA", dict(method=Method.LORA)))
    if start.method is not Method.QLORA:
        changes.append(("QLoRA 4-bit", dict(method=Method.QLORA, quant_bits=4)))
    if start.seq_len > 512:
        changes.append((f"seq {start.seq_len // 2}", dict(seq_len=start.seq_len // 2)))
    out = [Suggestion(change=label, candidate=evaluate(spec, start.with_(**change), gpu, usable))
           for label, change in changes]
    combined: dict[str, object] = dict(changes[0][1])
    for i in range(1, len(changes)):  # cumulative: the first i+1 changes together
        combined.update(changes[i][1])
        label = " + ".join(lbl for lbl, _ in changes[: i + 1])
        out.append(Suggestion(change=label, candidate=evaluate(spec, start.with_(**combined), gpu, usable)))
    for n in (2, 4, 8, 16):  # more GPUs, model states sharded (ZeRO-3 / FSDP full_shard), effective batch kept
        per_rank = start.effective_batch // n
        micro = min(start.batch_size, per_rank)
        if per_rank and start.effective_batch % n == 0 and per_rank % micro == 0:
            t = start.with_(gpus=n, batch_size=micro, grad_accum=per_rank // micro, sharding=Sharding.ZERO3)
            out.append(Suggestion(change=f"{n} GPUs, DeepSpeed ZeRO-3", candidate=evaluate(spec, t, gpu, usable)))
    fitting = sorted((s for s in out if s.candidate.fits), key=lambda s: -s.candidate.tokens_per_s)
    rest = sorted((s for s in out if not s.candidate.fits), key=lambda s: s.candidate.total_bytes)
    return (fitting + rest)[:10]
