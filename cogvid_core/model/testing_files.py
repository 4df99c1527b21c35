"""The values and the file writer behind the random checkpoints (model/testing.py).

Every tensor is drawn from its own generator seeded by (seed, component, tensor name): the same
values in every layout and on every machine, whatever order or thread draws them.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import struct
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from cogvid_core.model import precision as P

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def random_tensor(component: str, name: str, shape: tuple[int, ...], dtype: torch.dtype,
                  seed: int = 0) -> torch.Tensor:
    """Default-init-like values for one tensor, independent of every other tensor.

    Linear/conv weights: uniform(+-1/sqrt(fan_in)) as torch's default init; norm weights 1,
    biases 0; embeddings N(0, 1); positional embedding N(0, 0.5). Generated in fp32 then cast so
    every dtype holds the same values up to rounding.
    """
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(f"{component}/{name}".encode())) % 2**63)
    leaf = name.rsplit(".", 1)[-1]
    if "pos_embedding" in name:
        t = torch.randn(shape, generator=gen) * 0.5
    elif name in ("shared.weight",) or "relative_attention_bias" in name:
        t = torch.randn(shape, generator=gen)
    elif len(shape) == 1:
        t = torch.ones(shape) if leaf == "weight" else torch.zeros(shape)
    else:
        fan_in = math.prod(shape[1:])
        bound = 1.0 / math.sqrt(fan_in)
        t = torch.empty(shape).uniform_(-bound, bound, generator=gen)
    return t.to(dtype)


def _plan_shards(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, max_bytes: int | None) -> list[list[str]]:
    shards, size = [[]], 0
    item = torch.empty((), dtype=dtype).element_size()
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * item
        if max_bytes and shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def write_safetensors(path: Path, component: str, shapes: dict, dtype: torch.dtype, seed: int, transform=None,
                      workers: int | None = None) -> int:
    """Stream one safetensors file tensor by tensor (peak RAM: a few tensors, even for 11 GB files).

    ``transform`` maps {name: tensor} -> {name: tensor} for one tensor at a time (fp8 casts);
    running it on meta tensors first gives the header before any value exists. The values are drawn
    by ``workers`` threads (torch's random fill runs on one core per generator; default: the cores, at
    most 8) and written in order: each tensor has its own generator, so the bytes do not depend on
    how many threads drew them. Returns the data bytes.
    """
    transform = transform or (lambda d: d)
    specs = {}
    for n, s in shapes.items():
        specs.update(transform({n: torch.empty(s, dtype=dtype, device="meta")}))
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for n, t in specs.items():
        nbytes = t.numel() * t.element_size()
        header[n] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data start to 8 bytes
    workers = workers or max(1, min(8, os.cpu_count() or 1))
    todo = iter(shapes.items())

    def draw(name, shape):
        return transform({name: random_tensor(component, name, shape, dtype, seed)})

    with open(path, "wb") as f, ThreadPoolExecutor(workers) as pool:
        f.write(struct.pack("<Q", len(raw)) + raw)
        pending = deque(pool.submit(draw, *item) for item in itertools.islice(todo, workers + 1))
        written = set()
        while pending:
            drawn = pending.popleft().result()
            pending.extend(pool.submit(draw, *item) for item in itertools.islice(todo, 1))
            for name, t in drawn.items():
                if name in written:  # a marker (scaled_fp8) returned with every tensor: write once
                    continue
                written.add(name)
                assert tuple(t.shape) == tuple(specs[name].shape) and t.dtype == specs[name].dtype, name
                f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy())
    return offset


_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}


def to_fp8(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """kijai-style fp8: the fp8 layers (``precision.is_fp8_layer``) cast to float8_e4m3fn, no scales."""
    return {n: t.to(FP8) if P.is_fp8_layer(n, t.shape) else t for n, t in tensors.items()}


def to_scaled_fp8(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI ``*_fp8_e4m3fn_scaled`` format: ``scaled_fp8`` marker + per-weight ``.scale_weight``.

    Stored weight = W / scale in fp8; ComfyUI's scaled_fp8_ops multiply back by ``scale_weight``.
    """
    out = {"scaled_fp8": torch.empty(0, dtype=FP8)}
    for n, t in tensors.items():
        if P.is_fp8_layer(n, t.shape):
            scale = (t.float().abs().amax() / FP8_MAX).clamp(min=1e-12)
            out[n] = (t.float() / scale).to(FP8)
            out[n[: -len("weight")] + "scale_weight"] = scale.reshape(())
        else:
            out[n] = t
    return out
