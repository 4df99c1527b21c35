"""ComfyUI entry point of the CogVideoX image-to-video pack.

ComfyUI imports this file as a package; `comfy_entrypoint` hands it our V3 nodes. Nothing heavy
happens here: torch, diffusers and transformers are imported when a node runs.
"""
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
# The engine package `cogvid_core` lives beside this file and is imported by absolute name.
if _HERE not in sys.path:
    sys.path.append(_HERE)

try:
    from comfy_api.latest import ComfyExtension
except ImportError:  # imported outside ComfyUI (the engine's tests, library use): no nodes to offer
    ComfyExtension = None

if ComfyExtension is not None:
    class CogVidExtension(ComfyExtension):
        """ComfyUI >= 2026 awaits on_load before get_node_list; 0.3.64 has on_load but never calls it,
        so get_node_list runs it itself when it has not run (registering folders twice is harmless)."""
        _loaded = False

        async def on_load(self):
            from .nodes import common
            common.register_folders()   # models/CogVideo must exist before the loaders list models
            self._loaded = True

        async def get_node_list(self):
            if not self._loaded:
                await self.on_load()
            from .nodes import node_list
            return node_list()

    async def comfy_entrypoint():
        return CogVidExtension()

__all__ = ["comfy_entrypoint"] if ComfyExtension is not None else []
