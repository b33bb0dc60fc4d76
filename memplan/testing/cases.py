"""The bad-input table: command lines a user can get wrong, each with a needle its one error line must contain.
`tests/test_reliability.py` runs every case in-process (exit 2, one line on stderr, no traceback);
`benchmarks/reliability.py` runs them as real processes and writes benchmarks/results/reliability.md.
`{tmp}` is a scratch folder holding `bad.json` (not JSON), `tiny.json` (a small llama config) and `ds3.json`."""

from __future__ import annotations

from memplan.testing.tiny import SMALL_LLAMA

M = ["--model", "llama-2-7b"]
TINY = ["--model", "{tmp}/tiny.json"]
G = ["--gpu", "24GB"]

BAD_INPUT: list[tuple[list[str], str]] = [
    # estimate: models, GPUs, knobs
    (["estimate", "--model", "nope"], "unknown model"),
    (["estimate", "--model", ""], "--model is empty"),
    (["estimate", "--model", "{tmp}/bad.json"], "not valid JSON"),
    (["estimate", "--model", "{tmp}"], "has no config.json"),
    (["estimate"], "give --model"),
    (["estimate", *M, "--gpu", "lots"], "unknown GPU"),
    (["estimate", *M, "--gpu", ""], "--gpu is empty"),
    (["estimate", *M, "--gpu", "-3GB"], "unknown GPU '-3GB'"),
    (["estimate", *M, "--batch-size", "0"], "--batch-size"),
    (["estimate", *M, "--batch-size", "abc"], "must be an integer"),
    (["estimate", *M, "--grad-accum", "-1"], "--grad-accum"),
    (["estimate", *M, "--seq-len", "0"], "--seq-len"),
    (["estimate", *M, "--method", "oft"], "--method"),
    (["estimate", *M, "--precision", "fp8"], "--precision"),
    (["estimate", *M, "--optimizer", "lion"], "--optimizer"),
    (["estimate", *M, "--attn", "xformers"], "--attn"),
    (["estimate", *M, "--method", "full", "--lora-rank", "8"], "without LoRA"),
    (["estimate", *M, "--lora-rank", "8,16"], "takes one --lora-rank"),
    (["estimate", *M, "--lora-rank", "0"], "values are positive integers"),
    (["estimate", *M, "--lora-alpha", "-16"], "--lora-alpha must be a positive integer"),
    (["estimate", *M, "--lora-dropout", "1.5"], "--lora-dropout"),
    (["estimate", *M, "--lora-dropout", "x"], "must be a number"),
    (["estimate", *M, "--lora-targets", "nope_proj"], "not in llama layers"),
    (["estimate", *M, "--lora-targets", ","], "--lora-targets is empty"),
    (["estimate", *M, "--method", "qlora", "--quant-bits", "3"], "--quant-bits"),
    (["estimate", *M, "--quant-bits", "4"], "--quant-bits applies to --method qlora only"),
    (["estimate", *M, "--freeze-trainable-layers", "2"], "applies to --method freeze only"),
    (["estimate", *M, "--precision", "fp32", "--attn", "flash_attention_2"], "flash"),
    (["estimate", "--model", "gemma-2-9b", "--attn", "sdpa"], "does not support --attn sdpa"),
    (["estimate", *M, "--gpus", "0"], "values are positive integers"),
    (["estimate", *M, "--gpus", "2,4"], "takes one --gpus"),
    (["estimate", *M, "--gpus", "6", "--nodes", "4"], "not a multiple of --nodes"),
    (["estimate", *M, "--zero", "5"], "ZeRO stages are 0, 1, 2, 3"),
    (["estimate", *M, "--zero", "3", "--fsdp", "full_shard"], "two engines"),
    (["estimate", *M, "--fsdp", "zero3"], "--fsdp zero3"),
    (["estimate", *M, "--offload", "optimizer"], "--offload needs ZeRO"),
    (["estimate", *M, "--gpus", "2", "--zero", "2", "--offload", "params"], "needs sharded parameters"),
    (["estimate", *M, "--offload", "disk"], "--offload"),
    (["estimate", *M, "--margin", "0.6", *G], "margin"),
    (["estimate", *M, "--by-module"], "needs the exact mode"),
    (["estimate", *M, "--bogus"], "bogus"),
    (["estimate", "--config", "{tmp}/missing.yaml"], "No such file"),
    (["estimate", "--config", "{tmp}/bad.json"], "malformed YAML"),
    (["estimate", "--config", "{tmp}/list.yaml"], "expected a mapping"),
    (["estimate", "--config", "{tmp}/nomodel.yaml"], "model_name_or_path is missing"),
    (["estimate", "--config", "{tmp}/badoptim.yaml"], "is not modelled"),
    (["estimate", "--config", "{tmp}/bothhalf.yaml"], "bf16 and fp16 are both true"),
    (["estimate", "--config", "{tmp}/zerobatch.yaml"], "per_device_train_batch_size must be a positive integer"),
    (["estimate", "--config", "{tmp}/missingds.yaml"], "no such file"),
    # trace
    (["trace", "--model", "nope"], "unknown model"),
    (["trace", *M, "--gpus", "8", "--zero", "3"], "drop --exact"),
    # a model only the exact mode knows, under ZeRO: why it fell back, not "drop --exact" (never passed)
    (["estimate", "--model", "bloomz-7b1", "--gpus", "8", "--zero", "3"],
     "the exact mode it falls back to traces one GPU"),
    (["trace", "--model", "internlm2_5-7b"], "trust_remote_code"),
    # fit
    (["fit", *M], "fit needs --gpu"),
    (["fit", *M, "--gpu", "lots"], "unknown GPU"),
    (["fit", *M, "--gpu", "t4", "--precision", "bf16"], "bf16"),
    (["fit", *M, *G, "--margin", "0.6"], "margin"),
    (["fit", *M, *G, "--gpus", "3"], "divisible"),
    (["fit", *M, *G, "--gpus", "0-4"], "ranges start above 0"),
    (["fit", *M, *G, "--gpus", "3,5,7"], "no GPU count"),
    (["fit", *M, *G, "--lora-rank", "0-8"], "ranges start above 0"),
    (["fit", *M, *G, "--lora-rank", "4-12"], "does not end on a power-of-two multiple"),
    (["fit", *M, *G, "--lora-rank", "8-4"], "a range runs from low to high"),
    (["fit", *M, *G, "--global-batch", "0"], "--global-batch must be a positive integer"),
    (["fit", *M, *G, "--top", "-1"], "--top must be 0 or more"),
    (["fit", *M, *G, "--export", "xml", "-o", "{tmp}/x"], "--export 'xml'"),
    (["fit", *M, *G, "--export", "hf"], "go together"),
    (["fit", *M, *G, "--optimizer", "adamw,lion"], "--optimizer"),
    (["fit", *M, *G, "--attn", "sdpa,xformers"], "--attn"),
    (["fit", *M, "--gpu", "t4", "--precision", "fp16", "--attn", "flash_attention_2"], "flash_attention_2"),
    (["fit", *M, "--gpu", "auto"], "--gpu auto"),
    # tune / fit --probe
    (["tune", *M, "--device", "cpu"], "--capacity"),
    (["tune", *M, "--device", "tpu"], "--device"),
    (["tune", *M, "--device", "cpu", "--capacity", "1GB", "--n-probes", "0"], "--n-probes"),
    (["tune", *M, "--device", "cpu", "--capacity", "1GB", "--timeout", "-5"], "seconds above 0"),
    (["tune", *M, "--device", "cpu", "--capacity", "lots"], "cannot read size"),
    (["tune", *M, "--device", "cuda", "--capacity", "1GB"], "--capacity is for --device cpu"),
    (["fit", "--probe", *M, "--device", "cpu", "--capacity", "1GB", "--n-probes", "0"], "--n-probes"),
    (["tune", *TINY, "--device", "cpu", "--capacity", "1GB", "--storage", "garbage://x"], "NoSuchModuleError"),
    (["tune", *TINY, "--device", "cpu", "--capacity", "1GB", "--storage", "{tmp}/plain.db"], "not a database URL"),
    # probe
    (["probe", *M, "--device", "tpu"], "--device must be cpu or cuda"),
    (["probe", *M, "--gpu", "24GB"], "cap a CUDA device"),
    (["probe", *M, "--device", "cuda", "--capacity", "1GB"], "--capacity simulates"),
    (["probe", *M, "--gpu-fraction", "2", "--device", "cuda"], "--gpu-fraction"),
    (["probe", *M, "--timeout", "-1"], "seconds above 0"),
    (["probe", *M, "--timeout", "nan"], "seconds above 0"),
    (["probe", *M, "--method", "qlora"], "a QLoRA probe runs on CUDA"),
    (["probe", *M, "--steps", "0"], "--steps must be positive"),
    (["probe", *TINY, "--device", "cuda"], "NVML finds no NVIDIA GPU"),
    (["probe", *M, "--gpus", "2", "--fsdp", "no_shard"], "no_shard"),
    (["probe", *M, "--gpus", "2", "--zero", "2", "--offload", "optimizer"], "one memory"),
    # run
    (["run", *M, "--", "python"], "say what the script trains"),
    (["run", "--method", "lora", *M], "no command"),
    (["run", "--method", "lora", *M, "--", "no-such-command-xyz"], "command not found"),
    (["run", "--method", "lora", *M, "--max-retries", "-1", "--", "true"], "--max-retries"),
    (["run", "--method", "lora", *M, "--log", "/dev/null/x.jsonl", "--", "true"], "cannot write the decision log"),
    (["run", "--config", "{tmp}/nomodel.yaml", "--", "true"], "does not name --config"),
    (["run", "--config", "{tmp}/nomodel.yaml", "--", "true", "{tmp}/nomodel.yaml"], "model_name_or_path is missing"),
    (["run", "--method", "lora", "--", "python", "train.py", "--per_device_train_batch_size", "x"],
     "is not an integer"),
    # catalogs
    (["models", "--bogus"], "bogus"),
    (["gpus", "--bogus"], "bogus"),
    (["nonsense-command"], "No such command"),
]

YAMLS = {"list.yaml": "- a\n- b\n", "nomodel.yaml": "finetuning_type: lora\n",
         "badoptim.yaml": "model_name_or_path: llama-2-7b\noptim: lion_32bit\n",
         "bothhalf.yaml": "model_name_or_path: llama-2-7b\nbf16: true\nfp16: true\n",
         "zerobatch.yaml": "model_name_or_path: llama-2-7b\nper_device_train_batch_size: 0\n",
         "missingds.yaml": "model_name_or_path: llama-2-7b\ndeepspeed: no_such_ds.json\n"}

def scratch(folder: str) -> None:
    """Write the files the cases name into `folder`."""
    import json
    from pathlib import Path

    root = Path(folder)
    (root / "bad.json").write_text("{not json: [")
    (root / "tiny.json").write_text(json.dumps(SMALL_LLAMA))
    for name, text in YAMLS.items():
        (root / name).write_text(text)


def expand(args: list[str], tmp: str) -> list[str]:
    return [a.replace("{tmp}", tmp) for a in args]
