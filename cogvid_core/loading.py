"""Build each CogVideoX I2V component from a hub-layout folder, a single safetensors file or a repo id.

Models are constructed on the meta device and each tensor is read from safetensors straight into
its final dtype and device, so RAM never holds two copies of a model. Only safetensors are read:
pickle checkpoints (.bin/.pt/.ckpt) can run code when loaded and are refused.

What a file is comes from its keys and shapes (``identify``), never from its name or size, so a
wrong pick (a T5 file in the transformer loader, a T2V model, an SD checkpoint, a truncated
download) is told apart with a message saying what the file is and where it belongs.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm as _tqdm

from . import models as M
from .models import CheckpointError, Variant

COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# Prefixes other tools put in front of the diffusers/HF names (ComfyUI saves, wrapped state dicts).
KNOWN_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "text_encoders.t5xxl.transformer.", "module.")
# Keys that describe quantisation, not model tensors (ComfyUI scaled fp8 files).
_MARKERS = ("scaled_fp8",)
_SCALE_SUFFIXES = (".scale_weight", ".scale_input")


# =============================================================================== sources
def resolve(source: str | os.PathLike, component: str, cache_dir: str | os.PathLike | None = None,
            progress: bool = True, local_dir: str | os.PathLike | None = None) -> Path:
    """Where ``component`` of ``source`` lives on disk: a component folder or a single file.

    ``source``: a hub-layout root folder (with ``<component>/``), the component folder itself, a
    ``.safetensors`` file, or a hub repo id (``THUDM/CogVideoX1.5-5B-I2V``). A repo id downloads
    only ``<component>/*`` through ``huggingface_hub.snapshot_download`` (its tqdm bars when
    ``progress``); with ``HF_HUB_OFFLINE=1`` the hub cache (``models--org--name/snapshots/...``)
    answers instead. ``local_dir`` puts the download in a plain folder (e.g. models/CogVideo/<name>).
    """
    if component not in COMPONENTS:
        raise ValueError(f"unknown component {component!r}; one of {', '.join(COMPONENTS)}")
    path = Path(os.fspath(source)).expanduser()
    if path.is_file():
        check_file_type(path)
        return path
    if path.is_dir():
        return _component_folder(path, component)
    if REPO_ID.match(str(source)):
        return _download(str(source), component, cache_dir, progress, local_dir)
    raise CheckpointError(f"{source} not found: give a folder, a .safetensors file or a hub repo id "
                          "like THUDM/CogVideoX1.5-5B-I2V")


def check_file_type(path: Path) -> None:
    """Only safetensors: pickle files can execute code on load."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(f"{path.name} is a pickle checkpoint ({path.suffix}); only .safetensors files are "
                              "accepted (pickle can run code when loaded): use the .safetensors version")
    if path.suffix.lower() != ".safetensors":
        raise CheckpointError(f"{path.name} is not a .safetensors file; only .safetensors files are accepted")


def _component_folder(path: Path, component: str) -> Path:
    sub = path / component
    if sub.is_dir():
        return sub
    if _looks_like_component_folder(path, component):
        return path
    have = sorted(p.name for p in path.iterdir() if p.is_dir())
    raise CheckpointError(f"folder {path} has no {component}/ sub-folder and is not a {component} folder itself "
                          f"(sub-folders: {', '.join(have) or 'none'})")


def _looks_like_component_folder(path: Path, component: str) -> bool:
    if component == "tokenizer":
        return any((path / f).is_file() for f in ("spiece.model", "tokenizer.json", "tokenizer_config.json"))
    if component == "scheduler":
        return (path / "scheduler_config.json").is_file()
    return (path / "config.json").is_file() or _has_files(path, (".safetensors", *PICKLE_SUFFIXES))


def _has_files(folder: Path, suffixes) -> bool:
    return any(p.suffix.lower() in suffixes for p in folder.iterdir() if p.is_file())


def _download(repo_id: str, component: str, cache_dir, progress: bool, local_dir) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    kwargs = dict(allow_patterns=[f"{component}/*"], cache_dir=cache_dir, local_dir=local_dir)
    if not progress:
        kwargs["tqdm_class"] = _SilentTqdm
    try:
        root = Path(snapshot_download(repo_id, **kwargs))
    except (HfHubHTTPError, LocalEntryNotFoundError, HFValidationError, OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"could not download {component}/ of {repo_id}: {reason}; check the repo id, "
                              "your network, or put the folder under models/CogVideo") from e
    folder = root / component
    if not folder.is_dir():
        raise CheckpointError(f"{repo_id} has no {component}/ folder (or it is not in the local hub cache "
                              f"{root}); check the repo id, or put the folder under models/CogVideo")
    return folder


class _SilentTqdm(_tqdm):
    """tqdm that never draws: snapshot_download's bars when progress=False."""

    def __init__(self, *args, **kwargs):
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


# =============================================================================== safetensors files
def read_shapes(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """{key: (shape, dtype string)} from a safetensors header, without reading tensor data."""
    check_file_type(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path.name} is truncated or corrupt ({str(e).splitlines()[0]}): download it again") from e


def _strip_prefix(keys) -> str:
    """The common wrapper prefix of all model keys, if a known one (ComfyUI/DDP saves), else ''."""
    model_keys = [k for k in keys if k not in _MARKERS]
    for p in KNOWN_PREFIXES:
        if model_keys and all(k.startswith(p) for k in model_keys):
            return p
    return ""


def _plain(shapes: dict) -> dict[str, tuple[int, ...]]:
    """Shapes keyed by model names: prefix stripped, quantisation markers and scales dropped."""
    prefix = _strip_prefix(shapes)
    return {k[len(prefix):]: v[0] for k, v in shapes.items()
            if k not in _MARKERS and not k.endswith(_SCALE_SUFFIXES)}


def identify(path: str | os.PathLike) -> str:
    """What a safetensors file holds, from its keys and shapes (e.g. 'T5 text encoder')."""
    raw = read_shapes(Path(path))
    return _identify_keys(_plain(raw), fp8=any(d.startswith("F8") for _, d in raw.values()),
                          scaled="scaled_fp8" in raw)


def _identify_keys(shapes: dict[str, tuple[int, ...]], fp8: bool = False, scaled: bool = False) -> str:
    keys = shapes.keys()
    has = lambda frag: any(frag in k for k in keys)  # noqa: E731
    q8 = " (fp8 scaled)" if scaled else " (fp8)" if fp8 else ""
    if "patch_embed.proj.weight" in shapes and has("transformer_blocks.0.attn1."):
        try:
            cfg = transformer_config_from_shapes(shapes)
        except CheckpointError as e:
            return f"CogVideoX transformer of an unknown kind ({e})"
        if cfg["in_channels"] == 16:
            return f"CogVideoX text-to-video transformer{' 1.5' if cfg['patch_size_t'] else ''}{q8}"
        if cfg["in_channels"] != 32:
            return f"CogVideoX transformer with in_channels={cfg['in_channels']}{q8}"
        return f"CogVideoX transformer ({'1.5' if cfg['patch_size_t'] else '1.0'} I2V){q8}"
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


def _wrong_file(path: Path, what: str, expected: str, where: str) -> CheckpointError:
    return CheckpointError(f"{path.name} is a {what}, not a {expected}: {where}")


# =============================================================================== config inference
def _count(shapes, prefix: str) -> int:
    ids = {int(k[len(prefix):].split(".", 1)[0]) for k in shapes if k.startswith(prefix)}
    return max(ids) + 1 if ids else 0


def transformer_config_from_shapes(shapes: dict[str, tuple[int, ...]]) -> dict:
    """diffusers CogVideoXTransformer3DModel arguments read off a state dict's keys and shapes.

    RoPE has no weights, so it is assumed on: every CogVideoX I2V model (5B) uses it, and the
    T2V/2B models this would mislabel are refused on in_channels anyway.
    """
    try:
        inner, text_dim = shapes["patch_embed.text_proj.weight"]
        head_dim = shapes["transformer_blocks.0.attn1.norm_q.weight"][0]  # LayerNorm over one head
        proj = shapes["patch_embed.proj.weight"]
        out_rows = shapes["proj_out.weight"][0]
        time_dim = shapes["time_embedding.linear_1.weight"][0]
    except KeyError as e:
        raise CheckpointError(f"missing tensor {e}") from None
    out_channels = 16  # every CogVideoX VAE has 16 latent channels
    if len(proj) == 4:  # 1.0: Conv2d(in, inner, p, stride=p)
        patch, patch_t = proj[2], None
        in_channels = proj[1]
    else:  # 1.5: Linear over p_t*p*p*C patches; out rows = p*p*p_t*out_channels
        patch = 2
        patch_t = out_rows // (patch * patch * out_channels)
        in_channels = proj[1] // (patch * patch * max(patch_t, 1))
    base = M.TRANSFORMER_CONFIGS[(M.V15 if patch_t else M.V10).key]
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
    candidates = [{k: M.TRANSFORMER_CONFIGS[M.V10.key][k] for k in ("sample_height", "sample_width", "sample_frames")},
                  dict(M.TINY_SAMPLE[M.V10.key])]
    for c in candidates:
        t = (c["sample_frames"] - 1) // cfg["temporal_compression_ratio"] + 1
        if t * (c["sample_height"] // cfg["patch_size"]) * (c["sample_width"] // cfg["patch_size"]) == n_video:
            return c
    raise CheckpointError(f"learned positional embedding covers {n_video} video patches, which matches no known "
                          "CogVideoX-5B-I2V training size (49 x 480 x 720)")


def vae_config_from_shapes(shapes: dict[str, tuple[int, ...]], variant: Variant) -> dict:
    """AutoencoderKLCogVideoX arguments from keys and shapes.

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


# =============================================================================== weights
def _weight_files(folder: Path, stems: tuple[str, ...]) -> list[Path]:
    """The safetensors files of a component folder (via the shard index when there is one)."""
    for stem in stems:
        index = folder / f"{stem}.safetensors.index.json"
        if index.is_file():
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [n for n in names if not (folder / n).is_file()]
            if missing:
                raise CheckpointError(f"{folder} is incomplete: {', '.join(missing)} missing; download it again")
            return [folder / n for n in names]
        single = folder / f"{stem}.safetensors"
        if single.is_file():
            return [single]
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    if _has_files(folder, PICKLE_SUFFIXES):
        raise CheckpointError(f"{folder} only has pickle weights (.bin/.pt); only .safetensors files are accepted: "
                              "download the safetensors version")
    raise CheckpointError(f"{folder} has no .safetensors weights")


def _target_dtype(name: str, t: torch.Tensor, module: torch.nn.Module, dtype, storage_dtype, keep_fp8: bool):
    """Which dtype one tensor is stored in after load."""
    if not t.is_floating_point():
        return t.dtype
    linear_weight = isinstance(module, torch.nn.Linear) and name.endswith("weight")
    if linear_weight and storage_dtype in FP8_DTYPES and _quantizable(name):
        return storage_dtype
    if linear_weight and keep_fp8 and t.dtype in FP8_DTYPES:
        return t.dtype
    return dtype


def _quantizable(name: str) -> bool:
    # Only the repeated blocks: embeddings and in/out projections are small and precision-sensitive.
    return "transformer_blocks." in name or "encoder.block." in name


def load_weights(model: torch.nn.Module, files: list[Path], dtype: torch.dtype, device, *,
                 storage_dtype: torch.dtype | None = None, keep_fp8: bool = False,
                 ignore=lambda k: False, finalize=None) -> None:
    """Read safetensors files tensor by tensor into a meta-device ``model`` (assigning, not copying).

    Each tensor goes from the file straight to its final dtype/device and replaces the meta
    placeholder, so peak RAM is the model once plus one tensor. ComfyUI scaled-fp8 weights are
    multiplied by their ``scale_weight`` here (dequantised). Raises CheckpointError on unknown or
    missing tensors.
    """
    unexpected = []
    for path in files:
        shapes = read_shapes(path)
        prefix = _strip_prefix(shapes)
        with safe_open(str(path), framework="pt") as f:
            scales = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.endswith(".scale_weight")}
            for key in f.keys():
                name = key[len(prefix):]
                if key in _MARKERS or name.endswith(_SCALE_SUFFIXES) or ignore(name):
                    continue
                owner, _, leaf = name.rpartition(".")
                try:
                    module = model.get_submodule(owner)
                except AttributeError:
                    unexpected.append(name)
                    continue
                if leaf not in module._parameters and leaf not in module._buffers:
                    unexpected.append(name)
                    continue
                t = _read_tensor(f, key, path)
                scale = scales.get(f"{name[:-len('weight')]}scale_weight") if name.endswith("weight") else None
                if scale is not None:
                    t = t.to(torch.float32) * scale.to(torch.float32)
                target = _target_dtype(name, t, module, dtype, storage_dtype, keep_fp8)
                if target in FP8_DTYPES and t.dtype not in FP8_DTYPES:
                    t = t.to(torch.float32).clamp(-torch.finfo(target).max, torch.finfo(target).max)
                _assign(module, leaf, t.to(device=device, dtype=target))
    if unexpected:
        raise CheckpointError(f"{len(unexpected)} tensors do not belong to this model (e.g. {unexpected[0]}): "
                              "a different model or version")
    if finalize is not None:  # e.g. tie shared embeddings before looking for holes
        finalize(model)
    missing = [n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.is_meta]
    if missing:
        raise CheckpointError(f"{len(missing)} tensors missing from the checkpoint (e.g. {missing[0]}): the file "
                              "is truncated or a different model; download it again")


def _read_tensor(f, key: str, path: Path) -> torch.Tensor:
    try:
        return f.get_tensor(key)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{path.name} is truncated or corrupt ({e}): download it again") from e


def _assign(module: torch.nn.Module, leaf: str, t: torch.Tensor) -> None:
    if leaf in module._parameters:
        module._parameters[leaf] = torch.nn.Parameter(t, requires_grad=False)
    else:
        module._buffers[leaf] = t


# =============================================================================== fp8 compute
class Fp8Linear(torch.nn.Linear):
    """A Linear whose weight is stored in fp8 and upcast to the input dtype at each call.

    Cost: one temporary copy of this layer's weight in the compute dtype per call (at most
    12288 x 3072 x 2 bytes = 72 MiB for the 5B transformer) and the cast's memory traffic,
    small next to the matmul at video sequence lengths. Halves the resident weight bytes.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


def enable_fp8_compute(model: torch.nn.Module) -> int:
    """Switch every Linear holding an fp8 weight to Fp8Linear (same object, new class); returns the count."""
    n = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear and module.weight.dtype in FP8_DTYPES:
            module.__class__ = Fp8Linear
            n += 1
    return n


def _finish(model: torch.nn.Module) -> torch.nn.Module:
    enable_fp8_compute(model)
    return model.eval().requires_grad_(False)


def _stored_fp8(shapes: dict[str, tuple[tuple[int, ...], str]]) -> bool:
    return any(d.startswith("F8") for _, d in shapes.values()) and "scaled_fp8" not in shapes


# =============================================================================== transformer
def load_transformer(source, dtype: torch.dtype = torch.bfloat16, device="cpu",
                     storage_dtype: torch.dtype | None = None, cache_dir=None, progress: bool = True):
    """(CogVideoXTransformer3DModel, Variant) from a folder, single file or repo id.

    fp8 files keep their fp8 Linear weights (upcast per layer at call time, see Fp8Linear) unless
    ``storage_dtype`` says otherwise; ``storage_dtype=torch.float8_e4m3fn`` on a bf16/fp32 file
    quantises the blocks' Linear weights at load. Other tensors take ``dtype``.
    """
    from diffusers import CogVideoXTransformer3DModel

    variant, config, files, fp8 = _transformer_source(source, cache_dir, progress)
    with torch.device("meta"):
        model = CogVideoXTransformer3DModel.from_config(config)
    keep = fp8 and storage_dtype is None or storage_dtype in FP8_DTYPES
    load_weights(model, files, dtype, device, storage_dtype=storage_dtype, keep_fp8=keep)
    return _finish(model), variant


def peek_transformer(source, cache_dir=None, progress: bool = True) -> tuple[Variant, dict]:
    """(Variant, diffusers config) of a transformer source, reading only headers and config:
    lets a run check frames/size/precision before loading gigabytes."""
    variant, config, _, _ = _transformer_source(source, cache_dir, progress)
    return variant, config


def _transformer_source(source, cache_dir, progress):
    path = resolve(source, "transformer", cache_dir, progress)
    if path.is_dir():
        config = _read_config(path, "CogVideoXTransformer3DModel", "CogVideoX transformer", "the transformer loader")
        files = _weight_files(path, ("diffusion_pytorch_model",))
        fp8 = any(_stored_fp8(read_shapes(f)) for f in files)
    else:
        raw = read_shapes(path)
        shapes = _plain(raw)
        what = _identify_keys(shapes)
        if not what.startswith("CogVideoX transformer") and not what.startswith("CogVideoX text-to-video"):
            raise _wrong_file(path, what, "CogVideoX transformer", _where(what))
        config = transformer_config_from_shapes(shapes)
        files, fp8 = [path], _stored_fp8(raw)
    return M.variant_from_transformer_config(config), config, files, fp8


def _read_config(folder: Path, class_name: str, expected: str, loader: str) -> dict:
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
        return "this pack needs an image-to-video model (CogVideoX-5B-I2V or CogVideoX1.5-5B-I2V)"
    if what.startswith("CogVideoX transformer"):
        return "pick it in the CogVideoX transformer loader"
    return "it does not belong to CogVideoX; pick a CogVideoX I2V checkpoint"


# =============================================================================== VAE
def load_vae(source, dtype: torch.dtype = torch.bfloat16, device="cpu", variant: Variant | str | None = None,
             cache_dir=None, progress: bool = True):
    """AutoencoderKLCogVideoX from a folder, single file or repo id.

    ``invert_scale_latents`` (1.5 divides latents by the scaling factor, 1.0 multiplies) is not in
    the weights: with ``variant`` given it is set from the variant (the transformer decides; both
    variants share VAE weights); else a folder's config.json decides; a single file without a
    ``variant`` is refused.
    """
    from diffusers import AutoencoderKLCogVideoX

    variant = M.VARIANTS[variant] if isinstance(variant, str) else variant
    path = resolve(source, "vae", cache_dir, progress)
    if path.is_dir():
        config = _read_config(path, "AutoencoderKLCogVideoX", "CogVideoX VAE", "the VAE loader")
        files = _weight_files(path, ("diffusion_pytorch_model",))
        if variant is not None:
            config["invert_scale_latents"] = variant.invert_scale_latents
    else:
        shapes = _plain(read_shapes(path))
        what = _identify_keys(shapes)
        if what != "CogVideoX VAE":
            raise _wrong_file(path, what, "CogVideoX VAE", _where(what))
        if variant is None:
            raise CheckpointError(f"{path.name} is a single VAE file, which does not say which variant it serves: "
                                  "pass variant= (the transformer's variant)")
        config, files = vae_config_from_shapes(shapes, variant), [path]
    with torch.device("meta"):
        model = AutoencoderKLCogVideoX.from_config(config)
    load_weights(model, files, dtype, device)
    return _finish(model)


# =============================================================================== T5
def load_text_encoder(source, dtype: torch.dtype = torch.bfloat16, device="cpu", tokenizer=None,
                      cache_dir=None, progress: bool = True):
    """(T5EncoderModel, tokenizer) from a hub folder / repo id or a ComfyUI ``t5xxl_*.safetensors``.

    The tokenizer comes from ``tokenizer`` (a folder, or an already built tokenizer), else the
    ``tokenizer/`` folder beside ``text_encoder/`` (or beside the single file). ComfyUI scaled
    fp8 files are dequantised to ``dtype`` on load.
    """
    from transformers import T5Config, T5EncoderModel

    path = resolve(source, "text_encoder", cache_dir, progress)
    if path.is_dir():
        config = _read_config(path, "t5", "T5 text encoder", "the text encoder loader")
        config = T5Config.from_pretrained(str(path))
        files = _weight_files(path, ("model",))
    else:
        shapes = _plain(read_shapes(path))
        what = _identify_keys(shapes)
        if not what.startswith("T5 text encoder"):
            raise _wrong_file(path, what, "T5 text encoder", _where(what))
        config, files = T5Config(**t5_config_from_shapes(shapes)), [path]
    with torch.device("meta"):
        model = T5EncoderModel(config)
    # decoder/lm_head live in full T5 files; the encoder-only model ignores them.
    load_weights(model, files, dtype, device, ignore=lambda k: k.startswith(("decoder.", "lm_head.")),
                 finalize=_tie_embeddings)
    return _finish(model), _tokenizer_for(source, path, tokenizer, cache_dir, progress)


def _tie_embeddings(model) -> None:
    # Files store the embedding once (shared.weight, or encoder.embed_tokens.weight); share it.
    shared, tokens = model.shared, model.encoder.embed_tokens
    if shared.weight.is_meta and not tokens.weight.is_meta:
        model.shared = tokens
    model.encoder.embed_tokens = model.shared


def _tokenizer_for(source, te_path: Path, tokenizer, cache_dir, progress):
    from transformers import AutoTokenizer

    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    if tokenizer is not None:
        folder = resolve(tokenizer, "tokenizer", cache_dir, progress)
    elif (te_path.parent / "tokenizer").is_dir():
        folder = te_path.parent / "tokenizer"
    elif REPO_ID.match(str(source)) and not Path(os.fspath(source)).exists():
        folder = resolve(source, "tokenizer", cache_dir, progress)
    else:
        raise CheckpointError(f"no tokenizer for {te_path.name}: pass tokenizer=<folder with spiece.model or "
                              "tokenizer.json> (ComfyUI ships one in comfy/text_encoders/t5_tokenizer), or put a "
                              f"tokenizer/ folder next to it")
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"could not load the tokenizer in {folder}: {e}") from e


# =============================================================================== scheduler
SCHEDULER_DEFAULTS = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=True, steps_offset=0, prediction_type="v_prediction",
    rescale_betas_zero_snr=True, timestep_spacing="trailing", snr_shift_scale=1.0,
)


def load_scheduler(source=None, kind: str = "dpm", cache_dir=None, progress: bool = True):
    """CogVideoXDPMScheduler ("dpm") or CogVideoXDDIMScheduler ("ddim").

    Config from the source's ``scheduler/`` folder when it has one, else the 5B I2V repos' values
    (REFERENCE.md). A single-file source has no scheduler: defaults.
    """
    from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler

    classes = {"dpm": CogVideoXDPMScheduler, "ddim": CogVideoXDDIMScheduler}
    if kind not in classes:
        raise ValueError(f"scheduler kind must be 'dpm' or 'ddim', got {kind!r}")
    cls = classes[kind]
    folder = None
    if source is not None and not Path(os.fspath(source)).is_file():
        try:
            folder = resolve(source, "scheduler", cache_dir, progress)
        except CheckpointError:
            if REPO_ID.match(str(source)) and not Path(os.fspath(source)).exists():
                raise
    if folder is None:
        return cls(**getattr(M, "SCHEDULER_CONFIG", SCHEDULER_DEFAULTS))
    return cls.from_config(cls.load_config(str(folder)))
