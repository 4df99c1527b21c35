"""TeaCache (speed/teacache.py): the authors' script is the reference, fp32, CPU, tiny models, same seed.

The reference is TeaCache4CogVideoX1.5/teacache_sample_video.py of github.com/ali-vilab/TeaCache (it is
not a package: give a checkout in ``TEACACHE_DIR``, else that test skips): its ``teacache_forward`` bound
to the transformer of diffusers' CogVideoXImageToVideoPipeline, against our sampler with the same model,
threshold and seed. The other tests need no checkout: what the cache must do in every CFG mode, on a CFG
pair, with streamed weights, and that it leaves the transformer as it was.

Random tiny time embeddings change by ~50% a step, where the trained ones change by a few percent, and
the authors' polynomials are fitted to the trained range (far outside it they give huge or negative
values: every step computed, or none after the first). The tests shift the embedding's output bias so
the change is ~2% a step: the rescaled sum then grows by ~0.04 a step and threshold 0.1 both skips and
computes.
"""
import importlib.util
import os
import sys
import types
from pathlib import Path

import pytest
import torch

from cogvid_core.model import variants as models
from cogvid_core.run import sampling
from cogvid_core.speed import caches
from test_caches import BOUND, NEGATIVE, PROMPT, _last_block_counter, _stream_inputs, encoded

STEPS = 8
THRESHOLD = 0.1
_AUTHORS = {"cogvideox-5b-i2v": "CogVideoX-5b-I2V", "cogvideox1.5-5b-i2v": "CogVideoX1.5-5B-I2V"}


def _slow_embedding(transformer, shift: float = 5.0):
    """The timestep embedding moved away from 0, so its relative change per step is small (as trained)."""
    with torch.no_grad():
        transformer.time_embedding.linear_2.bias.add_(shift)


@pytest.fixture(scope="module", params=list(models.VARIANTS))
def tea(request, tiny_ckpts):
    from diffusers import CogVideoXImageToVideoPipeline
    key = request.param
    pipe = CogVideoXImageToVideoPipeline.from_pretrained(str(tiny_ckpts[key]["hf"]), dtype=torch.float32)
    _slow_embedding(pipe.transformer)
    return encoded(pipe, models.VARIANTS[key])


def _ours(s, spec, cfg_mode="batched", transformer=None, steps=STEPS):
    transformer = transformer if transformer is not None else s["pipe"].transformer
    runs, handle = _last_block_counter(transformer)
    stats = []
    try:
        lat = sampling.sample(transformer, s["variant"], s["pos"], s["neg"], s["latent"], s["frames"], steps=steps,
                              cfg=6.0, scheduler="dpm", seed=1234, device="cpu", dtype=torch.float32,
                              cfg_mode=cfg_mode, cache=spec, cache_stats=stats)
    finally:
        handle.remove()
    return lat.samples, runs[0], stats[0] if stats else None


def _authors_module():
    root = os.environ.get("TEACACHE_DIR")
    if not root:
        pytest.skip("TEACACHE_DIR (a checkout of github.com/ali-vilab/TeaCache) is not set")
    path = Path(root) / "TeaCache4CogVideoX1.5" / "teacache_sample_video.py"
    if not path.is_file():
        pytest.fail(f"TEACACHE_DIR={root} has no TeaCache4CogVideoX1.5/teacache_sample_video.py")
    spec = importlib.util.spec_from_file_location("teacache_authors", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _reference(s, authors, threshold):
    """The authors' forward on this pipeline's transformer (on the instance: the class stays diffusers')."""
    pipe = s["pipe"]
    tr = pipe.transformer
    tr.forward = types.MethodType(authors.teacache_forward, tr)
    state = dict(enable_teacache=True, rel_l1_thresh=threshold, accumulated_rel_l1_distance=0, cnt=0,
                 previous_modulated_input=None, previous_residual=None, previous_residual_encoder=None,
                 num_steps=STEPS, coefficients=authors.coefficients_dict[_AUTHORS[s["variant"].key]])
    for k, v in state.items():
        setattr(tr, k, v)
    runs, handle = _last_block_counter(tr)
    try:
        out = pipe(image=s["image"], prompt=PROMPT, negative_prompt=NEGATIVE, height=s["h"], width=s["w"],
                   num_frames=s["frames"], num_inference_steps=STEPS, guidance_scale=6.0, use_dynamic_cfg=True,
                   generator=torch.Generator("cpu").manual_seed(1234), output_type="latent").frames
    finally:
        handle.remove()
        for k in ("forward", *state):
            tr.__dict__.pop(k, None)
    return out, runs[0]


@pytest.mark.parametrize("threshold", [THRESHOLD, 0.2])
def test_matches_the_authors_script(tea, threshold):
    authors = _authors_module()
    ref, ref_runs = _reference(tea, authors, threshold)
    assert 4 < ref_runs < 2 * STEPS, f"the case must both skip and compute: {ref_runs} rows ran the last block"
    for cfg_mode in ("batched", "sequential"):
        ours, runs, stats = _ours(tea, f"teacache:{threshold}", cfg_mode)
        diff = (ours - ref).abs().max().item()
        print(f"{tea['variant'].key}/teacache:{threshold}/{cfg_mode}: max abs latent diff {diff:.2e}; {stats.line()}")
        assert diff <= BOUND, f"{cfg_mode}: max abs latent diff {diff}"
        assert runs == ref_runs, f"the last block ran {runs} times, in the authors' script {ref_runs}"


def test_one_branch_and_a_cfg_pair_take_the_batched_decisions(tea):
    """Every step is skipped or computed whole, by both branches alike, in every CFG mode."""
    from cogvid_core.speed import multigpu as MG
    want, want_runs, stats = _ours(tea, "teacache")
    assert 2 * 2 < want_runs < 2 * STEPS, f"the case must both skip and compute: {stats.line()}"
    assert stats.block_runs == want_runs * stats.layers and stats.branch_passes == 2 * STEPS
    seq, seq_runs, _ = _ours(tea, "teacache", "sequential")
    tr = tea["pipe"].transformer
    MG.attach_second(tr, "cpu")
    try:
        pair, pair_runs, pair_stats = _ours(tea, "teacache", "batched")
    finally:
        MG.detach_second(tr)
    assert seq_runs == want_runs and (seq - want).abs().max() <= BOUND
    assert pair_stats.block_runs == stats.block_runs and (pair - want).abs().max() <= BOUND
    assert pair_runs == want_runs // 2          # the counter sits on the first copy: the cond branch only


def test_a_threshold_below_every_step_s_change_computes_every_step_exactly(tea):
    """Here each step's rescaled change is 0.03 or more: at 0.01 every step computes, and the result is
    the uncached run's exactly (the cache's bookkeeping changes no value)."""
    plain, _, _ = _ours(tea, "none")
    low, runs, _ = _ours(tea, "teacache:0.01")
    assert runs == 2 * STEPS and torch.equal(low, plain)


def test_the_transformer_is_left_as_it_was(tea):
    tr = tea["pipe"].transformer
    forwards = {m: m.__dict__.get("forward") for m in tr.modules()}
    before, _, _ = _ours(tea, "none")
    _ours(tea, "teacache")
    assert {m: m.__dict__.get("forward") for m in tr.modules()} == forwards, "a forward was left changed"
    assert not any(m._forward_pre_hooks for m in tr.modules())
    assert not any(getattr(m, "_diffusers_hook", None) is not None and m._diffusers_hook.hooks for m in tr.modules())
    after, _, _ = _ours(tea, "none")
    assert torch.equal(before, after)


def test_a_skipped_step_reads_no_block(tmp_path, monkeypatch):
    """Streamed from the file: the steps TeaCache skips read none of the blocks (block 0 included), and
    the video equals the resident model's with the same cache."""
    from safetensors.torch import load_file, save_file
    from cogvid_core.model.testing import write_checkpoints
    from test_caches import streamed_and_resident
    path = write_checkpoints(tmp_path, models.V15.key, tiny=True, dtype=torch.float32, layouts=("single",),
                             layers=4)["single"]["transformer"]
    tensors = load_file(path)           # the shifted embedding in the file: a streamed model reads it there
    key = next(k for k in tensors if k.endswith("time_embedding.linear_2.bias"))
    tensors[key] += 5.0
    save_file(tensors, path)
    want, got, stats, reads = streamed_and_resident(path, "teacache", "sequential", monkeypatch, steps=STEPS)
    computed = stats.block_runs // stats.layers          # branch passes that ran the blocks
    assert computed < stats.branch_passes, "the cache skipped nothing"
    assert (got - want).abs().max() <= 1e-5
    # each computed pass reads every block once; a skipped one reads nothing (blocks 0-2 may also be read
    # ahead once more at the end of a pass, for a next pass that then skipped)
    assert reads[3] == computed, (reads, stats.line())
    assert all(computed <= reads[i] <= computed + 1 for i in (0, 1, 2)), reads


def test_names_thresholds_memory_and_every_mode():
    assert str(caches.parse("teacache")) == "teacache" and caches.parse("teacache").threshold == 0.1
    assert str(caches.parse("teacache:0.2")) == "teacache:0.2"
    assert caches.parse("fbc").threshold == caches.FBC_THRESHOLD and str(caches.parse("fbc:0.1")) == "fbc:0.1"
    with pytest.raises(ValueError, match=r"teacache:0\.2"):
        caches.parse("teacache:fast")
    with pytest.raises(ValueError, match="takes no arguments"):
        caches.parse("pab:0.2")
    for split in (None, caches.PAIR, caches.TORCHRUN):
        for mode in ("batched", "sequential"):
            assert caches.check("teacache", mode, True, split).name == "teacache"
    assert caches.check("teacache", "batched", False).name == "teacache"
    one = (100 + 226) * 64 * 2
    assert caches.held_bytes("teacache", 42, 100, 226, 64, branches=2) == 2 * one * 2
    assert caches.CHOICES[:len(caches.NAMES)] == caches.NAMES      # the combo keeps the saved values' order


def test_compile_runs_under_teacache(monkeypatch, caplog):
    """TeaCache goes on after compile set the blocks' compiled forward: a computed step runs the compiled
    blocks (same result as eager), a skipped one none."""
    from cogvid_core.model.testing import build_random
    from cogvid_core.run import session
    from cogvid_core.speed import fast
    from test_caches import _stream_inputs
    monkeypatch.setitem(fast.COMPILE_OPTIONS, "backend", "eager")
    torch._dynamo.reset()
    torch.manual_seed(0)
    tr = build_random("transformer", models.V15, tiny=True, dtype=torch.float32)
    _slow_embedding(tr)
    pos, neg, latent = _stream_inputs(tr)
    kw = dict(steps=STEPS, cfg=6.0, seed=3, device="cpu", dtype=torch.float32, cache="teacache")
    comp = session.Component("transformer", tr, torch.device("cpu"), torch.float32, "resident", variant=models.V15)
    seen = []
    block = tr.transformer_blocks[1]
    h = block.register_forward_pre_hook(lambda m, a: seen.append(
        m._diffusers_hook.get_hook("cogvid_teacache").fn_ref.original_forward is m.__dict__.get(fast._COMPILED)))
    stats = []
    eager = sampling.sample(tr, models.V15, pos, neg, latent, 17, cache_stats=stats, **kw).samples
    seen.clear()
    with caplog.at_level("WARNING"), comp.with_speed("compile").use() as module, torch.inference_mode():
        compiled = sampling.sample(module, models.V15, pos, neg, latent, 17, **kw).samples
    h.remove()
    assert stats[0].block_runs < stats[0].branch_passes * stats[0].layers, "the cache skipped nothing"
    assert (compiled - eager).abs().max() < 1e-5
    assert seen and all(seen), seen
    assert "forward" not in block.__dict__
    assert "compile' is off" not in caplog.text


def test_with_a_lora_matches_the_authors_script_with_peft(tiny_ckpts, tmp_path):
    """A LoRA as the nodes apply it (hooks on the Linears while in use) under TeaCache equals the authors'
    forward on diffusers' pipeline with the same LoRA loaded by PEFT: a reused residual holds the LoRA's
    effect as theirs does."""
    authors = _authors_module()
    pytest.importorskip("peft")
    from diffusers import CogVideoXImageToVideoPipeline
    from cogvid_core.model import loading, lora, testing
    from cogvid_core.run import session
    key = models.V15.key
    path = testing.write_lora(tmp_path / "peft.safetensors", key, ("attn", "ff"), rank=4, seed=1)
    pipe = CogVideoXImageToVideoPipeline.from_pretrained(str(tiny_ckpts[key]["hf"]), dtype=torch.float32)
    pipe.load_lora_weights(str(path), adapter_name="l0")
    pipe.set_adapters(["l0"], [0.7])
    _slow_embedding(pipe.transformer)
    s = encoded(pipe, models.V15)
    ref, ref_runs = _reference(s, authors, THRESHOLD)
    module, variant = loading.load_transformer(tiny_ckpts[key]["single"]["transformer"], dtype=torch.float32,
                                               file_backed=False)
    _slow_embedding(module)
    comp = session.Component("transformer", module, torch.device("cpu"), torch.float32, variant=variant)
    with comp.with_lora(lora.load_lora(path), 0.7).use() as hooked:
        ours, runs, _ = _ours(s, "teacache", "sequential", transformer=hooked)
    plain, _, _ = _ours(s, "teacache", "sequential", transformer=module)
    assert 4 < ref_runs < 2 * STEPS and runs == ref_runs
    assert (ref - plain).abs().max() > 1e-2, "the LoRA barely changes the latents: the comparison would prove little"
    assert (ours - ref).abs().max() <= BOUND


def test_fp8_quantizes_only_the_blocks_a_step_runs(tiny_ckpts, monkeypatch):
    """fp8 quantizes a block's weights as the block is called: on a step TeaCache skips (or the blocks fbc
    skips) nothing is quantized (on an H200 that was 0.34 s of every skipped step)."""
    from contextlib import ExitStack
    from cogvid_core.model import loading
    from cogvid_core.speed import fp8 as fp8_swap
    from test_fast import _FakeTorchao
    monkeypatch.setitem(sys.modules, "torchao", type(sys)("torchao"))
    monkeypatch.setitem(sys.modules, "torchao.quantization", _FakeTorchao)
    monkeypatch.setattr(fp8_swap, "_computable", lambda w: True)
    tr, variant = loading.load_transformer(tiny_ckpts[models.V15.key]["single"]["transformer"], dtype=torch.float32,
                                           file_backed=False)
    _slow_embedding(tr)
    s = dict(variant=variant, frames=17, **dict(zip(("pos", "neg", "latent"), _stream_inputs(tr))))
    per_block = 6   # to_q, to_k, to_v, to_out.0, ff.net.0.proj, ff.net.2
    for spec in ("teacache", "fbc:10"):
        _FakeTorchao.calls = 0
        with ExitStack() as stack:
            fp8_swap._fp8(tr, stack)
            _, _, stats = _ours(s, spec, transformer=tr)
        assert stats.block_runs < stats.branch_passes * stats.layers, f"{spec} skipped nothing"
        assert _FakeTorchao.calls == per_block * stats.block_runs // 2, (spec, _FakeTorchao.calls, stats.line())


def test_a_cfg_pair_takes_one_decision_per_step_where_its_copies_measure_differently(tea):
    """Two cards can round the timestep embedding differently: the pair's copies still skip or compute
    each step together (the copy that reaches a step first decides it). Here the second copy's embedding
    is perturbed by a few percent a step, enough to change its own decisions."""
    from cogvid_core.speed import multigpu as MG
    tr = tea["pipe"].transformer
    second = MG.attach_second(tr, "cpu").module
    g = torch.Generator().manual_seed(0)
    perturb = second.time_embedding.register_forward_hook(
        lambda m, a, out: out * (1 + 0.05 * torch.randn(1, generator=g)))
    runs, counter = _last_block_counter(second)
    try:
        _, first_runs, _ = _ours(tea, "teacache", "batched")
    finally:
        perturb.remove()
        counter.remove()
        MG.detach_second(tr)
    assert 2 < first_runs < STEPS, "the case must both skip and compute"
    assert runs[0] == first_runs, f"the copies took different decisions: cond {first_runs}, uncond {runs[0]}"
