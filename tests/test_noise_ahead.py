"""The scheduler's noise drawn one draw ahead on a thread (run/noise_ahead.py): the same tensors in the same
order as drawing them in the step, whatever the scheduler asks for, and the generator left where it would be."""
from __future__ import annotations

import threading

import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

from cogvid_core.run import noise_ahead as NA
from cogvid_core.run import sampling
from cogvid_core.model import testing
from cogvid_core.model import variants as M

A, B = (1, 3, 4, 8, 8), (2, 5)


def _draws(generator, asks, ahead=None):
    """Each ask (shape, dtype) as the scheduler draws it: diffusers' randn_tensor with the generator."""
    out = []
    for shape, dtype in asks:
        with NA.in_step(ahead):
            out.append(randn_tensor(shape, generator=generator, device=torch.device("cpu"), dtype=dtype))
    return out


@pytest.mark.parametrize("depth", [1, 4])
@pytest.mark.parametrize("asks", [
    [(A, torch.bfloat16)] * 5,                                            # a run: one shape throughout
    [(A, torch.float32), (A, torch.float32), (B, torch.float32), (A, torch.float32), (A, torch.bfloat16)],
])
def test_draws_equal_the_plain_generator_and_the_extra_draws_are_undone(asks, depth):
    plain_g = torch.Generator().manual_seed(7)
    plain = _draws(plain_g, asks)
    g = torch.Generator().manual_seed(7)
    ahead = NA.NoiseAhead(g, depth).open()
    try:
        got = _draws(g, asks, ahead)
    finally:
        ahead.close()
    assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(plain, got))
    changes = sum(a != b for a, b in zip(asks, asks[1:]))
    assert ahead.direct == 1 + changes and ahead.served == len(asks) - ahead.direct
    assert torch.equal(g.get_state(), plain_g.get_state())      # the prepared draws nobody took: undone


def test_only_the_runs_generator_and_only_inside_a_step_are_caught():
    g, other = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    ahead = NA.NoiseAhead(g).open()
    try:
        with ahead:
            x = torch.randn(4, generator=other)                 # another generator: drawn as asked
            y = torch.randn(4)                                  # the global one
        z = torch.randn(4, generator=g)                         # outside a step: the plain call
    finally:
        ahead.close()
    assert torch.equal(x, torch.randn(4, generator=torch.Generator().manual_seed(1)))
    assert y.shape == (4,) and ahead.served == ahead.direct == 0
    assert torch.equal(z, torch.randn(4, generator=torch.Generator().manual_seed(1)))


def test_the_draw_runs_on_the_worker_thread_without_the_mode():
    """The mode stack is per thread: the worker's own randn is not caught again."""
    g = torch.Generator().manual_seed(3)
    seen = []
    real = NA._draw

    def spy(generator, args, kwargs):
        seen.append(threading.current_thread().name)
        return real(generator, args, kwargs)
    ahead = NA.NoiseAhead(g).open()
    NA._draw, saved = spy, real
    try:
        _draws(g, [(A, torch.float32)] * 3, ahead)
    finally:
        NA._draw = saved
        ahead.close()
    assert seen and all(name.startswith("cogvid-noise") for name in seen)


def test_on_for_gpu_runs_by_default_and_as_the_environment_says(monkeypatch):
    monkeypatch.setattr(NA, "MODE", "auto")
    assert NA.noise_ahead(torch.Generator(), "cpu") is None          # the CPU's own arithmetic would compete
    opened = NA.noise_ahead(torch.Generator(), "cuda:0")             # (no CUDA call is made)
    assert isinstance(opened, NA.NoiseAhead)
    opened.close()
    assert NA.noise_ahead(None, "cuda:0") is None
    monkeypatch.setattr(NA, "MODE", "0")
    assert NA.noise_ahead(torch.Generator(), "cuda:0") is None
    monkeypatch.setattr(NA, "MODE", "1")
    opened = NA.noise_ahead(torch.Generator(), "cpu")
    assert isinstance(opened, NA.NoiseAhead)
    opened.close()


def _sample(tr, steps=4):
    v = M.V15
    frames, h, w = M.default_size(v, dict(tr.config))
    from cogvid_core.model.vae import ImageLatent
    g = torch.Generator().manual_seed(5)
    shape = (1, 16, 1, h // 8, w // 8)
    image = ImageLatent(mean=torch.randn(shape, generator=g), std=torch.full(shape, 0.1), scale=0.7, height=h, width=w)
    emb = torch.randn(1, tr.config.max_text_seq_length, tr.config.text_embed_dim, generator=g)
    with torch.inference_mode():
        return sampling.sample(tr, v, emb, emb * 0.5, image, frames, steps=steps, cfg=6.0, seed=11)


def test_sampling_is_bit_identical_with_and_without(monkeypatch):
    """The whole loop (DPM: one draw on the first and last step, two between): the same latents to the bit,
    and every draw after the first of a run served from the thread."""
    tr = testing.build_random("transformer", M.V15.key, tiny=True, seed=2)
    monkeypatch.setattr(NA, "MODE", "0")
    plain = _sample(tr)
    monkeypatch.setattr(NA, "MODE", "1")
    made = []
    opener = NA.NoiseAhead.open

    def keep(self):
        made.append(self)
        return opener(self)
    monkeypatch.setattr(NA.NoiseAhead, "open", keep)
    got = _sample(tr)
    assert torch.equal(plain.samples, got.samples)
    assert len(made) == 1 and made[0].direct == 1 and made[0].served == 2 * 4 - 2 - 1
