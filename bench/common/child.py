"""A bench's code run in a fresh Python process (a restart, a cold start), its result read back."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MARK = "RESULT "


def run_child(code: str, argv: list, what: str, env: dict = None, timeout: int = 1800) -> dict:
    """``python -c code *argv`` from the repository root, with the repository on the path; the JSON the
    child printed after ``RESULT `` (the child's stderr tail in the error when there is none)."""
    env = dict(os.environ, **(env or {}))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    p = subprocess.run([sys.executable, "-c", code, *map(str, argv)], env=env, cwd=str(ROOT),
                       capture_output=True, text=True, timeout=timeout)
    line = next((x for x in p.stdout.splitlines() if x.startswith(MARK)), None)
    if line is None:
        raise SystemExit(f"the {what} run failed:\n{p.stderr[-4000:]}")
    return json.loads(line[len(MARK):])
