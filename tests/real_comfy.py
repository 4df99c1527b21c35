"""Tests against a real ComfyUI checkout (COMFYUI_DIR; COMFYUI_PYTHON: a python that can import it, and
pytest: the script is the test file itself, e.g. `COMFYUI_PYTHON=venv/bin/python`, `venv/bin/python -m pip install pytest`).

Each such test runs a script in a fresh process (ComfyUI reads its arguments and sets global state at
import): :func:`run_script` starts it and reads the JSON it prints last; inside it, :func:`enter` makes
the checkout importable on the CPU with the test's model folders registered."""
from __future__ import annotations

import json
import os
import subprocess
import sys

MODEL_FOLDERS = ("CogVideo", "diffusion_models", "text_encoders", "vae")


def run_script(script, *args, timeout: float = 900, context=lambda: "") -> dict:
    """``script COMFYUI_DIR *args`` with COMFYUI_PYTHON (else this python); fails with its stderr tail (and
    ``context()``) unless it exits 0; returns its last stdout line as JSON."""
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    proc = subprocess.run([python, str(script), os.environ["COMFYUI_DIR"], *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:] + context()
    return json.loads(proc.stdout.strip().splitlines()[-1])


def enter(comfy_dir: str, base: str) -> None:
    """In the script's process: ComfyUI's checkout importable, on the CPU (core reads its arguments when
    model_management is imported), and ``base``/models/<folder> registered for the pack's loaders."""
    sys.path.insert(0, comfy_dir)
    os.chdir(comfy_dir)
    sys.argv = ["main.py", "--cpu"]
    import comfy.options
    comfy.options.enable_args_parsing()
    import folder_paths
    for sub in MODEL_FOLDERS:
        folder_paths.add_model_folder_path(sub, os.path.join(base, "models", sub), is_default=True)
