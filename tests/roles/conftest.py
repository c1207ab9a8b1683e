"""Fixtures of the role tests."""

from __future__ import annotations

import pytest
from standby_rig import start_rig


@pytest.fixture
def rig(tmp_path):
    r = start_rig(str(tmp_path / "standby"))
    yield r
    r.stop()
    r.node.close()
