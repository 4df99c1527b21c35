"""What a process's first compiled step spends before and around dynamo's trace: module imports.

    python bench/bench_first_compile.py --runs 2                     # CPU, tiny 1.5, dynamo's eager backend
    python bench/bench_first_compile.py --device cuda --backend inductor --runs 2

A restart's first compiled step is slower than a warm one by more than compile's own timers say (H100:
3.2 s of 6.3 s, docs/performance.md "Restarts and compile's host memory"). One candidate: the first
compile of a process imports dynamo's, inductor's and their dependencies' modules. Each run is a fresh
child process that builds the tiny 1.5 transformer and samples one compiled step (``compile``, batched
CFG), either as it comes ("cold") or after a one-line compile of a small function ("imports first"),
which pulls in the same modules. Per run: the step's seconds, dynamo's ``bytecode_tracing`` and compile
totals, and how many modules the step imported, by package. The tiny model traces the same block code as
the full one, so the trace and the imports cost what they cost at full size on this CPU.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common.child import run_child  # noqa: E402
from bench.common.provenance import card_name, default_out, provenance, write_json  # noqa: E402

CHILD = r"""
import json, sys, time, types, torch
from torch._dynamo.utils import compile_times
from bench.bench_speed import Inputs, sample_steps
from bench.common.imports import imported_since
from cogvid_core.run import session
from cogvid_core.speed import fast
mode, backend, device = sys.argv[1:4]
fast.COMPILE_OPTIONS["backend"] = backend
inp = Inputs(types.SimpleNamespace(device=device, tiny=True, frames=None, height=None, width=None))
comp = session.Component("transformer", inp.transformer, inp.device, inp.dtype, variant=inp.variant)
if mode == "imports first":
    torch.compile(lambda x: torch.nn.functional.gelu(x) * 2, backend=backend)(torch.randn(4, device=inp.device))
    torch._dynamo.reset()
before = set(sys.modules)
t0 = time.perf_counter()
with comp.with_speed("compile").use() as module, torch.inference_mode():
    inp.transformer = module
    sample_steps(inp, 1)
step = time.perf_counter() - t0
new = imported_since(before)
names, secs = compile_times(repr="csv", aggregate=True)
times = {n: float(v) for n, v in zip(names, secs)}
print("RESULT " + json.dumps(dict(step_s=step, bytecode_tracing_s=times.get("bytecode_tracing"),
      compile_inner_s=times.get("_compile.compile_inner"), new_modules=new["count"], by_package=new["by_package"])))
"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="eager", help="torch.compile backend (inductor: what users run)")
    p.add_argument("--runs", type=int, default=2, help="fresh processes per mode")
    p.add_argument("--out", type=Path, help="JSON (default $OUT/first_compile.json, else bench/first_compile_local.json)")
    return p.parse_args(argv)


def child(mode: str, args) -> dict:
    return dict(run_child(CHILD, [mode, args.backend, args.device], mode), mode=mode)


def main(argv=None):
    args = parse_args(argv)
    rows = [child(mode, args) for _ in range(args.runs) for mode in ("cold", "imports first")]
    print("| run | first step s | dynamo trace s | compile s | modules the step imported |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['step_s']:.2f} | {r['bytecode_tracing_s'] or 0:.2f} | {r['compile_inner_s'] or 0:.2f} | "
              f"{r['new_modules']} |")
    out = args.out or default_out("first_compile")
    write_json(out, dict(env=dict(provenance(card_name(args.device)), backend=args.backend, runs=args.runs), rows=rows))
    print("JSON:", out)


if __name__ == "__main__":
    main()
