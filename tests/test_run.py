"""Run and retune: LLaMA-Factory YAML in and out, the re-plan policy, and `memplan run` end to end on CPU."""

import json
import re
import sys

import pytest
import yaml

from memplan.cli import main
from memplan.errors import ConfigError
from memplan.formats.llamafactory import config_from_llamafactory, llamafactory_yaml, read_llamafactory
from memplan.predict.estimator import estimate
from memplan.run.policy import replan
from memplan.run.target import ArgsTarget, fresh_optimizer_view, newest_checkpoint
from memplan.spec.catalog import resolve_model
from memplan.spec.stacks import Stack
from memplan.spec.train import Attention, Method, Optimizer, Precision, TrainConfig
from memplan.testing.tiny import TINY_CONFIGS

LF_YAML = """\
### model
model_name_or_path: meta-llama/Meta-Llama-3-8B-Instruct
trust_remote_code: true
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 16
lora_target: q_proj,v_proj
dataset: identity,alpaca_en_demo
template: llama3
cutoff_len: 1024
output_dir: saves/llama3-8b/lora/sft
per_device_train_batch_size: 4
gradient_accumulation_steps: 4
learning_rate: 1.0e-4
bf16: true
optim: adamw_bnb_8bit
"""


def test_reads_a_llamafactory_yaml(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text(LF_YAML)
    lf = read_llamafactory(path)
    assert lf.model == "meta-llama/Meta-Llama-3-8B-Instruct" and lf.output_dir == "saves/llama3-8b/lora/sft"
    assert lf.train == TrainConfig(method=Method.LORA, lora_rank=16, lora_targets=("q_proj", "v_proj"), seq_len=1024,
                                   batch_size=4, grad_accum=4, precision=Precision.BF16,
                                   optimizer=Optimizer.ADAMW_8BIT, checkpointing=True, stack=Stack.LLAMAFACTORY)
    assert lf.raw["template"] == "llama3" and lf.raw["dataset"] == "identity,alpaca_en_demo"
    assert resolve_model(lf.model).name == "llama-3-8b"  # an instruct variant resolves to its base config


@pytest.mark.parametrize(("extra", "expected"), [
    ({}, dict(method=Method.LORA, precision=Precision.FP32, batch_size=8, seq_len=2048, checkpointing=True)),
    ({"quantization_bit": 4, "pure_bf16": True}, dict(method=Method.QLORA, quant_bits=4,
                                                      precision=Precision.PURE_BF16)),
    ({"finetuning_type": "freeze", "freeze_trainable_layers": 4, "fp16": True,
      "disable_gradient_checkpointing": True, "flash_attn": "disabled"},
     dict(method=Method.FREEZE, freeze_trainable_layers=4, precision=Precision.FP16, checkpointing=False,
          attn=Attention.EAGER)),
    ({"finetuning_type": "full", "optim": "sgd", "optim_args": "momentum=0.9", "flash_attn": "fa2", "bf16": True},
     dict(method=Method.FULL, optimizer=Optimizer.SGD_MOMENTUM, attn=Attention.FLASH_ATTENTION_2)),
])
def test_llamafactory_fields_and_defaults(extra, expected):
    train = config_from_llamafactory({"model_name_or_path": "llama-2-7b", **extra}).train
    for key, value in expected.items():
        assert getattr(train, key) == value, key


@pytest.mark.parametrize(("raw", "message"), [
    ({}, "model_name_or_path is missing"),
    ({"model_name_or_path": "x", "optim": "lion_32bit"}, "optim 'lion_32bit' is not modelled"),
    ({"model_name_or_path": "x", "bf16": True, "fp16": True}, "bf16 and fp16 are both true"),
    ({"model_name_or_path": "x", "per_device_train_batch_size": 0}, "per_device_train_batch_size must be"),
    ({"model_name_or_path": "x", "finetuning_type": "full", "quantization_bit": 4}, "adapters only"),
])
def test_bad_llamafactory_fields_are_config_errors(raw, message):
    with pytest.raises(ConfigError, match=message):
        config_from_llamafactory(raw)


ROUND_TRIP = [TrainConfig(),
              TrainConfig(method=Method.FULL, precision=Precision.PURE_BF16, optimizer=Optimizer.SGD_MOMENTUM),
              TrainConfig(method=Method.QLORA, quant_bits=8, lora_targets=("q_proj", "v_proj"), attn=Attention.SDPA,
                          lora_rank=32, lora_alpha=16, lora_dropout=0.05),
              TrainConfig(method=Method.FREEZE, precision=Precision.FP16, optimizer=Optimizer.ADAFACTOR,
                          batch_size=4, grad_accum=2, checkpointing=False, freeze_trainable_layers=3),
              TrainConfig(precision=Precision.FP32, optimizer=Optimizer.PAGED_ADAMW_8BIT, seq_len=8192,
                          attn=Attention.EAGER)]


def _relevant(train: TrainConfig) -> dict:
    """The knobs that mean something for this method (LoRA fields are irrelevant to full fine-tuning)."""
    d = train.to_dict()
    if not train.is_lora:
        for key in ("lora_rank", "lora_alpha", "lora_targets", "lora_dropout"):
            d.pop(key)
    if train.method is not Method.QLORA:
        d.pop("quant_bits")
    if train.method is not Method.FREEZE:
        d.pop("freeze_trainable_layers")
    return d


@pytest.mark.parametrize("train", ROUND_TRIP)
def test_round_trip_read_export_read(train, tmp_path):
    spec = resolve_model("llama-3-8b")
    base = yaml.safe_load(LF_YAML)
    exported = llamafactory_yaml(spec, train, base)
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(exported, sort_keys=False))
    again = read_llamafactory(path)
    assert _relevant(again.train) == _relevant(train.with_(stack=Stack.LLAMAFACTORY))  # its own stack
    assert exported["template"] == "llama3" and exported["learning_rate"] == 1e-4  # unknown fields kept
    assert exported["model_name_or_path"] == base["model_name_or_path"]
    # and once more: export(read(export(x))) is a fixed point
    assert llamafactory_yaml(spec, again.train, again.raw) == exported


def test_fit_and_estimate_read_the_config(tmp_path, capsys):
    path = tmp_path / "train.yaml"
    path.write_text(LF_YAML)
    assert main(["fit", "--config", str(path), "--gpu", "24GB", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["global_batch"] == 16 and out["config"]["lora_rank"] == 16 and out["config"]["seq_len"] == 1024
    assert out["config"]["optimizer"] == "adamw_8bit" and out["as_written"]["config"]["batch_size"] == 4
    assert main(["estimate", "--config", str(path), "--batch-size", "2", "--json"]) == 0
    est = json.loads(capsys.readouterr().out)
    assert est["config"]["batch_size"] == 2 and est["config"]["grad_accum"] == 4 and est["config"]["lora_rank"] == 16
    plan = tmp_path / "plan.yaml"
    assert main(["fit", "--config", str(path), "--gpu", "80GB", "--export", "llamafactory", "-o", str(plan)]) == 0
    written = yaml.safe_load(plan.read_text())
    assert written["dataset"] == "identity,alpaca_en_demo" and written["learning_rate"] == 1e-4
    assert written["per_device_train_batch_size"] * written["gradient_accumulation_steps"] == 16


@pytest.mark.parametrize("text", ["model_name_or_path: [unclosed\n", "- just\n- a list\n"])
def test_malformed_yaml_is_one_line_exit_2(text, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert main(["fit", "--config", str(path), "--gpu", "24GB"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert main(["fit", "--config", str(tmp_path / "missing.yaml"), "--gpu", "24GB"]) == 2


# --- the re-plan policy ---------------------------------------------------------------------------------------

SPEC = resolve_model("llama-3-8b")


def test_replan_keeps_the_effective_batch_and_walks_the_stages():
    cur = TrainConfig(batch_size=8, grad_accum=2, checkpointing=False)
    step1 = replan(SPEC, cur, [cur])
    assert step1.train.effective_batch == 16 and step1.train.batch_size < 8
    assert step1.train.checkpointing is False and step1.reason.startswith("smaller micro-batch")
    assert estimate(SPEC, step1.train).total_bytes <= step1.bound_bytes
    smallest = cur.with_(batch_size=1, grad_accum=16)
    step2 = replan(SPEC, smallest, [cur, smallest])
    assert step2.train.checkpointing and step2.train.effective_batch == 16
    last = smallest.with_(checkpointing=True)  # LoRA's optimizer states are tiny: 8-bit AdamW does not help
    assert replan(SPEC, last, [last]).train is None
    assert replan(SPEC, last, [last], allow_method_change=True).train.method is Method.QLORA
    full = TrainConfig(method=Method.FULL, batch_size=1, grad_accum=16, checkpointing=True)
    step3 = replan(SPEC, full, [full], allow_method_change=True)
    assert step3.train.optimizer is Optimizer.ADAMW_8BIT and step3.train.method is Method.FULL


def test_replan_excludes_everything_predicted_larger_than_a_failure():
    cur = TrainConfig(batch_size=4, grad_accum=4)
    small_failure = cur.with_(batch_size=2, grad_accum=8)  # evidence: even micro-batch 2 failed earlier
    plan = replan(SPEC, cur, [cur, small_failure])
    assert plan.train.batch_size == 1 and plan.train not in (cur, small_failure)


def test_replan_full_finetuning_never_changes_method_or_rank():
    cur = TrainConfig(method=Method.FULL, batch_size=1, grad_accum=8, checkpointing=True,
                      optimizer=Optimizer.ADAMW_8BIT)
    plan = replan(SPEC, cur, [cur], allow_method_change=True)
    assert plan.train is None and "effective batch" in plan.reason


# --- how the command carries the config -----------------------------------------------------------------------

def test_hf_flags_are_read_and_rewritten(tmp_path):
    argv = ["python", "train.py", "--per_device_train_batch_size=8", "--gradient_accumulation_steps", "2",
            "--output_dir", str(tmp_path), "--bf16", "--model_name_or_path", "llama-2-7b"]
    target = ArgsTarget.open(argv, TrainConfig(method=Method.FULL))
    assert (target.train.batch_size, target.train.grad_accum, target.train.precision) == (8, 2, Precision.BF16)
    assert target.model == "llama-2-7b" and target.output_dir == str(tmp_path)
    new, _ = target.prepare(1, SPEC, target.train.with_(batch_size=4, grad_accum=4, checkpointing=True),
                            tmp_path / "checkpoint-4")
    assert new[:2] == ["python", "train.py"] and "--per_device_train_batch_size=8" not in new
    assert new.count("--per_device_train_batch_size") == 1 and new.count("--gradient_accumulation_steps") == 1
    assert new[new.index("--per_device_train_batch_size") + 1] == "4"
    assert new[new.index("--gradient_checkpointing") + 1] == "True"
    assert new[new.index("--resume_from_checkpoint") + 1] == str(tmp_path / "checkpoint-4")
    assert target.prepare(0, SPEC, target.train, None)[0] == argv  # the first attempt runs as given


def test_newest_complete_checkpoint_and_fresh_optimizer_view(tmp_path):
    for step, complete in ((2, True), (10, True), (12, False)):
        ck = tmp_path / f"checkpoint-{step}"
        ck.mkdir()
        (ck / "model.safetensors").write_text("w")
        (ck / "optimizer.pt").write_text("o")
        (ck / "scheduler.pt").write_text("s")
        if complete:
            (ck / "trainer_state.json").write_text("{}")
    newest = newest_checkpoint(tmp_path)
    assert newest == tmp_path / "checkpoint-10"  # checkpoint-12 was cut off before its trainer state
    view = fresh_optimizer_view(newest)
    assert sorted(p.name for p in view.iterdir()) == ["model.safetensors", "trainer_state.json"]
    assert (newest / "optimizer.pt").exists()  # the checkpoint itself is untouched
    assert newest_checkpoint(tmp_path / "nowhere") is None


# --- memplan run ----------------------------------------------------------------------------------------------

def _script(code: str) -> list[str]:
    return [sys.executable, "-c", code]


@pytest.mark.integration
def test_a_failure_that_is_not_an_oom_is_not_retried(tmp_path, capsys):
    log = tmp_path / "log.jsonl"
    rc = main(["run", "--method", "lora", "--model", "llama-2-7b", "--log", str(log), "--",
               *_script("import sys; print('KeyError: boom'); sys.exit(3)"), "--per_device_train_batch_size", "4"])
    assert rc == 3
    events = [json.loads(line)["event"] for line in log.read_text().splitlines()]
    assert events == ["plan", "launch", "exit", "finish"]
    assert "KeyError: boom" in capsys.readouterr().out  # the command's output is streamed


@pytest.mark.integration
def test_max_retries_is_honoured(tmp_path, capsys):
    log = tmp_path / "log.jsonl"
    code = "import sys; print('torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB'); sys.exit(1)"
    rc = main(["run", "--method", "lora", "--model", "llama-2-7b", "--max-retries", "2", "--log", str(log), "--",
               *_script(code), "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "2"])
    assert rc == 1
    records = [json.loads(line) for line in log.read_text().splitlines()]
    launches = [r for r in records if r["event"] == "launch"]
    assert len(launches) == 3 and records[-1]["outcome"] == "gave_up"
    assert {r["config"]["batch_size"] * r["config"]["grad_accum"] for r in launches} == {16}
    assert [r["config"]["batch_size"] for r in launches] == [8, 4, 2]
    assert "gave_up" in capsys.readouterr().out


def test_a_command_that_does_not_exist_is_exit_2(tmp_path, capsys):
    rc = main(["run", "--method", "lora", "--model", "llama-2-7b", "--log", str(tmp_path / "l"), "--",
               "no-such-trainer-xyz", "--per_device_train_batch_size", "4"])
    assert rc == 2 and "command not found: no-such-trainer-xyz" in capsys.readouterr().err
    assert main(["run", "--model", "llama-2-7b", "--", "python"]) == 2  # no --method, no --config


def _tiny_run(tmp_path, micro: int = 4, accum: int = 1) -> tuple:
    """A LLaMA-Factory-style YAML for the tiny llama whose simulated device holds micro-batch 2 on the long samples
    but not micro-batch 4 (the capacity is the midpoint of the two predicted peaks; the estimator's CPU error is
    under 1 %, benchmarks/results/accuracy.md)."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({**TINY_CONFIGS["llama"], "architectures": ["LlamaForCausalLM"]}))
    spec = resolve_model(str(model))
    seq = 256
    failing = TrainConfig(method=Method.FULL, precision=Precision.FP32, batch_size=4, grad_accum=1, seq_len=seq,
                          checkpointing=False)
    fitting = failing.with_(batch_size=2, grad_accum=2)
    hi, lo = (estimate(spec, t, device="cpu").peak_allocated_bytes for t in (failing, fitting))
    assert hi > lo * 1.2
    raw = dict(model_name_or_path=str(model), stage="sft", dataset="alpaca_en_demo", template="llama3",
               finetuning_type="full", per_device_train_batch_size=micro, gradient_accumulation_steps=accum,
               cutoff_len=seq, output_dir=str(tmp_path / "out"), save_steps=2, max_steps=8, short_len=16,
               long_from=20, disable_gradient_checkpointing=True, memplan_capacity_bytes=(hi + lo) // 2)
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path, raw


@pytest.mark.integration
def test_run_relaunches_after_an_oom_and_resumes_with_the_same_effective_batch(tmp_path, capsys):
    path, raw = _tiny_run(tmp_path)  # samples 20.. are long: micro-batch 4 OOMs in step 6, after checkpoint-4
    original = path.read_bytes()
    rc = main(["run", "--config", str(path), "--", sys.executable, "-m", "memplan.testing.hf_train", str(path)])
    out = capsys.readouterr().out
    assert rc == 0, out[-3000:]
    done = [tuple(map(int, m)) for m in re.findall(r"hf_train: step (\d+) done micro=(\d+) accum=(\d+)", out)]
    first_run = [d for d in done if d[1] == 4]
    assert max(d[0] for d in first_run) == 5  # the first configuration died in step 6
    assert {micro * accum for _, micro, accum in done} == {4}  # effective batch never changed
    assert 'hf_train: finished {"global_step": 8}' in out
    records = [json.loads(line) for line in (tmp_path / "train.memplan-run.jsonl").read_text().splitlines()]
    resume = next(r for r in records if r["event"] == "resume")["checkpoint"]
    assert resume.endswith("checkpoint-4") and 5 - 4 <= raw["save_steps"]  # lost at most the save interval
    assert [d[0] for d in done if d[1] == 2] == [5, 6, 7, 8]  # the second run starts right after checkpoint-4
    assert path.read_bytes() == original  # the original config is untouched
    copy = yaml.safe_load((tmp_path / "train.memplan-1.yaml").read_text())
    assert copy["per_device_train_batch_size"] == 2 and copy["gradient_accumulation_steps"] == 2
    assert copy["resume_from_checkpoint"] == resume and copy["template"] == "llama3"  # unknown fields kept
    assert copy["memplan_capacity_bytes"] == raw["memplan_capacity_bytes"]
    assert [r["status"] for r in records if r["event"] == "exit"] == ["oom", "ok"]


@pytest.mark.integration
def test_trainer_helper_continues_from_the_current_step(tmp_path):
    from memplan.run.hf import train_with_retune
    from memplan.testing import hf_train

    path, raw = _tiny_run(tmp_path)
    trainer = hf_train.build_trainer(raw)
    with hf_train.simulated_device(trainer, raw["memplan_capacity_bytes"]):
        events = train_with_retune(trainer, str(tmp_path / "model"),
                                   base=TrainConfig(method=Method.FULL, precision=Precision.FP32, seq_len=256))
    assert trainer.state.global_step == 8 and len(events) == 1
    ev = events[0]
    assert ev.global_step == 5 and ev.resumed_from.endswith("checkpoint-5")  # nothing lost: saved at the OOM
    assert ev.chosen.effective_batch == ev.failed.effective_batch == 4 and ev.chosen.batch_size == 2
    assert trainer.args.per_device_train_batch_size * trainer.args.gradient_accumulation_steps == 4


@pytest.mark.parametrize("train", [t for t in ROUND_TRIP if t.method in (Method.FULL, Method.LORA)])
def test_hf_and_json_exports_read_back(train):
    from memplan.formats.hf import hf_training_kwargs
    from memplan.formats.plan import plan_json
    from memplan.spec.train import train_from_dict

    argv = ["python", "train.py"]
    for key, value in hf_training_kwargs(train).items():
        argv += [f"--{key}", str(value)]
    back = ArgsTarget.open(argv, train.with_(batch_size=1, grad_accum=1, checkpointing=not train.checkpointing))
    assert back.train == train.with_(precision=back.train.precision)  # flags carry every knob but pure vs AMP bf16
    assert back.train.precision is (Precision.BF16 if train.precision is Precision.PURE_BF16 else train.precision)
    assert train_from_dict(plan_json(SPEC, train)["config"]) == train.with_(lora_alpha=train.alpha)


@pytest.mark.parametrize(("zero", "expected"), [
    ({"stage": 3, "offload_optimizer": {"device": "cpu"}}, ("zero3", "optimizer")),
    ({"stage": 3, "offload_param": {"device": "cpu"}, "offload_optimizer": {"device": "cpu"}}, ("zero3", "params")),
    ({"stage": 2}, ("zero2", "none")),
    ({"stage": 0}, ("none", "none")),
])
def test_deepspeed_json_named_in_the_yaml_sets_the_sharding(zero, expected, tmp_path):
    (tmp_path / "ds.json").write_text(json.dumps({"train_batch_size": "auto", "zero_optimization": zero}))
    path = tmp_path / "train.yaml"
    path.write_text(LF_YAML + "deepspeed: ds.json\n")
    lf = read_llamafactory(path)
    assert (lf.train.sharding.value, lf.train.offload.value) == expected
    path.write_text(LF_YAML + "deepspeed: missing.json\n")
    with pytest.raises(ConfigError, match="missing.json: no such file"):
        read_llamafactory(path)


@pytest.mark.integration
def test_run_plans_from_the_commands_key_value_overrides(tmp_path, capsys):
    """`llamafactory-cli train cfg.yaml key=value` runs the YAML with the overrides merged over it: memplan plans
    from the merge, keeps the effective batch the run really had, and resumes from the overridden output_dir."""
    path, raw = _tiny_run(tmp_path, micro=8)  # the YAML says micro 8 into out/; the command says 4 into out_cli/
    out_cli = tmp_path / "out_cli"
    rc = main(["run", "--config", str(path), "--", sys.executable, "-m", "memplan.testing.hf_train", str(path),
               "per_device_train_batch_size=4", f"output_dir={out_cli}"])
    out = capsys.readouterr().out
    assert rc == 0, out[-3000:]
    done = [tuple(map(int, m)) for m in re.findall(r"hf_train: step (\d+) done micro=(\d+) accum=(\d+)", out)]
    assert {micro * accum for _, micro, accum in done} == {4}  # the run's own effective batch, kept
    assert [d[0] for d in done if d[1] == 2] == [5, 6, 7, 8]  # resumed from out_cli/checkpoint-4
    copy = yaml.safe_load((tmp_path / "train.memplan-1.yaml").read_text())
    assert copy["output_dir"] == str(out_cli) and copy["resume_from_checkpoint"].startswith(str(out_cli))


def test_small_models_are_replanned_and_bad_logs_refused(tmp_path, capsys):
    """The 95 % rule applies to what the knobs change (the allocated peak), so a small model's OOM is re-planned
    although the fixed CUDA context dominates its total; a decision log that cannot be written is one line."""
    spec = resolve_model("qwen3-0.6b")  # micro-batch 1: 93 % of the allocated peak, 95.1 % of the total
    current = TrainConfig(method=Method.LORA, batch_size=2, grad_accum=1, seq_len=64)
    plan = replan(spec, current, [current])
    assert plan.train is not None and plan.train.effective_batch == 2 and plan.train.batch_size == 1
    rc = main(["run", "--method", "lora", "--model", "llama-2-7b", "--log", "/dev/null/x.jsonl", "--", "true"])
    err = capsys.readouterr().err
    assert rc == 2 and "--log /dev/null/x.jsonl" in err and err.count("\n") == 1
