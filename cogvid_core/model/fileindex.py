"""The file side of a file-backed model: per tensor, where it lies in the user's safetensors files.

A model built on the meta device gets a :data:`WeightIndex` (file, byte range, stored dtype,
target dtype, fp8 scale per tensor) instead of weights: :func:`lazy_load` is ``load_weights``'s
drop-in that reads nothing. :mod:`cogvid_core.memory.filestream` reads the weights when the model is placed.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cogvid_core.model import tensors as T
from cogvid_core.model.checkpoints import renamer
from cogvid_core.model.variants import CheckpointError

_ATTR = "_cogvid_weight_index"
_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


@dataclass(frozen=True)
class TensorSource:
    """Where one tensor lives in a safetensors file and what it becomes on the device."""
    path: str
    start: int                 # absolute byte offset of the data in the file
    nbytes: int
    dtype: torch.dtype         # as stored
    shape: tuple[int, ...]
    target: torch.dtype        # as computed with
    scale: "TensorSource | None" = None   # ComfyUI scaled fp8: weight * scale (float32), then target
    stamp: tuple = ()          # file_stamp(path) when indexed: the offsets hold for that version only


WeightIndex = dict      # {model tensor name: TensorSource}


def read_header(path: str | os.PathLike) -> dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]:
    """{key: (dtype, shape, start, end)} with absolute byte offsets, from the safetensors header."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, struct.error, ValueError) as e:
        raise CheckpointError(f"{Path(path).name} is truncated or corrupt ({e}): download it again") from e
    out = {}
    for key, v in header.items():
        if key == "__metadata__":
            continue
        if v["dtype"] not in _DTYPES:
            raise CheckpointError(f"{Path(path).name}: tensor {key} has dtype {v['dtype']}, which this pack does "
                                  "not read; use a bf16, fp16, fp32 or fp8 checkpoint")
        a, b = v["data_offsets"]
        out[key] = (_DTYPES[v["dtype"]], tuple(v["shape"]), 8 + n + a, 8 + n + b)
    # the eager load finds a cut file when it reads it; a file-backed one reads at placement, so
    # check the length now: the error belongs to the loader, not to a sampler minutes later
    end = max((e for *_, e in out.values()), default=0)
    if os.path.getsize(path) < end:
        raise CheckpointError(f"{Path(path).name} is truncated or corrupt (ends before byte {end}): download it again")
    return out


def file_stamp(path: str | os.PathLike) -> tuple[int, int, int, int]:
    """What tells one version of a file from another under the same name: size, modification time
    (ns), inode and device. A file replaced by a download or a copy changes at least one of them."""
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev


def stamps(index: WeightIndex) -> dict[str, tuple]:
    """{file: its stamp when indexed} for every file ``index`` reads (fp8 scales' files included)."""
    out = {}
    for src in index.values():
        for s in (src, src.scale):
            if s is not None and s.stamp:
                out.setdefault(s.path, s.stamp)
    return out


def check_unchanged(files: dict[str, tuple]) -> None:
    """Refuse to read a file that changed since it was indexed: the index's byte offsets are the old
    version's, so the new file would give wrong weights without any error. ComfyUI keeps a loader's
    output while its inputs stay the same, so a model replaced under the same name reaches here."""
    for path, stamp in files.items():
        try:
            now = file_stamp(path)
        except OSError:
            now = None
        if now != stamp:
            what = ("was removed or moved" if now is None else
                    "was truncated or replaced (it is shorter now)" if now[0] < stamp[0] else
                    "changed on disk (its size, time or file identity differ)")
            raise CheckpointError(
                f"{Path(path).name} {what} after this model was loaded from it: its weights would be read at "
                "the old file's byte offsets. Load the model again (in ComfyUI: queue again, the loader reloads a "
                "changed file; or press 'Unload models'); keep a file in place while a loaded model uses it")


def index_weights(model: nn.Module, files, dtype: torch.dtype, *, storage_dtype=None, keep_fp8: bool = False,
                  ignore=lambda k: False) -> WeightIndex:
    """What ``loading.load_weights`` would read into ``model``, recorded instead of read.

    Same names, prefixes, scales and target dtypes as ``load_weights`` (its helpers decide), so a
    file-backed model computes bit for bit what a loaded one does. Raises CheckpointError on
    tensors the model does not have."""
    index, unexpected = {}, []
    for path in map(Path, files):
        # before the header: a file replaced in between is refused at its first read, never misread
        try:
            stamp = file_stamp(path)
        except OSError:
            stamp = ()              # read_header says what is wrong with the file
        header = read_header(path)
        rename = renamer(header)
        scales = {rename(k): _source(path, v, torch.float32, stamp=stamp) for k, v in header.items()
                  if k.endswith(".scale_weight")}
        for key, name, slot in T.matched(model, header, rename, ignore, unexpected):
            v = header[key]
            scale = scales.get(T.scale_name(name))
            probe = torch.empty(v[1], dtype=torch.float32 if scale is not None else v[0], device="meta")
            target = T.target_dtype(name, probe, slot[0], dtype, storage_dtype, keep_fp8)
            index[name] = _source(path, v, target, scale, stamp)
    T.refuse_unexpected(unexpected)
    return index


def _source(path: Path, entry, target, scale=None, stamp=()) -> TensorSource:
    dt, shape, a, b = entry
    return TensorSource(str(path), a, b - a, dt, shape, target, scale, stamp)


def attach(model: nn.Module, index: WeightIndex, finalize=None) -> nn.Module:
    """Make a meta-device ``model`` file-backed: placeholders get the target dtypes, ``finalize`` ties
    shared tensors (T5 embeddings), and every tensor must have a source."""
    for name, src in index.items():
        _assign(model, name, torch.empty(src.shape, dtype=src.target, device="meta"))
    if finalize is not None:
        finalize(model)
    covered = {_slot(model, n) for n in index}
    missing = [n for n, _ in _named_tensors(model) if _slot(model, n) not in covered]
    if missing:
        raise CheckpointError(f"{len(missing)} tensors missing from the checkpoint (e.g. {missing[0]}): the file "
                              "is truncated or a different model; download it again")
    object.__setattr__(model, _ATTR, index)
    return model


def lazy_load(model: nn.Module, files, dtype: torch.dtype, *, storage_dtype=None, keep_fp8: bool = False,
              ignore=lambda k: False, finalize=None) -> nn.Module:
    """``loading.load_weights``'s drop-in that reads nothing: the meta ``model`` becomes file-backed
    and its weights are read when it is placed (``placement.place``)."""
    index = index_weights(model, files, dtype, storage_dtype=storage_dtype, keep_fp8=keep_fp8, ignore=ignore)
    return attach(model, index, finalize)


def index_of(model: nn.Module) -> WeightIndex | None:
    return model.__dict__.get(_ATTR)


def _named_tensors(model: nn.Module):
    yield from model.named_parameters()
    yield from model.named_buffers()


def _slot(model: nn.Module, name: str):
    owner, _, leaf = name.rpartition(".")
    return id(model.get_submodule(owner)), leaf


def _assign(model: nn.Module, name: str, t: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    T.assign(model.get_submodule(owner), leaf, t)

