"""ComfyUI adapters for the cogvid_core engine: one module per node family."""
from __future__ import annotations

from . import common


def node_list() -> list:
    from . import decode, estimate, image, loaders, sampler, text, video
    common.register_folders()
    return [*loaders.NODES, *text.NODES, *image.NODES, *sampler.NODES, *decode.NODES, *estimate.NODES,
            *video.NODES]
