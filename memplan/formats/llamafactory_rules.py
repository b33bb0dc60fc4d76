"""What LLaMA-Factory 0.9.5 does with a training YAML beyond reading its keys, each rule with its source line:
which YAMLs it runs without training (`NOT_TRAINING`), the GPU count of its launch (`launch_world`, the launch line
an export writes), and the combinations its parser refuses (`REJECTED`). Lines cite LLaMA-Factory at v0.9.5."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from memplan.errors import ConfigError
from memplan.spec.parallel import Offload, Sharding
from memplan.spec.train import TrainConfig

# The launch line an export writes as its first comment, and reads back (the YAML has no key for the GPU count:
# LLaMA-Factory's launcher takes it from NPROC_PER_NODE x NNODES, launcher.py:64-66 at v0.9.5)
_LAUNCH = re.compile(r"^# launch: (?P<env>(?:[A-Z_]+=\S+ )*)llamafactory-cli train", re.MULTILINE)


def _true(raw: dict[str, Any], key: str) -> bool:
    return raw.get(key) is True or str(raw.get(key)).lower() == "true"


def _false(raw: dict[str, Any], key: str) -> bool:
    return raw.get(key) is False or str(raw.get(key)).lower() == "false"


# YAMLs LLaMA-Factory 0.9.5 runs without training, as (what the run is, test, where LLaMA-Factory decides it).
# memplan estimates training: each is refused in one line (exit 2). A YAML that sets do_train: true trains, whatever
# else it sets; `tokenized_path` (preprocessing) trains too since 0.9.x: data/loader.py:330-334 saves the tokenized
# set and goes on (commit 478e8194d "remove exit in preprocess"), so it is estimated.
NOT_TRAINING: tuple[tuple[str, Callable[[dict[str, Any]], bool], str], ...] = (
    ("an export (merge) config for `llamafactory-cli export` (export_dir)",
     lambda r: r.get("export_dir") is not None, "hparams/model_args.py:358 export_dir, train/tuner.py:152"),
    ("an evaluation config for `llamafactory-cli eval` (task)", lambda r: r.get("task") is not None,
     "hparams/evaluation_args.py:26 task"),
    ("an inference config for chat / api / webchat (infer_backend)", lambda r: r.get("infer_backend") is not None,
     "hparams/model_args.py:165 infer_backend, launcher.py:136-144"),
    # do_predict with predict_with_generate (stage sft) is estimated as inference (memplan.predict.generation)
    ("a prediction run (do_predict) without predict_with_generate: its forward-only prediction step is not "
     "modelled", lambda r: _true(r, "do_predict") and not predicts_with_generate(r), "train/sft/workflow.py:152"),
    ("an evaluation-only run (do_eval)", lambda r: _true(r, "do_eval"), "train/sft/workflow.py:146"),
    ("do_train is false", lambda r: _false(r, "do_train"), "train/sft/workflow.py:120 trains only if do_train"),
)
_FLAG_RULES = 3  # the last three: the same YAML trains with do_train: true


def predicts_with_generate(raw: dict[str, Any]) -> bool:
    """A prediction run memplan estimates (as inference): do_predict with predict_with_generate in the sft stage,
    without do_train (train/sft/workflow.py L152-154 runs trainer.predict with the generating arguments)."""
    return (_true(raw, "do_predict") and _true(raw, "predict_with_generate") and not _true(raw, "do_train")
            and str(raw.get("stage", "sft")).lower() == "sft")


def not_training(raw: dict[str, Any]) -> str | None:
    """Why LLaMA-Factory would not train with this YAML (one line), or None when it trains."""
    if _true(raw, "do_train"):
        return None
    for i, (what, test, source) in enumerate(NOT_TRAINING):
        if test(raw):
            fix = "; set do_train: true to estimate its training" if i >= len(NOT_TRAINING) - _FLAG_RULES else ""
            return f"not a training run: {what} (LLaMA-Factory {source}); memplan estimates training{fix}"
    return None


# ---- the GPU count of a launch ---------------------------------------------------------------------------------
def launch_world(env: Mapping[str, str]) -> tuple[int, int] | None:
    """(GPUs in all, nodes) of `llamafactory-cli train` under `env`, when the environment says: the launcher starts
    torchrun with --nproc_per_node $NPROC_PER_NODE --nnodes $NNODES (launcher.py:60-66 at v0.9.5); without
    NPROC_PER_NODE it takes the machine's device count, which memplan cannot see (None)."""
    nproc = env.get("NPROC_PER_NODE")
    if nproc is None or not nproc.strip():
        return None
    values = []
    for name, text in (("NPROC_PER_NODE", nproc), ("NNODES", env.get("NNODES") or "1")):
        try:
            values.append(int(text))
        except ValueError:
            raise ConfigError(f"{name}={text!r} in the environment: expected a positive integer") from None
        if values[-1] <= 0:
            raise ConfigError(f"{name}={text!r} in the environment: expected a positive integer")
    return values[0] * values[1], values[1]


def distributed(t: TrainConfig) -> bool:
    """Launched under torchrun (HF's ParallelMode.DISTRIBUTED): several GPUs, or DeepSpeed / FSDP on one."""
    return t.gpus > 1 or t.sharding is not Sharding.NONE


def launch_line(train: TrainConfig, yaml_path: str) -> str:
    """The command that runs an exported YAML on the plan's GPUs: torchrun (FORCE_TORCHRUN) with NPROC_PER_NODE x
    NNODES ranks (launcher.py:60-66) when distributed, since parser.py:353-354 refuses DeepSpeed outside it; one
    visible GPU otherwise, or the launcher would start torchrun over every GPU of the machine (launcher.py:61)."""
    env = f"NNODES={train.nodes} NPROC_PER_NODE={train.gpus_per_node} "
    env = ("FORCE_TORCHRUN=1 " if distributed(train) else "CUDA_VISIBLE_DEVICES=0 ") + env
    if train.nodes > 1:
        env += "NODE_RANK=<rank-of-this-node> MASTER_ADDR=<host-of-node-0> "
    return f"# launch: {env}llamafactory-cli train {yaml_path}"


def launch_from_text(text: str) -> tuple[int, int] | None:
    """The GPU count of the launch line an export wrote (its first comment), or None."""
    hit = _LAUNCH.search(text)
    if hit is None:
        return None
    env = dict(part.split("=", 1) for part in hit["env"].split())
    return launch_world(env)


def _zero3(t: TrainConfig) -> bool:
    return t.sharding is Sharding.ZERO3  # transformers' is_deepspeed_zero3_enabled()


def fsdp_on(t: TrainConfig) -> bool:
    """torch FSDP through HF's `fsdp` key: transformers' is_fsdp_enabled() under the launch."""
    return t.sharding is not Sharding.NONE and not t.sharding.is_deepspeed


# Combinations LLaMA-Factory 0.9.5 refuses, as (test over the YAML to write and the plan, its message, where). An
# export never writes one; `fit` drops such candidates when the plan is for LLaMA-Factory (`allowed`).
REJECTED: tuple[tuple[Callable[[dict[str, Any], TrainConfig], bool], str, str], ...] = (
    (lambda y, t: _true(y, "pure_bf16") and _zero3(t), "pure_bf16 is incompatible with DeepSpeed ZeRO-3",
     "hparams/parser.py:384-385"),
    (lambda y, t: _true(y, "predict_with_generate") and _zero3(t),
     "predict_with_generate is incompatible with DeepSpeed ZeRO-3", "hparams/parser.py:367-369"),
    (lambda y, t: _true(y, "pissa_init") and _zero3(t), "pissa_init cannot initialise PiSSA in DeepSpeed ZeRO-3",
     "hparams/parser.py:377-378"),
    (lambda y, t: _true(y, "use_unsloth") and _zero3(t), "use_unsloth is incompatible with DeepSpeed ZeRO-3",
     "hparams/parser.py:409-410"),
    (lambda y, t: bool(y.get("deepspeed")) and (_true(y, "use_galore") or _true(y, "use_apollo")),
     "use_galore / use_apollo are incompatible with DeepSpeed", "hparams/parser.py:400-401"),
    (lambda y, t: distributed(t) and (_true(y, "use_galore") and _true(y, "galore_layerwise")
                                      or _true(y, "use_apollo") and _true(y, "apollo_layerwise")),
     "layer-wise GaLore / APOLLO cannot train under torchrun", "hparams/parser.py:388-392"),
    (lambda y, t: distributed(t) and _true(y, "use_badam") and (y.get("badam_mode", "layer") == "ratio"
                                                               or not _zero3(t)),
     "use_badam under torchrun needs badam_mode layer and DeepSpeed ZeRO-3", "hparams/parser.py:394-398"),
    (lambda y, t: _true(y, "fp8") and y.get("quantization_bit") is not None,
     "fp8 is not compatible with quantization_bit", "hparams/parser.py:403-404"),
    (lambda y, t: y.get("quantization_bit") not in (None, 4) and (_zero3(t) or fsdp_on(t)),
     "quantization_bit other than 4 cannot run under DeepSpeed ZeRO-3 or FSDP",
     "model/model_utils/quantization.py:186-188"),
    (lambda y, t: y.get("quantization_bit") is not None and str(y.get("quantization_method", "bnb")) in
     ("hqq", "eetq") and (_zero3(t) or fsdp_on(t)),
     "HQQ / EETQ quantization is incompatible with DeepSpeed ZeRO-3 or FSDP",
     "model/model_utils/quantization.py configure_quantization, HEAD ff6d4d12e L210-211 and L222-223"),
    (lambda y, t: fsdp_on(t) and t.offload is Offload.OPTIMIZER,
     "FSDP offloads parameters with the optimizer (fsdp: ... offload), not the optimizer alone",
     "transformers training_args.py FSDPOption.OFFLOAD"),
)


def rejections(data: dict[str, Any], train: TrainConfig) -> list[str]:
    """What LLaMA-Factory would refuse in the YAML `data` run as `train` lays out (empty when it accepts it)."""
    return [f"{why} (LLaMA-Factory {where})" for test, why, where in REJECTED if test(data, train)]
