"""speed: what makes a step faster without changing what it computes beyond a stated tolerance.
Attention kernels (``attention``), fp8 matmuls and the speed options (``fast``), what ``fastest`` runs per
card class (``cardclass``), torch.compile by region
(``regional``), two GPUs in one process
(``multigpu``: CFG pair, components on different cards), sequence parallel under torchrun
(``seqpar``). Step caches go here too.

May import: ``device``, ``model``, ``memory``. Plugs into the run through the transformer's modules and
hooks, so ``run`` imports it, never the other way.
"""
