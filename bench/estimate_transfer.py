"""Transfer: each card's calibration file predicts the OTHER card's measured cells (issue 27).

Users' cards (RTX 30xx/40xx, L4, A4000...) have no calibration file: their estimate uses another
card's. Here every calibration file (cogvid_core/plan/calibration/<family>.json) predicts the cells
of every card's grid (its own, for comparison) with the estimate's arithmetic of today: per stage the
allocated, reserved and host error, and whether the verdict is safe (measured reserved <= what the
verdict asks of the stage: Estimate.stage_needed, the file's own margins, no transfer margin).

The TRANSFER MARGIN is the most a cell reserved over what another card's file asks of its stage, over
the cells that file covers (its ``covers``: configurations measured on its own card, where its margins
were sized), rounded up to 0.1%: what cards.choose adds to the verdicts of a card with no file.
A cell is compared only where today's code measures what it measured and both files make a claim:
- the allocator must be in the predicting file (the H100 grid ran only the native one);
- a stage its card's file lists in ``excluded`` (measured with code that changed since: the H100
  decodes predate the host-assembled tiled decode) is left out, as is a stage the predicting file
  excludes (first-principles constants there, no calibration to transfer);
- cells that ran out of memory have no peak.
The host estimate does not use the calibration file (it is the same under every file); the H200 grid's
host figure is the bench process's, which keeps every model it has loaded, and the H100 grid has none.

    python3 bench/estimate_transfer.py            # the table
    python3 bench/estimate_transfer.py --write    # + bench/estimate_transfer.json, calibration/transfer.json
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common.provenance import provenance, write_json  # noqa: E402
from bench.estimate_cells import load_cells, profile_of, stage_key  # noqa: E402
from bench.estimate_replay import estimate_of  # noqa: E402
from cogvid_core.model.stages import STAGES  # noqa: E402
from cogvid_core.plan import cards  # noqa: E402

BENCH = Path(__file__).resolve().parent
OUT = BENCH / "estimate_transfer.json"
TOLERANCE = 0.10     # allocated within this of measured (the calibration files' claim on their own card)


def grids() -> dict[str, tuple[dict, Path, list[dict]]]:
    """{family: (its calibration doc, its path, its card's cells from the files the doc names)}."""
    out = {}
    for fam, path in cards.available().items():
        doc = cards.read(path)
        _, cells = load_cells([BENCH / f for f in doc["measurements"]])
        out[fam] = doc, path, [c for c in cells if cards.family_of(c["card"]) == fam]
    return out


def covered(doc: dict, cell: dict) -> bool:
    """The file measured this stage configuration on its own card (its ``covers``, per allocator). A speed
    option's cell never is: ``covers`` lists exact configurations (the fit grid's), and a file's margins were
    sized on those (the H100's eager-fp8 lowvram step reserves 24% over h200.json's estimate, a gap of the
    fp8 term on a chunked step, not a difference between cards: it would set the margin every card pays)."""
    if cell.get("speed", "exact") != "exact":
        return False
    covers = doc["allocators"].get(cell["allocator"], {}).get("covers", {})
    key = json.loads(json.dumps(stage_key(cell["stage"], profile_of(cell))))   # the decode's tile tuple as JSON's list
    return key in covers.get(cell["stage"], [])


def skip_reason(cell: dict, own: dict, src: dict) -> str | None:
    """Why ``cell`` (of the card of file ``own``) is not compared with file ``src``'s estimate; None: it is."""
    if cell.get("error") or not cell["reserved"]:
        return "did not run (out of memory)"
    if cell["allocator"] not in src["allocators"]:
        return f"{cell['allocator']} allocator not measured on {src['card']}"
    if cell["stage"] in own.get("excluded", {}):
        return f"measurement stale: {own['excluded'][cell['stage']]}"
    if cell["stage"] in src.get("excluded", {}):
        return f"not calibrated in {src['family']}.json: {src['excluded'][cell['stage']]}"
    return None


def errors(cell: dict, alloc: int, reserved: int, needed: int, host: int | None) -> dict:
    """A cell against a prediction: relative errors (+ = over-estimate) and the verdict's shortfall
    (measured reserved / needed - 1: > 0 means the verdict asked less than the stage reserved)."""
    h = cell.get("host_anon_pinned")
    return dict(alloc_err=(alloc - cell["alloc"]) / cell["alloc"],
                reserved_err=(reserved - cell["reserved"]) / cell["reserved"],
                host_err=(host - h) / h if h and host is not None else None,
                short=cell["reserved"] / needed - 1, safe=cell["reserved"] <= needed)


def replay(data: dict) -> tuple[list[dict], dict]:
    """(one row per (card's cell, predicting file)), {reason: cells left out}."""
    rows, skipped = [], {}
    for cfam, (own, _, cells) in data.items():
        for sfam, (src, spath, _) in data.items():
            for c in cells:
                why = skip_reason(c, own, src)
                if why:
                    k = f"{own['card']} {c['stage']} cells, {src['card']} file: {why}"
                    skipped[k] = skipped.get(k, 0) + 1
                    continue
                est = estimate_of(c, spath)
                s = est.stage(c["stage"])
                rows.append(dict(cells=cfam, file=sfam, stage=c["stage"], kind=c["kind"], allocator=c["allocator"],
                                 variant=c["variant"], shape=[c["frames"], c["height"], c["width"]],
                                 key=json.loads(json.dumps(stage_key(c["stage"], profile_of(c)))), covered=covered(src, c),
                                 **errors(c, s.peak_allocated, s.peak_reserved, est.stage_needed(c["stage"]),
                                          s.host_bytes)))
    return rows, skipped


def transfer_margin(rows: list[dict]) -> dict:
    """The margin a file needs on another card: the largest shortfall over the other cards' cells it
    covers, rounded up to 0.1% (0 where every such verdict was safe), and the cell that set it."""
    xfer = [r for r in rows if r["cells"] != r["file"] and r["covered"]]
    worst = max(xfer, key=lambda r: r["short"])
    margin = max(0.0, math.ceil(round(worst["short"] * 1000, 6)) / 1000)
    return dict(margin=margin, worst={k: worst[k] for k in ("cells", "file", "stage", "variant", "shape", "key",
                                                             "reserved_err", "short")},
                stages=sorted({r["stage"] for r in xfer}, key=STAGES.index),
                allocators=sorted({r["allocator"] for r in xfer}), cells=len(xfer))


def group(row: dict) -> str:
    """The row's stage, "... streamed" where its model is streamed: the H100 grid streamed in-memory models
    (diffusers' group offloading), the H200 grid file-backed ones, so those cells differ by loading as well."""
    return row["stage"] + (" streamed" if row["key"][0] == "stream" else "")


def summarize(rows: list[dict], margin: float = 0.0) -> list[dict]:
    """Per (cells' card, predicting file, group): counts, worst errors, verdicts safe without and with
    ``margin`` (the transfer margin; own-card rows get none)."""
    out = []
    for key in sorted({(r["cells"], r["file"], group(r)) for r in rows},
                      key=lambda k: (k[0], k[1], STAGES.index(k[2].split()[0]), k[2])):
        g = [r for r in rows if (r["cells"], r["file"], group(r)) == key]
        m = margin if key[0] != key[1] else 0.0
        hosts = [r["host_err"] for r in g if r["host_err"] is not None]
        out.append(dict(cells=key[0], file=key[1], group=key[2], n=len(g), covered=sum(r["covered"] for r in g),
                        alloc_worst=max((r["alloc_err"] for r in g), key=abs),
                        alloc_within=sum(abs(r["alloc_err"]) <= TOLERANCE for r in g),
                        reserved_min=min(r["reserved_err"] for r in g), reserved_max=max(r["reserved_err"] for r in g),
                        host_worst=max(hosts, key=abs) if hosts else None,
                        safe=sum(r["safe"] for r in g), short_worst=max(r["short"] for r in g),
                        safe_with_margin=sum((1 + r["short"]) <= 1 + m + 1e-12 for r in g), margin=m))
    return out


def table(summary: list[dict]) -> str:
    pct = lambda x: "   -  " if x is None else f"{x * 100:+6.1f}"
    lines = [f"{'cells of':<9}{'file':<6}{'stage':<22}{'n':>4}{'cov':>4}{'alloc worst':>12}{'in10%':>6}"
             f"{'reserved min..max':>19}{'host':>8}{'safe':>6}{'worst short':>12}{'safe+m':>8}"]
    for s in summary:
        lines.append(f"{s['cells']:<9}{s['file']:<6}{s['group']:<22}{s['n']:>4}{s['covered']:>4}"
                     f"{pct(s['alloc_worst']):>11}%{s['alloc_within']:>6}{pct(s['reserved_min']):>10}..{pct(s['reserved_max'])}%"
                     f"{pct(s['host_worst']):>7}%{s['safe']:>6}{pct(s['short_worst']):>11}%{s['safe_with_margin']:>8}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true", help=f"write {OUT.name} and {cards.TRANSFER.name}")
    args = ap.parse_args(argv)
    data = grids()
    rows, skipped = replay(data)
    tm = transfer_margin(rows)
    summary = summarize(rows, tm["margin"])
    print(table(summary))
    print("left out:\n" + "\n".join(f"  {n:3} {k}" for k, n in skipped.items()))
    w = tm["worst"]
    print(f"transfer margin {tm['margin']:.1%}: {w['file']}.json on a {w['cells']} cell ({w['variant']} "
          f"{'x'.join(map(str, w['shape']))} {w['stage']} {w['key']}) reserved {w['short']:.1%} over what it asks")
    uncovered = [r for r in rows if r["cells"] != r["file"] and not r["covered"]]
    if uncovered:
        u = max(uncovered, key=lambda r: r["short"])
        print(f"outside what the predicting file covers ({len(uncovered)} cells): worst shortfall {u['short']:.1%} "
              f"({u['file']}.json, {u['stage']} {u['key']}): not in the margin")
    if args.write:
        prov = provenance(None)
        files = {fam: doc["measurements"] for fam, (doc, _, _) in data.items()}
        r4 = lambda d: {k: round(v, 4) if isinstance(v, float) else v for k, v in d.items()}
        write_json(OUT, dict(env=prov, measurements=files, tolerance=TOLERANCE, transfer=tm,
                             summary=[r4(x) for x in summary], skipped=skipped, rows=[r4(x) for x in rows]))
        cards.TRANSFER.write_text(json.dumps(dict(
            margin=tm["margin"], between=[doc["card"] for doc, _, _ in data.values()], stages=tm["stages"],
            allocators=tm["allocators"], cells=tm["cells"], worst=tm["worst"], measurements=files,
            source="bench/estimate_transfer.py --write", results=f"bench/{OUT.name}",
            command=prov["command"], date=prov["date"], commit=prov["commit"]), indent=2) + "\n")
        print(f"wrote {OUT} and {cards.TRANSFER}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
