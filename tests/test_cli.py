import json
import subprocess
import sys

import pytest

from memplan.cli import main


def run(capsys, *args):
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def test_estimate_json_schema(capsys):
    rc, out, _ = run(capsys, "estimate", "--model", "llama-2-7b", "--gpu", "24GB", "--json")
    data = json.loads(out)
    for key in ("weights", "gradients", "optimizer_states", "activations", "transient", "peak_allocated_bytes",
                "peak_reserved_bytes", "cuda_context_bytes", "total_bytes"):
        assert isinstance(data["memory"][key], int)
    assert data["model"] == {"name": "llama-2-7b-hf", "model_type": "llama", "parameters": 6738415616,
                             "trainable_parameters": data["model"]["trainable_parameters"]}
    assert data["fits"] is True and rc == 0
    assert data["config"]["method"] == "lora" and data["config"]["attn"] == "sdpa"


def test_estimate_table_and_explain(capsys):
    rc, out, _ = run(capsys, "estimate", "--model", "qwen2.5-7b", "--method", "full", "--explain")
    assert rc == 0 and "peak allocated" in out


@pytest.mark.parametrize("args,code", [
    (["fit", "--model", "llama-2-7b", "--gpu", "24GB"], 0),
    (["fit", "--model", "llama-2-7b", "--gpu", "24GB", "--method", "full"], 1),
    (["estimate", "--model", "llama-2-7b", "--method", "full", "--gpu", "24GB"], 1),
])
def test_exit_codes(capsys, args, code):
    assert run(capsys, *args)[0] == code


@pytest.mark.parametrize("args,needle", [
    (["estimate", "--model", "nope"], "unknown model"),
    (["estimate", "--model", "llama-2-7b", "--batch-size", "0"], "--batch-size"),
    (["estimate", "--model", "llama-2-7b", "--method", "full", "--lora-rank", "8"], "without LoRA"),
    (["estimate", "--model", "llama-2-7b", "--precision", "fp8"], "--precision"),
    (["estimate", "--model", "llama-2-7b", "--optimizer", "lion"], "--optimizer"),
    (["estimate", "--model", "llama-2-7b", "--attn", "xformers"], "--attn"),
    (["estimate", "--model", "llama-2-7b", "--method", "qlora", "--quant-bits", "3"], "--quant-bits"),
    (["estimate", "--model", "llama-2-7b", "--precision", "fp32", "--attn", "flash_attention_2"], "flash"),
    (["fit", "--model", "llama-2-7b", "--gpu", "lots"], "unknown GPU"),
    (["fit", "--model", "llama-2-7b", "--gpu", "t4", "--precision", "bf16"], "bf16"),
    (["fit", "--model", "llama-2-7b", "--gpu", "24GB", "--margin", "0.6"], "margin"),
    (["fit", "--model", "llama-2-7b", "--gpu", "24GB", "--gpus", "3"], "divisible"),
    (["fit", "--model", "llama-2-7b", "--gpu", "auto"], "--gpu auto"),
    (["estimate", "--model", "llama-2-7b", "--bogus"], "bogus"),
])
def test_bad_input_is_one_line_exit_2(capsys, args, needle):
    rc, _, err = run(capsys, *args)
    assert rc == 2
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err


def test_fit_json_ranked(capsys):
    rc, out, _ = run(capsys, "fit", "--model", "llama-3-8b", "--gpu", "a100-80gb", "--global-batch", "8",
                     "--lora-rank", "8,64", "--json")
    data = json.loads(out)
    assert rc == 0 and data["fits"] and data["ranked"]
    assert {c["config"]["lora_rank"] for c in data["ranked"]} == {8, 64}
    assert all(c["config"]["effective_batch"] == 8 for c in data["ranked"])


@pytest.mark.parametrize("args,needle", [
    (["--gpus", "0-4"], "--gpus '0-4': ranges start above 0"),
    (["--gpus", "0"], "--gpus '0': values are positive integers"),
    (["--lora-rank", "0-8"], "--lora-rank '0-8': ranges start above 0"),
    (["--lora-rank", "4-12"], "4-12 does not end on a power-of-two multiple of 4: use 4-16, or a list 4,8,12"),
    (["--lora-rank", "8-4"], "--lora-rank '8-4': a range runs from low to high"),
    (["--lora-rank", "-8"], "--lora-rank '-8': values are positive integers"),
    (["--lora-rank", "8,0"], "--lora-rank '8,0': values are positive integers"),
    (["--lora-rank", "4-13:4"], "4-13:4 does not end on 13"),
    (["--lora-rank", "1-100:1"], "expands to 100 values; at most 64"),
    (["--lora-rank", "8-2000000"], "values are at most 1000000"),
    (["--lora-rank", "8-x"], "--lora-rank '8-x': use a number"),
])
def test_bad_int_lists_are_one_line_exit_2(capsys, args, needle):
    rc, _, err = run(capsys, "fit", "--model", "llama-2-7b", "--gpu", "24GB", *args)
    assert rc == 2
    assert err.startswith("memplan: error: ") and needle in err and err.count("\n") == 1, err


@pytest.mark.parametrize("ranks,expected", [("8-64", {8, 16, 32, 64}), ("4-12:4", {4, 8, 12}),
                                            ("16", {16}), ("8,32", {8, 32})])
def test_rank_ranges_and_steps_expand(capsys, ranks, expected):
    rc, out, _ = run(capsys, "fit", "--model", "llama-3-8b", "--gpu", "a100-80gb", "--global-batch", "8",
                     "--lora-rank", ranks, "--json")
    assert rc == 0
    assert {c["config"]["lora_rank"] for c in json.loads(out)["ranked"]} == expected


def test_single_configuration_commands_take_one_rank(capsys):
    rc, _, err = run(capsys, "estimate", "--model", "llama-2-7b", "--lora-rank", "8-8")
    assert rc == 2 and "estimate takes one --lora-rank" in err and err.count("\n") == 1
    rc, out, _ = run(capsys, "estimate", "--model", "llama-2-7b", "--lora-rank", "16", "--json")
    assert rc == 0 and json.loads(out)["config"]["lora_rank"] == 16


def test_models_and_gpus(capsys):
    rc, out, _ = run(capsys, "models", "--json")
    assert rc == 0 and len(json.loads(out)["models"]) >= 25
    rc, out, _ = run(capsys, "gpus", "--json")
    assert rc == 0 and any(g["key"] == "rtx4090" for g in json.loads(out)["gpus"])


@pytest.mark.integration
def test_analytic_path_imports_no_torch():
    code = ("import sys; from memplan.cli import main; main(['fit','--model','llama-2-7b','--gpu','24GB','--json']);"
            "heavy=[m for m in ('torch','transformers','peft','optuna') if m in sys.modules]; "
            "sys.stderr.write('HEAVY=' + ','.join(heavy))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert "HEAVY=" in proc.stderr and proc.stderr.split("HEAVY=")[1].strip() == ""


@pytest.mark.integration
def test_python_dash_m(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "memplan", "estimate", "--model", "llama-2-7b", "--json"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and json.loads(proc.stdout)["model"]["parameters"] == 6738415616


def test_version_and_one_line_warnings(capsys, tmp_path):
    from importlib.metadata import version

    assert main(["--version"]) == 0 and capsys.readouterr().out.strip() == f"memplan {version('memplan')}"
    (tmp_path / "dup.yaml").write_text("model_name_or_path: llama-2-7b\ncutoff_len: 512\ncutoff_len: 1024\n")
    assert main(["estimate", "--config", str(tmp_path / "dup.yaml"), "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["config"]["seq_len"] == 1024 and "cutoff_len given more than once" in err
    assert main(["estimate", "--model", "llama-2-7b", "--seq-len", "8192", "--json"]) == 0
    assert "max_position_embeddings 4096" in capsys.readouterr().err
    assert main(["fit", "--model", "llama-2-7b", "--gpu", "24GB", "--gpus", "1,3,4", "--json"]) == 0
    out, err = capsys.readouterr()
    assert err.startswith("memplan: warning: --gpus 3 left out") and err.count("\n") == 1
    assert {c["config"]["gpus"] for c in json.loads(out)["ranked"]} <= {1, 4}


def test_models_search(capsys):
    assert main(["models", "--search", "qwen3", "--json"]) == 0
    names = [m["name"] for m in json.loads(capsys.readouterr().out)["models"]]
    assert names and all("qwen3" in n for n in names)
