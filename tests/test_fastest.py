"""The speed option ``fastest`` (issue 26): per card class the first recipe whose parts run here
(speed.cardclass.CLASSES), its note, COGVID_EMULATE_CC, and every place that stores or counts a speed
name (Component, the pipeline's split check, the estimate, the nodes, the CLI, the bench)."""
from __future__ import annotations

import importlib.machinery
import json
import logging
import sys
import types
from pathlib import Path

import pytest
import torch

from cogvid_core import cli
from cogvid_core.model import variants as M
from cogvid_core.plan.estimate import estimate
from cogvid_core.run import pipeline, session
from cogvid_core.speed import cardclass, fast
from test_fast import _fake_cuda, _sample, _transformer
from test_nodes import comfy, models_root, run  # noqa: F401  (fixture re-export)

CUDA = torch.device("cuda", 0)
CPU = torch.device("cpu")
V = M.VARIANTS["cogvideox1.5-5b-i2v"]
PACKAGES = ("torchao", "sageattention", "triton", "flash_attn_interface")


@pytest.fixture
def gpu(monkeypatch):
    """``gpu(cc, missing=())``: a CUDA card of capability ``cc`` named RTX 4090, with every speed package
    installed except ``missing`` (FlashAttention-3 as an importable stand-in module)."""
    monkeypatch.delenv(cardclass.EMULATE_CC, raising=False)

    def make(cc, missing=()):
        _fake_cuda(monkeypatch, cc, missing)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce RTX 4090")
        if "flash_attn_interface" in missing:
            monkeypatch.delitem(sys.modules, "flash_attn_interface", raising=False)
        else:
            stand_in = types.ModuleType("flash_attn_interface")
            stand_in.__spec__ = importlib.machinery.ModuleSpec("flash_attn_interface", None)
            monkeypatch.setitem(sys.modules, "flash_attn_interface", stand_in)
    return make


@pytest.mark.parametrize("cc,missing,want", [
    ((9, 0), (), "fp8+fa3fp8+compile"),                 # measured best on an H200
    ((9, 0), ("torchao",), "fa3fp8+compile"),
    ((9, 0), ("triton",), "fa3fp8"),
    ((9, 0), ("flash_attn_interface",), "fp8+compile"),
    ((9, 0), PACKAGES, "exact"),
    ((8, 9), (), "fp8+sage+compile"),
    ((8, 9), ("sageattention",), "fp8+compile"),
    ((8, 9), ("torchao",), "sage+compile"),
    ((8, 9), ("torchao", "sageattention"), "compile"),
    ((8, 9), ("triton",), "exact"),                      # sage and compile both need triton; fp8 eager is slower
    ((8, 6), (), "sage+compile"),
    ((8, 0), ("sageattention",), "compile"),
    ((8, 6), ("triton",), "exact"),
    ((7, 5), (), "compile"),
    ((7, 5), ("triton",), "exact"),
    ((6, 1), (), "exact"),
    ((12, 0), (), "compile"),
])
def test_fastest_picks_the_first_recipe_of_the_card_class_that_runs(gpu, cc, missing, want):
    gpu(cc, missing)
    got = fast.resolve("fastest", CUDA)
    assert got.name == want and len(got.notes) == 1
    assert fast.recipe("fastest", CUDA) == want and fast.recipe("fp8", CUDA) == "fp8"   # others: as asked
    assert fast.resolve(want, CUDA).notes == ()                                          # all its parts run


def test_fastest_on_the_cpu_is_exact_and_every_class_ends_with_exact():
    got = fast.resolve("fastest", CPU)
    assert got.exact and "exact" in got.notes[0] and "CUDA GPU" in got.notes[0]
    assert fast.resolve(" Fastest ", CPU).exact
    for klass in cardclass.CLASSES:
        assert klass.recipes[-1] == fast.EXACT, klass.name       # so fastest runs wherever exact does
        for name in klass.recipes:
            fast.parse(name)                                      # every entry is a recipe parse knows
    assert fast.CHOICES[-1] == fast.FASTEST and len(set(fast.CHOICES)) == len(fast.CHOICES)


def test_rocm_cards_get_exact(gpu, monkeypatch):
    gpu((9, 0))                                                   # an MI250 reports 9.0
    monkeypatch.setattr(torch.version, "hip", "6.2")
    got = fast.resolve("fastest", CUDA)
    assert got.exact and "NVIDIA's" in got.notes[0]


def test_the_note_says_what_was_picked_and_why(gpu):
    gpu((8, 9))
    assert fast.resolve("fastest", CUDA).notes[0] == (
        "speed 'fastest' on this GPU (NVIDIA GeForce RTX 4090, compute capability 8.9): fp8+sage+compile; "
        "FlashAttention-3's FP8 is Hopper only")
    gpu((8, 9), ("sageattention",))
    note = fast.resolve("fastest", CUDA).notes[0]
    assert ": fp8+compile; not fp8+sage+compile (sage: the sageattention package is not installed" in note
    gpu((8, 6), ("torchao",))
    note = fast.resolve("fastest", CUDA).notes[0]
    assert "compute capability 8.6): sage+compile; float8 matmuls need compute capability 8.9" in note
    gpu((9, 0))
    assert fast.resolve("fastest", CUDA).notes[0].endswith("compute capability 9.0): fp8+fa3fp8+compile")


def test_emulated_capability_is_what_every_check_sees(gpu, monkeypatch, caplog):
    gpu((9, 0))                                                   # an H100 ...
    monkeypatch.setenv(cardclass.EMULATE_CC, "8.6")               # ... measuring what an Ampere card gets
    cardclass._said.discard((8, 6))
    with caplog.at_level(logging.WARNING, logger=cardclass.__name__):
        got = fast.resolve("fp8+fa3fp8+compile", CUDA)
        picked = fast.resolve("fastest", CUDA)
    assert got.name == "compile" and "Hopper" in got.notes[0] and "this GPU has 8.6" in got.notes[1]
    assert picked.name == "sage+compile" and "compute capability 8.6, emulated by COGVID_EMULATE_CC" in picked.notes[0]
    said = [r for r in caplog.records if cardclass.EMULATE_CC in r.getMessage()]
    assert len(said) == 1 and "kernels still run on this GPU" in said[0].getMessage()     # logged once
    monkeypatch.setenv(cardclass.EMULATE_CC, "8.9")
    assert fast.recipe("fastest", CUDA) == "fp8+sage+compile"
    assert cardclass.capability(CPU) is None and fast.resolve("fastest", CPU).exact   # no GPU: nothing to emulate
    monkeypatch.setenv(cardclass.EMULATE_CC, "ampere")
    with pytest.raises(ValueError, match="MAJOR.MINOR"):
        fast.resolve("fastest", CUDA)


def test_fp8_on_ada_needs_a_torch_with_its_kernel(gpu, monkeypatch):
    gpu((8, 9))
    monkeypatch.setattr(torch, "__version__", torch.torch_version.TorchVersion("2.6.0+cu124"))
    assert fast.recipe("fastest", CUDA) == "sage+compile"
    assert "torch >= 2.7" in fast.resolve("fp8", CUDA).notes[0]
    gpu((9, 0))
    assert fast.resolve("fp8", CUDA).fp8                         # Hopper had it first


def test_fastest_on_a_cfg_pair_picks_what_both_gpus_run(gpu):
    gpu((9, 0))
    second = torch.device("cuda", 1)
    alone = fast.resolve_alone("fastest", CUDA, second)
    assert alone.name == "fp8+fa3fp8+compile" and "speed 'fastest'" in alone.notes[0]
    assert fast.recipe("fastest", CUDA, second) == "fp8+fa3fp8+compile"     # what the estimate counts
    run_ = pipeline._Run(None, None, CUDA, *[None] * 7)
    assert pipeline._check_speed("fastest", run_) == "fastest"   # one GPU: picked where it runs, said there
    run_.devices = types.SimpleNamespace(second=second)
    assert pipeline._check_speed("fastest", run_) == "fastest"   # the pair: both copies run the pick (fast.applied)
    assert pipeline._check_speed("fp8+compile", run_) == "fp8+compile"   # nothing refused on a split run


def test_fastest_on_the_cpu_samples_the_exact_video():
    torch.manual_seed(0)
    tr = _transformer(seed=4)
    comp = session.Component("transformer", tr, CPU, torch.float32, "resident", variant=V)
    with pytest.raises(ValueError, match="unknown"):
        comp.with_speed("fastests")
    torch.manual_seed(1)
    with comp.use() as module:
        want = _sample(module, steps=2)
    torch.manual_seed(1)
    with comp.with_speed("fastest").use() as module:
        got = _sample(module, steps=2)
    assert torch.equal(got.samples, want.samples)


BF16 = {"transformer": "bf16", "text_encoder": "bf16", "vae": "bf16"}


def _step(**kw) -> int:
    e = estimate(V, 81, 768, 1360, "lowvram", BF16, budget_bytes=8 * 2 ** 30, card="NVIDIA H200", **kw)
    return e.stage("denoise_step").peak_allocated


def test_the_estimate_counts_what_fastest_picks_on_its_device(gpu):
    assert _step(speed="fastest", device=CPU) == _step(speed="exact", device=CPU)
    gpu((9, 0))
    assert _step(speed="fastest", device=CUDA) == _step(speed="fp8+fa3fp8+compile", device=CUDA) \
        != _step(speed="exact", device=CUDA)                      # FP8 attention's copies: not a vacuous check
    gpu((8, 9))
    assert _step(speed="fastest", device=CUDA) == _step(speed="fp8+sage+compile", device=CUDA)


def test_nodes_offer_fastest_last_and_the_estimate_node_counts_its_pick(comfy):
    nodes, _ = comfy
    for node in ("CogVidTransformerLoader", "CogVidVRAMEstimate"):
        speed = next(i for i in nodes[node].GET_SCHEMA().inputs if i.id == "speed")
        assert list(speed.options)[-1] == "fastest" and "fastest" in speed.tooltip, node
    kw = dict(variant="CogVideoX1.5-5B-I2V", frames=81, width=1360, height=768, profile="lowvram", budget_gib=8.0)
    plain = run(nodes["CogVidVRAMEstimate"], **kw).args
    picked = run(nodes["CogVidVRAMEstimate"], speed="fastest", **kw).args
    assert picked[2].stage("denoise_step").peak_allocated == plain[2].stage("denoise_step").peak_allocated
    assert "speed fastest: counted as exact" in picked[0]          # this test machine has no GPU
    tr = run(nodes["CogVidTransformerLoader"], model="CogVideo/CogVideoX1.5-5B-I2V", precision="fp32",
             placement="auto", device="cpu", speed="fastest")[0]
    assert tr.speed == "fastest"                                  # picked where it runs, each use


def test_cli_takes_fastest_and_the_estimate_counts_its_pick(capsys):
    args = cli.build_parser().parse_args(["i2v", "--model", "m", "--image", "i", "--prompt", "p", "--out", "o",
                                          "--speed", "fastest"])
    assert args.speed == "fastest"
    assert cli.main(["estimate", "--budget-gib", "24", "--json", "--device", "cpu", "--speed", "fastest"]) == 0
    counted = json.loads(capsys.readouterr().out)["counted"]
    assert counted["speed"] == "fastest" and counted["speed_recipe"] == "exact"


def test_bench_takes_fastest_and_records_the_emulated_capability(tmp_path, monkeypatch):
    monkeypatch.setenv(cardclass.EMULATE_CC, "")     # the bench sets it; an undo recorded (delenv of an unset name records none)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import bench_speed
    out = tmp_path / "speed.json"
    assert bench_speed.main(["--tiny", "--device", "cpu", "--options", "exact,fastest", "--steps", "2",
                             "--emulate-cc", "8.6", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = {r["option"]: r for r in data["rows"]}
    assert data["env"]["emulate_cc"] == "8.6"
    assert rows["fastest"]["ran"] == "exact" and "speed 'fastest'" in rows["fastest"]["notes"][0]
    assert rows["fastest"]["final_latent_rel_l2"] == 0.0
