"""LoRA files as they arrive from elsewhere: a hand-written safetensors header reader (nothing is
loaded, so a hostile or broken file costs one small read), key-format detection (kohya, diffusers,
peft) and base-model family detection from the cross-attention width, so an import can refuse a
LoRA made for another model family before it ever reaches a pipeline.

No dagster import here: the import job and the CLI both use it.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Bits per element of every safetensors dtype (sub-byte float formats included).
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}
# The safetensors library refuses headers above 100 MB; a larger length is a foreign or broken file.
MAX_HEADER_BYTES = 100 * 1024 * 1024

# Cross-attention width (text-embedding width the UNet attends to) → base-model family.
FAMILY_BY_CROSS_ATTENTION_DIM = {768: "sd15", 1024: "sd2", 2048: "sdxl", 32: "tiny-sd", 64: "tiny-sdxl"}
UNKNOWN_FAMILY = "unknown"

KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
KOHYA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")
DIFFUSERS_PREFIXES = ("unet.", "transformer.", "text_encoder.", "text_encoder_2.")
# `.lora.down` is diffusers' own naming; `_lora.down` its older attention-processor naming
# (`...processor.to_k_lora.down.weight`); `lora_A/B` the peft naming diffusers now saves as well.
DIFFUSERS_MARKERS = (".lora.down.weight", ".lora.up.weight", "_lora.down.weight", "_lora.up.weight",
                     ".lora_A.weight", ".lora_B.weight")
PEFT_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
DOWN_SUFFIXES = (".lora_down.weight", ".lora.down.weight", "_lora.down.weight", ".lora_A.weight")
# An attn2 (cross-attention) key projection, in dotted (diffusers/peft) or flattened (kohya) form,
# with diffusers or ldm block names alike: both end in `attn2[._]to_k`.
CROSS_ATTENTION_KEY = re.compile(r"attn2[._](?:processor[._])?to_k(?:_lora)?[._]")


class LoraFileError(ValueError):
    """A LoRA file that cannot be imported; the message starts with the file's name."""


@dataclass(frozen=True)
class LoraFileInfo:
    key_format: str  # kohya | diffusers | peft
    family: str  # sd15 | sd2 | sdxl | flux | tiny-sd | tiny-sdxl | unknown-<dim> | unknown
    rank: int
    tensor_count: int
    metadata: dict[str, str] = field(default_factory=dict)  # the header's __metadata__
    cross_attention_dim: int | None = None


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """Parse and validate a safetensors header without loading any tensor.

    Layout: 8-byte little-endian header length N, N bytes of UTF-8 JSON (an object of
    name → {dtype, shape, data_offsets}, plus an optional `__metadata__` of str → str), then the
    data section, which the tensors must cover exactly, in order, without gaps or overlaps."""
    path = Path(path)
    name = path.name
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if size < 8 or len(prefix) < 8:
                raise LoraFileError(f"{name}: not a safetensors file: {size} bytes, too short for the 8-byte header length")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len < 2 or header_len > MAX_HEADER_BYTES:
                raise LoraFileError(f"{name}: not a safetensors file: header length {header_len} is not plausible")
            if 8 + header_len > size:
                raise LoraFileError(f"{name}: truncated or not a safetensors file: header length {header_len} "
                                    f"runs past the end of the {size}-byte file")
            raw = handle.read(header_len)
    except OSError as exc:
        raise LoraFileError(f"{name}: cannot be read: {exc.strerror or exc}") from exc
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise LoraFileError(f"{name}: not a safetensors file: the header is not UTF-8 JSON ({exc})") from None
    if not isinstance(header, dict):
        raise LoraFileError(f"{name}: not a safetensors file: the header is a JSON {type(header).__name__}, not an object")

    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise LoraFileError(f"{name}: __metadata__ must be an object of string values")
    data_len = size - 8 - header_len
    spans: list[tuple[int, int, str]] = []
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        spans.append(_check_tensor_entry(name, key, entry, data_len))
    # Tensors must tile the data section: sorted by start, each begins where the last ended.
    position = 0
    for begin, end, key in sorted(spans):
        if begin != position:
            problem = "overlaps the previous tensor" if begin < position else f"leaves a gap of {begin - position} bytes"
            raise LoraFileError(f"{name}: tensor {key!r} at bytes [{begin}, {end}] {problem}")
        position = end
    if position != data_len:
        raise LoraFileError(f"{name}: the tensors cover {position} bytes but the data section is {data_len} bytes"
                            f" ({'truncated file' if position > data_len else 'trailing bytes'})")
    return header


def _check_tensor_entry(name: str, key: str, entry: Any, data_len: int) -> tuple[int, int, str]:
    if not isinstance(entry, dict):
        raise LoraFileError(f"{name}: tensor {key!r} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_BITS:
        raise LoraFileError(f"{name}: tensor {key!r} has dtype {dtype!r}, not a safetensors dtype "
                            f"({', '.join(sorted(DTYPE_BITS))})")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise LoraFileError(f"{name}: tensor {key!r} has shape {shape!r}, not a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise LoraFileError(f"{name}: tensor {key!r} has data_offsets {offsets!r}, not [begin, end] with 0 <= begin <= end")
    begin, end = offsets
    if end > data_len:
        raise LoraFileError(f"{name}: tensor {key!r} data_offsets [{begin}, {end}] run past the "
                            f"{data_len}-byte data section (truncated file?)")
    elements = 1
    for dim in shape:
        elements *= dim
    bits = elements * DTYPE_BITS[dtype]
    if bits % 8 or bits // 8 != end - begin:
        raise LoraFileError(f"{name}: tensor {key!r} is {dtype} {shape} ({bits / 8:g} bytes) but its "
                            f"data_offsets span {end - begin} bytes")
    return begin, end, key


def _tensor_keys(header: dict[str, Any]) -> list[str]:
    return [k for k in header if k != "__metadata__"]


def _key_format_of(key: str) -> str | None:
    if key.startswith(KOHYA_PREFIXES) and key.endswith(KOHYA_SUFFIXES):
        return "kohya"
    if key.startswith(DIFFUSERS_PREFIXES) and key.endswith(DIFFUSERS_MARKERS):
        return "diffusers"
    # peft's own save_pretrained prefixes `base_model.model.`; a bare state dict has no prefix.
    if key.endswith(PEFT_SUFFIXES) and not key.startswith(KOHYA_PREFIXES):
        return "peft"
    return None


def detect_key_format(keys: list[str] | dict[str, Any]) -> str:
    """The key format, "kohya", "diffusers" or "peft", that most LoRA keys follow; LoraFileError if none.
    (LoraFileError's message is completed with the file name by inspect_lora_file.)"""
    keys = [k for k in keys if k != "__metadata__"]
    counts: dict[str, int] = {}
    for key in keys:
        kind = _key_format_of(key)
        if kind:
            counts[kind] = counts.get(kind, 0) + 1
    if not counts or not any(key.endswith(DOWN_SUFFIXES) for key in keys):
        shown = ", ".join(sorted(keys)[:5]) or "none"
        raise LoraFileError(f"not a LoRA: no LoRA keys (first keys: {shown})")
    return max(sorted(counts), key=counts.__getitem__)


def cross_attention_dim(header: dict[str, Any]) -> int | None:
    """In-features of a UNet cross-attention (attn2) to_k LoRA down/A matrix, i.e. the width of the
    text embeddings the base model's UNet attends to; None when the LoRA has no such matrix."""
    for key in sorted(_tensor_keys(header)):
        if key.startswith(("lora_te", "text_encoder")) or not key.endswith(DOWN_SUFFIXES):
            continue
        if CROSS_ATTENTION_KEY.search(key):
            shape = header[key]["shape"]
            if len(shape) >= 2:  # [rank, in_features] (a conv LoRA adds kernel dims after)
                return int(shape[1])
    return None


def family_for_dim(dim: int | None) -> str:
    if dim is None:
        return UNKNOWN_FAMILY
    return FAMILY_BY_CROSS_ATTENTION_DIM.get(dim, f"unknown-{dim}")


def detect_family(header: dict[str, Any]) -> str:
    """The base-model family a LoRA was trained for: a family its keys name (FLUX's transformer
    blocks, `families.lora_file_family`), else by cross-attention width (FAMILY_BY_CROSS_ATTENTION_DIM)."""
    from persona_pipeline.training.families import lora_file_family

    named = lora_file_family(_tensor_keys(header))
    if named:
        return named
    family = family_for_dim(cross_attention_dim(header))
    if family == UNKNOWN_FAMILY and any(k.startswith(("lora_te2_", "text_encoder_2.")) for k in _tensor_keys(header)):
        return "sdxl"  # only SDXL has a second text encoder
    return family


def base_model_family(base_model_path: str) -> str:
    """Family of a local diffusers base model from `unet/config.json`; "unknown" for a hub id or a
    folder without that file (nothing is downloaded to find out)."""
    config_path = Path(base_model_path) / "unet" / "config.json"
    if not config_path.is_file():
        return _transformer_family(Path(base_model_path))
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return UNKNOWN_FAMILY
    dim = config.get("cross_attention_dim")
    if isinstance(dim, list):  # per-block widths in some configs; they are all the same in practice
        dim = dim[0] if dim else None
    family = family_for_dim(dim if isinstance(dim, int) else None)
    if family not in FAMILY_BY_CROSS_ATTENTION_DIM.values() and config.get("addition_embed_type") == "text_time":
        return "sdxl"  # SDXL's pooled-text + time-ids conditioning
    return family


def _transformer_family(folder: Path) -> str:
    """A transformer-based family (FLUX.1) from a local folder's model_index.json, else "unknown"."""
    from persona_pipeline.training.families import families

    try:
        pipeline = json.loads((folder / "model_index.json").read_text(encoding="utf-8")).get("_class_name", "")
    except (OSError, ValueError, AttributeError):
        return UNKNOWN_FAMILY
    return next((f.name for f in families() if f.objective == "flow_matching" and f.detects(pipeline)), UNKNOWN_FAMILY)


def lora_rank(header: dict[str, Any]) -> int:
    """The largest rank among the down/A matrices (their first dimension)."""
    ranks = [header[k]["shape"][0] for k in _tensor_keys(header) if k.endswith(DOWN_SUFFIXES) and header[k]["shape"]]
    return max(ranks, default=0)


def inspect_lora_file(path: Path, expected_family: str | None, *, base_model: str | None = None) -> LoraFileInfo:
    """Validate a LoRA file and check that it fits a base model of `expected_family`.
    `expected_family` None or "unknown" (a hub id we cannot inspect offline) skips the family check."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise LoraFileError(f"{path.name}: not a .safetensors file; only safetensors LoRAs are imported "
                            "(pickle formats such as .ckpt/.pt/.bin can run code when loaded)")
    header = read_safetensors_header(path)
    try:
        key_format = detect_key_format(_tensor_keys(header))
    except LoraFileError as exc:
        raise LoraFileError(f"{path.name}: {exc}") from None
    dim = cross_attention_dim(header)
    family = detect_family(header)
    if family == "flux":
        from persona_pipeline.training.families.flux import unknown_lora_key

        unknown = unknown_lora_key(_tensor_keys(header))
        if unknown:
            raise LoraFileError(f"{path.name}: FLUX.1 LoRA key {unknown!r} names no FLUX transformer or text-encoder "
                                "LoRA weight (it would be silently dropped)")
    if expected_family and expected_family != UNKNOWN_FAMILY:
        base = base_model or "in use"
        if family == UNKNOWN_FAMILY:
            raise LoraFileError(f"{path.name}: cannot tell which base model the LoRA is for (no cross-attention "
                                f"attn2 to_k matrix); the base model {base} is {expected_family}")
        if family != expected_family:
            evidence = ("its keys name FLUX.1 transformer blocks" if family == "flux" else f"cross-attention dim {dim}"
                        if dim is not None else "it has SDXL's second text encoder")
            raise LoraFileError(f"{path.name}: LoRA is for {family} ({evidence}) but the base model "
                                f"{base} is {expected_family}")
    return LoraFileInfo(key_format=key_format, family=family, rank=lora_rank(header),
                        tensor_count=len(_tensor_keys(header)), metadata=dict(header.get("__metadata__", {})),
                        cross_attention_dim=dim)


def refuse_other_family(path: Path, expected_family: str, *, base_model: str) -> None:
    """Before a LoRA is loaded onto a pipeline: refuse it (LoraFileError, naming both families) when its
    family is known and differs from the base model's, or when it is a FLUX LoRA with a key naming no
    FLUX module; a LoRA whose family cannot be told is left to the loader, which reports what does not fit."""
    try:
        family = detect_family(read_safetensors_header(Path(path)))
    except LoraFileError:
        return  # not readable as a LoRA here: the loader's own error names the problem
    if family == "flux" or (expected_family != UNKNOWN_FAMILY and not family.startswith(UNKNOWN_FAMILY)
                            and family != expected_family):
        inspect_lora_file(Path(path), expected_family, base_model=base_model)
