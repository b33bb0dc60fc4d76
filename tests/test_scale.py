"""Scale out: per-rank memory under DDP / ZeRO / FSDP (checked against DeepSpeed's own estimators), `fit --gpus`,
and one Optuna study shared by two worker processes on a real PostgreSQL server."""

import json
import os
import subprocess
import sys
import uuid

import pytest

from memplan.cli import main
from memplan.errors import ConfigError
from memplan.predict.estimator import estimate
from memplan.predict.layout import Layout
from memplan.predict.sharding import largest_unit_params, model_state_bytes
from memplan.predict.weights import model_states
from memplan.spec.catalog import resolve_model
from memplan.spec.train import Method, Offload, Precision, Sharding, TrainConfig
from memplan.testing.tiny import SMALL_LLAMA as SMALL

SIZES = [("llama-2-7b", 8, 1), ("llama-2-13b", 16, 2), ("llama-2-70b", 64, 8), ("qwen2.5-7b", 4, 1)]


@pytest.mark.parametrize(("model", "gpus", "nodes"), SIZES)
@pytest.mark.parametrize("offload", [Offload.NONE, Offload.OPTIMIZER])
def test_zero2_model_states_equal_deepspeed(model, gpus, nodes, offload):
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    spec = resolve_model(model)
    lay = Layout.of(spec, TrainConfig().with_(method=Method.FULL, precision=Precision.BF16, gpus=gpus, nodes=nodes,
                                      sharding=Sharding.ZERO2, offload=offload))
    gpu, _ = model_state_bytes(lay, model_states(lay))
    _, ds_gpu = estimate_zero2_model_states_mem_needs(spec.num_parameters, gpus // nodes, nodes,
                                                      offload is not Offload.NONE, 1.5)
    assert abs(gpu / ds_gpu - 1) < 1e-6  # equal up to the rotary buffers memplan also counts


@pytest.mark.parametrize(("model", "gpus", "nodes"), SIZES)
@pytest.mark.parametrize("offload", [Offload.NONE, Offload.OPTIMIZER, Offload.PARAMS])
def test_zero3_model_states_equal_deepspeed(model, gpus, nodes, offload):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    spec = resolve_model(model)
    lay = Layout.of(spec, TrainConfig().with_(method=Method.FULL, precision=Precision.BF16, gpus=gpus, nodes=nodes,
                                      sharding=Sharding.ZERO3, offload=offload))
    gpu, host = model_state_bytes(lay, model_states(lay))
    ds_cpu, ds_gpu, _ = estimate_zero3_model_states_mem_needs(
        spec.num_parameters, largest_unit_params(lay), gpus // nodes, nodes, offload is not Offload.NONE,
        offload is Offload.PARAMS, True, 1.5)
    assert abs(gpu / ds_gpu - 1) < 1e-6
    if offload is not Offload.NONE:  # host: DeepSpeed's zero.Init formula without its 1.5 buffer factor
        assert abs(host / (ds_cpu / 1.5) - 1) < 1e-6


@pytest.mark.parametrize("sharding", [Sharding.ZERO1, Sharding.ZERO2, Sharding.ZERO3, Sharding.FULL_SHARD])
def test_memory_per_rank_falls_with_more_gpus(sharding):
    spec = resolve_model("llama-2-13b")
    peaks = [estimate(spec, TrainConfig().with_(method=Method.FULL, gpus=n, sharding=sharding)).peak_allocated_bytes
             for n in (1, 2, 4, 8, 16)]
    assert peaks == sorted(peaks, reverse=True) and peaks[-1] < peaks[0]


def test_stages_and_engines_order_as_expected():
    spec = resolve_model("llama-2-7b")

    def peak(**kw):
        return estimate(spec, TrainConfig().with_(method=Method.FULL, gpus=8, **kw)).peak_allocated_bytes

    ddp, z1, z2, z3 = peak(), peak(sharding=Sharding.ZERO1), peak(sharding=Sharding.ZERO2), \
        peak(sharding=Sharding.ZERO3)
    assert ddp > z1 >= z2 > z3  # DeepSpeed 0.19's ZeRO-1 reduces into partitions like ZeRO-2 (measured) ...
    assert peak(sharding=Sharding.ZERO1, grad_accum=4) > peak(sharding=Sharding.ZERO2, grad_accum=4)  # ... unless
    assert peak(sharding=Sharding.ZERO3, offload=Offload.PARAMS) < peak(sharding=Sharding.ZERO3,
                                                                          offload=Offload.OPTIMIZER) < z3
    assert peak(sharding=Sharding.FULL_SHARD) < peak(sharding=Sharding.SHARD_GRAD_OP)
    # hybrid_shard shards inside a node only: 16 GPUs on 2 nodes hold what full_shard over 8 holds
    hybrid = estimate(spec, TrainConfig().with_(method=Method.FULL, gpus=16, nodes=2, sharding=Sharding.HYBRID_SHARD))
    full8 = estimate(spec, TrainConfig().with_(method=Method.FULL, gpus=8, sharding=Sharding.FULL_SHARD))
    assert hybrid.peak_allocated_bytes == full8.peak_allocated_bytes
    # DDP on several GPUs adds its gradient buckets to a single GPU's memory
    assert ddp > estimate(spec, TrainConfig(method=Method.FULL)).peak_allocated_bytes


@pytest.mark.parametrize(("kw", "message"), [
    (dict(sharding=Sharding.ZERO2, offload=Offload.PARAMS), "--offload params needs sharded parameters"),
    (dict(offload=Offload.OPTIMIZER), "--offload needs ZeRO"),
    (dict(gpus=6, nodes=4), "not a multiple of --nodes"),
])
def test_impossible_sharding_combinations(kw, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig().with_(**kw)


def test_estimate_and_fit_cli(capsys):
    assert main(["estimate", "--model", "llama-2-7b", "--method", "full", "--gpus", "8", "--zero", "3",
                 "--offload", "optimizer", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["config"]["sharding"] == "zero3" and out["memory"]["host_bytes"] > 0 and out["memory"]["sharding"]
    assert main(["estimate", "--model", "llama-2-7b", "--zero", "3", "--fsdp", "full_shard"]) == 2
    assert "two engines" in capsys.readouterr().err
    assert main(["estimate", "--model", "llama-2-7b", "--gpus", "8", "--zero", "3", "--exact"]) == 2
    assert "per-rank memory under DDP / ZeRO / offload is analytic" in capsys.readouterr().err
    assert main(["fit", "--model", "llama-2-13b", "--method", "full", "--gpu", "80GB", "--gpus", "1,2,4,8",
                 "--global-batch", "32", "--json"]) == 0
    fit = json.loads(capsys.readouterr().out)
    # 13B full fine-tuning does not fit one 80 GB card (the last line: exit 1); more ranks hold it with its band
    assert fit["fewest_gpus"]["config"]["gpus"] >= 2 and fit["fewest_gpus"]["verdict"] == "fits"
    assert fit["config"]["gpus"] * fit["config"]["batch_size"] * fit["config"]["grad_accum"] == 32
    assert main(["fit", "--model", "llama-2-13b", "--method", "full", "--gpu", "80GB", "--gpus", "1"]) == 1


@pytest.mark.parametrize(("kw", "tolerance"), [
    (dict(method=Method.FULL, precision=Precision.FP32, checkpointing=False), 0.005),
    (dict(method=Method.FULL, precision=Precision.BF16, checkpointing=True), 0.04),
    (dict(method=Method.LORA, precision=Precision.BF16, checkpointing=True), 0.01),
    (dict(method=Method.LORA, precision=Precision.BF16, checkpointing=False), 0.06),
])
@pytest.mark.parametrize("sharding", [Sharding.FULL_SHARD, Sharding.SHARD_GRAD_OP])
def test_exact_mode_traces_fsdp_under_a_fake_process_group(kw, tolerance, sharding):
    """FSDP2 fully_shard on fake tensors with torch's fake process group: the rank holds its shards (not the full
    model: the tracker counts DTensor local shards and FSDP's storage resizes), and the analytic FSDP terms agree
    (they overestimate LoRA without checkpointing by up to 6 %)."""
    from memplan.testing.tiny import tiny_spec
    from memplan.trace.exact import exact_estimate

    spec = tiny_spec("llama")
    one = TrainConfig().with_(batch_size=2, seq_len=128, **kw)
    two = one.with_(gpus=2, sharding=sharding, fsdp_version=2)
    exact_one, exact_two = exact_estimate(spec, one, device="cpu"), exact_estimate(spec, two, device="cpu")
    assert exact_two.term("weights") < 0.6 * exact_one.term("weights")  # shards, plus buffers
    if kw["method"] is Method.FULL:  # (for LoRA on a tiny model the gathered root can cost more than it saves)
        assert exact_two.peak_allocated_bytes < exact_one.peak_allocated_bytes
    analytic = estimate(spec, two, device="cpu").peak_allocated_bytes
    assert -0.01 <= analytic / exact_two.peak_allocated_bytes - 1 <= tolerance


@pytest.mark.integration
def test_probe_under_torchrun_reports_every_rank(tmp_path, monkeypatch, capsys):
    """Two DDP ranks on CPU (gloo): each rank's peak equals the per-rank estimate (DDP's buckets included); a
    simulated device that holds one GPU's step but not a DDP rank's is an OOM, reported, never a hang."""
    from memplan.probe.launch import ProbeOptions, probe
    from memplan.testing.tiny import tiny_spec

    monkeypatch.setenv("MEMPLAN_CACHE_DIR", str(tmp_path))
    spec = tiny_spec("llama")
    train = TrainConfig().with_(method=Method.FULL, precision=Precision.FP32, batch_size=2, seq_len=128,
                        checkpointing=False, gpus=2)
    res = probe(spec, train, ProbeOptions(steps=1, warmup=1, timeout_s=300))
    predicted = estimate(spec, train, device="cpu").peak_allocated_bytes
    assert res.status.value == "ok" and len(res.rank_peak_bytes) == 2
    assert res.peak_allocated_bytes == max(res.rank_peak_bytes)
    assert all(abs(p / predicted - 1) < 0.005 for p in res.rank_peak_bytes)
    single = estimate(spec, train.with_(gpus=1), device="cpu").peak_allocated_bytes
    assert single < predicted  # the buckets are real
    from memplan.testing.tiny import TINY_CONFIGS

    (tmp_path / "config.json").write_text(json.dumps(TINY_CONFIGS["llama"]))
    assert main(["probe", "--model", str(tmp_path / "config.json"), "--method", "full", "--precision", "fp32",
                 "--batch-size", "2", "--seq-len", "128", "--no-checkpointing", "--gpus", "2", "--steps", "1",
                 "--capacity", f"{(single + predicted) // 2}B", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["probe"]["status"] == "oom"


SHARDED_PROBES = [  # (tiny model, config, sharding, analytic tolerance vs the real ranks)
    ("llama", dict(method=Method.FULL, precision=Precision.BF16, checkpointing=False), Sharding.ZERO2, 0.005),
    ("llama", dict(method=Method.FULL, precision=Precision.BF16, checkpointing=False, grad_accum=2), Sharding.ZERO1,
     0.005),
    ("llama", dict(method=Method.FULL, precision=Precision.FP32, checkpointing=False), Sharding.ZERO3, 0.005),
    ("llama", dict(method=Method.LORA, precision=Precision.BF16, checkpointing=True), Sharding.ZERO3, 0.02),
    ("llama", dict(method=Method.FULL, precision=Precision.FP32, checkpointing=False), Sharding.FULL_SHARD, 0.005),
    ("qwen2", dict(method=Method.FULL, precision=Precision.BF16, checkpointing=True), Sharding.SHARD_GRAD_OP, 0.04),
]  # the analytic FSDP terms overestimate small models by up to a few % (benchmarks/results/fsdp.md)


@pytest.mark.parametrize(("arch", "kw", "sharding", "tolerance"), SHARDED_PROBES,
                         ids=[f"{a}-{k['method'].value}-{k['precision'].value}-{s.value}"
                              for a, k, s, _ in SHARDED_PROBES])
@pytest.mark.integration
def test_sharded_probe_on_real_ranks_matches_the_estimate(tmp_path, monkeypatch, arch, kw, sharding, tolerance):
    """DeepSpeed ZeRO (its cpu accelerator, gloo) and FSDP2 on two real ranks: the measured peak is the per-rank
    estimate (DeepSpeed's ipg buffer, fp32 partition and ZeRO-3's gathered parameters included); under FSDP it is
    also the exact mode's fake-process-group trace."""
    from memplan.probe.launch import ProbeOptions, probe
    from memplan.testing.tiny import tiny_spec
    from memplan.trace.exact import exact_estimate

    monkeypatch.setenv("MEMPLAN_CACHE_DIR", str(tmp_path))
    spec = tiny_spec(arch)
    train = TrainConfig().with_(batch_size=2, seq_len=128, gpus=2, sharding=sharding, fsdp_version=2, **kw)
    res = probe(spec, train, ProbeOptions(steps=1, warmup=1, timeout_s=300))
    assert res.status.value == "ok", res.error
    assert len(res.rank_peak_bytes) == 2 and res.peak_allocated_bytes == max(res.rank_peak_bytes)
    # gloo's reduce-scatter clone can still be alive at one rank's peak (timing; NCCL makes none): take the
    # lower rank, which the estimate and the trace model
    measured = min(res.rank_peak_bytes)
    analytic = estimate(spec, train, device="cpu").peak_allocated_bytes
    assert abs(analytic / measured - 1) <= tolerance, (analytic, res.rank_peak_bytes)
    if not sharding.is_deepspeed:
        assert abs(exact_estimate(spec, train, device="cpu").peak_allocated_bytes / measured - 1) <= 1e-4


def test_deepspeed_buckets_follow_the_json(tmp_path):
    """A DeepSpeed JSON's reduce_bucket_size is read (a number, or "auto" = HF Trainer's hidden_size^2; absent =
    DeepSpeed's 5e8 default), and the ipg buffer it sizes is in the per-rank estimate."""
    from memplan.formats.deepspeed import read_deepspeed

    spec = resolve_model("llama-2-7b")
    sizes = {}
    for name, zero in (("auto", {"stage": 2, "reduce_bucket_size": "auto"}), ("absent", {"stage": 2}),
                       ("number", {"stage": 2, "reduce_bucket_size": 2e8})):
        (tmp_path / f"{name}.json").write_text(json.dumps({"zero_optimization": zero}))
        fields = read_deepspeed(f"{name}.json", tmp_path)
        sizes[name] = estimate(spec, TrainConfig().with_(method=Method.LORA, gpus=8, **fields)).peak_allocated_bytes
        assert fields.get("ds_reduce_bucket") == {"auto": None, "absent": 500_000_000, "number": 200_000_000}[name]
    assert sizes["absent"] - sizes["auto"] == 2 * (500_000_000 - 4096 * 4096)  # bf16 buffer, backward peak
    (tmp_path / "bad.json").write_text(json.dumps({"zero_optimization": {"stage": 3, "reduce_bucket_size": "x"}}))
    with pytest.raises(ConfigError, match="reduce_bucket_size must be a number or auto"):
        read_deepspeed("bad.json", tmp_path)


def test_unprobeable_layouts_are_refused_in_one_line(capsys):
    assert main(["probe", "--model", "llama-3.2-1b", "--gpus", "2", "--zero", "2", "--offload", "optimizer"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--device cuda" in err
    assert main(["probe", "--model", "llama-3.2-1b", "--gpus", "2", "--fsdp", "no_shard"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "probe it as DDP" in err


@pytest.mark.integration
def test_tune_probes_every_candidate_on_two_ranks(tmp_path, capsys):
    model = tmp_path / "config.json"
    model.write_text(json.dumps(SMALL))
    rc = main(["tune", "--model", str(model), "--method", "full", "--precision", "fp32", "--seq-len", "64",
               "--global-batch", "4", "--gpus", "2", "--device", "cpu", "--capacity", "1GB", "--n-probes", "1",
               "--steps", "1", "--no-checkpointing", "--storage", f"sqlite:///{tmp_path / 's.db'}", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["best"]["config"]["gpus"] == 2
    best = out["best"]["config"]
    assert best["batch_size"] * best["grad_accum"] * 2 == 4  # the effective batch counts both ranks


# --- one study, two workers, PostgreSQL ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def postgres_url(tmp_path_factory):
    """A database on the PostgreSQL server .ci/run started ($MEMPLAN_TEST_POSTGRES_URL), or on one started
    here with pgserver (PostgreSQL binaries from pip)."""
    url = os.environ.get("MEMPLAN_TEST_POSTGRES_URL")
    server = None
    if not url:
        pgserver = pytest.importorskip("pgserver")
        server = pgserver.get_server(str(tmp_path_factory.mktemp("pg")), cleanup_mode="stop")
        url = server.get_uri()
    import psycopg

    db = f"memplan_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(url.replace("postgresql://", "postgresql://", 1), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {db}")
    head, _, query = url.partition("?")
    yield f"{head.rsplit('/', 1)[0]}/{db}" + (f"?{query}" if query else "")
    del server


@pytest.mark.integration
def test_two_workers_share_one_postgresql_study(postgres_url, tmp_path):
    import optuna

    model = tmp_path / "config.json"
    model.write_text(json.dumps(SMALL))
    spec = resolve_model(str(model))
    base = TrainConfig(method=Method.FULL, precision=Precision.FP32, seq_len=128, grad_accum=1)
    lo, hi = (estimate(spec, base.with_(batch_size=8, checkpointing=c), device="cpu").peak_allocated_bytes
              for c in (True, False))
    capacity = (lo + hi) // 2  # micro-batch 8 fits with checkpointing only
    cmd = [sys.executable, "-m", "memplan", "tune", "--model", str(model), "--method", "full", "--precision",
           "fp32", "--seq-len", "128", "--global-batch", "8", "--device", "cpu", "--capacity", f"{capacity}B",
           "--margin", "0", "--n-probes", "4", "--steps", "1", "--storage", postgres_url, "--json"]
    env = {**os.environ, "MEMPLAN_CACHE_DIR": str(tmp_path / "cache")}  # no shared probe cache: real probes
    workers = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
               for _ in range(2)]
    outs = [w.communicate(timeout=600) for w in workers]
    assert all(w.returncode == 0 for w in workers), [o[1][-2000:] for o in outs]
    results = [json.loads(o[0]) for o in outs]
    names = {r["study"] for r in results}
    assert len(names) == 1  # both workers joined the same study
    study = optuna.load_study(study_name=names.pop(), storage=postgres_url)
    probes = [t for t in study.trials if t.user_attrs.get("source") == "probe"]
    keys = [json.dumps(t.params, sort_keys=True) for t in probes]
    assert len(keys) == len(set(keys))  # no configuration probed twice
    assert len(probes) <= 4 + 1  # the study's budget (one in-flight probe may finish after it is reached)
    assert len({t.user_attrs["worker"] for t in probes}) == 2  # both workers probed
    best = max((t for t in probes if t.user_attrs["constraint"] <= 0), key=lambda t: t.value)
    assert all(r["best"]["config"]["batch_size"] == best.params["batch_size"] for r in results)
    assert best.params["checkpointing"] or best.params["batch_size"] < 8  # the capacity was respected
