"""A file-backed model's hold on its files: nothing outlives the model, and a file changed under a
loaded model is refused instead of read at the old offsets."""
from __future__ import annotations

import gc
import os
import shutil

import pytest
import torch
from test_placement import _inputs, _run

from cogvid_core.model import loading as L
from cogvid_core.model import variants as M
from cogvid_core.model.testing import write_checkpoints
from cogvid_core.model.variants import CheckpointError
from cogvid_core.memory import placement as P
from cogvid_core.memory.fileread import registered_bytes

V15 = M.V15.key


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """Two tiny 1.5 transformers of the same shape and size, different values (seeds 0 and 1)."""
    root = tmp_path_factory.mktemp("two")
    return [write_checkpoints(root / f"s{seed}", V15, tiny=True, dtype=torch.float32, layouts=("single",),
                              seed=seed)["single"]["transformer"] for seed in (0, 1)]


def _open_files(path) -> int:
    """Descriptors of this process open on ``path`` (read from /proc/self/fd)."""
    want, n = os.path.realpath(path), 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{fd}") == want
        except OSError:            # the listing's own descriptor, gone by now
            pass
    return n


def _lazy(path):
    return L.load_transformer(path, dtype=torch.float32, progress=False)[0]


# ------------------------------------------------------------------------------- item 6: nothing outlives the model
@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors through /proc")
@pytest.mark.parametrize("mode", ["stream", "offload"])
def test_dropped_model_closes_its_files(two, mode):
    """ComfyUI drops a cached loader output without release(): three load / use / drop rounds (one
    dropped in the middle of a use, blocks prefetched) leave no descriptor open on the file."""
    path = two[0]
    before = _open_files(path)
    for round_ in range(3):
        lazy = _lazy(path)
        placed = P.place(lazy, "cpu", mode, degrade_on_cpu=False)
        placed.acquire()
        _run(lazy, _inputs(lazy, M.V15))
        assert _open_files(path) > before           # the reader holds the file while the model lives
        if round_ != 1:
            placed.offload()                        # round 1: dropped mid-use
        del lazy, placed
        gc.collect()
    assert _open_files(path) == before
    assert registered_bytes() == 0


# ------------------------------------------------------------------------------- item 7: a changed file is refused
def _replace_same_size(dst, src, keep_inode: bool) -> None:
    """``dst`` gets ``src``'s bytes (same size): in place (same inode, later mtime) or as a new file
    renamed over it with ``dst``'s old times (what ``cp -p`` / a copy2 then move gives)."""
    st = os.stat(dst)
    if keep_inode:
        with open(dst, "r+b") as f:
            f.write(src.read_bytes())
        os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    else:
        tmp = dst.with_suffix(".tmp")
        shutil.copyfile(src, tmp)
        os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.replace(tmp, dst)
    assert os.path.getsize(dst) == st.st_size


@pytest.mark.parametrize("keep_inode", [True, False], ids=["rewritten", "renamed-over"])
@pytest.mark.parametrize("mode", ["stream", "offload"])
def test_file_replaced_under_a_loaded_model_is_refused(two, tmp_path, mode, keep_inode):
    path = tmp_path / "transformer.safetensors"
    shutil.copyfile(two[0], path)
    lazy = _lazy(path)
    kw = _inputs(lazy, M.V15)
    placed = P.place(lazy, "cpu", mode, degrade_on_cpu=False)
    with placed.use():
        want = _run(lazy, kw)
    _replace_same_size(path, two[1], keep_inode)
    with pytest.raises(CheckpointError, match="changed on disk.*Load the model again"):
        with placed.use():
            _run(lazy, kw)
    placed.release()
    reloaded = _lazy(path)                          # a new load indexes the new file: its own weights
    with P.place(reloaded, "cpu", mode, degrade_on_cpu=False).use():
        assert not torch.equal(_run(reloaded, kw), want)


def test_removed_file_is_refused(two, tmp_path):
    path = tmp_path / "transformer.safetensors"
    shutil.copyfile(two[0], path)
    lazy = _lazy(path)
    path.unlink()
    with pytest.raises(CheckpointError, match="was removed or moved.*Load the model again"):
        P.place(lazy, "cpu", "resident")
