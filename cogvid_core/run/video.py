"""Frames <-> files. Frames are float tensors [T, H, W, 3] in 0..1 (ComfyUI's IMAGE layout)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected frames shaped [T, H, W, 3], got {tuple(frames.shape)}")
    return (frames.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)).cpu().numpy()


def write_mp4(frames: torch.Tensor, path, fps: float, crf: int = 17) -> Path:
    """Write an H.264 mp4 through imageio-ffmpeg; a temp name + rename so no half file is left."""
    import imageio_ffmpeg

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = to_uint8(frames)
    t, h, w, _ = data.shape
    tmp = path.with_name(f".{path.stem}.partial{path.suffix}")
    # yuv420p needs even sides; pad by edge replication rather than resampling the frames
    ph, pw = h % 2, w % 2
    if ph or pw:
        data = np.pad(data, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")
    writer = imageio_ffmpeg.write_frames(str(tmp), (w + pw, h + ph), fps=float(fps), codec="libx264",
                                         pix_fmt_out="yuv420p", quality=None,
                                         output_params=["-crf", str(crf)], macro_block_size=1)
    try:
        writer.send(None)
        for frame in data:
            writer.send(np.ascontiguousarray(frame))
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    writer.close()
    os.replace(tmp, path)
    return path


def write_pngs(frames: torch.Tensor, folder) -> list[Path]:
    """Lossless frames, one PNG each, named frame_00000.png..."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, frame in enumerate(to_uint8(frames)):
        p = folder / f"frame_{i:05d}.png"
        tmp = folder / f".frame_{i:05d}.partial.png"
        Image.fromarray(frame).save(tmp)
        os.replace(tmp, p)
        paths.append(p)
    return paths


def read_mp4(path) -> np.ndarray:
    """Decode an mp4 into uint8 [T, H, W, 3] (used by tests and tools)."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path))
    meta = reader.__next__()
    w, h = meta["size"]
    frames = [np.frombuffer(f, dtype=np.uint8).reshape(h, w, 3) for f in reader]
    return np.stack(frames)
