"""The benches' markdown tables: one way to print a value that may be missing."""
from __future__ import annotations

GIB = 2 ** 30


def fmt(v, spec: str = ".2f") -> str:
    """``v`` formatted with ``spec``; "-" where there is no value, text as it is (an error, a note)."""
    if v is None:
        return "-"
    return format(v, spec) if isinstance(v, (int, float)) else str(v)


def gib(v) -> str:
    """Bytes as GiB with two decimals ("-" where none)."""
    return fmt(None if v is None else v / GIB)
