"""Pre-quantized checkpoints (AWQ, GPTQ, AQLM): their quantization_config, read from a config.json or, when none is
on disk, assumed from the repository's name and the library's documented defaults (said in one warning line).

LLaMA-Factory trains LoRA / OFT adapters over such a base as it is stored (model_utils/quantization.py
configure_quantization, HEAD ff6d4d12e L94-148: the checkpoint's quantization_config wins, quantization_bit is
ignored with a warning; model/adapter.py init_adapter refuses full / freeze on a quantized model). memplan costs it
as QLoRA whose storage and kernels are the checkpoint's (memplan.predict.weights, memplan.predict.activations).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from memplan.errors import ConfigError

if TYPE_CHECKING:
    from memplan.spec.model import ModelSpec
    from memplan.spec.train import TrainConfig


@dataclass(frozen=True, slots=True, kw_only=True)
class PackedQuant:
    """A checkpoint's quantization_config, as the storage and kernels read it."""

    method: str  # awq, gptq, aqlm (quantization_config.quant_method)
    bits: int  # bits per weight: AWQ / GPTQ `bits`; AQLM nbits_per_codebook x num_codebooks / in_group_size
    group_size: int = 128  # AWQ / GPTQ: input rows sharing a scale and zero (-1: one group per input column set)
    in_group_size: int = 8  # AQLM: weights per code
    out_group_size: int = 1
    num_codebooks: int = 1
    nbits_per_codebook: int = 16
    assumed: str = ""  # what was not read from a config.json but assumed (the warning line); "" when read

    def describe(self) -> str:
        if self.method == "aqlm":
            return (f"AQLM {self.num_codebooks}x{self.nbits_per_codebook} (in_group_size {self.in_group_size}, "
                    f"out_group_size {self.out_group_size}, {self.bits}-bit)")
        return f"{self.method.upper()} {self.bits}-bit, group_size {self.group_size}"


# The documented defaults each library's config takes when a field is absent (transformers 5.24
# utils/quantization_config.py: AwqConfig L819-838 bits 4, group_size 128, zero_point True, format gemm; GPTQConfig
# L66-71 group_size 128, desc_act False, `bits` required: 4 is assumed, the width LLaMA-Factory's README lists first
# ("4/8-bit GPTQ") and the one its GPTQ example trains; AqlmConfig L884-890 in_group_size 8, out_group_size 1,
# num_codebooks 1, nbits_per_codebook 16; LLaMA-Factory sets an AQLM model's bits to 2, quantization.py L141).
DEFAULTS: dict[str, dict[str, int]] = {
    "awq": {"bits": 4, "group_size": 128},
    "gptq": {"group_size": 128},
    "aqlm": {"in_group_size": 8, "out_group_size": 1, "num_codebooks": 1, "nbits_per_codebook": 16},
}
# GPTQConfig requires `bits`: without a config.json or a width in the name, this is assumed (and said)
GPTQ_ASSUMED_BITS = 4
# what each repository name can say about its config (TechxGenus/Meta-Llama-3-8B-Instruct-AWQ says nothing beyond
# the method; ISTA-DASLab/...-AQLM-2Bit-1x16 says num_codebooks x nbits_per_codebook and the bits)
_NAME = re.compile(r"-(?P<method>awq|gptq|aqlm)(?=-|$)(?:-(?P<bits>\d)bit)?(?:-(?P<cb>\d+)x(?P<nb>\d+))?",
                   re.IGNORECASE)
_NAME_BITS = re.compile(r"-(?:int|w)(?P<bits>\d)(?=-|$)|-(?P<bits2>\d)bit(?=-|$)", re.IGNORECASE)


def packed_from_config(q: dict[str, Any], label: str) -> PackedQuant | None:
    """A config.json's quantization_config of a packed method -> PackedQuant (absent fields: DEFAULTS); None for
    other methods. A value of the wrong type is a ConfigError naming the field."""
    method = str(q.get("quant_method", "")).lower()
    if method not in DEFAULTS:
        return None
    fields = {k: q.get(k, v) for k, v in DEFAULTS[method].items()}
    if method == "gptq":
        if q.get("bits") is None:
            raise ConfigError(f"{label}: quantization_config.bits is missing (GPTQConfig requires it)")
        fields["bits"] = q["bits"]
    bad = [k for k, v in fields.items() if not isinstance(v, int) or isinstance(v, bool)]
    if bad:
        raise ConfigError(f"{label}: quantization_config.{bad[0]} must be an integer, got {fields[bad[0]]!r}")
    if method == "aqlm":
        bits = fields["nbits_per_codebook"] * fields["num_codebooks"] // (fields["in_group_size"] *
                                                                          fields["out_group_size"])
        return PackedQuant(method=method, bits=max(bits, 1), **fields)
    return PackedQuant(method=method, **fields)


def assumed_from_name(name: str) -> tuple[str, PackedQuant] | None:
    """(the base model's name, its assumed PackedQuant) of a pre-quantized repository named `<base>-AWQ`, `-GPTQ`,
    `-AQLM-2Bit-1x16` ...; None when the name says no packed method. `assumed` lists every value taken from
    DEFAULTS or the name, and how to give the real ones."""
    hit = _NAME.search(name)
    if hit is None:
        return None
    method = hit["method"].lower()
    fields: dict[str, int] = dict(DEFAULTS[method])
    said = []
    if method == "aqlm" and hit["cb"]:
        fields.update(num_codebooks=int(hit["cb"]), nbits_per_codebook=int(hit["nb"]))
        said.append(f"num_codebooks {hit['cb']} x nbits_per_codebook {hit['nb']} (from the name)")
    named = hit["bits"] or next((m["bits"] or m["bits2"] for m in _NAME_BITS.finditer(name)), None)
    if method != "aqlm" and named:
        fields["bits"] = int(named)
        said.append(f"bits {named} (from the name)")
    elif method == "gptq":
        fields["bits"] = GPTQ_ASSUMED_BITS
        said.append(f"bits {GPTQ_ASSUMED_BITS} (GPTQConfig has no default; LLaMA-Factory's README trains "
                    "\"4/8-bit GPTQ\")")
    from_name = {"bits"} if named or method == "gptq" else set()
    if method == "aqlm" and hit["cb"]:
        from_name |= {"num_codebooks", "nbits_per_codebook"}
    defaults = [f"{k} {v}" for k, v in fields.items() if k not in from_name]
    parts = said + ([", ".join(defaults) + " (the library's defaults)"] if defaults else [])
    q = packed_from_config({"quant_method": method, **fields}, name)
    assert q is not None
    assumed = (f"{name}: no config.json on disk, so its quantization_config is assumed: {method}, "
               f"{'; '.join(parts)}; give the repository's config.json (a local folder as --model or "
               "model_name_or_path) to use its own values")
    return name[:hit.start()], PackedQuant(**{**_fields(q), "assumed": assumed})


def _fields(q: PackedQuant) -> dict[str, Any]:
    return {k: getattr(q, k) for k in PackedQuant.__slots__}  # type: ignore[attr-defined]


def storage_note(method: str) -> str:
    """What a packed method stores per Linear, for messages (memplan.predict.weights has the byte counts)."""
    return {"awq": "int32 qweight packing 32/bits values, int32 qzeros and fp16 scales per group_size input rows",
            "gptq": "int32 qweight, qzeros, fp16 scales per group and an int32 g_idx per input row",
            "aqlm": "codes of nbits_per_codebook bits per in_group_size weights, num_codebooks codebooks and one "
                    "scale per output row"}[method]


def train_for(spec: ModelSpec, train: TrainConfig) -> TrainConfig:
    """The configuration trained over `spec`'s storage: adapters over a packed checkpoint are QLoRA with its method
    and bits (LLaMA-Factory ignores quantization_bit then, quantization.py L96-97). LLaMA-Factory's refusals over a
    quantized model (model/adapter.py at HEAD ff6d4d12e: init_adapter L330-335 full / freeze and PiSSA; L239-244
    DoRA over a non-bnb method) are ConfigErrors; a pre-quantized method over an unquantized model is one too."""
    from memplan.spec.parallel import Sharding
    from memplan.spec.train import Adapter, Method, QuantMethod

    q = spec.packed
    if q is None:
        if train.method is Method.QLORA and train.quant_method.prequantized:
            raise ConfigError(f"quantization_method {train.quant_method.value}: {train.quant_method.value.upper()} "
                              f"is a pre-quantized checkpoint's storage, and {spec.name} is not one: quantize on "
                              "the fly with bnb, hqq or eetq, or give an AWQ / GPTQ / AQLM checkpoint")
        return train
    where = f"over the pre-quantized {spec.name} (LLaMA-Factory model/adapter.py)"
    if train.method in (Method.FULL, Method.FREEZE):
        raise ConfigError(f"finetuning_type {train.method.value} {where}: quantized models train LoRA or OFT "
                          "adapters only (finetuning_type lora or oft)")
    sharding = train.sharding
    if sharding is Sharding.ZERO3 or sharding is not Sharding.NONE and not sharding.is_deepspeed:  # zero3, fsdp
        raise ConfigError(f"deepspeed / fsdp {train.sharding.value} {where}: DeepSpeed ZeRO-3 or FSDP is "
                          "incompatible with PTQ-quantized models (model_utils/quantization.py L99-104)")
    if train.pissa_init:
        raise ConfigError(f"pissa_init {where}: PiSSA cannot initialise adapters on a quantized model")
    if train.adapter is Adapter.DORA:
        raise ConfigError(f"use_dora {where}: DoRA is not compatible with PTQ-quantized models")
    if train.method is Method.QLORA and not train.quant_method.prequantized:
        import warnings

        warnings.warn(f"quantization_bit {train.quant_bits} ({train.quant_method.value}) over the pre-quantized "
                      f"{spec.name}: ignored, as LLaMA-Factory ignores it (model_utils/quantization.py L96-97); the "
                      f"checkpoint's {q.describe()} is estimated", stacklevel=2)
    return train.with_(method=Method.QLORA, quant_method=QuantMethod(q.method), quant_bits=q.bits)
