"""Which CogVideoX variant a LoRA file was made for, from what the file itself says.

The 1.0 and 1.5 transformers share every width in attention and feed-forward, so a LoRA on those
layers alone fits both and its shapes cannot tell. What can: the base model named in its safetensors
metadata (PEFT's ``base_model_name_or_path`` inside diffusers' adapter metadata, kohya/musubi's
``ss_base_model_version`` / ``ss_sd_model_name``, training scripts' ``base_model`` /
``pretrained_model_name_or_path``, also inside a JSON training config), and layers only one variant
has (``ofs_embedding``: 1.5). Shapes of ``proj_out`` / ``patch_embed.proj`` are checked against the
transformer by :func:`cogvid_core.model.lora.check`.
"""
from __future__ import annotations

import json
import re
from typing import Iterable

from cogvid_core.model.variants import VARIANTS

# Metadata fields that name the model a LoRA was trained on (matched case-insensitively, also nested in JSON).
NAME_FIELDS = ("base_model_name_or_path", "base_model", "pretrained_model_name_or_path", "_name_or_path",
               "model_name_or_path", "model", "model_name", "ss_base_model_version", "ss_sd_model_name",
               "modelspec.architecture", "modelspec.base_model")
_BY_VERSION = {v.version: k for k, v in VARIANTS.items()}
# 1.5 first: "cogvideox1.5-5b" also contains "5b". Matched on the lower-cased value.
_PATTERNS = (("1.5", re.compile(r"cogvideo-?x?[-_ ]?v?1[._]?5")),
             ("1.0", re.compile(r"cogvideo-?x?[-_ ]?(v?1[._]?0[-_ ]?)?5b")))


def version_of_name(value: str) -> str | None:
    """"1.0" or "1.5" when ``value`` names a CogVideoX 5B model of that version, else None."""
    text = value.lower()
    return next((version for version, pattern in _PATTERNS if pattern.search(text)), None)


def _named_values(metadata: dict) -> Iterable[tuple[str, str]]:
    """(field, value) for every name field at the top level or inside JSON-valued fields."""
    def walk(obj, depth):
        if isinstance(obj, dict) and depth < 4:
            for key, value in obj.items():
                # diffusers' adapter metadata prefixes its fields: transformer.base_model_name_or_path
                field = str(key).lower().removeprefix("transformer.")
                if field in NAME_FIELDS and isinstance(value, str):
                    yield str(key), value
                else:
                    yield from walk(value, depth + 1)
        elif isinstance(obj, list) and depth < 4:
            for item in obj:
                yield from walk(item, depth + 1)
        elif isinstance(obj, str) and obj[:1] in "{[":
            try:
                yield from walk(json.loads(obj), depth + 1)
            except ValueError:   # not JSON after all: free text names nothing we trust
                return
    yield from walk(metadata, 0)


def origin(metadata: dict, modules: Iterable[str]) -> tuple[str | None, str]:
    """(variant key or None, the evidence in words). None: the file does not tell, or contradicts itself."""
    found = {}
    for key, value in _named_values(metadata):
        version = version_of_name(value)
        if version is not None:
            found.setdefault(version, f"its metadata {key} = {value!r}")
    if any(m.startswith("ofs_embedding") for m in modules):
        found.setdefault("1.5", "it adapts ofs_embedding, a layer only CogVideoX1.5 has")
    if len(found) == 1:
        version, evidence = next(iter(found.items()))
        return _BY_VERSION[version], evidence
    if len(found) > 1:
        return None, "its metadata names both variants (" + "; ".join(found.values()) + ")"
    return None, "no base model in its metadata and only layers both variants share"
