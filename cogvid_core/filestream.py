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

import os
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn

from .fileindex import TensorSource, _assign, index_of
from .models import CheckpointError

ALIGN = 64
_PIECE = 32 * 2 ** 20      # bytes per pread: a block is read by several threads at once
PREFETCH_DEPTH = 2         # blocks read ahead of the running one in ``stream`` mode


# =============================================================================== reading
class _Layout:
    """Where each tensor of one group (a block, or everything outside the blocks) sits in a staging
    buffer: file ranges merged into runs read with one ``pread`` each."""

    def __init__(self, items: list[tuple[str, TensorSource]]):
        self.items = items
        srcs = {(s.path, s.start): s for _, s in items}
        srcs.update({(s.scale.path, s.scale.start): s.scale for _, s in items if s.scale is not None})
        self.offset, self.runs, pos = {}, [], 0
        for key in sorted(srcs):
            s = srcs[key]
            last = self.runs[-1] if self.runs else None
            at = None if last is None else last[3] + (s.start - last[1])
            if last is None or last[0] != s.path or s.start != last[1] + last[2] or at % ALIGN:
                pos = -(-pos // ALIGN) * ALIGN
                self.runs.append([s.path, s.start, 0, pos])
                at = pos
            self.runs[-1][2] += s.nbytes
            self.offset[key] = at
            pos = at + s.nbytes
        self.nbytes = pos


def _pread_into(fd: int, dst: torch.Tensor, offset: int, name: str) -> None:
    view, got = memoryview(dst.numpy()), 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n <= 0:
            raise CheckpointError(f"{name} ends early (byte {offset + got}): the file is truncated; download it again")
        got += n


def _raw(flat: torch.Tensor, at: int, s: TensorSource) -> torch.Tensor:
    return flat[at:at + s.nbytes].view(s.dtype).view(s.shape)


def _convert(flat: torch.Tensor, layout: _Layout, s: TensorSource) -> torch.Tensor:
    """``loading.load_weights``' own arithmetic (dequantise, saturate, cast), done where ``flat`` is."""
    from .tensors import cast as _cast, dequantised as _dequantised

    scale = None if s.scale is None else _raw(flat, layout.offset[(s.scale.path, s.scale.start)], s.scale)
    # a view of ``flat`` when nothing changes: fine, blocks are dropped whole
    return _cast(_dequantised(_raw(flat, layout.offset[(s.path, s.start)], s), scale), s.target, flat.device)


def staging_buffer(nbytes: int, pin: bool) -> tuple[torch.Tensor, bool]:
    """A host buffer; page-locked through cudaHostRegister on ordinary (anonymous) memory, so it is
    counted in RssAnon and never rounded up to a power of two like torch's pinned allocator does."""
    buf = torch.empty(max(nbytes, 1), dtype=torch.uint8)
    if pin:
        rc = torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), buf.numel(), 0)
        if int(getattr(rc, "value", rc)) != 0:
            return torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=True), False
        return buf, True
    return buf, False


def unregister(bufs: list) -> None:
    """Unpin the staging buffers before their memory goes back to malloc: a range freed while still
    registered makes the next cudaHostRegister at that address fail (cudaErrorHostMemoryAlreadyRegistered)."""
    for buf, registered in bufs:
        if registered:
            torch.cuda.cudart().cudaHostUnregister(buf.data_ptr())
    bufs.clear()


class _Reader:
    """Reads groups of tensors from files onto a device through ``buffers`` staging buffers.

    One worker thread per reader takes the groups in order: it has ``io_threads`` threads ``pread``
    32 MiB pieces into the staging buffer (reads release the GIL), then queues the host-to-device
    copy on a side stream; the caller's :meth:`wait` makes its stream wait for the copy and converts
    dtypes there. A staging buffer is reused only after the copy out of it finished (its event).

    The device buffer of a group is allocated on the CALLER's stream when the group is submitted, and
    its tensors are only ever freed there: nothing is ``record_stream``-ed. Under torch's
    cudaMallocAsync backend (ComfyUI's default) memory used on two streams is freed on a "unifier"
    stream and is reusable only once the host sees that stream's work done, so while the host ran ahead
    every streamed block took fresh memory: the pool reached 35.8 GiB for 4.9 GiB allocated in the
    12 GB workflow (bench/comfyui_gpu_h200_c2.json)."""

    def __init__(self, size: int, device: torch.device, buffers: int, io_threads: int = 4):
        self.device = device
        self.cuda = device.type == "cuda"
        self.buffer_bytes = max(size, 1)
        self._bufs = [staging_buffer(size, self.cuda) for _ in range(max(1, buffers))]
        # also when a reader is dropped without close() (an error left its placement behind)
        self._unpin = weakref.finalize(self, unregister, self._bufs)
        self._free: list = [None] * len(self._bufs)
        self._next = 0
        self._fds: dict[str, int] = {}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="cogvid-filestream")
        # one thread copying from the page cache reached ~5 GB/s on the H200 machine: T5 blocks (little
        # compute per byte) then wait on the reads
        self._io = ThreadPoolExecutor(max(1, io_threads), thread_name_prefix="cogvid-pread")
        self.side = torch.cuda.Stream(device) if self.cuda else None

    def staging_bytes(self) -> int:
        return sum(b.numel() for b, _ in self._bufs)

    def submit(self, layout: _Layout, dest: torch.Tensor | None = None):
        """Start reading ``layout`` (into ``dest`` when given); call from the thread whose current
        stream will use the tensors. A new destination is made here, in the caller's grad / inference
        mode (ComfyUI runs nodes under ``torch.inference_mode``: the worker's copy into it then runs in
        the same mode)."""
        k, self._next = self._next, (self._next + 1) % len(self._bufs)
        if dest is None:
            dest = torch.empty(layout.nbytes, dtype=torch.uint8, device=self.device)
        allocated, inference = None, torch.is_inference_mode_enabled()
        if self.cuda:
            allocated = torch.cuda.Event()
            allocated.record(torch.cuda.current_stream(self.device))
        return self._pool.submit(self._read, layout, k, dest, allocated, inference)

    def read_now(self, layout: _Layout) -> dict[str, torch.Tensor]:
        return self.wait(self.submit(layout).result())

    def settle(self, read) -> None:
        """The current stream waits for a read's copy: its buffer may then be freed there unused."""
        if read[2] is not None:
            torch.cuda.current_stream(self.device).wait_event(read[2])

    def wait(self, read) -> dict[str, torch.Tensor]:
        """The tensors of a finished read, safe to use (and to free) on the current stream."""
        self.settle(read)
        flat, layout, _ = read
        return {n: _convert(flat, layout, s) for n, s in layout.items}

    def _fd(self, path: str) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def _read(self, layout: _Layout, k: int, dest, allocated, inference: bool):
        buf, _ = self._bufs[k]
        if layout.nbytes > buf.numel():
            raise ValueError(f"{layout.nbytes} bytes do not fit a {buf.numel()}-byte staging buffer")
        if self._free[k] is not None:
            self._free[k].synchronize()
        pieces = [(self._fd(path), start + a, at + a, min(_PIECE, nbytes - a), Path(path).name)
                  for path, start, nbytes, at in layout.runs for a in range(0, nbytes, _PIECE)]
        list(self._io.map(lambda p: _pread_into(p[0], buf[p[2]:p[2] + p[3]], p[1], p[4]), pieces))
        host = buf[:layout.nbytes]
        with torch.inference_mode(inference):
            if not self.cuda:
                dest.copy_(host)
                return dest, layout, None
            with torch.cuda.device(self.device), torch.cuda.stream(self.side):
                self.side.wait_event(allocated)
                dest.copy_(host, non_blocking=True)
                copied = torch.cuda.Event()
                copied.record(self.side)
        self._free[k] = copied
        return dest, layout, copied

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._io.shutdown(wait=True)
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self._unpin()
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}


# =============================================================================== placement
class FilePlacement:
    """A file-backed model placed on ``device`` in one mode (see the module docstring)."""

    def __init__(self, model: nn.Module, blocks: nn.ModuleList | None, device, mode: str, *,
                 depth: int = PREFETCH_DEPTH, buffers: int = 2):
        index = index_of(model)
        if index is None:
            raise ValueError(f"{type(model).__name__} is not file-backed (no weight index attached)")
        self.model, self.device, self.mode, self.depth = model, torch.device(device), mode, max(1, depth)
        prefix = _block_prefix(model, blocks) if blocks is not None else None
        groups: dict[int, list] = {}
        outside = []
        for name, src in index.items():
            i = _block_of(name, prefix)
            (outside if i is None else groups.setdefault(i, [])).append((name, src))
        self.blocks = list(blocks) if prefix is not None else []
        self.layouts = [_Layout(groups.get(i, [])) for i in range(len(self.blocks))]
        largest = max([_item_bytes(it) for it in outside] + [lay.nbytes for lay in self.layouts] + [1])
        self._reader = _Reader(largest, self.device, buffers)
        self._live: dict[int, list[str]] = {}
        self._pending: dict = {}
        self._hooks: list = []
        self._ring = _Ring(max([lay.nbytes for lay in self.layouts] + [1]), self.device, 1 + self.depth)
        self._outside = [_Layout(part) for part in _chunks(outside, self._reader.buffer_bytes)]
        self._outside_live: list[str] = []
        if mode != "stream":
            self._read_outside()
        if mode == "resident":          # read once: the staging buffers are not needed again
            self._fetch_all()
            self._reader.close()
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
        for name, t in tensors.items():
            _assign(self.model, name, t)
        self._live[i] = list(tensors)

    def _unload(self, names) -> None:
        """Each named tensor back to a meta placeholder of its shape and dtype: the files keep it."""
        index = index_of(self.model)
        for name in names:
            src = index[name]
            _assign(self.model, name, torch.empty(src.shape, dtype=src.target, device="meta"))

    def _drop(self, i: int) -> None:
        self._unload(self._live.pop(i, ()))
        self._ring.give_back(i)

    def _pre_hook(self, i: int):
        def hook(module, args):
            self._fetch(i)
            n = len(self.blocks)
            for j in range(i + 1, i + 1 + min(self.depth, n - 1)):   # wraps: the next call starts at 0
                self._schedule(j % n)
        return hook

    def _post_hook(self, i: int):
        def hook(module, args, output):
            self._drop(i)
        return hook

    def _read_outside(self) -> None:
        if self._outside_live:
            return
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
