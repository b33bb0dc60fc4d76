"""The visual input of a vision-language run, torch-free: images per sample, their size, and what that makes of them
for the Qwen-VL towers (vision patches, visual tokens in the decoder's sequence).

LLaMA-Factory 0.9.5 (data/mm_plugin.py) first resizes each image to at most `image_max_pixels` (default 768 x 768)
and at least `image_min_pixels` (default 32 x 32), keeping its aspect ratio (BasePlugin._preprocess_image
l.218-235: `int(width * f), int(height * f)` with f = sqrt(max / (w h))), then at least 28 x 28 (Qwen2VLPlugin
l.1912-1916); the model's image processor then rounds both sides to multiples of patch_size x merge_size
(transformers 5.24 models/qwen2_vl/image_processing_qwen2_vl.py smart_resize l.63-89) within its own min / max
pixels. Each image is `grid_thw` = (1, h / patch, w / patch) patches (a still image is repeated temporal_patch_size
times, one temporal patch) and expands to patches / merge_size^2 `<|image_pad|>` tokens (Qwen2VLPlugin
.process_messages: `image_grid_thw[i].prod() // merge_length`). cutoff_len truncates the tokenized sample,
image tokens included (data/processor/supervised.py l.68-81, infer_seqlen), and a truncated image makes
transformers refuse the batch (Qwen2_5_VLModel.get_placeholder_mask: "Image features and image tokens do not
match"): the visual tokens of a sample must fit in its sequence.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from memplan.errors import Problem

# the image processor's own pixel bounds (size shortest_edge / longest_edge) as the checkpoints ship them in
# preprocessor_config.json: Qwen/Qwen2-VL-*, Qwen/Qwen2.5-VL-*: min_pixels 3136, max_pixels 12845056; Qwen/Qwen3-VL-*:
# shortest_edge 65536, longest_edge 16777216 (Qwen2VLImageProcessor, patch_size 16)
PROCESSOR_PIXELS: dict[str, tuple[int, int]] = {"qwen2_vl": (56 * 56, 28 * 28 * 16384),
                                                "qwen2_5_vl": (56 * 56, 28 * 28 * 16384),
                                                "qwen3_vl": (256 * 256, 4096 * 4096)}
DEFAULT_IMAGE_MAX_PIXELS = 768 * 768  # LLaMA-Factory data_args / model_args image_max_pixels
DEFAULT_IMAGE_MIN_PIXELS = 32 * 32


@dataclass(frozen=True, slots=True, kw_only=True)
class VisualInput:
    """Images in the sample with the most of them, each taken as a square of image_max_pixels (the largest an image
    becomes after LLaMA-Factory's resize); which of the tower's parts train (LLaMA-Factory freeze_vision_tower /
    freeze_multi_modal_projector, both frozen by default). `source` says where `images` came from."""

    images: int = 1
    image_max_pixels: int = DEFAULT_IMAGE_MAX_PIXELS
    image_min_pixels: int = DEFAULT_IMAGE_MIN_PIXELS
    tower_trains: bool = False  # freeze_vision_tower: false (the patch embedding and the blocks)
    projector_trains: bool = False  # freeze_multi_modal_projector: false (the merger)
    source: str = ""
    inferred: bool = False  # `images` guessed from the dataset (its sample with the most), not given by the user

    def problems(self) -> list[str | Problem]:
        out: list[str | Problem] = []
        if not isinstance(self.images, int) or isinstance(self.images, bool) or self.images < 0:
            out.append(Problem("images", f"{{}} must be 0 or a positive integer (images per sample), got "
                                         f"{self.images!r}"))
        for name in ("image_max_pixels", "image_min_pixels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                out.append(Problem(name, f"{{}} must be a positive integer, got {value!r}"))
        return out

    def describe(self) -> str:
        return (f"{self.images} image{'s' if self.images != 1 else ''} per sample at image_max_pixels "
                f"{self.image_max_pixels}" + (f" ({self.source})" if self.source else ""))


@dataclass(frozen=True, slots=True, kw_only=True)
class ImageGrid:
    """One image as the tower sees it: grid_thw in patches, and its cost in the decoder."""

    t: int
    h: int
    w: int
    merge: int  # spatial_merge_size

    @property
    def patches(self) -> int:
        return self.t * self.h * self.w

    @property
    def tokens(self) -> int:
        return self.patches // (self.merge * self.merge)


def _lf_resize(side_w: int, side_h: int, max_pixels: int, min_pixels: int) -> tuple[int, int]:
    """LLaMA-Factory's BasePlugin._preprocess_image (l.218-235) + Qwen2VLPlugin's 28-pixel floor (l.1912-1916)."""
    w, h = side_w, side_h
    if w * h > max_pixels:
        f = math.sqrt(max_pixels / (w * h))
        w, h = int(w * f), int(h * f)
    if w * h < min_pixels:
        f = math.sqrt(min_pixels / (w * h))
        w, h = int(w * f), int(h * f)
    return max(w, 28), max(h, 28)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """transformers 5.24 image_processing_qwen2_vl.py smart_resize (l.63-89), which the Qwen3-VL processor uses too."""
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def image_grid(kind: str, vision_config: dict[str, Any], visual: VisualInput) -> ImageGrid:
    """The grid of the largest image `visual` allows, for the tower `kind` (Family.vision): a square of
    image_max_pixels after LLaMA-Factory's resize, then the processor's smart_resize."""
    patch = patch_size(kind, vision_config)
    merge = int(vision_config.get("spatial_merge_size", 2))
    side = math.isqrt(visual.image_max_pixels)
    w, h = _lf_resize(side, side, visual.image_max_pixels, visual.image_min_pixels)
    lo, hi = PROCESSOR_PIXELS[kind]
    hh, ww = smart_resize(h, w, patch * merge, lo, hi)
    return ImageGrid(t=1, h=hh // patch, w=ww // patch, merge=merge)


def patch_size(kind: str, vision_config: dict[str, Any]) -> int:
    """The tower's patch side: the vision config's, else the Config class default (Qwen2VLVisionConfig /
    Qwen2_5_VLVisionConfig 14, Qwen3VLVisionConfig 16)."""
    return int(vision_config.get("patch_size", 16 if kind == "qwen3_vl" else 14))


def fits_sequence(visual: VisualInput, grid: ImageGrid, seq_len: int) -> VisualInput:
    """Each image takes `<|vision_start|>`, its tokens and `<|vision_end|>` of the sample's cutoff_len positions;
    more and LLaMA-Factory truncates them, which transformers refuses (module docstring). An image count inferred
    from the dataset (`source`: its sample with the most images, each at image_max_pixels) that does not fit is cut
    to the images that do (a real sample with that many images has smaller ones, or the run would fail): the
    VisualInput to cost. A count the user gave that does not fit, or not even one image: a ConfigError."""
    per = grid.tokens + 2
    need = visual.images * per
    if need <= seq_len:
        return visual
    if visual.inferred and seq_len // per >= 1:
        fit = seq_len // per
        return dataclasses.replace(visual, images=fit, source=f"{visual.source}; {fit} of its {visual.images} at "
                                                               f"image_max_pixels fit cutoff_len {seq_len}")
    from memplan.errors import ConfigError

    raise ConfigError(f"{visual.images} image{'s' if visual.images > 1 else ''} of {grid.tokens} visual tokens "
                      f"each (image_max_pixels {visual.image_max_pixels}) need {need} positions of the "
                      f"{seq_len}-token sequence: LLaMA-Factory truncates them and transformers refuses the "
                      "batch; raise cutoff_len (--seq-len) or lower image_max_pixels")


def costed(kind: str) -> bool:
    """The towers whose image forward memplan models (Family.vision kinds)."""
    return kind in PROCESSOR_PIXELS


def feeds_images(kind: str, visual: VisualInput | None) -> bool:
    """A step of the tower `kind` (Family.vision) gets images: a tower memplan costs and at least one image."""
    return visual is not None and visual.images > 0 and costed(kind)
