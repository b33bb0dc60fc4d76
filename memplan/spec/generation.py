"""Generation: the input of a prediction run's inference estimate (memplan.predict.generation)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class Generation:
    """One prediction run's generation, as LLaMA-Factory sets it up."""

    batch_size: int  # per_device_eval_batch_size (HF default 8)
    prompt_len: int  # cutoff_len: every prompt taken at the longest
    new_tokens: int  # max_new_tokens (LLaMA-Factory hparams/generating_args.py L53-55: 1024)
    width: int  # bytes of the eval dtype: LLaMA-Factory's compute_dtype (bf16 / fp16 set; else infer_optim_dtype)
    num_beams: int = 1  # beam search multiplies the rows generate runs (and caches)
