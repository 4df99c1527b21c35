"""Components are values: applying a plan gives a configured copy, and each use runs with the
settings of the value in hand, however many copies of one loaded module exist."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import comfy_stub
from cogvid_core.model import variants as M
from cogvid_core.run import session
from cogvid_core.memory.activations import ff_chunk_tokens, low_mem_attention_enabled
from cogvid_core.memory.placement import Placed
from cogvid_core.memory.profiles import PROFILES
from cogvid_core.model.testing import build_random
from test_nodes import _encoded, comfy, models_root, run  # noqa: F401  (fixture re-export)
from test_placement import _inputs


def _settings(module) -> tuple:
    return ff_chunk_tokens(module), low_mem_attention_enabled(module)


BALANCED = (PROFILES["balanced"].ff_chunk, True)    # chunked feed-forward, low-memory RoPE attention
RESIDENT = (None, False)                           # neither


@pytest.fixture
def observed(monkeypatch):
    """What each forward of a transformer saw: (ff chunk, low-mem attention, placement mode asked for
    at the last acquire). The placement mode is read at `session.place`, where a use asks for it."""
    seen, modes = [], []
    real_place = session.place

    def place(module, device, mode, **kw):
        modes.append(mode)
        return real_place(module, device, mode, **kw)
    monkeypatch.setattr(session, "place", place)

    def watch(module):
        return module.register_forward_pre_hook(lambda m, args: seen.append((*_settings(m), modes[-1])))
    return seen, watch


@pytest.fixture
def transformer():
    torch.manual_seed(0)
    module = build_random("transformer", M.V15, tiny=True, dtype=torch.float32)
    return session.Component("transformer", module, torch.device("cpu"), torch.float32, variant=M.V15)


def test_with_plan_is_a_copy_and_each_use_has_its_own_settings(transformer, observed):
    seen, watch = observed
    balanced, resident = transformer.with_plan("balanced"), transformer.with_plan("resident")
    assert (balanced.profile.name, balanced.mode) == ("balanced", "offload")
    assert (resident.profile.name, resident.mode) == ("resident", "resident")
    assert balanced.module is resident.module is transformer.module
    assert balanced.extra is resident.extra is transformer.extra        # one patcher per loaded module
    kw = _inputs(transformer.module, M.V15, batch=1)
    hook = watch(transformer.module)
    try:
        balanced.configure()          # configured, then another copy used before it: no leak either way
        for comp in (resident, balanced, resident, transformer):
            with comp.use() as module, torch.no_grad():
                module(**kw)
    finally:
        hook.remove()
    assert seen == [(*RESIDENT, "resident"), (*BALANCED, "offload"), (*RESIDENT, "resident"),
                    (*RESIDENT, "offload")]     # the plain value: as loaded, auto placement
    # the value another node holds is unchanged, and cannot be changed in place
    assert transformer.profile is None and transformer.mode == "offload"
    with pytest.raises(dataclasses.FrozenInstanceError):
        transformer.profile = PROFILES["lowvram"]
    transformer.release()


def test_explicit_placement_wins_over_the_plan(transformer):
    pinned = dataclasses.replace(transformer, placement="stream")
    assert pinned.with_plan("resident").mode == "stream"
    vae = session.Component("vae", torch.nn.Linear(2, 2), torch.device("cpu"), torch.float32)
    assert vae.with_plan("lowvram").mode == "offload" and vae.mode == "offload"


@pytest.mark.parametrize("error", [ValueError, KeyboardInterrupt, comfy_stub.InterruptProcessingException])
def test_use_ends_on_any_exception(transformer, monkeypatch, error):
    ended = []
    real = Placed.offload
    monkeypatch.setattr(Placed, "offload", lambda self: (ended.append(self.module), real(self))[1])
    with pytest.raises(error):
        with transformer.with_plan("balanced").use() as module:
            assert module is transformer.module
            raise error("stop")
    assert ended == [transformer.module]
    transformer.release()


# ------------------------------------------------------------------------------- through the nodes
def test_one_loader_two_samplers_with_different_plans(comfy, observed):  # noqa: F811
    nodes, _ = comfy
    seen, watch = observed
    tr, t5, vae, cond, lat = _encoded(nodes)
    plans = {}
    for name in ("balanced", "resident"):
        plans[name] = run(nodes["CogVidVRAMEstimate"], variant="CogVideoX1.5-5B-I2V", frames=17, width=96,
                          height=64, profile=name, budget_gib=0.0).args[2]
    hook = watch(tr.module)
    try:
        for name in ("balanced", "resident", "balanced"):
            run(nodes["CogVidSampler"], transformer=tr, conditioning=cond, image_latent=lat, frames=17, steps=1,
                cfg=1.0, dynamic_cfg=False, scheduler="dpm", seed=0, plan=plans[name])
    finally:
        hook.remove()
    assert seen == [(*BALANCED, "offload"), (*RESIDENT, "resident"), (*BALANCED, "offload")]
    assert tr.profile is None and tr.mode == "offload"                 # the loader's output is untouched
