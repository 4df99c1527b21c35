"""Seconds per sampling step, as the GPU finished them."""
from __future__ import annotations

import time

import torch


def step_clock(device):
    """(marks, mark): ``mark(*anything)`` (a progress or step-end callback) waits for ``device`` and appends
    the time; returns {} so it also serves as diffusers' ``callback_on_step_end``."""
    marks = []

    def mark(*_a, **_k):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        marks.append(time.perf_counter())
        return {}
    return marks, mark
