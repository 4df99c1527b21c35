"""A minimal stand-in for the parts of ComfyUI this pack uses, for tests on machines without ComfyUI.

`install(base_dir)` puts fake `comfy_api.latest`, `comfy.model_management`, `comfy.model_patcher`,
`comfy.utils` and `folder_paths` modules into sys.modules. They follow the real signatures and
behaviour for what the pack calls (V3 schema objects, memory manager bookkeeping, progress bars,
model folders and output paths) and record calls so tests can assert on them.
"""
from __future__ import annotations

import os
import sys
import types
from dataclasses import dataclass, field
from enum import Enum

import torch


# ------------------------------------------------------------------ comfy_api.latest.io / ui
class FolderType(str, Enum):
    input = "input"
    output = "output"
    temp = "temp"


class _Input:
    def __init__(self, id, display_name=None, optional=False, tooltip=None, **kwargs):
        self.id, self.display_name, self.optional, self.tooltip = id, display_name, optional, tooltip
        self.kwargs = kwargs
        self.default = kwargs.get("default")
        self.options = kwargs.get("options")


class _Output:
    def __init__(self, id=None, display_name=None, tooltip=None, is_output_list=False):
        self.id, self.display_name, self.tooltip = id, display_name, tooltip


def _type(io_type: str, widget: bool = False):
    cls = type(io_type, (), {"io_type": io_type})
    cls.Input = type("Input", (_Input,), {"io_type": io_type, "widget": widget})
    cls.Output = type("Output", (_Output,), {"io_type": io_type})
    return cls


def Custom(io_type: str):
    return _type(io_type)


@dataclass
class Schema:
    node_id: str
    display_name: str = None
    category: str = "sd"
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    hidden: list = None
    description: str = ""
    is_output_node: bool = False
    is_experimental: bool = False
    is_deprecated: bool = False
    not_idempotent: bool = False

    def validate(self):
        ids = [i.id for i in self.inputs]
        if len(set(ids)) != len(ids):
            raise ValueError(f"{self.node_id}: input ids must be unique")


class NodeOutput:
    def __init__(self, *args, ui=None, expand=None, block_execution=None):
        self.args, self.ui = args, ui

    @property
    def result(self):
        return self.args if self.args else None

    def __getitem__(self, index):
        return self.args[index]


class ComfyNode:
    hidden = None

    @classmethod
    def define_schema(cls) -> Schema:
        raise NotImplementedError

    @classmethod
    def execute(cls, **kwargs) -> NodeOutput:
        raise NotImplementedError

    @classmethod
    def GET_SCHEMA(cls) -> Schema:
        schema = cls.define_schema()
        schema.validate()
        return schema

    @classmethod
    def EXECUTE_NORMALIZED(cls, *args, **kwargs) -> NodeOutput:
        out = cls.execute(*args, **kwargs)
        return out if isinstance(out, NodeOutput) else NodeOutput(*out)


class SavedResult(dict):
    def __init__(self, filename, subfolder, type):
        super().__init__(filename=filename, subfolder=subfolder, type=type.value)


class PreviewVideo:
    def __init__(self, values, **kwargs):
        self.values = values

    def as_dict(self):
        return {"images": self.values, "animated": (True,)}


class ComfyExtension:
    async def on_load(self):
        pass

    async def get_node_list(self):
        raise NotImplementedError


# ------------------------------------------------------------------ comfy.model_management
class InterruptProcessingException(BaseException):
    """A BaseException since 2026 (an `except Exception` no longer swallows Cancel)."""


class VRAMState(Enum):
    DISABLED = 0
    NO_VRAM = 1
    LOW_VRAM = 2
    NORMAL_VRAM = 3
    HIGH_VRAM = 4
    SHARED = 5


class _MM(types.ModuleType):
    """Core's bookkeeping, simplified: one list of loaded patchers (most recent first, where core
    keeps LoadedModel wrappers) and a device of `total_memory` bytes whose free memory is what the
    loaded patchers do not hold."""

    def __init__(self):
        super().__init__("comfy.model_management")
        self.VRAMState = VRAMState
        self.vram_state = VRAMState.NORMAL_VRAM
        self.current_loaded_models = []      # patchers, most recent first
        self.total_memory = 64 * 1024 ** 3
        self.calls = []
        self.interrupt_processing = False
        self.InterruptProcessingException = InterruptProcessingException

    def get_torch_device(self):
        return torch.device("cpu")

    def intermediate_device(self):
        return torch.device("cpu")

    def extra_reserved_memory(self):
        return 400 * 1024 ** 2

    def minimum_inference_memory(self):
        return 1024 ** 3 * 0.8 + self.extra_reserved_memory()

    def get_total_memory(self, dev=None, torch_total_too=False):
        return (self.total_memory, self.total_memory) if torch_total_too else self.total_memory

    def get_free_memory(self, dev=None, torch_free_too=False):
        free = self.total_memory - sum(p.loaded_size() for p in self.current_loaded_models)
        return (free, free) if torch_free_too else free

    def loaded_models(self, only_currently_used=False):
        return list(self.current_loaded_models)

    def free_memory(self, memory_required, device, keep_loaded=(), **kwargs_2026):
        """As core: least recently used first, each asked to free what is still missing, partially
        (`partially_unload`) where that covers it, else fully (`detach`) and dropped from the list."""
        self.calls.append(("free_memory", memory_required, device))
        unloaded = []
        for p in reversed(list(self.current_loaded_models)):
            if p in keep_loaded or torch.device(p.load_device) != torch.device(device):
                continue
            to_free = memory_required - self.get_free_memory(device)
            if to_free <= 0:
                continue
            if to_free < p.loaded_size() and p.partially_unload(p.offload_device, to_free) >= to_free:
                continue
            p.detach(unpatch_all=True)
            self.current_loaded_models.remove(p)
            unloaded.append(p)
        return unloaded

    def load_models_gpu(self, models, memory_required=0, force_patch_weights=False,
                        minimum_memory_required=None, force_full_load=False):
        """As core: a model (or a clone of it) already loaded is detached keeping its weights
        (`detach(unpatch_all=False)`), room is made on the device, then it is (re)loaded."""
        self.calls.append(("load_models_gpu", list(models), memory_required))
        for p in models:
            for q in [q for q in self.current_loaded_models if p.is_clone(q)]:
                self.current_loaded_models.remove(q)
                q.detach(unpatch_all=False)
            need = p.model_size() - p.loaded_size()
            if torch.device(p.load_device).type != "cpu":
                self.free_memory(need * 1.1 + max(self.minimum_inference_memory(), memory_required), p.load_device)
            p.partially_load(p.load_device, 1e32)
            self.current_loaded_models.insert(0, p)

    def unload_all_models(self):
        self.free_memory(1e30, self.get_torch_device())

    def throw_exception_if_processing_interrupted(self):
        if self.interrupt_processing:
            self.interrupt_processing = False
            raise InterruptProcessingException()


class ModelPatcher:
    """The 2026 signatures (comfy/model_patcher.py): fast_disk, clone's dynamic-VRAM arguments,
    partially_unload's force_patch_weights, get_free_memory adding what idle dynamic models hold."""
    dynamic_vram_held = 0        # what idle dynamic-VRAM models hold and give back on demand

    def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False, fast_disk=False):
        self.model, self.load_device, self.offload_device, self.size = model, load_device, offload_device, size
        self.weight_inplace_update, self.fast_disk = weight_inplace_update, fast_disk
        self.parent = None
        if getattr(model, "device", None) is None:
            model.device = offload_device

    def is_dynamic(self):
        return False

    def model_size(self):
        return self.size

    def loaded_size(self):
        return 0

    def get_free_memory(self, device):
        return sys.modules["comfy.model_management"].get_free_memory(device) + self.dynamic_vram_held

    def is_clone(self, other):
        return hasattr(other, "model") and self.model is other.model

    def clone(self, disable_dynamic=False, model_override=None, force_deepcopy=False):
        if force_deepcopy:
            raise RuntimeError("Cannot create non-dynamic delegate: cached_patcher_init is not initialized.")
        model = model_override[0] if model_override is not None else self.model
        n = self.__class__(model, self.load_device, self.offload_device, self.model_size(),
                           weight_inplace_update=self.weight_inplace_update, fast_disk=self.fast_disk)
        n.parent = self
        return n

    def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
        return 0

    def partially_unload(self, device_to, memory_to_free=0, force_patch_weights=False):
        return 0

    def detach(self, unpatch_all=True):
        return self.model


# ------------------------------------------------------------------ comfy.utils
class ProgressBar:
    updates: list = []
    previews: list = []       # (value, total, preview tuple) of the updates that carried one

    def __init__(self, total, node_id=None):
        self.total, self.current = total, 0

    def update_absolute(self, value, total=None, preview=None):
        if total is not None:
            self.total = total
        self.current = min(value, self.total)
        ProgressBar.updates.append((self.current, self.total))
        if preview is not None:
            ProgressBar.previews.append((self.current, self.total, preview))

    def update(self, value):
        self.update_absolute(self.current + value)


# ------------------------------------------------------------------ folder_paths
def _folder_paths(base_dir: str) -> types.ModuleType:
    fp = types.ModuleType("folder_paths")
    fp.base_path = base_dir
    fp.models_dir = os.path.join(base_dir, "models")
    exts = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}
    fp.supported_pt_extensions = exts
    fp.folder_names_and_paths = {
        "vae": ([os.path.join(fp.models_dir, "vae")], exts),
        "text_encoders": ([os.path.join(fp.models_dir, "text_encoders"), os.path.join(fp.models_dir, "clip")], exts),
        "diffusion_models": ([os.path.join(fp.models_dir, "unet"), os.path.join(fp.models_dir, "diffusion_models")], exts),
    }
    fp.output_directory = os.path.join(base_dir, "output")

    def get_folder_paths(name):
        return fp.folder_names_and_paths[name][0][:]

    def get_filename_list(name):
        paths, exts_ = fp.folder_names_and_paths[name]
        out = set()
        for root in paths:
            if not os.path.isdir(root):
                continue
            for dirpath, _dirs, files in os.walk(root, followlinks=True):
                for f in files:
                    if not exts_ or os.path.splitext(f)[1].lower() in exts_:
                        out.add(os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/"))
        return sorted(out)

    def get_full_path(name, filename):
        filename = os.path.relpath(os.path.join("/", filename), "/")
        for root in fp.folder_names_and_paths[name][0]:
            p = os.path.join(root, filename)
            if os.path.isfile(p):
                return p
        return None

    def get_full_path_or_raise(name, filename):
        p = get_full_path(name, filename)
        if p is None:
            raise FileNotFoundError(f"Model in folder '{name}' with filename '{filename}' not found.")
        return p

    def add_model_folder_path(name, path, is_default=False):
        paths = fp.folder_names_and_paths.setdefault(name, ([], set()))[0]
        if path not in paths:
            paths.insert(0, path) if is_default else paths.append(path)

    def get_output_directory():
        return fp.output_directory

    def get_save_image_path(filename_prefix, output_dir, image_width=0, image_height=0):
        subfolder = os.path.dirname(os.path.normpath(filename_prefix))
        filename = os.path.basename(os.path.normpath(filename_prefix))
        full_output_folder = os.path.join(output_dir, subfolder)
        if os.path.commonpath((output_dir, os.path.abspath(full_output_folder))) != output_dir:
            raise Exception("Saving image outside the output folder is not allowed.")
        os.makedirs(full_output_folder, exist_ok=True)
        existing = [f for f in os.listdir(full_output_folder) if f.startswith(filename + "_")]
        counter = len(existing) + 1
        return full_output_folder, filename, counter, subfolder, filename_prefix

    for f in (get_folder_paths, get_filename_list, get_full_path, get_full_path_or_raise, add_model_folder_path,
              get_output_directory, get_save_image_path):
        setattr(fp, f.__name__, f)
    return fp


# ------------------------------------------------------------------ install
def install(base_dir: str) -> dict:
    """Install the fakes into sys.modules (replacing earlier ones); returns them by module name."""
    io = types.ModuleType("comfy_api.latest._io")
    for name in ("Int", "Float", "String", "Boolean", "Combo", "Image", "Latent", "Mask"):
        io_type = {"Int": "INT", "Float": "FLOAT", "String": "STRING", "Boolean": "BOOLEAN", "Combo": "COMBO"}.get(
            name, name.upper())
        setattr(io, name, _type(io_type, widget=name in ("Int", "Float", "String", "Boolean", "Combo")))
    for obj in (Custom, Schema, NodeOutput, ComfyNode, FolderType):
        setattr(io, obj.__name__, obj)
    ui = types.ModuleType("comfy_api.latest._ui")
    ui.SavedResult, ui.PreviewVideo = SavedResult, PreviewVideo
    latest = types.ModuleType("comfy_api.latest")
    latest.io, latest.ui, latest.ComfyExtension = io, ui, ComfyExtension
    comfy_api = types.ModuleType("comfy_api")
    comfy_api.latest = latest

    comfy = types.ModuleType("comfy")
    comfy.__path__ = []
    mm = _MM()
    mp = types.ModuleType("comfy.model_patcher")
    mp.ModelPatcher = ModelPatcher
    utils = types.ModuleType("comfy.utils")
    ProgressBar.updates, ProgressBar.previews = [], []
    utils.ProgressBar = ProgressBar
    comfy.model_management, comfy.model_patcher, comfy.utils = mm, mp, utils

    mods = {"comfy_api": comfy_api, "comfy_api.latest": latest, "comfy": comfy, "comfy.model_management": mm,
            "comfy.model_patcher": mp, "comfy.utils": utils, "folder_paths": _folder_paths(base_dir)}
    sys.modules.update(mods)
    return mods


def uninstall() -> None:
    for name in ("comfy_api", "comfy_api.latest", "comfy", "comfy.model_management", "comfy.model_patcher",
                 "comfy.utils", "folder_paths"):
        sys.modules.pop(name, None)


# ------------------------------------------------------------------ core's VIDEO type (appended)
# comfy_api.latest.InputImpl.VideoFromComponents / Types.VideoComponents as in ComfyUI 0.3.64 and
# 2026: a video made of an IMAGE batch and a Fraction frame rate, read back by get_components().
@dataclass
class VideoComponents:
    images: torch.Tensor
    frame_rate: object
    audio: object = None
    metadata: dict | None = None


class VideoFromComponents:
    def __init__(self, components: VideoComponents):
        self._components = components

    def get_components(self) -> VideoComponents:
        return VideoComponents(images=self._components.images, audio=self._components.audio,
                               frame_rate=self._components.frame_rate)

    def get_dimensions(self) -> tuple[int, int]:
        return self._components.images.shape[2], self._components.images.shape[1]


_install_without_video = install


def install(base_dir: str) -> dict:  # noqa: F811  (extends the install above with the VIDEO type)
    mods = _install_without_video(base_dir)
    latest = mods["comfy_api.latest"]
    latest.io.Video = _type("VIDEO")
    latest.InputImpl = types.SimpleNamespace(VideoFromComponents=VideoFromComponents)
    latest.Types = types.SimpleNamespace(VideoComponents=VideoComponents)
    return mods


# ------------------------------------------------------------------ core's latent preview path (appended)
_install_without_preview, _uninstall_without_preview = install, uninstall


def install(base_dir: str) -> dict:  # noqa: F811  (extends the installs above with latent previews)
    import comfy_stub_preview
    mods = _install_without_preview(base_dir)
    sys.modules.update(comfy_stub_preview.install(mods))
    return mods


def uninstall() -> None:  # noqa: F811
    import comfy_stub_preview
    _uninstall_without_preview()
    for name in comfy_stub_preview.MODULES:
        sys.modules.pop(name, None)
