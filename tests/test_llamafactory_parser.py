"""Every export and every configs/ YAML passes LLaMA-Factory 0.9.5's own `get_train_args`, run in its own
virtualenv (MEMPLAN_LF_PYTHON: its python, built by .ci/llamafactory_venv.sh; .ci/run builds it); and each
combination memplan's REJECTED table names is one LLaMA-Factory really refuses."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from memplan.cli import main
from memplan.formats.llamafactory import SFT_TEMPLATE, rejections
from memplan.spec.parallel import Parallelism, Sharding
from memplan.spec.train import Method, Precision, TrainConfig
from memplan.testing.lf_truth import lf_python

ROOT = Path(__file__).resolve().parents[1]
CHECK = Path(__file__).with_name("lf_parser_check.py")
LF_PYTHON = os.environ.get("MEMPLAN_LF_PYTHON")
needs_lf = pytest.mark.skipif(not LF_PYTHON, reason="MEMPLAN_LF_PYTHON is unset: build LLaMA-Factory 0.9.5's "
                              "virtualenv with `.ci/llamafactory_venv.sh DIR` and set it to DIR/bin/python")

# fit commands whose export LLaMA-Factory must accept: without --config (the template), with each shipped config
EXPORTS = {
    "lora_1gpu": ["--model", "llama-3-8b", "--gpu", "24GB", "--seq-len", "1024"],
    "qlora_1gpu": ["--model", "qwen2.5-7b", "--gpu", "16GB", "--method", "qlora", "--seq-len", "512"],
    "freeze_1gpu": ["--model", "llama-3.2-1b", "--gpu", "24GB", "--method", "freeze"],
    "lora_ddp_4gpu": ["--model", "llama-3-8b", "--gpu", "40GB", "--gpus", "4", "--zero", "0", "--seq-len", "1024"],
    "full_zero3_8gpu": ["--model", "llama-3-8b", "--gpu", "80GB", "--gpus", "8", "--method", "full", "--zero", "3"],
    "full_zero2_offload_8gpu": ["--model", "llama-3-8b", "--gpu", "40GB", "--gpus", "8", "--method", "full",
                                "--zero", "2", "--offload", "optimizer"],
    "full_fsdp_8gpu": ["--model", "llama-3-8b", "--gpu", "80GB", "--gpus", "8", "--method", "full", "--fsdp",
                       "full_shard"],
    "full_fsdp_offload_8gpu": ["--model", "llama-3-8b", "--gpu", "40GB", "--gpus", "8", "--method", "full",
                               "--fsdp", "full_shard", "--offload", "params"],
    "full_zero3_2nodes": ["--model", "llama-3-8b", "--gpu", "80GB", "--gpus", "16", "--nodes", "2", "--method",
                          "full", "--zero", "3"],
    "qlora_fsdp_2gpu": ["--model", "llama-3-8b", "--gpu", "24GB", "--gpus", "2", "--method", "qlora", "--fsdp",
                        "full_shard"],
    "config_lora": ["--config", "configs/llama3_8b_lora_24gb.yaml", "--gpu", "24GB"],
    "config_qlora": ["--config", "configs/qwen2.5_7b_qlora_16gb.yaml", "--gpu", "16GB"],
    "config_zero3": ["--config", "configs/llama3_8b_full_zero3_8x80gb.yaml", "--gpu", "80GB"],
    "config_zero3_as_fsdp": ["--config", "configs/llama3_8b_full_zero3_8x80gb.yaml", "--gpu", "80GB", "--fsdp",
                             "full_shard"],
    "config_fsdp": ["--config", "configs/llama3_8b_full_fsdp_8x80gb.yaml", "--gpu", "80GB"],
    "config_fsdp_4gpu": ["--config", "configs/llama3_8b_full_fsdp_8x80gb.yaml", "--gpu", "80GB", "--gpus", "4"],
    "config_dpo": ["--config", "configs/llama3_8b_lora_dpo.yaml", "--gpu", "48GB"],
}

# (keys over the template, the plan's layout, LLaMA-Factory 0.9.5's words): each a REJECTED rule of hparams/parser.py
ZERO3, ZERO2 = Parallelism(gpus=8, sharding=Sharding.ZERO3), Parallelism(gpus=8, sharding=Sharding.ZERO2)
REFUSED = {
    "pure_bf16_zero3": ({"pure_bf16": True, "bf16": False}, ZERO3, "`pure_bf16` is incompatible with DeepSpeed ZeRO-3"),
    "predict_zero3": ({"predict_with_generate": True, "val_size": 0.1}, ZERO3,
                      "`predict_with_generate` is incompatible with DeepSpeed ZeRO-3"),
    "pissa_zero3": ({"pissa_init": True}, ZERO3, "initialize PiSSA in DeepSpeed ZeRO-3"),
    "unsloth_zero3": ({"use_unsloth": True}, ZERO3, "Unsloth is incompatible with DeepSpeed ZeRO-3"),
    "galore_deepspeed": ({"use_galore": True}, ZERO2, "GaLore and APOLLO are incompatible with DeepSpeed"),
    "galore_layerwise_ddp": ({"use_galore": True, "galore_layerwise": True}, Parallelism(gpus=8),
                             "Distributed training does not support layer-wise GaLore"),
    "badam_ratio_ddp": ({"use_badam": True, "badam_mode": "ratio"}, Parallelism(gpus=8),
                        "BAdam does not yet support distributed training"),
    "fp8_quantized": ({"fp8": True, "quantization_bit": 4}, Parallelism(),
                      "FP8 training is not compatible with quantization"),
}


def _lf_yaml(extra: dict, parallel: Parallelism, tmp_path: Path) -> tuple[dict, TrainConfig]:
    full = any(k in extra for k in ("use_galore", "use_badam"))  # finetuning_args.py: LoRA cannot use them
    train = TrainConfig(method=Method.QLORA if "quantization_bit" in extra else Method.FULL if full else Method.LORA,
                        precision=Precision.PURE_BF16 if extra.get("pure_bf16") else Precision.BF16,
                        parallel=parallel)
    data = {**yaml.safe_load(SFT_TEMPLATE.read_text()), "model_name_or_path": "meta-llama/Meta-Llama-3-8B",
            "dataset": "alpaca_en_demo", "template": "llama3", "output_dir": str(tmp_path / "saves"),
            "finetuning_type": "full" if full else "lora", **extra}
    if parallel.sharding.is_deepspeed:
        ds = tmp_path / f"ds_{parallel.sharding.value}.json"
        ds.write_text(json.dumps({"zero_optimization": {"stage": int(parallel.sharding.value[-1])}}))
        data["deepspeed"] = str(ds)
    return data, train


@pytest.mark.parametrize("case", REFUSED)
def test_each_refused_combination_is_in_the_rules(case, tmp_path):
    extra, parallel, _ = REFUSED[case]
    data, train = _lf_yaml(extra, parallel, tmp_path)
    assert rejections(data, train)
    clean = {k: v for k, v in data.items() if k not in extra or k in ("bf16",)}
    assert rejections(clean, train.with_(precision=Precision.BF16)) == []


def _lf_check(paths: list[Path]) -> dict[str, dict]:
    """LLaMA-Factory's get_train_args on each file, in its own virtualenv, from the project root (the shipped
    configs name their DeepSpeed JSON from there, as LLaMA-Factory's examples do)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NPROC_PER_NODE", "NNODES")}
    run = subprocess.run([lf_python(), str(CHECK), *map(str, paths)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    results = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(paths), run.stdout[-2000:] + run.stderr[-4000:]
    return {r["path"]: r for r in results}


@pytest.mark.integration
@needs_lf
def test_llamafactory_parser_accepts_every_export_and_config_and_refuses_the_rules(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    for var in ("NPROC_PER_NODE", "NNODES"):
        monkeypatch.delenv(var, raising=False)
    accepted = list(sorted((ROOT / "configs").glob("*.yaml")))
    for name, args in EXPORTS.items():
        out = tmp_path / f"{name}.yaml"
        assert main(["fit", *args, "--export", "llamafactory", "-o", str(out), "--top", "0"]) == 0, name
        accepted.append(out)
    capsys.readouterr()
    # the template's placeholders are what a user edits; LLaMA-Factory's parser accepts them as written
    assert yaml.safe_load((tmp_path / "lora_1gpu.yaml").read_text())["dataset"] == "CHANGE_ME"
    refused = {}
    for case, (extra, parallel, words) in REFUSED.items():
        data, _ = _lf_yaml(extra, parallel, tmp_path)
        (tmp_path / f"refused_{case}.yaml").write_text(yaml.safe_dump(data))
        refused[tmp_path / f"refused_{case}.yaml"] = words
    results = _lf_check([*accepted, *refused])
    for path in accepted:
        r = results[str(path)]
        assert r["ok"], f"{path.name}: {r['error']}\n{path.read_text()}"
        data = yaml.safe_load(path.read_text())
        assert bool(r["deepspeed"]) == ("deepspeed" in data) and bool(r["fsdp"]) == ("fsdp" in data), path.name
    for path, words in refused.items():
        r = results[str(path)]
        assert not r["ok"] and words in r["error"], f"{path.name}: {r}"
