"""Seconds per sampling step, as the GPU finished them."""
from __future__ import annotations

import sys
import time

import torch


def step_clock(device, echo: bool = False):
    """(marks, mark): ``mark(*anything)`` (a progress or step-end callback) waits for ``device`` and appends
    the time; returns {} so it also serves as diffusers' ``callback_on_step_end``. ``echo``: each step's
    seconds also go to stderr as they happen (a run cut short by its time limit still shows its pace)."""
    marks = []

    def mark(*_a, **_k):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        marks.append(time.perf_counter())
        if echo and len(marks) > 1:
            print(f"step {len(marks)}: {marks[-1] - marks[-2]:.2f} s", file=sys.stderr, flush=True)
        return {}
    return marks, mark
