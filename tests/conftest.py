"""Shared fixtures: tiny random CogVideoX checkpoints written once per test session."""
from __future__ import annotations

import pytest
import torch

from cogvid_core.model import variants as M
from cogvid_core.model.testing import write_checkpoints


@pytest.fixture(scope="session")
def tiny_ckpts(tmp_path_factory):
    """Both tiny variants in every on-disk layout (fp32 values, seed 0), written once (~2 s).

    Shape::

        {
          "cogvideox-5b-i2v" | "cogvideox1.5-5b-i2v": {
            "hf": Path,        # hub-layout root: model_index.json, transformer/, vae/,
                               # text_encoder/, tokenizer/, scheduler/
            "single": {        # single files, all in one folder (<root>/single/)
              "transformer": Path,              # diffusers keys, fp32
              "transformer_fp8": Path,          # kijai-style float8_e4m3fn block Linear weights
              "vae": Path,                      # diffusers keys, fp32
              "text_encoder": Path,             # ComfyUI t5xxl_*.safetensors layout (HF T5 keys)
              "text_encoder_fp8_scaled": Path,  # ComfyUI t5xxl_fp8_e4m3fn_scaled layout
              "tokenizer": Path,                # folder with spiece.model (also beside the files)
            },
          },
        }

    The single files hold exactly the same values as the "hf" folders; the T5 and tokenizer are
    identical for both variants. The temporary root is ``tiny_ckpts[key]["hf"].parent``.
    Treat everything as read-only: the whole session shares it.
    """
    root = tmp_path_factory.mktemp("tiny_ckpts")
    return {key: write_checkpoints(root, key, tiny=True, dtype=torch.float32) for key in M.VARIANTS}


@pytest.fixture(autouse=True, scope="session")
def _compile_cache_in_tmp(tmp_path_factory):
    """Compiled runs keep their kernels (speed/compile_cache.py): in the session's temp folder, never
    in the home folder of the machine running the tests."""
    import os
    os.environ["COGVID_COMPILE_CACHE"] = str(tmp_path_factory.mktemp("compile_cache"))
