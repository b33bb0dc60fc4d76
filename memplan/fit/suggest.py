"""What would make it fit: the cheapest changes from the smallest configuration, one at a time and cumulated."""

from __future__ import annotations

from memplan.errors import ConfigError
from memplan.fit.result import Suggestion, evaluate
from memplan.spec.hardware import GPU
from memplan.spec.model import ModelSpec
from memplan.spec.optimizers import Optimizer, facts
from memplan.spec.parallel import Sharding
from memplan.spec.train import Method, TrainConfig


def suggest(spec: ModelSpec, start: TrainConfig, gpu: GPU, usable: int) -> list[Suggestion]:
    """Cheapest changes (one knob at a time, then combined) from the smallest-memory configuration."""
    changes: list[tuple[str, dict[str, object]]] = [
        ("gradient checkpointing", dict(checkpointing=True)),
        ("micro-batch 1, more accumulation", dict(batch_size=1, grad_accum=start.effective_batch // start.gpus)),
        ("8-bit AdamW", dict(optimizer=Optimizer.ADAMW_8BIT)),
    ]
    # GaLore / APOLLO / Adam-mini train full weights only: a LoRA suggestion goes back to AdamW
    plain: dict[str, object] = dict(optimizer=Optimizer.ADAMW) if facts(start.optimizer).full_only else {}
    if start.method in (Method.FULL, Method.FREEZE):
        changes.append(("LoRA", dict(method=Method.LORA, **plain)))
    if start.method is not Method.QLORA:
        changes.append(("QLoRA 4-bit", dict(method=Method.QLORA, quant_bits=4, **plain)))
    if start.seq_len > 512:
        changes.append((f"seq {start.seq_len // 2}", dict(seq_len=start.seq_len // 2)))
    out: list[Suggestion] = []

    def offer(label: str, change: dict[str, object]) -> None:
        try:
            out.append(Suggestion(change=label, candidate=evaluate(spec, start.with_(**change), gpu, usable)))
        except ConfigError:
            pass  # a change the optimizer refuses (accumulation under a layer-wise GaLore step, say)

    for label, change in changes:
        offer(label, change)
    combined: dict[str, object] = dict(changes[0][1])
    for i in range(1, len(changes)):  # cumulative: the first i+1 changes together
        combined.update(changes[i][1])
        offer(" + ".join(lbl for lbl, _ in changes[: i + 1]), dict(combined))
    for n in (2, 4, 8, 16):  # more GPUs, model states sharded (ZeRO-3 / FSDP full_shard), effective batch kept
        per_rank = start.effective_batch // n
        micro = min(start.batch_size, per_rank)
        if per_rank and start.effective_batch % n == 0 and per_rank % micro == 0:
            offer(f"{n} GPUs, DeepSpeed ZeRO-3", dict(gpus=n, batch_size=micro, grad_accum=per_rank // micro,
                                                      sharding=Sharding.ZERO3))
    fitting = sorted((s for s in out if s.candidate.fits), key=lambda s: -s.candidate.tokens_per_s)
    rest = sorted((s for s in out if not s.candidate.fits), key=lambda s: s.candidate.total_bytes)
    return (fitting + rest)[:10]
