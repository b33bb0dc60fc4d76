"""The tuner end to end on CPU: real (in-process) probes of a small model against a simulated capacity."""

import sys

import pytest

from memplan.cli import main
from memplan.predict.estimator import estimate
from memplan.probe.inprocess import probe_in_process
from memplan.probe.launch import ProbeOptions
from memplan.spec.hardware import GPU
from memplan.spec.model import ModelSpec
from memplan.spec.space import SearchSpace
from memplan.spec.train import Method, Precision, TrainConfig
from memplan.testing.tiny import SMALL_LLAMA as SMALL
from memplan.tune.study import tune

SPEC = ModelSpec.from_config_dict(dict(SMALL), name="small")
BASE = TrainConfig(method=Method.FULL, precision=Precision.FP32, seq_len=128)
CKPT8 = BASE.with_(batch_size=8, checkpointing=True)
NO_CKPT8 = BASE.with_(batch_size=8, checkpointing=False)


def capacity_between(a: TrainConfig, b: TrainConfig) -> int:
    lo, hi = (estimate(SPEC, t, device="cpu").peak_allocated_bytes for t in (a, b))
    return (lo + hi) // 2


class Counting:
    """A real in-process probe against a simulated device of `capacity` bytes, counting its calls."""

    def __init__(self, capacity: int):
        self.capacity, self.calls = capacity, []

    def __call__(self, train: TrainConfig):
        self.calls.append(train)
        return probe_in_process(SPEC, train, ProbeOptions(steps=1, warmup=1, capacity_bytes=self.capacity))


def run(tmp_path, evaluator, usable, n_probes=3, name="study.db"):
    return tune(SPEC, BASE, GPU(name="sim", memory_bytes=usable), evaluator,
                space=SearchSpace(global_batch=8, precisions=(Precision.FP32,)), usable_bytes=usable,
                device="cpu", storage=f"sqlite:///{tmp_path / name}", n_probes=n_probes)


def test_capacity_forces_checkpointing_or_smaller_micro_batch(tmp_path):
    fastest = BASE.with_(batch_size=8, grad_accum=1, checkpointing=False)
    cap = capacity_between(BASE.with_(batch_size=8, checkpointing=True), fastest)
    ev = Counting(cap)
    res = run(tmp_path, ev, cap)
    assert res.best is not None and res.best.feasible and res.best.peak_bytes <= cap
    assert res.best.train != fastest
    assert all(t.batch_size * t.grad_accum == 8 for t in ev.calls)  # effective batch never changed
    assert fastest not in ev.calls  # predicted over capacity: recorded, never probed
    assert any(r.train == fastest and r.source == "predicted-infeasible" for r in res.trials)
    assert len(ev.calls) <= 3 and res.probes == len(ev.calls)


def test_refused_candidates_are_never_probed_or_recorded(tmp_path):
    """`accept` (the CLI passes LLaMA-Factory's refusal rules for a YAML or a llamafactory export) filters the
    search before the study sees it; a search with nothing left is one line."""
    from memplan.errors import ConfigError

    ev = Counting(10**12)
    res = tune(SPEC, BASE, GPU(name="sim", memory_bytes=10**12), ev,
               space=SearchSpace(global_batch=8, precisions=(Precision.FP32,)), usable_bytes=10**12, device="cpu",
               storage=f"sqlite:///{tmp_path / 'a.db'}", n_probes=2, accept=lambda t: t.checkpointing)
    assert ev.calls and all(t.checkpointing for t in ev.calls)
    assert all(r.train.checkpointing for r in res.trials)
    with pytest.raises(ConfigError, match="refuses to launch"):
        tune(SPEC, BASE, GPU(name="sim", memory_bytes=10**12), ev, space=SearchSpace(global_batch=8),
             usable_bytes=10**12, device="cpu", storage=f"sqlite:///{tmp_path / 'b.db'}", accept=lambda t: False)


def test_oom_is_a_complete_trial_and_larger_batches_are_skipped(tmp_path):
    import optuna

    # the device really has less memory than the study was told (another process holds some)
    told = capacity_between(CKPT8, NO_CKPT8)
    real = int(estimate(SPEC, BASE.with_(batch_size=4, grad_accum=2, checkpointing=True),
                        device="cpu").peak_allocated_bytes * 1.02)
    ev = Counting(real)
    res = run(tmp_path, ev, told, n_probes=4)
    ooms = [r for r in res.trials if r.source == "probe" and r.status == "oom"]
    assert ooms and res.best is not None and res.best.peak_bytes < real
    study = optuna.load_study(study_name=res.study_name, storage=res.storage)
    assert all(t.state.name == "COMPLETE" for t in study.trials)
    for oom in ooms:  # nothing larger with the same other knobs was probed after it
        later = [t for t in ev.calls[ev.calls.index(oom.train) + 1:]
                 if t.checkpointing == oom.train.checkpointing and t.batch_size > oom.train.batch_size]
        assert not later


def test_interrupted_study_resumes_without_repeating_probes(tmp_path, monkeypatch):
    # resumption is under test, not speed pruning: the tiny model is host-bound in the speed model, so every other
    # candidate is predicted over 20 % slower than the first probe and would be pruned rather than probed
    monkeypatch.setattr(sys.modules[tune.__module__], "SPEED_PRUNE", 0.0)
    cap = capacity_between(CKPT8, NO_CKPT8)
    first = Counting(cap)
    r1 = run(tmp_path, first, cap, n_probes=1, name="resume.db")
    second = Counting(cap)
    r2 = run(tmp_path, second, cap, n_probes=2, name="resume.db")
    assert r1.study_name == r2.study_name and len(first.calls) == 1 and len(second.calls) == 1
    assert second.calls[0] != first.calls[0]
    assert r2.probes == 2 and "memory_ratio" in r2.calibration


@pytest.mark.parametrize("args,needle", [
    (["tune", "--model", "llama-2-7b", "--device", "cpu"], "--capacity"),
    (["tune", "--model", "llama-2-7b", "--device", "tpu"], "--device"),
    (["fit", "--probe", "--model", "llama-2-7b", "--device", "cpu", "--capacity", "1GB", "--n-probes", "0"],
     "--n-probes"),
])
def test_tune_bad_input(capsys, args, needle):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1


@pytest.mark.integration
def test_tune_cli_confirms_and_exports_the_winner(tmp_path, capsys, monkeypatch):
    import json

    monkeypatch.setenv("MEMPLAN_CACHE_DIR", str(tmp_path / "cache"))
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(SMALL))
    out = tmp_path / "winner.json"
    cap = capacity_between(CKPT8, NO_CKPT8)
    rc = main(["tune", "--model", str(cfg), "--method", "full", "--precision", "fp32", "--seq-len", "128",
               "--global-batch", "8", "--device", "cpu", "--capacity", f"{cap}B", "--margin", "0",
               "--n-probes", "1", "--steps", "1", "--storage", f"sqlite:///{tmp_path / 's.db'}",
               "--export", "json", "-o", str(out), "--json"])
    data = json.loads(capsys.readouterr().out)
    assert rc == 0 and data["confirmed_by_probe"] and data["probes"] == 1
    plan = json.loads(out.read_text())["config"]
    assert plan["batch_size"] * plan["grad_accum"] == 8 and plan["batch_size"] == data["best"]["config"]["batch_size"]


def test_an_interrupted_or_dead_workers_configuration_is_measured_on_resume(tmp_path):
    """The probe running when a tune is interrupted (Ctrl-C / SIGTERM) or its worker dies (its trial left RUNNING
    in sqlite, which has no heartbeat) is measured when the study resumes. The first probe is the analytic
    ranking's best, the configuration an uninterrupted study measures first."""
    import socket

    import optuna

    from memplan.fit import search_space
    from memplan.tune.study import _distributions, _params

    cap = capacity_between(CKPT8, NO_CKPT8)

    class Interrupted(Counting):
        def __call__(self, train):
            self.calls.append(train)
            raise KeyboardInterrupt

    cut = Interrupted(cap)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, cut, cap, n_probes=3, name="cut.db")
    again = Counting(cap)
    resumed = run(tmp_path, again, cap, n_probes=3, name="cut.db")
    assert cut.calls[0] in again.calls
    assert any(r.train == cut.calls[0] and r.status.value == "ok" for r in resumed.trials)

    # a worker killed mid-probe: its trial stays RUNNING under a pid that no longer exists
    first = run(tmp_path, Counting(cap), cap, n_probes=1, name="dead.db")
    measured = {r.train for r in first.trials}
    target = next(t for b in (4, 2, 1) for c in (False, True)
                  if (t := BASE.with_(batch_size=b, grad_accum=8 // b, checkpointing=c)) not in measured)
    study = optuna.load_study(study_name=first.study_name, storage=f"sqlite:///{tmp_path / 'dead.db'}")
    study.enqueue_trial(_params(target))
    space = search_space(BASE, GPU(name="sim", memory_bytes=cap), SearchSpace(global_batch=8,
                                                                            precisions=(Precision.FP32,)))
    dead = study.ask(_distributions(optuna, space))
    dead.set_user_attr("worker", f"{socket.gethostname()}:{2**22 + 12345}")
    later = Counting(cap)
    run(tmp_path, later, cap, n_probes=4, name="dead.db")
    assert target in later.calls


@pytest.mark.parametrize("storage,needle", [
    ("garbage://x", "NoSuchModuleError"),
    ("{tmp}/plain.db", "is not a database URL"),
    ("sqlite:///{tmp}/missing/dir/x.db", "unable to open database file"),
    ("sqlite:///{tmp}/corrupt.db", "file is not a database"),
    ("postgresql://nobody@127.0.0.1:1/db", "Connection refused"),
    ("sqlite:///file:{tmp}/made.db?mode=ro&uri=true", "attempt to write a readonly database"),
    ("sqlite:///{tmp}/made.db?timeout=0.05", "database is locked"),
])
def test_storage_faults_are_one_line_exit_2(storage, needle, tmp_path, capsys):
    import sqlite3

    (tmp_path / "corrupt.db").write_text("not sqlite at all")
    (tmp_path / "config.json").write_text(__import__("json").dumps(SMALL))
    args = ["tune", "--model", str(tmp_path / "config.json"), "--device", "cpu", "--capacity", "1GB", "--method",
            "full", "--seq-len", "64", "--n-probes", "1", "--storage"]
    lock = None
    if "made.db" in storage:  # a real study first, then opened read-only, or locked by another writer
        import optuna

        optuna.create_study(storage=f"sqlite:///{tmp_path / 'made.db'}")
        if "locked" in needle:
            lock = sqlite3.connect(tmp_path / "made.db", isolation_level=None)
            lock.execute("BEGIN EXCLUSIVE")
    try:
        rc = main([*args, storage.format(tmp=tmp_path)])
    finally:
        if lock is not None:
            lock.execute("ROLLBACK")
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and err.count("\n") == 1 and "Traceback" not in err, err


@pytest.mark.integration
def test_two_workers_start_together_on_a_new_sqlite_study_within_the_budget(tmp_path):
    """Both create Optuna's schema at once (the race is retried), share the study, and probe 3 for --n-probes 3."""
    import json
    import os
    import subprocess
    import sys

    import optuna

    (tmp_path / "config.json").write_text(json.dumps(SMALL))
    cap = capacity_between(CKPT8, NO_CKPT8)
    storage = f"sqlite:///{tmp_path / 'new.db'}"
    cmd = [sys.executable, "-m", "memplan", "tune", "--model", str(tmp_path / "config.json"), "--method", "full",
           "--precision", "fp32", "--seq-len", "128", "--global-batch", "8", "--device", "cpu", "--capacity",
           f"{cap}B", "--margin", "0", "--n-probes", "3", "--steps", "1", "--storage", storage, "--json"]
    env = {**os.environ, "MEMPLAN_CACHE_DIR": str(tmp_path / "cache")}
    workers = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
               for _ in range(2)]
    outs = [w.communicate(timeout=600) for w in workers]
    assert all(w.returncode in (0, 1) for w in workers), [o[1][-2000:] for o in outs]
    name = json.loads(outs[0][0])["study"]
    probes = [t for t in optuna.load_study(study_name=name, storage=storage).trials
              if t.user_attrs.get("source") == "probe"]
    assert len(probes) <= 3 and len({json.dumps(t.params, sort_keys=True) for t in probes}) == len(probes)


@pytest.mark.integration
def test_fit_probe_takes_a_config_and_a_gpu_list(tmp_path, capsys, monkeypatch):
    """`fit --probe` is a real command: --config pins the YAML's knobs and keeps its effective batch, and
    --gpus 1,2 probes candidates on one and on two real ranks (torchrun) in one study."""
    import json

    monkeypatch.setenv("MEMPLAN_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "config.json").write_text(json.dumps(SMALL))
    (tmp_path / "train.yaml").write_text(f"model_name_or_path: {tmp_path / 'config.json'}\nfinetuning_type: full\n"
                                         "cutoff_len: 64\nper_device_train_batch_size: 2\n"
                                         "gradient_accumulation_steps: 2\n")
    assert main(["fit", "--probe", "--config", str(tmp_path / "train.yaml"), "--device", "cpu", "--capacity", "1GB",
                 "--n-probes", "1", "--storage", f"sqlite:///{tmp_path / 'a.db'}", "--json"]) == 0
    best = json.loads(capsys.readouterr().out)["best"]["config"]
    assert best["effective_batch"] == 4 and best["precision"] == "fp32" and best["method"] == "full"
    assert main(["fit", "--probe", "--model", str(tmp_path / "config.json"), "--device", "cpu", "--capacity", "1GB",
                 "--gpus", "1,2", "--method", "full", "--precision", "fp32", "--seq-len", "64", "--global-batch",
                 "4", "--n-probes", "4", "--storage", f"sqlite:///{tmp_path / 'b.db'}", "--json"]) == 0
    trials = json.loads(capsys.readouterr().out)["trials"]
    probed = {t["config"]["gpus"] for t in trials if t["source"] == "probe" and t["status"] == "ok"}
    assert probed == {1, 2} and all(t["config"]["effective_batch"] == 4 for t in trials)
