"""fit --config: a LLaMA-Factory YAML pins its knobs; the search keeps them unless the command line opens them."""

from __future__ import annotations

import dataclasses

from memplan.spec.parallel import Sharding
from memplan.spec.space import SearchSpace
from memplan.spec.train import TrainConfig


def pin_to_config(written: TrainConfig, space: SearchSpace, given: set[str]) -> SearchSpace:
    """The YAML's precision, optimizer, kernel and rank stay as written unless `given` (the knobs the user typed)
    names them; its effective batch is kept unless global_batch is given; its DeepSpeed sharding and offload unless
    zero / fsdp / offload are. Micro-batch x accumulation (and checkpointing unless given) are searched."""
    kw: dict[str, object] = {}
    for dim, knob, value in (("precisions", "precision", written.precision),
                             ("optimizers", "optimizer", written.optimizer), ("attentions", "attn", written.attn),
                             ("lora_ranks", "lora_rank", written.lora_rank)):
        if knob not in given:
            kw[dim] = (value,)
    if "global_batch" not in given:
        kw["global_batch"] = written.effective_batch
    if not {"zero", "fsdp", "offload"} & given and written.sharding is not Sharding.NONE:
        kw.update(shardings=(written.sharding,), offloads=(written.offload,))
    return dataclasses.replace(space, **kw)  # type: ignore[arg-type]
