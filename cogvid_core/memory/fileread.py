"""Reading groups of tensors from safetensors files onto a device (filestream's I/O): ``pread`` into a
few page-locked staging buffers by several threads, a host-to-device copy on a side CUDA stream, dtype
conversion on the caller's stream. Which groups are read when, and where they live, is
:mod:`cogvid_core.memory.filestream`'s."""
from __future__ import annotations

import os
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from cogvid_core.model.fileindex import TensorSource
from cogvid_core.model.variants import CheckpointError

ALIGN = 64
_PIECE = 32 * 2 ** 20      # bytes per pread: a block is read by several threads at once
# page-locked through cudaHostRegister and not yet unregistered: torch's host_memory_stats() does not see
# these (staging buffers, placement.flat_copy's offload copies), so the benches read this
_registered = {"bytes": 0, "lock": threading.Lock()}


def registered_bytes() -> int:
    """Host bytes this process has page-locked with :func:`staging_buffer` and not unregistered."""
    return _registered["bytes"]


def _count_registered(nbytes: int) -> None:
    with _registered["lock"]:
        _registered["bytes"] += nbytes


class Layout:
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


def _convert(flat: torch.Tensor, layout: Layout, s: TensorSource) -> torch.Tensor:
    """``loading.load_weights``' own arithmetic (dequantise, saturate, cast), done where ``flat`` is."""
    from cogvid_core.model.tensors import cast as _cast, dequantised as _dequantised

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
        _count_registered(buf.numel())
        return buf, True
    return buf, False


def unregister(bufs: list) -> None:
    """Unpin the staging buffers before their memory goes back to malloc: a range freed while still
    registered makes the next cudaHostRegister at that address fail (cudaErrorHostMemoryAlreadyRegistered)."""
    for buf, registered in bufs:
        if registered:
            torch.cuda.cudart().cudaHostUnregister(buf.data_ptr())
            _count_registered(-buf.numel())
    bufs.clear()


class Reader:
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
        self._free: list = [None] * len(self._bufs)
        self._next = 0
        self._fds: dict[str, int] = {}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="cogvid-filestream")
        # one thread copying from the page cache reached ~5 GB/s on the H200 machine: T5 blocks (little
        # compute per byte) then wait on the reads
        self._io = ThreadPoolExecutor(max(1, io_threads), thread_name_prefix="cogvid-pread")
        self.side = torch.cuda.Stream(device) if self.cuda else None
        # also when a reader is dropped without close(): ComfyUI drops a cached loader output without
        # release(), and an error can leave a placement behind; each drop kept the files open (locked on
        # Windows) and the staging buffers page-locked. The callback holds the parts, never the reader.
        self._finish = weakref.finalize(self, _finish, self._pool, self._io, self._free, self._bufs, self._fds)

    def staging_bytes(self) -> int:
        return sum(b.numel() for b, _ in self._bufs)

    def submit(self, layout: Layout, dest: torch.Tensor | None = None):
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

    def read_now(self, layout: Layout) -> dict[str, torch.Tensor]:
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

    def _read(self, layout: Layout, k: int, dest, allocated, inference: bool):
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
        self._finish()


def _finish(pool, io, copies: list, bufs: list, fds: dict) -> None:
    """A reader's end, by close() or by the garbage collector: no thread, page-locked buffer or open
    file left. Never waits for the threads: the collector may run this on one of them, and a reader
    nobody refers to has no read queued (a queued read refers to it)."""
    pool.shutdown(wait=False)
    io.shutdown(wait=False)
    for copied in copies:        # a copy out of a staging buffer may still run: unpin after it
        if copied is not None:
            copied.synchronize()
    unregister(bufs)
    for fd in fds.values():
        os.close(fd)
    fds.clear()
