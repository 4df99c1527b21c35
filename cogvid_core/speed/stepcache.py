"""A step cache applied to a transformer for one sampling run (the names and configs are in ``caches``).

The sampler calls :meth:`StepCache.predict` instead of the transformer with the step's timestep. What
it does per CFG mode is in the ``caches`` module docstring; here is the how:

* The diffusers hooks go on with ``transformer.enable_cache`` and come off with ``disable_cache``;
  diffusers leaves a bound ``forward`` in each hooked module's ``__dict__`` (torch.compile in ``fast``
  would then take the block for someone else's wrapper), so every ``forward`` attribute is put back
  exactly as it was.
* First-block cache goes on at the transformer's first forward, after the speed options' setup: a
  compiled block's forward is then what the cache hook wraps (it runs compiled, the decision eagerly).
  PAB and FasterCache hooks replace the attention modules' forward inside the blocks, so ``fast``
  compiles the parts around them instead of whole blocks (norms, feed-forward, and the attention
  processor the hook calls when it computes): the hooks' Python state stays out of the graphs.
* TeaCache (``speed.teacache``) is ours, on diffusers' hook classes; it goes on at the first forward
  as the first-block cache does, and skips whole passes (block 0 included) before any block is read.
* Counting: first-block and TeaCache decisions (whole blocks), the attention hooks' real calls (pab,
  fastercache) and the branches each transformer call computed, into :class:`caches.CacheStats`.
"""
from __future__ import annotations

import threading
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from cogvid_core.memory import filestream
from cogvid_core.speed import caches
from cogvid_core.speed.caches import CacheStats


def _batch(args, kwargs) -> int:
    x = kwargs.get("hidden_states", args[0] if args else None)
    return int(x.shape[0]) if torch.is_tensor(x) else 1


def _blocks(transformer: nn.Module) -> nn.ModuleList:
    return transformer.transformer_blocks


class _JointFirstBlock:
    """Takes the first-block cache's skip decision. Batched or without CFG: diffusers' own. One branch at
    a time: as diffusers takes it on the batched pair, from both branches' block-0 residuals (modes set
    by :meth:`StepCache._fbc_sequential`): ``probe`` lets the uncond branch take the skip path and keeps
    its residual, ``joint`` decides on the cond branch with both, ``compute`` forces the full pass."""

    def __init__(self, hook, owner: "StepCache"):
        self.hook, self.owner = hook, owner
        self.own = hook._should_compute_remaining_blocks
        self.threshold = hook.threshold
        self.probe = None
        self.joint = True
        hook._should_compute_remaining_blocks = self.decide

    def decide(self, residual: torch.Tensor) -> bool:
        mode = self.owner.fbc_mode
        prev = self.hook.state_manager.get_state().head_block_residual
        if mode == "own":
            compute = self.own(residual) if not self.owner.ranks else prev is None or self._changed(residual, prev)
        elif mode == "probe":
            self.probe, compute = (residual, prev), False
        elif mode == "joint":
            r_u, prev_u = self.probe
            self.probe = None
            compute = self.joint = self._changed(torch.cat([r_u, residual]), torch.cat([prev_u, prev]))
        elif mode == "pair":
            compute = self.owner.exchange.decide(self.owner.branch, residual, prev, self._pair)
        else:
            compute = True
        self.owner.skip_tail = not compute
        stats = self.owner.stats
        stats.block_runs += residual.shape[0] * (stats.layers if compute else 1)
        return compute

    def _pair(self, uncond, cond) -> bool:
        """The batched pair's decision from the two GPUs' (residual, previous residual), on this device."""
        if uncond[1] is None or cond[1] is None:      # the first step: no residual kept yet
            return True
        return self._changed(torch.cat([uncond[0], cond[0]]), torch.cat([uncond[1], cond[1]]))

    def _changed(self, residual, prev) -> bool:
        # diffusers' FBCHeadBlockHook._should_compute_remaining_blocks on the batched pair (it reads its
        # previous residual from its own state, which holds one branch here)
        if self.owner.ranks:
            # sequence parallel: each rank holds a slice of the tokens; the whole tensors' means are the
            # summed slices' (equal counts cancel), so every rank takes the same decision
            import torch.distributed as dist
            sums = torch.stack([(residual - prev).abs().sum(), prev.abs().sum()]).double()
            dist.all_reduce(sums)
            return (sums[0] / sums[1]).item() > self.threshold
        absmean = (residual - prev).abs().mean()
        return (absmean / prev.abs().mean()).item() > self.threshold

    def remove(self):
        self.hook.__dict__.pop("_should_compute_remaining_blocks", None)


class _PairExchange:
    """First-block cache on a CFG pair: the two copies' block-0 residuals meet in the cond branch's thread
    (the first copy's device), which takes the batched pair's decision for both; each thread waits for
    it. A failure on either side breaks the barrier, so the other side raises instead of waiting for ever."""

    def __init__(self):
        self.barrier = threading.Barrier(2)
        self.posted = None
        self.decision = True

    def decide(self, branch: str, residual, prev, rule) -> bool:
        try:
            if branch == "uncond":          # the second copy's thread: hand over, wait for the decision
                self.posted = (residual, prev)
                self.barrier.wait()
                self.barrier.wait()
                return self.decision
            self.barrier.wait()
            uncond = tuple(None if t is None else t.to(residual.device) for t in self.posted)
            self.decision = rule(uncond, (residual, prev))
            self.posted = None
            self.barrier.wait()
            return self.decision
        except BaseException:
            self.barrier.abort()
            raise

    def abort(self) -> None:
        self.barrier.abort()


class StepCache:
    """One run's cache on ``transformer``; use as a context manager (hooks on inside, off after)."""

    def __init__(self, transformer: nn.Module, spec, cfg_mode: str, use_cfg: bool, split: str | None = None,
                 steps: int = 50):
        self.spec = caches.check(spec, cfg_mode, use_cfg, split)
        self.transformer, self.cfg_mode, self.use_cfg, self.steps = transformer, cfg_mode, use_cfg, steps
        self.step_index = -1         # the running step (predict / one count them)
        self._tea = None             # TeaCache's state while on
        # TeaCache's per-step decisions (a CFG pair's second copy takes the first's: :meth:`sibling`)
        self.tea_decisions = self._new_decisions() if self.spec.name == "teacache" else None
        self.stats = CacheStats(str(self.spec), len(_blocks(transformer)))
        self.timestep = None
        self._context = None         # the cache context of the running call
        self.fbc_mode = "own"
        self.skip_tail = False       # the first-block cache skips blocks 1.. in the running pass
        self._joint: _JointFirstBlock | None = None
        self._seen = False           # a full pass already ran (the first-block cache has residuals)
        self._branch_states: dict = {}
        self._siblings: list[StepCache] = []
        self.exchange: _PairExchange | None = None     # fbc on a CFG pair: the two copies' joint decision
        self.branch = "cond"                            # the branch this copy runs on a pair
        self.ranks = split == caches.TORCHRUN           # fbc under torchrun: decide on every rank's slice
        self._stack = ExitStack()

    def __enter__(self) -> "StepCache":
        stack = self._stack
        tr = self.transformer
        stack.callback(self._off)
        stack.enter_context(filestream.blocks_skipped_when(tr, self._skipped))
        stack.callback(tr.register_forward_pre_hook(self._count_pass, with_kwargs=True).remove)
        if self.spec.name in ("fbc", "teacache"):
            stack.callback(tr.register_forward_pre_hook(self._apply_once).remove)
        else:
            self._apply()
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _skipped(self, i: int) -> bool:
        """Block i is not run in the running pass (a streamed block is then not read)."""
        return (self._tea is not None and self._tea.skip) or (i > 0 and self.skip_tail)

    # -- hooks on and off ---------------------------------------------------------------------------
    def _apply_once(self, _module, _args) -> None:
        if self.spec.name == "teacache":
            if self._tea is None:
                self._apply()
            return
        if not self.transformer.is_cache_enabled:
            self._apply()
            # this call already runs inside cache_context, set on the hooks there were: the new hooks get
            # the same context (what cache_context sets); the enclosing context's exit clears it on all
            from diffusers.hooks.hooks import CacheContext, _set_cache_context
            _set_cache_context(self.transformer, CacheContext(self._context))

    def _apply(self) -> None:
        tr = self.transformer
        self._forwards = {m: m.__dict__.get("forward") for m in tr.modules()}
        if self.spec.name == "teacache":
            from cogvid_core.speed.teacache import TeaCache
            self._tea = TeaCache(_blocks(tr), self.tea_decisions, lambda: self.step_index,
                                 lambda: self._context, self._tea_pass)
            self._tea.attach()
            self._wrapped = []
            return
        tr.enable_cache(caches.diffusers_config(self.spec, lambda: self.timestep))
        self._wrapped = []
        for name, hook in self._hooks():
            if name == "fbc_leader_block_hook":
                self._joint = _JointFirstBlock(hook, self)
            elif name in ("pyramid_attention_broadcast", "faster_cache_block"):
                self._count_calls(hook, "attention_runs")
            elif name == "faster_cache_denoiser":
                self._count_calls(hook, "branch_passes")

    def _hooks(self):
        for module in self.transformer.modules():
            registry = getattr(module, "_diffusers_hook", None)
            for name in caches._HOOKS.get(self.spec.name, ()) if registry is not None else ():
                hook = registry.get_hook(name)
                if hook is not None:
                    yield name, hook

    def _count_calls(self, hook, field: str) -> None:
        ref = hook.fn_ref
        original = ref.original_forward

        def counted(*args, **kwargs):
            setattr(self.stats, field, getattr(self.stats, field) + _batch(args, kwargs))
            return original(*args, **kwargs)

        ref.original_forward = counted
        self._wrapped.append((ref, original))

    def _new_decisions(self):
        from cogvid_core.model.variants import variant_from_transformer_config
        from cogvid_core.speed.teacache import Decisions
        key = variant_from_transformer_config(dict(self.transformer.config)).key
        return Decisions(key, self.spec.threshold, self.steps)

    def _tea_pass(self, batch: int, computed: bool) -> None:
        self.stats.block_runs += batch * self.stats.layers if computed else 0

    def _off(self) -> None:
        tr = self.transformer
        if self._tea is not None:
            self._tea.detach()
            self._tea = None
        elif not tr.is_cache_enabled:
            return
        for ref, original in self._wrapped:
            ref.original_forward = original
        if self._joint is not None:
            self._joint.remove()
        if tr.is_cache_enabled:
            tr.disable_cache()
        for module, forward in self._forwards.items():   # diffusers leaves bound forwards behind
            if forward is None:
                module.__dict__.pop("forward", None)
            else:
                module.__dict__["forward"] = forward
        self._branch_states.clear()

    def _count_pass(self, _module, args, kwargs) -> None:
        if self.spec.name == "fastercache":      # its denoiser hook counts the branches it computes
            return
        n = _batch(args, kwargs)
        self.stats.branch_passes += n
        if self.spec.name == "pab":              # fbc counts its block runs as it decides
            self.stats.block_runs += n * self.stats.layers

    # -- a CFG pair ---------------------------------------------------------------------------------
    @contextmanager
    def sibling(self, module: nn.Module):
        """The same cache on a CFG pair's second copy (another GPU, its own hooks and state): that copy
        runs the unconditional branch through :meth:`one`, this one the conditional. Its counts are
        added to this run's at the end."""
        other = StepCache(module, self.spec, "pair", self.use_cfg, caches.PAIR, self.steps)
        other.tea_decisions = self.tea_decisions     # TeaCache: one decision per step for both copies
        if self.spec.name == "fbc":
            self.exchange = other.exchange = _PairExchange()
            self.fbc_mode = other.fbc_mode = "pair"
            self.branch, other.branch = "cond", "uncond"
        try:
            with other:
                self._siblings.append(other)
                yield other
        except BaseException:
            self.abort_pair()
            raise
        finally:
            self.fbc_mode, self.exchange = "own", None

    def abort_pair(self) -> None:
        """A CFG pair's branch failed: the other one must not wait for its decision."""
        if self.exchange is not None:
            self.exchange.abort()

    def one(self, run, x, embeds, t, name: str):
        """One branch on this copy (a CFG pair: each copy holds one branch's state)."""
        self.timestep = t
        self.step_index += 1
        return self._branch(run, x, embeds, name)

    # -- the step -----------------------------------------------------------------------------------
    def predict(self, run, x, negative, positive, t):
        """``run(x, embeds)`` is one transformer call; returns its prediction, or with CFG (uncond, cond)."""
        self.timestep = t
        self.step_index += 1
        if negative is None:
            return self._branch(run, x, positive, "cond")
        if self.cfg_mode == "batched":
            return self._branch(run, torch.cat([x, x]), torch.cat([negative, positive]), "cond_uncond").chunk(2)
        if self.spec.name == "fbc":
            return self._fbc_sequential(run, x, negative, positive)
        return self._branch(run, x, negative, "uncond"), self._branch(run, x, positive, "cond")

    def _branch(self, run, x, embeds, name: str):
        """One CFG branch with its own cache state: first-block cache keeps one per cache context;
        PAB's hooks keep theirs on the hook object, swapped here."""
        if self.spec.name == "pab" and self.cfg_mode != "batched":
            self._swap_states(name)
        self._context = name
        with self.transformer.cache_context(name):
            return run(x, embeds)

    def _swap_states(self, name: str) -> None:
        from diffusers.hooks.pyramid_attention_broadcast import PyramidAttentionBroadcastState
        hooks = [hook for _, hook in self._hooks()]
        states = self._branch_states.setdefault(name, [PyramidAttentionBroadcastState() for _ in hooks])
        for hook, state in zip(hooks, states):
            hook.state = state

    def _fbc_sequential(self, run, x, negative, positive):
        """Block 0 of both branches decides, as on the batched pair: the uncond branch first takes the
        skip path (its output is the answer when the joint decision skips), the cond branch decides,
        and when it computes the uncond branch runs again in full (block 0 twice on those steps)."""
        try:
            if not self._seen:       # no residuals yet: both compute, as batched
                self.fbc_mode = "compute"
                pair = self._branch(run, x, negative, "uncond"), self._branch(run, x, positive, "cond")
                self._seen = True
                return pair
            self.fbc_mode = "probe"
            uncond = self._branch(run, x, negative, "uncond")
            self.fbc_mode = "joint"
            cond = self._branch(run, x, positive, "cond")
            if self._joint.joint:
                self.fbc_mode = "compute"
                uncond = self._branch(run, x, negative, "uncond")
            return uncond, cond
        finally:
            self.fbc_mode = "own"
            self.skip_tail = False


def finish_stats(cache: StepCache) -> CacheStats:
    """The run's counts (fastercache: every block runs in each computed branch pass; a CFG pair: both copies)."""
    stats = cache.stats
    for other in cache._siblings:
        for field in ("branch_passes", "block_runs", "attention_runs"):
            setattr(stats, field, getattr(stats, field) + getattr(other.stats, field))
    cache._siblings.clear()
    if cache.spec.name == "fastercache":
        stats.block_runs = stats.branch_passes * stats.layers
    return stats


@contextmanager
def applied(transformer: nn.Module, spec, cfg_mode: str, use_cfg: bool, split: str | None = None, steps: int = 50):
    """A :class:`StepCache` for the ``with`` body (a run of ``steps`` steps), or None for cache none."""
    spec = caches.check(spec, cfg_mode, use_cfg, split)
    if not spec.on:
        yield None
        return
    with StepCache(transformer, spec, cfg_mode, use_cfg, split, steps) as cache:
        yield cache
