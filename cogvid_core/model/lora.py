"""LoRA files for the CogVideoX transformer: read once, applied per run (:mod:`lora_linear`).

A LoRA never touches the base weights: :func:`applied` gives the targeted ``nn.Linear`` layers a LoRA
class for the duration of one run, which adds ``strength * scale * B(A(x))`` to their outputs, so the same
loaded transformer serves runs with other LoRAs, other strengths or none, in any placement
(resident, offloaded, streamed, fp8 storage, chunked feed-forward): all of them call the same
Linear modules. Numerically this is PEFT's LoRA layer as diffusers' ``load_lora_weights`` +
``set_adapters`` build it (scale ``lora_alpha / r`` from the file's adapter metadata or ``.alpha``
tensors, else 1). A file without an alpha and a large rank is often made for CogVideoX's own
inference code, which applies LoRAs at ``lora_scale = 1/rank``: :func:`scale_hint` says so in one
line, and what strength gives that result here (the semantics stay diffusers').

Layouts read (those diffusers' ``CogVideoXLoraLoaderMixin`` reads, plus bare and PEFT prefixes):
``transformer.<module>.lora_A.weight`` / ``lora_B.weight`` (optional ``lora_B.bias``, ``<module>.alpha``)
and the older diffusers attention-processor names (``to_q_lora.down.weight`` ...), which diffusers'
``convert_unet_state_dict_to_peft`` maps to the former. Only safetensors files: never unpickled.
"""
from __future__ import annotations

import json
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import nn

from cogvid_core.model import lora_origin
from cogvid_core.model.lora_linear import swapped
from cogvid_core.model.variants import VARIANTS, CheckpointError

PREFIXES = ("transformer.", "base_model.model.")   # diffusers' pipeline prefix, PEFT's save_pretrained prefix
METADATA_KEY = "lora_adapter_metadata"             # diffusers' LORA_ADAPTER_METADATA_KEY
_LEAVES = ("lora_A.weight", "lora_B.weight", "lora_B.bias", "alpha")
WIDTH_2B = 1920                                    # CogVideoX-2B: 30 heads x 64
VARIANT_LAYERS = ("proj_out", "patch_embed.proj", "ofs_embedding")  # shapes/presence differ 1.0 vs 1.5
# Without an alpha diffusers applies a LoRA at scale 1 (alpha = rank). CogVideoX's own inference code
# (cli_demo: fuse_lora(lora_scale=1 / lora_rank), default rank 128) and LoRAs released for it (DimensionX,
# rank 256) expect 1/rank instead; from this rank on the two differ enough to be worth a hint.
HINT_RANK = 64


class LoraError(CheckpointError):
    """A LoRA file that cannot be applied to this transformer (message says why and what to do)."""


@dataclass(frozen=True, eq=False)
class LoraLayer:
    down: torch.Tensor              # lora_A [rank, in_features]
    up: torch.Tensor                # lora_B [out_features, rank]
    scale: float                    # alpha / rank (PEFT's scaling), 1.0 without an alpha
    bias: torch.Tensor | None = None   # lora_B bias [out_features] (PEFT lora_bias)

    @property
    def rank(self) -> int:
        return self.down.shape[0]


@dataclass(frozen=True, eq=False)
class LoraWeights:
    """One LoRA file read into memory (CPU, the file's dtype), keyed by transformer module name."""
    name: str
    path: str
    layers: dict[str, LoraLayer]
    has_alpha: bool = True          # False: no .alpha tensor and no lora_alpha metadata (scale 1, diffusers' rule)
    made_for: str | None = None     # variant key the file says it was made for; None: it does not tell
    origin: str = ""                # why made_for is what it is, in words (for messages)

    @property
    def rank(self) -> int:
        return max(layer.rank for layer in self.layers.values())

    @property
    def nbytes(self) -> int:
        """Host bytes of the tensors as read (the node's read cache is bounded by these)."""
        return sum(t.numel() * t.element_size() for layer in self.layers.values()
                   for t in (layer.down, layer.up, layer.bias) if t is not None)

    def __repr__(self) -> str:
        return f"LoraWeights({self.name!r}, {len(self.layers)} layers, rank {self.rank})"


# =============================================================================== reading
def load_lora(path, name: str | None = None) -> LoraWeights:
    """Read a LoRA safetensors file; raises :class:`LoraError` for files made for other models."""
    path = Path(path)
    tensors, metadata = _read_safetensors(path)
    what = describe_foreign(tensors.keys())
    if not what and not any("lora" in k.lower() for k in tensors):
        what = "a model checkpoint (no lora_* tensors)"
    if what:
        raise LoraError(f"{path.name} is {what}, not a CogVideoX LoRA: pick a LoRA trained for CogVideoX 5B I2V")
    sd, cfg = _peft_keys(path, tensors), _adapter_config(metadata)
    has_alpha = any(k.endswith(".alpha") for k in sd) or "lora_alpha" in cfg or bool(cfg.get("alpha_pattern"))
    layers = _layers(path, sd, cfg)
    made_for, evidence = lora_origin.origin(metadata, layers)
    return LoraWeights(name=name or path.stem, path=str(path), layers=layers, has_alpha=has_alpha,
                       made_for=made_for, origin=evidence)


def variant_note(lw: LoraWeights) -> str | None:
    """One line when the file does not tell which CogVideoX variant it was made for (it is applied
    anyway: its layers fit both). None when it does (a LoRA for the other variant is refused by check)."""
    if lw.made_for is not None:
        return None
    return (f"LoRA {Path(lw.path).name}: the CogVideoX variant it was made for cannot be told from the file "
            f"({lw.origin}); it is applied, but a LoRA trained for the other variant (1.0 vs 1.5) gives "
            "wrong videos: use it only if it was trained for this one")


def scale_hint(lw: LoraWeights, strength: float) -> str | None:
    """One line when ``lw`` has no alpha and a rank of HINT_RANK or more and is used at a strength far
    above 1/rank: it runs at diffusers' scale 1, CogVideoX's own code would run it at 1/rank. None otherwise."""
    rank = lw.rank
    if lw.has_alpha or rank < HINT_RANK or abs(strength) <= 2.0 / rank:
        return None
    return (f"LoRA {Path(lw.path).name} has no alpha and rank {rank}: applied as diffusers does (scale 1) at "
            f"strength {strength:g}; CogVideoX's own inference code applies such LoRAs at lora_scale = 1/rank: "
            f"for that result enter strength {strength / rank:.4f} (= {strength:g}/{rank})")


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise LoraError(f"LoRA file not found: {path}")
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:2] == b"PK" or head[:1] == b"\x80":
        raise LoraError(f"{path.name} is a pickled PyTorch file: LoRAs are read only from .safetensors "
                        "(unpickling can run code); use the .safetensors release of this LoRA")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise LoraError(f"{path.name} is not a readable safetensors file ({e}): LoRAs must be .safetensors") from None
    return tensors, metadata


def describe_foreign(keys: Iterable[str]) -> str | None:
    """What model a LoRA was made for when its key names say it is not CogVideoX, else None."""
    keys = list(keys)
    text = "\n".join(keys)

    def has(pattern):
        return re.search(pattern, text, re.M) is not None

    if has(r"(^|\.)(down_blocks|up_blocks|mid_block|input_blocks|output_blocks)[._]|^lora_unet_(down|up|mid|input|output)_"):
        return "a Stable Diffusion / SDXL UNet LoRA"
    if has(r"(double_blocks|single_blocks|single_transformer_blocks)[._]"):
        return "a Flux LoRA (double/single-stream blocks; HunyuanVideo LoRAs look the same)"
    if has(r"(^|[._])blocks[._]\d+[._](self_attn|cross_attn|ffn)[._]"):
        return "a Wan LoRA (blocks.N.self_attn/cross_attn/ffn)"
    if has(r"^lora_(unet|te\d?)_"):
        return "a kohya-style LoRA (lora_unet_* names), a layout diffusers' CogVideoX loader does not read"
    if has(r"^(text_encoder|te)\w*\.") and not has(r"(^|\.)transformer_blocks\.\d+\.attn1\."):
        return "a text-encoder LoRA"
    if any(k.startswith(("lokr_", "hada_")) or ".lokr_" in k or ".hada_" in k for k in keys):
        return "a LyCORIS (LoKr/LoHa) adapter, not a LoRA"
    return None


def _peft_keys(path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys as ``<module>.lora_A.weight`` etc., module names relative to the transformer."""
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    bad = [k for k in tensors if "dora_scale" in k or "lora_magnitude_vector" in k]
    if bad:
        raise LoraError(f"{path.name} is a DoRA ({len(bad)} magnitude tensors such as {bad[0]!r}): "
                        "only plain LoRAs are supported; use a LoRA export of it")
    out = {}
    for key, t in tensors.items():
        for p in PREFIXES:
            if key.startswith(p):
                key = key[len(p):]
                break
        out[key] = t
    if any("lora_A" not in k and "lora_B" not in k and not k.endswith(".alpha") for k in out):
        out = convert_unet_state_dict_to_peft(out)   # diffusers' older attn-processor names (to_q_lora.down ...)
    return out


def _adapter_config(metadata: dict) -> dict:
    """diffusers' adapter metadata (a PEFT LoraConfig as JSON), transformer part, prefix removed."""
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return {}
    cfg = json.loads(raw)
    if any(k.startswith("transformer.") for k in cfg):
        cfg = {k[len("transformer."):]: v for k, v in cfg.items() if k.startswith("transformer.")}
    return cfg


def _pattern_value(patterns: dict, module: str, default):
    # PEFT's get_pattern_key rule: a pattern matches a dotted suffix of the module name.
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _layers(path: Path, sd: dict[str, torch.Tensor], cfg: dict) -> dict[str, LoraLayer]:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in sd.items():
        leaf = next((lf for lf in _LEAVES if key.endswith("." + lf)), None)
        if leaf is None:
            raise LoraError(f"{path.name}: tensor {key!r} is not a LoRA weight (expected <layer>.lora_A.weight, "
                            ".lora_B.weight or .alpha): not a LoRA layout diffusers reads")
        groups.setdefault(key[: -len(leaf) - 1], {})[leaf] = t
    layers = {}
    for module, g in groups.items():
        if "lora_A.weight" not in g or "lora_B.weight" not in g:
            raise LoraError(f"{path.name}: layer {module!r} has {sorted(g)} but needs both lora_A and lora_B weights")
        a, b = g["lora_A.weight"], g["lora_B.weight"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise LoraError(f"{path.name}: layer {module!r} has lora_A {list(a.shape)} and lora_B {list(b.shape)}; "
                            "only Linear LoRAs with matching ranks are supported")
        layers[module] = LoraLayer(a, b, _scale(module, a.shape[0], g.get("alpha"), cfg), g.get("lora_B.bias"))
    return layers


def _scale(module: str, rank: int, alpha: torch.Tensor | None, cfg: dict) -> float:
    if alpha is not None:
        alpha_value = float(alpha.float().reshape(-1)[0])
    elif cfg:
        alpha_value = float(_pattern_value(cfg.get("alpha_pattern"), module, cfg.get("lora_alpha", rank)))
    else:
        return 1.0   # diffusers without alphas: lora_alpha = r
    return alpha_value / (rank ** 0.5 if cfg.get("use_rslora") else rank)


# =============================================================================== checking
def _modules(transformer: nn.Module) -> dict[str, nn.Module]:
    return dict(transformer.named_modules())


def check(transformer: nn.Module, lora: LoraWeights) -> None:
    """Raise :class:`LoraError` unless every layer of ``lora`` fits a Linear layer of ``transformer``."""
    theirs, ours = lora.made_for, _variant_key(transformer)
    if theirs is not None and theirs != ours:
        raise LoraError(f"{Path(lora.path).name} was made for {VARIANTS[theirs].label} ({lora.origin}) but this "
                        f"transformer is {VARIANTS[ours].label}: pick a LoRA trained for {VARIANTS[ours].label}")
    modules = _modules(transformer)
    missing = [n for n in lora.layers if n not in modules]
    if missing:
        raise LoraError(_unmatched_message(transformer, lora, missing))
    for name, layer in lora.layers.items():
        m = modules[name]
        if not isinstance(m, nn.Linear):
            raise LoraError(f"{Path(lora.path).name}: layer {name!r} is a {type(m).__name__} in this transformer, "
                            f"not a Linear{_made_for(transformer, name)}; pick a LoRA for this model")
        shape, want = (layer.up.shape[0], layer.down.shape[1]), (m.out_features, m.in_features)
        if shape != want or (layer.bias is not None and layer.bias.shape != (m.out_features,)):
            raise LoraError(f"{Path(lora.path).name}: layer {name!r} is {want[0]}x{want[1]} (out x in) but the LoRA "
                            f"gives {shape[0]}x{shape[1]}{_made_for(transformer, name, shape)}; "
                            "pick a LoRA for this model")


def _variant_key(transformer: nn.Module) -> str:
    # only CogVideoX1.5 has the ofs embedding (REFERENCE.md): the same test load_transformer's recognition uses
    is_15 = getattr(transformer.config, "ofs_embed_dim", None) is not None
    return next(k for k, v in VARIANTS.items() if v.version == ("1.5" if is_15 else "1.0"))


def _other_variant(transformer: nn.Module) -> str:
    ofs = getattr(transformer.config, "ofs_embed_dim", None)
    return "CogVideoX-5B-I2V (1.0)" if ofs is not None else "CogVideoX1.5-5B-I2V"


def _made_for(transformer: nn.Module, name: str, shape: tuple[int, int] | None = None) -> str:
    if shape is not None and WIDTH_2B in shape:
        return ": it was made for CogVideoX-2B (width 1920)"
    if name.startswith(VARIANT_LAYERS):
        return f": it was made for {_other_variant(transformer)}"
    return ""


def _unmatched_message(transformer: nn.Module, lora: LoraWeights, missing: list[str]) -> str:
    n_blocks = len(getattr(transformer, "transformer_blocks", ()))
    blocks = [int(m.group(1)) for n in missing if (m := re.match(r"transformer_blocks\.(\d+)\.", n))]
    why = ""
    if any(n.startswith("ofs_embedding") for n in missing):
        why = f" (it adapts ofs_embedding: made for {_other_variant(transformer)})"
    elif blocks and max(blocks) >= n_blocks:
        why = f" (it has blocks up to {max(blocks)}, this transformer {n_blocks}: made for another model size)"
    shown = ", ".join(repr(n) for n in missing[:3])
    return (f"{Path(lora.path).name}: {len(missing)} of {len(lora.layers)} LoRA layers match no layer of this "
            f"CogVideoX transformer{why}, e.g. {shown}; pick a LoRA for this model")


# =============================================================================== applying
def _active(loras) -> list[tuple[LoraWeights, float]]:
    pairs = [(x, 1.0) if isinstance(x, LoraWeights) else (x[0], float(x[1])) for x in loras]
    return [(lw, s) for lw, s in pairs if s != 0.0]


def lora_bytes(loras, dtype: torch.dtype = torch.bfloat16) -> int:
    """Device bytes the LoRA tensors take during a run at compute ``dtype`` (LoraWeights or (lora, strength))."""
    item = torch.empty((), dtype=dtype).element_size()
    return sum((layer.down.numel() + layer.up.numel() + (0 if layer.bias is None else layer.bias.numel())) * item
               for lw, _ in _active(loras) for layer in lw.layers.values())


@contextmanager
def applied(transformer: nn.Module, loras: Sequence, fold: bool = False):
    """Apply LoRAs to ``transformer`` for the ``with`` body only: ``loras`` is a sequence of
    ``(LoraWeights, strength)`` (or bare LoraWeights, strength 1). Checked first (LoraError);
    every Linear is back as it was on exit, whatever ends the body (how it runs: lora_linear; ``fold``:
    folded into the weights per call, for speed options other than exact)."""
    active = _active(loras)
    for lw, _ in active:
        check(transformer, lw)
    per_layer: dict[str, list] = {}
    for lw, s in active:
        for name, layer in lw.layers.items():
            per_layer.setdefault(name, []).append((layer, s))
    with swapped(transformer, _modules(transformer), per_layer, fold):
        yield transformer
