"""The shipped model catalog (exact config.json fields) and name resolution for `--model`."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from memplan.errors import UnknownModel, UnsupportedModel
from memplan.spec.model import CATALOG_DIR, ModelSpec, load_config_file
from memplan.spec.prequantized import assumed_from_name

# suffixes dropped to make short names; a short name that two entries would share is not registered
_DROP = ("-hf", "-v0.1", "-4k-instruct", "-chat-v1.0", "-base-2407", "-base", "-intermediate-step-1431k-3t",
         "-pt")


# checkpoints released with another entry's architecture, as their own model card says: lower-case hub id -> (that
# entry's hub id, whether the checkpoint's weights are no longer FP8 (no quantization_config), the source)
_V3_0324_CARD = ("deepseek-ai/DeepSeek-V3-0324 model card, 'How to Run Locally': \"The model structure of "
                 "DeepSeek-V3-0324 is exactly the same as DeepSeek-V3\" (verbatim README copies, file index ids "
                 "70590656122 and 31621324607)")
SAME_AS = {
    "deepseek-ai/deepseek-v3-0324": ("deepseek-ai/DeepSeek-V3", False, _V3_0324_CARD),
    # LLaMA-Factory examples/ktransformers: "need to convert to BF16 checkpoint first" (DeepSeek-V3's
    # inference/fp8_cast_bf16.py): the same shapes, the FP8 weights cast to BF16
    "deepseek-ai/deepseek-v3-0324-bf16": ("deepseek-ai/DeepSeek-V3", True, _V3_0324_CARD + "; cast to BF16"),
}


@dataclass(frozen=True, slots=True, kw_only=True)
class CatalogEntry:
    hf_id: str  # e.g. "meta-llama/Meta-Llama-3-8B"
    short_name: str  # e.g. "llama-3-8b"
    path: Path


def _short(name: str) -> str:
    name = name.lower()
    return name[5:] if name.startswith("meta-") else name


@lru_cache(maxsize=1)
def _index() -> tuple[dict[str, CatalogEntry], tuple[CatalogEntry, ...]]:
    entries = []
    for path in sorted(CATALOG_DIR.glob("*.json")):
        org, _, name = path.stem.partition("__")
        entries.append(CatalogEntry(hf_id=f"{org}/{name}", short_name=_short(name), path=path))
    names: dict[str, CatalogEntry] = {}
    for e in entries:
        names[e.hf_id.lower()] = e
        names[e.short_name] = e
    counts: dict[str, list[CatalogEntry]] = {}
    for e in entries:  # shorter aliases, only when unambiguous
        alias = e.short_name
        for suffix in _DROP:
            if alias.endswith(suffix):
                alias = alias[: -len(suffix)]
                counts.setdefault(alias, []).append(e)
    for alias, owners in counts.items():
        if len(owners) == 1 and alias not in names:
            names[alias] = owners[0]
    return names, tuple(entries)


def catalog_entries() -> tuple[CatalogEntry, ...]:
    return _index()[1]


def find_entry(name: str) -> CatalogEntry | None:
    """A catalog entry by hub id or short name; chat / instruct variants resolve to their base model, whose
    config.json has the same dimensions (Llama-3-8B-Instruct -> Meta-Llama-3-8B, gemma-2-9b-it -> gemma-2-9b)."""
    names = _index()[0]
    key = name.strip().lower()
    if key in SAME_AS:
        return names[SAME_AS[key][0].lower()]
    if key in names:
        return names[key]
    base = re.sub(r"-(instruct|chat|it)(?=-|$)", "", key)
    return names.get(base) or names.get(_short(base.rpartition("/")[2]))


@lru_cache(maxsize=64)
def _load_entry(hf_id: str) -> ModelSpec:
    entry = find_entry(hf_id)
    assert entry is not None
    cfg = load_config_file(entry.path)
    return ModelSpec.from_config_dict(cfg, name=entry.short_name)


def catalog_param_count(entry: CatalogEntry) -> int | None:
    """The publicly stated parameter count shipped with the entry (a check on our own count), else the count
    shared/model_configs/count.py made from the same fields."""
    cfg = load_config_file(entry.path)
    return cfg.get("_param_count") or cfg.get("_param_count_computed")


HUB_TIMEOUT_S = 20.0  # a hub lookup that has not answered by then is abandoned (offline machines, slow proxies)


def resolve_model(name: str, *, trust_remote_code: bool = False) -> ModelSpec:
    """--model: a catalog name or hub id, a folder with config.json, a config.json path, or (with transformers
    installed and the hub reachable) any hub id. A hub repository's own code runs only with trust_remote_code."""
    if not name.strip():
        raise UnknownModel("--model is empty: give a catalog name (memplan models), a hub id, a folder or a "
                           "config.json")
    path = Path(name).expanduser()  # a local folder or file wins over a catalog name it happens to share
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UnknownModel(f"folder {path} has no config.json; pass a folder holding one, or the file itself")
        path = path / "config.json"
    if path.is_file():
        return ModelSpec.from_config_dict(load_config_file(path), name=str(path))
    entry = find_entry(name)
    if entry is not None:
        same = SAME_AS.get(name.strip().lower())
        if same is None:
            return _load_entry(entry.hf_id)
        import dataclasses  # the entry's spec under the checkpoint's own name; a BF16 cast: no FP8 storage

        spec = _load_entry(entry.hf_id)
        if not same[1]:
            return dataclasses.replace(spec, name=name.strip())
        config = {k: v for k, v in spec.config.items() if k != "quantization_config"}
        return dataclasses.replace(spec, name=name.strip(), quantization="", config=config)
    return _from_hub(name, trust_remote_code)


def _from_hub(name: str, trust_remote_code: bool) -> ModelSpec:
    hint = (f"unknown model {name!r}: not in the catalog (see `memplan models`), not a local folder or config.json; "
            "download its config.json and pass its path with --model")
    if "/" not in name:
        raise UnknownModel(hint)
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")  # read now: the
    # hub library reads it once, at its import
    if offline and assumed_from_name(name) is not None:
        # a pre-quantized repository offline: the hub cache's config.json is its own; without one, the assumption
        # (no transformers import: its ~3 s was most of such an estimate's time)
        cached = _cached_config(name)
        return ModelSpec.from_config_dict(load_config_file(cached), name=name) if cached else \
            _assumed_prequantized(name)  # type: ignore[return-value]
    try:
        import transformers  # optional: only for hub ids outside the catalog
    except ImportError:
        raise UnknownModel(hint + " (transformers is not installed, so the hub was not tried)") from None
    box: dict[str, object] = {}

    def lookup() -> None:  # transformers asks its own y/N question for remote code unless told: never ask
        try:
            box["cfg"] = transformers.AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code,
                                                                 local_files_only=offline).to_dict()
        except Exception as err:  # noqa: BLE001 - any hub/network failure means the same thing to the user
            box["err"] = err

    import logging
    import threading

    quiet = [logging.getLogger(n) for n in ("huggingface_hub", "transformers", "urllib3")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.ERROR)
    try:
        worker = threading.Thread(target=lookup, daemon=True)  # abandoned, not waited for, past the time box
        worker.start()
        worker.join(HUB_TIMEOUT_S)
    finally:
        for lg, level in zip(quiet, levels, strict=True):
            lg.setLevel(level)
    err = box.get("err")
    if "cfg" not in box:
        if err is not None and "trust_remote_code" in str(err):
            raise UnsupportedModel(f"{name}: its config needs the repository's own code; pass --trust-remote-code "
                                   "to run it") from None
        if (prequantized := _assumed_prequantized(name)) is not None:
            return prequantized
        why = type(err).__name__ if err is not None else f"no answer within {HUB_TIMEOUT_S:g} s"
        raise UnknownModel(f"{hint} (hub lookup failed: {why})") from None
    return ModelSpec.from_config_dict(box["cfg"], name=name)  # type: ignore[arg-type]


def _assumed_prequantized(name: str) -> ModelSpec | None:
    """A pre-quantized repository whose config.json is not on disk (`<base>-AWQ`, `-GPTQ`, `-AQLM-2Bit-1x16`):
    its base model's catalog dimensions with the quantization_config its name and the library's defaults give
    (memplan.spec.prequantized.assumed_from_name), said in one warning line; None when the name says no method."""
    import dataclasses
    import warnings

    assumed = assumed_from_name(name)
    if assumed is None:
        return None
    base_name, packed = assumed
    entry = find_entry(base_name)
    if entry is None:
        raise UnknownModel(f"{name}: a pre-quantized ({packed.method.upper()}) repository whose config.json is not "
                           f"on disk, and its base {base_name} is not in the catalog: download its config.json and "
                           "pass its folder with --model")
    base = _load_entry(entry.hf_id)
    warnings.warn(f"{packed.assumed}; its dimensions are {entry.hf_id}'s (the catalog's)", stacklevel=3)
    return dataclasses.replace(base, name=name, packed=packed)


def _cached_config(name: str) -> Path | None:
    """config.json of hub repository `name` in the local hub cache (huggingface_hub.try_to_load_from_cache), or
    None (not cached, or huggingface_hub not installed)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(repo_id=name, filename="config.json")
    except Exception:  # noqa: BLE001 - a malformed repo id or cache: not cached
        return None
    return Path(found) if isinstance(found, str) else None
