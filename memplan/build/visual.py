"""The batch of a vision-language step as LLaMA-Factory's collator hands it to the model: token ids with each image's
`<|vision_start|> <|image_pad|> x tokens <|vision_end|>` inside the sequence, pixel_values (patches, C x T x P x P)
in fp32, image_grid_thw, and the M-RoPE position ids (3, B, S) the collator computes with the model's
get_rope_index (LLaMA-Factory data/collator.py MultiModalDataCollatorForSeq2Seq: `features["position_ids"],
features["rope_deltas"] = self.get_rope_func(**rope_index_kwargs)`). Real CPU tensors; the trace turns them into
fake ones (memplan.trace.step)."""

from __future__ import annotations

from typing import Any

from memplan._imports import try_import
from memplan.errors import ConfigError
from memplan.spec.model import ModelSpec
from memplan.spec.train import TrainConfig
from memplan.spec.visual import feeds_images, fits_sequence, image_grid


def has_images(spec: ModelSpec, train: TrainConfig) -> bool:
    """The step feeds images: a Qwen-VL tower memplan costs and at least one image per sample."""
    return feeds_images(spec.family.vision, train.visual)


def visual_batch(model: Any, spec: ModelSpec, train: TrainConfig, *, seed: int = 0) -> dict[str, Any]:
    """input_ids (B, S), pixel_values, image_grid_thw, position_ids; plus, under `precomputed`, the tower's
    data-dependent index tensors (transformers 5.24 vision_utils: image_position_ids, image_cu_seqlens, the
    Qwen2.5-VL window index), which a fake-tensor trace cannot compute from values it does not have."""
    torch = try_import("torch")
    vu = try_import("transformers").vision_utils
    assert train.visual is not None
    vc = spec.config.get("vision_config") or {}
    grid = image_grid(spec.family.vision, vc, train.visual)
    visual = fits_sequence(train.visual, grid, train.seq_len)
    n, b, s = visual.images, train.batch_size, train.seq_len
    cfg = model.config
    vocab = model.get_input_embeddings().num_embeddings
    special = (cfg.image_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id)
    if max(special) >= vocab:
        raise ConfigError(f"{spec.name}: its image token ids {special} lie outside its vocabulary of {vocab}")
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, min(special), (b, s), generator=gen)
    for row in range(b):
        at = 0
        for _ in range(n):
            ids[row, at] = cfg.vision_start_token_id
            ids[row, at + 1:at + 1 + grid.tokens] = cfg.image_token_id
            ids[row, at + 1 + grid.tokens] = cfg.vision_end_token_id
            at += grid.tokens + 2
    thw = torch.tensor([[grid.t, grid.h, grid.w]] * (b * n))
    v = cfg.vision_config  # the built config: its class defaults filled in
    width = v.in_channels * v.temporal_patch_size * v.patch_size ** 2  # PatchEmbed's view (l.116-121)
    pixels = torch.randn(b * n * grid.patches, width, generator=gen)  # the image processor's fp32 patches
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    types = (ids == cfg.image_token_id).int()
    position_ids, _ = base.model.get_rope_index(ids, mm_token_type_ids=types, image_grid_thw=thw)
    merge = v.spatial_merge_size
    pre = {"image_position_ids": vu.get_vision_position_ids(thw, merge),
           "image_cu_seqlens": vu.get_vision_cu_seqlens(thw)}
    if spec.family.vision == "qwen2_5_vl":
        index, cu = vu.get_vision_window_index(thw, merge, v.window_size, v.patch_size)
        pre.update(image_window_index=index, image_cu_window_seqlens=cu)
    return {"input_ids": ids, "pixel_values": pixels, "image_grid_thw": thw, "position_ids": position_ids,
            "precomputed": pre}

