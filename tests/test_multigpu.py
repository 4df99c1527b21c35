"""Two devices in one process: CFG branches at once on a second copy of the transformer, device
names, components on different devices. CPU runs take the very code path of two GPUs (two
"devices" that are both the CPU), so the result must equal the one-device run."""
from __future__ import annotations

import sys
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch

from cogvid_core.model import variants as M
from cogvid_core.speed import multigpu as MG
from cogvid_core.run import sampling
from cogvid_core.memory.placement import place, placed_of, unplace
from cogvid_core.model.testing import build_random
from cogvid_core.model.vae import ImageLatent

KEY = "cogvideox1.5-5b-i2v"


def _inputs(variant, seed=3):
    cfg = M.transformer_config(variant, tiny=True)
    frames, h, w = M.default_size(variant, cfg)
    g = torch.Generator().manual_seed(seed)
    dim = cfg["text_embed_dim"]
    pos, neg = (torch.randn(1, M.MAX_TEXT_TOKENS, dim, generator=g) for _ in range(2))
    lat = ImageLatent(mean=torch.randn(1, 16, 1, h // 8, w // 8, generator=g),
                      std=torch.rand(1, 16, 1, h // 8, w // 8, generator=g) * 0.1, height=h, width=w, scale=0.7)
    return frames, pos, neg, lat


def _sample(tr, variant, cfg_mode="sequential", steps=3, cfg=6.0):
    frames, pos, neg, lat = _inputs(variant)
    return sampling.sample(tr, variant, pos, neg, lat, frames, steps=steps, cfg=cfg, seed=5, device="cpu",
                           dtype=torch.float32, cfg_mode=cfg_mode).samples


@pytest.fixture
def transformer():
    return build_random("transformer", KEY, tiny=True, dtype=torch.float32)


def test_cfg_parallel_equals_one_device(transformer):
    variant = M.VARIANTS[KEY]
    one = _sample(transformer, variant, "sequential")
    batched = _sample(transformer, variant, "batched")
    MG.attach_second(transformer, "cpu")
    calls = []
    handle = MG.second_of(transformer).module.register_forward_pre_hook(lambda m, a, k: calls.append(1),
                                                                        with_kwargs=True)
    two = _sample(transformer, variant, "batched")    # the pair ignores batching: one branch per device
    handle.remove()
    assert len(calls) == 3, "the second copy ran the unconditional branch once per step"
    assert torch.equal(two, one), (two - one).abs().max()
    torch.testing.assert_close(two, batched, rtol=1e-5, atol=1e-5)
    assert two.abs().max() > 0.1


def test_cfg_parallel_sees_a_different_second_branch(transformer):
    """The check above can fail: a second copy with other weights changes the result."""
    variant = M.VARIANTS[KEY]
    one = _sample(transformer, variant)
    second = MG.attach_second(transformer, "cpu")
    with torch.no_grad():
        second.module.proj_out.weight.mul_(1.01)
    assert not torch.allclose(_sample(transformer, variant), one, atol=1e-4)


def test_no_cfg_runs_on_the_first_device_only(transformer):
    variant = M.VARIANTS[KEY]
    one = _sample(transformer, variant, cfg=1.0)
    calls = []
    second = MG.attach_second(transformer, "cpu")
    second.module.register_forward_pre_hook(lambda m, a: calls.append(1))
    assert torch.equal(_sample(transformer, variant, cfg=1.0), one)
    assert not calls


def test_replica_shares_weights_but_moves_alone(transformer):
    rep = MG.replicate(transformer)
    a, b = next(transformer.parameters()), next(rep.parameters())
    assert a is not b and a.data_ptr() == b.data_ptr()
    rep.to(torch.float64)               # placing one copy never converts or moves the other
    assert next(transformer.parameters()).dtype == torch.float32


def test_replica_refused_after_placement(transformer):
    place(transformer, "cpu", "resident")
    with pytest.raises(RuntimeError, match="before it is placed"):
        MG.replicate(transformer)
    unplace(transformer)
    transformer.proj_out.register_forward_hook(lambda *a: None)
    with pytest.raises(RuntimeError, match="hooked"):
        MG.replicate(transformer)


def test_second_copy_takes_the_first_ones_settings(transformer):
    from cogvid_core.memory.activations import apply_profile, ff_chunk_tokens, low_mem_attention_enabled

    second = MG.attach_second(transformer, "cpu")
    apply_profile(transformer, "lowvram")
    place(transformer, "cpu", "offload")
    with MG.mirrored(transformer, second) as rep:
        assert rep is second.module
        assert ff_chunk_tokens(rep) == ff_chunk_tokens(transformer) is not None
        assert low_mem_attention_enabled(rep)
        assert placed_of(rep).requested == "offload"


def test_parse_devices():
    m = MG.parse_devices("cpu,cpu")
    assert m.transformer == (torch.device("cpu"),) * 2 and m.second == torch.device("cpu")
    m = MG.parse_devices("transformer=cpu,t5=cpu")
    assert m.second is None and m.of("vae") == torch.device("cpu")
    assert MG.parse_pair("cpu+cpu") == (torch.device("cpu"),) * 2
    with pytest.raises(ValueError, match="unknown component 'unet'"):
        MG.parse_devices("cpu,unet=cpu")
    with pytest.raises(ValueError, match="one device or two"):
        MG.parse_devices("cpu,cpu,cpu")
    with pytest.raises(ValueError, match="given twice"):
        MG.parse_devices("cpu,transformer=cpu")
    with pytest.raises(ValueError, match="not a device name"):
        MG.parse_devices("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="sees no CUDA GPU"):
            MG.parse_devices("cuda:0,cuda:1")


def test_device_choices():
    assert MG.device_choices(1) == ["cuda:0", "cuda:1", "cuda:0+cuda:1"]
    assert "cuda:2+cuda:3" in MG.device_choices(4)


# ------------------------------------------------------------------------------ speed options on the pair
THREADS: list = []


@torch.library.custom_op("cogvid_test::thread_sdpa", mutates_args=())
def _thread_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """SDPA itself, noting which thread called it: the pair's second copy runs in the cogvid-cfg worker."""
    import threading
    THREADS.append(threading.current_thread().name)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)


@_thread_sdpa.register_fake
def _(q, k, v, scale):
    return torch.empty_like(q)


def _speed_kernel():
    from cogvid_core.speed import fast
    fast.register_attention(fast.AttentionKernel("threads", _thread_sdpa, lambda q, k, v: True, lambda device: None,
                                                 exact_class=True))


_speed_kernel()


def _state(tr) -> tuple:
    """What a use must leave as it found: hooks, instance forwards, classes, the Parameter objects."""
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in tr.modules())
    forwards = [n for n, m in tr.named_modules() if "forward" in m.__dict__]
    return hooks, forwards, [type(m) for m in tr.modules()], [id(p) for p in tr.parameters()]


def _pair():
    """The fixture's transformer built again (same seed: same weights) with its copy on a second CPU
    "device", attached before any use places it, as the loaders do."""
    tr = build_random("transformer", KEY, tiny=True, dtype=torch.float32)
    MG.attach_second(tr, "cpu")
    return tr


def _speed_sample(tr, speed, cfg_mode="sequential"):
    from cogvid_core.run import session
    variant = M.VARIANTS[KEY]
    comp = session.Component("transformer", tr, torch.device("cpu"), torch.float32, "resident", variant=variant)
    with comp.with_speed(speed).use() as module:
        out = _sample(module, variant, cfg_mode, steps=2)
        second = MG.second_of(module)
        compiled = second is not None and "forward" in second.module.transformer_blocks[0].__dict__
    return out, compiled


def test_cfg_pair_runs_the_speed_on_both_copies(transformer, monkeypatch):
    """Kernel redirect and regional compile on the pair's second copy too (its own worker thread): the
    pair equals the same speed on one device, and after the use both copies are as they were."""
    from cogvid_core.speed import fast
    monkeypatch.setitem(fast.COMPILE_OPTIONS, "backend", "eager")   # dynamo's tracing, no C++ build
    torch._dynamo.reset()
    variant = M.VARIANTS[KEY]
    plain = _sample(transformer, variant, steps=2)
    THREADS.clear()
    one, _ = _speed_sample(transformer, "threads+compile")
    layers = transformer.config.num_layers
    assert len(THREADS) == 2 * 2 * layers and not any(t.startswith("cogvid-cfg") for t in THREADS)
    pair = _pair()
    second = MG.second_of(pair).module
    before = _state(pair), _state(second)
    THREADS.clear()
    two, compiled = _speed_sample(pair, "threads+compile", "batched")   # the pair: one branch per copy
    assert compiled, "the second copy's blocks ran compiled"
    assert sum(t.startswith("cogvid-cfg") for t in THREADS) == 2 * layers, "the uncond branch took the kernel"
    assert len(THREADS) == 2 * 2 * layers
    torch.testing.assert_close(two, one, rtol=1e-5, atol=1e-5)      # exact-class parts: the one-device result
    torch.testing.assert_close(two, plain, rtol=1e-4, atol=1e-4)
    assert (_state(pair), _state(second)) == before
    THREADS.clear()
    assert torch.equal(_sample(pair, variant, steps=2), plain) and not THREADS   # exact again, both copies


def test_cfg_pair_swaps_fp8_weights_on_both_copies(transformer, monkeypatch):
    """fp8 (torchao stand-in that halves each weight: visibly wrong, so a copy left in bf16 shows): the
    pair equals fp8 on one device, and both copies get their own Parameters back."""
    from test_fast import _FakeTorchao
    from cogvid_core.speed import fast, fp8
    monkeypatch.setitem(sys.modules, "torchao", type(sys)("torchao"))
    monkeypatch.setitem(sys.modules, "torchao.quantization", _FakeTorchao)
    monkeypatch.setattr(fp8, "_computable", lambda w: True)
    monkeypatch.setattr(fast, "_fp8_reason", lambda device: None)   # the CPU stands in for an Ada/Hopper card
    variant = M.VARIANTS[KEY]
    plain = _sample(transformer, variant, steps=2)
    _FakeTorchao.calls = 0
    one, _ = _speed_sample(transformer, "fp8")
    per_sample = _FakeTorchao.calls
    assert (one - plain).abs().max() > 1e-3
    pair = _pair()
    second = MG.second_of(pair).module
    before = _state(pair), _state(second)
    _FakeTorchao.calls = 0
    two, _ = _speed_sample(pair, "fp8", "batched")
    assert _FakeTorchao.calls == per_sample                      # the same swaps, half of them on the copy
    torch.testing.assert_close(two, one, rtol=1e-5, atol=1e-5)
    assert (_state(pair), _state(second)) == before
    assert torch.equal(_sample(pair, variant, steps=2), plain)


# ------------------------------------------------------------------------------ the pipeline and CLI
def _job(image_size, cfg=6.0):
    import numpy as np
    from PIL import Image

    from cogvid_core.run import pipeline
    w, h = image_size
    img = Image.fromarray((np.random.RandomState(1).rand(h, w, 3) * 255).astype(np.uint8))
    return pipeline.Job(image=img, prompt="a boat on a lake", negative_prompt="blurry", steps=2, cfg=cfg, seed=9)


def _generate(tiny_ckpts, **kw):
    from cogvid_core.run import pipeline
    folder = str(tiny_ckpts[KEY]["hf"])
    variant = M.VARIANTS[KEY]
    _, h, w = M.default_size(variant, M.transformer_config(variant, tiny=True))
    return pipeline.generate(pipeline.Sources.from_model(folder), _job((w, h)), precision="fp32", profile="lowvram",
                             **kw)


def test_pipeline_cfg_pair_equals_one_device(tiny_ckpts, monkeypatch):
    one = _generate(tiny_ckpts, device="cpu")
    seen = []
    attach = MG.attach_second
    monkeypatch.setattr(MG, "attach_second", lambda m, d: seen.append(d) or attach(m, d))
    two = _generate(tiny_ckpts, devices="cpu,cpu")
    assert seen == [torch.device("cpu")]
    assert torch.equal(two.frames, one.frames)
    assert two.frames.std() > 0.01


def test_pipeline_cfg_pair_with_a_speed_equals_one_device(tiny_ckpts):
    """--devices cpu,cpu --speed threads: checked before the load (nothing refused), the kernel on both
    copies, the frames of the one-device run with the same speed."""
    THREADS.clear()
    one = _generate(tiny_ckpts, device="cpu", speed="threads")
    assert THREADS and not any(t.startswith("cogvid-cfg") for t in THREADS)
    THREADS.clear()
    two = _generate(tiny_ckpts, devices="cpu,cpu", speed="threads")
    assert sum(t.startswith("cogvid-cfg") for t in THREADS) == len(THREADS) // 2 > 0
    assert torch.equal(two.frames, one.frames)


def test_components_on_other_devices(tiny_ckpts, monkeypatch):
    """T5 and the VAE on one device, the transformer on another: each stage gets its component's
    device ("cpu:0" is a device named apart from "cpu" that a CPU machine has), the video is the same."""
    from cogvid_core.run import guard
    from cogvid_core.run import pipeline
    from cogvid_core.model import text
    from cogvid_core.model import vae
    one = _generate(tiny_ckpts, device="cpu")
    calls = {}

    def spy(mod, name, pos):
        real = getattr(mod, name)

        def wrapped(*a, **k):
            calls.setdefault(name, []).append(torch.device(k["device"] if "device" in k else a[pos]))
            return real(*a, **k)
        monkeypatch.setattr(mod, name, wrapped)
    spy(text, "encode_prompt", 3)
    spy(vae, "encode_image", 6)
    spy(guard, "decode", 2)
    spy(pipeline.sampling, "sample", -1)
    other = torch.device("cpu", 0)
    split = _generate(tiny_ckpts, devices=MG.DeviceMap((torch.device("cpu"),), other, other))
    assert calls == {"encode_prompt": [other, other], "encode_image": [other], "decode": [other],
                     "sample": [torch.device("cpu")]}
    assert torch.equal(split.frames, one.frames)


def test_cli_devices(tiny_ckpts, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from cogvid_core.cli import main
    img = tmp_path / "start.png"
    Image.fromarray((np.random.RandomState(0).rand(64, 96, 3) * 255).astype(np.uint8)).save(img)
    base = ["i2v", "--model", str(tiny_ckpts[KEY]["hf"]), "--image", str(img), "--prompt", "a fox", "--steps", "1",
            "--precision", "fp32", "--out", str(tmp_path / "frames")]
    assert main([*base, "--devices", "transformer=cpu+cpu,t5=cpu,vae=cpu"]) == 0
    assert len(list((tmp_path / "frames").glob("*.png"))) > 0
    assert main([*base, "--devices", "cpu,cpu,cpu"]) == 2
    assert "one device or two" in capsys.readouterr().err


def test_planner_cfg_pair_budget_is_one_branch_per_gpu():
    from cogvid_core.plan import planner
    from cogvid_core.plan.estimate import estimate
    cands = planner.one_branch(planner.candidates())
    assert cands and all(p.cfg_mode == "sequential" for p in cands)
    assert len({p.name for p in cands}) == len(cands) and "lowvram" in {p.name for p in cands}
    v = M.VARIANTS[KEY]
    seq = next(p for p in cands if p.name == "resident+cfg-sequential")
    budget = estimate(v, 81, 768, 1360, seq).needed_bytes                     # one branch, resident: just fits
    pair, est = planner.plan(v, 81, 768, 1360, budget, cfg_pair=True)
    assert pair.name == "resident+cfg-sequential" and est.fits
    pair, _ = planner.plan(v, 81, 768, 1360, budget - 1, cfg_pair=True)
    assert pair.cfg_mode == "sequential" and pair.name != "resident+cfg-sequential"
    assert planner.resolve_profile("auto", budget_bytes=budget, variant=v, frames=81, height=768, width=1360,
                                   cfg_pair=True).cfg_mode == "sequential"


# ------------------------------------------------------------------------------ the loader node
from test_nodes import _image, _options, comfy, models_root, run  # noqa: E402,F401  (fixtures)


def test_loader_device_values(comfy):
    nodes, _ = comfy
    tr_opts, t5_opts = _options(nodes["CogVidTransformerLoader"], "device"), _options(nodes["CogVidT5Loader"], "device")
    assert tr_opts[:3] == ["auto", "cuda", "cpu"] and "cuda:0+cuda:1" in tr_opts and "cuda:1" in tr_opts
    assert "cuda:1" in t5_opts and not any("+" in o for o in t5_opts)
    assert [i.id for i in nodes["CogVidTransformerLoader"].GET_SCHEMA().inputs][:4] == [
        "model", "precision", "placement", "device"]
    kw = dict(model="CogVideo/CogVideoX1.5-5B-I2V", precision="fp32", placement="auto")
    with pytest.raises(ValueError, match="computes on one device"):
        run(nodes["CogVidT5Loader"], device="cuda:0+cuda:1", **kw)
    with pytest.raises(ValueError, match="ComfyUI computes on cpu"):   # the stub runs as ComfyUI --cpu does
        run(nodes["CogVidTransformerLoader"], device="cuda:0+cuda:1", **kw)


def test_loader_pair_samples_both_branches_at_once(comfy, monkeypatch):
    """A pair on the loader reaches the sampler node unchanged: the second copy runs the unconditional
    branch and the latents equal the one-device run (two CPU "devices" stand in for two GPUs)."""
    import sys
    nodes, _ = comfy
    loaders = next(m for n, m in sys.modules.items() if n.endswith(".nodes.loaders") and m.__dict__.get("NODES")
                   and nodes["CogVidTransformerLoader"] in m.NODES)
    kw = dict(model="CogVideo/CogVideoX1.5-5B-I2V", precision="fp32", placement="auto")
    one = run(nodes["CogVidTransformerLoader"], device="cpu", **kw)[0]
    monkeypatch.setattr(loaders, "_devices", lambda choice, comp: (torch.device("cpu"), torch.device("cpu")))
    pair = run(nodes["CogVidTransformerLoader"], device="cuda:0+cuda:1", **kw)[0]
    calls = []
    MG.second_of(pair.module).module.register_forward_pre_hook(lambda m, a, k: calls.append(1), with_kwargs=True)
    t5 = run(nodes["CogVidT5Loader"], device="cpu", **kw)[0]
    vae = run(nodes["CogVidVAELoader"], device="cpu", **kw)[0]
    cond = run(nodes["CogVidTextEncode"], t5=t5, positive="a red fox runs", negative="")[0]
    lat = run(nodes["CogVidImageEncode"], vae=vae, image=_image(), width=96, height=64, resize="crop")[0]
    args = dict(conditioning=cond, image_latent=lat, frames=17, steps=2, cfg=6.0, dynamic_cfg=True, scheduler="dpm",
                seed=1)
    a = run(nodes["CogVidSampler"], transformer=one, **args)[0].samples
    b = run(nodes["CogVidSampler"], transformer=pair, **args)[0].samples
    assert len(calls) == 2
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ sequence parallel (gloo)
def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _forward_kw(tr) -> dict:
    cfg, g = tr.config, torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(1, 6, cfg.in_channels, 8, 12, generator=g),
                encoder_hidden_states=torch.randn(1, M.MAX_TEXT_TOKENS, cfg.text_embed_dim, generator=g),
                timestep=torch.tensor([500]), ofs=torch.tensor([2.0]), return_dict=False,
                image_rotary_emb=sampling.rotary_embedding(cfg, 64, 96, 6, "cpu"))


def _forward_rank(rank, n, port, out):
    import os

    import torch.distributed as dist

    from cogvid_core.speed import seqpar
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=n)
    torch.set_num_threads(1)
    tr = build_random("transformer", KEY, tiny=True, dtype=torch.float32)
    kw = _forward_kw(tr)
    with torch.inference_mode():
        ref = tr(**kw)[0]
        with seqpar.sequence_parallel(tr) as mode:
            got = tr(**kw)[0]
        again = tr(**kw)[0]           # hooks and mode gone: the one-process path again
    torch.save(dict(ref=ref, got=got, again=again, sent=mode.sent_bytes), f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_sequence_parallel_forward_equals_one_process(tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_forward_rank, args=(2, _free_port(), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    torch.testing.assert_close(r0["got"], r0["ref"], rtol=1e-5, atol=1e-5)
    assert torch.equal(r0["got"], r1["got"]), "every rank ends with the whole output"
    assert torch.equal(r0["again"], r0["ref"]) and r0["ref"].abs().max() > 0.1
    cfg = M.transformer_config(M.VARIANTS[KEY], tiny=True)
    from cogvid_core.speed.seqpar import alltoall_bytes
    per_layer = alltoall_bytes(1, cfg["num_attention_heads"], M.MAX_TEXT_TOKENS, 72 // 2, cfg["attention_head_dim"], 4, 2)
    assert r0["sent"] == cfg["num_layers"] * per_layer


def _speed_rank(rank, n, port, out):
    """One gloo rank: the forward under sequence parallel with speed options on, beside the one-process
    forward with the same speed. Redirect + compile (dynamo, eager backend), the redirect entered after
    sequence parallel instead of before (the order must not matter), fp8 (the torchao stand-in)."""
    import os

    import torch.distributed as dist
    from torch._dynamo.utils import counters

    from test_fast import _FakeTorchao
    from cogvid_core.speed import fast, fp8, seqpar
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=n)
    torch.set_num_threads(1)
    fast.COMPILE_OPTIONS["backend"] = "eager"
    sys.modules["torchao"], sys.modules["torchao.quantization"] = type(sys)("torchao"), _FakeTorchao
    fp8._computable = lambda w: True
    fast._fp8_reason = lambda device: None          # the CPU stands in for an Ada/Hopper card
    tr = build_random("transformer", KEY, tiny=True, dtype=torch.float32)
    kw, results = _forward_kw(tr), {}
    with torch.inference_mode():
        exact = tr(**kw)[0]
        for speed, speed_first in (("threads+compile", True), ("threads", False), ("fp8", True)):
            with fast.applied(tr, speed, "cpu"):
                ref = tr(**kw)[0]
            THREADS.clear()
            with ExitStack() as stack:
                if speed_first:      # as the pipeline does: the Component's use, then seqpar.active
                    stack.enter_context(fast.applied(tr, speed, "cpu"))
                mode = stack.enter_context(seqpar.sequence_parallel(tr))
                if not speed_first:
                    stack.enter_context(fast.applied(tr, speed, "cpu"))
                got = tr(**kw)[0]
                graphs = counters["stats"]["unique_graphs"]
                again = tr(**kw)[0]
            results[speed] = dict(ref=ref, got=got, again=again, new_graphs=counters["stats"]["unique_graphs"] - graphs,
                                  kernel_calls=len(THREADS), sent=mode.sent_bytes)
        results["after"] = dict(exact=exact, now=tr(**kw)[0], state=_state(tr)[:2])
    torch.save(results, f"{out}/speed{rank}.pt")
    dist.destroy_process_group()


def test_sequence_parallel_runs_speed_options(tmp_path):
    """The speed's kernel runs the local attention inside Ulysses' exchange (not around it: that attended
    over this rank's tokens only); compile and fp8 run per rank; each equals the one-process forward
    with the same speed, and nothing is left after."""
    import torch.multiprocessing as mp
    mp.spawn(_speed_rank, args=(2, _free_port(), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"speed{r}.pt") for r in (0, 1))
    layers = M.transformer_config(M.VARIANTS[KEY], tiny=True)["num_layers"]
    for speed in ("threads+compile", "threads", "fp8"):
        got = r0[speed]
        torch.testing.assert_close(got["got"], got["ref"], rtol=1e-5, atol=1e-5, msg=speed)
        assert torch.equal(got["again"], got["got"]) and torch.equal(r1[speed]["got"], got["got"]), speed
        assert got["sent"] > 0 and got["new_graphs"] == 0, (speed, got["sent"], got["new_graphs"])
        assert got["kernel_calls"] == (2 * layers if "threads" in speed else 0), speed
    assert (r0["fp8"]["ref"] - r0["after"]["exact"]).abs().max() > 1e-3       # fp8's stand-in did compute
    assert torch.equal(r0["after"]["now"], r0["after"]["exact"]) and r0["after"]["state"] == (0, [])


def _torchrun_rank(rank, n, port, argv, out):
    import os
    from contextlib import contextmanager

    from cogvid_core.speed import fast, fp8, seqpar
    os.environ.update(WORLD_SIZE=str(n), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    fast.COMPILE_OPTIONS["backend"] = "eager"     # a speed's compile: dynamo's tracing, no C++ build per rank
    real, sent = seqpar.sequence_parallel, []

    @contextmanager
    def counted(*a, **k):           # what the run sent, so the test sees the split really happened
        with real(*a, **k) as mode:
            yield mode
        sent.append(mode.sent_bytes)
    seqpar.sequence_parallel = counted
    from cogvid_core.cli import main
    if main(argv) != 0:
        raise SystemExit(f"rank {rank} failed")
    (Path(out) / f"sent{rank}").write_text(str(sum(sent)))
    (Path(out) / f"kernel{rank}").write_text(str(len(THREADS)))


@pytest.mark.parametrize("speed", ["exact", "threads+compile"])
def test_torchrun_cli_equals_one_process(tiny_ckpts, tmp_path, monkeypatch, speed):
    _torchrun_equals_one_process(tiny_ckpts, tmp_path, monkeypatch, ["--speed", speed], speed != "exact")


@pytest.mark.parametrize("cache", ["pab", "fastercache", "fbc:1.2", "teacache:100"])
def test_torchrun_cli_with_a_step_cache_equals_one_process(tiny_ckpts, tmp_path, monkeypatch, cache):
    """The step cache decides alike on every rank (pab, fastercache, teacache by the timestep; fbc from its
    measure summed over the ranks' slices): the split run's frames are the one-process run's with the same
    cache, and the cache changed them (it skipped work; teacache:100 because random time embeddings change
    far outside the range its polynomial is fitted to)."""
    one = _torchrun_equals_one_process(tiny_ckpts, tmp_path, monkeypatch, ["--steps", "4", "--cache", cache], False)
    from cogvid_core.cli import main
    base = _torchrun_base(tiny_ckpts, tmp_path, ["--steps", "4"])
    assert main([*base, "--out", str(tmp_path / "plain")]) == 0
    assert _max_png_diff(one, sorted((tmp_path / "plain").glob("*.png"))) > 1, "the cache changed nothing"


def _torchrun_base(tiny_ckpts, tmp_path, extra):
    import numpy as np
    from PIL import Image
    img = tmp_path / "start.png"
    if not img.exists():
        Image.fromarray((np.random.RandomState(0).rand(64, 96, 3) * 255).astype(np.uint8)).save(img)
    base = ["i2v", "--model", str(tiny_ckpts[KEY]["hf"]), "--image", str(img), "--prompt", "a fox", "--steps", "2",
            "--precision", "fp32", "--device", "cpu"]
    return [*base, *extra]


def _max_png_diff(a, b):
    import numpy as np
    from PIL import Image
    assert len(a) == len(b) == 17
    return max(np.abs(np.asarray(Image.open(x), dtype=int) - np.asarray(Image.open(y), dtype=int)).max()
               for x, y in zip(a, b))


def _torchrun_equals_one_process(tiny_ckpts, tmp_path, monkeypatch, extra, kernel):
    """The CLI as torchrun starts it (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_*), on gloo: rank 0 writes
    the frames, which equal a one-process run's with the same speed option (its kernel and compile run
    on every rank)."""
    import torch.multiprocessing as mp

    from cogvid_core.cli import main
    from cogvid_core.speed import fast
    monkeypatch.setitem(fast.COMPILE_OPTIONS, "backend", "eager")
    base = _torchrun_base(tiny_ckpts, tmp_path, extra)
    assert main([*base, "--out", str(tmp_path / "one")]) == 0
    mp.spawn(_torchrun_rank, args=(2, _free_port(), [*base, "--out", str(tmp_path / "sp")], str(tmp_path)), nprocs=2)
    assert all(int((tmp_path / f"sent{r}").read_text()) > 0 for r in (0, 1))
    calls = [int((tmp_path / f"kernel{r}").read_text()) for r in (0, 1)]
    assert calls[0] == calls[1] and (calls[0] > 0) == kernel
    one, sp = (sorted((tmp_path / d).glob("*.png")) for d in ("one", "sp"))
    assert _max_png_diff(one, sp) <= 1
    return one


def test_planner_counts_one_branch_of_a_cache_per_gpu_of_a_pair_and_refuses_fastercache():
    from cogvid_core.plan import planner
    from cogvid_core.plan.estimate import cache_bytes
    v = M.VARIANTS[KEY]
    _, plain = planner.plan(v, 81, 768, 1360, 200 * 2**30, cfg_pair=True)
    prof, cached = planner.plan(v, 81, 768, 1360, 200 * 2**30, cfg_pair=True, cache="pab")
    step = [next(st for st in e.stages if st.name == "denoise_step") for e in (plain, cached)]
    held = step[1].weights - step[0].weights
    assert held == cache_bytes(v, 81, 768, 1360, "pab", branches=1) == cache_bytes(v, 81, 768, 1360, "pab") // 2
    with pytest.raises(ValueError, match="use cache fbc, pab or teacache on the pair"):
        planner.plan(v, 81, 768, 1360, 200 * 2**30, cfg_pair=True, cache="fastercache")
