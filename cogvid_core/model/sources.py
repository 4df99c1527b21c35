"""Where a checkpoint component comes from: a hub-layout folder, the component folder itself, a
single ``.safetensors`` file, or a hub repo id (only the needed sub-folder is downloaded).

Only safetensors are read: pickle checkpoints (.bin/.pt/.ckpt) can run code when loaded and are
refused here, before anything opens them.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from tqdm.auto import tqdm as _tqdm

from cogvid_core.model.variants import CheckpointError

COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def resolve(source: str | os.PathLike, component: str, cache_dir: str | os.PathLike | None = None,
            progress: bool = True, local_dir: str | os.PathLike | None = None) -> Path:
    """Where ``component`` of ``source`` lives on disk: a component folder or a single file.

    ``source``: a hub-layout root folder (with ``<component>/``), the component folder itself, a
    ``.safetensors`` file, or a hub repo id (``THUDM/CogVideoX1.5-5B-I2V``). A repo id downloads
    only ``<component>/*`` through ``huggingface_hub.snapshot_download`` (its tqdm bars when
    ``progress``); with ``HF_HUB_OFFLINE=1`` the hub cache (``models--org--name/snapshots/...``)
    answers instead. ``local_dir`` puts the download in a plain folder (e.g. models/CogVideo/<name>).
    """
    if component not in COMPONENTS:
        raise ValueError(f"unknown component {component!r}; one of {', '.join(COMPONENTS)}")
    path = Path(os.fspath(source)).expanduser()
    if path.is_file():
        check_file_type(path)
        return path
    if path.is_dir():
        return _component_folder(path, component)
    if REPO_ID.match(str(source)):
        return _download(str(source), component, cache_dir, progress, local_dir)
    raise CheckpointError(f"{source} not found: give a folder, a .safetensors file or a hub repo id "
                          "like THUDM/CogVideoX1.5-5B-I2V")


def check_file_type(path: Path) -> None:
    """Only safetensors: pickle files can execute code on load."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(f"{path.name} is a pickle checkpoint ({path.suffix}); only .safetensors files are "
                              "accepted (pickle can run code when loaded): use the .safetensors version")
    if path.suffix.lower() != ".safetensors":
        raise CheckpointError(f"{path.name} is not a .safetensors file; only .safetensors files are accepted")


def _component_folder(path: Path, component: str) -> Path:
    sub = path / component
    if sub.is_dir():
        return sub
    if _looks_like_component_folder(path, component):
        return path
    have = sorted(p.name for p in path.iterdir() if p.is_dir())
    raise CheckpointError(f"folder {path} has no {component}/ sub-folder and is not a {component} folder itself "
                          f"(sub-folders: {', '.join(have) or 'none'})")


def _looks_like_component_folder(path: Path, component: str) -> bool:
    if component == "tokenizer":
        return any((path / f).is_file() for f in ("spiece.model", "tokenizer.json", "tokenizer_config.json"))
    if component == "scheduler":
        return (path / "scheduler_config.json").is_file()
    return (path / "config.json").is_file() or _has_files(path, (".safetensors", *PICKLE_SUFFIXES))


def _has_files(folder: Path, suffixes) -> bool:
    return any(p.suffix.lower() in suffixes for p in folder.iterdir() if p.is_file())


def _download(repo_id: str, component: str, cache_dir, progress: bool, local_dir) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    kwargs = dict(allow_patterns=[f"{component}/*"], cache_dir=cache_dir, local_dir=local_dir)
    if not progress:
        kwargs["tqdm_class"] = _SilentTqdm
    try:
        root = Path(snapshot_download(repo_id, **kwargs))
    except (HfHubHTTPError, LocalEntryNotFoundError, HFValidationError, OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"could not download {component}/ of {repo_id}: {reason}; check the repo id, "
                              "your network, or put the folder under models/CogVideo") from e
    folder = root / component
    if not folder.is_dir():
        raise CheckpointError(f"{repo_id} has no {component}/ folder (or it is not in the local hub cache "
                              f"{root}); check the repo id, or put the folder under models/CogVideo")
    return folder


class _SilentTqdm(_tqdm):
    """tqdm that never draws: snapshot_download's bars when progress=False."""

    def __init__(self, *args, **kwargs):
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


def weight_files(folder: Path, stems: tuple[str, ...]) -> list[Path]:
    """The safetensors files of a component folder (via the shard index when there is one)."""
    for stem in stems:
        index = folder / f"{stem}.safetensors.index.json"
        if index.is_file():
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [n for n in names if not (folder / n).is_file()]
            if missing:
                raise CheckpointError(f"{folder} is incomplete: {', '.join(missing)} missing; download it again")
            return [folder / n for n in names]
        single = folder / f"{stem}.safetensors"
        if single.is_file():
            return [single]
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    if _has_files(folder, PICKLE_SUFFIXES):
        raise CheckpointError(f"{folder} only has pickle weights (.bin/.pt); only .safetensors files are accepted: "
                              "download the safetensors version")
    raise CheckpointError(f"{folder} has no .safetensors weights (its config.json is there: an unfinished download "
                          "or moved files?): download that part again, or pick another model")


def is_repo_id(source) -> bool:
    """A hub repo id that is not also a local path."""
    return bool(REPO_ID.match(str(source))) and not Path(os.fspath(source)).exists()
