"""speed: what makes a step faster without changing what it computes beyond a stated tolerance.
Attention kernels (``attention``), the speed options (``fast``), float8 matmuls (``fp8``), what ``fastest``
runs per card class (``cardclass``), torch.compile by region (``regional``) and its kernels kept across
restarts (``compile_cache``), two GPUs in one process (``multigpu``: CFG pair, components on different
cards), sequence parallel under torchrun (``seqpar``), step caches (``caches``, ``stepcache``); ``hooks``:
how each of them is entered around a module's forward.

May import: ``device``, ``model``, ``memory``. Plugs into the run through the transformer's modules and
hooks, so ``run`` imports it, never the other way.
"""
