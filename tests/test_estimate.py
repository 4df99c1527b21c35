"""The memory estimate and the planner with the shipped profiles, on the CPU (no GPU figures asserted)."""
import json
import math
from pathlib import Path

import numpy as np
import pytest

from cogvid_core.plan import cards, estimate as E, speedmem
from cogvid_core.plan import planner as PL
from cogvid_core.plan.chart import chart_image
from cogvid_core.device.devmem import GiB
from cogvid_core.model.variants import V10, V15, latent_frames
from cogvid_core.memory.profiles import PROFILES, Profile, TileSpec, tile_is_exact
from cogvid_core.model.stages import STAGES


def est(variant=V15, frames=81, h=768, w=1360, profile="balanced", **kw):
    return E.estimate(variant, frames, h, w, profile, **kw)


def test_token_count_matches_patching():
    assert E.tokens(V15, 81, 768, 1360) == 226 + 11 * 48 * 85      # 21 latent -> 22 padded, /2
    assert E.tokens(V10, 49, 480, 720) == 226 + 13 * 30 * 45
    assert latent_frames(V15, 81) == (22, 1) and latent_frames(V10, 49) == (13, 0)


def test_weight_bytes_are_params_times_element_size():
    sizes = E.component_sizes(V15.key)
    assert 5.5e9 < sizes["transformer"].params < 5.6e9
    assert 4.7e9 < sizes["text_encoder"].params < 4.8e9
    e = est(profile="resident", keep_loaded=True)
    expected = sum(sizes[k].params * 2 for k in E.COMPONENTS)
    assert e.stage("text_encode").weights == expected
    assert est(profile="resident").stage("text_encode").weights == sizes["text_encoder"].params * 2
    e32 = est(profile="resident", keep_loaded=True, precision={"transformer": "fp32", "text_encoder": "bf16", "vae": "bf16"})
    assert e32.stage("text_encode").weights == expected + sizes["transformer"].params * 2
    # 1.0's learned positional embedding buffer travels with the weights
    s10 = E.component_sizes(V10.key)["transformer"]
    assert s10.buffer_elems > 0
    assert E.weight_bytes(s10, "bf16") == (s10.params + s10.buffer_elems) * 2


def test_fp8_storage_shrinks_weights():
    s = E.component_sizes(V15.key)["transformer"]
    # attention and feed-forward in 1 byte; the AdaLN modulation (norm1/norm2.linear, ~0.8 B parameters)
    # stays bf16: ~0.57 of the bf16 bytes
    assert E.weight_bytes(s, "fp8_e4m3fn") < 0.6 * E.weight_bytes(s, "bf16")


@pytest.mark.parametrize("profile", list(PROFILES))
def test_monotonic_in_frames_and_size(profile):
    by_frames = [est(frames=f, profile=profile) for f in (17, 33, 49, 81)]
    by_size = [est(h=h, w=w, profile=profile) for h, w in ((320, 480), (480, 848), (768, 1360))]
    for seq in (by_frames, by_size):
        for a, b in zip(seq, seq[1:]):
            assert b.tokens > a.tokens
            for s in ("denoise_step", "decode"):
                assert b.stage(s).peak_allocated > a.stage(s).peak_allocated
            assert b.peak_allocated >= a.peak_allocated and b.peak_reserved >= a.peak_reserved


@pytest.mark.parametrize("variant,frames,h,w", [(V15, 81, 768, 1360), (V15, 33, 480, 848), (V10, 49, 480, 720)])
def test_profiles_ordered(variant, frames, h, w):
    peaks = [est(variant, frames, h, w, p).peak_allocated for p in ("resident", "balanced", "lowvram")]
    assert peaks[0] >= peaks[1] >= peaks[2]


def test_cfg_sequential_and_chunking_lower_the_step():
    base = PROFILES["resident"]
    a = est(profile=base).stage("denoise_step")
    b = est(profile=base.replace(cfg_mode="sequential")).stage("denoise_step")
    c = est(profile=base.replace(cfg_mode="sequential", ff_chunk=4096, low_mem_attention=True)).stage("denoise_step")
    assert a.weights == b.weights == c.weights
    assert a.activations > b.activations > c.activations


def test_unknown_profile_name_is_a_user_error():
    with pytest.raises(ValueError, match="unknown placement profile 'turbo'; known: resident, balanced, lowvram"):
        est(profile="turbo")


def test_smaller_tiles_lower_the_decode():
    big = est(profile="lowvram", tile=TileSpec(480, 720, 0.2)).stage("decode").activations
    mid = est(profile="lowvram", tile=TileSpec(240, 360, 0.2)).stage("decode").activations
    small = est(profile="lowvram", tile=TileSpec(120, 160, 0.2)).stage("decode").activations
    assert big > mid > small
    assert E.decode_tiles(768, 1360, None) == [(768, 1360)]
    assert len(E.decode_tiles(768, 1360, (240, 360, 1 / 6))) == 4 * 5   # diffusers' overlap stepping


def test_the_strip_encode_term():
    """lowvram encodes in strips (issue 30): three first-level activations of one frame + one strip's budget
    + the pixels, whatever the decode tile (the tiled encode it replaced grew with the tile)."""
    from cogvid_core.model import vae_strips

    def encode(profile, tile=None):
        return est(profile=profile, tile=tile, calibration_path=dict(E.DEFAULT_CONSTANTS)).stage("image_encode").activations

    level0, pixels = 128 * 768 * 1360 * 2, 3 * 768 * 1360 * 2
    fixed = E.DEFAULT_CONSTANTS["vae_fixed_bytes"]
    assert encode("lowvram", TileSpec(240, 360, 0.2)) == encode("lowvram", TileSpec(120, 160, 0.2))
    units = E.DEFAULT_CONSTANTS["enc_strip_units"]
    assert encode("lowvram") == int(units * level0 + vae_strips.STRIP_BYTES + pixels + fixed)
    assert encode("balanced") == int(E.DEFAULT_CONSTANTS["enc_act_mult"] * 3 * level0 + fixed)


def test_strip_encode_units_are_the_h100_measurement():
    """enc_strip_units is the largest unit count the H100's strip encodes measured (bench_encode_exact,
    strips of 64 MiB: the default budget), rounded up to 0.1 (the estimate on the safe side: at or above every measured
    allocated peak), and the 12 GB workflow's encode in the whole-run bench of
    session 16 is within 5% and inside its verdict."""
    from cogvid_core.model import vae_strips
    rows = [r for r in _bench_json("encode_exact_h100.json")["rows"] if r["mode"] == "strips 64.0 MiB"]
    cal = E.calibration(None, "NVIDIA H100 80GB HBM3", "native")["constants"]
    units = []
    for r in rows:
        h, w = r["height"], r["width"]
        rest = vae_strips.STRIP_BYTES + 3 * h * w * 2 + cal["vae_fixed_bytes"]
        units.append((r["peak_alloc_gib"] * GiB - r["weights_gib"] * GiB - rest) / (128 * h * w * 2))
    assert len(units) == 2
    assert E.DEFAULT_CONSTANTS["enc_strip_units"] == math.ceil(max(units) * 10) / 10
    hostrun = _bench_json("hostrun_estimate_h100.json")
    for row in hostrun["estimate_rows"]:
        if row["stage"] == "image_encode" and row["profile"] == "lowvram":
            measured_alloc, measured_res = row["allocated_gib"][1], row["reserved_gib"][1]
            e = E.estimate(V15, 81, 768, 1360, "lowvram", {"transformer": "bf16", "text_encoder": "bf16", "vae": "bf16"},
                           card="NVIDIA H100 80GB HBM3", allocator="native")
            s = e.stage("image_encode")
            assert abs(s.peak_allocated / GiB / measured_alloc - 1) <= 0.05
            assert abs(s.peak_reserved / GiB / measured_res - 1) <= 0.05
            assert measured_res <= e.stage_needed("image_encode") / GiB


SHIPPED_STAGES = {"text encode": "text_encode", "image encode": "image_encode", "denoise": "denoise_step", "decode": "decode"}


def _shipped_rows(raw: dict, card: str):
    """(recipe, stage name, today's estimate of that recipe's plan for ``card``, the stage's measured row)
    for every stage of every recipe of a bench_hostrun file with per-stage predictions, under the allocator the
    run recorded (sessions 16 and 17 recorded none: their children ran the native one, no PYTORCH_CUDA_ALLOC_CONF)."""
    bf16 = {"transformer": "bf16", "text_encoder": "bf16", "vae": "bf16"}
    plain = {(r["profile"], r["speed"]): r["predicted"]["denoise_step"]["allocated_gib"]
             for r in raw["results"] if r.get("predicted") and "%" not in r["recipe"]}
    for r in raw["results"]:
        if not r.get("predicted"):
            continue
        lora = r["predicted"].get("lora_bytes")
        if lora is None:       # session 16's file predates the recorded lora_bytes
            lora = int((r["predicted"]["denoise_step"]["allocated_gib"] - plain[(r["profile"], r["speed"])]) * GiB) \
                if "%" in r["recipe"] else 0
        allocator = r["predicted"].get("allocator", "native")     # sessions 16 and 17 recorded none: native
        e = E.estimate(V15, raw["frames"], raw["height"], raw["width"], r["profile"], bf16, lora_bytes=int(lora),
                       speed=r["speed"], card=card, allocator=allocator)
        for st in r["stages"]:
            if st["stage"] in SHIPPED_STAGES:
                yield r["recipe"], SHIPPED_STAGES[st["stage"]], e, st


@pytest.mark.parametrize("name", ["hostrun_estimate_h100.json", "hostrun_estimate_h100_s17.json"])
def test_the_shipped_plans_on_the_h100_stay_within_their_measured_bounds(name):
    """bench/hostrun_estimate_h100*.json (sessions 16 and 17): the shipped workflows' plans (12 GB, 8 GB, 24 GB,
    + LoRA, + fp8, + fp8+fa3fp8+compile; session 17: fa3fp8 alone for the 8 GB one) run whole from the files
    on the H100, each stage's peaks. Today's estimate of each plan: allocated and (since session 18's refit:
    the lowvram step was +10.2% / +20.4%) reserved within +-10% of every stage, every verdict at or above what the
    stage reserved (session 16's own table had the strip encode 18% under
    and unsafe, fixed since: enc_strip_units; session 17 measured it +3.1%), host RAM within +-15% (the
    compiled option's denoise was 27% under: speedmem.COMPILE_HOST_BYTES)."""
    checked = 0
    for recipe, stage, e, st in _shipped_rows(_bench_json(name), "NVIDIA H100 80GB HBM3"):
        _check_stage(e, stage, st, recipe)
        assert abs(e.stage(stage).host_bytes / GiB / st["host_peak_anon_pinned_gib"] - 1) <= 0.15, (recipe, stage)
        checked += 1
    assert checked == 24


def test_the_h200_file_with_the_transfer_margin_covers_the_h100s_shipped_plans():
    """The transfer, on whole runs, one way: the H200's file (the one the other card gets) plus the transfer
    margin, judged against the H100's measured runs of the shipped plans (session 17), a card that file never
    saw: every stage's verdict covers what the stage reserved (the closest: the fp8 denoise, 3.1% above it) and
    allocated stays within +-10%. Reserved errors (docs/performance.md): -11.6% (fp8 denoise) to +13.7% (fast
    lowvram denoise). The other way (the H100's file,
    what a card with no file gets since session 18, on the H200's runs): the test after this one. The compiled
    recipe's 4 rows are left out: since session 19 an H200 estimates a compiled option with the H100's file
    (h200.json has no speed cells: test_an_h200_estimates_compiled_options_with_the_h100s_file)."""
    margin = cards.transfer()["margin"]
    checked, reserved_errors, short = 0, [], []
    for recipe, stage, e, st in _shipped_rows(_bench_json("hostrun_estimate_h100_s17.json"), "NVIDIA H200"):
        if "compile" in recipe:
            assert e.calibration["family"] == "h100" and e.transfer_margin == margin
            continue
        assert e.calibration["family"] == "h200" and e.transfer_margin == 0
        est = e.stage(stage)
        assert abs(est.peak_allocated / GiB / st["peak_alloc_gib"] - 1) <= 0.10, (recipe, stage)
        assert st["peak_reserved_gib"] <= e.stage_needed(stage) * (1 + margin) / GiB, (recipe, stage)
        reserved_errors.append(est.peak_reserved / GiB / st["peak_reserved_gib"] - 1)
        short += [(recipe, stage)] if st["peak_reserved_gib"] > e.stage_needed(stage) / GiB else []
        checked += 1
    assert checked == 20 and min(reserved_errors) < -0.10
    assert short          # not vacuous: without the margin (as the H200 itself gets the file) a stage is short


def test_plan_picks_fastest_fitting():
    need = {p: est(profile=p).needed_bytes for p in PROFILES}
    for budget, want in ((need["resident"] + 1, "resident"), (need["resident"] - 1, "balanced"),
                         (need["balanced"] - 1, "lowvram")):
        prof, e = PL.plan(V15, 81, 768, 1360, budget)
        assert prof.name.startswith(want) and e.fits
    # below plain lowvram: a lowvram variant with smaller chunks / tiles, never a faster profile
    prof, e = PL.plan(V15, 81, 768, 1360, need["lowvram"] - 1)
    assert prof.name.startswith("lowvram+") and e.needed_bytes <= need["lowvram"] - 1
    prof, e = PL.plan(V15, 81, 768, 1360, 80 * GiB)
    assert prof is PROFILES["resident"] and e.fits


def test_candidates_fastest_first():
    cands = PL.candidates()
    names = [c.name for c in cands]
    assert names[:4] == ["resident", "balanced", "lowvram+cfg-batched", "lowvram"]
    assert all(n.startswith("lowvram+") for n in names[4:]) and len(names) > 5
    # streamed weights: each batched-CFG variant (one weight pass per step) right before its twin
    for i, n in enumerate(names[2:], start=2):
        if n.endswith("+cfg-batched"):
            assert names[i + 1] == n.removesuffix("+cfg-batched").removesuffix("+") or \
                names[i + 1] + "+cfg-batched" == n
    # every derived tile keeps diffusers' tiled decode exact (the one tile rule)
    for c in cands:
        assert tile_is_exact(c.vae_tile.height, c.vae_tile.overlap) and tile_is_exact(c.vae_tile.width, c.vae_tile.overlap)


def test_long_sequences_stream_one_cfg_branch_at_a_time():
    long_names = [c.name for c in PL.candidates(tokens=PL.SEQUENTIAL_FIRST_TOKENS)]
    assert long_names[:3] == ["resident", "balanced", "lowvram"]
    assert not any(n.endswith("cfg-batched") for n in long_names)
    assert "lowvram+cfg-batched" in [c.name for c in PL.candidates(tokens=PL.SEQUENTIAL_FIRST_TOKENS - 1)]
    # the 12 GB workflow's plan (1.5 at 81x768x1360, 45,106 tokens, budget 11 GiB) and the 1.0 default
    # (17,550 tokens), each with room for batched CFG's larger step
    prof, _ = PL.plan(V15, 81, 768, 1360, 11 * GiB)
    assert prof.transformer == "stream" and prof.cfg_mode == "sequential"
    batched = est(V10, 49, 480, 720, profile=PL.candidates()[2])
    assert batched.profile.cfg_mode == "batched"
    prof, _ = PL.plan(V10, 49, 480, 720, batched.needed_bytes)
    assert prof.name == "lowvram+cfg-batched"


def test_plan_raises_with_actionable_message():
    with pytest.raises(ValueError) as info:
        PL.plan(V15, 81, 768, 1360, 512 * 1024 ** 2)
    msg = str(info.value)
    assert "81 frames at 1360x768" in msg and "GiB" in msg and "lowvram" in msg and "reduce frames or size" in msg


def test_best_estimate_without_budget_or_fit():
    assert PL.best_estimate(V15, 81, 768, 1360, None).profile_name == "balanced"
    lean = PL.best_estimate(V15, 81, 768, 1360, 512 * 1024 ** 2)
    assert lean.profile_name == PL.candidates()[-1].name and lean.fits is False


def test_report_dict_and_chart():
    e = est(profile="balanced", budget_bytes=8 * GiB)
    text = e.report()
    for label in ("text encode", "image encode", "denoise step", "decode", "overall peak"):
        assert label in text
    assert ("FITS" in text) != ("DOES NOT FIT" in text)
    if not e.fits:
        assert e.advice() and e.advice() in text
    d = e.to_dict()
    assert set(d["stages"]) == set(STAGES) and d["fits"] == e.fits
    json.dumps(d)
    img = chart_image(e, 640, 360)
    assert img.shape == (360, 640, 3) and img.dtype == np.uint8 and img.std() > 0
    assert est(profile="balanced").fits is None   # no budget, no verdict


def test_gpu_budget_cpu_is_none():
    assert PL.gpu_budget("cpu") is None


def test_budget_above_the_whole_card_is_refused(monkeypatch):
    """--vram-budget 40 on a 24 GB card: refused before any model loads (it would plan resident and run
    out of memory minutes in); a budget the card has plans as before."""
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (20 * GiB, 24 * GiB))
    from cogvid_core.plan import cards
    monkeypatch.setattr(cards, "device_card", lambda: None)     # no card name on a CPU machine
    shape = dict(variant=V15, frames=81, height=768, width=1360, device="cuda:0",
                 precision={"transformer": "bf16", "text_encoder": "bf16", "vae": "bf16"})
    with pytest.raises(ValueError, match=r"VRAM budget \(40.0 GiB\) is more than cuda:0 has in all \(24.0 GiB\)"):
        PL.resolve_profile("auto", budget_gib=40, **shape)
    assert PL.resolve_profile("auto", budget_gib=12, **shape).name != "resident"
    assert PL.resolve_profile("lowvram", budget_gib=40, **shape).name == "lowvram"   # a named profile takes no budget


@pytest.mark.parametrize("key", ["cogvideox-5b-i2v", "cogvideox1.5-5b-i2v"])
def test_fp8_weight_bytes_are_what_fp8_storage_loads(tiny_ckpts, key):
    """The estimate counts the layers fp8 storage keeps in 8 bits with the loader's own predicate."""
    import torch

    from cogvid_core.device import devmem
    from cogvid_core.model import loading
    module, _ = loading.load_transformer(tiny_ckpts[key]["hf"], torch.bfloat16, storage_dtype=torch.float8_e4m3fn)
    size = E.component_sizes(key, tiny=True)["transformer"]
    assert E.weight_bytes(size, "fp8_e4m3fn", 2) == devmem.module_bytes(module)


# ----------------------------------------------------------------------------- host RAM (issue 12)
def test_host_bytes_per_stage():
    from cogvid_core.memory import hostplan as H

    sizes = E.component_sizes(V15.key)
    low = E.estimate(V15, 81, 768, 1360, "lowvram")
    res = E.estimate(V15, 81, 768, 1360, "resident")
    staging = {k: H.staging_bytes(sizes[k], "bf16") for k in ("transformer", "text_encoder")}
    vae = H.pinned_vae_bytes(V15.key, "bf16")
    # a T5 block (~0.36 GiB) and a transformer block (~0.25 GiB), twice: the H200 staging_gib 0.72 / 0.49
    assert 0.65 * GiB < staging["text_encoder"] < 0.8 * GiB and 0.45 * GiB < staging["transformer"] < 0.55 * GiB
    assert E.weight_bytes(sizes["vae"], "bf16") <= vae < 1.5 * E.weight_bytes(sizes["vae"], "bf16")
    assert low.stage("text_encode").host_bytes == H.BASE_BYTES + staging["text_encoder"]      # VAE not loaded yet
    pageable = H.pageable_vae_bytes(V15.key, "bf16")
    # between its two stages the pipeline's VAE is released: pageable on the host, in every plan
    for est in (low, res):
        assert est.stage("denoise_step").host_bytes == H.BASE_BYTES + H.CONV_LIBS_BYTES + staging["transformer"] + pageable
    assert low.stage("image_encode").host_bytes == H.BASE_BYTES + H.CONV_LIBS_BYTES + vae   # offload: pinned copy
    assert res.stage("image_encode").host_bytes == H.BASE_BYTES + H.CONV_LIBS_BYTES         # resident: on the GPU
    # streamed: the whole file is re-read at every use; resident reads it once
    assert low.stage("denoise_step").host_file_bytes == E.weight_bytes(sizes["transformer"], "bf16")
    assert res.stage("denoise_step").host_file_bytes == 0
    assert low.host_peak_bytes == low.stage("decode").host_bytes < 6 * GiB      # issue 12's small-profile target
    kept = E.estimate(V15, 81, 768, 1360, "lowvram", keep_loaded=True)
    assert kept.stage("text_encode").host_bytes == low.stage("text_encode").host_bytes + staging["transformer"] + vae
    assert low.to_dict()["stages"]["denoise_step"]["host_bytes"] == low.stage("denoise_step").host_bytes


def test_report_says_whether_host_ram_suffices():
    est = E.estimate(V15, 81, 768, 1360, "lowvram")
    assert "enough" in est.report(host_available=64 * GiB)
    assert "only 2.0 GiB available" in est.report(host_available=2 * GiB)
    assert "from disk at every use" in est.report(host_available=8 * GiB)   # owned fits, the 10 GiB file does not
    assert "available: unknown" in est.report()


# ----------------------------------------------------------------------------- calibration per card (issue 14)
def test_card_family_and_fallback():
    from cogvid_core.plan import cards
    assert cards.family_of("NVIDIA H200") == "h200" and cards.family_of("NVIDIA H100 80GB HBM3") == "h100"
    assert cards.family_of("NVIDIA GeForce RTX 3060") is None and cards.family_of(None) is None
    assert cards.allocator_backend() in cards.ALLOCATORS
    assert cards.allocator_key("native", "expandable_segments:True") == "native:expandable"   # the CLI's
    assert cards.allocator_key("native", "garbage_collection_threshold:0.8,expandable_segments:true") == \
        "native:expandable"
    assert cards.allocator_key("native", "") == "native"                                     # plain
    assert cards.allocator_key("cudaMallocAsync", "backend:cudaMallocAsync") == "cudaMallocAsync"   # ComfyUI's
    _, choice = cards.choose("NVIDIA GeForce RTX 3060", "native")
    assert not choice["matched"] and "No measurements for NVIDIA GeForce RTX 3060" in choice["note"]


# ----------------------------------------------------------------------------- a card with no file (issue 27)
def test_unknown_card_gets_the_nearest_file_and_the_transfer_margin():
    """An L4 (no file of its own) is estimated with the H100's file (since session 18 the one with speed cells:
    cards.nearest), the margin measured between the H100 and H200 (calibration/transfer.json: every stage,
    every allocator) added to its verdicts, and the report says so in plain words."""
    from cogvid_core.plan import cards
    shipped = json.loads(cards.TRANSFER.read_text())
    assert shipped["margin"] > 0 and len(shipped["stages"]) == 4 and len(shipped["allocators"]) == 3
    for alloc in ("native", "cudaMallocAsync", "native:expandable"):
        e = est(profile="lowvram", card="NVIDIA L4", allocator=alloc)
        assert e.calibration["family"] == "h100" and not e.calibration["matched"] and e.calibration["allocator"] == alloc
        assert e.transfer_margin == shipped["margin"] and e.to_dict()["transfer_margin"] == shipped["margin"]
        text = e.report()
        assert (f"NOTE: No measurements for NVIDIA L4: using the NVIDIA H100 80GB HBM3's (the file that calibrates the "
                f"most: this card's architecture is not known here), with {shipped['margin']:.1%} added for the "
                f"difference between cards (measured NVIDIA H100 80GB HBM3 <-> NVIDIA H200)") in text, text
        assert f"+{shipped['margin']:.1%} for another card's calibration" in text


def test_known_card_gets_its_own_file_and_no_margin():
    for card, fam in (("NVIDIA H200", "h200"), ("NVIDIA H100 80GB HBM3", "h100")):
        e = est(profile="lowvram", card=card, allocator="native")
        assert e.calibration["family"] == fam and e.calibration["matched"] and e.transfer_margin == 0
        assert "No measurements" not in e.report() and "another card's calibration" not in e.report()


def test_the_margin_makes_every_verdict_more_conservative():
    """The same file, the same plan: each stage asks the own-card verdict times 1 + the margin, so a budget
    between the two is 'fits' on the H100 and 'does not fit' on a card without a file."""
    own = est(profile="lowvram", card="NVIDIA H100 80GB HBM3", allocator="native")
    other = est(profile="lowvram", card="NVIDIA GeForce RTX 3060", allocator="native")
    m = other.transfer_margin
    assert [s.peak_reserved for s in own.stages] == [s.peak_reserved for s in other.stages]
    for name in STAGES:
        assert other.stage_needed(name) == pytest.approx(own.stage_needed(name) * (1 + m), abs=2)
        assert other.stage_needed(name) > own.stage_needed(name)
    between = (own.needed_bytes + other.needed_bytes) // 2
    assert est(profile="lowvram", card="NVIDIA H100 80GB HBM3", allocator="native", budget_bytes=between).fits
    assert not est(profile="lowvram", card="NVIDIA GeForce RTX 3060", allocator="native", budget_bytes=between).fits


def test_nearest_file_by_architecture_then_by_what_it_calibrates(tmp_path, monkeypatch):
    """Same architecture first (the nearest compute capability), then the file that calibrates the most:
    fewer stages excluded, file-backed weights, more allocator sets."""
    from cogvid_core.plan import cards
    cards._read.cache_clear()
    docs = {"h200": dict(weights="file-backed", allocators={"native": {}, "cudaMallocAsync": {}}),
            "h100": dict(weights="in-memory", excluded={"decode": "stale"}, allocators={"native": {}}),
            "a100": dict(weights="file-backed", excluded={"decode": "stale"}, allocators={"native": {}}),
            "rtx4090": dict(weights="in-memory", allocators={"native": {}})}
    files = {}
    for fam, d in docs.items():
        files[fam] = tmp_path / f"{fam}.json"
        files[fam].write_text(json.dumps(d))
    assert cards.nearest(files) == "h200"                          # capability unknown: what it calibrates
    assert cards.nearest({k: files[k] for k in ("h100", "a100")}) == "a100"   # file-backed, as users load
    assert cards.nearest(files, (8, 9)) == "rtx4090"               # an L4 / RTX 4090: Ada
    assert cards.nearest(files, (8, 6)) == "rtx4090"               # an RTX 3090: 8.9 is nearer than 8.0
    assert cards.nearest({k: files[k] for k in ("h100", "h200", "a100")}, (8, 6)) == "a100"   # Ampere before Hopper
    assert cards.nearest(files, (9, 0)) == "h200"                  # a GH200: both Hopper, h200 calibrates more
    assert cards.nearest({}) is None
    # this process's device is the card: its capability is read (a named card elsewhere has none)
    monkeypatch.setattr(cards, "device_card", lambda: "NVIDIA L4")
    monkeypatch.setattr(cards, "device_capability", lambda: (8, 9))
    assert cards._capability_of("NVIDIA L4") == (8, 9) and cards._capability_of(None) == (8, 9)
    assert cards._capability_of("NVIDIA GeForce RTX 3060") is None
    _, choice = cards.choose("NVIDIA L4", "native")
    assert "nearest architecture measured: compute capability 9.0, this card's 8.9" in choice["note"]


def test_allocator_picks_its_constants(tmp_path, monkeypatch):
    """One file, two allocators: the estimate takes the set of the allocator it is given (or runs
    under); an allocator the file lacks falls back to native and says so."""
    from cogvid_core.plan import cards
    base = dict(E.DEFAULT_CONSTANTS)
    doc = {"card": "NVIDIA H200", "tolerance": 0.1, "allocators": {
        "native": {"constants": base},
        "cudaMallocAsync": {"constants": {**base, "reserved_frag": base["reserved_frag"] + 1.0,
                                           "reserved_frag_lowmem": base["reserved_frag_lowmem"] + 1.0}}}}
    path = tmp_path / "h200.json"
    path.write_text(json.dumps(doc))
    nat = est(profile="lowvram", calibration_path=path, allocator="native").stage("denoise_step")
    asy = est(profile="lowvram", calibration_path=path, allocator="cudaMallocAsync").stage("denoise_step")
    assert asy.peak_allocated == nat.peak_allocated and asy.peak_reserved > nat.peak_reserved
    doc["allocators"].pop("cudaMallocAsync")
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "h200.json").write_text(json.dumps(doc))
    monkeypatch.setattr(cards, "CALIBRATION_DIR", tmp_path / "only")
    e = est(profile="lowvram", card="NVIDIA H200", allocator="cudaMallocAsync")
    assert e.calibration["allocator"] == "native" and e.allocator == "cudaMallocAsync" and e.calibration["matched"]
    assert "cudaMallocAsync allocator was not measured on this card" in e.report()


def _bench_json(name: str):
    return json.loads((Path(__file__).parents[1] / "bench" / name).read_text())


def _replayed_profile(settings: dict) -> Profile:
    """The profile a run recorded (pipeline.profile_settings: the tile as WxH, its overlap 0.2)."""
    w, h = (int(x) for x in settings["vae_tile"].split("x"))
    return Profile("replay", transformer=settings["transformer"], text_encoder=settings["text_encoder"],
                   vae=settings["vae"], cfg_mode=settings["cfg"], ff_chunk=settings["ff_chunk"],
                   low_mem_attention=settings["low_mem_attention"], vae_tile=TileSpec(h, w, 0.2),
                   encode_tiled=settings["encode_tiled"])


def _replayed_rows(report: dict) -> list[dict]:
    """A run's stage rows the estimate can be held to: a run with encode_tiled measured diffusers' tiled
    encode, which the strip encode replaced (issue 30): its image encode row describes code that is gone."""
    rows = report["stages"]
    if report["settings"].get("encode_tiled"):
        rows = [r for r in rows if r["stage"] != "image encode"]
    return rows


def _host_runs():
    """(name, settings, {stage: measured anon + pinned GiB}) of this code's file-backed H200 runs: both
    recipes of bench/hostrun_h200_c5.json and the 12gb command line of bench/comfyui_gpu_h200_c5_ring.json."""
    for r in _bench_json("hostrun_h200_c5.json")["results"]:
        if r["recipe"].startswith("ours"):
            yield r["recipe"], r["settings"], {x["stage"]: x["host_peak_anon_pinned_gib"] for x in r["stages"]}
    report = _bench_json("comfyui_gpu_h200_c5_ring.json")["cli"]["12gb"]["report"]
    yield "cli 12gb", report["settings"], {x["stage"]: x["host_peak_anon_pinned_gib"] for x in report["stages"]}


def test_host_estimate_replays_the_h200_runs():
    """Issue 12: the estimate's host RAM per stage within +-15% of the H200 runs it was checked on
    (balanced; lowvram with 320x200 and 360x240 tiles)."""
    runs = list(_host_runs())
    assert len(runs) == 3
    for name, settings, measured in runs:
        est = E.estimate("cogvideox1.5-5b-i2v", 81, 768, 1360, _replayed_profile(settings))
        for stage, label in (("text_encode", "text encode"), ("image_encode", "image encode"),
                             ("denoise_step", "denoise"), ("decode", "decode")):
            got = est.stage(stage).host_bytes / GiB
            assert abs(got / measured[label] - 1) <= 0.15, (name, stage, got, measured[label])


def _check_stage(est, name: str, row: dict, label=None) -> None:
    """One measured stage row (peak_alloc_gib, peak_reserved_gib) against ``est``'s stage ``name``: allocated
    and reserved within +-10%, and the verdict at or above what the stage reserved."""
    e = est.stage(name)
    assert abs(e.peak_allocated / GiB / row["peak_alloc_gib"] - 1) <= 0.10, (label, name, e, row)
    assert abs(e.peak_reserved / GiB / row["peak_reserved_gib"] - 1) <= 0.10, (label, name, e, row)
    assert est.stage_needed(name) >= row["peak_reserved_gib"] * GiB, (label, name, row)


def _check_cli_run(report: dict, est) -> None:
    """Each stage of a command-line run's report against ``est`` (_check_stage)."""
    rows = [r for r in _replayed_rows(report) if r["stage"] in SHIPPED_STAGES]
    assert len(rows) == (3 if report["settings"]["encode_tiled"] else 4)
    for row in rows:
        _check_stage(est, SHIPPED_STAGES[row["stage"]], row)


@pytest.mark.parametrize("bench_file,workflow", [("comfyui_gpu_h200_c5_ring.json", "12gb"),
                                                 ("comfyui_gpu_h200_c4_hosttiles.json", "24gb")])
def test_a_card_without_a_file_gets_a_safe_verdict_for_the_h200s_whole_runs(bench_file, workflow):
    """The transfer, on whole runs, the other way: a card with no calibration file (an RTX 4090 here) gets the
    nearest file, the H100's since session 18 (fitted with speed cells), plus the transfer margin. Judged
    against the H200's command-line runs of the 12 GB and 24 GB workflows (file-backed, expandable segments;
    the 12gb run is the one with the streamed blocks' ring, c5), a card that file never saw: every stage
    allocated and reserved within +-10% and its verdict covers what it reserved (allocated -3.7..+2.8%,
    reserved -6.2..+9.2%, verdicts +8.2..+21.3% above the peaks with the 6.0% margin, session 19's files)."""
    choice = E.calibration(None, "NVIDIA GeForce RTX 4090", "native:expandable")["choice"]
    assert choice["family"] == "h100" and not choice["matched"] and choice["transfer_margin"] > 0
    report = _bench_json(bench_file)["cli"][workflow]["report"]
    est = E.estimate("cogvideox1.5-5b-i2v", 81, 768, 1360, _replayed_profile(report["settings"]),
                     card="NVIDIA GeForce RTX 4090", allocator="native:expandable")
    _check_cli_run(report, est)


def test_decode_host_term_replays_the_cpu_measurement():
    """hostplan.decode_host_bytes against bench/decode_host_cpu.json (81x768x1360, the decode's host
    assembly measured on the CPU: tiles written into the float32 frames), within +-15%."""
    from cogvid_core.memory import hostplan as H

    rows = _bench_json("decode_host_cpu.json")["rows"]
    video = 81 * 3 * 768 * 1360 * 2
    for r in rows:
        if r["kind"] == "rows":
            assert abs(H.decode_host_bytes(video, tiled=True) / GiB / r["peak_over_start_gib"] - 1) <= 0.15, r


@pytest.mark.parametrize("bench_file,workflow", [("comfyui_gpu_h200_c5_ring.json", "12gb"),
                                                 ("comfyui_gpu_h200_c4_hosttiles.json", "24gb")])
def test_file_backed_h200_runs_replay_with_the_h200_calibration(bench_file, workflow):
    """The same command-line runs through calibration/h200.json (chosen by the name "NVIDIA H200"): every
    stage's peak allocated and reserved within its +-10%. The command line runs with expandable segments:
    their own set, whose decode was measured (the plain set's decode erred +14.5% here) and whose other
    stages take the plain native constants, which the note says. The 12gb run replayed is the one with
    the streamed blocks' ring (c5): c4's 12gb run predates it."""
    report = _bench_json(bench_file)["cli"][workflow]["report"]
    est = E.estimate("cogvideox1.5-5b-i2v", 81, 768, 1360, _replayed_profile(report["settings"]),
                     card="NVIDIA H200", allocator="native:expandable")
    assert est.calibration["family"] == "h200" and est.calibration["tolerance"] == 0.10
    assert est.calibration["allocator"] == "native:expandable"
    assert "denoise_step not measured under native:expandable: the native constants" in est.calibration["note"]
    _check_cli_run(report, est)


def test_speed_options_memory_replays_the_h200_runs():
    """The denoise step's allocated peak with a speed option, against the H200 runs that measured it."""
    root = Path(__file__).resolve().parents[1] / "bench"
    speed_rows = {r["option"]: r for r in json.loads((root / "speed_h200.json").read_text())["rows"]}
    for option in ("exact", "fp8", "compile", "fp8+compile"):        # resident, batched CFG, unchunked
        got = est(profile="resident", speed=option).stage("denoise_step").peak_allocated / GiB
        measured = speed_rows[option]["peak_allocated_gib"]
        assert -0.10 <= got / measured - 1 <= 0.10 or (option != "fp8" and got >= measured), (option, got, measured)
    runs = {r["recipe"]: r for r in json.loads((root / "hostrun_h200_s6.json").read_text())["results"]}
    for recipe in ("ours-auto@6~fa3fp8", "ours-auto@6~fp8+fa3fp8+compile", "ours-auto@11"):
        r = runs[recipe]
        speed = recipe.partition("~")[2] or "exact"
        prof = Profile(name=r["profile"], transformer="stream", text_encoder="stream", vae="offload",
                       cfg_mode=r["settings"]["cfg"], ff_chunk=r["settings"]["ff_chunk"], low_mem_attention=True)
        got = est(profile=prof, speed=speed).stage("denoise_step").peak_allocated / GiB
        measured = next(s["peak_alloc_gib"] for s in r["stages"] if s["stage"] == "denoise")
        assert abs(got / measured - 1) <= 0.10, (recipe, got, measured)
    # what a plan compares: a lean decode tile leaves the denoise step the peak, which the option raises
    lean = PL.candidates()[-1]
    assert est(profile=lean, speed="fa3fp8").needed_bytes > est(profile=lean).needed_bytes


def test_each_stage_is_held_to_its_own_margin():
    cal = {**E.DEFAULT_CONSTANTS, "reserved_margin": 0.5,
           "reserved_margin_stages": {"decode": 0.0, "denoise_step:batched": 0.1}}
    for prof, step_margin in ((PL.candidates()[2], 0.1), (PROFILES["lowvram"], 0.5)):   # batched, one branch
        e = est(profile=prof, calibration_path=cal)
        assert e.stage_margin("decode") == 0.0 and e.stage_margin("denoise_step") == step_margin
        assert e.stage_margin("text_encode") == 0.5                      # not calibrated alone: the overall one
        want = max(int(s.peak_reserved * (1 + e.stage_margin(s.name))) for s in e.stages)
        assert e.needed_bytes == want and e.stage(e.needed_stage).peak_reserved * (1 + e.stage_margin(e.needed_stage)) >= want


def test_a_stage_margin_in_bytes_lowers_big_peaks_never_below_the_tolerance():
    """With its largest miss in bytes and a tolerance, a stage needs the smaller of peak x (1 + relative
    margin) and max(peak + bytes, peak x (1 + tolerance)); without either, the relative margin alone."""
    rel = {**E.DEFAULT_CONSTANTS, "reserved_margin": 0.3, "reserved_margin_stages": {"decode": 0.3}}
    e = est(profile="lowvram", calibration_path=rel)
    dec = e.stage("decode").peak_reserved
    assert e.stage_needed("decode") == int(dec * 1.3)                        # no byte margin: relative
    for extra, tol in ((256 * 2 ** 20, 0.10), (64 * 2 ** 20, 0.10), (8 * GiB, 0.10), (256 * 2 ** 20, None)):
        cal = {**rel, "reserved_margin_bytes_stages": {"decode": extra}, "tolerance": tol}
        e = est(profile="lowvram", calibration_path=cal)
        want = int(dec * 1.3) if tol is None else int(min(dec * 1.3, max(dec + extra, dec * (1 + tol))))
        assert e.stage_needed("decode") == want, (extra, tol)
        assert e.stage_needed("decode") >= int(dec * 1.1) or tol is None
        assert f"= {e.needed_bytes / GiB:.2f} GiB" in e.report()
    # the committed H200 file: a 5-6 GiB decode under cudaMallocAsync needs its 10% tolerance, not the
    # 17%+ its small tiles' misses set (their bytes are few)
    e = est(profile="lowvram", card="NVIDIA H200", allocator="cudaMallocAsync")
    d = e.stage("decode").peak_reserved
    assert e.stage_margin("decode") > 0.15 and e.stage_needed("decode") < d * 1.15


def test_a_compiled_option_says_the_estimate_errs_high_until_speed_cells_are_fitted(tmp_path, monkeypatch):
    """Where no file has speed cells (h200.json alone here), a compiled option is counted as if compile saved
    nothing, and the report says so; a file fitted with them (h100.json since session 18:
    bench/estimate_h100_speed.json) does not, and counts less for the compiled option than the same constants
    without compile's terms."""
    from cogvid_core.plan.chart import calibration_line
    args = ("cogvideox1.5-5b-i2v", 81, 768, 1360, "resident")
    (tmp_path / "h200.json").write_text((cards.CALIBRATION_DIR / "h200.json").read_text())
    monkeypatch.setattr(cards, "CALIBRATION_DIR", tmp_path)
    h200 = E.estimate(*args, speed="fp8+compile", card="NVIDIA H200", allocator="native")
    assert h200.calibration["family"] == "h200" and h200.calibration["matched"]
    assert "compiled speed options are counted as if compile saved nothing" in calibration_line(h200)
    assert "compile saved nothing" not in calibration_line(E.estimate(*args, speed="exact", card="NVIDIA H200"))
    monkeypatch.undo()
    h100 = E.estimate(*args, speed="fp8+compile", card="NVIDIA H100 80GB HBM3", allocator="native")
    assert "compile saved nothing" not in calibration_line(h100)
    fitted = E.calibration(None, "NVIDIA H100 80GB HBM3", "native")["constants"]
    assert fitted["step_ff_units_compile_saved"] > 0
    unfitted = dict(fitted, **speedmem.NEUTRAL)
    without = E.estimate(*args, speed="fp8+compile", calibration_path=unfitted, allocator="native")
    assert h100.stage("denoise_step").peak_allocated < without.stage("denoise_step").peak_allocated


def test_an_h200_estimates_compiled_options_with_the_h100s_file():
    """h200.json has no speed cells: it would count a compiled option as if compile saved nothing (+8.6% to +20.3%
    allocated on the H200's own compiled resident steps). Since session 19 a compiled option on an H200 takes
    the nearest file that has them, h100.json, with the transfer margin, and the report says so; exact and
    the options without compile keep h200.json. Judged against the H200's measurements of compiled options:
    the resident steps of bench_speed (the larger of two runs per option: a step's first call autotunes),
    the 6 GiB small-card run's streamed step (hostrun_h200_s6.json) and a whole resident run
    (hostrun_lora_fast_h200.json, no LoRA): allocated within +-10% (h100.json: -1.6% to +3.9% on the steps),
    reserved within +-10% where measured, every verdict at or above what the stage reserved."""
    from cogvid_core.plan.chart import calibration_line
    bf16 = {"transformer": "bf16", "text_encoder": "bf16", "vae": "bf16"}
    margin = cards.transfer()["margin"]
    for speed, family in (("exact", "h200"), ("fa3fp8", "h200"), ("fp8", "h200"), ("compile", "h100"),
                          ("fp8+fa3fp8+compile", "h100")):
        e = est(profile="resident", speed=speed, card="NVIDIA H200", allocator="native")
        assert e.calibration["family"] == family and e.transfer_margin == (margin if family == "h100" else 0), speed
    e = est(profile="resident", speed="compile", card="NVIDIA H200", allocator="native")
    assert "No speed measurements for NVIDIA H200: using the NVIDIA H100" in calibration_line(e)
    assert "compile saved nothing" not in calibration_line(e)
    own = cards.CALIBRATION_DIR / "h200.json"
    measured = {}
    for name in ("speed_h200.json", "speed_h200_s6.json"):
        for r in _bench_json(name)["rows"]:
            if r.get("peak_allocated_gib") and "compile" in r["option"]:
                measured[r["option"]] = max(measured.get(r["option"], 0.0), r["peak_allocated_gib"])
    assert len(measured) == 4
    own_errors = []
    for speed, gib in measured.items():
        got = est(profile="resident", speed=speed, card="NVIDIA H200", allocator="native")
        assert abs(got.stage("denoise_step").peak_allocated / GiB / gib - 1) <= 0.10, speed
        old = est(profile="resident", speed=speed, calibration_path=own, allocator="native")
        own_errors.append(old.stage("denoise_step").peak_allocated / GiB / gib - 1)
    assert max(own_errors) > 0.15          # not vacuous: the H200's own file is far over
    small = next(r for r in _bench_json("hostrun_h200_s6.json")["results"] if r["recipe"] == "ours-auto@6~fp8+fa3fp8+compile")
    whole = next(r for r in _bench_json("hostrun_lora_fast_h200.json")["results"]
                 if r["recipe"] == "ours-resident~fp8+fa3fp8+compile")
    checked = 0
    for run, stages in ((small, ("denoise",)), (whole, tuple(SHIPPED_STAGES))):
        e = E.estimate(V15, 81, 768, 1360, _replayed_profile(run["settings"]), bf16, speed=run["speed"],
                       card="NVIDIA H200", allocator="native")
        for st in run["stages"]:
            if st["stage"] in stages:
                _check_stage(e, SHIPPED_STAGES[st["stage"]], st, run["recipe"])
                checked += 1
    assert checked == 5
