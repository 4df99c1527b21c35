"""One image + one prompt -> one video, stage by stage, each model on the GPU only while it works.

Used by the command line; the ComfyUI nodes run the same stages one node at a time.
"""
from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from cogvid_core.device import devmem
from cogvid_core.speed import caches
from cogvid_core.speed import fast
from cogvid_core.run import guard
from cogvid_core.model import loading
from cogvid_core.model import lora
from cogvid_core.model import precision as P
from cogvid_core.model import variants as models
from cogvid_core.speed import multigpu
from cogvid_core.plan import planner
from cogvid_core.run import sampling
from cogvid_core.speed import seqpar
from cogvid_core.run import session
from cogvid_core.model import text
from cogvid_core.model import vae as vae_mod
from cogvid_core.memory.profiles import Profile, get_profile

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
    cache: str = "none"           # a step cache (speed.caches.NAMES, e.g. "fbc:0.1")


@dataclass
class Sources:
    """Where each component comes from: an HF-layout folder, a hub repo id, or single files."""
    transformer: str
    vae: str
    text_encoder: str
    tokenizer: str | None = None
    scheduler: str | None = None
    loras: tuple = ()             # ((LoRA .safetensors path, strength), ...), applied in this order

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
    host_estimate: dict = field(default_factory=dict)  # {stage: (owned, file) bytes}: estimate.host_plan
    tile: object = None                   # the decode tile the frames came from (keep.save records it)
    cache: object = None          # caches.CacheStats of the run's step cache, None without one


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


@dataclass
class _Run:
    """What every stage of one run shares."""
    sources: Sources
    job: Job
    device: torch.device
    dtype: torch.dtype
    storage: torch.dtype | None
    variant: models.Variant
    frames: int
    height: int
    width: int
    profile: Profile
    recorder: object = None
    interrupt: object = None
    cache_dir: object = None
    loras: tuple = ()             # ((lora.LoraWeights, strength), ...)
    devices: multigpu.DeviceMap | None = None   # None: every component on `device`
    speed: str = fast.EXACT       # the transformer's speed option (fast.CHOICES)
    notes: list = field(default_factory=list)   # said (logged) before any model loads; repeated in the Result
    precision: dict = field(default_factory=dict)   # {component: name}, resolved (precision.resolve_all)

    def dtype_of(self, kind: str) -> torch.dtype:
        """The compute dtype of a component kind ("t5", "vae", "transformer")."""
        return P.dtypes(self.precision[session.PROFILE_FIELD[kind]])[0] if self.precision else self.dtype

    def device_of(self, kind: str) -> torch.device:
        return self.device if self.devices is None else self.devices.of(kind)

    @property
    def info(self) -> guard.RunInfo:
        return guard.RunInfo(variant=self.variant, frames=self.frames, height=self.height, width=self.width,
                             profile=self.profile, device=self.device)

    def check(self) -> None:
        if self.interrupt is not None:
            self.interrupt()

    def stage(self, name, **kw):
        return self.recorder.stage(name, **kw) if self.recorder is not None else nullcontext()

    def component(self, kind: str, module, **kw) -> session.Component:
        return session.Component(kind, module, self.device_of(kind), self.dtype_of(kind), profile=self.profile, **kw)


def _free():
    devmem.free_memory(host_cache=True)    # a model was just dropped: its pinned host copy too


def _then_free(stage, *args):
    """Run a stage that loads and drops a model, then hand back what that model held."""
    try:
        return stage(*args)
    finally:
        _free()


def generate(sources: Sources, job: Job, precision: str | dict = P.AUTO, device=None, profile: str = "auto",
             vram_budget_gib: float | None = None, recorder=None, progress=None, interrupt=None,
             cache_dir=None, devices=None, speed: str = fast.EXACT) -> Result:
    """``devices``: a multigpu.DeviceMap or ``--devices`` text (a CFG pair, components on other
    cards); it replaces ``device``. ``precision``: one name for every component (fp8_e4m3fn is the
    transformer's; T5 and the VAE then take auto) or {component: name}; auto picks for the card."""
    caches.parse(job.cache)      # a bad name fails before any model loads
    run = _prepare(sources, job, precision, device, profile, vram_budget_gib, cache_dir, devices, speed)
    run.speed = _check_speed(speed, run)
    run.recorder, run.interrupt = recorder, interrupt
    image = _open_image(job.image)
    run.check()
    on = multigpu.on_device    # each stage with its component's GPU current (another card than the first)
    with on(run.device_of("t5")):
        pos, neg = _then_free(_encode_prompts, run)
    run.check()
    vc = _load_vae(run)
    with on(vc.device):
        latent = _then_free(_encode_image, run, vc, image)
    run.check()
    cache_stats = []
    with on(run.device):
        lat = _then_free(_denoise, run, pos, neg, latent, progress, cache_stats)
    try:
        with on(vc.device):
            frames_out = _decode(run, vc, lat)
    finally:
        del vc
        _free()
    notes = run.notes + ([f"prompt truncated at 226 tokens, dropped: {pos.truncated!r}"] if pos.truncated else [])
    notes += [stats.line() for stats in cache_stats]
    return Result(frames=frames_out, latents=lat, variant=run.variant, fps=run.variant.fps, profile=run.profile.name,
                  notes=notes, settings=profile_settings(run.profile), host_estimate=_host_estimate(run),
                  tile=run.profile.vae_tile, cache=cache_stats[0] if cache_stats else None)


def decode_saved(sources: Sources, latents: vae_mod.VideoLatents, tile, precision: str = "auto", device=None,
                 recorder=None, interrupt=None, cache_dir=None) -> Result:
    """Frames from latents a run kept (run.keep): only the VAE loads, with the run's decode tile, so the
    frames equal the ones the uninterrupted run would have written."""
    device = pick_device(device)
    variant = models.VARIANTS[latents.variant_key]
    names = P.resolve_all(precision, device, variant)
    dtype = P.dtypes(names["vae"])[0]
    prof = get_profile("balanced").replace(vae_tile=tile)      # the VAE resident while it decodes
    run = _Run(sources, Job(image=None, prompt=""), device, dtype, None, variant, latents.frames, latents.height,
               latents.width, prof, recorder=recorder, interrupt=interrupt, cache_dir=cache_dir,
               precision=names)
    vc = _load_vae(run)
    try:
        with multigpu.on_device(vc.device):
            frames_out = _decode(run, vc, latents)
    finally:
        del vc
        _free()
    return Result(frames=frames_out, latents=latents, variant=variant, fps=latents.fps, profile=prof.name,
                  settings=profile_settings(prof), tile=tile)


def _prepare(sources: Sources, job: Job, precision, device, profile: str, vram_budget_gib, cache_dir,
             devices=None, speed: str = fast.EXACT) -> _Run:
    """Everything decided before a model loads: device, dtypes, variant, video shape, profile (``auto``
    counts the speed option's memory)."""
    if isinstance(devices, str):
        devices = multigpu.parse_devices(devices)
    device = devices.primary if devices is not None else pick_device(device)
    P.resolve_all(precision, "cpu", warn=False)   # a bad name fails before the (maybe downloaded) transformer
    variant, config = loading.peek_transformer(sources.transformer, cache_dir=cache_dir)
    names = P.resolve_all(precision, device, variant)    # 1.5 in fp16 refused before any model loads
    dtype, storage = P.dtypes(names["transformer"])
    frames, height, width = resolve_shape(variant, config, job)
    if not job.prompt.strip():
        log.warning("the prompt is empty: the video follows the image only")
    # read before any model loads, so a bad LoRA file fails in a second, not after the T5 stage
    loras = tuple((lora.load_lora(path), float(strength)) for path, strength in sources.loras)
    notes = [hint for lw, strength in loras
             for hint in (lora.scale_hint(lw, strength), lora.variant_note(lw)) if hint]
    for note in notes:
        log.warning(note)
    positions = models.positions_note(variant, config, frames)   # sampling logs it when it runs
    if positions:
        notes.append(positions)
    prof = planner.resolve_profile(profile, variant=variant, frames=frames, height=height, width=width, device=device,
                                   budget_gib=vram_budget_gib, precision=names,
                                   lora_bytes=lora.lora_bytes(loras, dtype),
                                   devices=devices.gpus() if devices is not None else (),
                                   cfg_pair=devices is not None and devices.second is not None,
                                   speed=fast.recipe(speed, device, devices.second if devices is not None else None),
                                   cache=job.cache)
    return _Run(sources, job, device, dtype, storage, variant, frames, height, width, prof, cache_dir=cache_dir,
                loras=loras, devices=devices, notes=notes, precision=names)


def _check_speed(speed: str, run: _Run) -> str:
    """A bad name fails now; parts this device (with a CFG pair: either of its devices) cannot run are
    said now, before any model loads (and once more when the transformer runs without them)."""
    second = run.devices.second if run.devices is not None else None
    resolved = fast.resolve_alone(speed, run.device, second)
    for note in resolved.notes:
        log.warning(note)
    return speed


def _encode_prompts(run: _Run):
    """T5 loaded, both prompts encoded (the negative only with CFG), T5 released."""
    with run.stage("load text encoder"):
        t5, tok = loading.load_text_encoder(run.sources.text_encoder, dtype=run.dtype_of("t5"), tokenizer=run.sources.tokenizer,
                                            cache_dir=run.cache_dir)
    t5c = run.component("t5", t5, tokenizer=tok)
    del t5
    job = run.job
    try:
        with run.stage("text encode"), guard.oom_guard("text_encode", run.info), t5c.use() as module:
            pos = text.encode_prompt(module, tok, job.prompt, t5c.device)
            run.check()
            neg = text.encode_prompt(module, tok, job.negative_prompt, t5c.device) if job.cfg > 1 else None
    finally:
        t5c.release()
    return pos, neg


def _load_vae(run: _Run) -> session.Component:
    with run.stage("load vae"):
        vae = loading.load_vae(run.sources.vae, dtype=run.dtype_of("vae"), variant=run.variant, cache_dir=run.cache_dir)
    return run.component("vae", vae, variant=run.variant)


def _encode_image(run: _Run, vc: session.Component, image):
    prof = run.profile
    try:
        with run.stage("image encode"), guard.oom_guard("image_encode", run.info), vc.use() as vae:
            return vae_mod.encode_image(vae, image, run.height, run.width, run.variant, run.job.resize, vc.device,
                                        strips=prof.encode_tiled)
    finally:
        vc.release()


def _denoise(run: _Run, pos, neg, latent, progress, cache_stats=None):
    """Transformer loaded, the video sampled, transformer released."""
    with run.stage("load transformer"):
        tr, _ = loading.load_transformer(run.sources.transformer, dtype=run.dtype, storage_dtype=run.storage,
                                         cache_dir=run.cache_dir)
    second = run.devices.second if run.devices is not None else None
    if second is not None:   # before placing: the copy shares the weights (or the file index), never a placement
        multigpu.attach_second(tr, second)
    tc = run.component("transformer", tr, variant=run.variant, speed=run.speed)
    del tr
    if run.loras:
        tc = tc.with_loras(run.loras)   # checked against this transformer here; hooked only inside use()
    job = run.job
    sched = loading.load_scheduler(run.sources.scheduler, job.scheduler)
    try:
        with run.stage("denoise", steps=job.steps), guard.oom_guard("denoise_step", run.info), tc.use() as module, \
                seqpar.active(module):   # under torchrun: the video tokens split over the ranks
            return sampling.sample(module, run.variant, pos.embeds, neg.embeds if neg else None, latent, run.frames,
                                   steps=job.steps, cfg=job.cfg, dynamic_cfg=job.dynamic_cfg, scheduler=sched,
                                   seed=job.seed, device=run.device, dtype=run.dtype, cfg_mode=run.profile.cfg_mode,
                                   progress=progress, interrupt=run.interrupt, cache=job.cache,
                                   cache_stats=cache_stats)
    finally:
        tc.release()
        multigpu.detach_second(tc.module)


def _decode(run: _Run, vc: session.Component, lat):
    try:
        with run.stage("decode"), vc.use() as vae:
            return guard.decode(vae, lat, vc.device, tile=run.profile.vae_tile, interrupt=run.interrupt,
                                info=run.info)
    except BaseException as e:
        # Any failure, interrupts included (ComfyUI 2026's derives from BaseException), keeps the
        # sampled latents reachable to decode again without re-sampling; it is always re-raised.
        e.latents = lat
        e.decode_tile = run.profile.vae_tile
        raise
    finally:
        vc.release()


def _host_estimate(run: _Run) -> dict:
    """What the estimate said this run's host RAM would be, per stage, to set beside the measured rows
    (GPU runs: on the CPU the weights themselves are the host memory, which the estimate does not model)."""
    from cogvid_core.plan import estimate as E
    if run.device.type != "cuda":
        return {}
    est = E.estimate(run.variant, run.frames, run.height, run.width, run.profile, precision=run.precision,
                     device=run.device, speed=run.speed)
    return {s.name: (s.host_bytes, s.host_file_bytes) for s in est.stages}


def profile_settings(prof) -> dict:
    tile = prof.vae_tile
    return {"transformer": prof.transformer, "text_encoder": prof.text_encoder, "vae": prof.vae,
            "cfg": prof.cfg_mode, "ff_chunk": prof.ff_chunk, "low_mem_attention": prof.low_mem_attention,
            "vae_tile": f"{tile.width}x{tile.height}" if tile else None, "encode_tiled": prof.encode_tiled}


def _open_image(image):
    """A path -> the picture as it is meant to be seen: a phone photo stores its pixels sideways with an
    EXIF orientation tag, which viewers (and ComfyUI's LoadImage) apply; read raw, a portrait photo
    became a sideways video."""
    if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__"):
        from PIL import Image, ImageOps, UnidentifiedImageError
        try:
            with Image.open(image) as im:
                im.load()
                return ImageOps.exif_transpose(im)    # a new image (a copy when there is no tag)
        except FileNotFoundError:
            raise ValueError(f"start image not found: {image}") from None
        except UnidentifiedImageError:
            raise ValueError(f"start image {image} is not an image file PIL can read") from None
    return image
