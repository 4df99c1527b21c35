"""The scheduler's noise drawn one draw ahead, on a worker thread.

CogVideoX's DPM scheduler draws the full latent's noise from the run's CPU generator twice a step
(diffusers' ``randn_tensor``: on the CPU, then moved to the GPU), as diffusers' pipeline does. On the H100
machine's CPU each bf16 draw of the 1.5 latent (1 x 22 x 16 x 96 x 170) took ~140 ms (torch.profiler,
bench/caches15_ours_fast_teacache02_profile_h100.json): a step whose transformer pass a step cache skips
waited 0.27 s for them, with the GPU idle. Here the next draw runs on a thread while the step's GPU work and
the next step's launches go on, and the scheduler's call gets it.

Exact by construction: the same generator draws the same tensors in the same order; a draw the scheduler
asks for with other arguments than the one prepared puts the generator back to where it was before the
prepared draw and draws directly. The scheduler's ``torch.randn`` is caught with a TorchFunctionMode
(torch's public hook for this), active only around the scheduler's step. When the run ends the extra draw
is undone, so the generator ends where diffusers' would.
"""
from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext

import torch
from torch.overrides import TorchFunctionMode


# COGVID_NOISE_AHEAD=0: every draw in the scheduler's step, as diffusers does (A/B measurements)
ENABLED = os.environ.get("COGVID_NOISE_AHEAD", "1") != "0"


def noise_ahead(generator) -> "NoiseAhead | None":
    """A NoiseAhead opened for a CPU generator (the runs' kind), None when off or for another generator."""
    if not ENABLED or not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
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

    def __init__(self, generator: torch.Generator):
        super().__init__()
        self.generator = generator
        self._pool: ThreadPoolExecutor | None = None
        self._next: tuple[tuple, torch.Tensor, Future] | None = None   # (arguments, generator state before, draw)
        self.served = self.direct = 0      # draws taken from the thread / drawn in the step (tests, logs)

    # --- the run
    def open(self) -> "NoiseAhead":
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="cogvid-noise")
        return self

    def close(self) -> None:
        """Wait for a draw in flight and undo it (the generator as if it had never been made)."""
        if self._next is not None:
            _, state, fut = self._next
            self._next = None
            fut.exception()             # wait; its error, if any, no longer matters
            self.generator.set_state(state)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    # --- the scheduler's draws
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.randn and kwargs.get("generator") is self.generator and self._pool is not None:
            return self._take(args, kwargs)
        return func(*args, **kwargs)

    def _take(self, args: tuple, kwargs: dict) -> torch.Tensor:
        key = _key(args, kwargs)
        out = None
        if self._next is not None:
            prepared, state, fut = self._next
            self._next = None
            drawn = fut.result()
            if prepared == key:
                out = drawn
                self.served += 1
            else:                       # another draw than the one prepared: as if it had not been made
                self.generator.set_state(state)
        if out is None:
            out = torch.randn(*args, **kwargs)    # inside its own handler the mode is off
            self.direct += 1
        state = self.generator.get_state()
        self._next = (key, state, self._pool.submit(_draw, args, kwargs))
        return out


def _draw(args: tuple, kwargs: dict) -> torch.Tensor:
    return torch.randn(*args, **kwargs)   # the worker thread has no mode on its stack


def _key(args: tuple, kwargs: dict) -> tuple:
    shape = tuple(args[0]) if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)) else tuple(args)
    return (shape, tuple(sorted((k, str(v)) for k, v in kwargs.items() if k != "generator")))
