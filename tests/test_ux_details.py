"""What a ComfyUI user meets around the nodes: short tooltips, shipped workflows that explain themselves
and make a new video on Run again, Save Video's frame rate without its wire, a model gone from disk."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_nodes import comfy, models_root  # noqa: F401  (fixture re-export)

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"
TOOLTIP_MAX = 350      # a tooltip says what the choice does and costs; measured numbers live in the README


def test_every_tooltip_is_short(comfy):
    nodes, _ = comfy
    long = {f"{node_id}.{i.id}": len(i.tooltip) for node_id, cls in nodes.items()
            for i in cls.GET_SCHEMA().inputs if i.tooltip and len(i.tooltip) > TOOLTIP_MAX}
    assert not long, f"tooltips over {TOOLTIP_MAX} characters: {long}"
