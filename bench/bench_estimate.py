"""Predicted vs measured peak GPU memory per stage, for every plan `auto` can choose (issue 14).

What runs is the engine's own default path, stage by stage as pipeline.generate does it:
text.encode_prompt, vae.encode_image, sampling.sample (1 step: the step's peak does not change with
the step count), vae.decode, each component through session.Component (its profile's placement and
activation savers, configured, used, released), under report.StageRecorder. The transformer and T5
are FILE-BACKED, as the loaders load them by default: full-size random checkpoints are written once
(`--write-checkpoints DIR`, testing's writer, one process per file) and read block by block through
filestream's staging buffers. In-memory models are not equivalent on the GPU: file-backed placement
allocates one flat buffer per block (on the stream the copy runs on), diffusers' group offloading one
tensor per parameter, and cudaMallocAsync's pool grows differently with each. The VAE is in memory
(loading.load_vae is eager), built at random here.

A measurement is a CELL: one stage, one shape, one stage configuration (the settings of a candidate
that the stage depends on), one allocator. Every candidate of planner.candidates() maps to one
configuration per stage; cells shared by candidates are measured once. The decode's input is
random latents of the denoiser's output shape (its peak does not depend on their values), so the
decodes run while the checkpoints are still being written.

The allocator is the process's (PYTORCH_CUDA_ALLOC_CONF, read by torch at start): run one process
per allocator; each cell records torch.cuda.get_allocator_backend().

    python bench/bench_estimate.py --tiny --device cpu --out /tmp/x.json    # the code path, CPU, seconds
    python bench/bench_estimate.py --write-checkpoints /tmp/ck              # once, before/with the grids
    python bench/bench_estimate.py --checkpoints /tmp/ck --out native.json  # one GPU, one allocator
    python bench/bench_estimate.py --fit bench/estimate_h200_*.json --write-calibration  # no GPU

Tasks run in priority order (the fit grid first, held-out shapes after, the slowest extras last)
and no task starts after --budget-s: a run cut short keeps what it measured and lists the rest as
skipped. The JSON is rewritten after every cell. Run the grid on the tree whose filestream.py, fileread.py
and placement.py users get: the env records their sha1 (streamed-block allocation changes the peaks).

The H200 run (2 GPUs, one allocator each, the writer beside them; carry .whl = diffusers):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl && export PYTHONPATH=/tmp/site || exit; B=bench/bench_estimate.py; CK=/tmp/ck
    python3 $B --write-checkpoints $CK --out $OUT/estimate_h200_writer.json > $OUT/writer.log 2>&1 &
    CUDA_VISIBLE_DEVICES=0 timeout 480 python3 $B --checkpoints $CK --budget-s 400 \
      --out $OUT/estimate_h200_native.json > $OUT/native.log 2>&1 &
    CUDA_VISIBLE_DEVICES=1 PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync timeout 480 python3 $B \
      --checkpoints $CK --budget-s 400 --out $OUT/estimate_h200_async.json > $OUT/async.log 2>&1 &
    wait

With 4 GPUs, `--part 0/2` and `--part 1/2` per allocator split the denoise and decode cells.
A grid cut short is finished later with `--resume earlier.json --out more.json` (same card, allocator,
checkpoints): its cells are kept, only the tasks it lacks run, and the encodes whose outputs they need
run again into "repeats" (the same cell at another point of a run: how reproducible its peak is).
`--only TEXT` measures just the tasks whose printed description contains TEXT (and the encodes they
need): the same cells again in a fresh process, to tell a reproducible peak from allocator history.
Each cell records alloc_before / reserved_before, what earlier cells left on the device when it
started (after empty_cache): a reserved peak depends on it.
Expandable segments (the command line's setting) are a set of their own:
`PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True ... --only decode` measured the stage where they differ;
a set without some stage's cells takes it from the plain native set (fit(base=...)).
Then, here: `python3 bench/bench_estimate.py --fit bench/estimate_h200_native.json
bench/estimate_h200_async.json bench/estimate_h200_expandable.json --write-calibration` writes
cogvid_core/calibration/h200.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from cogvid_core.device import devmem  # noqa: E402
from cogvid_core.plan import estimate as E  # noqa: E402
from cogvid_core.model import variants as M  # noqa: E402
from cogvid_core.plan import planner  # noqa: E402
from cogvid_core.memory.profiles import Profile, TileSpec  # noqa: E402
from cogvid_core.model.stages import STAGES  # noqa: E402

GiB = devmem.GiB
ROOT = Path(__file__).resolve().parents[1]
REC_NAME = {"text_encode": "text encode", "image_encode": "image encode", "denoise_step": "denoise",
            "decode": "decode"}
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
PROFILE_FIELDS = ("transformer", "text_encoder", "vae", "cfg_mode", "ff_chunk", "low_mem_attention",
                  "encode_tiled")


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
    kind: str        # "fit" | "heldout"
    tier: int        # 0 fit grid, 1 held-out, 2 slow extras
    repeat: bool = False   # measured before (--resume), run again only for the input it makes

    @property
    def cache_key(self):
        return measured_key(self.stage, self.variant.key, self.frames, self.height, self.width, self.key)

    def needs(self) -> set:
        return {"text_encode": {"text_encoder"}, "denoise_step": {"transformer:" + self.variant.key, "prompt",
                                                                   ("latent", self.variant.key, self.height, self.width)}
                }.get(self.stage, set())


def measured_key(stage, variant_key, frames, height, width, key) -> tuple:
    """One measurement's identity: the text encode depends on no shape, the image encode on no frame
    count; ``key`` a stage_key tuple or its JSON list form (a cell's "key")."""
    shape = {"text_encode": (), "image_encode": (variant_key, height, width)}.get(
        stage, (variant_key, frames, height, width))
    return (stage, shape, json.dumps(list(key)))


def _tier(stage, key, kind, frames, height, width) -> int:
    if kind == "heldout":
        if (frames, height, width) == (81, 1024, 1024) and stage in HELDOUT_FIRST \
                and key not in HELDOUT_FIRST[stage]:
            return 2
        return 1
    if stage == "decode" and frames >= SLOW_DECODE_FRAMES and key[1] and key[1][0] * key[1][1] < SLOW_DECODE_AREA:
        return 2
    return 0


def plan_tasks(shapes: dict, tiny: bool) -> list[Task]:
    """Every (stage configuration x shape) once, in the order they should run."""
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
    return ordered(tasks)


def ordered(tasks: list[Task]) -> list[Task]:
    """Tier first, then the cheap stages (whose outputs the later ones need), smaller shapes first."""
    cost = {"text_encode": 0, "image_encode": 1, "denoise_step": 2, "decode": 3}
    return sorted(tasks, key=lambda t: (t.tier, cost[t.stage], t.frames * t.height * t.width))


# ------------------------------------------------------------------------------ checkpoints
def checkpoint_paths(root: Path) -> dict:
    return {"text_encoder": root / "t5xxl_bf16.safetensors", "tokenizer": root / "tokenizer",
            **{"transformer:" + v.key: root / f"{v.key.replace('.', '_')}_transformer_bf16.safetensors"
               for v in M.VARIANTS.values()}}


def _write_one(path: str, component: str, variant_key: str, tiny: bool) -> float:
    from cogvid_core.model import testing
    t0 = time.perf_counter()
    dtype = torch.float32 if tiny else torch.bfloat16
    tmp = Path(path + ".part")
    testing._write(tmp, component, testing.tensor_shapes(component, M.VARIANTS[variant_key], tiny), dtype, 0)
    os.replace(tmp, path)          # readers wait for the final name: never see half a file
    return round(time.perf_counter() - t0, 1)


def write_checkpoints(root: Path, tiny: bool) -> dict:
    """T5 and both transformers as single files (testing's writer), one process each, T5 first."""
    from cogvid_core.model import testing
    root.mkdir(parents=True, exist_ok=True)
    paths = checkpoint_paths(root)
    testing.write_tokenizer(paths["tokenizer"])
    jobs = {"text_encoder": ("text_encoder", M.V15.key),
            **{"transformer:" + v.key: ("transformer", v.key) for v in M.VARIANTS.values()}}
    t0 = time.perf_counter()
    try:
        with ProcessPoolExecutor(len(jobs)) as ex:
            futs = {name: ex.submit(_write_one, str(paths[name]), comp, key, tiny) for name, (comp, key) in jobs.items()}
            seconds = {name: f.result() for name, f in futs.items()}
    except BaseException as e:    # the grids waiting for these files stop waiting
        (root / "FAILED").write_text(f"{type(e).__name__}: {e}")
        raise
    out = dict(seconds=seconds, total_s=round(time.perf_counter() - t0, 1),
               gib={n: round(paths[n].stat().st_size / GiB, 2) for n in jobs})
    print(f"checkpoints written in {out['total_s']} s: {out}", flush=True)
    return out


class Models:
    """File-backed transformer and T5 (the loaders' default), loaded once each (a meta model and
    an index: no weights until placed); in-memory random VAEs, as load_vae gives."""

    def __init__(self, root: Path, device, dtype, tiny):
        self.paths, self.device, self.dtype, self.tiny = checkpoint_paths(root), device, dtype, tiny
        self._loaded: dict = {}

    def ready(self, name) -> bool:
        return self.paths[name].exists()

    def coming(self) -> bool:
        """Some file is still being written (and the writer has not failed)."""
        return not (self.paths["tokenizer"].parent / "FAILED").exists() and not all(
            self.ready(n) for n in self.paths)

    def get(self, name):
        if name not in self._loaded:
            from cogvid_core.model import loading
            from cogvid_core.model import testing
            if name == "text_encoder":
                self._loaded[name] = loading.load_text_encoder(self.paths[name], self.dtype,
                                                               tokenizer=self.paths["tokenizer"])
            elif name.startswith("transformer:"):
                self._loaded[name] = loading.load_transformer(self.paths[name], self.dtype)[0]
            else:          # vae:<key>: built on the device in a second, kept on the host
                v = M.VARIANTS[name.split(":", 1)[1]]
                self._loaded[name] = testing.build_random("vae", v, self.tiny, self.dtype, self.device).to("cpu")
                _free()
        return self._loaded[name]


def _free():
    devmem.free_memory(host_cache=True)


# ------------------------------------------------------------------------------ one cell
def _run_stage(task: Task, models: Models, device, inputs: dict) -> None:
    """The stage as pipeline.generate runs it (component configured, used, released)."""
    from cogvid_core.run import session
    v, prof, dtype = task.variant, task.profile, models.dtype
    if task.stage == "text_encode":
        t5, tok = models.get("text_encoder")
        c = session.Component("t5", t5, device, dtype, profile=prof, tokenizer=tok)
    elif task.stage == "denoise_step":
        c = session.Component("transformer", models.get("transformer:" + v.key), device, dtype, profile=prof, variant=v)
    else:
        c = session.Component("vae", models.get("vae:" + v.key), device, dtype, profile=prof, variant=v)
    try:
        with c.use() as m:
            _compute(task, m, c, device, dtype, inputs)
    finally:
        c.release()


def _compute(task: Task, m, c, device, dtype, inputs: dict) -> None:
    from PIL import Image

    from cogvid_core.run import sampling
    from cogvid_core.model import text
    from cogvid_core.model import vae as vae_mod
    from cogvid_core.model.vae import VideoLatents
    v, prof = task.variant, task.profile
    if task.stage == "text_encode":
        pos = text.encode_prompt(m, c.tokenizer, "a red fox runs through snow", device)
        neg = text.encode_prompt(m, c.tokenizer, "", device)
        inputs.setdefault("prompt", (pos.embeds.cpu(), neg.embeds.cpu()))
    elif task.stage == "denoise_step":
        pos, neg = inputs["prompt"]
        sampling.sample(m, v, pos, neg, inputs["latent", v.key, task.height, task.width], task.frames, steps=1,
                        cfg=6.0, scheduler="dpm", seed=0, device=device, dtype=dtype, cfg_mode=prof.cfg_mode)
    elif task.stage == "image_encode":
        img = Image.new("RGB", (task.width, task.height), (120, 80, 40))
        lat = vae_mod.encode_image(m, img, task.height, task.width, v, "crop", device, strips=prof.encode_tiled)
        inputs.setdefault(("latent", v.key, task.height, task.width), lat)
    else:   # random latents of the denoiser's output shape: the decode's peak does not depend on values
        n_lat, pad = M.latent_frames(v, task.frames)
        z = torch.randn(1, n_lat, 16, task.height // 8, task.width // 8,
                        generator=torch.Generator().manual_seed(0)).to(dtype)
        vae_mod.decode(m, VideoLatents(z, task.frames, task.height, task.width, v.key, v.fps, pad), device,
                       tile=prof.vae_tile)


def measure(task: Task, models: Models, device, inputs: dict) -> dict:
    from cogvid_core.run import report
    rec = report.StageRecorder(device)
    _free()    # the peaks start from what earlier cells left reserved: recorded below, should be ~0
    before = (torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)) if device.type == "cuda" \
        else (None, None)
    t0 = time.perf_counter()
    error = None
    try:
        with rec.stage(REC_NAME[task.stage]):
            _run_stage(task, models, device, inputs)
    except Exception as e:   # recorded (out of memory: it did not fit this card), the grid goes on
        error = f"{type(e).__name__}: {e}"[:300]
    _free()
    row = rec.rows()[-1]
    gib = lambda k: None if row[k] is None else int(row[k] * GiB)
    return dict(stage=task.stage, variant=task.variant.key, frames=task.frames, height=task.height, width=task.width,
                kind=task.kind, tier=task.tier, key=list(task.key), profile=task.profile.name,
                settings=settings_of(task.profile), alloc=gib("peak_alloc_gib"), reserved=gib("peak_reserved_gib"),
                host_anon_pinned=gib("host_peak_anon_pinned_gib"), seconds=round(time.perf_counter() - t0, 2),
                alloc_before=before[0], reserved_before=before[1], error=error)


# ------------------------------------------------------------------------------ the grid
def allocator_backend(device) -> str:
    """torch's CUDA allocator in this process ("native" or "cudaMallocAsync"); "cpu" on the CPU."""
    return E.allocator_backend() if device.type == "cuda" else "cpu"


def run_grid(args) -> dict:
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t0 = time.perf_counter()
    root = Path(args.checkpoints or tempfile.mkdtemp(prefix="cogvid-est-"))
    writer = None
    if not args.checkpoints:          # self-contained run (the CPU smoke run): write them here
        writer = write_checkpoints(root, args.tiny)
    models = Models(root, device, dtype, args.tiny)
    tasks = plan_tasks(TINY_SHAPES if args.tiny else FULL_SHAPES, args.tiny)
    if args.part:   # denoise and decode cells split; every part encodes (its steps need the inputs)
        i, n = (int(x) for x in args.part.split("/"))
        split = [t for t in tasks if t.stage in ("denoise_step", "decode")]
        tasks = [t for t in tasks if t not in split or split.index(t) % n == i]
    data = dict(env=_env(device, dtype, args, t0, writer), cells=[], repeats=[], skipped=[], pending=[])
    if args.only:     # these cells alone (and the encodes they need), e.g. to re-measure some in a fresh process
        tasks = with_inputs([t for t in tasks if any(o in _describe(t) for o in args.only)], tasks, repeat=False)
    if args.resume:
        tasks = resume(Path(args.resume), data, tasks)
    inputs, waited = {}, 0.0
    while tasks:
        if args.budget_s is not None and time.perf_counter() - t0 > args.budget_s:
            data["skipped"] = [_describe(t) for t in tasks if not t.repeat]
            break
        # while the fit grid waits for a file, held-out shapes may run, the slow extras may not
        top = min(t.tier for t in tasks) + 1
        ready = [t for t in tasks if t.tier <= top and all(_ready(n, models, inputs) for n in t.needs())]
        if not ready:
            if not _can_progress(tasks, models, inputs):   # an input's task failed: say so, keep the rest
                print(f"{len(tasks)} tasks wait on inputs no task makes, e.g. {_describe(tasks[0])}", flush=True)
                data["skipped"] = [_describe(t) for t in tasks if not t.repeat]
                break
            time.sleep(1.0)
            waited += 1.0
            continue
        task = ready[0]
        tasks.remove(task)
        cell = measure(task, models, device, inputs)
        data["repeats" if task.repeat else "cells"].append(cell)
        data["env"].update(seconds=round(time.perf_counter() - t0, 1), waited_for_files_s=waited)
        data["pending"] = [_describe(t) for t in tasks if not t.repeat]   # what a run killed now did not measure
        if args.out:
            Path(args.out).write_text(json.dumps(data, indent=1))
        print(f"{time.perf_counter() - t0:6.0f}s {_describe(task):<70} alloc {_g(cell['alloc'])} "
              f"reserved {_g(cell['reserved'])} GiB ({cell['seconds']:.1f} s){' ' + cell['error'] if cell['error'] else ''}",
              flush=True)
    return data


def resume(path: Path, data: dict, tasks: list[Task]) -> list[Task]:
    """Keep an earlier run's cells in ``data`` and return the tasks it did not measure, plus (flagged
    repeat, measured into data["repeats"]: the same cell at another point of the run, evidence of
    how reproducible a peak is) the encodes whose outputs those tasks need as inputs."""
    old = json.loads(path.read_text())
    env = data["env"]
    for k in ("card", "allocator", "tiny", "dtype"):
        if old["env"].get(k) != env[k]:
            raise SystemExit(f"--resume {path}: it measured {k}={old['env'].get(k)!r}, this run has {env[k]!r}; "
                             f"resume a file of this card and allocator (PYTORCH_CUDA_ALLOC_CONF) or start a new one")
    data["cells"] = list(old["cells"])
    data["repeats"] = list(old.get("repeats", []))
    env["resumed"] = old["env"].pop("resumed", []) + [dict(old["env"], file=path.name, cells=len(old["cells"]))]
    done = {measured_key(c["stage"], c["variant"], c["frames"], c["height"], c["width"], c["key"]) for c in old["cells"]}
    todo = with_inputs([t for t in tasks if t.cache_key not in done], tasks, repeat=True)
    print(f"--resume {path.name}: {len(old['cells'])} cells kept, {sum(not t.repeat for t in todo)} tasks to "
          f"measure, {sum(t.repeat for t in todo)} encodes repeated for their outputs", flush=True)
    return todo


def with_inputs(todo: list[Task], tasks: list[Task], repeat: bool) -> list[Task]:
    """``todo`` plus, from ``tasks`` (flagged ``repeat``: measured into "repeats"), the first (cheapest)
    encode that makes each input a task of ``todo`` needs and no task of it makes; in run order."""
    makes = {"text_encode": lambda t: "prompt", "image_encode": lambda t: ("latent", t.variant.key, t.height, t.width)}
    wanted = {n for t in todo for n in t.needs() if not isinstance(n, str) or n == "prompt"}
    made = {makes[t.stage](t) for t in todo if t.stage in makes}
    todo = list(todo)
    for t in tasks:
        name = makes[t.stage](t) if t.stage in makes else None
        if name in wanted and name not in made:
            made.add(name)
            todo.append(dataclasses.replace(t, repeat=repeat))
    return ordered(todo)


def _ready(name, models, inputs) -> bool:
    return name in inputs if not (isinstance(name, str) and name in models.paths) else models.ready(name)


def _can_progress(tasks, models, inputs) -> bool:
    """Something is still to come: a file being written, or a task that makes a missing input."""
    made = {"prompt"} if any(t.stage == "text_encode" for t in tasks) else set()
    made |= {("latent", t.variant.key, t.height, t.width) for t in tasks if t.stage == "image_encode"}
    return models.coming() or any(
        n in made for t in tasks for n in t.needs() if not _ready(n, models, inputs))


def _describe(t: Task) -> str:
    return f"{t.kind} {t.variant.key} {t.frames}x{t.height}x{t.width} {t.stage} {t.key}"


def _g(b):
    return "   -  " if b is None else f"{b / GiB:6.2f}"


def _sha(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()[:12]


def _env(device, dtype, args, t0, writer) -> dict:
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
    except OSError:        # no git where the bench runs: the sha1s below still say which code ran
        commit = ""
    return dict(card=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
                allocator=allocator_backend(device), alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
                torch=torch.__version__, diffusers=_version("diffusers"), transformers=_version("transformers"),
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                commit=commit or None, weights="file-backed transformer and T5, in-memory VAE",
                command=" ".join([sys.executable, *sys.argv]),
                # which streaming code measured: the cells hold only for this filestream/placement
                sha1={p: _sha(ROOT / p) for p in ("cogvid_core/filestream.py", "cogvid_core/fileread.py",
                                                 "cogvid_core/placement.py")},
                tiny=bool(args.tiny), dtype=str(dtype).replace("torch.", ""), budget_s=args.budget_s,
                part=args.part, writer=writer, seconds=round(time.perf_counter() - t0, 1))


def _version(name):
    try:
        return __import__(name).__version__
    except Exception:
        return None


# ------------------------------------------------------------------------------ replay: cells -> predictions
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
            ident = (c["card"], c["allocator"], *_measurement(c))
            if c["alloc"] is not None and ident not in seen and not c.get("superseded"):
                seen.add(ident)
                cells.append(c)
    return env, cells


def _measurement(c) -> tuple:
    """What a cell measured, whatever card and allocator: stage, variant, shape, stage settings."""
    return c["stage"], c["variant"], c["frames"], c["height"], c["width"], json.dumps(c["settings"], sort_keys=True)


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


def estimate_of(cell, constants=None) -> E.Estimate:
    """The estimate of ``cell``'s run: its shape, settings, card and allocator."""
    return E.estimate(cell["variant"], cell["frames"], cell["height"], cell["width"], profile_of(cell),
                      calibration_path=constants, tiny=cell.get("tiny", False), allocator=cell["allocator"],
                      card=cell.get("card"), file_backed=cell.get("file_backed", True))


def predict(cell, constants=None) -> E.StageEstimate:
    """The estimate of ``cell``'s stage."""
    return estimate_of(cell, constants).stage(cell["stage"])


def errors(cells, constants=None) -> list[tuple[dict, float, float]]:
    """(cell, relative error of peak allocated, of peak reserved) for every cell that ran."""
    out = []
    for c in cells:
        if c.get("error") or not c["reserved"]:
            continue
        p = predict(c, constants)
        out.append((c, (p.peak_allocated - c["alloc"]) / c["alloc"], (p.peak_reserved - c["reserved"]) / c["reserved"]))
    return out


def measured_runs(cells):
    """(card, allocator, variant, frames, height, width, candidate, its peak reserved) for every candidate
    of planner.candidates() whose 4 stage cells were measured at a shape: a run's peak is its largest
    stage's (inf where a stage ran out of memory)."""
    by, shapes = {}, set()
    for c in cells:
        by[_cell_id(c["card"], c["allocator"], c["variant"], c["frames"], c["height"], c["width"], c["stage"],
                    profile_of(c))] = c
        shapes.add((c["card"], c["allocator"], c["variant"], c["frames"], c["height"], c["width"]))
    for (card, alloc, vk, f, h, w) in sorted(shapes):
        for prof in planner.candidates():
            cs = [by.get(_cell_id(card, alloc, vk, f, h, w, s, prof)) for s in STAGES]
            if None not in cs:
                yield card, alloc, vk, f, h, w, prof, max(float("inf") if c.get("error") else c["reserved"] for c in cs)


def wrong_fits(cells, constants=None, checked: list | None = None) -> list[tuple]:
    """Candidates judged to fit a budget they overran: for every measured run (measured_runs), the
    estimate's needed bytes must be at least its measured reserved peak (else a budget between the two
    is judged 'fits' and runs out)."""
    backed = {c["card"]: c.get("file_backed", True) for c in cells}
    out = []
    for card, alloc, vk, f, h, w, prof, measured in measured_runs(cells):
        if checked is not None:
            checked.append((card, alloc, vk, f, h, w, prof.name))
        est = E.estimate(vk, f, h, w, prof, calibration_path=constants, allocator=alloc, card=card,
                         file_backed=backed[card])
        if est.needed_bytes < measured:
            out.append((card, alloc, vk, f, h, w, prof.name, est.needed_bytes, measured))
    return out


def short_stages(cells, constants=None) -> list[tuple[dict, int]]:
    """(cell, what the verdict asks of its stage) for every cell whose measured reserved peak is above
    it: the per-stage form of wrong_fits, for cells of runs not measured whole (the held-out shapes,
    the expandable-segments decode grid)."""
    out = []
    for c in cells:
        if c.get("error") or not c["reserved"]:
            continue
        needed = estimate_of(c, constants).stage_needed(c["stage"])
        if needed < c["reserved"]:
            out.append((c, needed))
    return out


def _cell_id(card, alloc, variant, frames, height, width, stage, prof) -> tuple:
    """What a cell's measurement depends on (measured_key), per card and allocator."""
    return (card, alloc, *measured_key(stage, variant, frames, height, width, stage_key(stage, prof)))


def compare(cells, constants=None, out=sys.stdout, tolerance=0.10) -> dict:
    errs = errors(cells, constants)
    lines = [f"{'card':<10}{'alloc':<7}{'kind':<8}{'variant':<8}{'shape':>13} {'stage':<13}{'settings':<34}"
             f"{'alloc GiB pred/meas':>20}{'err':>7}{'reserved pred/meas':>20}{'err':>7}"]
    for c, ea, er in errs:
        p = predict(c, constants)
        flag = " <--" if max(abs(ea), abs(er)) > tolerance else ""
        lines.append(f"{_family(c['card']):<10}{c['allocator'][:6]:<7}{c['kind']:<8}{c['variant'][-8:-6]:<8}"
                     f"{c['frames']}x{c['height']}x{c['width']:>5} {c['stage']:<13}{str(stage_key(c['stage'], profile_of(c)))[:33]:<34}"
                     f"{p.peak_allocated / GiB:9.2f} /{c['alloc'] / GiB:6.2f}{ea * 100:+6.1f}%"
                     f"{p.peak_reserved / GiB:9.2f} /{c['reserved'] / GiB:6.2f}{er * 100:+6.1f}%{flag}")
    checked = []
    # the verdicts with the tolerance the calibration file will claim (Estimate.stage_needed uses it)
    judged = dict(constants, tolerance=tolerance) if isinstance(constants, dict) else constants
    wrong = wrong_fits(cells, judged, checked)
    summary = {}
    for kind in ("fit", "heldout"):
        e = [(ea, er) for c, ea, er in errs if c["kind"] == kind]
        if e:
            within = sum(1 for ea, er in e if abs(ea) <= tolerance and abs(er) <= tolerance)
            worst = max((x for pair in e for x in pair), key=abs)
            summary[kind] = dict(cells=len(e), within=within, worst=worst)
            lines.append(f"{kind}: {within}/{len(e)} cells with allocated AND reserved within +-{tolerance:.0%}; "
                         f"worst {worst * 100:+.1f}%")
    lines.append(f"candidates judged 'fits' for a budget they overran (needed < measured reserved peak): {len(wrong)} "
                 f"of {len(checked)} (candidate, shape) pairs with all 4 stages measured")
    lines += [f"  {w[0]} {w[1]} {w[2]} {w[3]}x{w[4]}x{w[5]} {w[6]}: needed {w[7] / GiB:.2f}, measured {w[8] / GiB:.2f}"
              for w in wrong[:20]]
    short = short_stages(cells, judged)
    lines.append(f"cells whose stage's verdict (needed) is below its measured reserved peak: {len(short)} of {len(errs)}")
    lines += [f"  {c['allocator']} {c['kind']} {c['variant']} {c['frames']}x{c['height']}x{c['width']} {c['stage']} "
              f"{c['profile']}: needed {n / GiB:.2f}, measured {c['reserved'] / GiB:.2f}" for c, n in short[:20]]
    oom = [c for c in cells if c.get("error")]
    lines += [f"  did not run: {c['variant']} {c['frames']}x{c['height']}x{c['width']} {c['stage']} {c['error'][:60]}" for c in oom]
    print("\n".join(lines), file=out)
    return dict(summary=summary, wrong=wrong, errors=errs, checked=len(checked), short=short)


def _family(card) -> str:
    from cogvid_core.plan import cards
    return cards.family_of(card) or str(card)[:9]


# ------------------------------------------------------------------------------ calibration fit (no GPU)
# constants fitted on each stage's own cells (few parameters per problem: Nelder-Mead converges);
# fixed_bytes and stream_blocks (blocks of a streamed model on the GPU) are fitted with the step
STAGE_KEYS = {"text_encode": ("t5_act_units", "text_reserved_frag"),
              "image_encode": ("enc_act_mult", "vae_fixed_bytes", "enc_reserved_frag"),
              "denoise_step": ("step_live_units", "step_attn_units", "step_attn_units_lowmem", "step_ff_units",
                               "step_ff_units_chunked", "step_ff_chunk_live_units", "stream_buffer_mult",
                               "fixed_bytes", "stream_blocks", "reserved_frag", "reserved_frag_lowmem"),
              "decode": ("dec_tile_mult", "dec_accum_mult", "dec_reserved_frag", "dec_video_frag")}
# the shares of reserved over allocated: they move only the reserved peak, fitted after the rest
FRAG_KEYS = {"text_reserved_frag", "enc_reserved_frag", "reserved_frag", "reserved_frag_lowmem",
             "dec_reserved_frag", "dec_video_frag"}


def _alloc_loss(p, cell) -> float:
    ea = (p.peak_allocated - cell["alloc"]) / cell["alloc"]
    return ea ** 2 + 10 * max(abs(ea) - 0.08, 0) ** 2


def _reserved_loss(p, cell) -> float:
    """An under-estimate of reserved weighted 2x (it gives wrong 'fits'), every cell's loss capped at
    what a 15% miss costs: a few cells whose reserved peak no share describes (the allocator's history,
    see the report) must not pull every other cell out of tolerance; the verdict margin (_margin)
    still covers their under-estimates."""
    er = (p.peak_reserved - cell["reserved"]) / cell["reserved"]
    r = er * (1.41 if er < 0 else 1.0)
    return min(r ** 2 + 10 * max(abs(r) - 0.08, 0) ** 2, 0.15 ** 2 + 10 * 0.07 ** 2)


def fit(cells, start: dict | None = None, base: dict | None = None) -> dict:
    """Constants for one card and allocator, stage by stage: first the terms of peak allocated on the
    allocated peaks alone, then the fragmentation shares on the reserved peaks (fitting both at once let
    a few cells' fragmentation pull the activation terms off, +11..+26% allocated).

    ``base``: the fitted constants of a fully measured set (native) that this allocator's set leans on
    where its own cells cannot say (see leans_on_base): a stage without cells keeps base's constants and
    margins; a stage measured at fewer than MIN_SHAPES shapes keeps base's allocated terms (what is
    allocated does not depend on the allocator) and fits only its reserved shares."""
    c = {**E.DEFAULT_CONSTANTS, **(start or {})}
    cells = [x for x in cells if x["kind"] == "fit" and not x.get("error") and x["reserved"]]
    in_memory = any(not x.get("file_backed", True) for x in cells)
    lean = leans_on_base(cells) if base else {}
    for stage in ("denoise_step", "text_encode", "image_encode", "decode"):   # the step fixes fixed_bytes first
        mine = [x for x in cells if x["stage"] == stage]
        # stream_blocks counts only for in-memory streamed models (file-backed: 1 + PREFETCH_DEPTH)
        keys = [k for k in STAGE_KEYS[stage] if in_memory or k != "stream_blocks"]
        if stage in lean.get("stages", []):
            c.update({k: base[k] for k in STAGE_KEYS[stage]})
        elif mine:
            alloc_keys = [k for k in keys if k not in FRAG_KEYS]
            if stage in lean.get("allocated_terms", []):
                c.update({k: base[k] for k in alloc_keys})
            else:
                _minimize(c, mine, alloc_keys, _alloc_loss)
            _minimize(c, mine, [k for k in keys if k in FRAG_KEYS], _reserved_loss)
    c["fixed_bytes"], c["vae_fixed_bytes"] = int(c["fixed_bytes"]), int(c["vae_fixed_bytes"])
    c["reserved_margin"] = _margin(cells, c)
    c["reserved_margin_stages"], c["reserved_margin_bytes_stages"] = _stage_margins(cells, c)
    if lean.get("stages"):
        c["reserved_margin"] = max(c["reserved_margin"], base["reserved_margin"])
        for k in ("reserved_margin_stages", "reserved_margin_bytes_stages"):
            c[k] = {**{m: v for m, v in base[k].items() if m.split(":")[0] in lean["stages"]}, **c[k]}
    return c


def _reserved_ratio(base_cells, own_cells) -> list[float] | None:
    """[min, max] of base's reserved peak over this set's, on the cells both measured."""
    base = {_measurement(c): c["reserved"] for c in base_cells if c["reserved"]}
    r = [base[_measurement(c)] / c["reserved"] for c in own_cells if c["reserved"] and _measurement(c) in base]
    return [round(min(r), 3), round(max(r), 3)] if r else None


MIN_SHAPES = 3    # sizes a stage's fit needs to tell its activation terms apart (issue 14: 3 per variant)


def leans_on_base(cells) -> dict:
    """{"stages": stages without fit cells, "allocated_terms": stages with fit cells at fewer than
    MIN_SHAPES shapes}: what a partly measured allocator set (the expandable-segments decode grid;
    the cudaMallocAsync decode since its pool trim) takes from the fully measured set."""
    shapes: dict = {}
    for x in cells:
        if x["kind"] == "fit" and not x.get("error") and x["reserved"]:
            shapes.setdefault(x["stage"], set()).add((x["variant"], x["frames"], x["height"], x["width"]))
    return {"stages": [s for s in STAGES if s not in shapes],     # T5 reads 226 tokens whatever the video
            "allocated_terms": [s for s in STAGES if s != "text_encode" and 0 < len(shapes.get(s, ())) < MIN_SHAPES]}


def _minimize(c: dict, cells: list, keys: list, cell_loss) -> None:
    """Nelder-Mead on ``keys`` of ``c`` (in place), in units of their start values."""
    import numpy as np
    from scipy.optimize import minimize

    scale = np.array([c[k] if c[k] else 1.0 for k in keys], dtype=float)

    def loss(x):
        trial = dict(c, **{k: float(abs(v)) * s for k, v, s in zip(keys, x, scale)})
        total = sum(cell_loss(predict(cell, trial), cell) for cell in cells)
        # a weak pull to the first-principles start: what the cells cannot tell apart (e.g. the
        # decode's tile term where one tile size was measured) stays physical
        return total + 1e-3 * len(cells) * float(((np.abs(x) - 1) ** 2).sum())

    x0 = np.ones(len(keys))
    for _ in range(3):   # restarts: Nelder-Mead stalls in a shrunken simplex
        x0 = minimize(loss, x0, method="Nelder-Mead", options=dict(maxiter=300 * len(keys), xatol=1e-4, fatol=1e-9)).x
    c.update({k: round(float(abs(v)) * s, 4) for k, v, s in zip(keys, x0, scale)})


def _margin(cells, constants) -> float:
    """Verdict margin: the largest relative under-estimate of a measured run's reserved peak (its
    largest stage: what a budget must hold), + 2%; the largest cell's where no run has all 4 stages.
    A stage that under-estimates inside a run another stage dominates does not widen every verdict."""
    backed = {c["card"]: c.get("file_backed", True) for c in cells}
    under = [measured / E.estimate(vk, f, h, w, prof, calibration_path=constants, allocator=alloc, card=card,
                                   file_backed=backed[card]).peak_reserved - 1
             for card, alloc, vk, f, h, w, prof, measured in measured_runs(cells) if measured != float("inf")]
    if not under:
        under = [x["reserved"] / predict(x, constants).peak_reserved - 1 for x in cells]
    return round(max(max(under, default=0.0), 0.0) + 0.02, 3)


def _stage_margins(cells, constants) -> tuple[dict, dict]:
    """Per stage: the largest relative under-estimate of its measured reserved peaks, + 2%; and the
    largest in bytes, + 64 MiB. A stage the model predicts well (the decode) then does not carry the
    margin another one needs (the streamed one-branch step of 1.0 at 33 frames, -32%): a verdict compares
    each stage with its own. The step's margin is per CFG mode: batched and one-branch steps allocate
    differently. Estimate.stage_needed uses the smaller of the two where the tolerance allows."""
    under: dict = {}
    for x in cells:
        key = x["stage"] + (f":{profile_of(x).cfg_mode}" if x["stage"] == "denoise_step" else "")
        p = predict(x, constants).peak_reserved
        under.setdefault(key, []).append((x["reserved"] / p - 1, x["reserved"] - p))
    return ({key: round(max(max(r for r, _ in u), 0.0) + 0.02, 3) for key, u in sorted(under.items())},
            {key: int(max(max(b for _, b in u), 0) + 64 * 2 ** 20) for key, u in sorted(under.items())})


def covered(cells) -> dict:
    """{allocator: {stage: [stage keys]}}: the stage configurations a calibration was fitted on and
    claims (tests/test_calibration_replay.py holds it to its tolerance on exactly these)."""
    out: dict = {}
    for c in cells:
        if c["kind"] == "fit" and not c.get("error"):
            keys = out.setdefault(c["allocator"], {}).setdefault(c["stage"], [])
            k = list(stage_key(c["stage"], profile_of(c)))
            if k not in keys:
                keys.append(k)
    return out


def outside_tolerance(cells, fitted: dict, tolerance: float) -> list[dict]:
    """The measured cells (fitted and held-out, ``kind``) the fitted constants still miss by more than
    the tolerance, with their errors (in the calibration file: its claim excludes them, the replay
    test holds them to these errors)."""
    out = []
    for a, consts in fitted.items():
        for c, ea, er in errors([x for x in cells if x["allocator"] == a], consts):
            if abs(ea) > tolerance or abs(er) > tolerance:
                out.append(dict(allocator=a, kind=c["kind"], stage=c["stage"], variant=c["variant"], frames=c["frames"],
                                height=c["height"], width=c["width"], key=list(stage_key(c["stage"], profile_of(c))),
                                alloc_err=round(ea, 3), reserved_err=round(er, 3)))
    return out


def write_calibration(cells_by_alloc: dict, env: dict, files: list, tolerance: float, covers: dict,
                      excluded: dict | None = None, path: Path | None = None, outside: list | None = None,
                      leans: dict | None = None) -> Path:
    """cogvid_core/calibration/<family>.json: one constants set per allocator, the card and versions."""
    from cogvid_core.plan import cards
    family = cards.family_of(env["card"])
    if not family:
        raise SystemExit(f"no card family known for {env['card']!r}: add its name to cards.FAMILIES")
    path = path or cards.CALIBRATION_DIR / f"{family}.json"
    doc = dict(card=env["card"], family=family, torch=env.get("torch"), diffusers=env.get("diffusers"),
               transformers=env.get("transformers"), date=env.get("date"), commit=env.get("commit"),
               weights=env.get("weights") or "in-memory random models", tolerance=tolerance,
               source="bench/bench_estimate.py --fit ... --write-calibration",
               measurements=[Path(f).name for f in files], excluded=excluded or {},
               outside_tolerance=outside or [],
               allocators={a: dict(constants=c, covers=covers.get(a, {}),
                                   **({"leans_on": leans[a]} if (leans or {}).get(a, {}).get("from") and
                                      (leans[a]["stages"] or leans[a]["allocated_terms"]) else {}))
                           for a, c in cells_by_alloc.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {path}")
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--tiny", action="store_true", help="tiny random models and sizes (CPU smoke run)")
    p.add_argument("--write-checkpoints", default=None, metavar="DIR", help="write the full-size files and exit")
    p.add_argument("--checkpoints", default=None, metavar="DIR",
                   help="files written by --write-checkpoints (waited for while being written)")
    p.add_argument("--budget-s", type=float, default=None, help="start no task after this many seconds "
                   "(default 400 full-size, unlimited tiny)")
    p.add_argument("--part", default=None, help="I/N: every N-th task from the I-th (several GPUs per allocator)")
    p.add_argument("--out", default=None, help="write the measurements (JSON) here")
    p.add_argument("--only", action="append", default=[], metavar="TEXT", help="measure only the tasks whose "
                   "description (as printed) contains TEXT, e.g. \"cogvideox-5b-i2v 33x480x720 denoise_step ('stream', "
                   "'sequential'\" (repeatable; the encodes they need run too)")
    p.add_argument("--resume", default=None, metavar="FILE", help="an earlier run's JSON (same card and "
                   "allocator): keep its cells, measure only the tasks it did not; --out gets old + new")
    p.add_argument("--fit", nargs="*", default=None, help="measurement files to compare / fit (no GPU)")
    p.add_argument("--write-calibration", action="store_true", help="fit and write cogvid_core/calibration/<card>.json")
    p.add_argument("--tolerance", type=float, default=0.10)
    p.add_argument("--exclude", action="append", default=[], metavar="STAGE=REASON",
                   help="leave a stage's cells out of the fit and the claim (e.g. measured with older code)")
    args = p.parse_args(argv)
    if args.write_checkpoints:
        info = write_checkpoints(Path(args.write_checkpoints), args.tiny)
        if args.out:
            Path(args.out).write_text(json.dumps(info, indent=1))
        return 0
    if args.budget_s is None:
        args.budget_s = None if args.tiny else 400.0
    if args.fit is None:
        data = run_grid(args)
        print(json.dumps(data["env"]))
        if args.out:     # also when no cell ran (the budget spent before the first): --resume reads it
            Path(args.out).write_text(json.dumps(data, indent=1))
        env, cells = load_cells([args.out]) if args.out else (data["env"], [
            {"allocator": data["env"]["allocator"], "card": data["env"]["card"], **c} for c in data["cells"]])
        if data["skipped"]:
            print(f"skipped (over --budget-s): {len(data['skipped'])} tasks")
    else:
        env, cells = load_cells(args.fit)
    excluded = dict(x.split("=", 1) for x in args.exclude)
    cells = [c for c in cells if c["stage"] not in excluded]
    for c in cells:
        c["tiny"] = env.get("tiny", False)
    summary = compare(cells, out=sys.stdout, tolerance=args.tolerance)
    if args.write_calibration:
        if env.get("tiny") or env.get("card") in (None, "cpu"):
            print("not writing a calibration from a tiny/CPU run")
            return 1
        family = _family(env["card"])
        mine = [c for c in cells if _family(c["card"]) == family]
        fitted, leans = {}, {}
        # native first (the base), then by name: the file's order does not follow the set's hash order
        for a in sorted({c["allocator"] for c in mine}, key=lambda a: (a != "native", a)):
            own, base = [c for c in mine if c["allocator"] == a], fitted.get("native")
            fitted[a] = fit(own, base=base)
            leans[a] = dict(leans_on_base(own), **{"from": "native", "base_reserved_over_own": _reserved_ratio(
                [c for c in mine if c["allocator"] == "native"], own)}) if base else {}
        write_calibration(fitted, env, list(args.fit), args.tolerance, covered(mine), excluded,
                          outside=outside_tolerance(mine, fitted, args.tolerance), leans=leans)
        E.clear_calibration_cache()
        print("after the fit:")
        summary = compare(mine, tolerance=args.tolerance)
    bad = [s for s in summary["summary"].values() if s["within"] < s["cells"]]
    return 1 if (bad or summary["wrong"] or summary["short"]) else 0


if __name__ == "__main__":
    sys.exit(main())
