"""Two GPUs in one process: the CFG branches at once, and components on different cards.

* CFG in parallel: the transformer gets a second copy (:func:`attach_second`) on another device.
  While sampling, the unconditional branch runs on that copy in a worker thread and the
  conditional branch on the first device in the caller's thread. Threads, not one thread
  interleaving the two forwards: PyTorch releases the GIL inside every op and CUDA launches are
  asynchronous, so each thread keeps its GPU fed; a single thread would stall both GPUs at every
  host synchronisation inside a forward (streaming hooks, file reads). Each branch is the very
  computation the one-device ``sequential`` CFG mode does, so the result equals it (bit for bit
  on identical devices).
* The copy shares what can be shared: host weights (the same storage, new Parameter objects, so
  placing one copy never moves the other) or a file-backed model's weight index (each copy reads
  the user's files onto its own device). Each copy is placed in the mode of the first.
* :class:`DeviceMap`: which device each component computes on (``--devices``), e.g. T5 and VAE
  on one card and the transformer on another; tensors cross at the stage boundaries.
"""
from __future__ import annotations

import copy
import dataclasses
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from cogvid_core.model import lora_linear
from cogvid_core.memory.activations import ff_chunk_tokens, set_ff_chunking
from cogvid_core.model.fileindex import index_of
from cogvid_core.memory.placement import place, placed_of

_ATTR = "_cogvid_cfg_second"
KINDS = ("transformer", "t5", "vae")
PAIR_SEPARATOR = "+"


# =============================================================================== device names
def parse_device(name: str) -> torch.device:
    """``cuda``, ``cuda:N`` or ``cpu`` -> a device that exists here, else ValueError saying why."""
    try:
        dev = torch.device(name.strip())
    except (RuntimeError, ValueError):
        raise ValueError(f"{name!r} is not a device name: use cpu, cuda or cuda:N") from None
    if dev.type not in ("cuda", "cpu"):
        raise ValueError(f"device {name!r}: only cpu and cuda devices are supported")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for, but torch sees no CUDA GPU: use cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device {name!r} asked for, but torch sees {count} GPU(s) (cuda:0..cuda:{count - 1}): "
                             "pick one of those, or check CUDA_VISIBLE_DEVICES")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def parse_pair(spec: str) -> tuple[torch.device, ...]:
    """``DEV`` or ``DEV+DEV`` (the transformer's CFG pair) -> one or two devices."""
    parts = [p for p in spec.split(PAIR_SEPARATOR)]
    if not 1 <= len(parts) <= 2 or not all(p.strip() for p in parts):
        raise ValueError(f"device {spec!r}: give one device or two joined by '+', e.g. cuda:0+cuda:1")
    devs = tuple(parse_device(p) for p in parts)
    if len(devs) == 2 and devs[0] == devs[1] and devs[0].type == "cuda":
        raise ValueError(f"device {spec!r} names the same GPU twice: the two CFG branches run at once only on two "
                         "different GPUs (e.g. cuda:0+cuda:1); give one device to run them on one")
    return devs


@dataclass(frozen=True)
class DeviceMap:
    """Where each component computes. ``transformer`` holds one device, or two: the CFG pair."""
    transformer: tuple[torch.device, ...]
    t5: torch.device
    vae: torch.device

    @property
    def primary(self) -> torch.device:
        return self.transformer[0]

    @property
    def second(self) -> torch.device | None:
        return self.transformer[1] if len(self.transformer) > 1 else None

    def of(self, kind: str) -> torch.device:
        return self.primary if kind == "transformer" else getattr(self, kind)

    def gpus(self) -> list[torch.device]:
        """Each distinct CUDA device once, the transformer's first."""
        out = []
        for d in (*self.transformer, self.t5, self.vae):
            if d.type == "cuda" and d not in out:
                out.append(d)
        return out

    @classmethod
    def single(cls, device) -> "DeviceMap":
        dev = torch.device(device)
        return cls((dev,), dev, dev)


def parse_devices(spec: str) -> DeviceMap:
    """``--devices``: comma-separated items. A bare device (or ``DEV+DEV``) is the transformer's,
    two bare devices are its CFG pair (``cuda:0,cuda:1``); ``t5=DEV``, ``vae=DEV`` and
    ``transformer=DEV[+DEV]`` name a component. T5 and the VAE default to the transformer's first."""
    named: dict[str, str] = {}
    bare: list[str] = []
    for item in (x.strip() for x in spec.split(",")):
        if not item:
            continue
        key, eq, value = item.partition("=")
        if not eq:
            bare.append(item)
        elif key.strip() not in KINDS:
            raise ValueError(f"--devices {spec!r}: unknown component {key.strip()!r}, expected one of {KINDS}")
        else:
            named[key.strip()] = value
    if bare and "transformer" in named:
        raise ValueError(f"--devices {spec!r}: the transformer's devices are given twice (bare and transformer=)")
    pair = named.get("transformer") or PAIR_SEPARATOR.join(bare)
    if not pair:
        raise ValueError(f"--devices {spec!r}: no transformer device; e.g. --devices cuda:0,cuda:1 or "
                         "--devices transformer=cuda:0,t5=cuda:1,vae=cuda:1")
    transformer = parse_pair(pair)
    other = {k: parse_device(named[k]) if k in named else transformer[0] for k in ("t5", "vae")}
    return DeviceMap(transformer, **other)


# =============================================================================== the second copy
def _hooked(module: nn.Module) -> list[str]:
    """Names of submodules carrying forward hooks or a diffusers hook (a placement, a LoRA)."""
    out = []
    for name, m in module.named_modules():
        registry = getattr(m, "_diffusers_hook", None)
        if m._forward_hooks or m._forward_pre_hooks or (registry is not None and registry.hooks):
            out.append(name or "<root>")
    return out


def replicate(module: nn.Module) -> nn.Module:
    """A second module over the same weights: new Parameter objects on the same storage (placing
    either copy never moves the other's tensors), the same buffers and file index. Made before the
    module is placed or hooked, so no placement or hook is copied with it."""
    if placed_of(module) is not None or _hooked(module):
        raise RuntimeError("a second copy of the transformer is made right after loading, before it is placed or "
                           f"hooked (found: {placed_of(module) or _hooked(module)[:3]}); attach the second device "
                           "in the loader")
    memo: dict = {}
    for p in module.parameters():
        memo[id(p)] = nn.Parameter(p.data, requires_grad=p.requires_grad)
    for b in module.buffers():
        memo[id(b)] = b
    index = index_of(module)
    if index is not None:
        memo[id(index)] = index
    return copy.deepcopy(module, memo)


@dataclass
class Second:
    """The transformer's copy on the second device of a CFG pair."""
    module: nn.Module
    device: torch.device


def attach_second(module: nn.Module, device) -> Second:
    """Give ``module`` a copy on ``device`` for CFG in parallel (sampling finds it on the module)."""
    second = Second(replicate(module), torch.device(device))
    object.__setattr__(module, _ATTR, second)
    return second


def second_of(module: nn.Module) -> Second | None:
    return module.__dict__.get(_ATTR)


def detach_second(module: nn.Module) -> None:
    second = module.__dict__.pop(_ATTR, None)
    if second is not None and placed_of(second.module) is not None:
        placed_of(second.module).release()


@contextmanager
def mirrored(primary: nn.Module, second: Second):
    """The second copy computable on its device with the first's settings: activation savers,
    attention processors, LoRAs, and the placement mode the first was placed in (resident when it
    was not). Its use ends as the first's does: offload drops the device copy, resident stays."""
    replica = second.module
    set_ff_chunking(replica, ff_chunk_tokens(primary))
    replica.set_attn_processor(dict(primary.attn_processors))
    placed = placed_of(primary)
    with on_device(second.device):
        p2 = place(replica, second.device, placed.requested if placed is not None else "resident")
        module = p2.acquire()
    with ExitStack() as stack:
        stack.callback(_offload_on, p2, second.device)
        # the first copy's LoRA Linears (the Component set them for this use) on the same layers of the
        # second: the same LoRA layers, their matrices made once on its device
        stack.enter_context(lora_linear.mirrored(primary, replica))
        yield module


def _offload_on(placed, device) -> None:
    with on_device(device):
        placed.offload()


def _moved(value, device):
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return value.to(device)
    return type(value)(_moved(v, device) for v in value)   # the RoPE (cos, sin) pair


def on_device(device):
    """The CUDA current device set to ``device`` (nothing elsewhere): diffusers' group offloading makes
    its copy stream on, and its hooks wait on, the current device's streams, so a model placed or
    run on another GPU than the current one must be placed and run inside this."""
    device = torch.device(device)
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


class ParallelCfg:
    """A sampling.Denoiser's predict/guide with the two CFG branches at once: the conditional one
    on the first device in the caller's thread, the unconditional one on the second copy in a
    worker thread; the pair comes back on the first device, as ``sequential`` CFG returns it."""

    def __init__(self, first, second, pool: ThreadPoolExecutor, second_cache=None):
        self.first, self.second, self.pool = first, second, pool
        self.device = second.negative.device
        self.second_cache = second_cache     # a step cache's hooks on the second copy (first.cache: the first's)

    @staticmethod
    def _branch(denoiser, cache, x, embeds, t, name):
        if cache is None:
            return denoiser.run(x, embeds, t)
        try:
            return cache.one(lambda xs, e: denoiser.run(xs, e, t), x, embeds, t, name)
        except BaseException:
            cache.abort_pair()       # first-block cache: the other branch may be waiting for this one's block 0
            raise

    def _uncond(self, x, t):
        s = self.second
        # grad mode is per thread: the caller's inference_mode does not reach this one
        with torch.inference_mode(), on_device(self.device):
            return self._branch(s, self.second_cache, x.to(self.device), s.negative, t.to(self.device),
                                "uncond").to(x.device)

    def predict(self, x, t):
        future = self.pool.submit(self._uncond, x, t)
        try:
            cond = self._branch(self.first, self.first.cache, x, self.first.positive, t, "cond")
        except BaseException as error:
            future.cancel()
            wait([future])     # never leave the worker running on tensors the caller is about to drop
            if isinstance(error, threading.BrokenBarrierError) and not future.cancelled() and future.exception():
                raise future.exception() from error     # the other branch failed first: its error is the news
            raise
        return future.result(), cond

    def guide(self, pred, t):
        return self.first.guide(pred, t)


@contextmanager
def cfg_parallel(denoiser):
    """``denoiser`` itself, or with CFG on a transformer that has a second copy
    (:func:`attach_second`), a :class:`ParallelCfg` over the two devices for the ``with`` body."""
    second = second_of(denoiser.transformer)
    if second is None or denoiser.negative is None:
        yield denoiser
        return
    with mirrored(denoiser.transformer, second) as replica, \
            ThreadPoolExecutor(1, thread_name_prefix="cogvid-cfg") as pool, \
            (denoiser.cache.sibling(replica) if denoiser.cache is not None else nullcontext()) as second_cache:
        dev = second.device
        other = dataclasses.replace(denoiser, transformer=replica, positive=None, negative=denoiser.negative.to(dev),
                                    rope=_moved(denoiser.rope, dev), ofs=_moved(denoiser.ofs, dev), cache=None)
        yield ParallelCfg(denoiser, other, pool, second_cache)


# =============================================================================== node values
def device_choices(gpus: int) -> list[str]:
    """Device values beyond auto/cuda/cpu: each ``cuda:N`` and each pair ``cuda:I+cuda:J``, for at
    least two GPUs, so a workflow saved on a two-GPU machine loads anywhere and says at run time what
    is missing."""
    n = max(2, int(gpus))
    singles = [f"cuda:{i}" for i in range(n)]
    pairs = [f"cuda:{i}{PAIR_SEPARATOR}cuda:{j}" for i in range(n) for j in range(i + 1, n)]
    return singles + pairs
