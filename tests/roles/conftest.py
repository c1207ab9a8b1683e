"""Fixtures of the role tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from standby_rig import start_rig

# The library tests' injectable faulty disk (`faultfile`) serves the primary's bitmap tests too.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "standbylib"))


@pytest.fixture
def rig(tmp_path):
    r = start_rig(str(tmp_path / "standby"))
    yield r
    r.stop()
    r.node.close()
