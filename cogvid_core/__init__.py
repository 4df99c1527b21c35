"""CogVideoX image-to-video engine: loading, memory placement, sampling, tiled decode, estimates.

Plain Python + torch + diffusers + transformers; never imports ComfyUI.
"""
__version__ = "0.1.0"
