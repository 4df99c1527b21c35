"""TeaCache on our transformer: whole denoising steps skipped when the timestep embedding barely moved.

The method (Liu et al., "Timestep Embedding Tells: It's Time to Cache for Video Diffusion Model", CVPR
2025) and its CogVideoX numbers come from the authors' script TeaCache4CogVideoX1.5/teacache_sample_video.py
(github.com/ali-vilab/TeaCache, commit 7c10efc), which replaces the transformer's forward. It is not in
diffusers, so it is built here on diffusers' public hook classes (``ModelHook`` / ``HookRegistry``) and
tested against that script when a checkout is given (tests/test_teacache.py, ``TEACACHE_DIR``):

* per step, the relative L1 change of the timestep embedding (the blocks' ``temb``) since the previous
  step, rescaled by the authors' polynomial for the model, is added up; while the sum stays under the
  threshold the step skips every block and adds the last computed pass's residual (blocks' output minus
  input, video and text tokens) instead; when it reaches it, the step computes and the sum restarts.
  The first and the last step always compute.
* The decision is taken once per step, before block 0 is called (a pre-hook that runs before a streamed
  block's read), so a skipped step reads no block from disk or host memory at all.
* It depends on the timestep embedding only, the same for both CFG branches and on every rank under
  torchrun; the two copies of a CFG pair share one decision per step (:class:`Decisions`: two cards
  may round the embedding differently). Each branch keeps its own residual (per cache context).
"""
from __future__ import annotations

import threading

from diffusers.hooks.hooks import HookRegistry, ModelHook

# the authors' rescaling polynomials (highest power first, numpy.poly1d's order), fitted on the trained
# models (TeaCache4CogVideoX1.5/teacache_sample_video.py, ``coefficients_dict``)
COEFFICIENTS = {
    "cogvideox-5b-i2v": (-1.53880483e+03, 8.43202495e+02, -1.34363087e+02, 7.97131516e+00, -5.23162339e-02),
    "cogvideox1.5-5b-i2v": (1.22842302e+02, -1.04088754e+02, 2.62981677e+01, -3.06009921e-01, 3.71213220e-02),
}
_HOOK = "cogvid_teacache"


def rescale(coefficients, x: float) -> float:
    """The polynomial at x (Horner, highest power first)."""
    y = 0.0
    for c in coefficients:
        y = y * x + c
    return y


def _arg(args, kwargs, name: str, index: int):
    return kwargs[name] if name in kwargs else args[index]


class _Block(ModelHook):
    """A block under TeaCache: on a skipped pass block 0 returns its input plus the kept residual and the
    others return their input; on a computed pass the last block keeps output minus block 0's input."""

    def __init__(self, tea: "TeaCache", index: int, last: bool):
        super().__init__()
        self.tea, self.index, self.last = tea, index, last

    def new_forward(self, module, *args, **kwargs):
        tea = self.tea
        if tea.skip:
            h = _arg(args, kwargs, "hidden_states", 0)
            e = _arg(args, kwargs, "encoder_hidden_states", 1)
            if self.index == 0:
                rh, re = tea.residual[tea.context()]
                h, e = h + rh, e + re
            return h, e
        if self.index == 0:
            tea.inputs = (_arg(args, kwargs, "hidden_states", 0), _arg(args, kwargs, "encoder_hidden_states", 1))
        out = self.fn_ref.original_forward(*args, **kwargs)
        if self.last:
            h0, e0 = tea.inputs
            tea.inputs = None
            tea.residual[tea.context()] = (out[0] - h0, out[1] - e0)
        return out


class Decisions:
    """The run's per-step decisions (the authors' rule), shared by the two copies of a CFG pair: the copy
    that reaches a step first decides it with its own measure, the other takes that decision, so both
    branches skip or compute together even where two cards round the embedding differently."""

    def __init__(self, variant_key: str, threshold: float, steps: int):
        self.coefficients, self.threshold, self.steps = COEFFICIENTS[variant_key], threshold, steps
        self._lock = threading.Lock()
        self._decided = None          # (step index, compute?) of the step decided last
        self._sum = 0.0

    def take(self, i: int, change) -> bool:
        """Step ``i``'s decision; ``change()`` is the embedding's relative change since the previous step."""
        with self._lock:
            if self._decided is not None and self._decided[0] == i:
                return self._decided[1]
            if i == 0 or i == self.steps - 1:
                compute, self._sum = True, 0.0
            else:
                self._sum += rescale(self.coefficients, change())
                compute = self._sum >= self.threshold
                if compute:
                    self._sum = 0.0
            self._decided = (i, compute)
            return compute


class TeaCache:
    """One run's TeaCache on ``blocks``, deciding through ``decisions``. ``step()`` gives the running
    step's index, ``context()`` the running CFG branch's name; ``on_pass(batch, computed)`` is told of
    each pass (counting)."""

    def __init__(self, blocks, decisions: Decisions, step, context, on_pass):
        self.blocks, self.decisions = blocks, decisions
        self.step, self.context, self.on_pass = step, context, on_pass
        self.skip = False
        self.inputs = None
        self.residual: dict = {}
        self._step = None             # the step whose embedding is ``_current``
        self._current = self._previous = None    # this step's and the previous step's timestep embedding
        self._handles = []

    def attach(self) -> None:
        n = len(self.blocks)
        for i, block in enumerate(self.blocks):
            HookRegistry.check_if_exists_or_initialize(block).register_hook(_Block(self, i, i == n - 1), _HOOK)
        # before any other pre-hook of block 0 (a streamed block's read): a skipped step reads nothing
        self._handles.append(self.blocks[0].register_forward_pre_hook(self._before, with_kwargs=True, prepend=True))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for block in self.blocks:
            registry = getattr(block, "_diffusers_hook", None)
            if registry is not None and registry.get_hook(_HOOK) is not None:
                registry.remove_hook(_HOOK, recurse=False)
        self.residual.clear()
        self.inputs = self._previous = self._current = None

    def _before(self, _module, args, kwargs):
        temb = _arg(args, kwargs, "temb", 2)
        compute = self._decide(temb)
        # a branch with no residual yet (the first pass) computes whatever the step decided
        self.skip = not compute and self.context() in self.residual
        self.on_pass(int(temb.shape[0]), not self.skip)

    def _decide(self, temb) -> bool:
        """The step's decision (taken at its first pass: per transformer call in the authors' script, one
        call per step with CFG batched)."""
        i = self.step()
        if self._step != i:
            self._step, self._previous, self._current = i, self._current, temb
        prev = self._previous
        return self.decisions.take(i, lambda: ((temb - prev).abs().mean() / prev.abs().mean()).item())
