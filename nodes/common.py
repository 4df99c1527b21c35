"""What every node module shares: custom types, model listings, devices, progress, ComfyUI memory."""
from __future__ import annotations

import os

import comfy.model_management as mm
import comfy.utils
import folder_paths
from comfy_api.latest import io

from cogvid_core import api as cv

CATEGORY = "CogVideoX I2V"
FOLDER = "CogVideo"
HUB_REPOS = ("THUDM/CogVideoX1.5-5B-I2V", "THUDM/CogVideoX-5b-I2V")
PRECISIONS = ("bf16", "fp16", "fp32", "fp8_e4m3fn")
DEVICES = ("auto", "cuda", "cpu")
MODEL_EXTENSIONS = (".safetensors", ".sft")
COMPILE_CACHE_FOLDER = "cogvid_compile_cache"     # under models/: compiled kernels, safe to delete

TRANSFORMER = io.Custom("COGVID_TRANSFORMER")
T5 = io.Custom("COGVID_T5")
VAE = io.Custom("COGVID_VAE")
CONDITIONING = io.Custom("COGVID_CONDITIONING")
IMAGE_LATENT = io.Custom("COGVID_IMAGE_LATENT")
LATENT = io.Custom("COGVID_LATENT")
PLAN = io.Custom("COGVID_PLAN")

# Single-file folders ComfyUI already knows, per component.
SINGLE_FILE_FOLDERS = {"transformer": ("diffusion_models",), "t5": ("text_encoders",), "vae": ("vae",)}
# Hub-layout sub-folder that holds each component.
SUBFOLDER = {"transformer": "transformer", "t5": "text_encoder", "vae": "vae"}


def register_folders() -> None:
    """models/CogVideo: hub-layout model folders (and single files) for this pack."""
    default = os.path.join(folder_paths.models_dir, FOLDER)
    if FOLDER in folder_paths.folder_names_and_paths:
        paths = folder_paths.folder_names_and_paths[FOLDER][0]
        if default not in paths:
            paths.append(default)
    else:
        folder_paths.folder_names_and_paths[FOLDER] = ([default], set(MODEL_EXTENSIONS))
    # speed 'compile' keeps its kernels for the next ComfyUI start there (not temp/: ComfyUI empties it at start)
    cv.set_compile_cache(os.path.join(folder_paths.models_dir, COMPILE_CACHE_FOLDER))


def _is_model_folder(path: str) -> bool:
    if os.path.isfile(os.path.join(path, "model_index.json")) or os.path.isfile(os.path.join(path, "config.json")):
        return True
    return any(os.path.isfile(os.path.join(path, sub, "config.json")) for sub in SUBFOLDER.values())


def _cogvideo_folders() -> dict[str, str]:
    """'CogVideo/<rel>' -> absolute folder, for hub-layout (or single-component) folders, depth <= 3."""
    found = {}
    for root in folder_paths.get_folder_paths(FOLDER):
        if not os.path.isdir(root):
            continue
        for dirpath, dirnames, _ in os.walk(root, followlinks=True):
            rel = os.path.relpath(dirpath, root)
            depth = 0 if rel == "." else rel.count(os.sep) + 1
            if depth and _is_model_folder(dirpath):
                found.setdefault(f"{FOLDER}/{rel.replace(os.sep, '/')}", dirpath)
                dirnames[:] = []
            elif depth >= 3:
                dirnames[:] = []
            else:
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    return found


def _single_files(component: str) -> dict[str, tuple[str, str]]:
    inside = tuple(f"{name}/" for name in _cogvideo_folders())   # shards of hub-layout folders are not models
    out = {}
    for folder in (FOLDER,) + SINGLE_FILE_FOLDERS[component]:
        if folder not in folder_paths.folder_names_and_paths:
            continue
        for name in folder_paths.get_filename_list(folder):
            option = f"{folder}/{name}"
            if name.lower().endswith(MODEL_EXTENSIONS) and not option.startswith(inside):
                out[option] = (folder, name)
    return out


def speed_options() -> list[str]:
    """The Transformer Loader's speed combo (the VRAM Estimate node offers the same names)."""
    from cogvid_core.api import SPEEDS as CHOICES
    return list(CHOICES)


def model_options(component: str) -> list[str]:
    """What the loader's model list shows: local folders, single files, then downloadable repos."""
    return sorted(_cogvideo_folders()) + sorted(_single_files(component)) + list(HUB_REPOS)


def resolve_model(component: str, name: str) -> str:
    """A listed option -> a path or a hub repo id for the engine; anything not listed is refused."""
    if name in HUB_REPOS:
        return name
    folders = _cogvideo_folders()
    if name in folders:
        return folders[name]
    files = _single_files(component)
    if name in files:
        return folder_paths.get_full_path_or_raise(*files[name])
    gone = _expected_path(component, name)
    if gone is not None:
        raise ValueError(f"model {name!r} is gone from disk: nothing at {gone} (moved, renamed or deleted after "
                         "ComfyUI listed it, or the workflow comes from another machine). Put it back there, or "
                         "press R in ComfyUI to refresh the model lists and pick a listed one")
    raise ValueError(f"model {name!r} is not in the list for this loader (models/{FOLDER} folders, "
                     f"{', '.join(SINGLE_FILE_FOLDERS[component])} files, or {', '.join(HUB_REPOS)})")


def _expected_path(component: str, name: str) -> str | None:
    """Where a name shaped like one of this loader's options ('<folder>/<relative path>') would be on
    disk; None for anything else (another loader's folder, a path that climbs out with '..')."""
    folder, _, rel = name.partition("/")
    parts = rel.replace("\\", "/").split("/")
    if folder not in (FOLDER,) + SINGLE_FILE_FOLDERS[component] or not rel or rel.startswith("/") \
            or any(p in ("", ".", "..") for p in parts) or folder not in folder_paths.folder_names_and_paths:
        return None
    roots = folder_paths.get_folder_paths(folder)
    path = os.path.join(roots[0], *parts) if roots else None
    return None if path is None or os.path.exists(path) else path   # there but not a model: not "gone"


def download_dir() -> str:
    return folder_paths.get_folder_paths(FOLDER)[0]


def compute_device(choice: str):
    """auto -> ComfyUI's device (CPU under --cpu); cuda refused when ComfyUI runs on CPU."""
    import torch
    comfy_dev = mm.get_torch_device()
    if choice == "auto":
        return comfy_dev
    if choice == "cpu":
        return torch.device("cpu")
    if choice == "cuda":
        if comfy_dev.type != "cuda":
            raise ValueError(f"device 'cuda' asked for, but ComfyUI computes on {comfy_dev} "
                             "(started with --cpu, or no CUDA GPU): choose auto or cpu")
        return comfy_dev
    raise ValueError(f"device must be one of {DEVICES}, got {choice!r}")


def progress_callback(total: int):
    bar = comfy.utils.ProgressBar(total)

    def update(done: int, total_now: int) -> None:
        bar.update_absolute(done, total_now)
    return update


def interrupt() -> None:
    mm.throw_exception_if_processing_interrupted()


def comfy_lowvram() -> bool:
    """ComfyUI started with --lowvram / --novram (or chose low-VRAM mode itself)."""
    return mm.vram_state in (mm.VRAMState.LOW_VRAM, mm.VRAMState.NO_VRAM)


def budget_bytes(budget_gib: float, device) -> int | None:
    """User budget, or 0 = what the GPU has free (as ComfyUI's patchers count it) minus ComfyUI's
    reserve (None: no GPU, no verdict)."""
    if budget_gib > 0:
        return int(budget_gib * 1024 ** 3)
    if device.type == "cpu":
        return None
    from . import memory
    free = memory.free_vram(device)      # counts what idle dynamic-VRAM models give back (ComfyUI 2026)
    return max(0, int(free - mm.extra_reserved_memory()))


def card_bytes(device) -> int | None:
    """The GPU's whole memory as ComfyUI counts it, less its reserve (--reserve-vram): the most any plan
    can have there (None: the CPU)."""
    if device.type == "cpu":
        return None
    return max(0, int(mm.get_total_memory(device) - mm.extra_reserved_memory()))


def t5_tokenizer_dir(source: str) -> str | None:
    """Tokenizer for a single-file T5: a `tokenizer` folder beside it, else the one ComfyUI ships
    with its own T5 text encoders; None for model folders (their tokenizer/ sub-folder is used)."""
    if not os.path.isfile(source):
        return None
    beside = os.path.join(os.path.dirname(source), "tokenizer")
    if os.path.isdir(beside):
        return beside
    shipped = os.path.join(os.path.dirname(os.path.realpath(mm.__file__)), "text_encoders", "t5_tokenizer")
    return shipped if os.path.isdir(shipped) else None
