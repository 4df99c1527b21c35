"""memory: the memory engine. Where each component's weights live during a run (``placement``:
resident / offload / stream), reading them from the user's files block by block (``filestream``,
``fileread``), the host memory a plan holds (``hostplan``), the activation savers (``activations``:
chunked feed-forward, low-memory RoPE) and the named profiles that bundle them (``profiles``).

May import: ``device``, ``model``.
"""
