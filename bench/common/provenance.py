"""What every result JSON says about where it came from, and writing it.

A number in docs/ or README links to a raw file; the file must say which command, card, date and
commit produced it (bench/README.md lists them). ``provenance`` gives those fields in one form for
every script; each script puts them where it kept its environment (its ``env`` or the top level).
"""
from __future__ import annotations

import datetime
import json
import platform
import shlex
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GIB = 2 ** 30


def log(*a) -> None:
    print(*a, flush=True)


def command() -> str:
    """The command line as typed (interpreter included), quoted so it can be pasted again."""
    return shlex.join([sys.executable, *sys.argv])


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def git_commit(repo: Path = REPO) -> str | None:
    """The short commit of the tree that ran, or None where there is no git (the device machines run
    a copy of the tree: the estimate grid records sha1s of the files its cells depend on as well).
    ``COGVID_TREE`` first: the device's copy carries the files but not an up-to-date git HEAD (session 16's
    files said 7848a94 for trees at ccc38b6 and 4aa938f), so a device command passes the commit it was
    started from (``COGVID_TREE=<commit> bash gpu.sh``)."""
    if os.environ.get("COGVID_TREE"):
        return os.environ["COGVID_TREE"]
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True)
    except OSError:
        return None
    return out.stdout.strip() or None


def card_name(device=None) -> str:
    """The GPU's name (torch's) for a CUDA device, else the CPU's."""
    import torch
    if device is not None and torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or "cpu"


def allocator_name(device) -> str:
    """The estimate's name of this process's CUDA allocator set ("native", "native:expandable",
    "cudaMallocAsync": cogvid_core.device.info.allocator_backend) on a CUDA device, "cpu" elsewhere."""
    import torch
    from cogvid_core.device.info import allocator_backend
    return allocator_backend() if torch.device(device).type == "cuda" else "cpu"


def versions(*packages: str) -> dict:
    """{package: installed version or None}; python's own first."""
    out = {"python": platform.python_version()}
    for pkg in packages:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def provenance(card: str | None) -> dict:
    """command, card, date (UTC), commit and the versions that set the numbers."""
    return dict(command=command(), card=card, date=now(), commit=git_commit(),
                **versions("torch", "diffusers", "transformers"))


def default_out(name: str) -> Path:
    """Where a bench writes its JSON without ``--out``: ``$OUT/<name>.json`` on the device machine (what comes
    back), else ``bench/<name>_local.json``."""
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]) / f"{name}.json"
    return Path(__file__).resolve().parents[1] / f"{name}_local.json"


def write_json(path: Path | str, doc: dict, indent: int = 1) -> Path:
    """``doc`` as JSON at ``path`` (folders made); values JSON does not know (paths, dtypes) as text."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=indent, default=str))
    return path
