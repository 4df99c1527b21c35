"""What a checkpoint file or folder is, told from its keys and shapes (never its name or size),
and the model config those shapes imply.

A wrong pick (a T5 file in the transformer loader, a T2V model, an SD checkpoint, a truncated
download) is told apart with a message saying what the file is and where it belongs. Configs
start from the closest row of the variant table (``models.VARIANTS``) and take every width,
depth and structural trait from the shapes. ComfyUI core's own transformer names are read as
diffusers' (``corelayout``); its per-layer quantized and all-in-one files are refused, saying what they are.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors import SafetensorError, safe_open

from cogvid_core.model import corelayout
from cogvid_core.model import variants as M
from cogvid_core.model.variants import CheckpointError, Variant
from cogvid_core.model.sources import check_file_type

# Prefixes other tools put in front of the diffusers/HF names (ComfyUI saves, wrapped state dicts).
KNOWN_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "text_encoders.t5xxl.transformer.", "module.")
# Keys that describe quantisation, not model tensors (ComfyUI scaled fp8 files).
MARKERS = ("scaled_fp8",)
SCALE_SUFFIXES = (".scale_weight", ".scale_input")
QUANT_SUFFIX = ".comfy_quant"
ALL_IN_ONE = "ComfyUI all-in-one CogVideoX checkpoint (transformer, VAE and text encoder in one file)"


def read_shapes(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """{key: (shape, dtype string)} from a safetensors header, without reading tensor data."""
    check_file_type(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path.name} is truncated or corrupt ({str(e).splitlines()[0]}): download it again") from e


def strip_prefix(keys) -> str:
    """The common wrapper prefix of all model keys, if a known one (ComfyUI/DDP saves), else ''."""
    model_keys = [k for k in keys if k not in MARKERS]
    for p in KNOWN_PREFIXES:
        if model_keys and all(k.startswith(p) for k in model_keys):
            return p
    return ""


def renamer(keys):
    """file key -> model (diffusers) name for one file: the wrapper prefix stripped, and ComfyUI core's
    own CogVideoX transformer names (``corelayout``) mapped to diffusers', recognised by structure."""
    keys = list(keys)
    prefix = strip_prefix(keys)
    if corelayout.is_core(k[len(prefix):] for k in keys):
        return lambda key: corelayout.to_diffusers(key[len(prefix):])
    return lambda key: key[len(prefix):]


def plain_shapes(shapes: dict) -> dict[str, tuple[int, ...]]:
    """Shapes keyed by model names (see :func:`renamer`), quantisation markers and scales dropped."""
    name = renamer(shapes)
    return {name(k): v[0] for k, v in shapes.items() if k not in MARKERS and not k.endswith(SCALE_SUFFIXES)}


def identify(path: str | os.PathLike) -> str:
    """What a safetensors file holds, from its keys and shapes (e.g. 'T5 text encoder')."""
    raw = read_shapes(Path(path))
    what = identify_keys(plain_shapes(raw), fp8=any(d.startswith("F8") for _, d in raw.values()),
                         scaled="scaled_fp8" in raw)
    return what + (" (ComfyUI per-layer quantized)" if layer_quantized(raw) else "")


def layer_quantized(keys) -> bool:
    """ComfyUI core's mixed-precision files: a ``<layer>.comfy_quant`` entry (JSON: int8, fp8, nvfp4 ...)
    and its own scales per layer; the older ``scaled_fp8`` files are read (``tensors.dequantised``)."""
    return any(k.endswith(QUANT_SUFFIX) for k in keys)


def identify_keys(shapes: dict[str, tuple[int, ...]], fp8: bool = False, scaled: bool = False) -> str:
    keys = shapes.keys()
    has = lambda frag: any(frag in k for k in keys)  # noqa: E731
    q8 = " (fp8 scaled)" if scaled else " (fp8)" if fp8 else ""
    if has("model.diffusion_model.") and any(k.startswith(("vae.", "first_stage_model.")) for k in keys) \
            and (has(".blocks.0.attn_out.") or has(".transformer_blocks.0.attn1.")):
        return ALL_IN_ONE
    if "patch_embed.proj.weight" in shapes and has("transformer_blocks.0.attn1."):
        return _transformer_kind(shapes) + q8
    if has("encoder.down_blocks.") and has("decoder.conv_in.conv."):
        return "CogVideoX VAE"
    if has("encoder.block.0.layer.0.SelfAttention."):
        return f"T5 text encoder{q8}"
    if has("encoder.down.0.block.") or has("decoder.up.0.block."):
        return "Stable Diffusion / Flux VAE"
    if has("text_model.encoder.layers."):
        return "CLIP text encoder"
    if has("lora_") or has(".lora."):
        return "LoRA"
    if has("input_blocks.") or has("double_blocks.") or has("joint_blocks.") or has("down_blocks.0.attentions."):
        return "Stable Diffusion / Flux / other diffusion checkpoint"
    if has("transformer_blocks.") or has("blocks."):
        return "another diffusion transformer (not CogVideoX)"
    first = next(iter(keys), "none")
    return f"unknown safetensors file ({len(shapes)} tensors, first key {first!r})"


def _transformer_kind(shapes: dict[str, tuple[int, ...]]) -> str:
    try:
        cfg = transformer_config_from_shapes(shapes)
    except CheckpointError as e:
        return f"CogVideoX transformer of an unknown kind ({e})"
    if cfg["in_channels"] == M.LATENT_CHANNELS:
        base = M.closest_variant(M.transformer_traits(cfg))
        return f"CogVideoX text-to-video transformer{' ' + base.version if base.patch_size_t else ''}"
    try:
        return f"CogVideoX transformer ({M.variant_from_transformer_config(cfg).version} I2V)"
    except CheckpointError as e:
        return f"CogVideoX transformer of an unknown kind ({e})"


def single_file(path: Path, kind: tuple[str, ...], expected: str):
    """(raw header, plain shapes) of a single file that must be ``kind`` (prefixes of ``identify``'s
    answer); anything else is refused with what it is and where it belongs."""
    raw = read_shapes(path)
    shapes = plain_shapes(raw)
    what = identify_keys(shapes)
    if not what.startswith(kind):
        raise CheckpointError(f"{path.name} is a {what}, not a {expected}: {_where(what)}")
    if layer_quantized(raw):
        raise CheckpointError(f"{path.name} is a {what} quantized per layer by ComfyUI (.comfy_quant: int8/fp8/"
                              "nvfp4 weights with their own scales), which this pack does not read: use the bf16 "
                              "or fp16 file of the same model")
    return raw, shapes


def read_config(folder: Path, class_name: str, expected: str, loader: str) -> dict:
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{folder} has no config.json; expected a {expected} folder")
    config = json.loads(cfg_path.read_text())
    found = config.get("_class_name") or config.get("model_type")  # diffusers / transformers configs
    if found != class_name:
        raise CheckpointError(f"{folder} holds a {found}, not a {expected}: pick it in the right loader "
                              f"(expected {class_name} in {loader})")
    return config


def _where(what: str) -> str:
    if what.startswith("T5"):
        return "pick it in the T5 / text encoder loader"
    if what.startswith("CogVideoX VAE"):
        return "pick it in the VAE loader"
    if what.startswith("CogVideoX text-to-video"):
        return f"this pack needs an image-to-video model ({' or '.join(v.label for v in M.VARIANTS.values())})"
    if what.startswith("CogVideoX transformer"):
        return "pick it in the CogVideoX transformer loader"
    if what == ALL_IN_ONE:
        return ("this pack reads each part from its own file: use the split files (diffusion_models/, vae/, "
                "text_encoders/t5xxl_*) of the same model")
    return "it does not belong to CogVideoX; pick a CogVideoX I2V checkpoint"


def _count(shapes, prefix: str) -> int:
    ids = {int(k[len(prefix):].split(".", 1)[0]) for k in shapes if k.startswith(prefix)}
    return max(ids) + 1 if ids else 0


def transformer_config_from_shapes(shapes: dict[str, tuple[int, ...]]) -> dict:
    """diffusers CogVideoXTransformer3DModel arguments read off a state dict's keys and shapes.

    RoPE has no weights, so it is assumed on (from the closest table row): every CogVideoX I2V model
    (5B) uses it, and the T2V/2B models this would mislabel are refused on in_channels anyway.
    """
    try:
        inner, text_dim = shapes["patch_embed.text_proj.weight"]
        head_dim = shapes["transformer_blocks.0.attn1.norm_q.weight"][0]  # LayerNorm over one head
        proj = shapes["patch_embed.proj.weight"]
        out_rows = shapes["proj_out.weight"][0]
        time_dim = shapes["time_embedding.linear_1.weight"][0]
    except KeyError as e:
        raise CheckpointError(f"missing tensor {e}") from None
    out_channels = M.LATENT_CHANNELS
    if len(proj) == 4:  # 1.0: Conv2d(in, inner, p, stride=p)
        patch, patch_t = proj[2], None
        in_channels = proj[1]
    else:  # 1.5: Linear over p_t*p*p*C patches; out rows = p*p*p_t*out_channels
        patch = 2
        patch_t = out_rows // (patch * patch * out_channels)
        in_channels = proj[1] // (patch * patch * max(patch_t, 1))
    base = M.closest_variant(dict(patch_size_t=patch_t, ofs="ofs_embedding.linear_1.weight" in shapes,
                                  learned_positions="patch_embed.pos_embedding" in shapes)).transformer
    cfg = dict(base, num_attention_heads=inner // head_dim, attention_head_dim=head_dim, in_channels=in_channels,
               out_channels=out_channels, time_embed_dim=time_dim, text_embed_dim=text_dim,
               num_layers=_count(shapes, "transformer_blocks."), patch_size=patch, patch_size_t=patch_t,
               # 1.5's Linear patch embed always has a bias; only 1.0's Conv2d follows patch_bias
               patch_bias=base["patch_bias"] if patch_t else "patch_embed.proj.bias" in shapes,
               attention_bias="transformer_blocks.0.attn1.to_q.bias" in shapes,
               ofs_embed_dim=shapes["ofs_embedding.linear_1.weight"][1] if "ofs_embedding.linear_1.weight" in shapes else None,
               use_learned_positional_embeddings="patch_embed.pos_embedding" in shapes)
    if cfg["use_learned_positional_embeddings"]:
        cfg.update(_sample_size_from_positions(shapes["patch_embed.pos_embedding"][1] - cfg["max_text_seq_length"], cfg))
    return cfg


def _sample_size_from_positions(n_video: int, cfg: dict) -> dict:
    """The trained (frames, height, width) whose patch count matches the learned embedding."""
    fixed = [v for v in M.VARIANTS.values() if v.fixed_size]
    candidates = [c for v in fixed for c in ({k: v.transformer[k] for k in ("sample_height", "sample_width",
                                                                            "sample_frames")}, v.tiny_sample) if c]
    for c in candidates:
        t = (c["sample_frames"] - 1) // cfg["temporal_compression_ratio"] + 1
        if t * (c["sample_height"] // cfg["patch_size"]) * (c["sample_width"] // cfg["patch_size"]) == n_video:
            return c
    sizes = ", ".join(f"{v.label} {v.default_frames} x {v.default_height} x {v.default_width}" for v in fixed)
    raise CheckpointError(f"learned positional embedding covers {n_video} video patches, which matches no known "
                          f"CogVideoX training size ({sizes})")


def vae_config_from_shapes(shapes: dict[str, tuple[int, ...]], variant: Variant | None = None) -> dict:
    """AutoencoderKLCogVideoX arguments from keys and shapes (``variant``: see ``models.vae_config``).

    GroupNorm has no group count in its weights: 32 for the real widths, else the tiny config's.
    """
    n_levels = _count(shapes, "encoder.down_blocks.")
    widths = tuple(shapes[f"encoder.down_blocks.{i}.resnets.0.conv2.conv.weight"][0] for i in range(n_levels))
    tiny = widths == tuple(M.TINY_VAE["block_out_channels"])  # else real widths: 32 groups, 480x720 tiles
    return dict(M.vae_config(variant, tiny), block_out_channels=widths,
                layers_per_block=_count(shapes, "encoder.down_blocks.0.resnets."),
                latent_channels=shapes["decoder.conv_in.conv.weight"][1])


def t5_config_from_shapes(shapes: dict[str, tuple[int, ...]]) -> dict:
    """transformers T5Config arguments from an encoder state dict (HF or ComfyUI t5xxl files)."""
    emb = shapes.get("shared.weight") or shapes.get("encoder.embed_tokens.weight")
    rel = shapes.get("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    if emb is None or rel is None:
        raise CheckpointError("T5 embedding or relative attention bias missing")
    ff = "encoder.block.0.layer.1.DenseReluDense."
    gated = f"{ff}wi_0.weight" in shapes
    heads = rel[1]
    return dict(M.T5_CONFIG, vocab_size=emb[0], d_model=emb[1], num_heads=heads,
                relative_attention_num_buckets=rel[0],
                d_kv=shapes["encoder.block.0.layer.0.SelfAttention.q.weight"][0] // heads,
                d_ff=shapes[f"{ff}wi_0.weight" if gated else f"{ff}wi.weight"][0],
                num_layers=_count(shapes, "encoder.block."),
                feed_forward_proj="gated-gelu" if gated else "relu")


def stored_fp8(shapes: dict[str, tuple[tuple[int, ...], str]]) -> bool:
    return any(d.startswith("F8") for _, d in shapes.values()) and "scaled_fp8" not in shapes
