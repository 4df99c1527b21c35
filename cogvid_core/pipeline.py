"""One image + one prompt -> one video, stage by stage, each model on the GPU only while it works.

Used by the command line; the ComfyUI nodes run the same stages one node at a time.
"""
from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from . import devmem, guard, loading, models, sampling, session, text, vae as vae_mod

log = logging.getLogger(__name__)


@dataclass
class Job:
    image: object                 # path, PIL image or IMAGE tensor
    prompt: str
    negative_prompt: str = ""
    frames: int | None = None     # None: the variant's default
    height: int | None = None
    width: int | None = None
    steps: int = 50
    cfg: float = 6.0
    dynamic_cfg: bool = True
    scheduler: str = "dpm"
    seed: int = 42
    resize: str = "crop"


@dataclass
class Sources:
    """Where each component comes from: an HF-layout folder, a hub repo id, or single files."""
    transformer: str
    vae: str
    text_encoder: str
    tokenizer: str | None = None
    scheduler: str | None = None

    @classmethod
    def from_model(cls, model: str) -> "Sources":
        return cls(transformer=model, vae=model, text_encoder=model, scheduler=model)


@dataclass
class Result:
    frames: torch.Tensor                  # [T, H, W, 3] float 0..1
    latents: vae_mod.VideoLatents
    variant: models.Variant
    fps: int
    profile: str
    notes: list[str] = field(default_factory=list)
    settings: dict = field(default_factory=dict)   # the profile's choices, for the run summary


def pick_device(device: str | None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA GPU: use --device cpu")
    return dev


def resolve_shape(variant: models.Variant, config: dict, job: Job) -> tuple[int, int, int]:
    frames, height, width = models.default_size(variant, config)
    frames = job.frames or frames
    height = job.height or height
    width = job.width or width
    models.check_video_shape(variant, config, frames, height, width)
    return frames, height, width


def check_precision(variant: models.Variant, dtype: torch.dtype) -> None:
    if dtype == torch.float16 and not variant.fp16_ok:
        raise ValueError(f"{variant.label} produces NaN (black frames) in fp16: use bf16")


def _stage(recorder, name, **kw):
    return recorder.stage(name, **kw) if recorder is not None else nullcontext()


def _free():
    devmem.free_memory(host_cache=True)    # a model was just dropped: its pinned host copy too


def generate(sources: Sources, job: Job, precision: str = "bf16", device=None, profile: str = "auto",
             vram_budget_gib: float | None = None, recorder=None, progress=None, interrupt=None,
             cache_dir=None) -> Result:
    from . import activations, planner

    device = pick_device(device)
    dtype, storage = session.precision(precision)
    variant, config = loading.peek_transformer(sources.transformer, cache_dir=cache_dir)
    check_precision(variant, dtype)
    frames, height, width = resolve_shape(variant, config, job)
    if not job.prompt.strip():
        log.warning("the prompt is empty: the video follows the image only")
    prof = planner.resolve_profile(profile, variant=variant, frames=frames, height=height, width=width,
                                     device=device, budget_gib=vram_budget_gib,
                                     precision={"transformer": precision})
    image = _open_image(job.image)
    info = guard.RunInfo(variant=variant, frames=frames, height=height, width=width, profile=prof, device=device)
    check = interrupt if interrupt is not None else (lambda: None)

    check()
    with _stage(recorder, "load text encoder"):
        t5, tok = loading.load_text_encoder(sources.text_encoder, dtype=dtype, tokenizer=sources.tokenizer,
                                            cache_dir=cache_dir)
    t5c = session.Component("t5", t5, device, dtype, prof.text_encoder, tokenizer=tok)
    try:
        with _stage(recorder, "text encode"), guard.oom_guard("text_encode", info):
            # no local name for the module: it would keep T5 (9.5 GB at bf16) in RAM until the run ends
            pos = text.encode_prompt(t5c.acquire(), tok, job.prompt, device)
            check()
            neg = text.encode_prompt(t5c.acquire(), tok, job.negative_prompt, device) if job.cfg > 1 else None
    finally:
        t5c.release()
        del t5, t5c
        _free()

    check()
    with _stage(recorder, "load vae"):
        vae = loading.load_vae(sources.vae, dtype=dtype, variant=variant, cache_dir=cache_dir)
    vc = session.Component("vae", vae, device, dtype, prof.vae, variant=variant)
    try:
        with _stage(recorder, "image encode"), guard.oom_guard("image_encode", info):
            latent = vae_mod.encode_image(vc.acquire(), image, height, width, variant, job.resize, device,
                                          tile=prof.vae_tile if prof.encode_tiled else None)
    finally:
        vc.release()
        _free()

    check()
    with _stage(recorder, "load transformer"):
        tr, _ = loading.load_transformer(sources.transformer, dtype=dtype, storage_dtype=storage,
                                         cache_dir=cache_dir)
    activations.apply_profile(tr, prof)
    tc = session.Component("transformer", tr, device, dtype, prof.transformer, variant=variant)
    sched = loading.load_scheduler(sources.scheduler, job.scheduler)
    try:
        with _stage(recorder, "denoise", steps=job.steps), guard.oom_guard("denoise_step", info):
            lat = sampling.sample(tc.acquire(), variant, pos.embeds, neg.embeds if neg else None, latent, frames,
                                  steps=job.steps, cfg=job.cfg, dynamic_cfg=job.dynamic_cfg, scheduler=sched,
                                  seed=job.seed, device=device, dtype=dtype, cfg_mode=prof.cfg_mode,
                                  progress=progress, interrupt=interrupt)
    finally:
        tc.release()
        del tr, tc
        _free()

    try:
        with _stage(recorder, "decode"):
            frames_out = guard.decode(vc.acquire(), lat, device, tile=prof.vae_tile, interrupt=interrupt, info=info)
    except Exception as e:   # the sampled latents stay available: decode them again, no re-sampling
        e.latents = lat
        raise
    finally:
        vc.release()
        del vae, vc
        _free()
    notes = [f"prompt truncated at 226 tokens, dropped: {pos.truncated!r}"] if pos.truncated else []
    return Result(frames=frames_out, latents=lat, variant=variant, fps=variant.fps, profile=prof.name, notes=notes,
                  settings=profile_settings(prof))


def profile_settings(prof) -> dict:
    tile = prof.vae_tile
    return {"transformer": prof.transformer, "text_encoder": prof.text_encoder, "vae": prof.vae,
            "cfg": prof.cfg_mode, "ff_chunk": prof.ff_chunk, "low_mem_attention": prof.low_mem_attention,
            "vae_tile": f"{tile.width}x{tile.height}" if tile else None, "encode_tiled": prof.encode_tiled}


def _open_image(image):
    if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__"):
        from PIL import Image, UnidentifiedImageError
        try:
            with Image.open(image) as im:
                im.load()
                return im.copy()
        except FileNotFoundError:
            raise ValueError(f"start image not found: {image}") from None
        except UnidentifiedImageError:
            raise ValueError(f"start image {image} is not an image file PIL can read") from None
    return image
