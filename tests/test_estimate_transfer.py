"""The transfer replay's logic (bench/estimate_transfer.py): one card's calibration file against another
card's cells, the margin it measures, and that the shipped margin is what it computes from the raw files."""
import json

import pytest

from bench import estimate_transfer as T
from cogvid_core.plan import cards

GIB = 2 ** 30


def _cell(**kw):
    c = dict(stage="denoise_step", allocator="native", alloc=10 * GIB, reserved=12 * GIB, error=None,
             host_anon_pinned=None)
    c.update(kw)
    return c


def _row(cells, file, short, covered=True, stage="denoise_step", key=("stream", "sequential", 8192, True), **kw):
    r = dict(cells=cells, file=file, stage=stage, kind="fit", allocator="native", variant="v", shape=[17, 480, 720],
             key=list(key), covered=covered, alloc_err=0.0, reserved_err=0.0, host_err=None, short=short,
             safe=short <= 0)
    r.update(kw)
    return r


def test_errors_signs_and_verdict():
    c = _cell(host_anon_pinned=2 * GIB)
    e = T.errors(c, alloc=11 * GIB, reserved=9 * GIB, needed=10 * GIB, host=GIB)
    assert e["alloc_err"] == pytest.approx(0.10) and e["reserved_err"] == pytest.approx(-0.25)
    assert e["host_err"] == pytest.approx(-0.5)
    assert e["short"] == pytest.approx(0.2) and not e["safe"]           # reserved 12 over the 10 asked
    ok = T.errors(c, alloc=10 * GIB, reserved=12 * GIB, needed=12 * GIB, host=None)
    assert ok["safe"] and ok["short"] == 0 and ok["host_err"] is None   # asking exactly what it took is safe


def test_skip_reasons():
    own = {"card": "A", "family": "a", "allocators": {"native": {}}, "excluded": {"decode": "stale"}}
    src = {"card": "B", "family": "b", "allocators": {"native": {}}, "excluded": {"image_encode": "not fitted"}}
    assert T.skip_reason(_cell(), own, src) is None
    assert "out of memory" in T.skip_reason(_cell(error="OOM"), own, src)
    assert "cudaMallocAsync allocator not measured on B" == T.skip_reason(_cell(allocator="cudaMallocAsync"), own, src)
    assert T.skip_reason(_cell(stage="decode"), own, src) == "measurement stale: stale"
    assert T.skip_reason(_cell(stage="image_encode"), own, src) == "not calibrated in b.json: not fitted"


def test_margin_is_the_worst_shortfall_on_another_card_where_the_file_covers():
    rows = [_row("a", "a", 0.30),                      # own card: the file's own margins' business
            _row("a", "b", 0.155, covered=False),      # b never measured that configuration: not a card difference
            _row("a", "b", 0.0631),
            _row("b", "a", -0.04)]
    tm = T.transfer_margin(rows)
    assert tm["margin"] == 0.064                       # rounded up to 0.1%: the margin covers the cell
    assert tm["worst"]["file"] == "b" and tm["worst"]["short"] == 0.0631 and tm["cells"] == 2
    assert T.transfer_margin([_row("a", "b", -0.02), _row("b", "a", -0.3)])["margin"] == 0.0
    assert T.transfer_margin([_row("a", "b", 0.05)])["margin"] == 0.05     # exact: not rounded further up


def test_summary_applies_the_margin_to_other_cards_only():
    rows = [_row("a", "b", 0.06), _row("a", "b", 0.07), _row("a", "a", 0.01),
            _row("a", "b", -0.1, key=("resident", "batched", None, False))]
    s = {(x["cells"], x["file"], x["group"]): x for x in T.summarize(rows, margin=0.064)}
    streamed = s["a", "b", "denoise_step streamed"]
    assert streamed["n"] == 2 and streamed["safe"] == 0 and streamed["safe_with_margin"] == 1
    assert streamed["short_worst"] == 0.07
    assert s["a", "a", "denoise_step streamed"]["safe_with_margin"] == 0      # own card: no transfer margin
    assert s["a", "b", "denoise_step"]["safe"] == 1
    assert "denoise_step streamed" in T.table(T.summarize(rows))


def test_covered_compares_keys_as_json():
    """A decode key holds its tile as a tuple; the calibration file's covers hold lists."""
    doc = {"allocators": {"native": {"covers": {"decode": [["offload", [160, 240]]]}}}}
    cell = dict(stage="decode", profile="lowvram", allocator="native",
                settings={"transformer": "stream", "text_encoder": "stream", "vae": "offload", "cfg_mode": "sequential",
                          "ff_chunk": 8192, "low_mem_attention": True, "encode_tiled": True,
                          "vae_tile": [160, 240, 0.2]})
    assert T.covered(doc, cell)
    assert not T.covered(doc, dict(cell, settings=dict(cell["settings"], vae_tile=[240, 360, 0.2])))


def test_shipped_margin_is_what_the_replay_computes_from_the_raw_files():
    """calibration/transfer.json (what cards.choose adds for a card with no file) and bench/estimate_transfer.json
    hold the margin the replay computes today from the committed grids and calibration files: a refit, a new grid
    or a change to the estimate that moves it fails here until `bench/estimate_transfer.py --write` is rerun."""
    rows, _ = T.replay(T.grids())
    tm = T.transfer_margin(rows)
    shipped = json.loads(cards.TRANSFER.read_text())
    assert shipped["margin"] == tm["margin"] and 0 < tm["margin"] < 0.5
    assert shipped["worst"]["key"] == tm["worst"]["key"] and shipped["stages"] == tm["stages"]
    assert shipped["between"] == [cards.read(p)["card"] for p in cards.available().values()]
    results = json.loads(T.OUT.read_text())
    assert results["transfer"]["margin"] == tm["margin"] and "estimate_transfer.py --write" in results["env"]["command"]
    # with the margin, every covered cell of the other card is within what its verdict asks
    assert all(r["short"] <= tm["margin"] for r in rows if r["cells"] != r["file"] and r["covered"])
