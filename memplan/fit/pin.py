"""fit --config: a LLaMA-Factory YAML pins its knobs; the search keeps them unless the command line opens them.

A YAML's per_device_train_batch_size is per GPU (HF TrainingArguments), so its global batch is per-device x
accumulation x the GPU count of the launch: --gpus, else the count the YAML was read with (NPROC_PER_NODE x NNODES,
or an export's launch line), else, for a DeepSpeed / FSDP YAML, the counts of SEARCHED_GPUS, searched.
"""

from __future__ import annotations

import dataclasses

from memplan.spec.parallel import Sharding
from memplan.spec.space import SearchSpace
from memplan.spec.train import TrainConfig

SEARCHED_GPUS = (1, 2, 4, 8)  # a DeepSpeed / FSDP YAML that says no GPU count: `--gpus 1-8`, said in the output


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Pinned:
    space: SearchSpace
    gpus: int  # the GPU count the YAML's own configuration (as written) is judged on
    note: str | None = None  # how the GPU count and the global batch were read, for the output


def pin_to_config(written: TrainConfig, space: SearchSpace, given: set[str], *,
                  gpus_from: str | None = None, search_gpus: bool = True) -> Pinned:
    """The YAML's precision, optimizer, kernel and rank stay as written unless `given` (the knobs the user typed)
    names them; its DeepSpeed / FSDP sharding and offload unless zero / fsdp / offload are. The global batch is
    the YAML's per-device batch x accumulation x the GPU count (the largest, when several are searched) unless
    global_batch is given. `gpus_from` says where written.gpus came from (None: the YAML did not say);
    `search_gpus` False (tune: probes cost real runs) keeps an unsaid count at the YAML's one GPU.
    Micro-batch x accumulation (and checkpointing unless given) are searched."""
    kw: dict[str, object] = {}
    for dim, knob, value in (("precisions", "precision", written.precision),
                             ("optimizers", "optimizer", written.optimizer), ("attentions", "attn", written.attn),
                             ("lora_ranks", "lora_rank", written.lora_rank)):
        if knob not in given:
            kw[dim] = (value,)
    per_device = f"per_device_train_batch_size {written.batch_size} x gradient_accumulation_steps " \
                 f"{written.grad_accum}"
    if "gpus" in given and space.gpu_counts:
        counts, source = space.gpu_counts, "--gpus"
    elif gpus_from is not None or written.sharding is Sharding.NONE or not search_gpus:
        counts, source = (written.gpus,), gpus_from
    else:
        engine = "deepspeed" if written.sharding.is_deepspeed else "fsdp"
        counts, source = SEARCHED_GPUS, None
        kw["gpu_counts"] = counts
    top = max(counts)
    note = None
    if "global_batch" not in given:
        kw["global_batch"] = written.batch_size * written.grad_accum * top
        if source is not None:
            note = f"global batch {kw['global_batch']} = {per_device} x {top} GPUs ({source})"
        elif len(counts) > 1:
            note = (f"the YAML's {engine} names no GPU count (no --gpus, NPROC_PER_NODE or launch line): searched "
                    f"{', '.join(map(str, counts))} GPUs at global batch {kw['global_batch']} = {per_device} x "
                    f"{top} GPUs; give --gpus N to fix the count")
    if not {"zero", "fsdp", "offload"} & given and written.sharding is not Sharding.NONE:
        kw.update(shardings=(written.sharding,), offloads=(written.offload,))
    return Pinned(space=dataclasses.replace(space, **kw), gpus=top, note=note)  # type: ignore[arg-type]
