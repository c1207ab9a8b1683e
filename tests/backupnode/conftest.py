"""Fixtures of the backup node's tests: a real S3 server (SeaweedFS, tests/s3server.py)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from s3server import s3  # noqa: F401  (the fixture: one S3 server per test module)
