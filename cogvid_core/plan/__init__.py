"""plan: what a run will need before it runs. The per-stage estimate (``estimate``; what a speed option changes in it:
``speedmem``), per-card
calibration files (``cards``, ``calibration/*.json``), the verdict with its margins (``verdict``), the
planner that picks a profile for a budget (``planner``: ``auto``), the chart (``chart``) and the check
that a plan is for the video being made (``match``).

May import: ``device``, ``model``, ``memory``, ``speed`` (a speed option or a cache changes memory).
"""
