"""LoRAs carried by transformer values: Component.with_lora, the CLI's --lora, the LoRA loader node,
and the VRAM estimate's LoRA term. The numerics of one hooked layer and the comparison with
diffusers are in test_lora.py; here: which value applies what, when, and that nothing reloads."""
from __future__ import annotations

import dataclasses
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cogvid_core import cli
from cogvid_core.plan import estimate as E
from cogvid_core.model import loading
from cogvid_core.model import lora
from cogvid_core.model.lora_linear import LoraMixin
from cogvid_core.model import variants as M
from cogvid_core.run import pipeline
from cogvid_core.plan import planner
from cogvid_core.run import session
from cogvid_core.model import testing
from cogvid_core.memory.profiles import PROFILES
from test_nodes import _encoded, comfy, models_root, run  # noqa: F401  (fixture re-export)
from test_placement import _inputs

K10, K15 = M.VARIANTS
CPU = torch.device("cpu")


def _lora_hooks(module) -> int:
    return sum(isinstance(m, LoraMixin) for m in module.modules())   # LoRA Linears of the run


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    root = tmp_path_factory.mktemp("wiring_loras")
    return {"a": testing.write_lora(root / "a.safetensors", K15, ("attn", "ff"), rank=4, seed=5),
            "b": testing.write_lora(root / "b.safetensors", K15, ("attn",), rank=2, seed=6, layout="attn_procs"),
            "a10": testing.write_lora(root / "a10.safetensors", K10, ("attn", "proj_out"), rank=4, seed=7)}


def _component(tiny_ckpts, key=K15, **kw) -> session.Component:
    kw.setdefault("file_backed", False)    # real host weights: the tests compare state dicts before and after
    module, variant = loading.load_transformer(tiny_ckpts[key]["single"]["transformer"], dtype=torch.float32, **kw)
    return session.Component("transformer", module, CPU, torch.float32, variant=variant)


def _forward(comp: session.Component, kw) -> torch.Tensor:
    with comp.use() as module, torch.no_grad():
        return module(**kw)[0]


# ------------------------------------------------------------------------------- the value
@pytest.mark.parametrize("profile,storage", [("resident", None), ("balanced", None), ("lowvram", None),
                                             ("balanced", torch.float8_e4m3fn)])
def test_value_applies_its_loras_only_while_in_use(tiny_ckpts, loras, profile, storage):
    base = _component(tiny_ckpts, storage_dtype=storage).with_plan(profile)
    before = {k: v.clone() for k, v in base.module.state_dict().items()}
    la, lb = lora.load_lora(loras["a"]), lora.load_lora(loras["b"])
    one = base.with_lora(la, 0.8)
    two = one.with_lora(lb, -0.5)
    assert base.loras == () and one.loras == ((la, 0.8),) and two.loras == ((la, 0.8), (lb, -0.5))
    assert one.module is two.module is base.module and one.profile is base.profile
    kw = _inputs(base.module, M.V15, batch=1)
    plain = _forward(base, kw)
    got_one, got_two = _forward(one, kw), _forward(two, kw)
    assert _lora_hooks(base.module) == 0                           # done() took them off
    with lora.applied(base.module, [(la, 0.8), (lb, -0.5)]), torch.no_grad():
        want_two = base.module(**kw)[0]                              # the engine's hooks, no placement
    assert (got_two - want_two).abs().max() < 1e-5
    assert (got_one - plain).abs().max() > 1e-3 and (got_two - got_one).abs().max() > 1e-3
    assert torch.equal(_forward(base, kw), plain)                   # the input value: still no LoRA
    assert all(torch.equal(v, before[k]) for k, v in base.module.state_dict().items())
    base.release()


def test_hooks_end_with_the_use_however_it_ends(tiny_ckpts, loras):
    comp = _component(tiny_ckpts).with_lora(lora.load_lora(loras["a"]))
    with pytest.raises(RuntimeError, match="stop"), comp.use():
        assert _lora_hooks(comp.module) > 0
        raise RuntimeError("stop")
    assert _lora_hooks(comp.module) == 0
    comp.configure()                                   # configured, never used: the next value replaces it
    assert _lora_hooks(comp.module) > 0
    plain = dataclasses.replace(comp, loras=())     # another copy of the same loaded module
    plain.configure()
    assert _lora_hooks(comp.module) == 0
    plain.done()


def test_bad_lora_fails_at_with_lora(tiny_ckpts, loras):
    comp = _component(tiny_ckpts, K15)
    with pytest.raises(lora.LoraError, match="proj_out.*made for CogVideoX-5B-I2V") as e:
        comp.with_lora(lora.load_lora(loras["a10"]))   # a 1.0 LoRA (proj_out) on a 1.5 transformer
    assert "\n" not in str(e.value) and comp.loras == ()
    vae = session.Component("vae", torch.nn.Linear(2, 2), CPU, torch.float32)
    with pytest.raises(ValueError, match="transformer"):
        vae.with_lora(lora.load_lora(loras["a"]))


# ------------------------------------------------------------------------------- estimate
def test_estimate_counts_lora_bytes_on_the_denoise_stage(loras):
    extra = lora.lora_bytes([(lora.load_lora(loras["a"]), 1.0)])
    assert extra > 0
    plain = E.estimate(K15, 17, 64, 96, "balanced", tiny=True)
    with_lora = E.estimate(K15, 17, 64, 96, "balanced", tiny=True, lora_bytes=extra)
    for a, b in zip(plain.stages, with_lora.stages):
        assert b.weights - a.weights == (extra if a.name == "denoise_step" else 0)
    # a LoRA can tip the plan to a leaner profile: the budget is exactly resident's peak without it
    budget = E.estimate(K15, 81, 768, 1360, "resident").needed_bytes
    assert planner.plan(K15, 81, 768, 1360, budget)[0].name == "resident"
    assert planner.plan(K15, 81, 768, 1360, budget, lora_bytes=512 * 1024 ** 2)[0].name != "resident"


# ------------------------------------------------------------------------------- CLI
def test_parse_lora(tmp_path):
    f = tmp_path / "orbit.safetensors"
    f.write_bytes(b"")
    assert cli.parse_lora(str(f)) == (str(f), 1.0)
    assert cli.parse_lora(f"{f}:-0.5") == (str(f), -0.5)
    assert cli.parse_lora(f"{f}:1e-1") == (str(f), 0.1)
    odd = tmp_path / "c:orbit.safetensors"            # a colon inside the path, no strength
    odd.write_bytes(b"")
    assert cli.parse_lora(str(odd)) == (str(odd), 1.0)
    for bad, why in ((f"{f}:nan", "finite"), (f"{tmp_path}/nope.safetensors:0.5", "not found"), (":0.5", "FILE")):
        with pytest.raises(ValueError, match=why):
            cli.parse_lora(bad)


def _cli_args(tiny_ckpts, tmp_path, out, *extra):
    img = tmp_path / "start.png"
    if not img.exists():
        Image.fromarray((np.random.RandomState(3).rand(64, 96, 3) * 255).astype(np.uint8)).save(img)
    return ["i2v", "--model", str(tiny_ckpts[K15]["hf"]), "--image", str(img), "--prompt", "a boat",
            "--frames", "17", "--width", "96", "--height", "64", "--steps", "2", "--device", "cpu",
            "--precision", "fp32", "--seed", "5", "--out", str(tmp_path / out), *extra]


def _frames(folder: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))])


def test_cli_two_loras(tiny_ckpts, loras, tmp_path, monkeypatch, capsys):
    used, planned = [], []
    real_configure, real_resolve = session.Component.configure, planner.resolve_profile
    monkeypatch.setattr(session.Component, "configure",
                        lambda self: (used.append(self.loras) if self.kind == "transformer" else None,
                                      real_configure(self))[1])
    monkeypatch.setattr(planner, "resolve_profile",
                        lambda *a, **kw: (planned.append(kw.get("lora_bytes")), real_resolve(*a, **kw))[1])
    assert cli.main(_cli_args(tiny_ckpts, tmp_path, "base")) == 0
    assert cli.main(_cli_args(tiny_ckpts, tmp_path, "two", "--lora", f"{loras['a']}:0.7",
                              "--lora", str(loras["b"]))) == 0
    assert used[0] == ()
    assert [(Path(lw.path).name, s) for lw, s in used[1]] == [("a.safetensors", 0.7), ("b.safetensors", 1.0)]
    la, lb = (lora.load_lora(loras[k]) for k in "ab")
    assert planned == [0, lora.lora_bytes([(la, 0.7), (lb, 1.0)], torch.float32)]
    base, two = _frames(tmp_path / "base"), _frames(tmp_path / "two")
    assert base.shape == two.shape == (17, 64, 96, 3)
    assert np.abs(base.astype(int) - two.astype(int)).max() > 2      # the LoRAs changed the video


@pytest.mark.parametrize("spec,message", [
    ("{missing}:0.5", "LoRA file not found"),
    ("{sd}", "Stable Diffusion"),
    ("{a10}", "made for CogVideoX-5B-I2V"),
    ("{a}:lots", "LoRA file not found"),
])
def test_cli_bad_lora_is_one_error_line(tiny_ckpts, loras, tmp_path, capsys, spec, message):
    from safetensors.torch import save_file
    sd = tmp_path / "sd.safetensors"
    save_file({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(2, 4),
               "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": torch.zeros(4, 2)}, str(sd))
    spec = spec.format(missing=tmp_path / "missing.safetensors", sd=sd, a10=loras["a10"], a=loras["a"])
    assert cli.main(_cli_args(tiny_ckpts, tmp_path, "x", "--lora", spec)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert re.search(message, err[0]), err[0]


# ------------------------------------------------------------------------------- nodes
@pytest.fixture
def lora_nodes(comfy, loras, tmp_path):  # noqa: F811
    nodes, mods = comfy
    folder = tmp_path / "loras"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(loras["a"], folder / "a.safetensors")
    shutil.copy(loras["b"], folder / "sub" / "b.safetensors")
    shutil.copy(loras["a10"], folder / "other_variant.safetensors")
    (folder / "pickled.pt").write_bytes(b"\x80\x04")
    mods["folder_paths"].add_model_folder_path("loras", str(folder))
    return nodes, mods


def test_lora_node_schema_and_listing(lora_nodes):
    nodes, _ = lora_nodes
    schema = nodes["CogVidLoraLoader"].GET_SCHEMA()
    assert [i.id for i in schema.inputs] == ["transformer", "lora", "strength"]
    assert [o.io_type for o in schema.outputs] == ["COGVID_TRANSFORMER"]
    assert all(i.tooltip for i in schema.inputs) and "negative" in schema.inputs[2].tooltip
    assert schema.inputs[1].options == ["a.safetensors", "other_variant.safetensors", "sub/b.safetensors"]
    # the estimate node's new input is optional and last: old graphs still run without it
    est_inputs = nodes["CogVidVRAMEstimate"].GET_SCHEMA().inputs
    assert [i.id for i in est_inputs[-5:]] == ["lora_mib", "speed", "precision", "cache", "transformer"] and \
        all(i.optional for i in est_inputs[-5:])


def _frontend_value(typed: float, spec) -> float:
    """What ComfyUI's frontend keeps of a typed FLOAT: rounded to ``round`` and then to the decimals its
    ``step`` shows (useFloatWidget: precision = -floor(log10(step)), value toFixed(precision))."""
    step, rnd = spec.kwargs["step"], spec.kwargs.get("round") or spec.kwargs["step"]
    decimals = max(0, -math.floor(math.log10(step)))
    return round(round(typed / rnd) * rnd, decimals)


def test_lora_strength_takes_four_decimals(lora_nodes, tmp_path, caplog):
    nodes, mods = lora_nodes
    spec = nodes["CogVidLoraLoader"].GET_SCHEMA().inputs[2]
    assert spec.id == "strength" and spec.default == 1.0       # saved workflows: same widget, same default
    assert abs(_frontend_value(1 / 256, spec) - 1 / 256) < 1e-4   # CogVideoX's 1/rank scale can be entered
    assert abs(_frontend_value(-0.0078, spec) + 0.0078) < 1e-9
    for saved in (1.0, 0.8, 0.85, -1.5, 0.05):                 # values old workflows hold load unchanged
        assert _frontend_value(saved, spec) == saved
    tr = run(nodes["CogVidTransformerLoader"], model="CogVideo/CogVideoX1.5-5B-I2V", precision="fp32",
             placement="auto", device="auto")[0]
    wide = testing.write_lora(tmp_path / "loras" / "wide.safetensors", K15, ("attn",), rank=256)
    with caplog.at_level("WARNING"):
        out = run(nodes["CogVidLoraLoader"], transformer=tr, lora="wide.safetensors", strength=1.0)[0]
    assert out.loras[0][1] == 1.0
    # the strength hint (the file also gets the note that its variant cannot be told from it)
    hints = [r.getMessage() for r in caplog.records if "wide.safetensors" in r.getMessage() and "strength" in
             r.getMessage() and "no alpha" in r.getMessage()]
    assert len(hints) == 1 and "enter strength 0.0039 (= 1/256)" in hints[0]
    caplog.clear()
    with caplog.at_level("WARNING"):
        out = run(nodes["CogVidLoraLoader"], transformer=tr, lora="wide.safetensors", strength=0.0039)[0]
    assert out.loras[0][1] == 0.0039 and "enter strength" not in caplog.text   # taken as given; no hint


def test_lora_nodes_chain_sample_and_never_reload(lora_nodes, monkeypatch):
    nodes, _ = lora_nodes
    tr, t5, vae, cond, lat = _encoded(nodes, positive="a boat")
    reads = []
    for name in ("load_transformer", "peek_transformer", "load_vae", "load_text_encoder"):
        monkeypatch.setattr(loading, name, lambda *a, _n=name, **k: reads.append(_n))
    real_load_lora = lora.load_lora
    monkeypatch.setattr(lora, "load_lora", lambda *a, **k: (reads.append("lora"), real_load_lora(*a, **k))[1])

    def sample(transformer):
        return run(nodes["CogVidSampler"], transformer=transformer, conditioning=cond, image_latent=lat, frames=17,
                   steps=2, cfg=6.0, dynamic_cfg=True, scheduler="dpm", seed=4)[0].samples

    loader = nodes["CogVidLoraLoader"]
    one = run(loader, transformer=tr, lora="a.safetensors", strength=0.8)[0]
    two = run(loader, transformer=one, lora="sub/b.safetensors", strength=-1.5)[0]   # chained
    assert tr.loras == () and len(one.loras) == 1 and [s for _, s in two.loras] == [0.8, -1.5]
    plain, with_one, with_two = sample(tr), sample(one), sample(two)
    weaker = sample(run(loader, transformer=tr, lora="a.safetensors", strength=0.2)[0])   # a new strength
    assert reads == ["lora", "lora"]          # each LoRA file once; the base weights never again
    assert torch.equal(sample(tr), plain)     # the loader's own output still samples without LoRA
    for x, y in ((plain, with_one), (with_one, with_two), (with_one, weaker)):
        assert (x - y).abs().max() > 1e-3
    # the node path applies exactly the engine's hooks
    monkeypatch.setattr(lora, "load_lora", real_load_lora)
    with lora.applied(tr.module, two.loras):
        hooked = sample(tr)
    assert (hooked - with_two).abs().max() < 1e-6
    assert _lora_hooks(tr.module) == 0


def test_lora_read_cache_is_bounded_by_bytes(lora_nodes, tmp_path, monkeypatch):
    import sys
    from collections import OrderedDict
    nodes, _ = lora_nodes
    mod = sys.modules[nodes["CogVidLoraLoader"].__module__]
    monkeypatch.setattr(mod, "_READ", OrderedDict())
    names = [f"s{i}.safetensors" for i in range(10)]
    for i, name in enumerate(names):
        testing.write_lora(tmp_path / "loras" / name, K15, ("attn",), rank=2, seed=i)
    reads = []
    real_load_lora = lora.load_lora
    monkeypatch.setattr(lora, "load_lora", lambda path, *a, **k: (reads.append(Path(path).name),
                                                                    real_load_lora(path, *a, **k))[1])
    for name in names:                                   # ten small files fit the default budget: all kept
        mod.read_lora(name)
    mod.read_lora(names[0])
    assert reads == names and len(mod._READ) == 10
    one = mod._READ[next(iter(mod._READ))].nbytes
    monkeypatch.setattr(mod, "READ_CACHE_BYTES", int(3.5 * one))   # room for three
    mod.read_lora(names[5])
    assert [Path(k[0]).name for k in mod._READ] == [names[9], names[0], names[5]]   # least recently used went
    assert sum(lw.nbytes for lw in mod._READ.values()) <= mod.READ_CACHE_BYTES
    reads.clear()
    mod.read_lora(names[9])
    mod.read_lora(names[1])
    assert reads == [names[1]]
    monkeypatch.setattr(mod, "READ_CACHE_BYTES", 1)      # a file above the budget is still kept while newest
    mod.read_lora(names[2])
    mod.read_lora(names[2])
    assert reads == [names[1], names[2]] and len(mod._READ) == 1


def test_lora_node_refuses_bad_input(lora_nodes):
    nodes, _ = lora_nodes
    tr = run(nodes["CogVidTransformerLoader"], model="CogVideo/CogVideoX1.5-5B-I2V", precision="fp32",
             placement="auto", device="auto")[0]
    loader = nodes["CogVidLoraLoader"]
    with pytest.raises(lora.LoraError) as e:
        run(loader, transformer=tr, lora="other_variant.safetensors", strength=1.0)
    assert "\n" not in str(e.value) and "other_variant.safetensors" in str(e.value)
    for name in ("pickled.pt", "../a.safetensors", "nope.safetensors"):
        with pytest.raises(ValueError, match="not in models/loras"):
            run(loader, transformer=tr, lora=name, strength=1.0)


def test_estimate_node_lora_mib(lora_nodes):
    nodes, _ = lora_nodes
    kw = dict(variant="CogVideoX1.5-5B-I2V", frames=81, width=1360, height=768, profile="balanced", budget_gib=0.0)
    plain = run(nodes["CogVidVRAMEstimate"], **kw)[2]
    more = run(nodes["CogVidVRAMEstimate"], **kw, lora_mib=300.0)[2]
    assert more.stage("denoise_step").weights - plain.stage("denoise_step").weights == 300 * 1024 ** 2
    assert more.stage("decode").weights == plain.stage("decode").weights


def test_shipped_lora_workflow_matches_the_nodes(lora_nodes):
    import json
    nodes, _ = lora_nodes
    name = "CogVideoX1.5 I2V + LoRA - 24 GB cards - 81 frames 1360x768.json"
    wf = json.loads((Path(__file__).resolve().parents[1] / "workflows" / name).read_text())
    by_id = {n["id"]: n for n in wf["nodes"]}
    links = {l[0]: l[1:5] for l in wf["links"]}            # id -> (from node, from slot, to node, to slot)
    lora_node = next(n for n in wf["nodes"] if n["type"] == "CogVidLoraLoader")
    into, out = links[lora_node["inputs"][0]["link"]], links[lora_node["outputs"][0]["links"][0]]
    assert by_id[into[0]]["type"] == "CogVidTransformerLoader" and by_id[out[2]]["type"] == "CogVidSampler"
    for n in wf["nodes"]:                                   # widget values: one per widget input, in order
        if n["type"] in nodes:
            widgets = [i for i in nodes[n["type"]].GET_SCHEMA().inputs if i.io_type in
                       ("COMBO", "INT", "FLOAT", "BOOLEAN", "STRING")]
            extra = sum(bool(i.kwargs.get("control_after_generate")) for i in widgets)
            assert len(n["widgets_values"]) == len(widgets) + extra, n["type"]
