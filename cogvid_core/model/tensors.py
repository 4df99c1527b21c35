"""How one checkpoint tensor becomes a model tensor: which slot it fills, which dtype it is stored
in (the fp8 storage rule), its dequantisation and cast. Shared by the eager loader (``loading``) and the
file-backed path (``fileindex`` / ``filestream``), so both compute bit for bit the same weights."""
from __future__ import annotations

import torch

from cogvid_core.model import precision as P
from cogvid_core.model.checkpoints import MARKERS, SCALE_SUFFIXES
from cogvid_core.model.variants import CheckpointError

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def target_dtype(name: str, t: torch.Tensor, module: torch.nn.Module, dtype, storage_dtype, keep_fp8: bool):
    """Which dtype one tensor is stored in after load (fp8 only for Linear weights: see Fp8Linear; fp32
    in the modules the model class keeps in fp32 at this dtype, marked by precision.mark_keep_fp32)."""
    if not t.is_floating_point():
        return t.dtype
    if getattr(module, P.KEEP_FP32, False):
        return torch.float32
    linear_weight = isinstance(module, torch.nn.Linear) and name.endswith("weight")
    if linear_weight and storage_dtype in FP8_DTYPES and P.is_fp8_layer(name, t.shape):
        return storage_dtype
    if linear_weight and keep_fp8 and t.dtype in FP8_DTYPES:
        return t.dtype
    return dtype


def slot(model: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str] | None:
    """(owning module, parameter or buffer name) of a state-dict key, None if the model has no such tensor."""
    owner, _, leaf = name.rpartition(".")
    try:
        module = model.get_submodule(owner)
    except AttributeError:
        return None
    return (module, leaf) if leaf in module._parameters or leaf in module._buffers else None


def scale_name(name: str) -> str | None:
    return f"{name[:-len('weight')]}scale_weight" if name.endswith("weight") else None


def dequantised(t: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    return t if scale is None else t.to(torch.float32) * scale.to(torch.float32)


def cast(t: torch.Tensor, target: torch.dtype, device) -> torch.Tensor:
    if target in FP8_DTYPES and t.dtype not in FP8_DTYPES:  # saturate instead of overflowing to NaN
        t = t.to(torch.float32).clamp(-torch.finfo(target).max, torch.finfo(target).max)
    return t.to(device=device, dtype=target)


def assign(module: torch.nn.Module, leaf: str, t: torch.Tensor) -> None:
    if leaf in module._parameters:
        module._parameters[leaf] = torch.nn.Parameter(t, requires_grad=False)
    else:
        module._buffers[leaf] = t


def matched(model: torch.nn.Module, keys, rename, ignore, unexpected: list):
    """(key, name, slot) for each checkpoint key that fills a tensor of ``model``: named by ``rename``
    (``checkpoints.renamer``: wrapper prefix stripped, core layout mapped), quantisation markers, scales
    and ``ignore``d names skipped; names the model lacks are appended to ``unexpected``
    (see :func:`refuse_unexpected`)."""
    for key in keys:
        name = rename(key)
        if key in MARKERS or name.endswith(SCALE_SUFFIXES) or ignore(name):
            continue
        found = slot(model, name)
        if found is None:
            unexpected.append(name)
        else:
            yield key, name, found


def refuse_unexpected(unexpected: list) -> None:
    if unexpected:
        raise CheckpointError(f"{len(unexpected)} tensors do not belong to this model (e.g. {unexpected[0]}): "
                              "a different model or version")
