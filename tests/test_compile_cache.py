"""Compiled work kept across processes (speed/compile_cache.py), through torch's own cache artifacts."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from cogvid_core.model import variants as M
from cogvid_core.speed import compile_cache, fast
from test_fast import _inputs, _run, _transformer

ROOT = Path(__file__).resolve().parents[1]

# one process: a small block compiled by inductor, our load before and save after, then inductor's
# cache counters (a hit: the graph came from the cache, no inductor compile)
CHILD = textwrap.dedent("""
    import json, sys, torch
    from torch._dynamo.utils import counters
    from cogvid_core.speed import compile_cache
    compile_cache.load("cpu")
    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.GELU(), torch.nn.LayerNorm(32))
    out = torch.compile(block.forward, dynamic=False)(torch.randn(4, 32))
    compile_cache.save("cpu")
    print("RESULT " + json.dumps(dict(counters["inductor"])))
""")


def _child(cache: Path, inductor: Path) -> dict:
    env = dict(os.environ, COGVID_COMPILE_CACHE=str(cache), TORCHINDUCTOR_CACHE_DIR=str(inductor),
               PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300)
    line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line, p.stderr[-2000:]
    import json
    return json.loads(line[7:])


@pytest.mark.skipif(fast._compile_reason("cpu") is not None, reason="torch.compile on the CPU needs g++")
def test_a_second_process_takes_the_first_ones_kernels_from_the_folder(tmp_path):
    """Each process gets an empty inductor cache of its own (a restart after a reboot, or another
    machine's /tmp): only our file carries the compiled work across."""
    first = _child(tmp_path / "keep", tmp_path / "inductor1")
    files = list((tmp_path / "keep").iterdir())
    second = _child(tmp_path / "keep", tmp_path / "inductor2")
    assert first.get("fxgraph_cache_miss", 0) >= 1 and not first.get("fxgraph_cache_hit")
    assert len(files) == 1 and files[0].suffix == ".bin" and files[0].stat().st_size > 0
    assert second.get("fxgraph_cache_hit", 0) >= 1 and not second.get("fxgraph_cache_miss")
    # nothing new was compiled: the file is not rewritten
    assert files[0].stat().st_mtime_ns == list((tmp_path / "keep").iterdir())[0].stat().st_mtime_ns


def test_folder_choice_env_then_adapter_then_default(monkeypatch, tmp_path):
    monkeypatch.delenv(compile_cache.ENV, raising=False)
    monkeypatch.setitem(compile_cache._chosen, "folder", None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.folder() == tmp_path / "xdg" / "cogvid-i2v" / "compile"
    compile_cache.set_folder(tmp_path / "comfy")
    assert compile_cache.folder() == tmp_path / "comfy"
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "env"))
    assert compile_cache.folder() == tmp_path / "env"
    monkeypatch.setenv(compile_cache.ENV, "off")
    assert compile_cache.folder() is None and compile_cache.file_for("cpu") is None


def test_file_name_carries_torch_and_card(monkeypatch, tmp_path):
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path))
    name = compile_cache.file_for("cpu").name
    assert torch.__version__.split("+")[0] in name and name.endswith("-cpu.bin") and "/" not in name
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA GeForce RTX 4090")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 9))
    assert compile_cache.file_for("cuda:0").name.endswith("-sm89-NVIDIA_GeForce_RTX_4090.bin")


def test_a_damaged_file_is_ignored_and_the_compiled_run_goes_on(monkeypatch, tmp_path, caplog):
    """The wiring (fast.applied loads before its first compiled call) with a file that is not torch's:
    a warning naming the file, and the run gives the uncompiled result."""
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path))
    monkeypatch.setitem(fast.COMPILE_OPTIONS, "backend", "eager")
    path = compile_cache.file_for("cpu")
    path.write_bytes(b"not torch's artifacts")
    monkeypatch.delitem(compile_cache._loaded, path, raising=False)
    tr = _transformer()
    kw = _inputs(tr, M.VARIANTS["cogvideox1.5-5b-i2v"], batch=1)
    ref = _run(tr, kw)
    torch._dynamo.reset()
    with caplog.at_level(logging.WARNING, logger="cogvid_core.speed.fast"), fast.applied(tr, "compile", "cpu"):
        out = _run(tr, kw)
    assert (out - ref).abs().max() < 1e-5
    assert any(str(path) in r.getMessage() and "did not load" in r.getMessage() for r in caplog.records)


def test_an_unwritable_folder_warns_and_never_fails(monkeypatch, tmp_path, caplog):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv(compile_cache.ENV, str(blocker / "sub"))     # a folder below a file: mkdir fails
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (b"x", _Info({"inductor": ["k"]})))
    with caplog.at_level(logging.WARNING, logger="cogvid_core.speed.fast"):
        compile_cache.save("cpu")
    assert any("not written" in r.getMessage() and compile_cache.ENV in r.getMessage() for r in caplog.records)


class _Info:
    def __init__(self, artifacts):
        self.artifacts = artifacts


def test_workers_capped_unless_the_user_chose(monkeypatch):
    from torch._inductor import async_compile, config
    monkeypatch.setattr(async_compile, "_pool_set", type(async_compile._pool_set)())
    monkeypatch.setattr(config, "compile_threads", None)
    monkeypatch.delenv("TORCHINDUCTOR_COMPILE_THREADS", raising=False)
    compile_cache.cap_workers()
    assert config.compile_threads == compile_cache.COMPILE_THREADS
    monkeypatch.setattr(config, "compile_threads", None)
    monkeypatch.setenv("TORCHINDUCTOR_COMPILE_THREADS", "7")
    compile_cache.cap_workers()
    assert config.compile_threads is None


def test_with_kept_kernels_no_compile_pool_starts(monkeypatch, tmp_path):
    """A restart that loaded its kernels compiles nothing: in-process (1), not a pool of workers."""
    from torch._inductor import async_compile, config
    monkeypatch.setattr(async_compile, "_pool_set", type(async_compile._pool_set)())
    monkeypatch.delenv("TORCHINDUCTOR_COMPILE_THREADS", raising=False)
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path))
    monkeypatch.setattr(config, "compile_threads", None)
    compile_cache.prepare("cpu")                               # no file: a cold compile, capped pool
    assert config.compile_threads == compile_cache.COMPILE_THREADS
    path = compile_cache.file_for("cpu")
    path.write_bytes(b"x")
    monkeypatch.delitem(compile_cache._loaded, path, raising=False)
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", lambda blob: _Info({"inductor": ["k"]}))
    monkeypatch.setattr(config, "compile_threads", None)
    compile_cache.prepare("cpu")
    assert config.compile_threads == 1


# the tiny 1.5 transformer through the pack's own path, attention routed by the TorchFunctionMode (the counting
# kernel of test_fast stands for fa3fp8 / sage), CFG batched, 2 steps; AOTAutograd's cache counters after
ROUTED_CHILD = textwrap.dedent("""
    import json, sys, torch
    sys.path.insert(0, "tests")
    import test_fast  # registers the counting attention kernel
    from torch._dynamo.utils import counters
    from cogvid_core.model import testing, variants as M
    from cogvid_core.model.vae import ImageLatent
    from cogvid_core.run import sampling, session
    tr = testing.build_random("transformer", M.V15.key, tiny=True, seed=3)
    frames, h, w = M.default_size(M.V15, dict(tr.config))
    shape = (1, 16, 1, h // 8, w // 8)
    image = ImageLatent(mean=torch.randn(shape), std=torch.full(shape, 0.1), scale=0.7, height=h, width=w)
    emb = torch.randn(1, tr.config.max_text_seq_length, tr.config.text_embed_dim)
    comp = session.Component("transformer", tr, torch.device("cpu"), torch.float32, "resident", variant=M.V15)
    with comp.with_speed("counting+compile").use() as module, torch.inference_mode():
        sampling.sample(module, M.V15, emb, emb * 0.5, image, frames, steps=2, cfg=6.0, cfg_mode="batched")
    print("RESULT " + json.dumps(dict(counters["aot_autograd"])))
""")


@pytest.mark.skipif(fast._compile_reason("cpu") is not None, reason="torch.compile on the CPU needs g++")
def test_a_restart_with_routed_attention_takes_aotautograds_graphs_from_the_file(tmp_path):
    """With an attention kernel routed by a TorchFunctionMode, dynamo records diffusers' ``split`` as the
    Python method Tensor.split, which AOTAutograd's cache refused: every restart re-ran AOTAutograd for the
    block graphs (2.9 s of the H100's first step). Marked cacheable (regional.CACHEABLE_FUNCTIONS): the
    second process, with an empty inductor cache of its own, takes every AOTAutograd graph from our file."""
    script = ROUTED_CHILD
    results = []
    for n in (1, 2):
        env = dict(os.environ, COGVID_COMPILE_CACHE=str(tmp_path / "keep"), TORCHINDUCTOR_CACHE_DIR=str(tmp_path / f"ind{n}"),
                   PYTHONPATH=str(ROOT))
        p = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600,
                           cwd=str(ROOT))
        line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
        assert line, p.stderr[-3000:]
        import json
        results.append(json.loads(line[7:]))
    first, second = results
    assert first["total"] >= 1 and not first.get("autograd_cache_bypass"), first
    assert second.get("autograd_cache_hit") == second["total"] and not second.get("autograd_cache_bypass"), second
