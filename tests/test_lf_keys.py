"""LLaMA-Factory keys that change memory (issue #16): each modelled where its source makes the effect knowable
(checked against the CPU truth of the real step, or byte for byte against the real storage), else named with the
reason in one warning line; the README's key table is the code's."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from memplan.errors import ConfigError
from memplan.formats import llamafactory as lf
from memplan.formats.llamafactory import config_from_llamafactory, key_table_markdown, read_llamafactory
from memplan.predict.estimator import estimate
from memplan.predict.layout import Layout
from memplan.predict.weights import model_states, quantized_bytes
from memplan.spec.catalog import resolve_model
from memplan.spec.model import ModelSpec
from memplan.spec.stacks import Stack
from memplan.spec.train import Method, Precision, QuantMethod, TrainConfig
from memplan.testing.tiny import TINY_CONFIGS, tiny_spec

ROOT = Path(__file__).resolve().parents[1]
BASE = {"model_name_or_path": "meta-llama/Meta-Llama-3-8B", "do_train": True}


def _spec4() -> ModelSpec:
    return ModelSpec.from_config_dict(dict(TINY_CONFIGS["llama"], num_hidden_layers=4), name="tiny-llama4")


# ---- freeze: which layers train ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("n", "pro", "ids"), [(2, False, [2, 3]), (-1, False, [0]), (-3, False, [0, 1, 2]),
                                               (9, False, [0, 1, 2, 3]), (-9, False, [0, 1, 2, 3]),
                                               (2, True, [1, 3]), (4, True, [0, 1, 2, 3]), (1, True, [3])])
def test_trainable_layer_ids_follow_llamafactory(n: int, pro: bool, ids: list[int]) -> None:
    """model/adapter.py _setup_freeze_tuning: last N, first -N, or LLaMA Pro's stride - 1, 2 x stride - 1, ..."""
    train = TrainConfig(method=Method.FREEZE, freeze_trainable_layers=n, llama_pro=pro)
    assert list(train.trainable_layer_ids(4)) == ids


def test_llama_pro_needs_a_divisor_and_freeze_a_nonzero_count() -> None:
    with pytest.raises(ConfigError, match="must divide the 4 layers"):
        TrainConfig(method=Method.FREEZE, freeze_trainable_layers=3, llama_pro=True).trainable_layer_ids(4)
    with pytest.raises(ConfigError, match="non-zero"):
        TrainConfig(method=Method.FREEZE, freeze_trainable_layers=0)


def test_training_the_first_layers_keeps_the_frozen_ones_above_on_the_backward_path() -> None:
    """Same parameter count, more activations: every layer above the lowest trained one saves what its input's
    gradient needs; LLaMA-Factory checkpoints only layers with trainable parameters, so those frozen layers save
    their tape even with checkpointing (the HF stack checkpoints them: only their inputs)."""
    spec = resolve_model("llama-3-8b")
    kw = dict(method=Method.FREEZE, seq_len=1024, batch_size=2, stack=Stack.LLAMAFACTORY)
    last, first = (estimate(spec, TrainConfig(freeze_trainable_layers=n, **kw)) for n in (2, -2))
    assert first.trainable_params == last.trainable_params
    assert first.term("activations") > 10 * last.term("activations")
    hf = estimate(spec, TrainConfig(freeze_trainable_layers=-2, **{**kw, "stack": Stack.HF}))
    assert last.term("activations") < hf.term("activations") < first.term("activations")


@pytest.mark.integration  # 30-60 s each on two shared cores
@pytest.mark.parametrize(("n", "ckpt", "pro"), [(-1, False, False), (-2, True, False), (2, True, True)],
                         ids=["first1-nockpt", "first2-ckpt", "llama-pro-ckpt"])
def test_freeze_layer_sets_within_half_a_percent_of_the_cpu_step(n: int, ckpt: bool, pro: bool) -> None:
    """Measured: -0.00 %, -0.33 %, -0.35 % (tiny llama, 4 layers, bf16, LLaMA-Factory's checkpointing)."""
    from memplan.testing.truth import measure_cpu_peak

    spec = _spec4()
    train = TrainConfig(method=Method.FREEZE, precision=Precision.BF16, batch_size=1, seq_len=256,
                        checkpointing=ckpt, freeze_trainable_layers=n, llama_pro=pro, stack=Stack.LLAMAFACTORY)
    truth = measure_cpu_peak(spec, train).peak_bytes
    predicted = estimate(spec, train, device="cpu").peak_allocated_bytes
    assert abs(predicted - truth) / truth < 0.005, (predicted, truth)


def test_freeze_keys_are_read(tmp_path: Path) -> None:
    raw = {**BASE, "finetuning_type": "freeze", "freeze_trainable_layers": -4}
    assert list(config_from_llamafactory(raw).train.trainable_layer_ids(32)) == [0, 1, 2, 3]
    pro = config_from_llamafactory({**raw, "freeze_trainable_layers": 8, "use_llama_pro": True})
    assert list(pro.train.trainable_layer_ids(32)) == [3, 7, 11, 15, 19, 23, 27, 31] and not pro.not_modelled
    with pytest.raises(ConfigError, match="use_llama_pro is only valid"):
        config_from_llamafactory({**BASE, "finetuning_type": "full", "use_llama_pro": True})
    lora = config_from_llamafactory({**BASE, "finetuning_type": "lora", "use_llama_pro": True})
    assert lora.not_modelled and "expanded blocks" in lora.not_modelled[0]
