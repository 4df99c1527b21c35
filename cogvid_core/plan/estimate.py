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
- VAE: encoder activations at full resolution for the (causally padded) start frame, or, encoded in
  strips (model/vae_strips.py), the few full-resolution first-level activations alive at once plus one
  strip's temporaries; decode per tile = 128 channels x output frames in a temporal chunk x tile area x bytes x a
  multiplier, plus that tile's decoded frames (vae.decode moves each decoded tile to the host and
  assembles the video there; untiled, the whole video is the one tile);
- peak reserved = peak allocated + a fragmentation share of the activations (per stage).
The multipliers live in calibration/<card family>.json, one set per CUDA allocator setting (the plain
caching allocator, expandable segments, cudaMallocAsync: cards.allocator_backend), with the card and
versions they were fitted on
(`bench/bench_estimate.py --fit ... --write-calibration`); :mod:`cogvid_core.plan.cards` picks the file
from the device's name and the set from the allocator in use. Picking settings that fit a budget is
:mod:`cogvid_core.plan.planner`'s; the chart is :mod:`cogvid_core.plan.chart`'s.
"""
from __future__ import annotations

from pathlib import Path

from cogvid_core.plan import cards, speedmem
from cogvid_core.speed import caches, fast
from cogvid_core.plan.cards import allocator_backend  # noqa: F401  (the allocator the estimate is for, by default)
from cogvid_core.device.devmem import precision_bytes
from cogvid_core.memory.filestream import PREFETCH_DEPTH
from cogvid_core.memory.hostplan import host_stages
from cogvid_core.model import precision as P
from cogvid_core.model import vae_strips
from cogvid_core.model.variants import MAX_TEXT_TOKENS, VARIANTS, Variant, latent_frames, t5_config, transformer_config, vae_config
from cogvid_core.memory.profiles import PROFILES, Profile
from cogvid_core.model.sizes import ComponentSize, compute_bytes, component_sizes, weight_bytes  # noqa: F401  (estimate's API)
from cogvid_core.model.stages import COMPONENT_OF_STAGE, STAGES
from cogvid_core.plan.verdict import Estimate, StageEstimate  # noqa: F401  (estimate's API)

COMPONENTS = ("transformer", "text_encoder", "vae")
# what the loaders' and the CLI's "auto" picks for the card (bf16 where it has it: precision.choose)
DEFAULT_PRECISION = {c: P.AUTO for c in COMPONENTS}

# Starting constants, fitted by hand on measured peaks of diffusers recipes (H100), before calibration.
DEFAULT_CONSTANTS = {
    "t5_act_units": 12.0,          # x 226 x d_model x bytes, + attention scores
    "enc_act_mult": 1.9,           # x 128 ch x 3 frames (causal pad) x H x W x bytes
    # strip encode: x 128 ch x H x W x bytes, + the strip budget. Measured on the H100 (bench/encode_exact_h100.json,
    # strips of 64 MiB): 4.09 at 768x1360, 4.21 at 480x720; the three activations of vae_strips' count (3) and
    # what the resnets' norms and convolutions hold beside them. 3 under-estimated the 12 GB workflow's encode by 18%
    # (bench/hostrun_estimate_h100.json). tests/test_estimate.py refits it from the raw file.
    "enc_strip_units": 4.3,
    "step_live_units": 3.5,        # hidden + encoder hidden + residual/norm outputs
    "step_attn_units": 10.0,       # Q, K, V, concat, fp32 RoPE temporaries, SDPA output
    "step_attn_units_lowmem": 5.5,
    "step_ff_units": 9.0,          # 2 x 4 units intermediate (linear out, GELU out) + output
    "step_ff_units_chunked": 9.0,  # the same per chunk, for activations.ChunkedFeedForward
    "step_ff_chunk_live_units": 1.0,  # full-size tensors alive while chunking (the output, ...)
    **speedmem.NEUTRAL,           # a speed option's fitted terms (plan/speedmem.py)
    "stream_buffer_mult": 1.0,     # a streamed model's buffers (1.0's positional embedding) x this
    "dec_tile_mult": 19.0,         # x 128 ch x output frames of a chunk x tile area x bytes
    "dec_accum_mult": 2.0,         # x bytes of one tile's decoded frames (frame batches + their cat)
    "fixed_bytes": 64 * 1024 ** 2,  # the step's: latents, embeddings, cuBLAS workspace
    "vae_fixed_bytes": 64 * 1024 ** 2,  # the VAE stages' (no embeddings nor scheduler state)
    "reserved_frag": 0.4,          # reserved - allocated, as a share of the step's activations
    "reserved_frag_lowmem": 0.4,   # the same with low-memory attention and chunked feed-forward (many
                                   # chunk-sized blocks the cache reuses, not a few step-sized ones)
    "text_reserved_frag": 0.4,     # the same for the text encode
    "enc_reserved_frag": 0.4,      # the same for the image encode
    "dec_reserved_frag": 0.4,      # the same for the decode (many tile-sized blocks)
    "dec_video_frag": 0.0,         # + x bytes of one tile's decoded frames (they fragment the cache)
    "stream_blocks": 2,            # blocks of a streamed model held on the GPU at once (fitted: the
                                   # file-backed stream runs one and prefetches up to two)
    "reserved_margin": 0.05,       # verdicts use peak reserved x (1 + this): the largest under-estimate seen
    "reserved_margin_stages": {},  # the same per stage, the step's per CFG mode ("denoise_step:batched"), when fitted
    "reserved_margin_bytes_stages": {},  # per stage: the largest under-estimate in bytes (see Estimate.stage_needed)
}

# ---------------------------------------------------------------- calibration
def calibration(path: Path | dict | None = None, card: str | None = None, allocator: str = "native",
                compiled: bool = False) -> dict:
    """{"constants": {...}, "choice": {card, family, allocator, matched, tolerance, path, note}, ...}:
    see cards.load (None: the file of ``card``'s family; a path: that file; a dict: the constants;
    ``compiled``: for a compiled speed option, see cards.choose)."""
    return cards.load(path, card, allocator, DEFAULT_CONSTANTS, compiled)


def clear_calibration_cache() -> None:
    cards._read.cache_clear()


# ---------------------------------------------------------------- what a profile asks for
def _profile(profile: Profile | str) -> Profile:
    if isinstance(profile, str):
        if profile not in PROFILES:
            raise ValueError(f"unknown placement profile {profile!r}; known: {', '.join(PROFILES)}")
        return PROFILES[profile]
    return profile


def _tile_of(profile: Profile, tile):
    """The decode tile as (h, w, overlap): the explicit argument ((h, w[, overlap]) or a TileSpec),
    else the profile's; None (or False given) = no spatial tiling."""
    t = tile if tile is not None else profile.vae_tile
    if t is None or t is False:
        return None
    if isinstance(t, (tuple, list)):
        h, w = int(t[0]), int(t[1])
        return (h, w, float(t[2]) if len(t) > 2 else 1 / 6)
    return (int(t.height), int(t.width), float(t.overlap))


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


def _largest_tile(height: int, width: int, tile) -> tuple[int, int]:
    """The largest (height, width) piece of :func:`decode_tiles`: what sets a tiled stage's peak."""
    return max(decode_tiles(height, width, tile), key=lambda t: t[0] * t[1])


# ---------------------------------------------------------------- the estimate
def _gpu_weights(size: ComponentSize, precision: str, mode: str, active: bool, stream_blocks: float,
                 keep_loaded: bool = False, stream_buffer_mult: float = 1.0) -> int:
    """Bytes of one component's weights on the GPU in a stage (active: the stage uses it)."""
    full = weight_bytes(size, precision)
    if mode == "resident" and (active or keep_loaded):
        w = full
    elif not active:
        return 0
    elif mode == "stream" and size.blocks > 1:
        per_block = size.block_params * (weight_bytes(size, precision) - size.buffer_elems * compute_bytes(precision)) \
            // max(size.params, 1)
        w = full - per_block * size.blocks + int(per_block * min(stream_blocks, size.blocks))
        w += int((stream_buffer_mult - 1) * size.buffer_elems * compute_bytes(precision))
    else:  # offload (and streaming of models without repeated blocks): whole model while in use
        w = full
    if active and precision_bytes(precision) == 1:
        w += size.largest_layer * 2  # per-layer upcast to bf16
    return w


def estimate(variant, frames: int, height: int, width: int, profile: Profile | str = "balanced",
             precision: dict | None = None, tile=None, budget_bytes: int | None = None,
             calibration_path: Path | None = None, tiny: bool = False, keep_loaded: bool = False,
             lora_bytes: int = 0, allocator: str | None = None, card: str | None = None,
             file_backed: bool = True, speed: str = "exact", device=None, cache: str = "none",
             cache_branches: int = 2) -> Estimate:
    """Predicted peak GPU memory per stage for one run; `fits` compares peak reserved with the budget.

    variant: Variant or its key; profile: a Profile or its name in profiles.PROFILES;
    precision: storage precision per component (missing: auto), resolved by the loaders' rule for
    ``device`` (default: the current CUDA device, else the CPU): 1.5 in fp16 is refused
    (precision.PrecisionError), auto picks what the card runs; tile: decode tile override ((h, w[, overlap]) in
    pixels or a TileSpec; False: untiled), else the profile's vae_tile.
    keep_loaded: False (the pipeline / CLI): each component is on the GPU only during its own stage
    and given back after it; True (front ends that keep models loaded, e.g. ComfyUI): components
    placed "resident" stay on the GPU through every stage.
    lora_bytes: the LoRAs' device bytes (lora.lora_bytes), weights of the denoise stage.
    allocator / card: the CUDA allocator ("native" / "cudaMallocAsync") and device name the
    calibration is chosen for; default: this process's (cards.allocator_backend, cards.device_card).
    file_backed: transformer and T5 streamed from their files (the loaders' default): a streamed model
    then holds the running block plus filestream.PREFETCH_DEPTH read-ahead blocks (structure, not a
    fit); False: loaded into memory and streamed by diffusers' group offloading (the calibration's
    fitted ``stream_blocks``, e.g. the H100 grid's in-memory models).
    speed: the transformer's speed option (fast.CHOICES): what it adds to the denoise step; ``fastest``
    counts the recipe it picks on ``device`` (fast.recipe).
    cache: a step cache (speed.caches.NAMES): the activations it holds between steps, on the GPU through
    the denoise (caches.held_bytes; CFG assumed, as everywhere in the estimate); ``cache_branches``: the
    CFG branches whose cache state this GPU holds (2; 1 on each GPU of a CFG pair).
    """
    v = VARIANTS[variant] if isinstance(variant, str) else variant
    profile = _profile(profile)
    speed = fast.recipe(speed, device if device is not None else P.default_device())
    parsed_speed = fast.parse(speed)
    precision = _precision(precision, v, device)
    allocator = allocator or allocator_backend()
    cal = calibration(calibration_path, card if card is not None or calibration_path else cards.device_card(), allocator,
                      parsed_speed.compile)
    c = cal["constants"]
    tile_t = _tile_of(profile, tile)
    vcfg = vae_config(v, tiny)
    video_bytes = _video_bytes(v, frames, height, width, precision)
    acts = {"text_encode": _text_encode_bytes(c, t5_config(tiny), precision),
            "image_encode": _image_encode_bytes(c, vcfg, precision, height, width, profile.encode_tiled),
            "denoise_step": _denoise_step_bytes(c, v, transformer_config(v, tiny), precision, profile,
                                                frames, height, width, parsed_speed),
            "decode": _decode_bytes(c, v, vcfg, precision, frames, height, width, tile_t)}
    sizes = component_sizes(v.key, tiny)
    blocks = 1 + PREFETCH_DEPTH if file_backed else float(c["stream_blocks"])
    weights = _stage_weights(sizes, precision, profile, keep_loaded, c, blocks)
    weights["denoise_step"] += int(lora_bytes)
    # a step cache lives through the whole denoise, like the weights (H100, diffusers' hooks, nvidia-smi:
    # PAB 1.0 +8.8 GiB measured / 8.5 here; FasterCache 1.0 +15.6 / 17.1, 1.5 +42.3 / 43.4)
    weights["denoise_step"] += cache_bytes(v, frames, height, width, cache, precision, tiny, cache_branches)
    host = _host(sizes, precision, profile, v.key, keep_loaded, video_bytes, tiny, tile_t is not None,
                 speedmem.host_bytes(parsed_speed, tiny))
    dec_out = _decode_out_bytes(v, frames, height, width, tile_t, precision)
    step_frag = ("reserved_frag_lowmem" if profile.low_mem_attention else "reserved_frag",
                 speedmem.frag_mult(c, parsed_speed))
    stages = [_stage(name, weights[name], acts[name], c, dec_out, host[name], step_frag) for name in STAGES]
    src = ", ".join(str(cal[k]) for k in ("card", "torch", "diffusers", "date") if cal.get(k)) or "built-in defaults"
    src += f", {cal['choice']['allocator']} allocator" if cal.get("card") else ""
    return Estimate(v.key, frames, height, width, profile.name, precision, profile.cfg_mode,
                    profile.ff_chunk or None, tile_t, tokens(v, frames, height, width), stages, budget_bytes, src,
                    keep_loaded, profile, float(c["reserved_margin"]), allocator, speedmem.choice(cal, parsed_speed),
                    {k: float(m) for k, m in (c.get("reserved_margin_stages") or {}).items()},
                    {k: int(m) for k, m in (c.get("reserved_margin_bytes_stages") or {}).items()},
                    cache=str(caches.parse(cache)))


def _host(sizes: dict, precision: dict, profile, variant_key: str, keep_loaded: bool, video_bytes: int, tiny: bool,
          tiled: bool, speed_host: int) -> dict[str, tuple[int, int]]:
    """hostplan's {stage: (owned, file)}, with what the speed option holds during the denoise (speed_host)."""
    host = host_stages(sizes, precision, {k: str(getattr(profile, k)) for k in COMPONENTS}, variant_key, keep_loaded,
                       video_bytes, tiny, tiled=tiled)
    owned, file = host["denoise_step"]
    host["denoise_step"] = (owned + speed_host, file)
    return host


def _precision(precision: dict | None, v: Variant, device) -> dict:
    """Each component's precision by the loaders' rule (precision.resolve), quietly: the planner
    estimates many profiles, the loaders say what a choice costs once."""
    device = device if device is not None else P.default_device()
    asked = {**DEFAULT_PRECISION, **(precision or {})}
    return {c: P.resolve(c, asked[c], device, v, warn=False) for c in COMPONENTS}


def _stage_weights(sizes: dict, precision: dict, profile: Profile, keep_loaded: bool, c: dict,
                   stream_blocks: float) -> dict:
    modes = {k: str(getattr(profile, k)) for k in COMPONENTS}
    return {stage: sum(_gpu_weights(sizes[k], precision[k], modes[k], COMPONENT_OF_STAGE[stage] == k,
                                    stream_blocks, keep_loaded, c["stream_buffer_mult"])
                       for k in COMPONENTS) for stage in STAGES}


def _stage(name: str, weights: int, activations: float, c: dict, dec_out: int, host=(0, 0),
           step_frag: tuple = ("reserved_frag", 1.0)) -> StageEstimate:
    """Allocated = weights + activations; reserved adds the allocator's fragmentation share (the step's:
    (its constant's name, a multiplier for a compiled step))."""
    # the step's fixed share (latents, timestep/text embeddings, cuBLAS workspace) is not the VAE's:
    # one shared constant made the encode's small tiles 20% too large
    fixed = c["vae_fixed_bytes"] if name in ("image_encode", "decode") else c["fixed_bytes"]
    a = int(activations + fixed)
    alloc = weights + a
    if name == "decode":
        reserved = alloc + c["dec_reserved_frag"] * a + c["dec_video_frag"] * dec_out
    else:
        frag, mult = {"text_encode": ("text_reserved_frag", 1.0), "image_encode": ("enc_reserved_frag", 1.0)}.get(
            name, step_frag)
        reserved = alloc + c[frag] * mult * a
    return StageEstimate(name, weights, a, alloc, int(reserved), *host)


def _text_encode_bytes(c: dict, t5cfg: dict, precision: dict) -> float:
    """T5 on 226 tokens, + relative-position attention scores in fp32."""
    tb = compute_bytes(precision["text_encoder"])
    return (c["t5_act_units"] * MAX_TEXT_TOKENS * t5cfg["d_model"] * tb
            + 3 * MAX_TEXT_TOKENS * t5cfg["d_ff"] * tb
            + 2 * t5cfg["num_heads"] * MAX_TEXT_TOKENS ** 2 * 4)


def _image_encode_bytes(c: dict, vcfg: dict, precision: dict, height: int, width: int, strips: bool) -> float:
    """Untiled: the encoder's first level at full resolution, 3 frames (causal padding), and the convolution
    caches it keeps (fitted in enc_act_mult). In strips (the profile's encode_tiled): a resnet's input, its
    branch and the new activation at the first level, one frame each, plus one strip's temporaries; first
    principles, its unit count measured (bench/bench_encode_exact.py: DEFAULT_CONSTANTS)."""
    vb = compute_bytes(precision["vae"])
    level0 = vcfg["block_out_channels"][0] * height * width * vb
    if strips:
        return c["enc_strip_units"] * level0 + vae_strips.STRIP_BYTES + 3 * height * width * vb   # + the pixels
    return c["enc_act_mult"] * 3 * level0


def _denoise_step_bytes(c: dict, v: Variant, tcfg: dict, precision: dict, profile: Profile, frames: int,
                        height: int, width: int, speed: fast.Speed = fast.Speed()) -> float:
    """Live hidden states + the larger of the attention and feed-forward phases, + latents and RoPE."""
    xb = compute_bytes(precision["transformer"])
    batch = 2 if profile.cfg_mode == "batched" else 1
    n = tokens(v, frames, height, width)
    dim = tcfg["num_attention_heads"] * tcfg["attention_head_dim"]
    unit = batch * n * dim * xb
    ff_chunk = profile.ff_chunk or None
    chunk = min(int(ff_chunk), n) if ff_chunk else n
    attn_units = c["step_attn_units_lowmem"] if profile.low_mem_attention else c["step_attn_units"]
    attn_units += speedmem.attention_units(speed)
    ff_extra = speedmem.ff_units(c, speed)
    if chunk < n:   # chunk intermediates + the full output the chunks are written into
        ff_bytes = max(c["step_ff_units_chunked"] + ff_extra, 1.0) * batch * chunk * dim * xb \
            + c["step_ff_chunk_live_units"] * unit
    else:
        ff_bytes = max(c["step_ff_units"] + ff_extra, 1.0) * unit
    step_act = (c["step_live_units"] + speedmem.live_units(c, speed)) * unit + max(attn_units * unit, ff_bytes)
    lf = latent_frames(v, frames)[0]
    step_act += 3 * batch * lf * 32 * (height // 8) * (width // 8) * 4   # latents in/out, fp32 scheduler
    step_act += 2 * video_tokens(v, frames, height, width) * tcfg["attention_head_dim"] * 4  # RoPE cos/sin
    return step_act


def cache_bytes(variant, frames: int, height: int, width: int, cache: str = "none", precision: dict | None = None,
                tiny: bool = False, branches: int = 2) -> int:
    """Bytes a step cache holds on the GPU through the denoise (hidden states in the compute dtype);
    ``branches``: CFG branches whose state this GPU holds (1 on each GPU of a CFG pair)."""
    v = VARIANTS[variant] if isinstance(variant, str) else variant
    tcfg = transformer_config(v, tiny)
    xb = compute_bytes(_precision(precision, v, None)["transformer"])
    return caches.held_bytes(cache, tcfg["num_layers"], video_tokens(v, frames, height, width),
                             tcfg["max_text_seq_length"], tcfg["num_attention_heads"] * tcfg["attention_head_dim"],
                             branches=branches, dtype_bytes=xb)


def _decoded_latent_frames(v: Variant, frames: int) -> int:
    """Latent frames the decode sees: 1.5's padding frame is dropped first."""
    drop = 1 if v.patch_size_t and ((frames - 1) // 4 + 1) % v.patch_size_t else 0
    return latent_frames(v, frames)[0] - drop


def _video_bytes(v: Variant, frames: int, height: int, width: int, precision: dict) -> int:
    out_frames = 4 * (_decoded_latent_frames(v, frames) - 1) + 1
    return 3 * out_frames * height * width * compute_bytes(precision["vae"])


def _decode_out_bytes(v: Variant, frames: int, height: int, width: int, tile, precision: dict) -> int:
    """Bytes of the largest tile's decoded frames, the most vae.decode holds on the device at once
    (untiled: the whole video)."""
    th, tw = _largest_tile(height, width, tile)
    return _video_bytes(v, frames, th, tw, precision)


def _decode_bytes(c: dict, v: Variant, vcfg: dict, precision: dict, frames: int, height: int, width: int,
                  tile) -> float:
    """The largest tile's activations for one temporal chunk + its decoded frames + the latents."""
    vb = compute_bytes(precision["vae"])
    dec_lf = _decoded_latent_frames(v, frames)
    chunk_lat = 2 + dec_lf % 2 if dec_lf > 2 else dec_lf
    chunk_out = 4 * (chunk_lat - 1) + 1
    th, tw = _largest_tile(height, width, tile)
    tile_act = c["dec_tile_mult"] * vcfg["block_out_channels"][0] * chunk_out * th * tw * vb
    tile_out = c["dec_accum_mult"] * _decode_out_bytes(v, frames, height, width, tile, precision)
    return tile_act + tile_out + dec_lf * 16 * (height // 8) * (width // 8) * vb
