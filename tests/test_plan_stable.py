"""Without a plan, 'auto' picks the same profile queue after queue: the bytes the transformer already holds
on the device count as free for its own plan (a card that fits resident only without the transformer on
it flipped resident <-> balanced every queue, re-reading ~11 GB)."""
from __future__ import annotations

import sys

import pytest
import torch

from cogvid_core.model import variants as M
from cogvid_core.plan import cards
from cogvid_core.plan import estimate as E
from cogvid_core.plan import planner
from cogvid_core.run import session
from test_nodes import comfy, models_root  # noqa: F401  (fixtures used by name)

GiB = 1024 ** 3


@pytest.fixture(autouse=True)
def bf16_card(monkeypatch):
    """The simulated card has bf16 (precision 'auto' asks the device, which a CPU build cannot answer)."""
    from cogvid_core.model import precision as P
    monkeypatch.setattr(P, "native_bf16", lambda device: True)
SHAPE = (81, 768, 1360)        # 1.5's default video: resident needs a 32-40 GB card


class Card:
    """One GPU as the planner reads it: ``total`` bytes, less what a resident transformer holds."""

    def __init__(self):
        resident = E.estimate(M.V15, *SHAPE, "resident")
        self.weights = resident.stage("denoise_step").weights
        # resident fits an empty card, and not one that still holds the weights
        self.total = resident.needed_bytes + GiB // 2
        assert self.total - self.weights < resident.needed_bytes
        self.held = 0

    def after(self, profile) -> None:
        """What the run leaves on the card: the weights when resident, nothing otherwise."""
        self.held = self.weights if profile.transformer == "resident" else 0


def _transformer(card, monkeypatch):
    monkeypatch.setattr(session.Component, "device_bytes", lambda self: card.held)
    module = torch.nn.Module()
    module.config = M.transformer_config(M.V15)     # the Sampler checks the video's shape against it first
    return session.Component("transformer", module, torch.device("cuda", 0), torch.bfloat16, variant=M.V15)


def test_session_auto_is_stable_across_queues(monkeypatch):
    card = Card()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cards, "device_card", lambda: None)     # no card name on a CPU machine
    monkeypatch.setattr(planner, "device_free_bytes", lambda device: card.total - card.held)
    tr = _transformer(card, monkeypatch)
    chosen = []
    for _queue in range(3):
        _, profile, _ = session.plan_for(tr, None, *SHAPE)
        chosen.append(profile.name)
        card.after(profile)
    assert chosen == ["resident"] * 3


class _Stop(Exception):
    pass


def test_sampler_node_auto_is_stable_across_queues(comfy, monkeypatch):
    """The node plans from free VRAM as ComfyUI counts it: the transformer's own bytes go back in."""
    nodes, _ = comfy
    sampler = sys.modules[nodes["CogVidSampler"].__module__]
    card = Card()
    monkeypatch.setattr(sampler.C, "budget_bytes", lambda gib, device: card.total - card.held)
    chosen = []

    def stop_before_sampling(transformer, *args, **kwargs):
        chosen.append(transformer.profile.name)
        raise _Stop
    monkeypatch.setattr(sampler.memory, "in_use", stop_before_sampling)
    tr = _transformer(card, monkeypatch)
    latent = type("Latent", (), {"height": SHAPE[1], "width": SHAPE[2]})()
    for _queue in range(3):
        with pytest.raises(_Stop):
            nodes["CogVidSampler"].execute(tr, None, latent, SHAPE[0], 1, 6.0, True, "dpm", 0)
        card.after(session.get_profile(chosen[-1]))
    assert chosen == ["resident"] * 3
