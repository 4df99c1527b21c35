"""The bench scripts (bench/): they run on the tree they ship with. The GPU numbers need the GPU;
what is checked here is the code path a device run takes before and around its measurements."""
import importlib.util
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]


def _script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod        # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


def test_estimate_grid_env_records_the_streaming_code_it_ran():
    """Every grid run starts with its env: the sha1 of the files a streamed block's allocations come
    from. They moved into cogvid_core/memory/; naming the old paths stopped the grid before its first cell."""
    B = _script("bench_estimate")
    args = SimpleNamespace(tiny=True, budget_s=None, part=None)
    env = B._env(torch.device("cpu"), torch.float32, args, time.perf_counter(), None)
    assert sorted(env["sha1"]) == sorted(B.STREAMING_CODE)
    assert all((ROOT / p).is_file() and len(h) == 12 for p, h in env["sha1"].items())
