"""Helpers the bench scripts share, one module per concern (none imports ComfyUI; only
``reference`` and ``checkpoints`` import the engine, and only when called):

- ``provenance``: what every result JSON records (command, card, date, commit, versions), writing it.
- ``checkpoints``: random checkpoints in the HF layout, written once by the engine's own writer.
- ``reference``: the diffusers pipeline recipes our profiles are measured against, stage by stage.
- ``sampling``: NVML and /proc memory of a process (or its whole tree), sampled on a thread (what nvidia-smi shows).
- ``clock``: seconds per sampling step, as the GPU finished them.
"""
