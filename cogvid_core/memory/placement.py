"""Where weights live and when they move.

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
calls. Which mode each component gets is a :class:`cogvid_core.memory.profiles.Profile`'s choice.
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from cogvid_core.memory import filestream
from cogvid_core.memory.fileread import ALIGN, staging_buffer, unregister
from cogvid_core.device.devmem import free_memory, module_bytes, module_tensors, trim_host_heap
from cogvid_core.memory.profiles import MODES

HOST = torch.device("cpu")
_ATTR = "_cogvid_placed"


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
        self._files = None                # file-backed model (filestream): read from its safetensors files
        self._pinned: list = []           # offload: the one page-locked buffer of the host copies
        self._unpin = None
        try:
            if filestream.index_of(module) is not None:
                # a failed read undoes itself (FilePlacement): the weights are meta placeholders again
                self._files = filestream.FilePlacement(module, self._block_list(), device, mode)
                self._on_device = mode == "resident"
            elif mode == "resident":
                module.to(device)
                self._on_device = True
                if device.type != "cpu":
                    trim_host_heap()
            elif mode == "offload":
                self._init_offload(pin)
            elif mode == "stream":
                self._init_stream(use_stream)
            else:
                raise ValueError(f"placement mode must be one of {MODES}, got {mode!r}")
        except BaseException:
            self._undo()
            raise

    def _undo(self) -> None:
        """A placement that failed half-way (out of memory moving a resident model in): no placement
        will own what it moved, so nothing of it may stay on the device. A file-backed model's read has
        already put its placeholders back (FilePlacement); an in-memory one is released as any other."""
        if filestream.index_of(self.module) is None:
            self.release()
        else:
            free_memory(self.device)

    def _block_list(self) -> nn.ModuleList | None:
        try:
            root = stream_root(self.module)
        except ValueError:
            return None
        return next(c for c in root.children() if isinstance(c, (nn.ModuleList, nn.Sequential)) and len(c) > 1)

    # -- offload ------------------------------------------------------------------------------
    def _init_offload(self, pin: bool) -> None:
        tensors = list(module_tensors(self.module))
        hosts = [t.data if t.device.type == "cpu" else t.data.to(HOST) for t in tensors]
        if pin and self.device.type == "cuda":
            hosts, self._pinned = flat_copy(hosts, pin=True)
            self._unpin = weakref.finalize(self, unregister, self._pinned)
        for t, host in zip(tensors, hosts):
            t.data = host
            self._host[t] = host
        free_memory(self.device)
        trim_host_heap()                  # the pageable copies the pinned ones replaced

    def _onload(self) -> None:
        if self._files is not None and self.mode in ("offload", "stream") and not self._on_device:
            try:
                self._files.acquire()
            except BaseException:     # out of memory half-way: the blocks read so far leave again
                self._files.offload()
                free_memory(self.device)
                raise
            self._on_device = True
        if self.mode == "offload" and not self._on_device:
            try:
                for t, host in self._host.items():
                    t.data = host.to(self.device, non_blocking=True)
            except BaseException:     # out of memory half-way: the weights copied so far leave again
                self._host_copies_back()
                raise
            self._on_device = True

    def _host_copies_back(self) -> None:
        """Offload mode: every weight is its host copy again; the device copies are freed."""
        for t, host in self._host.items():
            t.data = host
        self._on_device = False
        free_memory(self.device)

    def _offload(self) -> None:
        if self._files is not None:
            self._files.offload()         # stream: drops prefetched blocks too
            self._on_device = self.mode == "resident"
        if self.mode == "offload" and self._on_device:
            self._host_copies_back()

    # -- stream -------------------------------------------------------------------------------
    def _init_stream(self, use_stream: bool) -> None:
        from diffusers.hooks import apply_group_offloading

        root = stream_root(self.module)
        inside = {id(t) for t in module_tensors(root)}
        # weights to the host first: group offloading pins host copies and would leave device copies alive
        self.module.to(HOST)
        free_memory(self.device)
        self._outside = [t for t in module_tensors(self.module) if id(t) not in inside]
        for t in self._outside:            # e.g. nothing for T5 (shared embedding is encoder.embed_tokens)
            t.data = t.data.to(self.device)
        cuda = self.device.type == "cuda"
        # its copy stream is made on the current device: make that this placement's one
        with torch.cuda.device(self.device) if cuda else nullcontext():
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
            free_memory(self.device)

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
        if self._files is not None:       # back to meta placeholders: the files still hold the weights
            self._files.release()
        if self.mode == "stream":
            self._remove_stream()
        if self.mode == "offload":
            self._offload()
        pinned = False
        if self.device.type != "cpu" and self._files is None:
            for t in module_tensors(self.module):
                if t.device.type != "cpu":
                    t.data = t.data.to(HOST)
                elif t.data.is_pinned():   # page-locked RAM is the OS's scarcest: a released model keeps none
                    t.data = torch.empty_like(t.data, pin_memory=False).copy_(t.data)
                    pinned = True
        self._host.clear()
        if self._unpin is not None:       # after the last view of the pinned buffer left the module
            self._unpin()
        self._outside = []
        self._on_device = False
        self.released = True
        if self.module.__dict__.get(_ATTR) is self:
            del self.module.__dict__[_ATTR]
        free_memory(self.device, host_cache=pinned, workspaces=True)
        trim_host_heap()

    def device_bytes(self) -> int:
        """Bytes of this module's weights on the compute device right now."""
        if self.device.type == "cpu":
            return 0
        return module_bytes(self.module, self.device)

    def __repr__(self) -> str:
        state = "released" if self.released else ("on device" if self._on_device else "host")
        return f"Placed({type(self.module).__name__}, {self.device}, {self.mode}, {state})"


def flat_copy(hosts: list[torch.Tensor], pin: bool) -> tuple[list[torch.Tensor], list]:
    """``hosts`` copied into views of ONE host buffer, page-locked with ``pin`` (cudaHostRegister on
    ordinary memory, as filestream's staging buffers); tensors already pinned stay as they are.
    ``pin_memory()`` per tensor took 1.1 s for the 1.5 VAE's 0.4 GiB on the H200 (a new ComfyUI
    placement of the offloaded VAE: bench/comfyui_gpu_h200_c6.json, "weights_what") and torch's
    pinned allocator rounds every tensor up to a power of two (0.48 GiB). Returns the views and the
    [(buffer, registered)] list to hand to ``fileread.unregister`` before the buffer is freed."""
    todo = [i for i, h in enumerate(hosts) if not (pin and h.is_pinned())]
    offsets, total = [], 0
    for i in todo:
        total = -(-total // ALIGN) * ALIGN
        offsets.append(total)
        total += hosts[i].numel() * hosts[i].element_size()
    buf, registered = staging_buffer(total, pin)
    out = list(hosts)
    for i, at in zip(todo, offsets):
        h = hosts[i]
        view = buf[at:at + h.numel() * h.element_size()].view(h.dtype).view(h.shape)
        out[i] = view.copy_(h)
    return out, [(buf, registered)]


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
    """Release the module's placement (or just move it to the host when it has none; a file-backed
    module without one holds no weights at all)."""
    p = placed_of(module)
    if p is not None:
        p.release()
        return
    if filestream.index_of(module) is not None:   # never placed: meta placeholders, nothing to move
        return
    device = next((t.device for t in module_tensors(module)), HOST)
    module.to(HOST)
    free_memory(device)
