"""memplan: will it fit? Peak-VRAM prediction, exact tracing, probing and tuning for LLM fine-tuning.

Nothing heavy is imported here: torch / transformers / peft / optuna load inside the functions that need them.
"""

from memplan.fit import fit
from memplan.predict.estimator import estimate
from memplan.probe.launch import ProbeOptions, probe
from memplan.spec.catalog import resolve_model
from memplan.spec.hardware import resolve_gpu
from memplan.spec.train import TrainConfig
from memplan.trace.exact import exact_estimate
from memplan.tune.study import tune

__all__ = ["ProbeOptions", "TrainConfig", "estimate", "exact_estimate", "fit", "probe", "resolve_gpu",
           "resolve_model", "tune"]
