"""The engine example of docs/ENGINE.md runs as written and shows what it says it shows."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "engine_example.py"


def test_the_engine_example_runs_and_shows_both_refusals() -> None:
    cp = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=120)
    assert cp.returncode == 0, cp.stderr
    expected = [line for line in cp.stdout.splitlines() if line.startswith("as expected:")]
    assert len(expected) == 2, cp.stdout  # the read-only snapshot's write, the small one's overflow
    assert "bytes in use: 0" in cp.stdout
