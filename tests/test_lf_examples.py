"""LLaMA-Factory's own example configs (issue #16): what made some of them end in a refusal, each fixed where the
behaviour can be known from LLaMA-Factory's or a quantization library's source (benchmarks/llamafactory_examples.py
runs all of them)."""

from __future__ import annotations

import json

import pytest
import yaml

from memplan.errors import ConfigError
from memplan.formats.llamafactory import not_a_config, read_llamafactory
from memplan.spec.parallel import Sharding

BASE = {"model_name_or_path": "meta-llama/Meta-Llama-3-8B", "do_train": True, "finetuning_type": "lora"}


# ---- 1. a DeepSpeed JSON named relative to the LLaMA-Factory checkout ------------------------------------------
def test_deepspeed_path_relative_to_the_checkout_is_found_from_anywhere(tmp_path, monkeypatch):
    """examples/train_full/qwen3vl_full_sft.yaml names examples/deepspeed/ds_z3_config.json (relative to the checkout
    llamafactory-cli runs in): found from the YAML's folder's ancestors when the working directory is elsewhere."""
    checkout = tmp_path / "LLaMA-Factory"
    (checkout / "examples" / "deepspeed").mkdir(parents=True)
    (checkout / "examples" / "train_full").mkdir()
    (checkout / "examples" / "deepspeed" / "ds_z3_config.json").write_text(
        json.dumps({"zero_optimization": {"stage": 3}}))
    cfg = checkout / "examples" / "train_full" / "x.yaml"
    cfg.write_text(yaml.safe_dump({**BASE, "deepspeed": "examples/deepspeed/ds_z3_config.json"}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert read_llamafactory(cfg).train.sharding is Sharding.ZERO3


def test_missing_deepspeed_json_says_where_it_looked(tmp_path, monkeypatch):
    cfg = tmp_path / "x.yaml"
    cfg.write_text(yaml.safe_dump({**BASE, "deepspeed": "examples/deepspeed/none.json"}))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        read_llamafactory(cfg)
    msg = str(err.value)
    assert "none.json: no such file" in msg and "working directory" in msg and "each folder above it" in msg
    assert "\n" not in msg


# ---- 2. a YAML that is no training config --------------------------------------------------------------------
TOKENS = {"<|START_OF_SVG|>": "Marks the beginning of an SVG document", "<|end_of_g|>": "Ends a group element"}


def test_a_token_description_file_is_not_a_training_config(tmp_path):
    """examples/extras/multi_tokens/tokens_cfg.yaml: what new_special_tokens_config names, not a training YAML."""
    cfg = tmp_path / "tokens_cfg.yaml"
    cfg.write_text(yaml.safe_dump(TOKENS))
    with pytest.raises(ConfigError, match="not a LLaMA-Factory training config: none of its 2 keys") as err:
        read_llamafactory(cfg)
    assert "new_special_tokens_config" in str(err.value)
    assert not_a_config(BASE) is None and not_a_config({"stage": "sft"}) is None  # a config missing keys is one


def test_estimate_of_a_token_file_exits_2_in_one_line(tmp_path, capsys):
    from memplan.cli import main

    cfg = tmp_path / "tokens_cfg.yaml"
    cfg.write_text(yaml.safe_dump(TOKENS))
    rc = main(["estimate", "--config", str(cfg)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "not a LLaMA-Factory training config" in err, err
