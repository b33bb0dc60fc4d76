"""Qwen-1 (QWenLMHeadModel) on its real code: memplan's analytic terms vs the exact fake-tensor trace vs the CPU
allocator's peak, on a tiny Qwen-1 config. transformers ships no Qwen-1 and memplan ships none of its code, so this
benchmark runs on a copy the user puts in a folder (QWEN1_CODE, default /tmp/qwen1/pkg/qwen_remote): Qwen/Qwen-7B's
modeling_qwen.py, configuration_qwen.py and qwen_generation_utils.py, the revision with flash_attn_func and the
sdpa path: the GitHub mirror of the Hugging Face repository, zhangningboo/Qwen-7B @ffe04dd (its history follows the
hub's: "remove fix-sized causal mask", "update modeling_qwen.py"; the code index holds the same file at 1ff20863,
id 1777346645). The folder is registered with transformers' Auto classes for this process only.

    PYTHONPATH=$PWD HF_HUB_OFFLINE=1 python benchmarks/qwen1_check.py   ->   benchmarks/results/qwen1_check.md

Two shims, neither touching what runs in a step: transformers 5 dropped get_head_mask (4.x returned
`[None] * num_hidden_layers` for no mask), given back here; and it refuses `attn_implementation="sdpa"` for a
class without `_supports_sdpa`, while Qwen-1 picks its attention by its own flags (use_flash_attn, SUPPORT_TORCH2:
F.scaled_dot_product_attention with its own causal mask) whatever transformers' setting says, so the flag is set
on QWenPreTrainedModel here.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
from pathlib import Path

from memplan.spec.model import ModelSpec
from memplan.spec.train import Method, Precision, TrainConfig

CODE = Path(os.environ.get("QWEN1_CODE", "/tmp/qwen1/pkg/qwen_remote"))
OUT = Path(__file__).parent / "results" / "qwen1_check.md"

# a tiny Qwen-1: Qwen-7B's config.json keys (no_bias, kv_channels, seq_length, rotary) at small dims
TINY = dict(model_type="qwen", architectures=["QWenLMHeadModel"], hidden_size=128, num_hidden_layers=2,
            num_attention_heads=4, kv_channels=32, intermediate_size=688, vocab_size=4096, seq_length=8192,
            max_position_embeddings=8192, no_bias=True, fp32=True, use_flash_attn=False, tie_word_embeddings=False,
            layer_norm_epsilon=1e-6, rotary_pct=1.0, rotary_emb_base=10000, use_dynamic_ntk=True,
            use_logn_attn=True, emb_dropout_prob=0.0, attn_dropout_prob=0.0)
TARGETS = ("c_attn", "c_proj", "w1", "w2")  # QwenLM/Qwen finetune.py LoraArguments.lora_target_modules
LORA, FULL, FP32, BF16 = Method.LORA, Method.FULL, Precision.FP32, Precision.BF16
CASES = [
    ("lora fp32", dict(method=LORA, precision=FP32, lora_targets=TARGETS)),
    ("lora bf16 AMP", dict(method=LORA, precision=BF16, lora_targets=TARGETS)),
    ("full fp32", dict(method=FULL, precision=FP32)),
    ("full bf16 AMP", dict(method=FULL, precision=BF16)),
    ("lora bf16 AMP, batch 2", dict(method=LORA, precision=BF16, lora_targets=TARGETS, batch_size=2)),
    ("lora bf16 AMP, no checkpointing", dict(method=LORA, precision=BF16, lora_targets=TARGETS, checkpointing=False)),
    ("full bf16 AMP, no checkpointing", dict(method=FULL, precision=BF16, checkpointing=False)),
]


def register() -> None:
    """Qwen-1's own classes under model_type "qwen" (AutoConfig / AutoModelForCausalLM), from the copy in CODE."""
    import transformers

    sys.path.insert(0, str(CODE.parent))
    cfg_mod = importlib.import_module(f"{CODE.name}.configuration_qwen")
    model_mod = importlib.import_module(f"{CODE.name}.modeling_qwen")
    model_mod.QWenPreTrainedModel._supports_sdpa = True  # the shims above
    # transformers 4's ModuleUtilsMixin.get_head_mask (gone in 5): no head mask is `[None] * num_hidden_layers`
    model_mod.QWenPreTrainedModel.get_head_mask = lambda self, head_mask, n, *a, **k: [None] * n
    transformers.AutoConfig.register("qwen", cfg_mod.QWenConfig)
    transformers.AutoModelForCausalLM.register(cfg_mod.QWenConfig, model_mod.QWenLMHeadModel)


def run() -> list[dict[str, object]]:
    from memplan.predict.estimator import estimate
    from memplan.testing.truth import measure_cpu_peak
    from memplan.trace.exact import exact_estimate

    spec = ModelSpec.from_config_dict(TINY, name="tiny-qwen1")
    rows = []
    for label, kw in CASES:
        train = TrainConfig(**{"seq_len": 256, "batch_size": 1, **kw})
        t0 = time.time()
        analytic = estimate(spec, train, device="cpu").peak_allocated_bytes
        try:
            exact: int | str = exact_estimate(spec, train, trust_remote_code=True, device="cpu").peak_allocated_bytes
        except Exception as err:  # noqa: BLE001 - recorded in the table, not hidden
            exact = f"failed: {str(err)[-80:]}"
        truth = measure_cpu_peak(spec, train)
        rows.append(dict(case=label, analytic=analytic, exact=exact, truth=truth.peak_bytes,
                         phase=f"{truth.phase}:{truth.step}", s=time.time() - t0))
        print(rows[-1], flush=True)
    return rows


def count_check() -> tuple[int, int]:
    """memplan's parameter count of the tiny config vs the real model's."""
    import torch
    import transformers

    from memplan.build.model import hf_config

    spec = ModelSpec.from_config_dict(TINY, name="tiny-qwen1")
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config(spec, TrainConfig(method=FULL)))
    return spec.num_parameters, sum(p.numel() for p in model.parameters())


def main() -> None:
    register()
    ours, real = count_check()
    rows = run()
    pct = lambda a, b: 100.0 * (a - b) / b  # noqa: E731
    lines = ["# Qwen-1 on its own code: analytic vs exact vs CPU truth", "",
             "`PYTHONPATH=$PWD HF_HUB_OFFLINE=1 python benchmarks/qwen1_check.py` (torch CPU, transformers 5.24, "
             "peft 0.21), Qwen/Qwen-7B's modeling_qwen.py (see the script's docstring for the copy), a tiny config: "
             f"hidden {TINY['hidden_size']}, {TINY['num_hidden_layers']} layers, {TINY['num_attention_heads']} "
             f"heads, intermediate_size {TINY['intermediate_size']} (MLP {TINY['intermediate_size'] // 2}), vocab "
             f"{TINY['vocab_size']}; seq 256, batch 1 unless said, sdpa (Qwen-1's torch path), AdamW, 2 steps; "
             "checkpointing unless said: Qwen-1's own (QWenModel.forward calls torch.utils.checkpoint without "
             "use_reentrant, so reentrant; transformers 5 enables it through the old _set_gradient_checkpointing)."
             " Exact and analytic with device=\"cpu\" (the CPU kernels, no CUDA terms); all bytes are allocated "
             "peaks.", "",
             f"Parameters: memplan {ours:,}, the built model {real:,}.", "",
             "| case | analytic | exact | CPU truth | analytic vs truth | exact vs truth | truth's phase |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        a, t = int(r["analytic"]), int(r["truth"])  # type: ignore[call-overload]
        e = r["exact"]
        ex = (f"{e:,} | " if isinstance(e, int) else f"{e} | ")
        exd = f"{pct(e, t):+.2f} %" if isinstance(e, int) else "-"
        lines.append(f"| {r['case']} | {a:,} | {ex}{t:,} | {pct(a, t):+.2f} % | {exd} | {r['phase']} |")
    OUT.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
