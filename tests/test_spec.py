import json

import pytest

from memplan.errors import ConfigError, UnknownModel, UnsupportedModel
from memplan.spec.catalog import catalog_entries, resolve_model
from memplan.spec.hardware import resolve_gpu
from memplan.units import GIB, parse_size


def test_catalog_has_at_least_25_models():  # every entry's parameter count: tests/test_catalog.py
    assert len(catalog_entries()) >= 25


@pytest.mark.parametrize("name,count", [("llama-2-7b", 6_738_415_616), ("llama-3-8b", 8_030_261_248),
                                        ("mistral-7b-v0.1", 7_241_732_096), ("qwen2.5-7b", 7_615_616_512),
                                        ("meta-llama/Meta-Llama-3-8B", 8_030_261_248),
                                        ("LLAMA-3.1-8B", 8_030_261_248), ("phi-3-mini", 3_821_079_552),
                                        ("mixtral-8x7b", 46_702_792_704), ("gemma-2-9b", 9_241_705_984)])
def test_names_resolve(name, count):
    assert resolve_model(name).num_parameters == count


def test_local_folder_and_file(tmp_path):
    cfg = json.loads(next(e.path for e in catalog_entries() if "Llama-2-7b" in e.hf_id).read_text())
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert resolve_model(str(tmp_path)).num_parameters == 6_738_415_616
    assert resolve_model(str(tmp_path / "config.json")).num_parameters == 6_738_415_616


def test_bad_configs(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        resolve_model(str(tmp_path / "bad.json"))
    (tmp_path / "partial.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(ConfigError, match="missing num_hidden_layers"):
        resolve_model(str(tmp_path / "partial.json"))
    with pytest.raises(UnknownModel):
        resolve_model("no-such-model")
    with pytest.raises(UnknownModel):
        resolve_model(str(tmp_path))  # folder without config.json
    bloom = resolve_model("bloomz-7b1")  # known to transformers, not to the formulas
    assert not bloom.analytic
    with pytest.raises(UnsupportedModel, match="--exact"):
        from memplan.predict.estimator import estimate
        from memplan.spec.train import TrainConfig

        estimate(bloom, TrainConfig())


@pytest.mark.parametrize("text,expected", [("24GB", 24 * GIB), ("24GiB", 24 * GIB), ("24564MiB", 24564 * 2**20),
                                           ("80G", 80 * GIB)])
def test_gpu_sizes_are_nominal(text, expected):
    assert resolve_gpu(text).memory_bytes == expected


def test_gpu_names_and_errors():
    assert resolve_gpu("rtx4090").memory_bytes == 24564 * 2**20
    assert resolve_gpu("a100-80gb").memory_bytes == 80 * GIB
    assert not resolve_gpu("t4").bf16
    with pytest.raises(Exception, match="unknown GPU"):
        resolve_gpu("gtx9999")
    with pytest.raises(ConfigError):
        parse_size("-3GB")


def test_hub_id_outside_catalog_is_a_clear_error_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UnknownModel, match="pass its path with --model"):
        resolve_model("some-org/some-model-not-in-catalog")


@pytest.mark.integration
def test_a_cached_hub_repo_never_runs_its_code_unasked(tmp_path):
    """transformers asks its own y/N question for remote code (answered y here); memplan passes
    trust_remote_code=False, so the repository's configuration_*.py never runs without --trust-remote-code."""
    import json
    import subprocess
    import sys

    marker = tmp_path / "code-ran"
    snap = tmp_path / "hub" / "models--acme--remote" / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (tmp_path / "hub" / "models--acme--remote" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--remote" / "refs" / "main").write_text("a" * 40)
    (snap / "config.json").write_text(json.dumps({"model_type": "evil", "auto_map": {
        "AutoConfig": "configuration_evil.EvilConfig"}, "hidden_size": 64}))
    (snap / "configuration_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                                "from transformers import PretrainedConfig\n"
                                                "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n")
    env = {**__import__("os").environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1",
           "HF_MODULES_CACHE": str(tmp_path / "modules")}
    proc = subprocess.run([sys.executable, "-m", "memplan", "estimate", "--model", "acme/remote"], input="y\ny\n",
                          capture_output=True, text=True, env=env, timeout=120, check=False)
    assert not marker.exists()
    assert proc.returncode == 2 and "--trust-remote-code" in proc.stderr and proc.stderr.count("\n") == 1


def test_checkpoint_dtype_read_from_config_json() -> None:
    from memplan.spec.model import ModelSpec
    from memplan.testing.tiny import SMALL_LLAMA

    assert ModelSpec.from_config_dict({**SMALL_LLAMA, "torch_dtype": "bfloat16"}).checkpoint_dtype == "bfloat16"
    assert ModelSpec.from_config_dict({**SMALL_LLAMA, "dtype": "float16"}).checkpoint_dtype == "float16"
    assert ModelSpec.from_config_dict(dict(SMALL_LLAMA)).checkpoint_dtype is None
