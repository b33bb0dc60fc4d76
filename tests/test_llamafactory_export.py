"""LLaMA-Factory YAMLs on several GPUs, exports that launch as written, the shipped configs/ and the configs that
do not train (issue 16, items 4-7). LLaMA-Factory's own parser judges the same files in
test_llamafactory_parser.py."""

import json
from pathlib import Path

import pytest
import yaml

from memplan.cli import main
from memplan.errors import ConfigError
from memplan.formats.llamafactory import (
    REJECTED,
    SFT_TEMPLATE,
    config_from_llamafactory,
    launch_world,
    read_llamafactory,
    rejections,
    write_llamafactory,
)
from memplan.spec.catalog import resolve_model
from memplan.spec.parallel import Offload, Parallelism, Sharding
from memplan.spec.train import Method, Precision, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
ZERO3_YAML = """model_name_or_path: meta-llama/Meta-Llama-3-8B-Instruct
stage: sft
do_train: true
finetuning_type: full
deepspeed: ds_z3.json
dataset: alpaca_en_demo
template: llama3
cutoff_len: 2048
output_dir: saves/x
per_device_train_batch_size: 2
gradient_accumulation_steps: 1
bf16: true
"""


@pytest.fixture
def zero3_yaml(tmp_path, monkeypatch):
    for var in ("NPROC_PER_NODE", "NNODES", "FORCE_TORCHRUN"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "ds_z3.json").write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    path = tmp_path / "train.yaml"
    path.write_text(ZERO3_YAML)
    return path


# ---- item 4: the batch is per device ---------------------------------------------------------------------------
def test_zero3_yaml_on_8_gpus_keeps_the_per_device_batch(zero3_yaml, capsys):
    """`fit --config <ZeRO-3 YAML> --gpus 8` used to say `--global-batch 2 is not divisible by 8 GPUs`."""
    assert main(["fit", "--config", str(zero3_yaml), "--gpu", "80GB", "--gpus", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["global_batch"] == 2 * 1 * 8
    assert "x 8 GPUs (--gpus)" in out["gpu_note"]
    assert out["as_written"]["config"]["gpus"] == 8 and out["as_written"]["config"]["batch_size"] == 2
    assert {c["config"]["gpus"] for c in out["ranked"]} == {8}
    assert {c["config"]["sharding"] for c in out["ranked"]} == {"zero3"}


def test_launcher_environment_gives_the_gpu_count(zero3_yaml, monkeypatch, capsys):
    assert launch_world({}) is None and launch_world({"FORCE_TORCHRUN": "1"}) is None  # device count: unseen
    assert launch_world({"NPROC_PER_NODE": "4", "NNODES": "2"}) == (8, 2)
    parallel = read_llamafactory(zero3_yaml, env={"NPROC_PER_NODE": "4", "NNODES": "2"}).train.parallel
    assert (parallel.gpus, parallel.nodes, parallel.sharding) == (8, 2, Sharding.ZERO3)
    monkeypatch.setenv("NPROC_PER_NODE", "4")
    assert main(["fit", "--config", str(zero3_yaml), "--gpu", "80GB", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["global_batch"] == 8 and {c["config"]["gpus"] for c in out["ranked"]} == {4}
    assert "NPROC_PER_NODE" in out["gpu_note"]
    monkeypatch.setenv("NPROC_PER_NODE", "four")
    assert main(["estimate", "--config", str(zero3_yaml)]) == 2
    err = capsys.readouterr().err
    assert "NPROC_PER_NODE='four'" in err and err.count("\n") == 1


def test_sharded_yaml_without_a_count_searches_1_to_8_gpus_and_says_so(zero3_yaml, capsys):
    assert main(["fit", "--config", str(zero3_yaml), "--gpu", "80GB", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "searched 1, 2, 4, 8 GPUs at global batch 16" in " ".join(out.split())
    assert main(["fit", "--config", str(zero3_yaml), "--gpu", "80GB", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["global_batch"] == 16 and {c["config"]["gpus"] for c in res["ranked"]} <= {1, 2, 4, 8}
    assert len({c["config"]["gpus"] for c in res["ranked"]}) > 1


def test_estimate_of_a_sharded_yaml_without_a_count_says_it_is_one_gpu(zero3_yaml, capsys):
    assert main(["estimate", "--config", str(zero3_yaml), "--gpus", "8"]) == 0
    assert "names no GPU count" not in capsys.readouterr().err
    assert main(["estimate", "--config", str(zero3_yaml), "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["config"]["gpus"] == 1
    assert "names no GPU count" in err and "estimated on 1 GPU" in err and err.count("\n") == 1


def test_a_plain_yaml_stays_on_one_gpu(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("NPROC_PER_NODE", raising=False)
    path = tmp_path / "train.yaml"
    path.write_text("model_name_or_path: llama-2-7b\ndo_train: true\nper_device_train_batch_size: 2\n"
                    "gradient_accumulation_steps: 4\nbf16: true\n")
    assert main(["fit", "--config", str(path), "--gpu", "24GB", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["global_batch"] == 8 and {c["config"]["gpus"] for c in out["ranked"]} == {1}


# ---- item 5: exports launch as written -------------------------------------------------------------------------
LAYOUTS = [Parallelism(), Parallelism(gpus=4), Parallelism(gpus=8, sharding=Sharding.ZERO3),
           Parallelism(gpus=8, sharding=Sharding.ZERO2, offload=Offload.OPTIMIZER),
           Parallelism(gpus=16, nodes=2, sharding=Sharding.ZERO3, offload=Offload.PARAMS),
           Parallelism(gpus=8, sharding=Sharding.FULL_SHARD), Parallelism(gpus=8, sharding=Sharding.SHARD_GRAD_OP),
           Parallelism(gpus=8, sharding=Sharding.FULL_SHARD, offload=Offload.PARAMS),
           Parallelism(gpus=16, nodes=2, sharding=Sharding.HYBRID_SHARD)]


@pytest.mark.parametrize("parallel", LAYOUTS, ids=lambda p: f"{p.gpus}x{p.sharding.value}+{p.offload.value}")
@pytest.mark.parametrize("with_base", [False, True], ids=["template", "base"])
def test_read_export_read_keeps_the_sharding_and_gpu_count(parallel, with_base, zero3_yaml, tmp_path):
    spec = resolve_model("llama-3-8b")
    train = TrainConfig(method=Method.FULL, precision=Precision.BF16, batch_size=2, parallel=parallel)
    base = read_llamafactory(zero3_yaml).raw if with_base else yaml.safe_load(SFT_TEMPLATE.read_text())
    out = tmp_path / "out" / "plan.yaml"
    out.parent.mkdir()
    files = write_llamafactory(spec, train, out, base, base_dir=tmp_path)
    again = read_llamafactory(out, env={})
    assert again.train.parallel.gpus == parallel.gpus and again.train.parallel.nodes == parallel.nodes
    assert again.train.sharding is parallel.sharding and again.train.offload is parallel.offload
    assert again.gpus_from == "the YAML's launch line"
    data = yaml.safe_load(out.read_text())
    assert ("deepspeed" in data) == parallel.sharding.is_deepspeed and ("fsdp" in data) == (
        parallel.sharding is not Sharding.NONE and not parallel.sharding.is_deepspeed)
    # the input's ZeRO-3 JSON is reused when it says the plan's stage, else a JSON is written beside the plan
    reused = with_base and parallel.sharding is Sharding.ZERO3 and parallel.offload is Offload.NONE
    assert len(files) == (2 if parallel.sharding.is_deepspeed and not reused else 1)
    first = out.read_text().splitlines()[0]
    nodes = "NODE_RANK=<rank-of-this-node> MASTER_ADDR=<host-of-node-0> " if parallel.nodes > 1 else ""
    assert first.endswith(f"NNODES={parallel.nodes} NPROC_PER_NODE={parallel.gpus_per_node} {nodes}"
                          f"llamafactory-cli train {out}")
    torchrun = parallel.gpus > 1 or parallel.sharding is not Sharding.NONE
    assert ("FORCE_TORCHRUN=1" in first) == torchrun and ("CUDA_VISIBLE_DEVICES=0" in first) == (not torchrun)


def test_export_without_config_is_a_complete_sft_config_with_the_hub_id(tmp_path, capsys):
    out = tmp_path / "plan.yaml"
    assert main(["fit", "--model", "llama-3-8b", "--gpu", "80GB", "--gpus", "8", "--method", "full", "--zero", "3",
                 "--export", "llamafactory", "-o", str(out), "--top", "0"]) == 0
    err = capsys.readouterr().err
    data = yaml.safe_load(out.read_text())
    assert data["model_name_or_path"] == "meta-llama/Meta-Llama-3-8B"  # not memplan's short name
    assert data["stage"] == "sft" and data["do_train"] is True and data["finetuning_type"] == "full"
    assert data["dataset"] == "CHANGE_ME" and "CHANGE_ME" in data["output_dir"] and data["template"] == "CHANGE_ME"
    assert "pure_bf16" not in data  # the search had pure_bf16 open: LLaMA-Factory refuses it with ZeRO-3
    ds = json.loads(Path(data["deepspeed"]).read_text())
    assert ds["zero_optimization"]["stage"] == 3 and ds["train_micro_batch_size_per_gpu"] == "auto"
    assert f"wrote {data['deepspeed']}, {out}; launch: FORCE_TORCHRUN=1 NNODES=1 NPROC_PER_NODE=8" in err
    again = read_llamafactory(out, env={})
    assert again.train.gpus == 8 and again.train.sharding is Sharding.ZERO3
    assert again.train.effective_batch == 16


def test_fsdp_chosen_over_a_deepspeed_yaml_drops_the_deepspeed_key(zero3_yaml, tmp_path):
    out = tmp_path / "plan.yaml"
    assert main(["fit", "--config", str(zero3_yaml), "--gpu", "80GB", "--gpus", "8", "--fsdp", "full_shard",
                 "--export", "llamafactory", "-o", str(out)]) == 0
    data = yaml.safe_load(out.read_text())
    assert "deepspeed" not in data and data["fsdp"] == "full_shard auto_wrap"
    assert data["dataset"] == "alpaca_en_demo"  # the input's keys kept
    again = read_llamafactory(out, env={})
    assert again.train.sharding is Sharding.FULL_SHARD and again.train.gpus == 8
    assert again.train.effective_batch == 16


def test_combinations_llamafactory_refuses_are_never_written(tmp_path, capsys):
    spec = resolve_model("llama-3-8b")
    train = TrainConfig(method=Method.FULL, precision=Precision.PURE_BF16,
                        parallel=Parallelism(gpus=8, sharding=Sharding.ZERO3))
    out = tmp_path / "plan.yaml"
    with pytest.raises(ConfigError, match="nothing written.*pure_bf16 is incompatible with DeepSpeed ZeRO-3"):
        write_llamafactory(spec, train, out, {"stage": "sft"})
    assert list(tmp_path.iterdir()) == []  # neither the YAML nor its DeepSpeed JSON
    assert main(["fit", "--model", "llama-3-8b", "--gpu", "80GB", "--gpus", "8", "--method", "full", "--zero", "3",
                 "--precision", "pure_bf16", "--export", "llamafactory", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "LLaMA-Factory" in err and err.count("\n") == 1 and not out.exists()
    assert rejections({"pure_bf16": True}, train.with_(sharding=Sharding.ZERO2)) == []  # ZeRO-2 is fine
    assert all(where.startswith(("hparams/parser.py:", "model/", "transformers")) for _, _, where in REJECTED)


def test_export_when_nothing_fits_says_nothing_was_written(tmp_path, capsys):
    out = tmp_path / "plan.yaml"
    assert main(["fit", "--model", "llama-2-70b", "--gpu", "24GB", "--method", "full", "--export", "llamafactory",
                 "-o", str(out), "--top", "0"]) == 1
    err = capsys.readouterr().err
    assert f"nothing fits: nothing written to {out}" in err and not out.exists()


# ---- item 6: configs/ ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_is_estimated(path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # DeepSpeed paths are relative to the project root, as LLaMA-Factory's examples are
    monkeypatch.delenv("NPROC_PER_NODE", raising=False)
    rel = str(path.relative_to(ROOT))
    assert main(["estimate", "--config", rel, "--gpu", "80GB", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    gpus = int(path.read_text().split("NPROC_PER_NODE=")[1].split()[0])
    assert out["config"]["gpus"] == gpus  # read from the config's launch line
    assert f"llamafactory-cli train {rel}" in path.read_text()  # the launch line names the file itself


def test_configs_cover_the_common_cases():
    raws = {p.name: yaml.safe_load(p.read_text()) for p in CONFIGS}
    kinds = {(r["finetuning_type"], r.get("quantization_bit"), r.get("stage"),
              "deepspeed" if "deepspeed" in r else "fsdp" if "fsdp" in r else None) for r in raws.values()}
    assert ("lora", None, "sft", None) in kinds and ("lora", 4, "sft", None) in kinds
    assert ("full", None, "sft", "deepspeed") in kinds and ("full", None, "sft", "fsdp") in kinds
    assert ("lora", None, "dpo", None) in kinds
    for r in raws.values():  # every DeepSpeed JSON they name is shipped
        assert "deepspeed" not in r or (ROOT / r["deepspeed"]).is_file()


# ---- item 7: configs that do not train -------------------------------------------------------------------------
@pytest.mark.parametrize(("extra", "what"), [
    ({"do_predict": True}, "prediction run"),  # with predict_with_generate: inference (tests/test_lf_examples.py)
    ({"do_eval": True}, "evaluation-only run"),
    ({"do_train": False}, "do_train is false"),
    ({"export_dir": "models/merged"}, "export (merge) config"),
    ({"infer_backend": "huggingface", "template": "llama3"}, "inference config"),
    ({"task": "mmlu_test", "n_shot": 5}, "evaluation config"),
])
def test_configs_that_do_not_train_are_one_line_exit_2(extra, what, tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model_name_or_path": "llama-2-7b", **extra}))
    assert main(["estimate", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "not a training run" in err and what in err and err.count("\n") == 1


def test_a_config_that_trains_is_estimated_whatever_else_it_does():
    # preprocessing (tokenized_path) trains after saving in 0.9.5; do_train with do_predict trains first
    for extra in ({"tokenized_path": "saves/tok"}, {"do_predict": True, "predict_with_generate": True}):
        assert config_from_llamafactory({"model_name_or_path": "llama-2-7b", "do_train": True, **extra}).train
