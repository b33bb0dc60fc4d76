"""Probes on CPU: real steps in a child process, simulated capacity, failures contained, results cached."""

import json
import math
import sys
import warnings

import pytest

from memplan.cli import main
from memplan.probe import launch as launch_mod
from memplan.probe.launch import ProbeOptions, launch, probe
from memplan.probe.oom import classify_failure
from memplan.probe.result import ProbeResult, ProbeStatus
from memplan.spec.model import ModelSpec
from memplan.spec.train import Method, Precision, TrainConfig
from memplan.testing.tiny import SMALL_LLAMA as SMALL
from memplan.testing.truth import measure_cpu_peak

TRAIN = TrainConfig(method=Method.FULL, precision=Precision.FP32, checkpointing=False, batch_size=2, seq_len=128)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMPLAN_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def ok_result():
    return probe(ModelSpec.from_config_dict(dict(SMALL), name="small"), TRAIN, ProbeOptions(use_cache=False))


@pytest.mark.integration
def test_ok_probe_measures_the_exact_peak(ok_result):
    truth = measure_cpu_peak(ModelSpec.from_config_dict(dict(SMALL), name="small"), TRAIN)
    assert ok_result.status is ProbeStatus.OK
    assert ok_result.peak_allocated_bytes == truth.peak_bytes
    assert ok_result.tokens_per_s > 0 and ok_result.step_time_s > 0
    assert len(ok_result.losses) == 4 and all(math.isfinite(x) for x in ok_result.losses)


@pytest.mark.integration
def test_capacity_below_peak_is_oom(ok_result):
    spec = ModelSpec.from_config_dict(dict(SMALL), name="small")
    res = probe(spec, TRAIN, ProbeOptions(use_cache=False, capacity_bytes=ok_result.peak_allocated_bytes - 1))
    assert res.status is ProbeStatus.OOM and "simulated out of memory" in res.error


@pytest.mark.integration
def test_crashing_child_is_an_error_with_its_message():
    spec = ModelSpec.from_config_dict({**SMALL, "hidden_act": "no_such_activation"}, name="broken")
    res = probe(spec, TRAIN, ProbeOptions(use_cache=False))
    assert res.status is ProbeStatus.ERROR and "no_such_activation" in res.error


@pytest.mark.integration
def test_hung_child_times_out_and_parent_survives():
    res = launch({"device": "cpu"}, timeout_s=1.0, argv=[sys.executable, "-c", "import time; time.sleep(60)"])
    assert res.status is ProbeStatus.TIMEOUT


@pytest.mark.integration
def test_child_killed_without_result_is_classified():
    code = "import sys; sys.stderr.write('torch.OutOfMemoryError: CUDA out of memory. Tried to allocate\\n'); " \
           "sys.exit(1)"
    res = launch({"device": "cuda"}, timeout_s=30, argv=[sys.executable, "-c", code])
    assert res.status is ProbeStatus.OOM and "CUDA out of memory" in res.error


@pytest.mark.integration
def test_cache_returns_stored_result_without_running(monkeypatch):
    spec = ModelSpec.from_config_dict(dict(SMALL), name="small")
    first = probe(spec, TRAIN, ProbeOptions(steps=1))
    assert first.status is ProbeStatus.OK and not first.cached

    def no_run(*args, **kwargs):
        raise AssertionError("the probe ran although a cached result exists")

    monkeypatch.setattr(launch_mod, "launch", no_run)
    again = probe(spec, TRAIN, ProbeOptions(steps=1))
    assert again.cached and again.peak_allocated_bytes == first.peak_allocated_bytes
    with pytest.raises(AssertionError):
        probe(spec, TRAIN, ProbeOptions(steps=1, use_cache=False))


@pytest.mark.parametrize("code,text,status", [
    (0, "", ProbeStatus.OK),
    (1, "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", ProbeStatus.OOM),
    (1, "RuntimeError: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate(handle)", ProbeStatus.OOM),
    (1, "RuntimeError: HIP out of memory. Tried to allocate", ProbeStatus.OOM),
    (1, "KeyError: 'no_such_activation'", ProbeStatus.ERROR),
    (-9, "", ProbeStatus.ERROR),
])
def test_classify_failure(code, text, status):
    assert classify_failure(code, text) is status


@pytest.mark.parametrize("args", [["--device", "tpu"], ["--capacity", "lots"], ["--gpu", "24GB"],
                                  ["--steps", "0"]])
def test_probe_bad_input(capsys, args):
    assert main(["probe", "--model", "llama-2-7b", *args]) == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.integration
def test_probe_cli_json(capsys, tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(SMALL))
    rc = main(["probe", "--model", str(cfg), "--method", "full", "--precision", "fp32", "--no-checkpointing",
               "--batch-size", "2", "--seq-len", "128", "--steps", "1", "--capacity", "1MB", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert rc == 1 and data["probe"]["status"] == "oom"


@pytest.mark.integration
def test_gpu_validate_dry_run_lists_the_matrix(tmp_path):
    import subprocess

    proc = subprocess.run([sys.executable, "benchmarks/gpu_validate.py", str(tmp_path), "--dry-run"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    models = {line.split("'model': '")[1].split("'")[0] for line in proc.stdout.splitlines() if "'model'" in line}
    assert {"qwen2.5-0.5b", "mistral-7b-v0.1"} <= models
    assert (tmp_path / "gpu_validate.csv").is_file()


MEASURED = ProbeResult(status=ProbeStatus.OK, device="cpu", peak_allocated_bytes=1234, peak_reserved_bytes=1234,
                       step_time_s=0.5, tokens_per_s=100.0, losses=(1.0,))


@pytest.mark.parametrize("fault", ["cache dir is a file", "entry is a directory", "entry has wrong types",
                                   "entry has a negative peak", "entry is not JSON"])
def test_cache_faults_never_lose_the_measurement(fault, tmp_path, monkeypatch):
    """A broken cache is a miss (the probe runs) and a cache that cannot be written is a warning: the measurement
    that ran is returned either way."""
    from memplan.probe import cache

    spec = ModelSpec.from_config_dict(dict(SMALL), name="small")
    runs = []
    monkeypatch.setattr(launch_mod, "launch", lambda *a, **k: runs.append(1) or MEASURED)
    monkeypatch.setenv("MEMPLAN_CACHE_DIR", str(tmp_path / "cache"))
    key = cache.cache_key(launch_mod.request_for(spec, TRAIN, ProbeOptions(steps=1)), "cpu")
    entry = tmp_path / "cache" / f"{key}.json"
    if fault == "cache dir is a file":
        (tmp_path / "cache").write_text("not a folder")
    else:
        entry.parent.mkdir()
        if fault == "entry is a directory":
            entry.mkdir()
        else:
            bad = {"entry has wrong types": {**MEASURED.to_dict(), "peak_allocated_bytes": "lots"},
                   "entry has a negative peak": {**MEASURED.to_dict(), "peak_allocated_bytes": -5}}.get(fault)
            entry.write_text(json.dumps(bad) if bad else "{not json")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = probe(spec, TRAIN, ProbeOptions(steps=1))
    assert runs == [1] and res.status is ProbeStatus.OK and res.peak_allocated_bytes == 1234 and not res.cached
    unwritable = fault in ("cache dir is a file", "entry is a directory")
    assert any("probe cache" in str(w.message) for w in caught) == unwritable


TEARDOWN = "".join(f"[rank1]: W1201 teardown line {i}: destroying the process group\n" for i in range(450))


@pytest.mark.parametrize("code,text,status", [
    # the OOM ended rank 0, then 450 lines of multi-rank teardown: still an OOM
    (1, "Traceback (most recent call last):\n  File \"train.py\", line 3, in <module>\n    step()\n"
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n" + TEARDOWN, ProbeStatus.OOM),
    (1, "[rank0]: Traceback (most recent call last):\n[rank0]:   File \"t.py\", line 1, in <module>\n"
        "[rank0]: torch.OutOfMemoryError: CUDA out of memory.\n" + TEARDOWN, ProbeStatus.OOM),
    # a run that logged a handler's name and died of something else is not an OOM
    (1, "registered handler for torch.OutOfMemoryError\nTraceback (most recent call last):\n"
        "  File \"t.py\", line 9, in <module>\nFileNotFoundError: [Errno 2] No such file: 'data.json'\n",
     ProbeStatus.ERROR),
    # no traceback at all (a C++ abort): the signatures in the tail decide
    (-6, "terminate called after throwing an instance of 'c10::Error'\nCUDA out of memory\n", ProbeStatus.OOM),
])
def test_failures_are_classified_by_the_exception_that_ended_the_run(code, text, status):
    assert classify_failure(code, text) is status


@pytest.mark.integration
def test_probe_of_a_non_analytic_model_keeps_its_measurement(tmp_path, monkeypatch, capsys):
    """bloom is not in the formulas: the measurement is shown beside the exact mode's estimate, never thrown away."""
    monkeypatch.setenv("MEMPLAN_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "config.json").write_text(json.dumps(dict(
        model_type="bloom", hidden_size=128, n_head=4, n_layer=2, vocab_size=2048)))
    rc = main(["probe", "--model", str(tmp_path / "config.json"), "--method", "full", "--precision", "fp32",
               "--seq-len", "64", "--steps", "1", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert rc == 0 and data["probe"]["status"] == "ok" and data["probe"]["peak_allocated_bytes"] > 0
    assert data["estimate"]["peak_allocated_bytes"] > 0
