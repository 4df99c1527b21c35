"""The estimate grid on the GPU (bench_estimate): checkpoints, one cell as pipeline.generate runs its
stage, the grid in priority order within a time budget, resumed from an earlier file.

The transformer and T5 are FILE-BACKED, as the loaders load them by default: single-file random
checkpoints are written once (``write_checkpoints``, one process per file) and read block by block
through filestream's staging buffers; the VAE is in memory (loading.load_vae is eager), built at random.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from bench.common.provenance import allocator_name, card_name, provenance
from bench.estimate_cells import (FULL_SHAPES, TINY_SHAPES, Task, measured_key, ordered, plan_tasks,
                                  settings_of)
from cogvid_core.device import devmem
from cogvid_core.model import variants as M
from cogvid_core.plan import estimate as E

GiB = devmem.GiB
ROOT = Path(__file__).resolve().parents[1]
REC_NAME = {"text_encode": "text encode", "image_encode": "image encode", "denoise_step": "denoise",
            "decode": "decode"}
# the files whose code sets a streamed block's allocations: the env records their sha1 (paths from the repo root)
STREAMING_CODE = ("cogvid_core/memory/filestream.py", "cogvid_core/memory/fileread.py",
                  "cogvid_core/memory/placement.py")


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
    testing.write_safetensors(tmp, component, testing.tensor_shapes(component, M.VARIANTS[variant_key], tiny), dtype, 0)
    os.replace(tmp, path)          # readers wait for the final name: never see half a file
    return round(time.perf_counter() - t0, 1)


SPAWN = multiprocessing.get_context("spawn")


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
        # spawned, not forked: the parent has initialised CUDA by now (torchao's import asks triton about the
        # device), and a forked child that touches CUDA fails ("Cannot re-initialize CUDA in forked
        # subprocess"): session 17's grid got no checkpoints and measured only the image encodes
        with ProcessPoolExecutor(len(jobs), mp_context=SPAWN) as ex:
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
    from cogvid_core.speed import fast
    v, prof, dtype = task.variant, task.profile, models.dtype
    if task.stage == "text_encode":
        t5, tok = models.get("text_encoder")
        c = session.Component("t5", t5, device, dtype, profile=prof, tokenizer=tok)
    elif task.stage == "denoise_step":
        ran = fast.resolve_alone(task.speed, device).name
        if ran != fast.parse(task.speed).name:   # a part this machine lacks would run as another option: not this cell
            raise fast.SpeedError(f"{task.speed} cannot run here (it would run {ran})")
        c = session.Component("transformer", models.get("transformer:" + v.key), device, dtype, profile=prof, variant=v,
                              speed=task.speed)   # applied while in use, taken off at release (as in a run)
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
        # a compiled option's first step compiles (what a run's denoise stage holds too), the second is a
        # step as every later one: both inside the measured stage
        steps = 2 if "compile" in task.speed else 1
        sampling.sample(m, v, pos, neg, inputs["latent", v.key, task.height, task.width], task.frames, steps=steps,
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
                kind=task.kind, tier=task.tier, key=list(task.key), profile=task.profile.name, speed=task.speed,
                settings=settings_of(task.profile), alloc=gib("peak_alloc_gib"), reserved=gib("peak_reserved_gib"),
                host_anon_pinned=gib("host_peak_anon_pinned_gib"), seconds=round(time.perf_counter() - t0, 2),
                alloc_before=before[0], reserved_before=before[1], error=error)


# ------------------------------------------------------------------------------ the grid
def run_grid(args) -> dict:
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t0 = time.perf_counter()
    root = Path(args.checkpoints or tempfile.mkdtemp(prefix="cogvid-est-"))
    writer = None
    if not args.checkpoints:          # self-contained run (the CPU smoke run): write them here
        writer = write_checkpoints(root, args.tiny)
    models = Models(root, device, dtype, args.tiny)
    speeds = [x for x in (getattr(args, "speeds", None) or "").split(",") if x]
    tasks = plan_tasks(TINY_SHAPES if args.tiny else FULL_SHAPES, args.tiny, speeds)
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
    done = {measured_key(c["stage"], c["variant"], c["frames"], c["height"], c["width"], c["key"], c.get("speed", "exact"))
            for c in old["cells"]}
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
    return f"{t.kind} {t.variant.key} {t.frames}x{t.height}x{t.width} {t.stage} {t.key}" + \
        (f" ~{t.speed}" if t.speed != "exact" else "")


def _g(b):
    return "   -  " if b is None else f"{b / GiB:6.2f}"


def _sha(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()[:12]


def _env(device, dtype, args, t0, writer) -> dict:
    return dict(provenance(card_name(device)), allocator=allocator_name(device),
                alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
                weights="file-backed transformer and T5, in-memory VAE",
                # which streaming code measured: the cells hold only for this filestream/placement (and the
                # commit may be unknown where the tree ran without git)
                sha1={p: _sha(ROOT / p) for p in STREAMING_CODE},
                tiny=bool(args.tiny), dtype=str(dtype).replace("torch.", ""), budget_s=args.budget_s,
                part=args.part, speeds=getattr(args, "speeds", None), writer=writer,
                seconds=round(time.perf_counter() - t0, 1))
