"""Weights read from the user's safetensors files block by block: no full host copy of a model.

A file-backed model is built on the meta device and carries a ``fileindex.WeightIndex`` (per tensor:
file, byte range, file dtype, target dtype, fp8 scale) instead of weights. Placing it
(:class:`FilePlacement`, chosen by ``placement.Placed``) reads tensors with ``pread`` straight into
a few page-locked staging buffers sized for the largest block, copies each buffer to the device on
a side CUDA stream while the previous block computes, and converts dtypes there (fp16/fp32 -> bf16,
fp8 storage, ComfyUI scaled fp8): the page cache may keep the file (the kernel can drop it), the
process owns only the staging buffers plus whatever is on the device.

* ``resident``: everything read once onto the device.
* ``offload``:  tensors outside the block list stay on the device; ``acquire`` streams every block
  in, ``offload`` drops them (nothing kept on the host).
* ``stream``:   forward hooks on each block fetch it (and prefetch the next ``depth``, wrapping round
  to the first blocks for the next call) and drop it after it ran; the tensors outside the blocks
  are read when a use starts and dropped when it ends.

On a CPU device the same code runs without streams (the "device copy" is a copy of the staging
buffer), which is what the tests exercise; ``placement.place`` degrades CPU placements to resident.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from cogvid_core.model.fileindex import _assign, check_unchanged, index_of, stamps
from cogvid_core.memory.fileread import ALIGN, Layout, Reader

PREFETCH_DEPTH = 2         # blocks read ahead of the running one in ``stream`` mode
_SKIPPED = "_cogvid_blocks_skipped"   # model attribute: predicate(i) -> True for a block a step cache skips


def skipped(model: nn.Module, i: int) -> bool:
    """Block ``i`` of ``model`` is not run in the running pass (a step cache skips it): whatever a hook
    would do for it (read it from the file, quantize it for fp8) is not needed."""
    predicate = model.__dict__.get(_SKIPPED)
    return predicate is not None and predicate(i)


@contextmanager
def blocks_skipped_when(model: nn.Module, predicate):
    """Inside, a streamed block ``i`` with ``predicate(i)`` true when it is called is neither read nor
    dropped: a step cache runs none of it (its hook returns the cached result). A read already
    prefetched for it stays pending for the next pass that runs it."""
    model.__dict__[_SKIPPED] = predicate
    try:
        yield
    finally:
        model.__dict__.pop(_SKIPPED, None)


# =============================================================================== placement
class FilePlacement:
    """A file-backed model placed on ``device`` in one mode (see the module docstring)."""

    def __init__(self, model: nn.Module, blocks: nn.ModuleList | None, device, mode: str, *,
                 depth: int = PREFETCH_DEPTH, buffers: int = 2):
        index = index_of(model)
        if index is None:
            raise ValueError(f"{type(model).__name__} is not file-backed (no weight index attached)")
        self.model, self.device, self.mode, self.depth = model, torch.device(device), mode, max(1, depth)
        self._stamps = stamps(index)
        prefix = _block_prefix(model, blocks) if blocks is not None else None
        groups: dict[int, list] = {}
        outside = []
        for name, src in index.items():
            i = _block_of(name, prefix)
            (outside if i is None else groups.setdefault(i, [])).append((name, src))
        self.blocks = list(blocks) if prefix is not None else []
        self.layouts = [Layout(groups.get(i, [])) for i in range(len(self.blocks))]
        largest = max([_item_bytes(it) for it in outside] + [lay.nbytes for lay in self.layouts] + [1])
        self._reader = Reader(largest, self.device, buffers)
        self._live: dict[int, list[str]] = {}
        self._pending: dict = {}
        self._hooks: list = []
        self._ring = _Ring(max([lay.nbytes for lay in self.layouts] + [1]), self.device, 1 + self.depth)
        self._outside = [Layout(part) for part in _chunks(outside, self._reader.buffer_bytes)]
        self._outside_live: list[str] = []
        try:
            if mode != "stream":
                self._read_outside()
            if mode == "resident":          # read once: the staging buffers are not needed again
                self._fetch_all()
                self._reader.close()
        except BaseException:
            # out of memory half-way through a resident read (the 24gb workflow on an 8 GB card): nothing
            # read stays on the device, where no placement would own it and nothing could free it
            self._abandon()
            raise
        if mode == "stream":
            # also a forward outside a use (acquire) finds its embeddings
            self._hooks.append(model.register_forward_pre_hook(lambda m, a: self._read_outside()))
            for i, block in enumerate(self.blocks):
                self._hooks.append(block.register_forward_pre_hook(self._pre_hook(i)))
                self._hooks.append(block.register_forward_hook(self._post_hook(i)))

    # -- block traffic ------------------------------------------------------------------------
    def _schedule(self, i: int) -> None:
        if i not in self._live and i not in self._pending:
            dest = self._ring.take(i, self.layouts[i].nbytes) if self.mode == "stream" else None
            self._pending[i] = self._reader.submit(self.layouts[i], dest)

    def _fetch(self, i: int) -> None:
        if i in self._live:
            return
        self._schedule(i)
        tensors = self._reader.wait(self._pending.pop(i).result())
        done = []
        try:
            for name, t in tensors.items():
                _assign(self.model, name, t)
                done.append(name)
        except BaseException:          # half a block is no block: what was assigned goes back
            self._unload(done)
            raise
        self._live[i] = done

    def _unload(self, names) -> None:
        """Each named tensor back to a meta placeholder of its shape and dtype: the files keep it."""
        index = index_of(self.model)
        for name in names:
            src = index[name]
            _assign(self.model, name, torch.empty(src.shape, dtype=src.target, device="meta"))

    def _drop(self, i: int) -> None:
        self._unload(self._live.pop(i, ()))
        self._ring.give_back(i)

    def _skipped(self, i: int) -> bool:
        return skipped(self.model, i)

    def _pre_hook(self, i: int):
        def hook(module, args):
            if self._skipped(i):
                return
            self._fetch(i)
            n = len(self.blocks)
            for j in range(i + 1, i + 1 + min(self.depth, n - 1)):   # wraps: the next call starts at 0
                self._schedule(j % n)
        return hook

    def _post_hook(self, i: int):
        def hook(module, args, output):
            if not self._skipped(i):
                self._drop(i)
        return hook

    def _read_outside(self) -> None:
        if self._outside_live:
            return
        check_unchanged(self._stamps)   # a use starts here (stream) or the placement does: one stat per file
        for layout in self._outside:
            for name, t in self._reader.read_now(layout).items():
                _assign(self.model, name, t)
                self._outside_live.append(name)

    def _drop_outside(self) -> None:
        self._unload(self._outside_live)
        self._outside_live = []

    # -- Placed's calls -----------------------------------------------------------------------
    def acquire(self) -> None:
        """Offload mode: every block onto the device (the next read while the previous copies).
        Stream mode: the tensors outside the blocks (embeddings, norms, projections), read per use."""
        if self.mode == "offload":
            self._fetch_all()
        elif self.mode == "stream":
            self._read_outside()

    def _fetch_all(self) -> None:
        check_unchanged(self._stamps)   # offload: every use reads all blocks again
        n = len(self.blocks)
        for i in range(n):
            for j in range(i, min(n, i + 1 + self.depth)):
                self._schedule(j)
            self._fetch(i)

    def offload(self) -> None:
        """End of a use: no block left on the device (prefetched ones included)."""
        if self.mode == "resident":
            return
        for fut in self._pending.values():
            if fut.exception() is None:   # an error surfaces when the block is fetched for real
                self._reader.settle(fut.result())
        for i in self._pending:
            self._ring.give_back(i)
        self._pending.clear()
        for i in list(self._live):
            self._drop(i)
        self._ring.clear()
        if self.mode == "stream":
            # nothing on the device between uses: ComfyUI keeps a loaded model while the next node runs
            # (the T5's 0.25 GiB embedding stayed through denoise and decode); re-read from the page cache
            self._drop_outside()

    def _abandon(self) -> None:
        """After a failed read: queued reads cancelled, the running one finished (close waits for it and
        the device), every tensor back to a meta placeholder."""
        for fut in self._pending.values():
            fut.cancel()
        self._pending.clear()
        self._live.clear()
        self._outside_live = []
        self._reader.close()
        self._unload(index_of(self.model))

    def release(self) -> None:
        """Nothing left anywhere: hooks removed, every tensor back to a meta placeholder."""
        self.offload()
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._reader.close()
        self._unload(index_of(self.model))

    def staging_bytes(self) -> int:
        return self._reader.staging_bytes()


class _Ring:
    """The device buffers streamed blocks are read into: ``slots`` of the largest block's size, made
    at the first read of a use and reused block after block until the use ends.

    A fresh allocation per block (0.27 GB for a 1.5 transformer block) interleaved with the step's
    activations left the caching allocator's pool 1.2-1.6 GiB above the step's allocated peak
    (bench/comfyui_gpu_h200_c4_hosttiles.json). A slot is handed out only when the block that held it
    was dropped; its next copy is ordered after that block's kernels by the reader's ``allocated``
    event, recorded on the compute stream when the read is submitted. A block that is still held
    when every slot is taken (a forward that raised before its block was dropped) gets a buffer of
    its own instead: more memory, never a buffer another block is using."""

    def __init__(self, nbytes: int, device: torch.device, slots: int):
        self.nbytes, self.device, self.slots = nbytes, device, slots
        self._bufs: list[torch.Tensor] = []
        self._owner: list[int | None] = []

    def take(self, block: int, nbytes: int) -> torch.Tensor:
        if not self._bufs:
            # outside inference mode: a use under ComfyUI's inference_mode may be followed by one
            # without, and an inference tensor cannot be written to outside it
            with torch.inference_mode(False):
                self._bufs = [torch.empty(self.nbytes, dtype=torch.uint8, device=self.device)
                              for _ in range(self.slots)]
            self._owner = [None] * self.slots
        for k, owner in enumerate(self._owner):
            if owner is None:
                self._owner[k] = block
                return self._bufs[k][:nbytes]
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def give_back(self, block: int) -> None:
        self._owner = [None if o == block else o for o in self._owner]

    def clear(self) -> None:
        """End of a use: the memory goes back to the allocator for the next component."""
        self._bufs, self._owner = [], []


def _block_prefix(model: nn.Module, blocks: nn.ModuleList) -> str:
    for name, m in model.named_modules():
        if m is blocks:
            return name + "."
    raise ValueError("the block list is not part of the model")


def _block_of(name: str, prefix: str | None) -> int | None:
    if prefix is None or not name.startswith(prefix):
        return None
    return int(name[len(prefix):].split(".", 1)[0])


def _chunks(items: list, limit: int):
    """Groups of tensors that fit one staging buffer (tensors outside the blocks are read in several
    passes; one larger than a buffer gets its own)."""
    part, size = [], 0
    for item in items:
        nbytes = _item_bytes(item)
        if part and size + nbytes > limit:
            yield part
            part, size = [], 0
        part.append(item)
        size += nbytes
    if part:
        yield part


def _item_bytes(item) -> int:
    src = item[1]
    return src.nbytes + (src.scale.nbytes if src.scale is not None else 0) + 2 * ALIGN
