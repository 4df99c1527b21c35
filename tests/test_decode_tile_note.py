"""Issue 30: the plan says in one line when its decode tile gives frames slightly unlike the resident
profile's (diffusers' tiled decode blends tiles, so another tile is another video; the encode and the
sampling are exact in every profile). The planner picks smaller tiles on small budgets, e.g. 1.0 at
49x480x720 under ~7 GiB (lowvram+tile320x200, +tile240x160, +tile160x120)."""
import logging

from cogvid_core.memory.profiles import PROFILES
from cogvid_core.plan import estimate as E
from cogvid_core.plan import planner
from cogvid_core.plan.chart import decode_tile_note

V10 = "cogvideox-5b-i2v"
SAYS = "the frames differ slightly from the resident profile's"


def _smaller_tile_profile():
    return next(p for p in planner.candidates() if p.name.startswith("lowvram+tile240x160"))


def test_a_smaller_decode_tile_is_said_in_the_plan_and_its_report():
    prof = _smaller_tile_profile()
    est = E.estimate(V10, 49, 480, 720, prof)
    lines = [line for line in est.report().splitlines() if SAYS in line]
    assert lines == ["note: decode tile 240x160 (overlap 0.2), not the resident profile's 360x240 (overlap 0.2): "
                     "diffusers blends decode tiles, so " + SAYS]
    assert est.to_dict()["decode_note"] == lines[0]


def test_the_resident_tile_says_nothing():
    for name in ("resident", "balanced", "lowvram"):
        est = E.estimate(V10, 49, 480, 720, name)
        assert SAYS not in est.report() and est.to_dict()["decode_note"] == "", name


def test_other_overlaps_and_untiled_are_said_too():
    assert decode_tile_note((240, 360, 0.2)) == ""
    assert decode_tile_note((240, 360, 1 / 6))        # the decode node's default overlap blends fewer rows
    assert "untiled decode" in decode_tile_note(None)


def test_auto_logs_the_note(caplog, monkeypatch):
    """``auto`` logs its choice with the note (the choice itself depends on the card's calibration: the
    planner is handed the smaller-tile plan here)."""
    prof = _smaller_tile_profile()
    est = E.estimate(V10, 49, 480, 720, prof)
    monkeypatch.setattr(planner, "plan", lambda *a, **k: (prof, est))
    with caplog.at_level(logging.INFO, logger=planner.log.name):
        got = planner.resolve_profile("auto", budget_bytes=4 * 1024 ** 3, variant=V10, frames=49, height=480,
                                      width=720)
    assert got.vae_tile == prof.vae_tile != PROFILES["resident"].vae_tile
    assert any("auto placement: lowvram+tile240x160" in r.message and SAYS in r.message for r in caplog.records)
