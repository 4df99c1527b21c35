"""Where weights live and when they move; placement profiles.

Three placement modes for one module (transformer, T5 encoder or VAE):

* ``resident``: moved to the compute device once and kept there.
* ``offload``:  kept in (pinned) host memory; copied to the device when a ``use()`` block starts
  (or ``acquire()``), dropped from the device when it ends. The host copy is kept, so going back
  costs no device-to-host copy (inference never changes weights).
* ``stream``:   diffusers group offloading at block level (``apply_group_offloading``,
  ``num_blocks_per_group=1``, ``use_stream=True``): weights stay in pinned host memory and each
  block is copied in just before it runs while the previous one computes, on a side CUDA stream.
  For T5 the hooks go on ``text_encoder.encoder`` (its ``block`` list), where block-level grouping
  finds the 24 layers (on the whole ``T5EncoderModel`` it finds none).

API::

    placed = place(module, device, mode)     # idempotent per module
    with placed.use():                       # weights computable on placed.device inside
        ...
    placed.release()                         # nothing left on the device, hooks removed

On a CPU device every mode degrades to ``resident`` (nothing to save), so CPU runs take the same
calls. A :class:`Profile` bundles the three modes with the CFG mode and the activation savers of
:mod:`cogvid_core.activations`; :data:`PROFILES` holds the named ones and
:func:`resolve_profile` turns ``"auto"`` into one from a VRAM budget via ``estimate.plan``.
"""
from __future__ import annotations

import dataclasses
import gc
import logging
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .activations import set_ff_chunking, set_low_mem_attention
from .vae import TileSpec

log = logging.getLogger(__name__)

MODES = ("resident", "offload", "stream")
CFG_MODES = ("batched", "sequential")
HOST = torch.device("cpu")
_ATTR = "_cogvid_placed"


# ---------------------------------------------------------------------------------------------
# Decode tiles and profiles
# ---------------------------------------------------------------------------------------------
def tile_is_exact(size: int, overlap: float, spatial: int = 8) -> bool:
    """Whether diffusers' CogVideoX tiled encode/decode reassembles exactly ``size`` pixels per tile
    step along one axis for this overlap. When the latent stride and the kept sample rows disagree
    (e.g. 360 px at overlap 1/6: stride 37 latents = 296 px, kept 300 px), the output grows
    (1360 -> 1376 px) or the encoded latent gets an extra column (90 -> 91) and sampling fails."""
    lat = size // spatial
    decode_ok = int(lat * (1 - overlap)) * spatial == size - int(size * overlap)
    encode_ok = int(size * (1 - overlap)) == spatial * (lat - int(lat * overlap))
    return size % spatial == 0 and decode_ok and encode_ok


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
                raise ValueError(f"profile {self.name}: vae_tile must be a vae.TileSpec or None")
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
AUTO = "auto"



def get_profile(name: str | Profile) -> Profile:
    if isinstance(name, Profile):
        if name.vae_tile is not None:
            name = dataclasses.replace(name, vae_tile=snap_tile(name.vae_tile))
        return name.validate()
    if name not in PROFILES:
        raise ValueError(f"unknown placement profile {name!r}; known: {', '.join([*PROFILES, AUTO])}")
    return PROFILES[name]


def resolve_profile(name: str | Profile, budget_bytes: int | None = None, estimate_fn=None, *,
                    variant=None, frames: int | None = None, height: int | None = None, width: int | None = None,
                    device=None, budget_gib: float | None = None, precision: dict | None = None) -> Profile:
    """A named profile, or for ``"auto"`` the fastest profile that fits the VRAM budget.

    ``estimate_fn(budget_bytes) -> Profile`` overrides the choice (tests, other planners); by default
    ``estimate.plan(variant, frames, height, width, budget_bytes, precision)`` picks. The budget is
    ``budget_bytes``, else ``budget_gib``, else the device's free memory (``estimate.gpu_budget``).
    On a CPU device ``auto`` is ``resident``.
    """
    if not (isinstance(name, str) and name == AUTO):
        return get_profile(name)
    dev = torch.device(device) if device is not None else None
    if budget_bytes is None and budget_gib is not None:
        budget_bytes = int(budget_gib * 1024 ** 3)
    if budget_bytes is None:
        if dev is None or dev.type == "cpu" or not torch.cuda.is_available():
            return PROFILES["resident"]
        from .estimate import gpu_budget
        budget_bytes = gpu_budget(dev)
        if budget_bytes is None:
            return PROFILES["resident"]
    if estimate_fn is not None:
        return get_profile(estimate_fn(budget_bytes))
    if variant is None or frames is None or height is None or width is None:
        raise ValueError("profile 'auto' needs the variant, frames, height and width to pick from a budget")
    from .estimate import plan
    prof, est = plan(variant, frames, height, width, budget_bytes, precision)
    if getattr(prof, "vae_tile", None) is not None:        # derived candidates may carry inexact tiles
        prof = dataclasses.replace(prof, vae_tile=snap_tile(prof.vae_tile))
    log.info("auto placement: %s (estimated peak %.1f GiB of %.1f GiB)", prof.name,
             getattr(est, "peak_reserved", 0) / 1024 ** 3, budget_bytes / 1024 ** 3)
    return get_profile(prof)


def apply_profile(transformer: nn.Module, profile: Profile | str) -> Profile:
    """Set the profile's activation savers on a CogVideoX transformer (and undo those it lacks)."""
    profile = get_profile(profile)
    set_ff_chunking(transformer, profile.ff_chunk)
    set_low_mem_attention(transformer, profile.low_mem_attention, profile.attn_head_chunk)
    return profile


# ---------------------------------------------------------------------------------------------
# Placement
# ---------------------------------------------------------------------------------------------
def _tensors(module: nn.Module):
    seen = set()
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            yield t


def _empty_cache(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


def stream_root(module: nn.Module) -> nn.Module:
    """The submodule whose direct children include the block list group offloading should split:
    the module itself (CogVideoX transformer: ``transformer_blocks``) or its ``encoder`` (T5)."""
    def has_blocks(m):
        return any(isinstance(c, (nn.ModuleList, nn.Sequential)) and len(c) > 1 for c in m.children())
    if has_blocks(module):
        return module
    enc = getattr(module, "encoder", None)
    if isinstance(enc, nn.Module) and has_blocks(enc):
        return enc
    raise ValueError(f"{type(module).__name__} has no block list to stream; use 'offload' or 'resident'")


class Placed:
    """One module placed on a compute device in one mode. Get it from :func:`place`."""

    def __init__(self, module: nn.Module, device: torch.device, mode: str, requested: str, *,
                 pin: bool = True, use_stream: bool = True):
        self.module = module
        self.device = device
        self.mode = mode                  # effective mode
        self.requested = requested        # what the caller asked for (differs on CPU)
        self.released = False
        self._host: dict = {}             # offload: tensor -> host copy
        self._on_device = False
        self._root: nn.Module | None = None
        self._outside: list = []          # stream: tensors outside the streamed root (kept resident)
        if mode == "resident":
            module.to(device)
            self._on_device = True
        elif mode == "offload":
            self._init_offload(pin)
        elif mode == "stream":
            self._init_stream(use_stream)
        else:
            raise ValueError(f"placement mode must be one of {MODES}, got {mode!r}")

    # -- offload ------------------------------------------------------------------------------
    def _init_offload(self, pin: bool) -> None:
        for t in _tensors(self.module):
            host = t.data if t.device.type == "cpu" else t.data.to(HOST)
            if pin and self.device.type == "cuda" and not host.is_pinned():
                host = host.pin_memory()
            t.data = host
            self._host[t] = host
        _empty_cache(self.device)

    def _onload(self) -> None:
        if self.mode == "offload" and not self._on_device:
            for t, host in self._host.items():
                t.data = host.to(self.device, non_blocking=True)
            self._on_device = True

    def _offload(self) -> None:
        if self.mode == "offload" and self._on_device:
            for t, host in self._host.items():
                t.data = host
            self._on_device = False
            _empty_cache(self.device)

    # -- stream -------------------------------------------------------------------------------
    def _init_stream(self, use_stream: bool) -> None:
        from diffusers.hooks import apply_group_offloading

        root = stream_root(self.module)
        inside = {id(t) for t in _tensors(root)}
        # weights to the host first: group offloading pins host copies and would leave device copies alive
        self.module.to(HOST)
        _empty_cache(self.device)
        self._outside = [t for t in _tensors(self.module) if id(t) not in inside]
        for t in self._outside:            # e.g. nothing for T5 (shared embedding is encoder.embed_tokens)
            t.data = t.data.to(self.device)
        cuda = self.device.type == "cuda"
        apply_group_offloading(root, onload_device=self.device, offload_device=HOST, offload_type="block_level",
                               num_blocks_per_group=1, use_stream=bool(use_stream and cuda),
                               non_blocking=cuda)
        self._root = root

    def _remove_stream(self) -> None:
        from diffusers.hooks import HookRegistry
        from diffusers.hooks import group_offloading as go

        root = self._root
        if root is None:
            return
        registry = HookRegistry.check_if_exists_or_initialize(root)
        for name in (go._GROUP_OFFLOADING, go._LAYER_EXECUTION_TRACKER, go._LAZY_PREFETCH_GROUP_OFFLOADING):
            registry.remove_hook(name, recurse=True)
        self._root = None

    # -- public -------------------------------------------------------------------------------
    def acquire(self) -> nn.Module:
        """Make the module computable on ``self.device`` (offload: copy weights in); returns it.
        Pair with :meth:`offload` (or use :meth:`use`)."""
        if self.released:
            raise RuntimeError("this placement was released; call place() again")
        self._onload()
        return self.module

    def offload(self) -> None:
        """End of a use: offload mode drops the device copy; every mode frees cached device blocks."""
        self._offload()
        if self.mode != "offload":
            _empty_cache(self.device)

    @contextmanager
    def use(self):
        """Weights computable on ``self.device`` inside the block; offload mode moves them back after."""
        module = self.acquire()
        try:
            yield module
        finally:
            self.offload()

    def release(self) -> None:
        """Nothing of this module left on the device: hooks removed, weights in host memory."""
        if self.released:
            return
        if self.mode == "stream":
            self._remove_stream()
        if self.mode == "offload":
            self._offload()
        if self.device.type != "cpu":
            for t in _tensors(self.module):
                if t.device.type != "cpu":
                    t.data = t.data.to(HOST)
        self._host.clear()
        self._outside = []
        self._on_device = False
        self.released = True
        if self.module.__dict__.get(_ATTR) is self:
            del self.module.__dict__[_ATTR]
        _empty_cache(self.device)

    def device_bytes(self) -> int:
        """Bytes of this module's weights on the compute device right now."""
        if self.device.type == "cpu":
            return 0
        return sum(t.numel() * t.element_size() for t in _tensors(self.module) if t.device.type == self.device.type)

    def __repr__(self) -> str:
        state = "released" if self.released else ("on device" if self._on_device else "host")
        return f"Placed({type(self.module).__name__}, {self.device}, {self.mode}, {state})"


def place(module: nn.Module, device, mode: str, *, pin: bool = True, use_stream: bool = True,
          degrade_on_cpu: bool = True) -> Placed:
    """Place ``module`` for computing on ``device`` in ``mode`` (see the module docstring).

    Idempotent: placing a module again the same way returns the same :class:`Placed`; placing it
    another way releases the old placement first. On a CPU device every mode is ``resident`` unless
    ``degrade_on_cpu=False`` (tests: real offload copies / group-offload hooks without streams).
    """
    if mode not in MODES:
        raise ValueError(f"placement mode must be one of {MODES}, got {mode!r}")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    effective = "resident" if (device.type == "cpu" and degrade_on_cpu) else mode
    old = module.__dict__.get(_ATTR)
    if old is not None and not old.released:
        if old.device == device and old.mode == effective:
            return old
        old.release()
    placed = Placed(module, device, effective, mode, pin=pin, use_stream=use_stream)
    object.__setattr__(module, _ATTR, placed)
    return placed


def placed_of(module: nn.Module) -> Placed | None:
    p = module.__dict__.get(_ATTR)
    return p if p is not None and not p.released else None


def unplace(module: nn.Module) -> None:
    """Release the module's placement (or just move it to the host when it has none)."""
    p = placed_of(module)
    if p is not None:
        p.release()
        return
    device = next((t.device for t in _tensors(module)), HOST)
    module.to(HOST)
    _empty_cache(device)
