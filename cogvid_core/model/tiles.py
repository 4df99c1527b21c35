"""The VAE tile rule: which tile sizes diffusers' tiled CogVideoX encode/decode reassembles exactly."""
from __future__ import annotations

import math
from dataclasses import dataclass

from cogvid_core.model.variants import SPATIAL_COMPRESSION


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
