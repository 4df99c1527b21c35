"""Start-image encoding and (tiled) video decoding with the CogVideoX VAE."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cogvid_core.device import devmem
from cogvid_core.model.variants import SPATIAL_COMPRESSION, Variant
from cogvid_core.model import vae_strips
from cogvid_core.model.tiles import TileSpec, exact_overlap

RESIZE_MODES = ("crop", "stretch", "pad")
# A crop that keeps less than this share of the picture's cut side is said (a square photo into 16:9
# keeps 56 %, a portrait one 32 %; 4:3 keeps 75 % and is not worth a word), as is any change of orientation.
CROP_NOTE_BELOW = 0.6

log = logging.getLogger(__name__)


@dataclass
class ImageLatent:
    """The start frame's latent distribution; the sampler draws from it with the run's seed,
    exactly where diffusers draws it, so one seed gives one video whichever node encodes."""
    mean: torch.Tensor   # [1, C, 1, h, w]
    std: torch.Tensor
    height: int
    width: int
    scale: float         # the VAE scaling factor; the transformer's variant says multiply or divide


@dataclass
class VideoLatents:
    samples: torch.Tensor   # [1, F, C, h, w] as the transformer produced them (incl. 1.5 padding)
    frames: int
    height: int
    width: int
    variant_key: str
    fps: int
    drop_first: int         # latent frames to drop before decode (1.5 padding)


def prepare_image(image, height: int, width: int, resize: str = "crop") -> torch.Tensor:
    """Any start image -> float [1, 3, H, W] in -1..1 at exactly height x width.

    Accepts a PIL image (alpha, grayscale, 16-bit converted to RGB) or a ComfyUI IMAGE tensor
    ([B, H, W, C] or [H, W, C], 0..1; the first image of a batch is used).
    """
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    x = _to_tensor(image)                                      # [1, 3, h, w] 0..1
    h, w = x.shape[-2:]
    if min(h, w) < 2:
        raise ValueError(f"start image is {w}x{h}: too small to encode")
    if max(h / w, w / h) > 8:
        raise ValueError(f"start image is {w}x{h}: aspect ratio above 8:1, crop it first")
    if (h, w) != (height, width):
        note = crop_note(h, w, height, width, resize)
        if note:
            log.warning(note)
        x = _resize(x, height, width, resize)
    return x.clamp(0, 1) * 2.0 - 1.0


def _orientation(h: int, w: int) -> str:
    return "portrait" if h > w else "landscape" if w > h else "square"


def crop_note(h: int, w: int, height: int, width: int, resize: str) -> str | None:
    """One line when ``crop`` cuts a large part of an h x w picture to fill height x width (what is kept,
    and what keeps all of it), else None."""
    if resize != "crop" or (h, w) == (height, width):
        return None
    image_ratio, video_ratio = w / h, width / height
    kept = min(image_ratio / video_ratio, video_ratio / image_ratio)
    turned = {_orientation(h, w), _orientation(height, width)} == {"portrait", "landscape"}
    if kept >= CROP_NOTE_BELOW and not turned:
        return None
    side = "height" if image_ratio < video_ratio else "width"
    note = (f"the {w}x{h} start image ({_orientation(h, w)}) is cropped to fill the {width}x{height} video "
            f"({_orientation(height, width)}): only the middle {kept:.0%} of its {side} is kept; resize 'pad' "
            f"keeps all of it (with bars)")
    if turned:
        note += f", or make a {height}x{width} video where the model allows it (CogVideoX1.5 does)"
    return note


def _to_tensor(image) -> torch.Tensor:
    if isinstance(image, torch.Tensor):
        x = image.detach().float()
        if x.ndim == 3:
            x = x.unsqueeze(0)
        if x.ndim != 4:
            raise ValueError(f"start image tensor must be [B, H, W, C], got shape {tuple(image.shape)}")
        x = x[:1]
        c = x.shape[-1]
        if c == 1:
            x = x.expand(-1, -1, -1, 3)
        elif c == 4:  # composite over white: the transparent parts would otherwise turn black
            x = x[..., :3] * x[..., 3:] + (1 - x[..., 3:])
        elif c != 3:
            raise ValueError(f"start image has {c} channels; expected 1, 3 or 4")
        return x.permute(0, 3, 1, 2).contiguous()
    import numpy as np
    from PIL import Image

    if not isinstance(image, Image.Image):
        raise TypeError(f"start image must be a PIL image or an IMAGE tensor, got {type(image).__name__}")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(image, dtype=np.float32) / (65535.0 if image.mode.startswith("I;16") else max(1, np.asarray(image).max()))
        arr = np.repeat(arr[..., None], 3, axis=-1)
    else:
        if image.mode in ("RGBA", "LA", "P"):
            rgba = image.convert("RGBA")
            bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(bg, rgba)
        arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).contiguous()


def _resize(x: torch.Tensor, height: int, width: int, mode: str) -> torch.Tensor:
    h, w = x.shape[-2:]
    if mode == "stretch":
        return F.interpolate(x, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
    scale = max(height / h, width / w) if mode == "crop" else min(height / h, width / w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
    if mode == "crop":
        top, left = (nh - height) // 2, (nw - width) // 2
        return x[..., top:top + height, left:left + width]
    out = torch.zeros(x.shape[0], 3, height, width, dtype=x.dtype)   # pad with black
    top, left = (height - nh) // 2, (width - nw) // 2
    out[..., top:top + nh, left:left + nw] = x
    return out


def encode_image(vae, image, height: int, width: int, variant: Variant, resize: str = "crop",
                 device=None, tile: TileSpec | None = None, strips: bool = False,
                 strip_bytes: int = vae_strips.STRIP_BYTES) -> ImageLatent:
    """Encode the start frame into the VAE's latent distribution (mean, std) kept on CPU.

    ``strips``: diffusers' untiled encode computed in strips of rows (:mod:`cogvid_core.model.vae_strips`):
    the same latent in a fraction of the memory, each strip's temporaries within ``strip_bytes``.
    ``tile``: diffusers' tiled encode, which blends separately encoded tiles: a different latent (~10%
    relative L2 at 640x384), so a different video; kept for measurements beside it.
    The size is checked against what the variant can generate here, before any compute."""
    step = 8 * 2  # VAE x patch size: both variants patch 2x2 latent pixels
    if height % step or width % step or min(height, width) < 32:
        raise ValueError(f"{variant.label} needs width and height that are multiples of {step} and at least 32; "
                         f"got {width}x{height}: try {max(32, round(width / step) * step)}x"
                         f"{max(32, round(height / step) * step)}")
    device = torch.device(device) if device is not None else next(vae.parameters()).device
    dtype = next(vae.parameters()).dtype
    if strips and tile is not None:
        raise ValueError("encode_image: pass either strips=True (exact) or a tile (diffusers' blended tiles), not both")
    pixels = prepare_image(image, height, width, resize).to(device, dtype)
    set_tiling(vae, tile)   # explicit every time: a decode's tiling must not leak into this encode
    try:
        with torch.inference_mode():
            if strips:
                dist = vae_strips.encode_frame(vae, pixels.unsqueeze(2), strip_bytes)
            else:
                dist = vae.encode(pixels.unsqueeze(2)).latent_dist     # [1, 3, 1, H, W] -> [1, C, 1, h, w]
    finally:
        vae.disable_tiling()
    return ImageLatent(mean=dist.mean.cpu(), std=dist.std.cpu(), height=height, width=width,
                       scale=vae.config.scaling_factor)


def decode_calls(vae, latent_frames: int, lat_h: int, lat_w: int) -> int:
    """How many decoder forward calls diffusers' (tiled) decode makes: the progress-bar total."""
    batch = vae.num_latent_frames_batch_size
    per_tile = max(latent_frames // batch, 1)
    if not _tiles_latents(vae, lat_h, lat_w):
        return per_tile
    step_h, step_w = _latent_steps(vae)
    return math.ceil(lat_h / step_h) * math.ceil(lat_w / step_w) * per_tile


def _tiles_latents(vae, lat_h: int, lat_w: int) -> bool:
    """Whether diffusers decodes latents this large in spatial tiles (its ``_decode`` test)."""
    return vae.use_tiling and (lat_w > vae.tile_latent_min_width or lat_h > vae.tile_latent_min_height)


def _latent_steps(vae) -> tuple[int, int]:
    """Latent rows and columns from one tile's start to the next one's (diffusers' tiled_decode)."""
    return (int(vae.tile_latent_min_height * (1 - vae.tile_overlap_factor_height)),
            int(vae.tile_latent_min_width * (1 - vae.tile_overlap_factor_width)))


def set_tiling(vae, tile: TileSpec | None) -> None:
    if tile is None:
        vae.disable_tiling()
        return
    if tile.height % 8 or tile.width % 8 or tile.height < 64 or tile.width < 64:
        raise ValueError(f"VAE tile must be multiples of 8 and at least 64x64; got {tile.width}x{tile.height}")
    if not 0 <= tile.overlap < 0.5:
        raise ValueError(f"tile overlap must be in [0, 0.5); got {tile.overlap}")
    vae.enable_tiling(tile_sample_min_height=tile.height, tile_sample_min_width=tile.width)
    # factors for which diffusers' latent steps and kept pixels agree, else the video comes out too
    # large with repeated strips (e.g. 1376 wide for 1360 with 360-wide tiles at 1/6); set as
    # attributes because enable_tiling treats a factor of 0 as "keep the default"
    vae.tile_overlap_factor_height = exact_overlap(tile.height, tile.overlap)
    vae.tile_overlap_factor_width = exact_overlap(tile.width, tile.overlap)


def decode(vae, latents: VideoLatents, device=None, tile: TileSpec | None = None,
           progress=None, interrupt=None) -> torch.Tensor:
    """Latents -> frames [T, H, W, 3] float32 0..1 on CPU; tiles in space, diffusers chunks in time."""
    device = torch.device(device) if device is not None else next(vae.parameters()).device
    dtype = next(vae.parameters()).dtype
    z = latents.samples[:, latents.drop_first:]
    z = z.permute(0, 2, 1, 3, 4).to(device, dtype) / vae.config.scaling_factor   # [1, C, F, h, w]
    set_tiling(vae, tile)
    total = decode_calls(vae, z.shape[2], z.shape[3], z.shape[4])
    done = [0]

    def before_call(module, args):
        if interrupt is not None:
            interrupt()

    def after_call(module, args, output):
        done[0] += 1
        if progress is not None:
            progress(min(done[0], total), total)

    hooks = [vae.decoder.register_forward_pre_hook(before_call),
             vae.decoder.register_forward_hook(after_call)] + _trim_between_blocks(vae, device)
    try:
        with torch.inference_mode():
            if _tiled(vae, z):
                frames = _decode_tiles_to_frames(vae, z)
            else:
                video = vae.decode(z).sample[0].to("cpu", non_blocking=False)    # [3, T, H, W]
                frames = torch.empty(video.shape[1], video.shape[2], video.shape[3], 3, dtype=torch.float32)
                _frames_into(frames, video)
                del video
    finally:
        for h in hooks:
            h.remove()
        vae.disable_tiling()
        del z
    return frames


def _trim_between_blocks(vae, device) -> list:
    """Under cudaMallocAsync, hand the pool's freed memory back before each decoder block.

    The decoder's activations change size from block to block (337-676 MiB each at 360x240 tiles), and
    the pool keeps every freed one: 81x768x1360 in 360x240 tiles allocates 4.11 GiB at its peak but its
    pool reached 5.84 GiB, and that pool is ComfyUI's NVML peak. Trimmed before each block: 5.44 GiB for
    +1.5% decode time (bench/bench_decode_mem.py, H200). Trimming after every frame batch or tile did
    nothing (the growth is within one decoder call); on the native allocator the same release saves
    0.70 GiB but costs a third of the decode (it unmaps pages), so it is left to cudaMallocAsync."""
    return empty_cache_before_blocks(vae) if devmem.pool_keeps_freed(device) else []


def empty_cache_before_blocks(vae) -> list:
    """Hooks (their handles) that empty the CUDA cache before each decoder block: conv_in, the mid block,
    each up block, norm_out."""
    d = vae.decoder
    blocks = [d.conv_in, d.mid_block, *d.up_blocks, d.norm_out]
    return [b.register_forward_pre_hook(lambda module, args: torch.cuda.empty_cache()) for b in blocks]


def _tiled(vae, z: torch.Tensor) -> bool:
    """Whether diffusers would decode ``z`` [B, C, F, h, w] in spatial tiles."""
    return _tiles_latents(vae, z.shape[3], z.shape[4])


_FRAMES_PER_PASS = 8


def _frames_into(out: torch.Tensor, video: torch.Tensor, y0: int = 0, x0: int = 0) -> None:
    """``out[:, y0:y0 + h, x0:x0 + w]`` = ``video`` [3, T, h, w] as 0..1 float32 frames [T, h, w, 3], a few
    frames at a time: the float32 temporaries of a whole 81x768x1360 video are 1 GiB each. (An fp32
    ``video`` is scaled in place: it is a temporary.)"""
    h, w = video.shape[2], video.shape[3]
    for t in range(0, video.shape[1], _FRAMES_PER_PASS):
        part = video[:, t:t + _FRAMES_PER_PASS].permute(1, 2, 3, 0).float()
        out[t:t + _FRAMES_PER_PASS, y0:y0 + h, x0:x0 + w] = part.mul_(0.5).add_(0.5).clamp_(0, 1)


def _decode_tiles_to_frames(vae, z: torch.Tensor) -> torch.Tensor:
    """diffusers' tiled decode with each decoded tile moved to the host as soon as it exists, blended
    there and written straight into the float32 frames.

    diffusers keeps every decoded tile, then the blended rows, then the whole video on the device: for
    81x768x1360 in 360x240 tiles that is ~0.8 GiB of tiles under the last tile's activations and ~1.8 GiB
    at assembly. Here the device holds one tile; the host the frames, one tile, and the edges the next
    tiles blend with (the right edge of the tile to the left, the bottom edges of the row above). The
    same tile grid, the VAE's own ``decode`` per tile (the frame batching its tiled loop does) and its
    own ``blend_v`` / ``blend_h`` give the same numbers (tests/test_vae_host_tiles.py)."""
    _, _, _, height, width = z.shape
    tile_h, tile_w = vae.tile_latent_min_height, vae.tile_latent_min_width
    step_h, step_w = _latent_steps(vae)
    blend_h = int(vae.tile_sample_min_height * vae.tile_overlap_factor_height)
    blend_w = int(vae.tile_sample_min_width * vae.tile_overlap_factor_width)
    keep_h, keep_w = vae.tile_sample_min_height - blend_h, vae.tile_sample_min_width - blend_w
    heights = [min(keep_h, SPATIAL_COMPRESSION * min(tile_h, height - i)) for i in range(0, height, step_h)]
    widths = [min(keep_w, SPATIAL_COMPRESSION * min(tile_w, width - j)) for j in range(0, width, step_w)]
    frames, above = None, None
    vae.use_tiling = False          # each tile through the VAE's untiled decode
    try:
        for r, i in enumerate(range(0, height, step_h)):
            left, bottoms = None, []
            for c, j in enumerate(range(0, width, step_w)):
                tile = vae.decode(z[:, :, :, i:i + tile_h, j:j + tile_w]).sample.to("cpu")
                if above is not None:   # blend_* write into ``tile``; the edges kept below see the result
                    tile = vae.blend_v(above[c], tile, blend_h)
                if left is not None:
                    tile = vae.blend_h(left, tile, blend_w)
                kept = tile[0, :, :, :keep_h, :keep_w]
                if kept.shape[2:] != (heights[r], widths[c]):
                    raise RuntimeError(f"tile ({r}, {c}) decoded to {tuple(kept.shape[2:])} pixels, expected "
                                       f"{(heights[r], widths[c])}")
                if frames is None:
                    frames = torch.empty(kept.shape[1], sum(heights), sum(widths), 3, dtype=torch.float32)
                _frames_into(frames, kept, sum(heights[:r]), sum(widths[:c]))
                left = tile[:, :, :, :, -blend_w:].clone() if blend_w else tile
                bottoms.append(tile[:, :, :, -blend_h:, :].clone() if blend_h else tile)
            above = bottoms
    finally:
        vae.use_tiling = True
    return frames
