"""Speed options (cogvid_core.speed.fast): names, fallbacks and their messages, the attention redirect,
fp8's per-call weight swap, regional compile (exactness, no recompiles), wiring (Component, CLI, node)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from cogvid_core import cli
from cogvid_core.speed import fast
from cogvid_core.speed import fp8 as fp8_swap
from cogvid_core.model import loading
from cogvid_core.model import variants as M
from cogvid_core.run import pipeline
from cogvid_core.memory import placement as P
from cogvid_core.run import sampling
from cogvid_core.run import session
from cogvid_core.model import testing
from test_nodes import comfy, models_root, run  # noqa: F401  (fixture re-export)
from test_placement import _inputs

K15 = "cogvideox1.5-5b-i2v"
CPU = torch.device("cpu")
CALLS: list = []


@torch.library.custom_op("cogvid_test::counting_sdpa", mutates_args=())
def _counting(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    CALLS.append(tuple(q.shape))
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


@_counting.register_fake
def _(q, k, v, scale):
    return torch.empty_like(q)


fast.register_attention(fast.AttentionKernel("counting", _counting, lambda q, k, v: True, lambda device: None,
                                             exact_class=True))


@pytest.fixture
def calls():
    CALLS.clear()
    yield CALLS
    CALLS.clear()


def _transformer(seed=0):
    return testing.build_random("transformer", K15, tiny=True, seed=seed)


def _hooks(module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def _run(tr, kw):
    with torch.inference_mode():
        return tr(**kw)[0]


# ------------------------------------------------------------------------------- names
@pytest.mark.parametrize("name", [n for n in fast.CHOICES if n != fast.FASTEST])
def test_every_offered_choice_parses_and_round_trips(name):
    speed = fast.parse(name)
    assert speed.name == name and speed.exact == (name == fast.EXACT)


def test_fastest_is_no_recipe_of_its_own():
    """It stands for a recipe per device (resolve, recipe: tests/test_fastest.py); parse refuses it."""
    with pytest.raises(fast.SpeedError, match="per device"):
        fast.parse("fastest")
    fast.check_name("fastest")


def test_parse_combinations_and_errors():
    assert fast.parse("compile+FP8") == fast.Speed(fp8=True, compile=True)
    assert fast.parse("sage+compile") == fast.Speed(attention="sage", compile=True)
    assert fast.parse("sage+compile").quantized and fast.parse("fp8").quantized
    assert not fast.parse("cudnn+compile").quantized and not fast.parse("exact").quantized
    for bad, words in (("turbo", "turbo"), ("fp8+fp8", "repeated"), ("", "exact"), ("exact+fp8", "exact"),
                       ("sage+cudnn", "two attention kernels")):
        with pytest.raises(fast.SpeedError, match=words):
            fast.parse(bad)
    assert issubclass(fast.SpeedError, ValueError)   # the CLI's "user error" class: one line, exit 2


# ------------------------------------------------------------------------------- fallbacks
def test_cpu_drops_gpu_parts_with_reasons():
    got = fast.resolve("fp8+cudnn+compile", CPU)
    assert got == fast.Speed(compile=True)
    text = " ".join(got.notes)
    assert "'fp8' is off" in text and "'cudnn' is off" in text and text.count("CUDA GPU") == 2
    assert "exact" in text                           # says what runs instead


def test_compile_without_a_compiler_is_dropped(monkeypatch):
    monkeypatch.setattr(fast.shutil, "which", lambda name: None)
    got = fast.resolve("compile", CPU)
    assert not got.compile and "C++ compiler" in got.notes[0]


def _fake_cuda(monkeypatch, cc, missing=()):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cc)
    real = importlib.util.find_spec
    monkeypatch.setattr(fast.importlib.util, "find_spec",
                        lambda name, *a: None if name in missing else (real(name, *a) or object()))


def test_fp8_needs_ada_or_hopper(monkeypatch):
    _fake_cuda(monkeypatch, (8, 6))
    got = fast.resolve("fp8+compile", torch.device("cuda", 0))
    assert not got.fp8 and got.compile
    assert "8.9" in got.notes[0] and "8.6" in got.notes[0] and "bf16" in got.notes[0]
    _fake_cuda(monkeypatch, (9, 0))
    assert fast.resolve("fp8", torch.device("cuda", 0)).fp8


@pytest.mark.parametrize("name,package", [("fp8", "torchao"), ("sage", "sageattention"), ("compile", "triton")])
def test_missing_package_is_named(monkeypatch, name, package):
    _fake_cuda(monkeypatch, (9, 0), missing=(package,))
    got = fast.resolve(name, torch.device("cuda", 0))
    assert got.exact and package in got.notes[0]


# ------------------------------------------------------------------------------- attention redirect
def test_redirect_calls_the_chosen_kernel_only_while_the_transformer_runs(calls):
    tr = _transformer()
    kw = _inputs(tr, M.VARIANTS[K15], batch=2)
    ref = _run(tr, kw)
    hooks = _hooks(tr)
    with fast.applied(tr, "counting", CPU) as speed:
        assert speed.attention == "counting"
        got = _run(tr, kw)
        assert len(calls) == tr.config.num_layers            # one joint attention per block
        F.scaled_dot_product_attention(*(torch.randn(1, 2, 4, 8),) * 3)   # outside the transformer's forward
        assert len(calls) == tr.config.num_layers
    assert (got - ref).abs().max() < 1e-5                     # the fake kernel is SDPA itself
    assert _hooks(tr) == hooks and torch.equal(_run(tr, kw), ref)
    assert len(calls) == tr.config.num_layers


def test_redirect_leaves_masked_or_causal_calls_to_torch(calls):
    q = torch.randn(1, 2, 5, 8)
    with fast.RouteAttention(fast.ATTENTION["counting"]):
        F.scaled_dot_product_attention(q, q, q, is_causal=True)
        F.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(5, 5, dtype=torch.bool))
        assert calls == []
        out = F.scaled_dot_product_attention(q, q, q, scale=0.3)
    assert calls == [(1, 2, 5, 8)] and torch.allclose(out, F.scaled_dot_product_attention(q, q, q, scale=0.3))


def test_hooks_come_off_when_the_forward_raises(calls):
    tr = _transformer()
    hooks = _hooks(tr)
    with fast.applied(tr, "counting", CPU), pytest.raises(TypeError):
        tr(hidden_states=None)
    assert _hooks(tr) == hooks
    q = torch.randn(1, 2, 5, 8)
    F.scaled_dot_product_attention(q, q, q)
    assert calls == []                                        # the mode did not stay on the stack


# ------------------------------------------------------------------------------- fp8 swap
class _FakeTorchao:
    """Stands in for torchao.quantization on the CPU: ``quantize_`` halves the weight (visibly wrong)."""

    class Float8DynamicActivationFloat8WeightConfig:
        def __init__(self, **kw):
            self.kw = kw

    class PerRow:
        pass

    calls = 0

    @classmethod
    def quantize_(cls, module, config):
        cls.calls += 1
        assert config.kw["set_inductor_config"] is False      # no process-wide side effects
        module.weight = torch.nn.Parameter(module.weight.to(torch.float32) * 0.5, requires_grad=False)


@pytest.fixture
def fake_torchao(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", type(sys)("torchao"))
    monkeypatch.setitem(sys.modules, "torchao.quantization", _FakeTorchao)
    monkeypatch.setattr(fp8_swap, "_computable", lambda w: True)
    _FakeTorchao.calls = 0
    return _FakeTorchao


def _fp8_forward(tr, kw):
    from contextlib import ExitStack
    seen = {}
    lin = tr.transformer_blocks[0].attn1.to_q
    h = lin.register_forward_pre_hook(lambda m, a: seen.update(w=m.weight))   # returns None: args unchanged
    with ExitStack() as stack:
        fp8_swap._fp8(tr, stack)
        out = _run(tr, kw)
    h.remove()
    return out, seen["w"]


@pytest.mark.parametrize("storage", [None, torch.float8_e4m3fn])
def test_fp8_swaps_weights_for_each_call_only(tiny_ckpts, fake_torchao, storage):
    tr, _ = loading.load_transformer(tiny_ckpts[K15]["single"]["transformer"], dtype=torch.float32,
                                     storage_dtype=storage, file_backed=False)
    kw = _inputs(tr, M.VARIANTS[K15], batch=1)
    before = {n: p for n, p in tr.named_parameters()}
    classes = {n: type(m) for n, m in tr.named_modules()}
    ref = _run(tr, kw)
    out, used = _fp8_forward(tr, kw)
    per_block = 6   # to_q, to_k, to_v, to_out.0, ff.net.0.proj, ff.net.2
    assert fake_torchao.calls == per_block * tr.config.num_layers
    assert used is not before["transformer_blocks.0.attn1.to_q.weight"] and used.dtype == torch.float32
    assert (out - ref).abs().max() > 1e-3                     # the swapped weights did compute
    assert all(p is before[n] for n, p in tr.named_parameters())      # the very same Parameters are back
    assert {n: type(m) for n, m in tr.named_modules()} == classes     # Fp8Linear stays Fp8Linear
    assert torch.equal(_run(tr, kw), ref) and _hooks(tr) == 0


def test_fp8_leaves_a_streamed_block_dropped(tiny_ckpts, fake_torchao):
    tr, _ = loading.load_transformer(tiny_ckpts[K15]["single"]["transformer"], dtype=torch.float32)
    placed = P.place(tr, "cpu", "stream", degrade_on_cpu=False)
    kw = _inputs(tr, M.VARIANTS[K15], batch=1)
    ref = _run(tr, kw)
    out, _ = _fp8_forward(tr, kw)
    assert (out - ref).abs().max() > 1e-3
    assert all(p.device.type == "meta" for p in tr.transformer_blocks.parameters())   # dropped, not restored
    assert torch.equal(_run(tr, kw), ref)
    placed.release()


def test_fp8_folds_a_lora_into_the_weight_it_quantizes(tiny_ckpts, tmp_path, monkeypatch):
    """With fp8 a LoRA Linear's weight is quantized with the LoRA folded in (W + up @ down) for the call, and
    its own delta matmuls do not run. Here the "quantization" leaves the weights as they are, so the
    output must equal the plain LoRA run's; classes, weights and biases come back after the call."""
    from contextlib import ExitStack
    from cogvid_core.model import lora
    from cogvid_core.model.lora_linear import LoraMixin

    class Identity(_FakeTorchao):
        @classmethod
        def quantize_(cls, module, config):
            cls.calls += 1
    monkeypatch.setitem(sys.modules, "torchao", type(sys)("torchao"))
    monkeypatch.setitem(sys.modules, "torchao.quantization", Identity)
    monkeypatch.setattr(fp8_swap, "_computable", lambda w: True)
    v = M.VARIANTS[K15]
    tr, _ = loading.load_transformer(tiny_ckpts[K15]["single"]["transformer"], dtype=torch.float32,
                                     file_backed=False)
    lw = lora.load_lora(testing.write_lora(tmp_path / "l.safetensors", K15, ("attn", "ff"), rank=4, seed=2))
    comp = session.Component("transformer", tr, CPU, torch.float32, "resident", variant=v).with_lora(lw, 0.7)
    kw = _inputs(tr, v, batch=1)
    plain = _run(tr, kw)
    with comp.use() as module:
        ref = _run(module, kw)
    params = {n: p for n, p in tr.named_parameters()}
    deltas = []
    forward = LoraMixin.forward
    monkeypatch.setattr(LoraMixin, "forward", lambda self, x: deltas.append(1) or forward(self, x))
    Identity.calls = 0
    with comp.use() as module, ExitStack() as stack:
        fp8_swap._fp8(module, stack)
        classes = {n: type(m) for n, m in module.named_modules()}
        out = _run(module, kw)
        assert {n: type(m) for n, m in module.named_modules()} == classes
    assert Identity.calls == 6 * tr.config.num_layers and deltas == []
    assert (ref - plain).abs().max() > 1e-3, "the LoRA barely changes the output: the comparison proves little"
    assert (out - ref).abs().max() <= 1e-5
    assert all(p is params[n] for n, p in tr.named_parameters())


# ------------------------------------------------------------------------------- compile
def _graphs():
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


def test_compile_is_exact_class_and_never_recompiles_across_steps_or_cfg_branches(calls):
    """Inductor on a tiny model (needs g++); sequential CFG: two branches per step, two steps."""
    if fast.resolve("compile", CPU).notes:
        pytest.skip("torch.compile cannot run here: " + fast.resolve("compile", CPU).notes[0])
    torch._dynamo.reset()
    tr = _transformer(seed=3)
    comp = session.Component("transformer", tr, CPU, torch.float32, "resident", variant=M.VARIANTS[K15])
    kw = _inputs(tr, M.VARIANTS[K15], batch=1)
    ref = _run(tr, kw)
    after_first = []
    h = tr.register_forward_hook(lambda *_: after_first.append(_graphs()))
    with comp.with_speed("counting+compile").use() as module:
        got = _run(module, kw)
        _sample(module, steps=2)                              # 2 steps x 2 CFG branches, one batch size
    h.remove()
    # graphs at the first call of each video shape only: [0] the direct call, [1:] the sampling run's
    assert len(after_first) == 5 and after_first[0] > 0 and after_first[1] > after_first[0]
    assert after_first[1:] == [after_first[1]] * 4
    assert len(calls) == 5 * tr.config.num_layers             # the redirect works inside compiled blocks
    assert ((got - ref).norm() / ref.norm()) < 1e-5
    assert "forward" not in tr.transformer_blocks[0].__dict__ and _hooks(tr) == 0
    assert torch.equal(_run(tr, kw), ref)                     # done(): the exact path again


def _sample(tr, steps):
    v = M.VARIANTS[K15]
    cfg = tr.config
    frames, h, w = M.default_size(v, dict(cfg))
    image = _image_latent(h, w)
    emb = torch.randn(1, cfg.max_text_seq_length, cfg.text_embed_dim)
    with torch.inference_mode():
        return sampling.sample(tr, v, emb, emb * 0.5, image, frames, steps=steps, cfg=6.0, cfg_mode="sequential")


def _image_latent(h, w):
    from cogvid_core.model.vae import ImageLatent
    shape = (1, 16, 1, h // 8, w // 8)
    return ImageLatent(mean=torch.randn(shape), std=torch.full(shape, 0.1), scale=0.7, height=h, width=w)


def test_compile_with_file_backed_streaming_swaps_weights_without_recompiling(tiny_ckpts, monkeypatch):
    """Streaming assigns each block's parameters anew at every call: dynamo's guards must not care."""
    monkeypatch.setitem(fast.COMPILE_OPTIONS, "backend", "eager")   # guards are dynamo's, whatever the backend
    torch._dynamo.reset()
    tr, _ = loading.load_transformer(tiny_ckpts[K15]["single"]["transformer"], dtype=torch.float32)
    placed = P.place(tr, "cpu", "stream", degrade_on_cpu=False)
    kw = _inputs(tr, M.VARIANTS[K15], batch=1)
    ref = _run(tr, kw)
    with fast.applied(tr, "compile", CPU):
        first = _run(tr, kw)
        graphs = _graphs()
        for _ in range(3):
            again = _run(tr, kw)
    assert _graphs() == graphs and torch.equal(first, again) and (first - ref).abs().max() < 1e-5
    placed.release()


def test_compile_runs_with_loras_and_a_strength_change_does_not_recompile(tmp_path, monkeypatch, caplog):
    """LoRA hooks inside compiled blocks traced wrong from the second call on (torch 2.13, eager backend,
    4 blocks: up to 0.09 off): LoRAs now change their Linears' class instead (model/lora_linear.py), and
    the compiled blocks give the eager LoRA output every call (folded into the weights per call, as every
    option but exact runs a LoRA). A new strength is new values in the same tensors: no new graph; a new
    LoRA of another rank: new shapes, one recompile of the block."""
    from cogvid_core.model import lora
    monkeypatch.setitem(fast.COMPILE_OPTIONS, "backend", "eager")
    torch._dynamo.reset()
    v = M.VARIANTS[K15]
    tr = _transformer()
    files = [testing.write_lora(tmp_path / f"{n}.safetensors", K15, ("attn", "ff"), rank=r, seed=5)
             for n, r in (("a", 4), ("b", 8))]
    lw, other = (lora.load_lora(f) for f in files)
    kw = _inputs(tr, v, batch=1)
    base = session.Component("transformer", tr, CPU, torch.float32, variant=v).with_speed("compile")
    seen = []
    for lora_w, strength in ((lw, 1.0), (lw, 1.0), (lw, -0.4), (other, 0.8)):
        with lora.applied(tr, [(lora_w, strength)], fold=True):
            want = _run(tr, kw)
        with base.with_lora(lora_w, strength).use() as module:
            got = _run(module, kw)
            assert "forward" in tr.transformer_blocks[1].__dict__      # the blocks run compiled
        assert torch.equal(got, want), strength
        seen.append(_graphs())
    print("graphs after each run", seen)
    assert seen[0] > 0 and seen[1] == seen[0] and seen[2] == seen[0]   # same LoRA, new strength: no recompile
    assert seen[3] - seen[2] <= 2                 # another rank: the first block's two graphs, once
    assert "'compile' is off" not in caplog.text and _hooks(tr) == 0


def test_speed_options_fold_a_lora_into_the_weight_per_call_and_exact_keeps_the_delta(tmp_path, monkeypatch, calls):
    """Every option but exact runs a LoRA folded into its Linears' weights per call (W + up @ down): the
    delta's own matmuls over the tokens cost 3.4-5.3 % of a step on an H100 (bench/lora_live_options_h100.log).
    exact keeps the delta, diffusers' LoRA path. In fp32 the two differ by rounding only; classes come back."""
    from cogvid_core.model import lora
    from cogvid_core.model.lora_linear import LoraFoldMixin, LoraMixin
    v = M.VARIANTS[K15]
    tr = _transformer(seed=2)
    lw = lora.load_lora(testing.write_lora(tmp_path / "a.safetensors", K15, ("attn", "ff"), rank=4, seed=7))
    kw = _inputs(tr, v, batch=1)
    plain = _run(tr, kw)
    classes = {n: type(m) for n, m in tr.named_modules()}
    deltas = []
    forward = LoraMixin.forward
    monkeypatch.setattr(LoraMixin, "forward", lambda self, x: deltas.append(1) or forward(self, x))
    base = session.Component("transformer", tr, CPU, torch.float32, variant=v).with_lora(lw, 0.7)
    with base.use() as module:
        lora_linears = [m for m in module.modules() if isinstance(m, LoraMixin)]
        assert lora_linears and not any(isinstance(m, LoraFoldMixin) for m in lora_linears)
        exact = _run(module, kw)
    assert len(deltas) == len(lora_linears)             # the delta ran once per LoRA Linear
    deltas.clear()
    with base.with_speed("counting").use() as module:
        assert all(isinstance(m, LoraFoldMixin) for m in module.modules() if isinstance(m, LoraMixin))
        folded = _run(module, kw)
    assert deltas == [] and calls                       # no delta matmul; the option's kernel ran
    assert {n: type(m) for n, m in tr.named_modules()} == classes
    assert (exact - plain).abs().max() > 1e-3, "the LoRA barely changes the output: the comparison proves little"
    assert (folded - exact).abs().max() <= 1e-5 * exact.abs().max()


# ------------------------------------------------------------------------------- wiring
def test_component_carries_and_checks_the_speed():
    tr = _transformer()
    comp = session.Component("transformer", tr, CPU, torch.float32)
    assert comp.speed == fast.EXACT and comp.with_speed("fp8").speed == "fp8" and comp.speed == fast.EXACT
    with pytest.raises(ValueError, match="unknown"):
        comp.with_speed("warp")
    with pytest.raises(ValueError, match="transformer"):
        session.Component("vae", torch.nn.Linear(2, 2), CPU, torch.float32, speed="compile")
    fancy = comp.with_speed("counting")
    fancy.configure()
    assert _hooks(tr) > 0
    fancy.done()
    assert _hooks(tr) == 0


def test_cli_flag_reaches_the_pipeline(monkeypatch, tmp_path):
    args = cli.build_parser().parse_args(["i2v", "--model", "m", "--image", "i.png", "--prompt", "p",
                                          "--out", "o.mp4", "--speed", "fp8+compile"])
    assert args.speed == "fp8+compile"
    assert cli.build_parser().parse_args(["i2v", "--model", "m", "--image", "i", "--prompt", "p",
                                          "--out", "o"]).speed == fast.EXACT
    seen = {}

    def fake_generate(*a, **kw):
        seen.update(kw)
        raise ValueError("stop here")
    monkeypatch.setattr(pipeline, "generate", fake_generate)
    image = tmp_path / "i.png"
    image.write_bytes(b"")
    code = cli.main(["i2v", "--model", "m", "--image", str(image), "--prompt", "p", "--out", "o.mp4",
                     "--speed", "sage", "--device", "cpu"])
    assert code == 2 and seen["speed"] == "sage"
    run = pipeline._Run(None, None, CPU, *[None] * 7)
    with pytest.raises(ValueError, match="turbo"):
        pipeline._check_speed("turbo", run)
    assert pipeline._check_speed("compile", run) == "compile"
    run.devices = SimpleNamespace(second=torch.device("cuda", 1))    # a CFG pair: its second copy runs the speed too
    assert pipeline._check_speed("counting", run) == "counting"
    assert pipeline._check_speed("exact", run) == "exact"


def test_loader_offers_the_speed_as_its_last_input(comfy, monkeypatch):
    nodes, _ = comfy
    inputs = nodes["CogVidTransformerLoader"].GET_SCHEMA().inputs
    assert [i.id for i in inputs][-1] == "speed" and list(inputs[-1].options) == list(fast.CHOICES)
    assert "bit for bit" in inputs[-1].tooltip and "change the video" in inputs[-1].tooltip
    model = "CogVideo/CogVideoX1.5-5B-I2V"
    tr = run(nodes["CogVidTransformerLoader"], model=model, precision="fp32", placement="auto", device="cpu",
             speed="cudnn+compile")[0]
    assert tr.speed == "cudnn+compile"
    old = run(nodes["CogVidTransformerLoader"], model=model, precision="fp32", placement="auto", device="cpu")[0]
    assert old.speed == fast.EXACT                            # a saved workflow without the widget
    loaders = sys.modules[nodes["CogVidTransformerLoader"].__module__]
    monkeypatch.setattr(loaders, "_devices", lambda choice, kind: (CPU, CPU))   # a CFG pair on two CPU "devices"
    pair = run(nodes["CogVidTransformerLoader"], model=model, precision="fp32", placement="auto",
               device="cuda:0+cuda:1", speed="cudnn+compile")[0]
    from cogvid_core.speed.multigpu import second_of
    assert pair.speed == "cudnn+compile" and second_of(pair.module) is not None   # the copy runs it too


def test_bench_runs_tiny_on_cpu(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import bench_speed
    out = tmp_path / "speed.json"
    assert bench_speed.main(["--tiny", "--device", "cpu", "--options", "exact,counting,fp8", "--steps", "2",
                             "--out", str(out)]) == 0
    rows = {r["option"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["exact"]["ratio_to_exact"] == 1.0 and rows["exact"]["final_latent_rel_l2"] == 0.0
    assert rows["counting"]["ran"] == "counting" and rows["counting"]["step1_pred_rel_l2"] < 1e-5
    assert rows["fp8"]["ran"] == "exact" and "CUDA" in rows["fp8"]["notes"][0]


def test_a_cfg_pair_runs_what_both_of_its_devices_run(monkeypatch):
    """The node (CFG pair device), the CLI and the pipeline (--devices pair) check the speed before any
    load: a part the pair's second device cannot run is off on both (the two branches use the same
    kernels), with a note naming that device; the same device twice is one device. Nothing is refused:
    the pair and torchrun's ranks run every speed (tests/test_multigpu.py)."""
    assert fast.resolve_alone("counting+compile", CPU, CPU) == fast.resolve("counting+compile", CPU)
    assert fast.resolve_alone("counting", CPU).attention == "counting"
    _fake_cuda(monkeypatch, (9, 0), missing=("triton",))
    got = fast.resolve_alone("counting+compile", CPU, torch.device("cuda", 1))
    assert got == fast.Speed(attention="counting")
    assert len(got.notes) == 1 and "triton" in got.notes[0] and "second device cuda:1" in got.notes[0]


def test_switching_options_in_one_session_never_hits_dynamo_s_recompile_limit(tmp_path, monkeypatch):
    """A ComfyUI session switching speed, cache, CFG mode and LoRAs: each combination adds graphs to the
    blocks' one code object; at torch's default limit (8) dynamo ran those blocks eagerly for the rest of
    the process, saying so only in its log (seen with this very loop). Our forward raises the limit."""
    import logging
    from cogvid_core.model import lora
    monkeypatch.setitem(fast.COMPILE_OPTIONS, "backend", "eager")
    torch._dynamo.reset()
    hits = []

    class Catch(logging.Handler):
        def emit(self, record):
            if "recompile_limit" in record.getMessage():
                hits.append(record.getMessage())
    handler = Catch()
    logging.getLogger("torch._dynamo").addHandler(handler)
    v = M.VARIANTS[K15]
    tr = _transformer()
    cfg = tr.config
    frames, h, w = M.default_size(v, dict(cfg))
    image, emb = _image_latent(h, w), torch.randn(1, cfg.max_text_seq_length, cfg.text_embed_dim)
    loras = [None] + [lora.load_lora(testing.write_lora(tmp_path / f"r{r}.safetensors", K15, ("attn", "ff"), rank=r))
                      for r in (4, 8)]
    base = session.Component("transformer", tr, CPU, torch.float32, "resident", variant=v)
    try:
        for speed in ("compile", "counting+compile"):
            for cache in ("none", "pab", "fbc"):
                for lw in loras:
                    comp = base.with_speed(speed) if lw is None else base.with_speed(speed).with_lora(lw, 0.5)
                    for mode in ("batched", "sequential"):
                        with comp.use() as module, torch.inference_mode():
                            sampling.sample(module, v, emb, emb * 0.5, image, frames, steps=2, cfg=6.0, cfg_mode=mode,
                                            cache=cache)
    finally:
        logging.getLogger("torch._dynamo").removeHandler(handler)
    from torch._dynamo.utils import counters
    assert counters["stats"]["unique_graphs"] > 8 and not hits, hits[:1]
    assert torch._dynamo.config.recompile_limit == 8          # only our forward ran with the raised limit


def test_compiled_processor_classes_keep_their_own_call_signature():
    """diffusers' Attention passes a processor only the kwargs its ``__call__`` signature names: each
    compiled processor class shows its own class's signature (one shared wrapper showed the last one's)."""
    import inspect
    from cogvid_core.speed import regional

    class A:
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, image_rotary_emb=None):
            return hidden_states

    class B:
        def __call__(self, attn, hidden_states, attention_mask=None):
            return hidden_states
    a, b = regional._compiled_class(A), regional._compiled_class(B)
    assert regional._compiled_class(A) is a
    assert list(inspect.signature(a().__call__).parameters) == ["attn", "hidden_states", "encoder_hidden_states",
                                                               "image_rotary_emb"]
    assert list(inspect.signature(b().__call__).parameters) == ["attn", "hidden_states", "attention_mask"]


def test_compile_on_a_card_triton_cannot_serve_is_dropped_with_the_reason(monkeypatch):
    _fake_cuda(monkeypatch, (6, 1))                      # a GTX 1080: inductor would fail at the first call
    got = fast.resolve("compile", torch.device("cuda", 0))
    assert not got.compile and "7.0" in got.notes[0] and "6.1" in got.notes[0]
