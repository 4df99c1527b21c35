"""Build each CogVideoX I2V component on the meta device and stream its tensors in.

Each tensor is read from safetensors straight into its final dtype and device, so RAM never
holds two copies of a model. Where a source lives is ``sources``' concern, what a file is and
the config its shapes imply is ``checkpoints``'; which dtype each tensor takes is ``precision``'s
(fp8 storage: ``precision.is_fp8_layer``; fp32 kept modules: ``precision.mark_keep_fp32``).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open

from cogvid_core.model import precision as P
from cogvid_core.model import variants as M
from cogvid_core.model import tensors as T
from cogvid_core.model.checkpoints import (read_config, read_shapes, renamer, single_file, stored_fp8,
                          t5_config_from_shapes, transformer_config_from_shapes, vae_config_from_shapes)
from cogvid_core.model.variants import CheckpointError, Variant
from cogvid_core.model.sources import is_repo_id, resolve, weight_files
from cogvid_core.model.tensors import FP8_DTYPES

log = logging.getLogger(__name__)


# =============================================================================== weights
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
        rename = renamer(read_shapes(path))
        with safe_open(str(path), framework="pt") as f:
            scales = {rename(k): f.get_tensor(k) for k in f.keys() if k.endswith(".scale_weight")}
            for key, name, slot in T.matched(model, f.keys(), rename, ignore, unexpected):
                # The one place a tensor goes from a file (path, key) into the model, as ``target``.
                t = T.dequantised(_read_tensor(f, key, path), scales.get(T.scale_name(name)))
                target = T.target_dtype(name, t, slot[0], dtype, storage_dtype, keep_fp8)
                T.assign(*slot, T.cast(t, target, device))
    _check_complete(model, unexpected, finalize)


def _check_complete(model: torch.nn.Module, unexpected: list[str], finalize) -> None:
    T.refuse_unexpected(unexpected)
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


# =============================================================================== file-backed
def _reader(file_backed: bool, device):
    """``load_weights``, or its file-backed drop-in (``fileindex.lazy_load``) for a host load.

    File-backed (the default for the transformer and T5): the model keeps meta placeholders and a
    per-tensor index into the user's safetensors files; ``placement.place`` reads the weights block
    by block through two pinned staging buffers (``filestream``), so the process never owns a full
    host copy (T5 at text encode held two: 21.8 GiB for a 9.5 GB model, issue 12) and the kernel
    may drop the page cache under pressure. ``file_backed=False`` (or a non-host ``device``, which
    asks for the weights there now) is the eager load: every tensor read now.
    """
    if not file_backed or torch.device(device).type != "cpu":
        return load_weights
    from cogvid_core.model.fileindex import lazy_load

    def lazy(model, files, dtype, _device, **kw):
        lazy_load(model, files, dtype, **kw)
        _warn_if_short(files)
    return lazy


def _warn_if_short(files) -> None:
    """Where RAM is smaller than the model the run still works (blocks are re-read from disk at
    every use instead of from the page cache): say so, and why it is slower."""
    from cogvid_core.device.devmem import host_available_bytes

    total = sum(Path(f).stat().st_size for f in files)
    avail = host_available_bytes()
    if avail is not None and avail < total:
        log.warning("%s: %.1f GiB of weights but %.1f GiB of RAM available: the page cache cannot keep the "
                    "file, so every use reads it from disk again (each denoise step reads the whole "
                    "transformer: expect steps at disk speed, e.g. ~%.0f s per step at 1 GB/s)",
                    Path(files[0]).name, total / 2 ** 30, avail / 2 ** 30, total / 1e9)


# =============================================================================== transformer
def load_transformer(source, dtype: torch.dtype = torch.bfloat16, device="cpu",
                     storage_dtype: torch.dtype | None = None, cache_dir=None, progress: bool = True,
                     file_backed: bool = True):
    """(CogVideoXTransformer3DModel, Variant) from a folder, single file or repo id.

    File-backed by default (see :func:`_reader`): nothing is read until the model is placed.

    fp8 files keep their fp8 Linear weights (upcast per layer at call time, see Fp8Linear) unless
    ``storage_dtype`` says otherwise; ``storage_dtype=torch.float8_e4m3fn`` on a bf16/fp32 file
    quantises the blocks' Linear weights at load. Other tensors take ``dtype``.
    """
    from diffusers import CogVideoXTransformer3DModel

    variant, config, files, fp8 = _transformer_source(source, cache_dir, progress)
    with torch.device("meta"):
        model = CogVideoXTransformer3DModel.from_config(config)
    P.mark_keep_fp32(model, "transformer", dtype)
    keep = fp8 and storage_dtype is None or storage_dtype in FP8_DTYPES
    _reader(file_backed, device)(model, files, dtype, device, storage_dtype=storage_dtype, keep_fp8=keep)
    return _finish(model), variant


def peek_transformer(source, cache_dir=None, progress: bool = True) -> tuple[Variant, dict]:
    """(Variant, diffusers config) of a transformer source, reading only headers and config:
    lets a run check frames/size/precision before loading gigabytes."""
    variant, config, _, _ = _transformer_source(source, cache_dir, progress)
    return variant, config


def _transformer_source(source, cache_dir, progress):
    path = resolve(source, "transformer", cache_dir, progress)
    if path.is_dir():
        config = read_config(path, "CogVideoXTransformer3DModel", "CogVideoX transformer", "the transformer loader")
        files = weight_files(path, ("diffusion_pytorch_model",))
        fp8 = any(stored_fp8(read_shapes(f)) for f in files)
    else:
        raw, shapes = single_file(path, ("CogVideoX transformer", "CogVideoX text-to-video"), "CogVideoX transformer")
        config = transformer_config_from_shapes(shapes)
        files, fp8 = [path], stored_fp8(raw)
    return M.variant_from_transformer_config(config), config, files, fp8


# =============================================================================== VAE
def load_vae(source, dtype: torch.dtype = torch.bfloat16, device="cpu", variant: Variant | str | None = None,
             cache_dir=None, progress: bool = True):
    """AutoencoderKLCogVideoX from a folder, single file or repo id.

    The weights serve both variants. The latent scaling rule (``invert_scale_latents``: 1.5
    divides latents by the scaling factor, 1.0 multiplies) belongs to the transformer's variant,
    and this engine's sampler applies it from there; the config records it only for diffusers'
    own pipelines: from ``variant`` when given, else a folder's config.json, else (a single file)
    diffusers' default.
    """
    from diffusers import AutoencoderKLCogVideoX

    variant = M.VARIANTS[variant] if isinstance(variant, str) else variant
    path = resolve(source, "vae", cache_dir, progress)
    if path.is_dir():
        config = read_config(path, "AutoencoderKLCogVideoX", "CogVideoX VAE", "the VAE loader")
        files = weight_files(path, ("diffusion_pytorch_model",))
        if variant is not None:
            config["invert_scale_latents"] = variant.invert_scale_latents
    else:
        _, shapes = single_file(path, ("CogVideoX VAE",), "CogVideoX VAE")
        config, files = vae_config_from_shapes(shapes, variant), [path]
    with torch.device("meta"):
        model = AutoencoderKLCogVideoX.from_config(config)
    P.mark_keep_fp32(model, "vae", dtype)
    load_weights(model, files, dtype, device)
    return _finish(model)


# =============================================================================== T5
def load_text_encoder(source, dtype: torch.dtype = torch.bfloat16, device="cpu", tokenizer=None,
                      cache_dir=None, progress: bool = True, file_backed: bool = True):
    """(T5EncoderModel, tokenizer) from a hub folder / repo id or a ComfyUI ``t5xxl_*.safetensors``.

    The tokenizer comes from ``tokenizer`` (a folder, or an already built tokenizer), else the
    ``tokenizer/`` folder beside ``text_encoder/`` (or beside the single file). ComfyUI scaled
    fp8 files are dequantised to ``dtype`` on load (file-backed: when read, see :func:`_reader`).
    """
    from transformers import T5Config, T5EncoderModel

    path = resolve(source, "text_encoder", cache_dir, progress)
    if path.is_dir():
        read_config(path, "t5", "T5 text encoder", "the text encoder loader")  # refuses other folders
        config = T5Config.from_pretrained(str(path))
        files = weight_files(path, ("model",))
    else:
        _, shapes = single_file(path, ("T5 text encoder",), "T5 text encoder")
        config, files = T5Config(**t5_config_from_shapes(shapes)), [path]
    with torch.device("meta"):
        model = T5EncoderModel(config)
    P.mark_keep_fp32(model, "text_encoder", dtype)   # fp16: the wo layers stay fp32, as transformers loads T5
    # decoder/lm_head live in full T5 files; the encoder-only model ignores them.
    _reader(file_backed, device)(model, files, dtype, device, ignore=lambda k: k.startswith(("decoder.", "lm_head.")),
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
    elif is_repo_id(source):
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
def load_scheduler(source=None, kind: str = "dpm", cache_dir=None, progress: bool = True):
    """CogVideoXDPMScheduler ("dpm") or CogVideoXDDIMScheduler ("ddim").

    Config from the source's ``scheduler/`` folder when it has one, else the 5B I2V repos' values
    (``models.SCHEDULER_CONFIG``). A single-file source has no scheduler: those values.
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
            if is_repo_id(source):
                raise
    if folder is None:
        return cls(**M.SCHEDULER_CONFIG)
    return cls.from_config(cls.load_config(str(folder)))
