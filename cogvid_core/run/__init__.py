"""run: one video from sources to frames. The stages in order (``pipeline``), the sampling loop
(``sampling``, its scheduler noise drawn ahead by ``noise_ahead``), loaded components as values with their
placements (``session``), out-of-memory and cancel handling (``guard``), the per-stage report (``report``)
and the mp4 writer (``video``).

May import every other package. Live previews: the sampling loop hands each step's middle predicted
frame to a ``preview`` callback (``sampling.sample``); the projection to RGB is ``model.latent_rgb``.
"""
