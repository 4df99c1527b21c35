"""Failure handling shared by the pipeline and the nodes: out-of-memory translation, decode retry
with smaller tiles, and the cleanup checks the reliability tests (and users) rely on.

An out-of-memory error inside a stage becomes a :class:`StageOOM` (still a ``torch.OutOfMemoryError``,
so ComfyUI shows its OOM advice too) whose one-line message names the stage, what the estimator
says the stage needs, what the device has free, and which setting to change. The frames of the
failed computation are cleared before it is raised, so their tensors are freed at once.
"""
from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass, replace

import torch

from cogvid_core.device.devmem import GiB, device_free_bytes, free_memory
from cogvid_core.model.stages import LABELS

log = logging.getLogger(__name__)
TILE_FLOOR = 64          # smallest decode tile side (pixels) the retry goes down to

# what to change when a stage runs out of memory
ADVICE = {
    "text_encode": "set the T5 placement to 'stream' or use the 'lowvram' profile",
    "image_encode": "use a smaller video size, or free the GPU (other models) before the run",
    "denoise_step": "use the 'lowvram' profile (or 'balanced'), fewer frames or a smaller size",
    "decode": "use a smaller VAE tile (e.g. 240x160 or 192x128) or fewer frames",
}


class StageOOM(torch.OutOfMemoryError):
    """A stage ran out of device memory; the message says what it needed and what to change."""

    def __init__(self, message: str, stage: str, needed: int | None = None, free: int | None = None):
        super().__init__(message)
        self.stage = stage
        self.needed = needed
        self.free = free
        self.latents = None      # decode failures: the latents, to decode again without sampling


@dataclass
class RunInfo:
    """What the estimator needs to say how much a stage needs (all optional)."""
    variant: object = None        # models.Variant or its key
    frames: int | None = None
    height: int | None = None
    width: int | None = None
    profile: object = "balanced"  # profiles.Profile or name
    tile: object = None           # decode tile (profiles.TileSpec) override
    device: object = None


def stage_need(stage: str, info: RunInfo | None) -> int | None:
    """Estimated peak reserved bytes of a stage, or None when the estimator cannot say."""
    if info is None or info.variant is None or not (info.frames and info.height and info.width):
        return None
    try:
        from cogvid_core.plan import estimate
        tile = info.tile
        if stage == "decode" and tile is None:
            tile = False
        est = estimate.estimate(info.variant, info.frames, info.height, info.width, info.profile or "balanced",
                                tile=tile)
        return int(est.stage(stage).peak_reserved)
    except Exception as e:   # the estimate is advice; never hide the OOM behind an estimator bug
        log.debug("no estimate for %s: %s", stage, e)
        return None


def oom_message(stage: str, info: RunInfo | None, original: str = "", extra: str = "") -> tuple[str, int | None, int | None]:
    need = stage_need(stage, info)
    free = device_free_bytes(info.device if info is not None else None)
    parts = [f"out of GPU memory in {LABELS.get(stage, stage)}"]
    if need is not None:
        prof = getattr(info.profile, "name", info.profile)
        parts.append(f"the stage needs ~{need / GiB:.2f} GiB (estimate, profile {prof})")
    if free is not None:
        parts.append(f"the GPU has {free / GiB:.2f} GiB free")
    if extra:
        parts.append(extra)
    msg = "; ".join(parts) + f": {ADVICE.get(stage, 'use the lowvram profile')}"
    first = original.strip().splitlines()[0] if original.strip() else ""
    if first:
        msg += f" ({first})"
    return msg, need, free


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or (isinstance(e, RuntimeError) and "out of memory" in str(e))


class oom_guard:
    """``with oom_guard("denoise_step", info): ...``: an OOM inside becomes a :class:`StageOOM`
    after the failed frames are cleared and the device cache is emptied."""

    def __init__(self, stage: str, info: RunInfo | None = None):
        self.stage = stage
        self.info = info

    def __enter__(self):
        return self

    def __exit__(self, et, ev, tb):
        if ev is None or isinstance(ev, StageOOM) or not _is_oom(ev):
            return False
        original = str(ev)
        traceback.clear_frames(tb)      # the failed computation's tensors go now, not with the exception
        ev.__traceback__ = None
        del ev, tb
        free_memory(self.info.device if self.info else None)
        msg, need, free = oom_message(self.stage, self.info, original)
        raise StageOOM(msg, self.stage, need, free) from None


def smaller_tile(tile, floor: int = TILE_FLOOR):
    """Half the tile's sides (multiples of 8, at least ``floor``); None when it cannot shrink."""
    from cogvid_core.memory.profiles import TileSpec
    if tile is None:
        return TileSpec()
    h = max(floor, (tile.height // 2) // 8 * 8)
    w = max(floor, (tile.width // 2) // 8 * 8)
    if (h, w) == (tile.height, tile.width):
        return None
    return replace(tile, height=h, width=w)


def decode(vae, latents, device=None, tile=None, progress=None, interrupt=None, info: RunInfo | None = None,
           floor: int = TILE_FLOOR):
    """:func:`vae.decode` that retries an out-of-memory decode with halved tiles (an untiled decode
    first falls back to the default tile) down to ``floor``; then raises :class:`StageOOM`
    carrying the latents so the caller can decode them again without sampling."""
    from cogvid_core.model import vae as vae_mod
    tried = []
    while True:
        failed = None
        try:
            frames = vae_mod.decode(vae, latents, device=device, tile=tile, progress=progress, interrupt=interrupt)
            check_frames(frames, vae)
            return frames
        except BaseException as e:
            if isinstance(e, StageOOM) or not _is_oom(e):
                raise
            failed = str(e)
            traceback.clear_frames(e.__traceback__)
            e.__traceback__ = None
            del e
        # out of the except block: nothing of the failed decode is referenced any more
        free_memory(device)
        tried.append("off" if tile is None else f"{tile.width}x{tile.height}")
        nxt = smaller_tile(tile, floor)
        if nxt is None:
            info = info or RunInfo()
            info = replace(info, tile=tile, variant=info.variant or latents.variant_key,
                           frames=info.frames or latents.frames, height=info.height or latents.height,
                           width=info.width or latents.width, device=info.device or device)
            msg, need, free = oom_message("decode", info, failed, extra=f"tiles tried: {', '.join(tried)}")
            err = StageOOM(msg, "decode", need, free)
            err.latents = latents
            raise err
        log.warning("decode ran out of memory with tile %s; retrying with %dx%d", tried[-1], nxt.width, nxt.height)
        tile = nxt


def check_frames(frames: torch.Tensor, vae) -> None:
    """Raise FloatingPointError when decoded frames hold NaN (black frames), naming the VAE precision
    to change: the latents were finite (sampling checks every step), so the decode made them. Checked a
    frame at a time: a bool copy of a whole 81x768x1360 video would be 254 MiB."""
    bad = next((i for i, f in enumerate(frames) if not torch.isfinite(f).all()), None)
    if bad is None:
        return
    from cogvid_core.model import precision as P
    dtype = next(vae.parameters()).dtype
    fix = {torch.float16: "load the VAE in bf16, or in fp32 on a card without bf16 (T4, V100, RTX 20xx)",
           torch.bfloat16: "load the VAE in fp32"}.get(dtype, "the VAE file holds NaN/inf: download it again")
    name = P.name_of(dtype) if dtype in P.DTYPES.values() else str(dtype)
    raise FloatingPointError(f"the decoded video holds NaN (black frames; first in frame {bad + 1}) with the VAE in "
                             f"{name}: {fix}")


def leftovers(*modules) -> list[str]:
    """What a run left behind on these modules: placements not released, hooks, device weights.
    Empty when the cleanup was complete (checked after errors and interrupts)."""
    from cogvid_core.memory.placement import placed_of
    found = []
    for m in modules:
        if m is None:
            continue
        name = type(m).__name__
        p = placed_of(m)
        if p is not None and not p.released:
            found.append(f"{name} still placed ({p!r})")
        for sub_name, sub in m.named_modules():
            if sub._forward_hooks or sub._forward_pre_hooks:
                found.append(f"{name}.{sub_name or '<root>'} has forward hooks")
                break
            if getattr(sub, "_diffusers_hook", None) is not None and getattr(sub._diffusers_hook, "hooks", None):
                found.append(f"{name}.{sub_name or '<root>'} has diffusers hooks")
                break
        # meta: a released file-backed model (its weights are in the files again)
        if any(t.device.type not in ("cpu", "meta") for t in m.parameters()):
            found.append(f"{name} has weights on the device")
    return found
