"""The LLaMA-Factory keys that change which parameters train (issue #16): freeze_trainable_modules
(TrainConfig.trainable_modules), freeze_extra_modules / additional_target (TrainConfig.extra_modules), use_llama_pro
under LoRA (TrainConfig.trainable_layer_ids): each estimate moves by the amount its source derives, and the analytic
estimate equals the exact trace of the real model (LLaMA-Factory's own CPU step: tests/test_llamafactory_train.py)."""

from __future__ import annotations

import pytest

from memplan.errors import ConfigError
from memplan.formats.llamafactory import config_from_llamafactory
from memplan.predict.estimator import estimate
from memplan.predict.layout import Layout
from memplan.spec.catalog import resolve_model
from memplan.spec.model import ModelSpec
from memplan.spec.stacks import Stack
from memplan.spec.train import Method, Precision, TrainConfig
from memplan.testing.tiny import TINY_CONFIGS

BASE = {"model_name_or_path": "meta-llama/Meta-Llama-3-8B", "do_train": True}
KW = dict(seq_len=1024, batch_size=2, stack=Stack.LLAMAFACTORY, optimizer="adamw_torch")


def _train(**kw: object) -> TrainConfig:
    from memplan.spec.optimizers import Optimizer

    return TrainConfig(**{**KW, "optimizer": Optimizer.ADAMW, **kw})  # type: ignore[arg-type]


def test_trainable_modules_train_only_those_parts_of_the_trained_layers() -> None:
    """freeze mlp: each trained layer's MLP (3 x H x I) alone trains; AdamW's fp32 states shrink by 8 B per
    parameter of its attention and norms."""
    spec = resolve_model("llama-3-8b")
    whole, mlp = (estimate(spec, _train(method=Method.FREEZE, trainable_modules=m)) for m in (("all",), ("mlp",)))
    h, i = spec.hidden_size, spec.intermediate_size
    assert mlp.trainable_params == 2 * 3 * h * i  # the last 2 layers (freeze_trainable_layers' default)
    assert whole.term("optimizer_states") - mlp.term("optimizer_states") == \
        8 * (whole.trainable_params - mlp.trainable_params)
    with pytest.raises(ConfigError, match="trainable-modules apply to freeze"):
        TrainConfig(method=Method.LORA, trainable_modules=("mlp",))


def test_extra_modules_train_the_embedding_in_place_under_freeze_and_as_a_copy_under_lora() -> None:
    """freeze_extra_modules embed_tokens: (V, H) more fp32 weights (from the bf16 base: +2 B each), gradient and
    AdamW states, and every frozen layer below on the backward path; additional_target: the copy beside the
    frozen original (+4 B each)."""
    spec = resolve_model("llama-3-8b")
    vh = spec.vocab_size * spec.hidden_size
    plain, extra = (estimate(spec, _train(method=Method.FREEZE, extra_modules=e)) for e in ((), ("embed_tokens",)))
    assert extra.trainable_params - plain.trainable_params == vh
    assert extra.term("weights") - plain.term("weights") == vh * (4 - 2)
    assert extra.term("optimizer_states") - plain.term("optimizer_states") == 8 * vh
    assert extra.term("activations") > 10 * plain.term("activations")  # 30 frozen layers now save their tape
    lora, copy = (estimate(spec, _train(method=Method.LORA, extra_modules=e)) for e in ((), ("lm_head",)))
    assert copy.trainable_params - lora.trainable_params == vh
    assert copy.term("weights") - lora.term("weights") == 4 * vh


def test_llama_pro_under_lora_puts_the_adapters_on_the_expanded_blocks_only() -> None:
    """8 of 32 layers adapted. Without checkpointing nothing is saved below layer 3; with LLaMA-Factory's, the
    frozen layers between the blocks are not checkpointed (no trainable parameter) yet on the backward path (peft's
    enable_input_require_grads): their whole tape is saved, more than plain LoRA's checkpointed inputs."""
    spec = resolve_model("llama-3-8b")
    for ckpt in (False, True):
        every, pro = (estimate(spec, _train(method=Method.LORA, llama_pro=p, freeze_trainable_layers=8,
                                            checkpointing=ckpt)) for p in (False, True))
        assert pro.trainable_params * 4 == every.trainable_params
        assert (pro.term("activations") < every.term("activations")) != ckpt


def test_the_keys_are_read_exported_and_warned() -> None:
    from memplan.formats.llamafactory import llamafactory_yaml

    lf = config_from_llamafactory({**BASE, "finetuning_type": "freeze", "freeze_trainable_modules": "mlp,self_attn",
                                   "freeze_extra_modules": "embed_tokens,norm"})
    assert lf.train.trainable_modules == ("mlp", "self_attn") and lf.train.extra_modules == ("embed_tokens",)
    assert len(lf.not_modelled) == 1 and lf.not_modelled[0].startswith("freeze_extra_modules=norm")
    lora = config_from_llamafactory({**BASE, "additional_target": "lm_head", "use_llama_pro": True,
                                     "freeze_trainable_layers": 4, "freeze_extra_modules": "embed_tokens"})
    assert lora.train.extra_modules == ("lm_head",) and lora.train.llama_pro and not lora.not_modelled
    spec = resolve_model("llama-3-8b")
    for cfg in (lf, lora):
        back = config_from_llamafactory(llamafactory_yaml(spec, cfg.train)).train
        assert back == cfg.train.with_(lora_alpha=back.lora_alpha)
    odd = config_from_llamafactory({**BASE, "finetuning_type": "freeze", "freeze_trainable_modules": "mlp.up_proj"})
    assert odd.train.trainable_modules == ("all",) and odd.not_modelled  # estimated as whole layers, named


def test_a_tied_head_under_freeze_is_the_embedding() -> None:
    """LLaMA-Factory lists a tied lm_head under embed_tokens only ("Module lm_head is not found"); training
    embed_tokens trains the head too (one tensor)."""
    spec = ModelSpec.from_config_dict(TINY_CONFIGS["qwen2"], name="tiny-qwen2")
    with pytest.raises(ConfigError, match="ties it to embed_tokens"):
        Layout.of(spec, TrainConfig(method=Method.FREEZE, extra_modules=("lm_head",)))
    lay = Layout.of(spec, TrainConfig(method=Method.FREEZE, extra_modules=("embed_tokens",)))
    assert lay.head_trains and lay.tied_trains and lay.extra_params() == spec.vocab_size * spec.hidden_size


@pytest.mark.parametrize(("method", "ckpt", "keys"), [
    (Method.FREEZE, False, dict(trainable_modules=("mlp",))),
    (Method.FREEZE, True, dict(trainable_modules=("self_attn", "post_attention_layernorm"),
                               extra_modules=("embed_tokens",))),
    (Method.LORA, False, dict(extra_modules=("lm_head",))),
], ids=["freeze-mlp", "freeze-attn-norm-embed-ckpt", "lora-head-copy"])
def test_analytic_equals_the_exact_trace(method: Method, ckpt: bool, keys: dict) -> None:
    """Tiny llama, 4 layers, bf16, LLaMA-Factory's stack, b2 x s128 (measured: -0.0001 %, -0.0001 %, +0.023 %). LoRA
    under LLaMA-Factory's checkpointing (llama_pro, peft's input grads) is checked against LLaMA-Factory's own run
    (tests/test_llamafactory_train.py)."""
    from memplan.trace.exact import exact_estimate

    spec = ModelSpec.from_config_dict(dict(TINY_CONFIGS["llama"], num_hidden_layers=4), name="tiny-llama4")
    train = TrainConfig(method=method, precision=Precision.BF16, checkpointing=ckpt, batch_size=2, seq_len=128,
                        stack=Stack.LLAMAFACTORY, freeze_trainable_layers=2, **keys)
    exact, analytic = exact_estimate(spec, train, device="cpu"), estimate(spec, train, device="cpu")
    assert analytic.trainable_params == exact.trainable_params
    assert abs(analytic.peak_allocated_bytes / exact.peak_allocated_bytes - 1) < 0.01
