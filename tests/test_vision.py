"""Images in a VL step (issue 16): the visual input from image_max_pixels and a LLaMA-Factory YAML, the analytic
image forward (memplan.predict.vision) against the exact trace of the real transformers model on tiny configs,
and against the CPU allocator's real peak for a tiny Qwen2.5-VL."""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml

from memplan.cli import main
from memplan.errors import ConfigError
from memplan.formats.llamafactory import config_from_llamafactory
from memplan.predict.estimator import estimate
from memplan.spec.catalog import resolve_model
from memplan.spec.stacks import Stack
from memplan.spec.train import Method, Precision, TrainConfig, train_from_dict
from memplan.spec.visual import VisualInput, image_grid
from memplan.testing.tiny import tiny_spec

# in-vocabulary special tokens for the tiny configs (4096 tokens): the real ids (151655 ...) lie outside them
_IDS = dict(image_token_id=4000, video_token_id=4001, vision_start_token_id=4002, vision_end_token_id=4003)


def _tiny(arch: str):  # noqa: ANN202
    spec = tiny_spec(arch)
    return dataclasses.replace(spec, config={**spec.config, **_IDS})


@pytest.mark.parametrize(("kind", "patch", "grid", "tokens"), [
    # 768 x 768 (LLaMA-Factory's default image_max_pixels): smart_resize rounds 768 / 28 = 27.4 to 27 -> 756 px,
    # 54 x 54 patches of 14, 729 tokens after the 2 x 2 merge; Qwen3-VL: 768 / 32 = 24 -> 48 x 48 patches of 16
    ("qwen2_5_vl", 14, (54, 54), 729), ("qwen3_vl", 16, (48, 48), 576)])
def test_image_max_pixels_sets_the_patches_and_visual_tokens(kind, patch, grid, tokens):
    g = image_grid(kind, {"patch_size": patch}, VisualInput())
    assert (g.h, g.w) == grid and g.tokens == tokens and g.patches == 4 * tokens
    # Qwen3-VL's processor floors an image at 65536 pixels (its shortest_edge): a 128 x 128 image grows to 256 x 256
    small = image_grid("qwen3_vl", {"patch_size": 16}, VisualInput(image_max_pixels=128 * 128))
    assert (small.h, small.w) == (16, 16)


def _lf(**keys: object) -> dict:
    base = dict(model_name_or_path="Qwen/Qwen3-VL-4B-Instruct", stage="sft", do_train=True, finetuning_type="lora",
                template="qwen3_vl_nothink", cutoff_len=2048, bf16=True)
    return {**base, **keys}


def test_a_yaml_names_its_images_through_template_and_dataset():
    """examples/train_lora/qwen3vl_lora_sft.yaml: mllm_demo (two images in its largest samples) beside text data."""
    lf = config_from_llamafactory(_lf(dataset="mllm_demo,identity,alpaca_en_demo", image_max_pixels=262144))
    assert lf.train.visual == VisualInput(images=2, image_max_pixels=262144, source=lf.train.visual.source,
                                            inferred=True)
    assert "mllm_demo" in lf.train.visual.source
    # a text template feeds no image; text datasets under a VL template neither; an unknown one: 1, said so
    assert config_from_llamafactory(_lf(template="qwen3", dataset="mllm_demo")).train.visual is None
    assert config_from_llamafactory(_lf(dataset="identity")).train.visual is None
    mine = config_from_llamafactory(_lf(dataset="my_photos")).train.visual
    assert mine is not None and mine.images == 1 and "assumed" in mine.source
    warned = config_from_llamafactory(_lf(dataset="mllm_video_demo,mllm_demo", freeze_vision_tower=False))
    assert any("videos are not costed" in w for w in warned.not_modelled)
    assert any(w.startswith("freeze_vision_tower=false") for w in warned.not_modelled)
    with pytest.raises(ConfigError, match="image_max_pixels"):
        config_from_llamafactory(_lf(dataset="mllm_demo", image_max_pixels="big"))


def test_text_only_configs_keep_their_keys_and_images_round_trip():
    assert "visual" not in TrainConfig().to_dict()
    train = TrainConfig().with_(images=2, image_max_pixels=112 * 112)
    assert train.visual == VisualInput(images=2, image_max_pixels=112 * 112)
    assert train_from_dict(json.loads(json.dumps(train.to_dict()))).visual == train.visual


def test_images_raise_a_catalog_vl_estimate_and_must_fit_the_sequence(capsys):
    spec = resolve_model("Qwen/Qwen2.5-VL-7B-Instruct")
    train = TrainConfig(seq_len=2048, stack=Stack.LLAMAFACTORY)
    text, image = estimate(spec, train), estimate(spec, train.with_(images=1))
    assert image.peak_allocated_bytes > text.peak_allocated_bytes and "729 visual tokens" in image.note
    with pytest.raises(ConfigError, match="need 1462 positions of the 1024-token sequence"):
        estimate(spec, train.with_(images=2, seq_len=1024))
    assert main(["estimate", "--model", "Qwen/Qwen2.5-VL-7B-Instruct", "--images", "3", "--seq-len", "1024"]) == 2
    assert "raise cutoff_len" in capsys.readouterr().err
    # a count inferred from the dataset (its sample with the most images, each at the largest size) is cut to the
    # images that fit: a real two-image sample of a run that trains has smaller images (LLaMA-Factory's own
    # ktransformers qwen3vlmoe example: mllm_demo's 2 images x 256 tokens in cutoff_len 512)
    inferred = train.with_(seq_len=1024, visual=VisualInput(images=2, source="dataset mllm_demo's most",
                                                            inferred=True))
    cut = estimate(spec, inferred)
    assert cut.peak_allocated_bytes == estimate(spec, train.with_(images=1, seq_len=1024)).peak_allocated_bytes
    assert "1 of its 2 at image_max_pixels fit cutoff_len 1024" in cut.note


@pytest.mark.parametrize(("arch", "method", "stack", "precision", "images"), [
    # LoRA under checkpointing: peft's enable_input_require_grads hooks the patch embedding, the frozen tower saves
    # its activations (LLaMA-Factory: every block unchecked; the hf stack checkpoints them)
    ("qwen2_5_vl", Method.LORA, Stack.LLAMAFACTORY, Precision.BF16, 2),
    # full fine-tuning: the tower records nothing, a transient and its outputs until forward returns (Qwen3-VL's
    # processor floors an image at 256 x 256: 64 tokens)
    ("qwen3_vl", Method.FULL, Stack.LLAMAFACTORY, Precision.FP32, 1),
])
def test_the_image_forward_matches_the_exact_trace(arch, method, stack, precision, images):
    """Measured (seq 256, images of 224 x 224 / 256 x 256, b1 x 1 and b2 x 2 images, bf16 / fp32; Qwen2.5-VL,
    Qwen2-VL, Qwen3-VL, Qwen3-VL-MoE; LoRA and full; both stacks): within 0.05 % of the exact trace, except a bf16
    full fine-tune of Qwen2.5-VL at b2 x 2 images, -0.46 %."""
    from memplan.trace.exact import exact_estimate

    spec = _tiny(arch)
    train = TrainConfig(method=method, stack=stack, precision=precision, seq_len=128, batch_size=1,
                        visual=VisualInput(images=images, image_max_pixels=112 * 112))
    exact = exact_estimate(spec, train, device="cpu")
    analytic = estimate(spec, train, device="cpu")
    text = estimate(spec, train.with_(visual=None), device="cpu")
    assert analytic.trainable_params == exact.trainable_params
    assert analytic.peak_allocated_bytes > text.peak_allocated_bytes
    assert abs(analytic.peak_allocated_bytes / exact.peak_allocated_bytes - 1) < 0.01


def test_a_tiny_qwen2_5_vl_image_step_matches_the_cpu_truth():
    """The real step on the CPU allocator (LLaMA-Factory LoRA, checkpointing, an image of 112 x 112: 64 patches,
    16 visual tokens). Measured: analytic -0.07 %, exact -0.06 %; full fine-tuning -0.002 % / +0.002 %."""
    from memplan.testing.truth import measure_cpu_peak

    spec = _tiny("qwen2_5_vl")
    train = TrainConfig(method=Method.LORA, stack=Stack.LLAMAFACTORY, precision=Precision.FP32, seq_len=64,
                        visual=VisualInput(images=1, image_max_pixels=112 * 112))
    truth = measure_cpu_peak(spec, train)
    analytic = estimate(spec, train, device="cpu").peak_allocated_bytes
    without = estimate(spec, train.with_(visual=None), device="cpu").peak_allocated_bytes
    assert abs(analytic / truth.peak_bytes - 1) < 0.01
    assert truth.peak_bytes - without > 0.5 * (analytic - without)  # the images' share is real, not noise


def test_a_vl_yaml_estimates_its_images(tmp_path, capsys):
    path = tmp_path / "qwen3vl_lora_sft.yaml"
    path.write_text(yaml.safe_dump(_lf(dataset="mllm_demo,identity", image_max_pixels=262144,
                                       per_device_train_batch_size=1)))
    assert main(["estimate", "--config", str(path), "--json"]) in (0, 1)
    data = json.loads(capsys.readouterr().out)
    assert data["config"]["visual"]["images"] == 2 and "256 visual tokens" in data["note"]
