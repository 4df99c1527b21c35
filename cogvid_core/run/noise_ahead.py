"""The scheduler's noise drawn ahead, on a worker thread.

CogVideoX's DPM scheduler draws the full latent's noise from the run's CPU generator twice a step
(diffusers' ``randn_tensor``: on the CPU, then moved to the GPU), as diffusers' pipeline does. On the H100
machine's CPU each bf16 draw of the 1.5 latent (1 x 22 x 16 x 96 x 170) took ~140 ms (torch.profiler,
bench/caches15_ours_fast_teacache02_profile_h100.json): a step whose transformer pass a step cache skips
waited 0.27 s for them, with the GPU idle. Here the next draws run on a thread while the GPU works, and the
scheduler's calls get them.

Exact by construction: the same generator draws the same tensors in the same order; a draw the scheduler
asks for with other arguments than those prepared puts the generator back to where it was before the
first prepared draw and draws directly. The scheduler's ``torch.randn`` is caught with a TorchFunctionMode
(torch's public hook for this), active only around the scheduler's step. When the run ends the extra draws
are undone, so the generator ends where diffusers' would.
"""
from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext

import torch
from torch.overrides import TorchFunctionMode


# COGVID_NOISE_AHEAD: "auto" (default) for runs on a GPU, where the CPU would otherwise wait for it; "1" on
# every device (tests: the CPU's scheduler arithmetic competes with the thread, bench/bench_noise_ahead.py);
# "0" never: every draw in the scheduler's step, as diffusers does (A/B measurements)
MODE = os.environ.get("COGVID_NOISE_AHEAD", "auto")
# draws prepared ahead: two steps' (DPM draws twice a step). A computed step (seconds) leaves the thread time to
# prepare them, so the skipped steps after it find their noise ready; each is one latent on the host (11 MB
# bf16 for 1.5 at 81x768x1360)
DEPTH = 4


def noise_ahead(generator, device) -> "NoiseAhead | None":
    """A NoiseAhead opened for a CPU generator (the runs' kind) of a run on ``device`` (see MODE), else None."""
    on = MODE == "1" or (MODE == "auto" and torch.device(device).type == "cuda")
    if not on or not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        return None
    return NoiseAhead(generator).open()


def in_step(ahead: "NoiseAhead | None"):
    """The mode around one scheduler step (nothing without one)."""
    return ahead if ahead is not None else nullcontext()


@contextmanager
def closing_ahead(ahead: "NoiseAhead | None"):
    """close() when the run ends, by error or interrupt too."""
    try:
        yield ahead
    finally:
        if ahead is not None:
            ahead.close()


class NoiseAhead(TorchFunctionMode):
    """``open()`` for the run, ``with ahead:`` around each scheduler step (the mode catches its draws),
    ``close()`` when the run ends (normally or not)."""

    def __init__(self, generator: torch.Generator, depth: int = DEPTH):
        super().__init__()
        self.generator, self.depth = generator, depth
        self._pool: ThreadPoolExecutor | None = None
        self._ahead: deque[tuple[tuple, Future]] = deque()   # (arguments, future of (state before, draw)), in order
        self.served = self.direct = 0      # draws taken from the thread / drawn in the step (tests, logs)

    # --- the run
    def open(self) -> "NoiseAhead":
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="cogvid-noise")
        return self

    def close(self) -> None:
        """Wait for the draws in flight and undo them (the generator as if they had never been made)."""
        self._undo()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _undo(self) -> None:
        if not self._ahead:
            return
        futures = [f for _, f in self._ahead]
        self._ahead.clear()
        for f in futures:
            f.exception()               # wait for each (one worker: in order); an error no longer matters
        if futures[0].exception() is None:
            self.generator.set_state(futures[0].result()[0])

    # --- the scheduler's draws
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.randn and kwargs.get("generator") is self.generator and self._pool is not None:
            return self._take(args, kwargs)
        return func(*args, **kwargs)

    def _take(self, args: tuple, kwargs: dict) -> torch.Tensor:
        key = _key(args, kwargs)
        if self._ahead and self._ahead[0][0] == key:
            out = self._ahead.popleft()[1].result()[1]
            self.served += 1
        else:                           # another draw than the ones prepared: as if they had not been made
            self._undo()
            out = torch.randn(*args, **kwargs)    # inside its own handler the mode is off
            self.direct += 1
        while len(self._ahead) < self.depth:   # the same draw again: the scheduler's next ones
            self._ahead.append((key, self._pool.submit(_draw, self.generator, args, kwargs)))
        return out


def _draw(generator: torch.Generator, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(the generator's state before, the draw), on the worker thread (no mode on its stack)."""
    return generator.get_state(), torch.randn(*args, **kwargs)


def _key(args: tuple, kwargs: dict) -> tuple:
    shape = tuple(args[0]) if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)) else tuple(args)
    return (shape, tuple(sorted((k, str(v)) for k, v in kwargs.items() if k != "generator")))
