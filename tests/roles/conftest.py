"""Fixtures of the role tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from standby_rig import start_rig

from standby.node import StandbyNode

# The library tests' injectable faulty disk (`faultfile`) serves the primary's bitmap tests too, and their
# support of sparse files (`blockfiles`) the resync tests.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "standbylib"))


@pytest.fixture
def rig(tmp_path):
    r = start_rig(str(tmp_path / "standby"))
    yield r
    r.stop()
    r.node.close()


@pytest.fixture
def node(tmp_path):
    """A standby node (no server) on a data directory of its own."""
    n = StandbyNode(str(tmp_path / "data"), capacity="64MiB")
    yield n
    n.close()
