"""What the estimate grid measures and how its files are read (bench_estimate; no GPU).

A measurement is a CELL: one stage, one shape, one stage configuration (the settings of a candidate
that the stage depends on: ``stage_key``), one allocator. Every candidate of planner.candidates() maps
to one configuration per stage; cells shared by candidates are measured once (``plan_tasks``).
``load_cells`` reads the grid files back, the older row format of bench/estimate_h100_*.json too.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cogvid_core.memory.profiles import Profile, TileSpec
from cogvid_core.model import variants as M
from cogvid_core.model.stages import STAGES
from cogvid_core.plan import planner

# 3 sizes per variant for the fit; held-out shapes are never fitted on
FULL_SHAPES = {"fit": [(M.V10, 17, 480, 720), (M.V10, 33, 480, 720), (M.V10, 49, 480, 720),
                       (M.V15, 33, 480, 848), (M.V15, 33, 768, 1360), (M.V15, 81, 768, 1360)],
               "heldout": [(M.V15, 49, 480, 848), (M.V15, 81, 1024, 1024)]}
TINY_SHAPES = {"fit": [(M.V10, 9, 64, 96), (M.V15, 17, 64, 96)], "heldout": [(M.V15, 17, 96, 128)]}
# decodes of 81 frames with small tiles take 20-40 s each on an H200: measured last (tier 2)
SLOW_DECODE_FRAMES = 81
SLOW_DECODE_AREA = 160 * 240
# held-out 81x1024x1024: the configurations auto picks at common budgets first (tier 1), the rest last
HELDOUT_FIRST = {"denoise_step": {("resident", "batched", None, False), ("offload", "sequential", 16384, True),
                                  ("stream", "batched", 8192, True), ("stream", "sequential", 8192, True)},
                 "decode": {("resident", (240, 360)), ("offload", (160, 240))}}
# the files whose code sets a streamed block's allocations: the env records their sha1 (paths from the repo root)
STREAMING_CODE = ("cogvid_core/memory/filestream.py", "cogvid_core/memory/fileread.py",
                  "cogvid_core/memory/placement.py")
PROFILE_FIELDS = ("transformer", "text_encoder", "vae", "cfg_mode", "ff_chunk", "low_mem_attention",
                  "encode_tiled")
# speed cells (--speeds): the denoise step of the shipped size with a speed option, for the plans the
# shipped workflows run (resident, balanced, lowvram). The exact grid sees only the larger of the step's
# attention and feed-forward phases; the options move one phase or the other, which tells them apart
SPEED_SHAPES = {False: (M.V15, 81, 768, 1360), True: (M.V15, 17, 64, 96)}
SPEED_PROFILES = ("resident", "balanced", "lowvram")


# ------------------------------------------------------------------------------ what to measure
def stage_key(stage: str, prof: Profile) -> tuple:
    """The settings of ``prof`` that stage's memory depends on (cells with one key are one measurement)."""
    tile = (prof.vae_tile.height, prof.vae_tile.width) if prof.vae_tile else None
    return {"text_encode": (prof.text_encoder,),
            # encode_tiled encodes in strips (issue 30), whatever the tile: its cells are keyed "strips"; the
            # cells keyed by a tile measured the tiled encode it replaced (marked superseded)
            "image_encode": (prof.vae, "strips" if prof.encode_tiled else None),
            "denoise_step": (prof.transformer, prof.cfg_mode, prof.ff_chunk, prof.low_mem_attention),
            "decode": (prof.vae, tile)}[stage]


def stage_configs() -> dict[str, dict[tuple, Profile]]:
    """{stage: {key: the first candidate with that key}} over every candidate `auto` can return."""
    out: dict = {s: {} for s in STAGES}
    for prof in planner.candidates():
        for s in STAGES:
            out[s].setdefault(stage_key(s, prof), prof)
    return out


def settings_of(prof: Profile) -> dict:
    t = prof.vae_tile
    return {**{k: getattr(prof, k) for k in PROFILE_FIELDS}, "vae_tile": [t.height, t.width, t.overlap] if t else None}


@dataclass
class Task:
    stage: str
    variant: M.Variant
    frames: int
    height: int
    width: int
    key: tuple
    profile: Profile
    kind: str        # "fit" | "heldout" | "speed"
    tier: int        # 0 fit grid, 1 held-out and speed cells, 2 slow extras
    repeat: bool = False   # measured before (--resume), run again only for the input it makes
    speed: str = "exact"   # the transformer's speed option (kind "speed": cogvid_core.speed.fast)

    @property
    def cache_key(self):
        return measured_key(self.stage, self.variant.key, self.frames, self.height, self.width, self.key, self.speed)

    def needs(self) -> set:
        return {"text_encode": {"text_encoder"}, "denoise_step": {"transformer:" + self.variant.key, "prompt",
                                                                   ("latent", self.variant.key, self.height, self.width)}
                }.get(self.stage, set())


def measured_key(stage, variant_key, frames, height, width, key, speed: str = "exact") -> tuple:
    """One measurement's identity: the text encode depends on no shape, the image encode on no frame
    count; ``key`` a stage_key tuple or its JSON list form (a cell's "key"); a speed option other than
    exact is part of it (exact cells keep the identity they always had)."""
    shape = {"text_encode": (), "image_encode": (variant_key, height, width)}.get(
        stage, (variant_key, frames, height, width))
    return (stage, shape, json.dumps(list(key))) + _speed_part(speed)


def _speed_part(speed: str) -> tuple:
    """A measurement identity's speed: nothing for exact (the identity every exact cell always had)."""
    return (speed,) if speed != "exact" else ()


def _tier(stage, key, kind, frames, height, width) -> int:
    if kind == "heldout":
        if (frames, height, width) == (81, 1024, 1024) and stage in HELDOUT_FIRST \
                and key not in HELDOUT_FIRST[stage]:
            return 2
        return 1
    if stage == "decode" and frames >= SLOW_DECODE_FRAMES and key[1] and key[1][0] * key[1][1] < SLOW_DECODE_AREA:
        return 2
    return 0


def speed_tasks(speeds, tiny: bool) -> list[Task]:
    """The denoise step of SPEED_SHAPES with each speed option, in each SPEED_PROFILES plan (kind "speed")."""
    v, f, h, w = SPEED_SHAPES[bool(tiny)]
    by_name = {prof.name: (key, prof) for key, prof in stage_configs()["denoise_step"].items()}
    return [Task("denoise_step", v, f, h, w, *by_name[name], "speed", 1, speed=speed)
            for name in SPEED_PROFILES for speed in speeds]


def plan_tasks(shapes: dict, tiny: bool, speeds=()) -> list[Task]:
    """Every (stage configuration x shape) once, in the order they should run; with ``speeds``, the
    speed cells (speed_tasks) after the fit grid."""
    cfgs = stage_configs()
    tasks, seen = [], set()
    for kind in ("fit", "heldout"):
        for v, f, h, w in shapes[kind]:
            for stage in STAGES:
                for key, prof in cfgs[stage].items():
                    tier = 0 if tiny else _tier(stage, key, kind, f, h, w)
                    t = Task(stage, v, f, h, w, key, prof, kind, tier)
                    if t.cache_key not in seen:
                        seen.add(t.cache_key)
                        tasks.append(t)
    return ordered(tasks + speed_tasks(speeds, tiny))


def ordered(tasks: list[Task]) -> list[Task]:
    """Tier first, then the cheap stages (whose outputs the later ones need), smaller shapes first."""
    cost = {"text_encode": 0, "image_encode": 1, "denoise_step": 2, "decode": 3}
    return sorted(tasks, key=lambda t: (t.tier, cost[t.stage], t.frames * t.height * t.width))


# ------------------------------------------------------------------------------ reading the files
def load_cells(paths) -> tuple[dict, list[dict]]:
    """(env of the last file, every measured cell) from grid files; the older row format (one row =
    one profile's 4 stages, bench/estimate_h100_*.json) becomes cells too (allocator: native). A cell
    marked "superseded" (measured on code that has since changed what it measures; the mark says how)
    stays in its file for the record and is left out here: of the fit, the report and the replay."""
    env, cells, seen = {}, [], set()
    for p in paths:
        d = json.loads(Path(p).read_text())
        env = d["env"]
        heldout = "heldout" in Path(p).name
        for c in d.get("cells") or _cells_of_rows(d["rows"], heldout):
            c = {"allocator": env.get("allocator", "native"), "card": env.get("card"), "file": Path(p).name,
                 "file_backed": str(env.get("weights", "")).startswith("file-backed"), **c}
            ident = (c["card"], c["allocator"], *measurement_of(c))
            if c["alloc"] is not None and ident not in seen and not c.get("superseded"):
                seen.add(ident)
                cells.append(c)
    return env, cells


def measurement_of(c) -> tuple:
    """What a cell measured, whatever card and allocator: stage, variant, shape, stage settings (and a
    speed option other than exact)."""
    return (c["stage"], c["variant"], c["frames"], c["height"], c["width"], json.dumps(c["settings"], sort_keys=True)) \
        + _speed_part(c.get("speed", "exact"))


def _cells_of_rows(rows, heldout) -> list[dict]:
    out = []
    for r in rows:
        # that bench encoded the image untiled whatever the profile said (no encode tile existed)
        settings = {**r["settings"], "vae_tile": r.get("tile"), "encode_tiled": False}
        for s in STAGES:
            m = r["stages"][s]
            if m.get("shared"):      # the same measurement as an earlier row's
                continue
            out.append(dict(stage=s, variant=r["variant"], frames=r["frames"], height=r["height"], width=r["width"],
                            kind="heldout" if heldout else "fit", profile=r["profile"], settings=settings,
                            alloc=m["alloc"], reserved=m["reserved"], error=None))
    return out


def profile_of(cell) -> Profile:
    s = dict(cell["settings"])
    t = s.pop("vae_tile", None)
    return Profile(cell["profile"], vae_tile=TileSpec(int(t[0]), int(t[1]), float(t[2])) if t else None, **s)
