"""FSDP1 (torch FullyShardedDataParallel, flat parameters) as accelerate + HF Trainer wrap it: the knob, the
analytic rank states (memplan.predict.sharding._fsdp1) against the exact mode's fake-process-group trace and two
real gloo ranks, the CLI flag and the LLaMA-Factory / HF `fsdp_config` version."""

import json

import pytest
import yaml

from memplan.cli import main
from memplan.errors import ConfigError
from memplan.predict.estimator import estimate
from memplan.spec.catalog import resolve_model
from memplan.spec.train import Method, Precision, Sharding, TrainConfig
from memplan.testing.tiny import tiny_spec

TINY = dict(batch_size=2, seq_len=128, gpus=2, sharding=Sharding.FULL_SHARD)


def test_fsdp1_is_accelerates_default_and_fsdp2_keeps_its_path():
    train = TrainConfig().with_(gpus=8, sharding=Sharding.FULL_SHARD)
    assert train.fsdp_version == 1 and train.parallel.fsdp1 and not train.parallel.fsdp2
    assert train.with_(fsdp_version=2).parallel.fsdp2
    with pytest.raises(ConfigError, match="must be 1 .* or 2"):
        train.with_(fsdp_version=3)
    with pytest.raises(ConfigError, match="no no_shard"):
        train.with_(sharding=Sharding.NO_SHARD, fsdp_version=2)


def test_fsdp1_and_fsdp2_differ_where_the_sources_say():
    """Same shards; FSDP1 gathers no decoder unit at the end of forward (FULL_SHARD frees it after its forward,
    no forward prefetch), from the root's backward on the last unit is prefetched (BACKWARD_PRE) as FSDP2 does.
    Under HF Trainer's peft wrapping LoRA's decoder units are frozen flat parameters: no whole-unit gradient."""
    spec = resolve_model("llama-2-7b")
    for method in (Method.FULL, Method.LORA):
        one = TrainConfig().with_(method=method, gpus=8, sharding=Sharding.FULL_SHARD, seq_len=512)
        m1, m2 = dict(estimate(spec, one).moments), dict(estimate(spec, one.with_(fsdp_version=2)).moments)
        assert m2["forward"] - m1["forward"] == spec.layer_params * 2  # one bf16 decoder unit
        assert m1["backward"] == m2["backward"] and m1["optimizer"] == m2["optimizer"]
    lora = estimate(spec, TrainConfig().with_(gpus=8, sharding=Sharding.FULL_SHARD))
    sharding = next(t for t in lora.terms if t.name == "sharding")
    for name in ("root unit gathered", "prefetched unit", "running unit gathered", "unsharded flat grad",
                 "_post_forward_reshard", "BACKWARD_PRE"):
        assert name in sharding.explain
    grad = int(sharding.explain.split("unsharded flat grad ")[1].split(" B")[0].replace(",", ""))
    assert 0 < grad < spec.layer_params * 2 // 100  # the adapters' own units, not the whole decoder unit


@pytest.mark.parametrize(("kw", "tolerance"), [
    (dict(method=Method.FULL, precision=Precision.FP32, checkpointing=False), 1e-4),
    (dict(method=Method.LORA, precision=Precision.BF16, checkpointing=True), 1e-4),
    (dict(method=Method.LORA, precision=Precision.BF16, checkpointing=False), 1e-4),
    (dict(method=Method.FULL, precision=Precision.BF16, checkpointing=True), 0.02),
])
def test_exact_mode_traces_fsdp1_under_a_fake_process_group(kw, tolerance):
    """FullyShardedDataParallel builds and steps on fake tensors under torch's fake process group; the analytic
    FSDP1 terms agree (full bf16 AMP overestimated by 1.2 %, as the FSDP2 terms do: the single-GPU AMP head and
    layer buffers assume fp32 leaves, FSDP computes on half unsharded ones)."""
    from memplan.trace.exact import exact_estimate

    spec = tiny_spec("llama")
    train = TrainConfig().with_(**TINY, **kw)
    exact = exact_estimate(spec, train, device="cpu")
    single = estimate(spec, train.with_(gpus=1, sharding=Sharding.NONE), device="cpu")
    assert exact.term("weights") < 0.6 * single.term("weights")  # this rank's shards, plus buffers
    analytic = estimate(spec, train, device="cpu").peak_allocated_bytes
    assert -1e-4 <= analytic / exact.peak_allocated_bytes - 1 <= tolerance


def test_fsdp1_shard_grad_op_and_no_shard_are_refused_by_the_exact_mode(capsys):
    assert main(["estimate", "--model", "llama-3.2-1b", "--gpus", "2", "--fsdp", "shard_grad_op", "--exact"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "FSDP1 no_shard / shard_grad_op" in err


FSDP1_PROBES = [  # (config, analytic tolerance vs the lower real rank)
    (dict(method=Method.FULL, precision=Precision.FP32, checkpointing=False), 1e-4),
    (dict(method=Method.LORA, precision=Precision.BF16, checkpointing=True), 1e-4),
]


@pytest.mark.parametrize(("kw", "tolerance"), FSDP1_PROBES,
                         ids=[f"{k['method'].value}-{k['precision'].value}" for k, _ in FSDP1_PROBES])
@pytest.mark.integration
def test_fsdp1_on_two_real_gloo_ranks_matches_the_estimate(tmp_path, monkeypatch, kw, tolerance):
    """Two torchrun ranks on CPU (gloo) wrapped by memplan.build.shard.fsdp1_wrap_model: the measured peak is the
    analytic estimate and the fake-process-group trace (LoRA: the adapters wrapped as units of their own)."""
    from memplan.probe.launch import ProbeOptions, probe
    from memplan.trace.exact import exact_estimate

    monkeypatch.setenv("MEMPLAN_CACHE_DIR", str(tmp_path))
    spec = tiny_spec("llama")
    train = TrainConfig().with_(**TINY, **kw)
    res = probe(spec, train, ProbeOptions(steps=1, warmup=1, timeout_s=600))
    assert res.status.value == "ok", res.error
    measured = min(res.rank_peak_bytes)
    assert abs(estimate(spec, train, device="cpu").peak_allocated_bytes / measured - 1) <= tolerance
    assert abs(exact_estimate(spec, train, device="cpu").peak_allocated_bytes / measured - 1) <= 1e-4


def test_cli_fsdp_version(capsys):
    base = ["estimate", "--model", "llama-2-7b", "--gpus", "8", "--json"]
    assert main(base + ["--fsdp", "full_shard"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["fsdp_version"] == 1
    assert main(base + ["--fsdp", "full_shard", "--fsdp-version", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["fsdp_version"] == 2
    for extra, message in ((["--zero", "3", "--fsdp-version", "2"], "applies to torch FSDP"),
                           (["--fsdp-version", "1"], "applies to torch FSDP"),
                           (["--fsdp", "full_shard", "--fsdp-version", "3"], "must be 1"),
                           (["--fsdp", "full_shard", "--fsdp-version", "x"], "must be an integer")):
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize(("fsdp_config", "version"), [
    (None, 2), ({"version": 1}, 1), ({"fsdp_version": 1}, 1), ({"version": "2"}, 2), ("fsdp.json", 1)])
def test_llamafactory_fsdp_config_version(tmp_path, monkeypatch, fsdp_config, version):
    """HF Trainer's `fsdp` key wraps with fsdp_config's version, 2 unless said (transformers 5 training_args.py);
    a JSON path is opened from the launch directory, as HF Trainer does."""
    from memplan.formats.llamafactory import config_from_llamafactory

    monkeypatch.chdir(tmp_path)
    (tmp_path / "fsdp.json").write_text(json.dumps({"fsdp_version": 1, "backward_prefetch": "backward_pre"}))
    raw = {"model_name_or_path": "llama-2-7b", "finetuning_type": "full", "fsdp": "full_shard auto_wrap",
           "bf16": True} | ({"fsdp_config": fsdp_config} if fsdp_config is not None else {})
    assert config_from_llamafactory(raw).train.fsdp_version == version


def test_llamafactory_fsdp_config_errors_name_the_key(tmp_path, monkeypatch):
    from memplan.formats.llamafactory import config_from_llamafactory

    monkeypatch.chdir(tmp_path)
    raw = {"model_name_or_path": "llama-2-7b", "finetuning_type": "full", "fsdp": "full_shard"}
    for value, message in (({"version": 3}, "fsdp_config version 3"), ("missing.json", "fsdp_config 'missing.json'"),
                           (["x"], "fsdp_config must be a mapping")):
        with pytest.raises(ConfigError, match=message):
            config_from_llamafactory({**raw, "fsdp_config": value})


def test_an_fsdp1_plan_exports_its_version(tmp_path):
    from memplan.formats.llamafactory import read_llamafactory, write_llamafactory
    from memplan.spec.parallel import Parallelism

    spec = resolve_model("llama-3-8b")
    for version in (1, 2):
        train = TrainConfig(method=Method.FULL, parallel=Parallelism(gpus=8, sharding=Sharding.FULL_SHARD,
                                                                     fsdp_version=version))
        out = tmp_path / f"v{version}.yaml"
        write_llamafactory(spec, train, out, {"model_name_or_path": "meta-llama/Meta-Llama-3-8B"},
                           base_dir=tmp_path)
        data = yaml.safe_load(out.read_text())
        assert data.get("fsdp_config") == ({"version": 1} if version == 1 else None)
        assert read_llamafactory(out, env={}).train.fsdp_version == version


def test_fsdp1_streams_keep_their_blocks_apart_in_the_reserved_sketch(monkeypatch):
    """FSDP1 gathers its units on the unshard stream and makes the gradient shards on the post-backward stream
    (memplan.predict.reserve); the caching allocator reuses a block only on its own stream, so in a full
    fine-tune's optimizer step (the peak, nothing gathered) the root and the two decoder units last gathered stay
    reserved beside the compute stream's blocks. On one stream the sketch reserves less."""
    from memplan.predict import reserve

    spec = resolve_model("llama-2-7b")
    train = TrainConfig().with_(method=Method.FULL, precision=Precision.PURE_BF16, batch_size=2, seq_len=512,
                                gpus=4, sharding=Sharding.FULL_SHARD)
    units = (2 * spec.vocab_size * spec.hidden_size + spec.hidden_size + 2 * spec.layer_params) * 2  # bf16
    bd = estimate(spec, train)
    assert bd.phase == "optimizer"
    assert bd.peak_reserved_bytes - bd.peak_allocated_bytes >= units
    reserve._overhead.cache_clear()
    monkeypatch.setattr(reserve, "UNSHARD", reserve.COMPUTE)
    monkeypatch.setattr(reserve, "POST_BACKWARD", reserve.COMPUTE)
    one_stream = estimate(spec, train).peak_reserved_bytes
    reserve._overhead.cache_clear()
    assert bd.peak_reserved_bytes - one_stream > units // 2


@pytest.mark.parametrize("method", [Method.LORA, Method.FULL])
def test_torchtune_wraps_the_same_units_with_flat_parameters_only(method):
    """torchtune's distributed recipes (memplan.spec.stacks, fef3ed1 lora_fsdp_wrap_policy / ModuleWrapPolicy)
    make the same FSDP1 units as HF Trainer's peft / transformer policy: each decoder layer, each LoRA A and B, the
    root; but with use_orig_params=False, which no analytic term depends on (the gloo test below)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from memplan.build.model import build_model
    from memplan.build.shard import fsdp1_wrap_model
    from memplan.spec.stacks import Stack
    from memplan.trace.patches import fake_process_group

    spec = tiny_spec("llama")
    units, orig = {}, {}
    for stack in (Stack.HF, Stack.TORCHTUNE):
        train = TrainConfig(stack=stack).with_(**TINY, method=method, precision=Precision.PURE_BF16,
                                               lora_targets=("q_proj", "v_proj"))
        with fake_process_group(train):
            wrapped = fsdp1_wrap_model(build_model(spec, train, device="cpu"), train, "cpu")
            modules = FSDP.fsdp_modules(wrapped)
            units[stack] = sorted(type(m.module).__name__ for m in modules)
            orig[stack] = {m._use_orig_params for m in modules}
    assert units[Stack.HF] == units[Stack.TORCHTUNE]
    assert units[Stack.HF].count("LlamaDecoderLayer") == spec.num_layers
    adapters = 4 * spec.num_layers if method is Method.LORA else 0  # A and B of q and v per layer
    assert units[Stack.HF].count("Linear") == adapters
    assert orig == {Stack.HF: {True}, Stack.TORCHTUNE: {False}}


@pytest.mark.parametrize("method", [Method.LORA])
@pytest.mark.integration
def test_torchtune_fsdp1_units_on_two_real_gloo_ranks(tmp_path, monkeypatch, method):
    """Two torchrun ranks (gloo): torchtune's wrapping (its policy, use_orig_params=False) peaks where HF Trainer's
    does on the same tiny model (measured: LoRA 30,900,276 B per rank for both; full 40,411,088 B for HF,
    40,411,036 or 40,411,088 B for torchtune in two runs), and the analytic FSDP1 estimate is within 1e-4 of it.
    CI runs LoRA (mixed frozen and trained units); the fake-process-group test above checks both methods' units."""
    from memplan.probe.launch import ProbeOptions, probe
    from memplan.spec.stacks import Stack

    monkeypatch.setenv("MEMPLAN_CACHE_DIR", str(tmp_path))
    spec = tiny_spec("llama")
    peaks = {}
    for stack in (Stack.HF, Stack.TORCHTUNE):
        train = TrainConfig(stack=stack).with_(**TINY, method=method, precision=Precision.PURE_BF16,
                                               checkpointing=False)
        res = probe(spec, train, ProbeOptions(steps=1, warmup=1, timeout_s=600))
        assert res.status.value == "ok", res.error
        peaks[stack] = min(res.rank_peak_bytes)
    assert abs(peaks[Stack.TORCHTUNE] / peaks[Stack.HF] - 1) <= 1e-5
    assert abs(estimate(spec, train, device="cpu").peak_allocated_bytes / peaks[Stack.TORCHTUNE] - 1) <= 1e-4


def test_fsdp1_with_parameters_offloaded_estimates_reserved() -> None:
    """CPU-offloaded parameters leave a rank no share of its own on the GPU (scale 0): the reserved sketch must not
    divide by it (a fit over --offload params used to end in ZeroDivisionError)."""
    from memplan.spec.parallel import Offload, Parallelism

    train = TrainConfig(method=Method.FULL, parallel=Parallelism(gpus=8, sharding=Sharding.FULL_SHARD,
                                                                 offload=Offload.PARAMS, fsdp_version=1))
    bd = estimate(resolve_model("llama-3-8b"), train)
    assert bd.peak_reserved_bytes >= bd.peak_allocated_bytes > 0
