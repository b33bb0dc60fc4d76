"""Parameter counts of the Qwen-VL vision towers (patch embedding, blocks, mergers), from config.json's
vision_config: frozen in training (LLaMA-Factory's freeze_vision_tower / freeze_multi_modal_projector), so only
their weights cost memory on text-only inputs. One formula per `Family.vision` kind; sources are transformers 5.24
`models/<type>/modeling_<type>.py` and the vision Config class defaults (used when config.json omits a key).
"""

from __future__ import annotations

from typing import Any


def _linear(n_in: int, n_out: int) -> list[int]:
    return [n_in * n_out, n_out]  # nn.Linear(n_in, n_out), bias=True: its weight and bias


def _qwen2_5_vl(vc: dict[str, Any]) -> list[int]:
    # modeling_qwen2_5_vl.py; Qwen2_5_VLVisionConfig defaults (configuration_qwen2_5_vl.py l.53-61)
    h, i, out = vc.get("hidden_size", 3584), vc.get("intermediate_size", 3420), vc.get("out_hidden_size", 3584)
    c = vc.get("in_channels", vc.get("in_chans", 3))
    patch = [c * vc.get("temporal_patch_size", 2) * vc.get("patch_size", 14) ** 2 * h]  # Conv3d, no bias (l.114)
    # a block (l.342-348): 2 RMSNorm(h) + qkv Linear(h, 3h, bias) + proj Linear(h, h, bias) (l.266-267)
    # + Qwen2_5_VLMLP(bias=True): gate/up Linear(h, I) + down Linear(I, h), with biases (l.90-92)
    block = [h, h] + _linear(h, 3 * h) + _linear(h, h) + 2 * _linear(h, i) + _linear(i, h)
    m = h * vc.get("spatial_merge_size", 2) ** 2  # merger (l.185-193): RMSNorm(h), Linear(m, m), Linear(m, out)
    merger = [h] + _linear(m, m) + _linear(m, out)
    return patch + vc.get("depth", 32) * block + merger


def _qwen2_vl(vc: dict[str, Any]) -> list[int]:
    # modeling_qwen2_vl.py Qwen2VisionTransformerPretrainedModel (l.653-668); Qwen2VLVisionConfig defaults
    # (configuration_qwen2_vl.py l.33-43): embed_dim is the ViT's width, hidden_size the merger's output (the
    # decoder's); in_channels is the key PatchEmbed reads (a 4.41 file's in_chans is not)
    e, out = vc.get("embed_dim", 1280), vc.get("hidden_size", 3584)
    i = int(e * vc.get("mlp_ratio", 4))  # Qwen2VLVisionBlock: mlp_hidden_dim = int(embed_dim * mlp_ratio) (l.432)
    patch = [vc.get("in_channels", 3) * vc.get("temporal_patch_size", 2) * vc.get("patch_size", 14) ** 2 * e]
    # PatchEmbed: Conv3d(bias=False) (l.268). A block (l.427-434): 2 nn.LayerNorm(e) (weight + bias),
    # VisionAttention qkv Linear(e, 3e, bias) + proj Linear(e, e) (l.351-352), VisionMlp fc1 / fc2 (l.298-300)
    block = [e] * 4 + _linear(e, 3 * e) + _linear(e, e) + _linear(e, i) + _linear(i, e)
    m = e * vc.get("spatial_merge_size", 2) ** 2  # PatchMerger (l.279-288): LayerNorm(e), Linear(m, m), Linear(m, out)
    merger = [e, e] + _linear(m, m) + _linear(m, out)
    return patch + vc.get("depth", 32) * block + merger


def _qwen3_vl(vc: dict[str, Any]) -> list[int]:
    # modeling_qwen3_vl.py Qwen3VLVisionModel (l.621-664; modeling_qwen3_vl_moe.py's is the same code);
    # Qwen3VLVisionConfig defaults (configuration_qwen3_vl.py l.44-56, Qwen3VLMoeVisionConfig's are equal)
    h, i, out = vc.get("hidden_size", 1152), vc.get("intermediate_size", 4304), vc.get("out_hidden_size", 3584)
    c, k = vc.get("in_channels", 3), vc.get("temporal_patch_size", 2) * vc.get("patch_size", 16) ** 2
    patch = [c * k * h, h]  # Qwen3VLVisionPatchEmbed: Conv3d(bias=True) (l.100)
    pos = [vc.get("num_position_embeddings", 2304) * h]  # pos_embed = nn.Embedding(num_position_embeddings, h) (l.639)
    # Qwen3VLVisionBlock (l.328-334): 2 nn.LayerNorm(h) (weight + bias), qkv Linear(h, 3h, bias) + proj
    # Linear(h, h) (l.252-253), Qwen3VLVisionMLP linear_fc1 / linear_fc2 with biases (l.83-84)
    block = [h] * 4 + _linear(h, 3 * h) + _linear(h, h) + _linear(h, i) + _linear(i, h)
    m = h * vc.get("spatial_merge_size", 2) ** 2
    # Qwen3VLVisionPatchMerger (l.171-179): LayerNorm over h (the merger) or over m (use_postshuffle_norm: the
    # deepstack mergers, one per deepstack_visual_indexes entry), Linear(m, m), Linear(m, out)
    merger = [h, h] + _linear(m, m) + _linear(m, out)
    deepstack = [m, m] + _linear(m, m) + _linear(m, out)
    layers = len(vc.get("deepstack_visual_indexes", (8, 16, 24)))
    return patch + pos + vc.get("depth", 27) * block + merger + layers * deepstack


def _qwen3_5(vc: dict[str, Any]) -> list[int]:
    """Qwen3_5VisionModel (modeling_qwen3_5.py l.1117-1160; the MoE model's tower is the same): Conv3d patch embedding
    with bias (l.963), a learned position table (l.1136), depth blocks of 2 LayerNorm(h) + qkv Linear(h, 3h) + proj
    Linear(h, h) + fc1 Linear(h, I) + fc2 Linear(I, h), all with biases (l.941-952, l.1004-1015, l.1087-1092), and the
    merger: LayerNorm(h), Linear(m, m), Linear(m, out) with m = h x spatial_merge_size^2 (l.974-987). Defaults:
    Qwen3_5VisionConfig."""
    h, i, out = vc.get("hidden_size", 1152), vc.get("intermediate_size", 4304), vc.get("out_hidden_size", 3584)
    c, t, p = vc.get("in_channels", 3), vc.get("temporal_patch_size", 2), vc.get("patch_size", 16)
    patch = [c * t * p * p * h, h]
    pos = [vc.get("num_position_embeddings", 2304) * h]
    block = [h] * 4 + _linear(h, 3 * h) + _linear(h, h) + _linear(h, i) + _linear(i, h)
    m = h * vc.get("spatial_merge_size", 2) ** 2
    merger = [h, h] + _linear(m, m) + _linear(m, out)
    return patch + pos + vc.get("depth", 27) * block + merger


TOWERS = {"qwen2_5_vl": _qwen2_5_vl, "qwen2_vl": _qwen2_vl, "qwen3_vl": _qwen3_vl, "qwen3_5": _qwen3_5}


def vision_params(kind: str, vision_config: Any) -> int:
    """Parameters of the `kind` tower (Family.vision) described by `vision_config`; 0 for no tower."""
    return sum(vision_tensors(kind, vision_config))


def vision_tensors(kind: str, vision_config: Any) -> tuple[int, ...]:
    """Element counts of the `kind` tower's parameters, one per tensor in the module's order (the patch embedding,
    the blocks, the mergers): what the model load allocates for it; () for no tower."""
    if not kind or not isinstance(vision_config, dict):
        return ()
    return tuple(TOWERS[kind](vision_config))
