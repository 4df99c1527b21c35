"""What a stretch of code imported: the modules that came into ``sys.modules`` since a snapshot."""
from __future__ import annotations

import sys


def imported_since(before: set) -> dict:
    """{"count": modules new since ``before`` (a set of sys.modules' names), "by_package": the 12 largest
    groups by their first two name parts (networkx.algorithms, torch._inductor, ...)}."""
    packages: dict = {}
    new = [m for m in sys.modules if m not in before]
    for m in new:
        top = ".".join(m.split(".")[:2])
        packages[top] = packages.get(top, 0) + 1
    return {"count": len(new), "by_package": dict(sorted(packages.items(), key=lambda x: -x[1])[:12])}
