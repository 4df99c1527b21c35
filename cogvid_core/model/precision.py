"""Which precision each component runs in, and which of its tensors keep another dtype: one rule for
the loaders, the fp8 speed option, the estimate, the CLI and the nodes.

Names are the widgets' and the CLI's: ``bf16``, ``fp16``, ``fp32``, ``fp8_e4m3fn`` (the transformer's
block matrices stored in 8 bits, computed in bf16) and ``auto`` (:func:`choose`: bf16 where the card
has it natively, else what works there).

Inside a component, the model classes' own rules decide (never a list of names kept here):

* fp8 storage casts what diffusers' layerwise casting would cast: modules matching
  ``DEFAULT_SKIP_MODULES_PATTERN``, the class's ``_skip_layerwise_casting_patterns`` and
  ``_keep_in_fp32_modules`` keep the compute dtype. For CogVideoX that keeps ``patch_embed`` and every
  ``norm*`` module, among them each block's AdaLN modulation (``norm1.linear``, ``norm2.linear``):
  CogVideoX1.5 does not work with those quantized (kijai's wrapper keeps them in bf16 for that).
* Loading in fp16 keeps the class's ``_keep_in_fp32_modules`` in fp32 (transformers' and diffusers'
  loaders do; ``_keep_in_fp32_modules_strict`` also in bf16): T5's ``wo`` layers, without which T5 v1.1
  XXL saturates in fp16 (transformers then clamps: the embeddings degrade without an error).
"""
from __future__ import annotations

import logging
import re
from functools import lru_cache

import torch

log = logging.getLogger(__name__)

BF16, FP16, FP32, FP8, AUTO = "bf16", "fp16", "fp32", "fp8_e4m3fn", "auto"
NAMES = (BF16, FP16, FP32, FP8)            # the order the widgets show (AUTO comes after them)
DTYPES = {BF16: torch.bfloat16, FP16: torch.float16, FP32: torch.float32}
COMPONENTS = ("transformer", "text_encoder", "vae")
_LABELS = {"transformer": "transformer", "text_encoder": "T5 text encoder", "vae": "VAE"}
# the attribute the loaders set on a module whose tensors stay in fp32 (read by tensors.target_dtype)
KEEP_FP32 = "_cogvid_keep_fp32"
NO_BF16_CARDS = "T4, V100, RTX 20xx"


class PrecisionError(ValueError):
    """A precision this component cannot run in (the message says what to choose)."""


# ---------------------------------------------------------------- the classes' own rules
@lru_cache(maxsize=None)
def model_class(component: str):
    """The diffusers / transformers class each component is built from."""
    if component == "transformer":
        from diffusers import CogVideoXTransformer3DModel
        return CogVideoXTransformer3DModel
    if component == "vae":
        from diffusers import AutoencoderKLCogVideoX
        return AutoencoderKLCogVideoX
    if component == "text_encoder":
        from transformers import T5EncoderModel
        return T5EncoderModel
    raise ValueError(f"unknown component {component!r}; one of {COMPONENTS}")


def keep_fp32_patterns(cls, dtype: torch.dtype) -> tuple[str, ...]:
    """Module names ``cls`` keeps in fp32 when loaded in ``dtype`` (transformers' ``_get_dtype_plan``)."""
    names = []
    if dtype == torch.float16:
        names += getattr(cls, "_keep_in_fp32_modules", None) or []
    if dtype in (torch.float16, torch.bfloat16):
        names += getattr(cls, "_keep_in_fp32_modules_strict", None) or []
    return tuple(dict.fromkeys(names))


def kept_fp32(name: str, patterns) -> bool:
    """Whether a parameter or module name lies in a kept module: a dotted part equals a pattern
    (diffusers' rule; transformers searches the name, the same modules for T5's ``wo``)."""
    parts = name.split(".")
    return any(p in parts for p in patterns)


def mark_keep_fp32(model: torch.nn.Module, component: str, dtype: torch.dtype) -> int:
    """Mark the modules (and their children) that stay in fp32 in a ``dtype`` load, before its weights
    are read or indexed; returns how many tensors they hold."""
    patterns = keep_fp32_patterns(model_class(component), dtype)
    n = 0
    for name, module in model.named_modules():
        if patterns and kept_fp32(name, patterns):
            setattr(module, KEEP_FP32, True)
            n += len(module._parameters) + len(module._buffers)
    return n


@lru_cache(maxsize=None)
def _fp8_skip() -> re.Pattern:
    """diffusers' layerwise-casting skip rule for the CogVideoX transformer, as one pattern."""
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN
    cls = model_class("transformer")
    patterns = (*DEFAULT_SKIP_MODULES_PATTERN, *(cls._skip_layerwise_casting_patterns or ()),
                *(cls._keep_in_fp32_modules or ()))
    return re.compile("|".join(f"(?:{p})" for p in dict.fromkeys(patterns)))


def fp8_module(name: str) -> bool:
    """Whether fp8 (storage, or the speed option's float8 matmuls) may take this transformer module's
    Linear: its name, full or relative to a block, matches none of the class's skip patterns."""
    return not _fp8_skip().search(name)


def is_fp8_layer(name: str, shape) -> bool:
    """Whether a checkpoint tensor is stored in 8 bits by fp8 storage: the transformer blocks' Linear
    weights that :func:`fp8_module` allows (attention and feed-forward, not the modulation); the T5
    blocks' matrices (as ComfyUI's fp8 T5 files store them; T5 is read from those, never quantized).

    Embeddings, norms and in/out projections are small and precision-sensitive, so they keep the
    high-precision dtype. Works on names and shapes alone (files, meta models, the estimate)."""
    if len(shape) != 2 or not name.endswith(".weight") or "relative_attention_bias" in name:
        return False
    if "transformer_blocks." in name:
        return fp8_module(name[:-len(".weight")])
    return "encoder.block." in name


# ---------------------------------------------------------------- which precision a component runs in
def dtypes(name: str) -> tuple[torch.dtype, torch.dtype | None]:
    """A resolved precision name -> (compute dtype, storage dtype or None)."""
    if name == FP8:
        if not hasattr(torch, "float8_e4m3fn"):
            raise PrecisionError("fp8_e4m3fn storage needs a torch build with float8 support: choose bf16")
        return torch.bfloat16, torch.float8_e4m3fn
    if name not in DTYPES:
        raise PrecisionError(f"precision must be one of {[*NAMES, AUTO]}, got {name!r}")
    return DTYPES[name], None


def name_of(dtype: torch.dtype, storage: torch.dtype | None = None) -> str:
    """(compute dtype, storage dtype) -> the precision's name (the inverse of :func:`dtypes`)."""
    if storage is not None and storage.itemsize == 1:
        return FP8
    return {d: n for n, d in DTYPES.items()}[dtype]


def default_device() -> torch.device:
    """Where a run with no device named computes: the current CUDA device, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def native_bf16(device) -> bool:
    """Whether ``device`` computes bf16 in hardware: CUDA compute capability 8.0+ (Ampere), ROCm, the CPU.
    T4, V100 and RTX 20xx run bf16 emulated (torch.cuda.is_bf16_supported() says True there): slowly."""
    device = torch.device(device)
    if device.type != "cuda" or torch.version.hip:
        return True
    if not torch.cuda.is_available():
        return True     # nothing runs there; the device check says so
    return torch.cuda.get_device_capability(device)[0] >= 8


def choose(component: str, device, variant=None) -> str:
    """``auto``: bf16 (what CogVideoX's maintainers advise for the 5B models) where the card has it;
    on a card without (T4, V100, RTX 20xx) fp16 where it works: T5 (its ``wo`` layers in fp32), the
    VAE and CogVideoX-5B-I2V; CogVideoX1.5 gives NaN in fp16, so fp32 (correct, slower, twice the
    weights: the planner streams them)."""
    if native_bf16(device):
        return BF16
    if component == "transformer" and variant is not None and not variant.fp16_ok:
        return FP32
    return FP16


def fp16_refusal(label: str) -> str:
    return (f"{label} gives NaN (black frames) in fp16; its maintainers advise bf16 for the 5B models "
            f"(CogVideo issues #637, #559): use bf16, or on a card without bf16 ({NO_BF16_CARDS}) fp32 "
            "(slower, twice the weights, streamed) or precision 'auto', which picks for the card")


def check(component: str, name: str, variant=None) -> None:
    """Refuse a precision this component cannot run in, with what to choose instead."""
    if component not in COMPONENTS:
        raise ValueError(f"unknown component {component!r}; one of {COMPONENTS}")
    if name not in NAMES:
        raise PrecisionError(f"{_LABELS[component]} precision must be one of {[*NAMES, AUTO]}, got {name!r}")
    if name == FP8 and component != "transformer":
        raise PrecisionError(f"fp8_e4m3fn storage is for the transformer; the {_LABELS[component]} takes "
                             f"{', '.join(NAMES[:-1])} or auto")
    if component == "transformer" and name == FP16 and variant is not None and not variant.fp16_ok:
        raise PrecisionError(fp16_refusal(variant.label))


def resolve(component: str, name: str, device, variant=None, warn: bool = True) -> str:
    """The precision a component runs in: ``auto`` chosen for ``device`` (:func:`choose`), any name
    checked (:func:`check`; the transformer's with its ``variant`` when known). ``warn``: say when bf16
    runs emulated on this card."""
    chosen = choose(component, device, variant) if name == AUTO else name
    check(component, chosen, variant)
    if warn and chosen in (BF16, FP8) and not native_bf16(device):
        log.warning("the %s computes in bf16 on %s, which has no native bf16 (%s): it runs emulated, "
                    "several times slower; precision 'auto' picks fp16/fp32 for this card",
                    _LABELS[component], device, NO_BF16_CARDS)
    return chosen


def resolve_all(precision: dict | str | None, device, variant=None, warn: bool = True) -> dict[str, str]:
    """{component: name} for every component from a dict (missing: auto) or one name for all (fp8 is
    the transformer's; T5 and the VAE then take auto)."""
    if not isinstance(precision, dict):
        one = precision or AUTO
        precision = {c: (AUTO if one == FP8 and c != "transformer" else one) for c in COMPONENTS}
    return {c: resolve(c, precision.get(c) or AUTO, device, variant, warn) for c in COMPONENTS}
