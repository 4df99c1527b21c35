"""Step caches equal diffusers' pipeline with the same hook (fp32, CPU, tiny models, same seed).

The reference is CogVideoXImageToVideoPipeline with ``transformer.enable_cache(config)`` (the config
our cache name stands for); ours samples with the pipeline's own transformer, so the comparison is of
the denoising loops (the final latents, before the decode that tests/test_exactness.py covers), in both
CFG modes. Each case asserts that the cache skipped work at least once, and that the last block ran
as many times in ours as in diffusers (the same decisions), so a case cannot pass with a cache that
does nothing. The fbc threshold is 1.2, not 0.05: random weights change block 0's residual by ~1.0-1.5
(relative) from step to step, so 1.0 both skips and computes within 5 steps.
"""
import pytest
import torch

from cogvid_core.model import text
from cogvid_core.model import variants as models
from cogvid_core.model import vae as vae_mod
from cogvid_core.run import sampling
from cogvid_core.speed import caches
from test_exactness import _start_image

STEPS = 5
BOUND = 1e-4
FBC = {"dpm": "fbc:1.2", "ddim": "fbc:1.0"}     # per scheduler: both skip and compute in 5 steps
PROMPT, NEGATIVE = "a small boat drifts on a calm lake at dawn", "blurry"


@pytest.fixture(scope="module", params=list(models.VARIANTS))
def setup(request, tiny_ckpts):
    """The diffusers pipeline of one tiny variant, and our inputs encoded with its T5 and VAE."""
    from diffusers import CogVideoXImageToVideoPipeline
    key = request.param
    variant = models.VARIANTS[key]
    pipe = CogVideoXImageToVideoPipeline.from_pretrained(str(tiny_ckpts[key]["hf"]), dtype=torch.float32)
    return encoded(pipe, variant)


def encoded(pipe, variant) -> dict:
    """The pipeline, its variant's default tiny video shape, the start image, and both prompts and the image
    encoded with the pipeline's own T5 and VAE (what both sides sample from)."""
    frames, h, w = models.default_size(variant, models.transformer_config(variant, tiny=True))
    image = _start_image(w, h)
    with torch.no_grad():
        pos = text.encode_prompt(pipe.text_encoder, pipe.tokenizer, PROMPT, "cpu")
        neg = text.encode_prompt(pipe.text_encoder, pipe.tokenizer, NEGATIVE, "cpu")
        latent = vae_mod.encode_image(pipe.vae, image, h, w, variant, "crop", "cpu")
    return dict(pipe=pipe, variant=variant, frames=frames, h=h, w=w, image=image, pos=pos.embeds,
                neg=neg.embeds, latent=latent)


def _last_block_counter(transformer):
    """Batch rows the last block really computed (a hook inside the block: it fires only when it runs)."""
    runs = [0]
    handle = transformer.transformer_blocks[-1].norm1.register_forward_pre_hook(
        lambda m, a: runs.__setitem__(0, runs[0] + a[0].shape[0]))
    return runs, handle


def _reference(s, spec, scheduler):
    from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler
    pipe = s["pipe"]
    cls = CogVideoXDPMScheduler if scheduler == "dpm" else CogVideoXDDIMScheduler
    pipe.scheduler = cls.from_config(pipe.scheduler.config)
    runs, handle = _last_block_counter(pipe.transformer)
    pipe.transformer.enable_cache(caches.diffusers_config(spec, lambda: pipe.current_timestep))
    try:
        out = pipe(image=s["image"], prompt=PROMPT, negative_prompt=NEGATIVE, height=s["h"], width=s["w"],
                   num_frames=s["frames"], num_inference_steps=STEPS, guidance_scale=6.0, use_dynamic_cfg=True,
                   generator=torch.Generator("cpu").manual_seed(1234), output_type="latent").frames
    finally:
        pipe.transformer.disable_cache()
        handle.remove()
    return out, runs[0]


def _ours(s, spec, scheduler, cfg_mode, transformer=None):
    transformer = transformer if transformer is not None else s["pipe"].transformer
    runs, handle = _last_block_counter(transformer)
    stats = []
    try:
        lat = sampling.sample(transformer, s["variant"], s["pos"], s["neg"], s["latent"], s["frames"], steps=STEPS,
                              cfg=6.0, scheduler=scheduler, seed=1234, device="cpu", dtype=torch.float32,
                              cfg_mode=cfg_mode, cache=spec, cache_stats=stats)
    finally:
        handle.remove()
    return lat.samples, runs[0], stats[0] if stats else None


def _skipped(spec, stats) -> bool:
    if caches.parse(spec).name == "fbc":
        return stats.block_runs < stats.branch_passes * stats.layers
    return stats.attention_runs < stats.block_runs


@pytest.mark.parametrize("scheduler", ["dpm", "ddim"])
@pytest.mark.parametrize("spec", ["fbc", "pab", "fastercache"])
def test_matches_diffusers_hooks(setup, spec, scheduler):
    spec = FBC[scheduler] if spec == "fbc" else spec
    ref, ref_runs = _reference(setup, spec, scheduler)
    modes = ("batched",) if spec == "fastercache" else ("batched", "sequential")
    for cfg_mode in modes:
        ours, runs, stats = _ours(setup, spec, scheduler, cfg_mode)
        diff = (ours - ref).abs().max().item()
        print(f"{setup['variant'].key}/{spec}/{scheduler}/{cfg_mode}: max abs latent diff {diff:.2e}; {stats.line()}")
        assert ours.shape == ref.shape
        assert diff <= BOUND, f"{spec}/{scheduler}/{cfg_mode}: max abs latent diff {diff}"
        assert runs == ref_runs, f"the last block ran {runs} times, in diffusers {ref_runs}: other decisions"
        assert _skipped(spec, stats), f"{spec} skipped nothing: the comparison would prove nothing"
    if spec.startswith("fbc"):
        assert 2 < ref_runs < 2 * STEPS, "the fbc case must both skip and compute after the first step"


def test_uncached_run_after_a_cached_one_is_exact(setup):
    """The transformer is shared (ComfyUI): after a cached run the hooks are gone, forwards restored."""
    tr = setup["pipe"].transformer
    forwards = {m: m.__dict__.get("forward") for m in tr.modules()}   # diffusers' disable_cache leaves some
    before, _, _ = _ours(setup, "none", "dpm", "batched")
    for spec in (FBC["dpm"], "pab", "fastercache"):
        _ours(setup, spec, "dpm", "batched")
        assert not tr.is_cache_enabled
        assert {m: m.__dict__.get("forward") for m in tr.modules()} == forwards, "a forward was left changed"
    after, _, _ = _ours(setup, "none", "dpm", "batched")
    assert torch.equal(before, after)


@pytest.mark.parametrize("split", ["sequential", "cfg pair"])
def test_one_branch_decides_as_the_batched_pair(split):
    """First-block cache, one CFG branch at a time (or each on its own copy of a CFG pair, in two threads):
    the skip decision is the batched pair's. Here the uncond prompt changes a lot at the second step and
    the cond prompt very little: the pair computes (diffusers' decision), while a decision per branch
    would let the cond branch skip."""
    from concurrent.futures import ThreadPoolExecutor
    from cogvid_core.model.testing import build_random
    from cogvid_core.speed import multigpu as MG
    from cogvid_core.speed.stepcache import StepCache
    from test_placement import _inputs
    torch.manual_seed(0)
    variant = models.V15
    tr = build_random("transformer", variant, tiny=True, dtype=torch.float32)
    second = MG.attach_second(tr, "cpu").module if split == "cfg pair" else None
    kw = _inputs(tr, variant, batch=1)
    x, pos0, t = kw["hidden_states"], kw["encoder_hidden_states"], torch.tensor(500)
    g = torch.Generator().manual_seed(3)
    neg0, neg1 = torch.randn(pos0.shape, generator=g), torch.randn(pos0.shape, generator=g)
    pos1 = pos0 + 1e-4 * torch.randn(pos0.shape, generator=g)
    steps = [(neg0, pos0), (neg1, pos1), (neg1, pos1)]   # compute, compute (jointly), skip

    def run(xs, embeds, model=tr):
        return model(hidden_states=xs, encoder_hidden_states=embeds, timestep=t.expand(xs.shape[0]),
                     ofs=kw["ofs"][:1], image_rotary_emb=kw["image_rotary_emb"], return_dict=False)[0]

    runs, handle = _last_block_counter(tr)
    ref = []
    tr.enable_cache(caches.diffusers_config("fbc", None))
    with torch.no_grad():
        for neg, pos in steps:
            with tr.cache_context("cond_uncond"):
                ref.append(run(torch.cat([x, x]), torch.cat([neg, pos])).chunk(2))
    tr.disable_cache()
    ref_runs, runs[0] = runs[0], 0
    ours = []
    if second is None:
        with StepCache(tr, "fbc", "sequential", True) as cache, torch.no_grad():
            for neg, pos in steps:
                ours.append(cache.predict(run, x, neg, pos, t))
    else:
        with StepCache(tr, "fbc", "batched", True, caches.PAIR) as cache, cache.sibling(second) as other, \
                ThreadPoolExecutor(1) as pool, torch.no_grad():
            def uncond(neg):
                with torch.no_grad():
                    return other.one(lambda xs, e: run(xs, e, second), x, neg, t, "uncond")
            for neg, pos in steps:
                future = pool.submit(uncond, neg)
                cond = cache.one(run, x, pos, t, "cond")
                ours.append((future.result(), cond))
        runs[0] *= 2        # the counter sits on the first copy, which runs the cond branch only
    handle.remove()
    assert ref_runs == 4, "the reference should compute at steps 1 and 2 and skip step 3"
    assert runs[0] == ref_runs
    for (ru, rc), (ou, oc) in zip(ref, ours):
        assert (ou - ru).abs().max() <= BOUND and (oc - rc).abs().max() <= BOUND


# ------------------------------------------------------------------------------- streamed weights
@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """Tiny 1.5 single files with 6 blocks: enough to tell "a few blocks" from "all of them"."""
    from cogvid_core.model.testing import write_checkpoints
    root = tmp_path_factory.mktemp("deep_caches")
    return write_checkpoints(root, models.V15.key, tiny=True, dtype=torch.float32, layouts=("single",),
                             layers=6)["single"]["transformer"]


def _stream_inputs(tr):
    from cogvid_core.model.vae import ImageLatent
    g = torch.Generator().manual_seed(5)
    h, w = 64, 96
    latent = ImageLatent(mean=torch.randn(1, 16, 1, h // 8, w // 8, generator=g), std=torch.zeros(1, 16, 1, h // 8, w // 8),
                         height=h, width=w, scale=0.7)
    dim = tr.config.text_embed_dim
    return torch.randn(1, 226, dim, generator=g), torch.randn(1, 226, dim, generator=g), latent


def streamed_and_resident(path, cache, cfg_mode, monkeypatch, steps=STEPS):
    """The same run resident and streamed from ``path`` (file-backed), with ``cache``: (resident latents,
    streamed latents, the resident run's CacheStats, {block: reads from the file in the streamed run})."""
    from cogvid_core.memory import filestream, placement as P
    from cogvid_core.model import loading as L
    reads = {}
    schedule = filestream.FilePlacement._schedule

    def counted(self, i):
        before = i in self._pending or i in self._live
        schedule(self, i)
        if not before:
            reads[i] = reads.get(i, 0) + 1

    resident = L.load_transformer(path, dtype=torch.float32, progress=False)[0]
    P.place(resident, "cpu", "resident")
    pos, neg, latent = _stream_inputs(resident)
    kw = dict(steps=steps, cfg=6.0, scheduler="dpm", seed=3, device="cpu", dtype=torch.float32, cfg_mode=cfg_mode)
    stats = []
    want = sampling.sample(resident, models.V15, pos, neg, latent, 17, cache=cache, cache_stats=stats, **kw).samples
    lazy = L.load_transformer(path, dtype=torch.float32, progress=False)[0]
    placed = P.place(lazy, "cpu", "stream", degrade_on_cpu=False)
    monkeypatch.setattr(filestream.FilePlacement, "_schedule", counted)
    with placed.use():
        got = sampling.sample(lazy, models.V15, pos, neg, latent, 17, cache=cache, **kw).samples
    placed.release()
    return want, got, stats[0], reads


@pytest.mark.parametrize("cfg_mode", ["batched", "sequential"])
def test_streamed_blocks_the_cache_skips_are_not_read(deep, monkeypatch, cfg_mode):
    """File-backed streaming + first-block cache: the result equals the resident model's with the same
    cache, and blocks 1..5 are not read on the steps the cache skips (a large threshold skips every step
    after the first). Only block 0's read-ahead (blocks 1 and 2) is read again."""
    want, got, stats, reads = streamed_and_resident(deep, "fbc:10", cfg_mode, monkeypatch)
    assert stats.block_runs < stats.branch_passes * 6, "the cache skipped nothing"
    assert (got - want).abs().max() <= 1e-5
    first = 1 if cfg_mode == "batched" else 2                 # the first step's passes (one per branch)
    assert all(reads[i] == first for i in (3, 4, 5)), reads  # read for the first step only
    assert reads[0] >= STEPS


# ------------------------------------------------------------------------------- with the speed options
def test_compile_runs_under_every_cache(monkeypatch, caplog):
    """fbc goes on after compile set the blocks' compiled forward: the cache hook wraps the compiled block
    (same result as eager). PAB's and FasterCache's hooks replace the attention modules' forward: the
    parts around them compile (norms, feed-forward, the attention processor the hook calls), same result."""
    from cogvid_core.model.testing import build_random
    from cogvid_core.run import session
    from cogvid_core.speed import fast
    monkeypatch.setitem(fast.COMPILE_OPTIONS, "backend", "eager")
    torch._dynamo.reset()
    torch.manual_seed(0)
    tr = build_random("transformer", models.V15, tiny=True, dtype=torch.float32)
    pos, neg, latent = _stream_inputs(tr)
    kw = dict(steps=4, cfg=6.0, seed=3, device="cpu", dtype=torch.float32)
    comp = session.Component("transformer", tr, torch.device("cpu"), torch.float32, "resident", variant=models.V15)
    seen = []
    block = tr.transformer_blocks[1]
    h = block.register_forward_pre_hook(lambda m, a: seen.append(
        (m._diffusers_hook.get_hook("fbc_block_hook").fn_ref.original_forward is m.__dict__.get(fast._COMPILED))
        if m._diffusers_hook.get_hook("fbc_block_hook") else
        (isinstance(m.attn1.processor, fast._CompiledCall) and m.ff.__dict__.get("forward") is not None)))
    for spec in ("fbc:1.2", "pab", "fastercache"):
        eager = sampling.sample(tr, models.V15, pos, neg, latent, 17, cache=spec, **kw).samples
        seen.clear()
        with caplog.at_level("WARNING"), comp.with_speed("compile").use() as module, torch.inference_mode():
            compiled = sampling.sample(module, models.V15, pos, neg, latent, 17, cache=spec, **kw).samples
        assert (compiled - eager).abs().max() < 1e-5, spec
        assert seen and all(seen), (spec, seen)      # the first call sets up: its blocks run compiled
        assert "forward" not in block.__dict__ and not isinstance(block.attn1.processor, fast._CompiledCall)
    h.remove()
    assert "compile' is off" not in caplog.text


def _pair_of(tiny_ckpts, setup):
    from diffusers import CogVideoXTransformer3DModel
    from cogvid_core.speed import multigpu as MG
    pair = CogVideoXTransformer3DModel.from_pretrained(str(tiny_ckpts[setup["variant"].key]["hf"]),
                                                       subfolder="transformer", torch_dtype=torch.float32)
    MG.attach_second(pair, "cpu")
    return pair, MG.second_of(pair).module


@pytest.mark.parametrize("scheduler", ["dpm", "ddim"])
@pytest.mark.parametrize("spec", ["pab", "fbc"])
def test_caches_on_a_cfg_pair_match_diffusers(setup, tiny_ckpts, scheduler, spec):
    """Two devices (both the CPU here, the two-GPU code path): each copy of the transformer holds its own
    hooks and one branch's state, and the pair takes the batched pair's decisions (fbc: both copies'
    block-0 residuals decide at once)."""
    spec = FBC[scheduler] if spec == "fbc" else spec
    pair, second = _pair_of(tiny_ckpts, setup)
    forwards = [{m: m.__dict__.get("forward") for m in tr.modules()} for tr in (pair, second)]
    calls = []
    handle = second.register_forward_pre_hook(lambda m, a, k: calls.append(k["hidden_states"].shape[0]),
                                              with_kwargs=True)
    ref, ref_runs = _reference(setup, spec, scheduler)
    one = _ours(setup, spec, scheduler, "batched")[2]
    try:
        ours, runs, stats = _ours(setup, spec, scheduler, "batched", transformer=pair)
    finally:
        handle.remove()
    assert calls == [1] * STEPS, "the second copy ran the unconditional branch once per step"
    diff = (ours - ref).abs().max().item()
    assert diff <= BOUND, f"{spec} on a CFG pair: max abs latent diff {diff}"
    assert (stats.branch_passes, stats.block_runs, stats.attention_runs) == \
        (one.branch_passes, one.block_runs, one.attention_runs), f"{stats.line()} vs one device: {one.line()}"
    assert 2 * runs == ref_runs, "the first copy's last block (cond) ran half as often as diffusers' batched one"
    assert _skipped(spec, stats)
    assert not pair.is_cache_enabled and not second.is_cache_enabled
    assert [{m: m.__dict__.get("forward") for m in tr.modules()} for tr in (pair, second)] == forwards


def test_split_runs_refuse_the_cache_they_cannot_run_and_name_what_runs():
    assert caches.check("pab", "batched", True, caches.PAIR).name == "pab"
    assert caches.check("fbc", "batched", True, caches.PAIR).name == "fbc"
    with pytest.raises(ValueError, match="use cache fbc, pab or teacache on the pair, or one GPU with fastercache"):
        caches.check("fastercache", "batched", True, caches.PAIR)
    assert all(caches.check(c, "batched", True, caches.TORCHRUN).name == c for c in ("fbc", "pab", "fastercache"))


@pytest.mark.parametrize("failing", ["second", "first"])
def test_a_failing_branch_on_a_cfg_pair_with_fbc_does_not_leave_the_other_waiting(setup, tiny_ckpts, failing):
    """fbc's joint decision makes the two copies wait for each other's block 0: an error in one copy
    before its block 0 must end the run with that error, not hang the other copy."""
    import threading
    pair, second = _pair_of(tiny_ckpts, setup)
    victim = second if failing == "second" else pair
    calls = []

    def boom(module, args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected failure in one copy's block 0")
    handle = victim.transformer_blocks[0].register_forward_pre_hook(boom)
    result = {}

    def sample():
        try:
            _ours(setup, FBC["dpm"], "dpm", "batched", transformer=pair)
        except BaseException as e:   # noqa: BLE001  (the test reads what came out)
            result["error"] = e
    worker = threading.Thread(target=sample, daemon=True)
    worker.start()
    worker.join(timeout=120)
    handle.remove()
    assert not worker.is_alive(), "the run hung: one copy waited for the other's decision"
    assert "injected failure" in str(result.get("error")), result
