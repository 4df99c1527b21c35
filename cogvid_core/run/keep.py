"""Nothing lost: sampled latents kept in a file when what comes after sampling fails, and read back.

A 1.5 video samples for tens of minutes on a consumer card; the decode and the write that follow can
still fail (out of memory, a full disk, Ctrl-C). The latents are small (1.5 at 81x768x1360: ~23 MB in
fp32) and decoding them again needs only the VAE, so they go to ``<out>.latents.safetensors`` with the
settings the decode needs, and ``i2v --from-latents`` decodes them to the same frames.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from cogvid_core.model.tiles import TileSpec
from cogvid_core.model.vae import VideoLatents

FORMAT = "cogvid-latents/1"
SUFFIX = ".latents.safetensors"


def latents_path(out: Path) -> Path:
    """Where the latents of a run writing ``out`` go: beside it (a PNG folder's: beside the folder)."""
    out = Path(out)
    return out.with_name(out.name.rstrip("/") + SUFFIX)


def check_writable(out: Path) -> None:
    """Fail before any model loads when ``out`` cannot be written (a missing drive, a read-only folder,
    a file where a folder is asked): the error arrives in a second, not after sampling."""
    out = Path(out)
    folder = out.parent if out.suffix.lower() == ".mp4" else out
    if out.suffix.lower() == ".mp4" and out.is_dir():
        raise ValueError(f"--out {out} is a folder: give a file name ending in .mp4, or another name for PNG frames")
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--out {out}: {folder} exists and is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".cogvid-write-check-"):
            pass
    except OSError as e:
        raise ValueError(f"--out {out}: cannot write in {folder} ({e.strerror or e}): pick a folder you can "
                         "write to") from e


def save(latents: VideoLatents, path: Path, tile: TileSpec | None, settings: dict | None = None) -> Path:
    """Write the latents and what decoding them needs; when ``path`` cannot be written (the disk that just
    filled up), the system's temp folder. Returns where they went."""
    from safetensors.torch import save_file

    meta = {"format": FORMAT, "variant": latents.variant_key, "frames": str(latents.frames),
            "height": str(latents.height), "width": str(latents.width), "fps": str(latents.fps),
            "drop_first": str(latents.drop_first),
            "tile": json.dumps(None if tile is None else [tile.height, tile.width, tile.overlap]),
            "settings": json.dumps(settings or {}, default=str)}
    tensors = {"samples": latents.samples.detach().to("cpu").contiguous()}
    for target in (Path(path), Path(tempfile.gettempdir()) / Path(path).name):
        tmp = target.with_name(f".{target.name}.partial")
        try:
            save_file(tensors, str(tmp), metadata=meta)
            os.replace(tmp, target)
            return target
        except OSError:
            tmp.unlink(missing_ok=True)
    raise OSError(f"could not write the latents to {path} nor to the temp folder")


def load(path: Path) -> tuple[VideoLatents, TileSpec | None, dict]:
    """(latents, the decode tile of the run that sampled them, its settings) from :func:`save`'s file."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--from-latents {path}: file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            samples = f.get_tensor("samples") if "samples" in f.keys() else None
    except (SafetensorError, OSError) as e:
        raise ValueError(f"--from-latents {path.name} is truncated or not a safetensors file ({e})") from e
    if meta.get("format") != FORMAT or samples is None:
        raise ValueError(f"--from-latents {path.name} is not a latents file this pack wrote (no '{FORMAT}' "
                         "header): give the <out>.latents.safetensors an interrupted run left")
    lat = VideoLatents(samples=samples, frames=int(meta["frames"]), height=int(meta["height"]),
                       width=int(meta["width"]), variant_key=meta["variant"], fps=int(meta["fps"]),
                       drop_first=int(meta["drop_first"]))
    tile = json.loads(meta.get("tile", "null"))
    return lat, (None if tile is None else TileSpec(*tile)), json.loads(meta.get("settings", "{}"))


def kept_message(path: Path, argv_hint: str) -> str:
    return (f"the sampled latents are kept in {path}: decode them without sampling again with "
            f"`python -m cogvid_core i2v {argv_hint} --from-latents {path} --out OUT`")
