"""Inference memory of a prediction run (LLaMA-Factory `do_predict` with `predict_with_generate`): the model in the
eval dtype, the KV cache of generation and the last step's logits; no gradients, no optimizer (issue 16, item 7).

LLaMA-Factory's sft workflow (train/sft/workflow.py L152-154 at HEAD ff6d4d12e) runs `trainer.predict(...,
**gen_kwargs)`: HF Seq2SeqTrainer.prediction_step calls `model.generate` on each per_device_eval_batch_size batch of
left-padded prompts (cutoff_len long at most), max_new_tokens new tokens each (GeneratingArguments default 1024).
A LoRA adapter given to a predict run is merged into the base (model/adapter.py L181-199, `merge_and_unload`).
"""

from __future__ import annotations

from memplan.errors import UnsupportedModel
from memplan.predict.breakdown import Breakdown, Term
from memplan.predict.cuda import CUDA_CONTEXT_BYTES, with_cuda_terms
from memplan.spec.generation import Generation
from memplan.spec.model import ModelSpec

FP32 = 4


def generation_estimate(spec: ModelSpec, gen: Generation) -> Breakdown:
    """Peak memory of generating `gen` with `spec`: the larger of the prefill (the prompt's forward under no_grad,
    logits of the last position only) and the last decode step (the whole cache, one layer's cache grown by cat)."""
    if not spec.analytic or spec.packed is not None or spec.is_moe:
        raise UnsupportedModel(f"{spec.name}: the inference estimate of a prediction run covers dense models of the "
                               "analytic formulas with unquantized weights")
    rows, w, s = gen.batch_size * gen.num_beams, gen.width, spec
    total = gen.prompt_len + gen.new_tokens
    # weights: every parameter in the eval dtype (the adapter merged into them), rotary inv_freq buffers (fp32)
    weights = s.num_parameters * w + 2 * (s.rotary_dim // 2) * FP32
    # transformers DynamicLayer.update (cache_utils.py L136): K and V (rows, kv_heads, t, head_dim) per layer,
    # grown by torch.cat each step, so one layer's old and new copies meet while the step runs
    per_token = 2 * s.num_kv_heads * s.head_dim * w * rows  # K + V of one position in one layer
    cache_prompt, cache_full = s.num_layers * per_token * gen.prompt_len, s.num_layers * per_token * total
    cat_transient = per_token * total
    # generate's prefill keeps logits of the last position only (generation/utils.py L2952-2956: logits_to_keep
    # = 1), copied to fp32 (L3745); sampling's softmax over them is another (rows, V) fp32
    logits = 2 * rows * s.vocab_size * FP32 + rows * s.vocab_size * w
    # prefill, inside the MLP under no_grad: the residual and normed input (rows, S, H), then act(gate) and up
    # (rows, S, I) alive as their product is made (modeling_llama.py LlamaMLP.forward)
    n = rows * gen.prompt_len
    prefill_act = 2 * n * s.hidden_size * w + 3 * n * s.intermediate_size * w
    prefill = cache_prompt + prefill_act
    decode = cache_full + cat_transient + logits
    peak_act, phase = (prefill_act, "prefill") if prefill >= decode else (cat_transient + logits, "decode")
    cache = cache_prompt if phase == "prefill" else cache_full
    terms = (
        Term(name="weights", bytes=weights, explain=f"{s.num_parameters:,} parameters x {w} B (eval dtype; a LoRA "
                                                    "adapter is merged into them) + rotary buffers"),
        Term(name="kv_cache", bytes=cache, explain=f"2 (K, V) x {s.num_layers} layers x {rows} rows x "
                                                   f"{s.num_kv_heads} kv heads x {s.head_dim} x "
                                                   f"{gen.prompt_len if phase == 'prefill' else total} positions "
                                                   f"x {w} B (prompt {gen.prompt_len} + {gen.new_tokens} new)"),
        Term(name="activations", bytes=peak_act,
             explain="prefill: the (rows, S, H) stream and three (rows, S, I) MLP tensors, no grad" if
             phase == "prefill" else "one layer's cache grown by cat (old + new) + the last position's logits "
                                     "(fp32 copy, softmax) and their eval-dtype original"),
    )
    peak = weights + cache + peak_act
    bd = Breakdown(terms=terms, peak_allocated_bytes=peak, peak_reserved_bytes=peak,
                   cuda_context_bytes=CUDA_CONTEXT_BYTES, phase=phase, trainable_params=0, method="inference",
                   reserved_explain="the allocator's overhead on a growing cache is not modelled: reserved is taken "
                                    "as the allocated peak",
                   note=f"inference (do_predict, generate): batch {gen.batch_size} x (prompt {gen.prompt_len} + "
                        f"{gen.new_tokens} new tokens); no training memory",
                   phases=(("load", weights), ("prefill", weights + prefill), ("decode", weights + decode)))
    return with_cuda_terms(bd)
