"""A restart with each block's graph compiled ahead of time: no dynamo trace in the new process.

    python bench/bench_aot_restart.py --runs 2                                  # CPU, tiny 1.5, exact
    python bench/bench_aot_restart.py --device cuda --speed fp8+fa3fp8 --runs 2 # full 1.5, fast recipe

The pack keeps inductor's work across processes (``speed/compile_cache.py``), but a restart still traces
each block again with dynamo and looks its graphs up: the H100's restart's first step was 2.36x a warm
one (issue 26 wants 1.5x). Torch can compile a function ahead of time instead
(``torch.compile(f, fullgraph=True).aot_compile(example_inputs)``), save it, and load it in another
process (``torch.compiler.load_compiled_function``), which then calls the compiled graph with no trace.
This bench asks whether that meets the goal, before the pack builds on it.

Each run is a fresh process that builds the 1.5 transformer and applies ``--speed`` (without ``compile``:
the block graphs are this bench's). "save": each block layout met in the first step (block 0's input is a
strided slice, the rest are not) is compiled ahead of time and saved; "load": the saved functions are
loaded (timed) and the steps run through them; "load+kept": the same after loading the compile-cache
file the save run wrote as the pack does (``torch.compiler.save_cache_artifacts``: inductor's graphs with
their kernels; the saved functions may compile their kernels again without it); "plain": torch.compile
as the pack does it, from a cold start. Every run samples ``--steps`` steps and keeps its first step's output, so the loaded graphs are
checked against the saved ones. Each process gets an empty inductor cache of its own
(``TORCHINDUCTOR_CACHE_DIR``): only the saved file carries compiled work across.

Guards: torch refuses to save dynamo's identity guards (diffusers' processor object, module hooks
dicts), so only the portable ones are kept (tensor metadata and global state:
``torch.compiler.keep_portable_guards_unsafe``), and even those are not checked: under
``inference_mode`` torch 2.13's check refuses the very inputs the function was compiled with (it expects
the ADInplaceOrView dispatch key of a tensor made outside inference mode). This bench keys its functions
by the inputs' layout (shape, stride, dtype) and uses one process's model, and checks the loaded graphs'
output against the saved run's, so that is safe here. The pack would need its own key (recipe, LoRA
ranks, diffusers version) before it could trust a loaded graph.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common.child import run_child  # noqa: E402
from bench.common.provenance import card_name, default_out, provenance, write_json  # noqa: E402

CHILD = r"""
import json, os, sys, time, types, torch
from bench.bench_speed import Inputs, sample_steps, _sync
from bench.common.imports import imported_since
from cogvid_core.run import session
mode, speed, device, tiny, folder, steps = sys.argv[1:7]
if hasattr(torch._dynamo.config, "enable_aot_compile"):     # torch 2.11 has aot_compile behind this flag
    torch._dynamo.config.enable_aot_compile = True
def unguarded(fn):          # our layout key is the guard (see the module's docstring)
    if hasattr(fn, "disable_guard_check"):
        fn.disable_guard_check()
    else:
        fn._guard_check_enabled = False
def portable(entries):       # torch.compiler.keep_portable_guards_unsafe (2.13), written out for 2.11
    return [g.guard_type in ("GLOBAL_STATE", "SHAPE_ENV") or (g.guard_type == "TENSOR_MATCH" and not g.is_global)
            for g in entries]
t_start = time.perf_counter()
inp = Inputs(types.SimpleNamespace(device=device, tiny=tiny == "1", frames=None, height=None, width=None))
comp = session.Component("transformer", inp.transformer, inp.device, inp.dtype, variant=inp.variant)
index_path = folder + "/index.json"
table, loaded_s = {}, 0.0

def layout(args, kwargs):
    parts = []
    for k, v in list(enumerate(args)) + sorted(kwargs.items(), key=lambda x: str(x[0])):
        for t in (v if isinstance(v, (tuple, list)) else (v,)):
            if isinstance(t, torch.Tensor):
                parts.append((str(k), tuple(t.shape), t.stride(), str(t.dtype)))
            else:
                parts.append((str(k), repr(t)))
    return repr(parts)

if mode.startswith("load"):
    before = set(sys.modules)
    t0 = time.perf_counter()
    if mode == "load+kept":
        torch.compiler.load_cache_artifacts(open(folder + "/kept.bin", "rb").read())
    for key, name in json.load(open(index_path)).items():
        with open(folder + "/" + name, "rb") as f:
            table[key] = torch.compiler.load_compiled_function(f)
            unguarded(table[key])
    loaded_s = time.perf_counter() - t0
    load_modules = imported_since(before)["count"]

def dispatch(block):
    cls_forward = type(block).forward
    def forward(*args, **kwargs):
        key = layout(args, kwargs)
        fn = table.get(key)
        if fn is None:
            if mode != "save":
                raise RuntimeError("no saved graph for " + key)
            compiled = torch.compile(cls_forward, fullgraph=True, dynamic=False,
                                     options={"guard_filter_fn": portable})
            fn = table[key] = compiled.aot_compile(((block,) + args, kwargs))
            unguarded(fn)
        return fn(block, *args, **kwargs)
    return forward

recipe = speed if mode != "plain" else ("compile" if speed == "exact" else speed + "+compile")
with comp.with_speed(recipe).use() as module, torch.inference_mode():
    if mode != "plain":
        for b in module.transformer_blocks:
            b.forward = dispatch(b)
    inp.transformer = module
    times, first = [], None
    for i in range(int(steps)):
        _sync(inp.device)
        t0 = time.perf_counter()
        out = sample_steps(inp, 1)
        _sync(inp.device)
        times.append(time.perf_counter() - t0)
        first = out if first is None else first
    if mode != "plain":
        for b in module.transformer_blocks:
            del b.__dict__["forward"]
if mode == "save":
    names = {}
    for i, (key, fn) in enumerate(table.items()):
        names[key] = "block_%d.aot" % i
        fn.save_compiled_function(folder + "/" + names[key])
    json.dump(names, open(index_path, "w"))
    open(folder + "/kept.bin", "wb").write(torch.compiler.save_cache_artifacts()[0])
    torch.save(first, folder + "/first_step.pt")
diff = None
if mode != "save":
    ref = torch.load(folder + "/first_step.pt")
    diff = (first - ref).abs().max().item()
size = sum(os.path.getsize(folder + "/" + n) for n in json.load(open(index_path)).values()) if mode != "plain" else None
print("RESULT " + json.dumps(dict(mode=mode, speed=recipe, steps_s=times, load_s=loaded_s, graphs=len(table),
      to_first_step_end_s=time.perf_counter() - t_start, max_abs_diff_vs_saved=diff, file_bytes=size,
      load_new_modules=locals().get("load_modules"))))
"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--speed", default="exact", help="the recipe's parts other than compile (exact: compile alone)")
    p.add_argument("--steps", type=int, default=2, help="steps per run (the first is the restart's)")
    p.add_argument("--runs", type=int, default=2, help="load and plain runs after the save")
    p.add_argument("--modes", default="load,load+kept,plain",
                   help="runs after the save, each --runs times (load+kept: the pack's compile-cache file loaded first)")
    p.add_argument("--folder", type=Path, help="where the saved functions go (default: a temporary folder)")
    p.add_argument("--out", type=Path, help="JSON (default $OUT/aot_restart.json, else bench/aot_restart_local.json)")
    return p.parse_args(argv)


def child(mode: str, args, folder: Path) -> dict:
    tiny = "1" if args.device == "cpu" else "0"
    return run_child(CHILD, [mode, args.speed, args.device, tiny, folder, args.steps], mode,
                     env={"TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(prefix="inductor_")})


def main(argv=None):
    args = parse_args(argv)
    folder = args.folder or Path(tempfile.mkdtemp(prefix="aot_"))
    folder.mkdir(parents=True, exist_ok=True)
    rows = [child("save", args, folder)]
    rows += [child(mode, args, folder) for _ in range(args.runs) for mode in args.modes.split(",")]
    print("| run | speed | load s | first step s | warm step s | first / warm | (load + first) / warm | max abs diff vs saved | graphs |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        s = r["steps_s"]
        warm = min(s[1:]) if len(s) > 1 else float("nan")
        diff = "" if r["max_abs_diff_vs_saved"] is None else f"{r['max_abs_diff_vs_saved']:.2e}"
        print(f"| {r['mode']} | {r['speed']} | {r['load_s']:.2f} | {s[0]:.2f} | {warm:.2f} | {s[0] / warm:.2f} | {(r['load_s'] + s[0]) / warm:.2f} | {diff} | "
              f"{r['graphs']} |")
    out = args.out or default_out("aot_restart")
    write_json(out, dict(env=dict(provenance(card_name(args.device)), speed=args.speed, steps=args.steps), rows=rows))
    print("JSON:", out)


if __name__ == "__main__":
    main()
