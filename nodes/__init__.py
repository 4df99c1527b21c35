"""ComfyUI adapters for the cogvid_core engine: one module per node family."""
from __future__ import annotations


def node_list() -> list:
    """The node classes; the extension's on_load registers the model folders first."""
    from . import decode, estimate, image, loaders, lora, sampler, text, video
    return [*loaders.NODES, *lora.NODES, *text.NODES, *image.NODES, *sampler.NODES, *decode.NODES, *estimate.NODES,
            *video.NODES]
