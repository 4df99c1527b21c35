"""Named memory profiles and the decode/encode tile rule: what a run may change, as data.

A :class:`Profile` bundles each component's placement mode (``resident`` / ``offload`` / ``stream``,
see :mod:`cogvid_core.memory.placement`) with the CFG mode and the activation savers of
:mod:`cogvid_core.memory.activations`; :data:`PROFILES` holds the shipped ones. ``"auto"`` is not a
profile but the request to pick one from a VRAM budget (:func:`cogvid_core.plan.planner.resolve_profile`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from cogvid_core.model.variants import SPATIAL_COMPRESSION  # noqa: F401
from cogvid_core.model.tiles import TileSpec, check_tile, exact_overlap, snap_tile, tile_is_exact  # noqa: F401  (re-exported)

AUTO = "auto"
MODES = ("resident", "offload", "stream")
CFG_MODES = ("batched", "sequential")


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
    # the start image's encode in strips of rows (model/vae_strips.py): the untiled encode's latent without its
    # ~6 GiB peak at 1360x768. The name is kept for saved plans; the tiled encode it once chose blended tiles.
    encode_tiled: bool = False

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
                        "feed-forward, low-memory RoPE, image encode in strips (the same latent)", encode_tiled=True),
)}



def get_profile(name: str | Profile) -> Profile:
    if isinstance(name, Profile):
        if name.vae_tile is not None:
            name = dataclasses.replace(name, vae_tile=snap_tile(name.vae_tile))
        return name.validate()
    if name not in PROFILES:
        raise ValueError(f"unknown placement profile {name!r}; known: {', '.join([*PROFILES, AUTO])}")
    return PROFILES[name]
