"""What a LLaMA-Factory YAML says about the images of a vision-language run (memplan.spec.visual.VisualInput).

LLaMA-Factory feeds images only through a template whose mm_plugin is a Qwen-VL one (data/template.py: qwen2_vl,
qwen3_vl, qwen3_vl_nothink, qwen3_5, qwen3_5_nothink, qwen3_6, keye_vl register get_mm_plugin("qwen2_vl" / "qwen3_vl"));
the images per sample come from the dataset (data/dataset_info.json's "images" column). The sample with the most
images sets the peak: mllm_demo (data/mllm_demo.json) has 1 or 2 per sample; the hub datasets with an images
column are single-image conversations (LLaVA, RLHF-V, ...: taken as 1); a dataset this table does not know is
taken as 1 image per sample, and the estimate says so. Video datasets are not costed: warned.
"""

from __future__ import annotations

from typing import Any

from memplan.errors import ConfigError
from memplan.spec.visual import DEFAULT_IMAGE_MAX_PIXELS, DEFAULT_IMAGE_MIN_PIXELS, VisualInput

# templates whose mm_plugin is Qwen2VLPlugin / Qwen3VLPlugin (LLaMA-Factory 0.9.5 data/template.py)
VL_TEMPLATES = frozenset({"qwen2_vl", "qwen3_vl", "qwen3_vl_nothink", "qwen3_5", "qwen3_5_nothink", "qwen3_6",
                          "keye_vl"})
# most images in one sample: data/mllm_demo.json (6 samples: four with 1 image, two with 2), counted; the hub
# datasets of dataset_info.json with an images column: one image per conversation (taken, not counted here)
IMAGE_DATASETS = {"mllm_demo": 2, "llava_1k_en": 1, "llava_1k_zh": 1, "llava_150k_en": 1, "llava_150k_zh": 1,
                  "pokemon_cap": 1, "mllm_pt_demo": 1, "rlhf_v": 1, "vlfeedback": 1, "rlaif_v": 1}
VIDEO_DATASETS = frozenset({"mllm_video_demo", "mllm_video_audio_demo"})
AUDIO_DATASETS = frozenset({"mllm_audio_demo"})
# dataset_info.json's entries without an images / videos / audios column (LLaMA-Factory v0.9.5)
TEXT_DATASETS = frozenset({
    'identity', 'alpaca_en_demo', 'alpaca_zh_demo', 'glaive_toolcall_en_demo', 'glaive_toolcall_zh_demo',
    'alpaca_en', 'alpaca_zh', 'alpaca_gpt4_en', 'alpaca_gpt4_zh', 'glaive_toolcall_en', 'glaive_toolcall_zh',
    'lima', 'guanaco', 'belle_2m', 'belle_1m', 'belle_0.5m', 'belle_dialog', 'belle_math', 'open_platypus',
    'codealpaca', 'alpaca_cot', 'openorca', 'slimorca', 'mathinstruct', 'firefly', 'wikiqa', 'webqa',
    'webnovel', 'nectar_sft', 'deepctrl', 'adgen_train', 'adgen_eval', 'sharegpt_hyper', 'sharegpt4',
    'sgsc_b2b_entities', 'ultrachat_200k', 'infinity_instruct', 'agent_instruct', 'lmsys_chat', 'evol_instruct',
    'glaive_toolcall_100k', 'cosmopedia', 'stem_zh', 'ruozhiba_gpt4', 'neo_sft', 'magpie_pro_300k',
    'magpie_ultra', 'web_instruct', 'openo1_sft', 'open_thoughts', 'open_r1_math', 'chinese_r1_distill',
    'oasst_de', 'dolly_15k_de', 'alpaca-gpt4_de', 'openschnabeltier_de', 'evol_instruct_de', 'dolphin_de',
    'booksum_de', 'airoboros_de', 'ultrachat_de', 'dlr_web', 'dpo_en_demo', 'dpo_zh_demo', 'dpo_mix_en',
    'dpo_mix_zh', 'ultrafeedback', 'coig_p', 'orca_pairs', 'nectar_rm', 'orca_dpo_de', 'kto_en_demo',
    'kto_mix_en', 'ultrafeedback_kto', 'wiki_demo', 'c4_demo', 'refinedweb', 'redpajama_v2', 'wikipedia_en',
    'wikipedia_zh', 'pile', 'skypile', 'fineweb', 'fineweb_edu', 'cci3_hq', 'cci3_data', 'cci4_base',
    'cci4_cot', 'cci4_extra', 'the_stack', 'starcoder_python'
})
ASSUMED_IMAGES = 1  # a dataset the table does not know, in a multimodal template's run


def _datasets(raw: dict[str, Any]) -> list[str]:
    value = raw.get("dataset")
    names = value if isinstance(value, list) else str(value or "").split(",")
    return [str(n).strip() for n in names if str(n).strip()]


def visual_from_yaml(raw: dict[str, Any]) -> tuple[VisualInput | None, tuple[str, ...]]:
    """(the visual input, warnings) of a YAML; None where no image reaches the model (a text template, or datasets
    known to be text only)."""
    template = str(raw.get("template") or "").lower()
    if template not in VL_TEMPLATES:
        return None, ()
    names = _datasets(raw)
    warnings = tuple(f"dataset {n}: videos are not costed (only images are); the estimate feeds none"
                     for n in names if n in VIDEO_DATASETS)
    unknown = [n for n in names if n not in IMAGE_DATASETS and n not in TEXT_DATASETS
               and n not in VIDEO_DATASETS and n not in AUDIO_DATASETS]
    images = max([IMAGE_DATASETS.get(n, 0) for n in names] + [ASSUMED_IMAGES if unknown else 0])
    if images == 0:
        return None, warnings
    best = max(names, key=lambda n: IMAGE_DATASETS.get(n, ASSUMED_IMAGES if n in unknown else 0))
    source = (f"dataset {best}'s most per sample" if best in IMAGE_DATASETS else
              f"assumed for dataset {', '.join(unknown)}: give --images N for its real count")
    problems, values = [], {}
    for key, default in (("image_max_pixels", DEFAULT_IMAGE_MAX_PIXELS), ("image_min_pixels",
                                                                           DEFAULT_IMAGE_MIN_PIXELS)):
        value = raw.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            problems.append(f"{key} must be a positive integer, got {value!r}")
        values[key] = value
    trains = {}
    for key, field in (("freeze_vision_tower", "tower_trains"), ("freeze_multi_modal_projector",
                                                                  "projector_trains")):
        value = raw.get(key, True)
        if not isinstance(value, bool):
            problems.append(f"{key} must be true or false, got {value!r}")
        trains[field] = value is False
    if problems:
        raise ConfigError(problems)
    warnings += tuple(f"{key}=false (a trained {what}'s saved activations, gradients and optimizer states are not "
                      "modelled: the estimate keeps it frozen)"
                      for key, what, on in (("freeze_vision_tower", "vision tower", trains["tower_trains"]),
                                            ("freeze_multi_modal_projector", "merger", trains["projector_trains"]))
                      if on)
    return VisualInput(images=images, source=source, inferred=True, **values, **trains), warnings
