"""Named memory profiles and the decode/encode tile rule: what a run may change, as data.

A :class:`Profile` bundles each component's placement mode (``resident`` / ``offload`` / ``stream``,
see :mod:`cogvid_core.placement`) with the CFG mode and the activation savers of
:mod:`cogvid_core.activations`; :data:`PROFILES` holds the shipped ones. ``"auto"`` is not a
profile but the request to pick one from a VRAM budget (:func:`cogvid_core.planner.resolve_profile`).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .models import SPATIAL_COMPRESSION

AUTO = "auto"
MODES = ("resident", "offload", "stream")
CFG_MODES = ("batched", "sequential")


@dataclass(frozen=True)
class TileSpec:
    """Sample-space tile size for VAE encode/decode; overlap is a fraction of the tile."""
    height: int = 240
    width: int = 360
    overlap: float = 1 / 6


def tile_is_exact(size: int, overlap: float, spatial: int = SPATIAL_COMPRESSION) -> bool:
    """THE tile rule: whether diffusers' CogVideoX tiled encode/decode, given this overlap factor,
    reassembles exactly ``size`` pixels per tile step along one axis. When the latent stride and the
    kept sample rows disagree (e.g. 360 px at overlap 1/6: stride 37 latents = 296 px, kept 300 px),
    the output grows (1360 -> 1376 px) or the encoded latent gets an extra column (90 -> 91) and
    sampling fails. Profile validation and the factors the VAE is given both rest on it."""
    lat = size // spatial
    decode_ok = int(lat * (1 - overlap)) * spatial == size - int(size * overlap)
    encode_ok = int(size * (1 - overlap)) == spatial * (lat - int(lat * overlap))
    return size % spatial == 0 and decode_ok and encode_ok


def exact_overlap(size: int, overlap: float, spatial: int = SPATIAL_COMPRESSION) -> float:
    """The overlap factor to hand diffusers for a tile side of ``size`` px asked with ``overlap``: the
    overlap rounded to whole latent steps, nudged by a few ulps until :func:`tile_is_exact` holds
    (diffusers truncates ``size * f``, so the exact fraction can land one below); 0.0 when none
    does. Any tile side a multiple of ``spatial`` gets one, so the VAE accepts tiles a profile
    would reject as given."""
    lat = size // spatial
    step = min(lat, max(1, round(lat * (1 - overlap))))
    blend = size - spatial * step
    f = blend / size
    for _ in range(8):
        if tile_is_exact(size, f, spatial):
            return f
        f = math.nextafter(f, 1.0) if int(size * f) < blend else math.nextafter(f, 0.0)
    return 0.0


def snap_tile(tile: TileSpec) -> TileSpec:
    """The nearest exact tile not larger than ``tile``: its own sizes when exact, else overlap 0.2 with
    sides rounded down to multiples of 40 px (at least 80)."""
    if tile_is_exact(tile.height, tile.overlap) and tile_is_exact(tile.width, tile.overlap):
        return tile
    return TileSpec(max(80, tile.height // 40 * 40), max(80, tile.width // 40 * 40), 0.2)


def check_tile(tile: TileSpec) -> TileSpec:
    for axis, size in (("height", tile.height), ("width", tile.width)):
        if not tile_is_exact(size, tile.overlap):
            raise ValueError(f"VAE tile {tile.width}x{tile.height} with overlap {tile.overlap:.4g}: the {axis} "
                             f"{size} does not split into whole latent steps, diffusers' tiling would change the "
                             f"video size; use overlap 0.2 with sides that are multiples of 40 (e.g. 240x360)")
    return tile


@dataclass(frozen=True)
class Profile:
    name: str
    transformer: str = "resident"        # placement mode of each component
    text_encoder: str = "resident"
    vae: str = "resident"
    cfg_mode: str = "batched"            # "batched": cond+uncond in one batch of 2; "sequential": one at a time
    ff_chunk: int | None = None          # feed-forward sequence chunk (tokens); None = whole sequence
    low_mem_attention: bool = False      # RoPE applied per head chunk in place
    attn_head_chunk: int = 8             # heads per RoPE chunk when low_mem_attention
    vae_tile: TileSpec | None = TileSpec(240, 360, 0.2)     # sample-space decode tile; None = untiled
    description: str = ""
    encode_tiled: bool = False           # image encode in vae_tile tiles (the untiled 1360x768 encode peaks ~6 GiB)

    def validate(self) -> "Profile":
        for comp in ("transformer", "text_encoder", "vae"):
            mode = getattr(self, comp)
            if mode not in MODES:
                raise ValueError(f"profile {self.name}: {comp} placement must be one of {MODES}, got {mode!r}")
        if self.vae == "stream":
            raise ValueError(f"profile {self.name}: the VAE has no block list to stream; use 'offload'")
        if self.cfg_mode not in CFG_MODES:
            raise ValueError(f"profile {self.name}: cfg_mode must be one of {CFG_MODES}, got {self.cfg_mode!r}")
        if self.ff_chunk is not None and (not isinstance(self.ff_chunk, int) or self.ff_chunk < 1):
            raise ValueError(f"profile {self.name}: ff_chunk must be a positive int or None, got {self.ff_chunk!r}")
        if self.attn_head_chunk < 1:
            raise ValueError(f"profile {self.name}: attn_head_chunk must be >= 1")
        if self.vae_tile is not None:
            if not isinstance(self.vae_tile, TileSpec):
                raise ValueError(f"profile {self.name}: vae_tile must be a TileSpec or None")
            check_tile(self.vae_tile)
        return self

    def replace(self, **changes) -> "Profile":
        return dataclasses.replace(self, **changes).validate()


PROFILES: dict[str, Profile] = {p.name: p.validate() for p in (
    Profile("resident", "resident", "resident", "resident", "batched", None, False,
            description="everything on the GPU, CFG batched: diffusers' everything-resident recipe (~40 GiB "
                        "reserved for 1.5 at 81x768x1360)"),
    Profile("balanced", "offload", "offload", "resident", "sequential", 16384, True,
            description="24 GB cards: each model on the GPU only while it runs (transformer for sampling, T5 for "
                        "the prompt), CFG one branch at a time, chunked feed-forward, low-memory RoPE "
                        "(measured: batched CFG was no faster and took 3.3 GiB more)"),
    Profile("lowvram", "stream", "stream", "offload", "sequential", 8192, True,
            description="8-12 GB cards: transformer and T5 streamed block by block from pinned host memory with "
                        "the next block prefetched on a side stream, CFG one branch at a time, chunked "
                        "feed-forward, low-memory RoPE, tiled image encode", encode_tiled=True),
)}



def get_profile(name: str | Profile) -> Profile:
    if isinstance(name, Profile):
        if name.vae_tile is not None:
            name = dataclasses.replace(name, vae_tile=snap_tile(name.vae_tile))
        return name.validate()
    if name not in PROFILES:
        raise ValueError(f"unknown placement profile {name!r}; known: {', '.join([*PROFILES, AUTO])}")
    return PROFILES[name]
