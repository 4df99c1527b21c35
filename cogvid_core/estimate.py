"""GPU memory estimate per stage, before the run, and a plan: the fastest settings that fit.

First principles, then calibration:
- weights: parameter counts of the real configs (models built on the meta device: exact, cheap)
  times bytes per element of each component's storage precision; which components sit on the GPU
  in each stage follows the placement profile (resident / offload / stream);
- denoise activations: measured in units of one hidden-state tensor, B x tokens x 3072 x bytes,
  B = 2 for batched CFG, 1 when the branches run one at a time; tokens = 226 text tokens + latent
  frames (padded for 1.5, / patch_size_t) x (h/16) x (w/16). The attention phase (Q, K, V, RoPE,
  SDPA output) and the feed-forward phase (12288-wide intermediate, chunked over tokens) each have a
  unit count; the step's peak is the larger phase on top of the live hidden states;
- VAE: encoder activations at full resolution for the (causally padded) start frame; decode per
  tile = 128 channels x output frames in a temporal chunk x tile area x bytes x a multiplier, plus
  the decoded tiles and the full video that accumulate on the GPU (diffusers' tiled decode);
- peak reserved = peak allocated + a fragmentation share of the activations.
The multipliers live in calibration.json with the card and versions they were fitted on
(`bench/bench_estimate.py --write-calibration`).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from .devmem import GiB
from .models import MAX_TEXT_TOKENS, VARIANTS, Variant, latent_frames, t5_config, transformer_config, vae_config
from .stages import COMPONENT_OF_STAGE, STAGES
from .stages import LABELS as STAGE_LABELS

COMPONENTS = ("transformer", "text_encoder", "vae")
DEFAULT_PRECISION = {"transformer": "bf16", "text_encoder": "bf16", "vae": "bf16"}
BYTES_PER_ELEMENT = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2,
                     "fp8": 1, "fp8_e4m3": 1, "fp8-e4m3": 1, "fp8_e4m3fn": 1, "float8_e4m3fn": 1}
CALIBRATION_PATH = Path(__file__).with_name("calibration.json")

# Starting constants, fitted by hand on the REFERENCE.md anchors (H100, diffusers recipes).
DEFAULT_CONSTANTS = {
    "t5_act_units": 12.0,          # x 226 x d_model x bytes, + attention scores
    "enc_act_mult": 1.9,           # x 128 ch x 3 frames (causal pad) x H x W x bytes
    "step_live_units": 3.5,        # hidden + encoder hidden + residual/norm outputs
    "step_attn_units": 10.0,       # Q, K, V, concat, fp32 RoPE temporaries, SDPA output
    "step_attn_units_lowmem": 5.5,
    "step_ff_units": 9.0,          # 2 x 4 units intermediate (linear out, GELU out) + output
    "step_ff_units_chunked": 9.0,  # the same per chunk, for activations.ChunkedFeedForward
    "step_ff_chunk_live_units": 1.0,  # full-size tensors alive while chunking (the output, ...)
    "stream_buffer_mult": 1.0,     # a streamed model's buffers (1.0's positional embedding) x this
    "dec_tile_mult": 19.0,         # x 128 ch x output frames of a chunk x tile area x bytes
    "dec_accum_mult": 1.0,         # x bytes of decoded tiles kept on the GPU until blended
    "dec_post_mult": 5.0,          # x bytes of the bf16 video during blend/cat/float/scale
    "fixed_bytes": 64 * 1024 ** 2,  # latents, embeddings, cuBLAS workspace
    "reserved_frag": 0.4,          # reserved - allocated, as a share of the stage's activations
    "dec_reserved_frag": 0.4,      # the same for the decode (many tile-sized blocks)
    "dec_video_frag": 0.0,         # + x bytes of the bf16 video (decoded tiles fragment the cache)
    "stream_blocks": 2,            # blocks of a streamed model held on the GPU at once
    "reserved_margin": 0.05,       # verdicts use peak reserved x (1 + this): the largest under-estimate seen
}


# ---------------------------------------------------------------- parameter counts (exact)
@dataclass(frozen=True)
class ComponentSize:
    params: int            # all parameters
    matrix_params: int     # weights of Linear/Conv layers (what fp8 storage stores in 1 byte)
    buffer_elems: int      # buffers cast with the model (1.0's learned positional embedding)
    block_params: int      # one repeated block (for streaming)
    blocks: int
    largest_layer: int     # largest single weight (fp8 per-layer upcast transient)


def _sizes(module, blocks) -> ComponentSize:
    import torch

    params = sum(p.numel() for p in module.parameters())
    matrix = sum(m.weight.numel() for m in module.modules()
                 if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv3d)) and m.weight is not None)
    largest = max((p.numel() for p in module.parameters()), default=0)
    bufs = sum(b.numel() for b in module.buffers() if b.is_floating_point())
    blocks = list(blocks) if blocks is not None else []
    bp = sum(p.numel() for p in blocks[0].parameters()) if blocks else params
    return ComponentSize(params, matrix, bufs, bp, len(blocks) or 1, largest)


@lru_cache(maxsize=None)
def component_sizes(variant_key: str, tiny: bool = False) -> dict[str, ComponentSize]:
    """Parameter counts of each component, from the real configs built on the meta device."""
    import torch
    from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    v = VARIANTS[variant_key]
    with torch.device("meta"):
        tr = CogVideoXTransformer3DModel(**transformer_config(v, tiny))
        vae = AutoencoderKLCogVideoX(**vae_config(v, tiny))
        t5 = T5EncoderModel(T5Config(**t5_config(tiny)))
    return {"transformer": _sizes(tr, tr.transformer_blocks),
            "text_encoder": _sizes(t5, t5.encoder.block),
            "vae": _sizes(vae, None)}


def weight_bytes(size: ComponentSize, precision: str, compute_bytes: int = 2) -> int:
    """Bytes of a component's weights stored in `precision` (fp8: matrices 1 byte, rest compute)."""
    b = _bytes(precision)
    if b == 1:
        return size.matrix_params + (size.params - size.matrix_params + size.buffer_elems) * compute_bytes
    return (size.params + size.buffer_elems) * b


def _bytes(precision: str) -> int:
    try:
        return BYTES_PER_ELEMENT[str(precision).replace("torch.", "")]
    except KeyError:
        raise ValueError(f"unknown precision {precision!r}; use one of bf16, fp16, fp32, fp8_e4m3") from None


def _compute_bytes(precision: str) -> int:
    return 4 if _bytes(precision) == 4 else 2


# ---------------------------------------------------------------- calibration
@lru_cache(maxsize=1)
def _load_calibration_file(path: str, mtime: float) -> dict:
    return json.loads(Path(path).read_text())


def calibration(path: Path | dict | None = None) -> dict:
    """{"constants": {...}, "card": ..., ...}; defaults where the file lacks a constant.
    A dict instead of a path is taken as the constants themselves (fitting, tests)."""
    if isinstance(path, dict):
        return {"constants": {**DEFAULT_CONSTANTS, **path}, "source": "given constants"}
    path = Path(path or CALIBRATION_PATH)
    data = {}
    if path.exists():
        data = dict(_load_calibration_file(str(path), path.stat().st_mtime))
    data["constants"] = {**DEFAULT_CONSTANTS, **data.get("constants", {})}
    return data


# ---------------------------------------------------------------- profiles (placement.py's)
def _profiles() -> dict:
    from . import placement
    return placement.PROFILES


def _resolve_profile(profile):
    if isinstance(profile, str):
        profiles = _profiles()
        if profile not in profiles:
            raise ValueError(f"unknown placement profile {profile!r}; known: {', '.join(profiles)}")
        return profiles[profile]
    return profile


def _pget(profile, name, default=None):
    if isinstance(profile, dict):
        return profile.get(name, default)
    return getattr(profile, name, default)


def _profile_name(profile) -> str:
    return str(_pget(profile, "name", "custom"))


def _tile_of(profile, tile):
    """The decode tile: explicit argument, else the profile's; None = no spatial tiling."""
    t = tile if tile is not None else _pget(profile, "vae_tile", None)
    if t is None or t is False:
        return None
    if isinstance(t, dict):
        return (int(t.get("height", 240)), int(t.get("width", 360)), float(t.get("overlap", 1 / 6)))
    if isinstance(t, (tuple, list)):
        h, w = int(t[0]), int(t[1])
        return (h, w, float(t[2]) if len(t) > 2 else 1 / 6)
    return (int(_pget(t, "height", 240)), int(_pget(t, "width", 360)), float(_pget(t, "overlap", 1 / 6)))


# ---------------------------------------------------------------- token and tile arithmetic
def video_tokens(variant: Variant, frames: int, height: int, width: int) -> int:
    lf = latent_frames(variant, frames)[0] // (variant.patch_size_t or 1)
    return lf * (height // 16) * (width // 16)


def tokens(variant: Variant, frames: int, height: int, width: int) -> int:
    return MAX_TEXT_TOKENS + video_tokens(variant, frames, height, width)


def decode_tiles(height: int, width: int, tile) -> list[tuple[int, int]]:
    """Sample-space (h, w) of every tile diffusers' tiled decode runs (one tile if untiled)."""
    lat_h, lat_w = height // 8, width // 8
    if tile is None:
        return [(height, width)]
    th, tw, ov = tile
    tlh, tlw = th // 8, tw // 8
    if not (lat_w > tlw or lat_h > tlh):
        return [(height, width)]
    sh, sw = max(1, int(tlh * (1 - ov))), max(1, int(tlw * (1 - ov)))
    return [(min(tlh, lat_h - i) * 8, min(tlw, lat_w - j) * 8)
            for i in range(0, lat_h, sh) for j in range(0, lat_w, sw)]


# ---------------------------------------------------------------- the estimate
@dataclass
class StageEstimate:
    name: str
    weights: int           # bytes of weights on the GPU during the stage
    activations: int       # bytes of activations (and transients) at the stage's peak
    peak_allocated: int
    peak_reserved: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Estimate:
    variant_key: str
    frames: int
    height: int
    width: int
    profile_name: str
    precision: dict
    cfg_mode: str
    ff_chunk: int | None
    tile: tuple | None
    tokens: int
    stages: list[StageEstimate]
    budget_bytes: int | None = None
    calibration_source: str = ""
    keep_loaded: bool = False
    profile: object = field(default=None, repr=False, compare=False)
    margin: float = 0.0

    @property
    def needed_bytes(self) -> int:
        """What the verdict compares with the budget: peak reserved plus the calibrated margin."""
        return int(self.peak_reserved * (1 + self.margin))

    @property
    def peak_allocated(self) -> int:
        return max(s.peak_allocated for s in self.stages)

    @property
    def peak_reserved(self) -> int:
        return max(s.peak_reserved for s in self.stages)

    @property
    def peak_stage(self) -> str:
        return max(self.stages, key=lambda s: s.peak_reserved).name

    @property
    def fits(self) -> bool | None:
        """Peak reserved (what the process takes from the card) within the budget; None: no budget."""
        if self.budget_bytes is None:
            return None
        return self.needed_bytes <= self.budget_bytes

    def stage(self, name: str) -> StageEstimate:
        return next(s for s in self.stages if s.name == name)

    def advice(self) -> str:
        if self.fits is not False:
            return ""
        worst = self.peak_stage
        comp = COMPONENT_OF_STAGE[worst]
        s = self.stage(worst)
        if s.weights >= s.activations:
            if self.keep_loaded:
                return (f"the {STAGE_LABELS[worst]} is the peak and mostly weights: offload the models it does not "
                        f"use, stream the {comp} or store it in fp8; or use the 'lowvram' profile")
            return (f"the {STAGE_LABELS[worst]} is the peak and mostly weights: stream the {comp} "
                    f"or store it in fp8; or use the 'lowvram' profile")
        if worst == "decode":
            return "the decode is the peak: use smaller VAE tiles (e.g. 192x288 or 128x192)"
        if worst == "denoise_step":
            return ("the denoise step's activations are the peak: sequential CFG, smaller feed-forward chunks, "
                    "low-memory attention, or fewer frames / a smaller size")
        return "use the 'lowvram' profile"

    def report(self) -> str:
        g = lambda b: f"{b / GiB:6.2f}"
        tile = f"{self.tile[1]}x{self.tile[0]}" if self.tile else "off"
        lines = [f"{VARIANTS[self.variant_key].label}: {self.frames} frames at {self.width}x{self.height} "
                 f"({self.tokens} tokens), profile {self.profile_name}, CFG {self.cfg_mode}, "
                 f"FF chunk {self.ff_chunk or 'off'}, VAE tile {tile}",
                 "precision: " + ", ".join(f"{k} {v}" for k, v in self.precision.items()),
                 f"{'stage':<14}{'weights':>8}{'activ.':>8}{'alloc.':>8}{'reserved':>10}  GiB"]
        for s in self.stages:
            lines.append(f"{STAGE_LABELS[s.name]:<14}{g(s.weights):>8}{g(s.activations):>8}"
                         f"{g(s.peak_allocated):>8}{g(s.peak_reserved):>10}")
        lines.append(f"{'overall peak':<14}{'':>8}{'':>8}{g(self.peak_allocated):>8}{g(self.peak_reserved):>10}"
                     f"  ({STAGE_LABELS[self.peak_stage]})")
        lines.append(f"needed: peak reserved + {self.margin * 100:.0f}% calibration margin = "
                     f"{self.needed_bytes / GiB:.2f} GiB")
        if self.budget_bytes is None:
            lines.append("budget: unknown (no CUDA device): no verdict")
        elif self.fits:
            lines.append(f"FITS: needs ~{self.needed_bytes / GiB:.2f} GiB, budget {self.budget_bytes / GiB:.2f} GiB "
                         f"({(self.budget_bytes - self.needed_bytes) / GiB:.2f} GiB spare)")
        else:
            lines.append(f"DOES NOT FIT: needs ~{self.needed_bytes / GiB:.2f} GiB, budget "
                         f"{self.budget_bytes / GiB:.2f} GiB: {self.advice()}")
        if self.calibration_source:
            lines.append(f"calibration: {self.calibration_source}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"variant": self.variant_key, "frames": self.frames, "height": self.height, "width": self.width,
                "profile": self.profile_name, "precision": dict(self.precision), "cfg_mode": self.cfg_mode,
                "ff_chunk": self.ff_chunk, "vae_tile": list(self.tile) if self.tile else None,
                "tokens": self.tokens, "stages": {s.name: s.to_dict() for s in self.stages},
                "peak_allocated": self.peak_allocated, "peak_reserved": self.peak_reserved,
                "peak_stage": self.peak_stage, "needed_bytes": self.needed_bytes, "margin": self.margin,
                "budget_bytes": self.budget_bytes, "fits": self.fits,
                "advice": self.advice(), "keep_loaded": self.keep_loaded,
                "calibration": self.calibration_source}


def _gpu_weights(size: ComponentSize, precision: str, mode: str, active: bool, stream_blocks: int,
                 keep_loaded: bool = False, stream_buffer_mult: float = 1.0) -> int:
    """Bytes of one component's weights on the GPU in a stage (active: the stage uses it)."""
    full = weight_bytes(size, precision)
    if mode == "resident" and (active or keep_loaded):
        w = full
    elif not active:
        return 0
    elif mode == "stream" and size.blocks > 1:
        per_block = size.block_params * (weight_bytes(size, precision) - size.buffer_elems * _compute_bytes(precision)) \
            // max(size.params, 1)
        w = full - per_block * size.blocks + per_block * min(stream_blocks, size.blocks)
        w += int((stream_buffer_mult - 1) * size.buffer_elems * _compute_bytes(precision))
    else:  # offload (and streaming of models without repeated blocks): whole model while in use
        w = full
    if active and _bytes(precision) == 1:
        w += size.largest_layer * 2  # per-layer upcast to bf16
    return w


def estimate(variant, frames: int, height: int, width: int, profile="balanced",
             precision: dict | None = None, tile=None, budget_bytes: int | None = None,
             calibration_path: Path | None = None, tiny: bool = False, keep_loaded: bool = False) -> Estimate:
    """Predicted peak GPU memory per stage for one run; `fits` compares peak reserved with the budget.

    variant: Variant or its key; profile: placement Profile (or its name in placement.PROFILES);
    precision: storage precision per component; tile: decode tile override ((h, w[, overlap]) in
    pixels or a vae.TileSpec), else the profile's vae_tile.
    keep_loaded: False (the pipeline / CLI): each component is on the GPU only during its own stage
    and given back after it; True (front ends that keep models loaded, e.g. ComfyUI): components
    placed "resident" stay on the GPU through every stage.
    """
    v = VARIANTS[variant] if isinstance(variant, str) else variant
    profile = _resolve_profile(profile)
    precision = {**DEFAULT_PRECISION, **(precision or {})}
    cal = calibration(calibration_path)
    c = cal["constants"]
    sizes = component_sizes(v.key, tiny)
    tcfg, vcfg, t5cfg = transformer_config(v, tiny), vae_config(v, tiny), t5_config(tiny)
    modes = {k: str(_pget(profile, k, "resident")) for k in COMPONENTS}
    cfg_mode = str(_pget(profile, "cfg_mode", "batched"))
    ff_chunk = _pget(profile, "ff_chunk", None) or None
    low_mem = bool(_pget(profile, "low_mem_attention", False))
    tile_t = _tile_of(profile, tile)
    stream_blocks = int(c["stream_blocks"])

    def weights_in(stage: str) -> int:
        return sum(_gpu_weights(sizes[k], precision[k], modes[k], COMPONENT_OF_STAGE[stage] == k, stream_blocks,
                                keep_loaded, c["stream_buffer_mult"]) for k in COMPONENTS)

    # text encode: T5 on 226 tokens (+ relative-position attention scores in fp32)
    tb = _compute_bytes(precision["text_encoder"])
    t5_act = (c["t5_act_units"] * MAX_TEXT_TOKENS * t5cfg["d_model"] * tb
              + 3 * MAX_TEXT_TOKENS * t5cfg["d_ff"] * tb
              + 2 * t5cfg["num_heads"] * MAX_TEXT_TOKENS ** 2 * 4)

    # image encode: the encoder's first level at full resolution (or one tile), 3 frames (causal padding)
    vb = _compute_bytes(precision["vae"])
    c0 = vcfg["block_out_channels"][0]
    eh, ew = (height, width)
    if _pget(profile, "encode_tiled", False) and tile_t is not None:
        eh, ew = max(decode_tiles(height, width, tile_t), key=lambda t: t[0] * t[1])
    enc_act = c["enc_act_mult"] * c0 * 3 * eh * ew * vb

    # denoise step
    xb = _compute_bytes(precision["transformer"])
    batch = 2 if cfg_mode == "batched" else 1
    n = tokens(v, frames, height, width)
    dim = tcfg["num_attention_heads"] * tcfg["attention_head_dim"]
    unit = batch * n * dim * xb
    chunk = min(int(ff_chunk), n) if ff_chunk else n
    attn_units = c["step_attn_units_lowmem"] if low_mem else c["step_attn_units"]
    if chunk < n:   # chunk intermediates + the full output the chunks are written into
        ff_bytes = c["step_ff_units_chunked"] * batch * chunk * dim * xb + c["step_ff_chunk_live_units"] * unit
    else:
        ff_bytes = c["step_ff_units"] * unit
    step_act = c["step_live_units"] * unit + max(attn_units * unit, ff_bytes)
    lf = latent_frames(v, frames)[0]
    step_act += 3 * batch * lf * 32 * (height // 8) * (width // 8) * 4   # latents in/out, fp32 scheduler
    step_act += 2 * video_tokens(v, frames, height, width) * tcfg["attention_head_dim"] * 4  # RoPE cos/sin

    # decode: tile activations for one temporal chunk + decoded tiles + the assembled video
    drop = 1 if v.patch_size_t and ((frames - 1) // 4 + 1) % v.patch_size_t else 0
    dec_lf = lf - drop
    out_frames = 4 * (dec_lf - 1) + 1
    chunk_lat = 2 + dec_lf % 2 if dec_lf > 2 else dec_lf
    chunk_out = 4 * (chunk_lat - 1) + 1
    tiles = decode_tiles(height, width, tile_t)
    th, tw = max(tiles, key=lambda t: t[0] * t[1])
    tile_act = c["dec_tile_mult"] * c0 * chunk_out * th * tw * vb
    tiles_bytes = sum(3 * out_frames * a * b * vb for a, b in tiles)
    video_bytes = 3 * out_frames * height * width * vb
    dec_act = max(tile_act + c["dec_accum_mult"] * tiles_bytes, c["dec_post_mult"] * video_bytes)
    dec_act += dec_lf * 16 * (height // 8) * (width // 8) * vb

    acts = {"text_encode": t5_act, "image_encode": enc_act, "denoise_step": step_act, "decode": dec_act}
    stages = []
    for name in STAGES:
        w = weights_in(name)
        a = int(acts[name] + c["fixed_bytes"])
        alloc = w + a
        if name == "decode":
            reserved = alloc + c["dec_reserved_frag"] * a + c["dec_video_frag"] * video_bytes
        else:
            reserved = alloc + c["reserved_frag"] * a
        stages.append(StageEstimate(name, w, a, alloc, int(reserved)))
    src = ", ".join(str(cal[k]) for k in ("card", "torch", "diffusers", "date") if cal.get(k)) or "built-in defaults"
    return Estimate(v.key, frames, height, width, _profile_name(profile), precision, cfg_mode, ff_chunk, tile_t, n,
                    stages, budget_bytes, src, keep_loaded, profile, float(c["reserved_margin"]))


# ---------------------------------------------------------------- plan
def candidates(base_profiles: dict | None = None) -> list:
    """Profiles from fastest to slowest: resident, balanced, lowvram, then lowvram with smaller
    feed-forward chunks and VAE tiles (the slowest last)."""
    profiles = base_profiles if base_profiles is not None else _profiles()
    out = [profiles[k] for k in ("resident", "balanced") if k in profiles]
    low = profiles.get("lowvram")
    if low is None:
        return out
    lows = [low]
    chunk0 = _pget(low, "ff_chunk", None) or 16384
    t0 = _tile_of(low, None) or (240, 360, 1 / 6)
    chunks = [None] + [c for c in (4096, 2048, 1024) if c < chunk0]
    # multiples of 40 px: with overlap 0.2 they split into whole latent steps (placement validates it)
    tiles = [None] + [(th, tw, t0[2]) for th, tw in ((200, 320), (160, 240), (120, 160), (80, 120))
                      if th * tw < t0[0] * t0[1]]
    # fewest and mildest changes first: each step down a list costs a little speed
    combos = sorted(((i, j) for i in range(len(chunks)) for j in range(len(tiles)) if i or j),
                    key=lambda ij: (ij[0] + ij[1], ij[0]))
    for i, j in combos:
        change = {}
        if chunks[i]:
            change["ff_chunk"] = chunks[i]
        if tiles[j]:
            change["vae_tile"] = tiles[j]
        prof = _replace(low, change)
        try:
            if hasattr(prof, "validate"):
                prof.validate()
        except ValueError:
            continue   # a tile the decode cannot use at this overlap
        lows.append(prof)
    # Streamed weights cross PCIe once per transformer call: a batched CFG step moves them once, one
    # branch at a time twice (1.43x s/step at 1.0 on an H100), so each batched variant comes first.
    for prof in lows:
        if _pget(prof, "cfg_mode", "sequential") == "sequential" and _pget(prof, "transformer", "") == "stream":
            out.append(_replace(prof, {"cfg_mode": "batched"}))
        out.append(prof)
    return out


def _replace(profile, changes: dict):
    name = _profile_name(profile)
    tag = []
    if "ff_chunk" in changes:
        tag.append(f"ff{changes['ff_chunk']}")
    if "cfg_mode" in changes:
        tag.append(f"cfg-{changes['cfg_mode']}")
    if "vae_tile" in changes:
        th, tw, ov = changes["vae_tile"]
        tag.append(f"tile{tw}x{th}")
        tile_cls = type(_pget(profile, "vae_tile")) if _pget(profile, "vae_tile") is not None else None
        if tile_cls is not None and tile_cls not in (tuple, list, dict):
            changes = dict(changes, vae_tile=tile_cls(height=th, width=tw, overlap=ov))
    changes = dict(changes, name=f"{name}+{'+'.join(tag)}")
    if isinstance(profile, dict):
        return {**profile, **changes}
    if dataclasses.is_dataclass(profile):
        fields = {f.name for f in dataclasses.fields(profile)}
        return dataclasses.replace(profile, **{k: v for k, v in changes.items() if k in fields})
    raise TypeError(f"cannot derive a profile from {type(profile).__name__}")


def plan(variant, frames: int, height: int, width: int, budget_bytes: int, precision: dict | None = None,
         profiles: dict | None = None, calibration_path: Path | None = None, tiny: bool = False,
         keep_loaded: bool = False):
    """(profile, estimate) of the fastest profile whose peak reserved fits budget_bytes.

    Raises ValueError saying what the smallest option needs when none fits."""
    last = None
    for prof in candidates(profiles):
        est = estimate(variant, frames, height, width, prof, precision, budget_bytes=budget_bytes,
                       calibration_path=calibration_path, tiny=tiny, keep_loaded=keep_loaded)
        if est.fits:
            return prof, est
        last = est
    if last is None:
        raise ValueError("no placement profiles to choose from")
    raise ValueError(f"{frames} frames at {width}x{height} needs ~{last.needed_bytes / GiB:.1f} GiB with profile "
                     f"{last.profile_name} (peak: {STAGE_LABELS[last.peak_stage]}), the budget is "
                     f"{budget_bytes / GiB:.1f} GiB: reduce frames or size, or free GPU memory")


def gpu_budget(device=None, reserve_bytes: int = 0) -> int | None:
    """Free bytes on a CUDA device minus a reserve; None for CPU (or no CUDA)."""
    import torch

    dev = torch.device(device) if device is not None else (torch.device("cuda") if torch.cuda.is_available() else None)
    if dev is None or dev.type != "cuda" or not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info(dev)
    return max(0, int(free) - int(reserve_bytes))


# ---------------------------------------------------------------- command line
def add_arguments(p) -> None:
    p.add_argument("--variant", default="cogvideox1.5-5b-i2v", choices=sorted(VARIANTS))
    p.add_argument("--frames", type=int, default=None, help="default: the variant's")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--profile", default="auto",
                   help="placement profile name; 'auto' picks the fastest that fits the budget")
    p.add_argument("--precision", default="bf16", help="transformer storage: bf16, fp16, fp32, fp8_e4m3fn")
    p.add_argument("--text-encoder-precision", default="bf16")
    p.add_argument("--vae-precision", default="bf16")
    p.add_argument("--tile", default=None, help="decode tile HEIGHTxWIDTH in pixels (default: the profile's)")
    p.add_argument("--budget-gib", type=float, default=None, help="default: free memory of --device")
    p.add_argument("--reserve-gib", type=float, default=0.0, help="keep this much of the free memory unused")
    p.add_argument("--device", default="auto")
    p.add_argument("--keep-loaded", action="store_true", help="resident models stay on the GPU in every stage")
    p.add_argument("--json", action="store_true", help="print JSON instead of the text report")
    p.add_argument("--chart", default=None, help="also write the chart as a PNG here")


def run(args) -> int:
    import sys

    v = VARIANTS[args.variant]
    frames = args.frames or v.default_frames
    height = args.height or v.default_height
    width = args.width or v.default_width
    from .models import check_video_shape
    check_video_shape(v, transformer_config(v), frames, height, width)
    precision = {"transformer": args.precision, "text_encoder": args.text_encoder_precision, "vae": args.vae_precision}
    tile = None
    if args.tile:
        th, tw = (int(x) for x in args.tile.lower().split("x"))
        tile = (th, tw, 1 / 6)
    if args.budget_gib is not None:
        budget = int((args.budget_gib - args.reserve_gib) * GiB)
    else:
        dev = None if args.device in (None, "", "auto") else args.device
        budget = gpu_budget(dev, int(args.reserve_gib * GiB))
    if args.profile == "auto":
        if budget is None:
            print("no CUDA device and no --budget-gib: showing the 'balanced' profile without a verdict", file=sys.stderr)
            est = estimate(v, frames, height, width, "balanced", precision, tile, None, keep_loaded=args.keep_loaded)
        else:
            _prof, est = plan(v, frames, height, width, budget, precision, keep_loaded=args.keep_loaded)
    else:
        est = estimate(v, frames, height, width, args.profile, precision, tile, budget, keep_loaded=args.keep_loaded)
    if args.chart:
        from PIL import Image
        Image.fromarray(chart_image(est)).save(args.chart)
    print(json.dumps(est.to_dict(), indent=2) if args.json else est.report())
    return 0 if est.fits is not False else 1


# ---------------------------------------------------------------- chart
STAGE_COLORS = {"weights": (70, 110, 190), "activations": (230, 150, 60), "reserved": (200, 200, 200)}


def chart_image(est: Estimate, width: int = 640, height: int = 360):
    """Bars per stage (weights + activations, reserved outline) against the budget line: uint8 HxWx3."""
    import numpy as np
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), (255, 255, 255))
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 48, width - 12, 28, height - 36
    top_val = max([est.peak_reserved] + ([est.budget_bytes] if est.budget_bytes else [])) * 1.1 or 1
    y = lambda b: bottom - (bottom - top) * b / top_val
    d.text((left, 6), f"{VARIANTS[est.variant_key].label} {est.frames}f {est.width}x{est.height} "
                      f"[{est.profile_name}]", fill=(0, 0, 0))
    step = max(1, math.ceil(top_val / GiB / 6))
    for gb in range(0, int(top_val / GiB) + 1, step):
        yy = y(gb * GiB)
        d.line([(left, yy), (right, yy)], fill=(235, 235, 235))
        d.text((4, yy - 6), f"{gb}G", fill=(90, 90, 90))
    n = len(est.stages)
    slot = (right - left) / n
    for i, s in enumerate(est.stages):
        x0, x1 = left + slot * i + slot * 0.2, left + slot * (i + 1) - slot * 0.2
        d.rectangle([x0, y(s.peak_reserved), x1, bottom], fill=STAGE_COLORS["reserved"])
        d.rectangle([x0, y(s.weights), x1, bottom], fill=STAGE_COLORS["weights"])
        d.rectangle([x0, y(s.peak_allocated), x1, y(s.weights)], fill=STAGE_COLORS["activations"])
        d.text((x0, bottom + 4), STAGE_LABELS[s.name], fill=(0, 0, 0))
        d.text((x0, y(s.peak_reserved) - 12), f"{s.peak_reserved / GiB:.1f}", fill=(0, 0, 0))
    d.line([(left, bottom), (right, bottom)], fill=(0, 0, 0))
    if est.budget_bytes:
        yy = y(est.budget_bytes)
        color = (0, 150, 0) if est.fits else (210, 0, 0)
        d.line([(left, yy), (right, yy)], fill=color, width=2)
        d.text((right - 150, yy - 13), f"budget {est.budget_bytes / GiB:.1f} GiB", fill=color)
    d.text((left, height - 16), "blue weights, orange activations, grey reserved", fill=(90, 90, 90))
    return np.asarray(img, dtype=np.uint8).copy()
