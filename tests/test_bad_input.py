"""Bad input of every kind is one line on stderr and exit 2, never a traceback: model configs of the wrong type,
DeepSpeed JSONs and LLaMA-Factory YAMLs that are malformed, and values no front end may accept."""

import json

import pytest

from memplan.cli import main

LLAMA = dict(model_type="llama", hidden_size=256, intermediate_size=704, num_attention_heads=8,
             num_key_value_heads=4, num_hidden_layers=2, vocab_size=4096)


def _one_line(capsys, rc, needle):
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and err.count("\n") == 1 and "Traceback" not in err, err


@pytest.mark.parametrize("change,needle", [
    (dict(num_key_value_heads="4"), "num_key_value_heads must be a positive integer"),
    (dict(head_dim="abc"), "head_dim must be a positive integer"),
    (dict(head_dim=-32), "head_dim must be a positive integer"),
    (dict(sliding_window="big"), "sliding_window must be a positive integer"),
    (dict(hidden_size="abc"), "hidden_size must be a positive integer"),
    (dict(num_attention_heads=7), "not a multiple of num_attention_heads 7"),
    (dict(model_type="mixtral", num_local_experts="4", num_experts_per_tok=2), "num_local_experts"),
])
def test_model_config_of_the_wrong_type(change, needle, tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA, **change}))
    _one_line(capsys, main(["estimate", "--model", str(tmp_path / "config.json")]), needle)


@pytest.mark.parametrize("zero,needle", [
    ('"three"', "zero_optimization must be an object"),
    ('{"stage": 3, "offload_param": null}', None),
    ('{"stage": "auto"}', "stage must be 0, 1, 2 or 3"),
    ('{"stage": 4}', "stage must be 0, 1, 2 or 3"),
    ('{"stage": 3, "offload_optimizer": "cpu"}', "offload_optimizer must be an object"),
])
def test_deepspeed_json_faults(zero, needle, tmp_path, capsys):
    (tmp_path / "ds.json").write_text('{"zero_optimization": ' + zero + '}')
    (tmp_path / "train.yaml").write_text("model_name_or_path: llama-2-7b\nfinetuning_type: full\nbf16: true\n"
                                         f"deepspeed: {tmp_path / 'ds.json'}\n")
    rc = main(["estimate", "--config", str(tmp_path / "train.yaml"), "--gpus", "8"])
    if needle is None:  # null offload means none: estimated
        assert rc == 0
    else:
        _one_line(capsys, rc, needle)


@pytest.mark.parametrize("yaml_text,needle", [
    ("model_name_or_path: llama-2-7b\nlora_dropout: abc\n", "lora_dropout must be a number"),
    ("model_name_or_path: llama-2-7b\nlora_alpha: sixteen\n", "lora_alpha must be a positive integer"),
    (b"model_name_or_path: llama-2-7b\ncutoff_len: \xff\xfe\n", "not a UTF-8 text file"),
])
def test_llamafactory_yaml_faults(yaml_text, needle, tmp_path, capsys):
    path = tmp_path / "train.yaml"
    path.write_bytes(yaml_text if isinstance(yaml_text, bytes) else yaml_text.encode())
    _one_line(capsys, main(["estimate", "--config", str(path)]), needle)


def test_non_utf8_deepspeed_json(tmp_path, capsys):
    (tmp_path / "ds.json").write_bytes(b"\xff\xfe{}")
    (tmp_path / "train.yaml").write_text(f"model_name_or_path: llama-2-7b\ndeepspeed: {tmp_path / 'ds.json'}\n")
    _one_line(capsys, main(["estimate", "--config", str(tmp_path / "train.yaml")]), "not UTF-8 JSON")


@pytest.mark.parametrize("args,needle", [
    (["--lora-alpha", "-16"], "--lora-alpha must be a positive integer"),
    (["--lora-alpha", "sixteen"], "--lora-alpha 'sixteen' must be an integer"),
    (["--batch-size", "abc"], "--batch-size 'abc' must be an integer"),
    (["--lora-dropout", "x"], "--lora-dropout 'x' must be a number"),
])
def test_cli_values_of_the_wrong_type(args, needle, capsys):
    _one_line(capsys, main(["estimate", "--model", "llama-2-7b", *args]), needle)


@pytest.mark.parametrize("args,needle", [
    (["estimate", "--model", "llama-2-7b", "--gpu", ""], "--gpu is empty"),
    (["estimate", "--model", ""], "--model is empty"),
    (["fit", "--model", "llama-2-7b", "--gpu", "24GB", "--top", "-1"], "--top must be 0 or more"),
    (["fit", "--model", "llama-2-7b", "--gpu", "24GB", "--method", "full", "--export", "bogus", "-o", "x"],
     "--export 'bogus'"),
    (["probe", "--model", "llama-3.2-1b", "--timeout", "-1"], "--timeout must be a number of seconds above 0"),
    (["probe", "--model", "llama-3.2-1b", "--timeout", "nan"], "--timeout must be a number of seconds above 0"),
    (["probe", "--model", "llama-3.2-1b", "--method", "qlora"], "a QLoRA probe runs on CUDA"),
    (["tune", "--model", "llama-3.2-1b", "--device", "cpu", "--capacity", "1GB", "--timeout", "-5"],
     "--timeout must be a number of seconds above 0"),
])
def test_more_bad_input(args, needle, capsys):
    _one_line(capsys, main(args), needle)


def test_debug_keeps_the_exit_code(capsys):
    assert main(["--debug", "estimate", "--model", "nope"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_no_arguments_prints_help_without_an_empty_error(capsys):
    assert main([]) == 2
    out, err = capsys.readouterr()
    assert "Usage" in out + err and "memplan: error: \n" not in err


def test_a_huge_global_batch_answers_from_its_divisors(capsys):
    """The micro-batches are the global batch's divisors, found in O(sqrt n): 10^12 has 169, not 10^12 to scan."""
    assert main(["fit", "--model", "llama-2-7b", "--gpu", "24GB", "--global-batch", str(10**12), "--json"]) == 0
    ranked = json.loads(capsys.readouterr().out)["ranked"]
    assert ranked and all(10**12 % c["config"]["batch_size"] == 0 for c in ranked)
