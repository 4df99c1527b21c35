"""Step caches: less transformer work per denoising step, through diffusers' own cache hooks.

Names (the public contract: the Sampler's ``cache`` combo and ``i2v --cache NAME[:ARGS]``), each with
the configuration diffusers' documentation gives for CogVideoX:

* ``none``         every step runs the whole transformer (the default).
* ``fbc[:T]``      First Block Cache, ``FirstBlockCacheConfig(threshold=T)`` (T = 0.05): when block 0's
                   residual changed by less than T (relative mean) since the last full pass, blocks
                   1..N-1 are skipped and their last residual is reused. A skipped block is not read
                   from disk when the transformer streams from its files.
* ``pab``          Pyramid Attention Broadcast, spatial block skip range 2 between timesteps 100 and 800:
                   every other step in that range reuses each block's attention output.
* ``fastercache``  FasterCache, diffusers' CogVideoX example: attention reused every other step below
                   timestep 681, the unconditional branch approximated from the conditional one (a
                   frequency split) on 4 steps of 5 below 641. Needs CFG on and batched.
* ``teacache[:T]`` TeaCache (T = 0.1; not a diffusers hook: ``teacache``): while the timestep embedding's
                   rescaled change, summed since the last computed step, stays under T, a step skips
                   every block and reuses the last residual; nothing of a skipped step is read from disk.
                   The authors' 1.5 I2V figures (H100, 50 steps): 0.1 1.5x, 0.2 2.2x, 0.3 2.7x faster.

A cache trades quality for speed: the video differs from the uncached one. Random weights cannot
measure how much; the published figures are in the README.

How a cache runs (:class:`StepCache`): with CFG batched, exactly as diffusers' pipeline does (the
hooks on our transformer, each call under ``cache_context("cond_uncond")``, the sampler's timestep
as ``current_timestep``). With one branch at a time (profiles balanced and lowvram) the hooks keep
one state per branch, and the decisions that diffusers takes on the batched pair are taken jointly:
first-block cache compares both branches' block-0 residuals at once (:class:`_JointFirstBlock`).
FasterCache is built on the batched pair (it returns the two branches from one call), so it refuses
one-branch CFG and the CFG pair. On a CFG pair (two GPUs) each copy of the transformer gets its own
hooks and runs one branch; first-block cache's decision takes both copies' block-0 residuals at once.
Under torchrun each rank sees a slice of the tokens: fbc's measure is summed over the ranks. TeaCache
decides from the timestep embedding alone, the same for every branch, copy and rank. Hooks are
removed after the run: a shared transformer runs uncached next time.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

log = logging.getLogger(__name__)

NONE = "none"
NAMES = (NONE, "fbc", "pab", "fastercache", "teacache")  # new names go at the end: saved workflows hold the value
# the Sampler's combo (a value may carry its argument); new choices at the end
CHOICES = (*NAMES, "teacache:0.2")
FBC_THRESHOLD = 0.05
# the threshold a name takes without one: diffusers' FirstBlockCacheConfig default; TeaCache's slower,
# closer-to-exact setting of the authors' CogVideoX1.5 table
THRESHOLDS = {"fbc": FBC_THRESHOLD, "teacache": 0.1}
PAB_TIMESTEPS = (100, 800)
# the runs that split a step over GPUs (sampling names them in its messages). On a CFG pair each GPU's
# copy holds one branch's state: PAB's decisions depend on the timestep and each attention module's own
# count, so they are the batched pair's; fbc's joint decision takes both copies' block 0 (stepcache).
# Under torchrun every rank runs the whole step on its slice of the tokens: PAB and FasterCache decide
# by the timestep on every rank alike; fbc sums its measure over the ranks' slices (stepcache)
PAIR = "a CFG pair (two GPUs)"
TORCHRUN = "sequence parallel (torchrun)"
# diffusers' hook names per cache (to find the hook objects after enable_cache)
_HOOKS = {"fbc": ("fbc_leader_block_hook", "fbc_block_hook"), "pab": ("pyramid_attention_broadcast",),
          "fastercache": ("faster_cache_denoiser", "faster_cache_block")}
TOOLTIP = ("Step cache: reuse work between steps. Faster, but it trades quality for speed. none: exact; fbc: "
           "skips blocks (threshold 0.05, fbc:0.1 more); pab: pyramid attention broadcast; fastercache: attention "
           "+ CFG cache (CFG batched, the most memory); teacache: skips whole steps (0.1; teacache:0.2 more), "
           "the least memory")


@dataclass(frozen=True)
class CacheSpec:
    name: str = NONE
    threshold: float = 0.0               # fbc and teacache (parse gives their default)

    @property
    def on(self) -> bool:
        return self.name != NONE

    def __str__(self) -> str:
        default = THRESHOLDS.get(self.name)
        return f"{self.name}:{self.threshold:g}" if default is not None and self.threshold != default else self.name


def parse(text) -> CacheSpec:
    """``none`` | ``fbc[:THRESHOLD]`` | ``pab`` | ``fastercache`` | ``teacache[:THRESHOLD]`` -> CacheSpec
    (None or "" is none)."""
    if isinstance(text, CacheSpec):
        return text
    raw = (text or NONE).strip().lower()
    name, sep, arg = raw.partition(":")
    if name not in NAMES:
        raise ValueError(f"unknown step cache {text!r}: choose one of {', '.join(NAMES)} "
                         "(fbc and teacache take a threshold, e.g. fbc:0.1, teacache:0.2)")
    if not sep:
        return CacheSpec(name, THRESHOLDS.get(name, 0.0))
    if name not in THRESHOLDS:
        raise ValueError(f"step cache {name!r} takes no arguments, got {text!r}: write {name}")
    try:
        threshold = float(arg)
    except ValueError:
        raise ValueError(f"step cache {text!r}: the threshold after '{name}:' must be a number, "
                         f"e.g. {name}:{2 * THRESHOLDS[name]:g}") from None
    if not (0 < threshold < math.inf):
        raise ValueError(f"step cache {text!r}: the threshold must be a positive number "
                         f"({THRESHOLDS[name]:g} is the default)")
    return CacheSpec(name, threshold)


def diffusers_config(spec, timestep):
    """The diffusers config of a cache; ``timestep()`` returns the step's timestep (PAB, FasterCache).
    Also what the tests and the benchmark apply to diffusers' own pipeline as the reference."""
    from diffusers.hooks import FasterCacheConfig, FirstBlockCacheConfig, PyramidAttentionBroadcastConfig
    spec = parse(spec)
    if spec.name == "fbc":
        return FirstBlockCacheConfig(threshold=spec.threshold)
    if spec.name == "pab":
        return PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2,
                                               spatial_attention_timestep_skip_range=PAB_TIMESTEPS,
                                               current_timestep_callback=timestep)
    if spec.name == "fastercache":
        return FasterCacheConfig(spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 681),
                                 low_frequency_weight_update_timestep_range=(99, 641),
                                 high_frequency_weight_update_timestep_range=(-1, 301),
                                 spatial_attention_block_identifiers=["transformer_blocks"],
                                 attention_weight_callback=lambda _: 0.3, tensor_format="BFCHW",
                                 current_timestep_callback=timestep)
    if spec.name == "teacache":
        raise ValueError("cache teacache is not a diffusers hook (its reference is the authors' script: "
                         "speed/teacache.py)")
    raise ValueError(f"cache {spec.name!r} has no diffusers config")


def held_bytes(spec, layers: int, video_tokens: int, text_tokens: int, width: int, branches: int = 2,
               dtype_bytes: int = 2) -> int:
    """Device bytes a cache holds between steps (hidden states of ``video + text`` tokens, ``width`` wide):
    fbc: block 0's output, its residual and the tail's residual, per branch; pab: each block's attention
    output per branch; fastercache: each block's attention output of the last two steps, and the
    conditional half it keeps is a view of the batched pair, which stays alive whole; teacache: the last
    residual per branch, and block 0's input through a computed pass."""
    spec = parse(spec)
    one = (video_tokens + text_tokens) * width * dtype_bytes
    if spec.name == "fbc":
        return 3 * one * branches
    if spec.name == "pab":
        return layers * one * branches
    if spec.name == "fastercache":
        return 2 * layers * one * 2
    if spec.name == "teacache":
        return 2 * one * branches
    return 0


def check(spec, cfg_mode: str, use_cfg: bool, split: str | None = None) -> CacheSpec:
    """The spec, or a ValueError for a combination the cache cannot run (what to do instead)."""
    spec = parse(spec)
    if not spec.on:
        return spec
    if split == PAIR and spec.name == "fastercache":
        raise ValueError("step cache fastercache computes both CFG branches in one batched call, and a CFG pair runs "
                         "them on two GPUs: use cache fbc, pab or teacache on the pair, or one GPU with fastercache")
    if spec.name == "fastercache" and not use_cfg:
        raise ValueError("step cache fastercache approximates the unconditional branch: it needs CFG (cfg > 1); "
                         "use fbc, pab or teacache without CFG")
    if spec.name == "fastercache" and cfg_mode != "batched":
        raise ValueError("step cache fastercache works on the batched CFG pair (diffusers' hook returns both "
                         "branches from one call), this profile runs one branch at a time: use profile resident "
                         "(CFG batched; fastercache holds the most memory of the caches), or cache fbc, pab or "
                         "teacache")
    return spec


@dataclass
class CacheStats:
    """What one run computed. A branch pass is one CFG branch through the transformer."""
    name: str
    layers: int
    branch_passes: int = 0      # branches the transformer was called for
    block_runs: int = 0         # branch x block executions (fbc skips whole blocks)
    attention_runs: int = 0     # branch x block attention executions (pab, fastercache reuse them)

    @property
    def full_passes(self) -> float:
        return self.block_runs / self.layers

    def line(self) -> str:
        total = self.branch_passes * self.layers
        text = (f"cache {self.name}: {self.branch_passes} branch passes, {self.full_passes:g} full passes' worth of "
                f"blocks ({self.block_runs}/{total} block runs)")
        if self.name in ("pab", "fastercache"):
            text += f", {self.attention_runs}/{total} attention runs"
        return text
