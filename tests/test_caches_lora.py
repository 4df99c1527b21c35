"""Step caches with a LoRA: equal to diffusers' pipeline with the same LoRA and the same cache hook.

The reference is test_caches.py's (CogVideoXImageToVideoPipeline, ``transformer.enable_cache(config)``,
its helpers imported) with the LoRA loaded as test_lora.py loads it (``load_lora_weights`` +
``set_adapters``, PEFT layers in diffusers' transformer). Ours is a second transformer loaded from the
same values by our loader, the LoRA applied as the nodes apply it (``Component.with_lora`` -> hooks on
the Linears while in use) and sampled with the cache. The cache hooks then wrap blocks and attention
modules whose Linears carry LoRA hooks: a skipped block or reused attention output must hold the LoRA's
effect exactly as diffusers' cached output holds PEFT's. fp32, CPU, tiny 1.5 model, DPM, 4 steps (the
helpers' STEPS patched down from 5), the thresholds of test_caches for random weights.
"""
import pytest
import torch

import test_caches as TC
from cogvid_core.model import loading, lora, testing
from cogvid_core.model.lora_linear import LoraMixin
from cogvid_core.model import variants as models
from cogvid_core.run import session
from test_caches import BOUND, FBC, _ours, _reference, _skipped

K15 = models.V15.key
CPU = torch.device("cpu")
STEPS = 4
STRENGTH = 0.7
OTHER = -0.4                 # the strength change
EFFECT = 1e-2                # the LoRA (or its strength change) must move the latents this much: >> BOUND


@pytest.fixture(autouse=True)
def _few_steps(monkeypatch):
    monkeypatch.setattr(TC, "STEPS", STEPS)   # test_caches' _reference and _ours read it at each call


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory):
    return testing.write_lora(tmp_path_factory.mktemp("cache_lora") / "peft.safetensors", K15, ("attn", "ff"),
                              rank=4, seed=1)


def _component(tiny_ckpts) -> session.Component:
    module, variant = loading.load_transformer(tiny_ckpts[K15]["single"]["transformer"], dtype=torch.float32,
                                               file_backed=False)
    return session.Component("transformer", module, CPU, torch.float32, variant=variant)


@pytest.fixture(scope="module")
def setup(tiny_ckpts, lora_file):
    """test_caches' setup for the 1.5 variant, the pipeline with the LoRA loaded (adapter "l0"), and our
    own transformer (same values, no LoRA in its weights) with the LoRA read by our reader."""
    pytest.importorskip("peft")
    from diffusers import CogVideoXImageToVideoPipeline
    pipe = CogVideoXImageToVideoPipeline.from_pretrained(str(tiny_ckpts[K15]["hf"]), dtype=torch.float32)
    pipe.load_lora_weights(str(lora_file), adapter_name="l0")
    return dict(TC.encoded(pipe, models.V15), comp=_component(tiny_ckpts), lora=lora.load_lora(lora_file))


_REF = {}   # (spec, strength) -> (latents, last-block runs): the fbc reference serves both CFG modes


def _ref(s, spec, strength):
    if (spec, strength) not in _REF:
        s["pipe"].set_adapters(["l0"], [strength])
        _REF[spec, strength] = _reference(s, spec, "dpm")
    return _REF[spec, strength]


def _lora_hooks(module) -> int:
    return sum(isinstance(m, LoraMixin) for m in module.modules())   # LoRA Linears of the run


def _with_lora(s, spec, cfg_mode="batched", strength=STRENGTH, comp=None):
    """Our run with the LoRA at ``strength`` as the sampler node makes it: the value's use() hooks it on."""
    comp = (comp or s["comp"]).with_lora(s["lora"], strength)
    with comp.use() as module:
        assert _lora_hooks(module) > 0
        out = _ours(s, spec, "dpm", cfg_mode, transformer=module)
    assert _lora_hooks(comp.module) == 0 and not comp.module.is_cache_enabled
    return out


@pytest.mark.parametrize("spec,cfg_mode", [("fbc", "batched"), ("fbc", "sequential"), ("pab", "batched")])
def test_matches_diffusers_with_lora(setup, spec, cfg_mode):
    spec = FBC["dpm"] if spec == "fbc" else spec
    ref, ref_runs = _ref(setup, spec, STRENGTH)
    ours, runs, stats = _with_lora(setup, spec, cfg_mode)
    plain, _, _ = _ours(setup, spec, "dpm", cfg_mode, transformer=setup["comp"].module)   # same cache, no LoRA
    diff = (ours - ref).abs().max().item()
    effect = (ref - plain).abs().max().item()
    print(f"{spec}/{cfg_mode} + LoRA {STRENGTH}: max abs latent diff {diff:.2e}, LoRA effect {effect:.2e}; "
          f"{stats.line()}")
    assert ours.shape == ref.shape
    assert effect > EFFECT, "the LoRA barely changes the latents: the comparison would prove little"
    assert diff <= BOUND, f"{spec}/{cfg_mode}: max abs latent diff {diff}"
    assert runs == ref_runs, f"the last block ran {runs} times, in diffusers {ref_runs}: other decisions"
    assert _skipped(spec, stats), f"{spec} skipped nothing: the comparison would prove nothing"
    if spec.startswith("fbc"):
        assert 2 < ref_runs < 2 * STEPS, "the fbc case must both skip and compute after the first step"


def test_cached_lora_runs_leave_nothing_behind(setup, tiny_ckpts):
    """A fresh transformer (no cached run on it yet): the uncached LoRA run is bit-exact after cached LoRA
    runs; a strength change reaches the cached run (and equals diffusers at that strength)."""
    comp = _component(tiny_ckpts)
    tr = comp.module
    forwards = {m: m.__dict__.get("forward") for m in tr.modules()}
    weights = {k: v.clone() for k, v in tr.state_dict().items()}
    before, _, _ = _with_lora(setup, "none", comp=comp)
    cached = {}
    for spec in (FBC["dpm"], "pab", "fastercache"):
        cached[spec], _, stats = _with_lora(setup, spec, comp=comp)
        assert _skipped(spec, stats), f"{spec} skipped nothing"
        assert {m: m.__dict__.get("forward") for m in tr.modules()} == forwards, "a forward was left changed"
    after, _, _ = _with_lora(setup, "none", comp=comp)
    assert torch.equal(before, after)
    assert all(torch.equal(v, weights[k]) for k, v in tr.state_dict().items())
    for spec in (FBC["dpm"], "pab"):
        other, runs, stats = _with_lora(setup, spec, strength=OTHER, comp=comp)
        ref, ref_runs = _ref(setup, spec, OTHER)
        change = (other - cached[spec]).abs().max().item()
        diff = (other - ref).abs().max().item()
        print(f"{spec}: strength {STRENGTH} -> {OTHER} changes the cached latents by {change:.2e}; "
              f"vs diffusers at {OTHER}: {diff:.2e}; {stats.line()}")
        assert _skipped(spec, stats), f"{spec} skipped nothing"
        assert change > EFFECT, "the strength change did not reach the cached run"
        assert diff <= BOUND and runs == ref_runs
