"""plan: what a run will need before it runs. The per-stage estimate (``estimate``), per-card
calibration files (``cards``, ``calibration/*.json``), the verdict with its margins (``verdict``), the
planner that picks a profile for a budget (``planner``: ``auto``) and the chart (``chart``).

May import: ``device``, ``model``, ``memory``, ``speed`` (a speed option or a cache changes memory).
"""
