"""Host RAM a plan needs per stage: what the process owns, and the file pages it would like cached.

``owned`` is anonymous + pinned memory (what the kernel cannot take back: issue 12's measure);
``file`` is the bytes of safetensors files the stage reads block by block, which the page cache
would like to keep (the kernel drops them under pressure: the run then reads from disk, slower).
The transformer and T5 are file-backed (``loading``'s default): on the host they own only the two
staging buffers ``filestream`` reads blocks through. The VAE is loaded into memory; in ``offload``
it stays there pinned. Every term says which measurement it comes from.
"""
from __future__ import annotations

from functools import lru_cache

from cogvid_core.device.devmem import GiB, precision_bytes
from cogvid_core.memory.fileread import ALIGN
from cogvid_core.model.sizes import weight_bytes
from cogvid_core.model.stages import COMPONENT_OF_STAGE, STAGES

# The process with CUDA initialised and the libraries' host state of a first GPU stage, no model
# placed: the text encode (base + the T5's staging buffers, 0.72 GiB, and nothing else) measured
# 1.71-1.73 GiB anon + pinned in the four file-backed H200 runs of this code (bench/hostrun_h200_c5.json
# both recipes, the 12gb command line of bench/comfyui_gpu_h200_c5_ring.json, bench/hostrun_h200_cold.txt).
# (0.85 GiB, read after a release in bench/hostmem_h200_run2.json, left every stage 8-12% low.)
BASE_BYTES = int(1.00 * GiB)
# filestream.FilePlacement's staging buffers, each sized for the largest block: their page-locked
# bytes are the compute-time rise of a file-backed model (t5_file_stream: staging_gib 0.72, peak
# anon+pinned 1.67 GiB vs 0.95 after release; tr_file_offload: 0.49 and 1.30 vs 0.80; same files).
STAGING_BUFFERS = 2
# Host memory CUDA's convolution libraries (cuDNN) keep from the first convolution on, whatever the
# placement: diffusers' everything-resident run rises 0.16 GiB from its text encode to its image encode,
# where nothing else is added on the host; ours 0.14 GiB beyond the VAE's pinned copy
# (bench/hostrun_h200.json, stages of diffusers-resident and ours-auto@6).
CONV_LIBS_BYTES = int(0.15 * GiB)
# Staging holds the file's bytes: assumed stored at the run's precision, fp8 runs from a bf16 file.
_MIN_FILE_BYTES = 2


@lru_cache(maxsize=None)
def _vae_tensor_bytes(variant_key: str, precision: str, tiny: bool) -> tuple[int, ...]:
    import torch
    from diffusers import AutoencoderKLCogVideoX

    from cogvid_core.model.variants import VARIANTS, vae_config

    with torch.device("meta"):
        vae = AutoencoderKLCogVideoX(**vae_config(VARIANTS[variant_key], tiny))
    b = precision_bytes(precision)
    return tuple(t.numel() * (b if t.is_floating_point() else t.element_size())
                 for t in [*vae.parameters(), *vae.buffers()])


def pinned_vae_bytes(variant_key: str, precision: str, tiny: bool = False) -> int:
    """The VAE's pinned host copy in ``offload``: one page-locked buffer holding every tensor at a
    fileread.ALIGN-byte alignment (placement.flat_copy)."""
    return sum(-(-n // ALIGN) * ALIGN for n in _vae_tensor_bytes(variant_key, precision, tiny))


def pageable_vae_bytes(variant_key: str, precision: str, tiny: bool = False) -> int:
    """The VAE as loaded (loading.load_vae is eager), and as a released placement leaves it: pageable."""
    return sum(_vae_tensor_bytes(variant_key, precision, tiny))


def staging_bytes(size, precision: str) -> int:
    """Two buffers of the largest block (or larger single tensor outside the blocks)."""
    per = max(precision_bytes(precision), _MIN_FILE_BYTES)
    return STAGING_BUFFERS * max(size.block_params, size.largest_layer) * per


def decode_host_bytes(video_bytes: int, tiled: bool = True) -> int:
    """``video_bytes``: the decoded video in the VAE's 2-byte dtype. The float32 frames (twice that) are
    allocated once and filled a few frames at a time; tiled, tiles come to the host one by one and are
    written into the frames with the edges the next tiles blend with; untiled, the whole video comes
    to the host first. bench/decode_host_cpu.json (81x768x1360): tiled 1.16 GiB at 360x240 tiles, 1.10
    at 240x160, for 0.95 GiB of frames (2.37 GiB when the whole video was widened at once)."""
    return 2 * video_bytes + (video_bytes // 2 if tiled else video_bytes)


def host_stages(sizes: dict, precision: dict, modes: dict, variant_key: str, keep_loaded: bool,
                video_bytes: int, tiny: bool = False, tiled: bool = True) -> dict[str, tuple[int, int]]:
    """{stage: (owned bytes, file bytes)}. ``modes``: placement mode per component; a file is assumed
    the size of the weights at the run's precision (sizes.weight_bytes)."""
    vae_pinned = pinned_vae_bytes(variant_key, precision["vae"], tiny) if modes["vae"] == "offload" else 0
    vae_pageable = pageable_vae_bytes(variant_key, precision["vae"], tiny)
    out = {}
    for i, stage in enumerate(STAGES):
        active = COMPONENT_OF_STAGE[stage]
        owned, file = BASE_BYTES, 0
        for comp in ("transformer", "text_encoder"):
            # placed models keep their readers (and staging) between uses unless resident
            kept = keep_loaded and modes[comp] != "resident"
            if comp == active or kept:
                owned += staging_bytes(sizes[comp], precision[comp])
            if comp == active and modes[comp] != "resident":
                file += weight_bytes(sizes[comp], precision[comp])   # read at every use
        # placed (kept loaded, or in its own stages): pinned in offload, on the GPU when resident. The
        # pipeline loads it after the text encode and releases it between its two stages: a released
        # placement keeps the weights pageable on the host (the CLI's denoise held 0.4 GiB more than
        # estimated in both plans: bench/hostrun_h200_c5.json, stage "denoise")
        if keep_loaded or active == "vae":
            owned += vae_pinned
        elif i >= STAGES.index("image_encode"):
            owned += vae_pageable
        if i >= STAGES.index("image_encode"):
            owned += CONV_LIBS_BYTES
        if stage == "decode":
            owned += decode_host_bytes(video_bytes, tiled)
        out[stage] = (owned, file)
    return out


def verdict(needed: int, available: int | None, file_bytes: int = 0) -> str:
    """Does this machine's RAM hold the plan's peak host memory (and the files it re-reads)."""
    if available is None:
        return f"host RAM: needs ~{needed / GiB:.2f} GiB (anonymous + pinned); available: unknown"
    if needed > available:
        return (f"host RAM: needs ~{needed / GiB:.2f} GiB (anonymous + pinned) but only {available / GiB:.1f} GiB "
                "available: close other programs, or use the 'lowvram' profile")
    line = f"host RAM: needs ~{needed / GiB:.2f} GiB (anonymous + pinned), {available / GiB:.1f} GiB available: enough"
    if needed + file_bytes > available:
        line += (f"; too little to cache the {file_bytes / GiB:.1f} GiB of weights a stage re-reads: they come "
                 "from disk at every use (each step then waits on the disk)")
    return line
