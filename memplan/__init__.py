"""memplan: will it fit? Peak-VRAM prediction, exact tracing, probing and tuning for LLM fine-tuning.

The verbs, their inputs and results, and the errors. Nothing heavy is imported here: torch / transformers / peft /
optuna load inside the functions that need them (`train_with_retune`, which needs a Trainer, loads on first use).
"""

from memplan.errors import ConfigError, ExitCode, MemplanError, MissingExtra, UnknownGPU, UnknownModel, UnsupportedModel
from memplan.fit import Candidate, FitResult, Suggestion, fit
from memplan.formats.hf import hf_training_kwargs
from memplan.formats.llamafactory import LlamaFactoryConfig, llamafactory_yaml, read_llamafactory
from memplan.formats.plan import write_plan
from memplan.predict.breakdown import Breakdown, Term, Verdict
from memplan.predict.estimator import estimate
from memplan.probe.launch import ProbeOptions, probe
from memplan.probe.result import ProbeResult, ProbeStatus
from memplan.run.policy import Replan, replan
from memplan.run.supervisor import RunOptions, RunOutcome, RunResult, open_target, supervise
from memplan.spec.catalog import resolve_model
from memplan.spec.hardware import GPU, resolve_gpu
from memplan.spec.model import ModelSpec
from memplan.spec.optimizers import Optimizer
from memplan.spec.parallel import Offload, Parallelism, Sharding
from memplan.spec.space import SearchSpace
from memplan.spec.train import Attention, Method, Precision, TrainConfig
from memplan.trace.exact import estimate_any, exact_estimate
from memplan.tune.study import TuneResult, tune

__all__ = [
    # verbs
    "estimate", "estimate_any", "exact_estimate", "fit", "probe", "tune", "supervise", "open_target", "replan",
    "train_with_retune", "read_llamafactory", "llamafactory_yaml", "hf_training_kwargs", "write_plan",
    "resolve_model", "resolve_gpu",
    # inputs
    "ModelSpec", "TrainConfig", "Parallelism", "SearchSpace", "GPU", "ProbeOptions", "RunOptions",
    "Method", "Precision", "Optimizer", "Attention", "Sharding", "Offload",
    # results
    "Breakdown", "Term", "Verdict", "FitResult", "Candidate", "Suggestion", "ProbeResult", "ProbeStatus",
    "TuneResult", "RunResult", "RunOutcome", "Replan", "LlamaFactoryConfig",
    # errors
    "MemplanError", "ConfigError", "UnknownModel", "UnsupportedModel", "UnknownGPU", "MissingExtra", "ExitCode",
]


def __getattr__(name: str) -> object:
    if name == "train_with_retune":  # imports transformers (for its TrainerCallback): only when asked for
        from memplan.run.hf import train_with_retune

        return train_with_retune
    raise AttributeError(f"module 'memplan' has no attribute {name!r}")
