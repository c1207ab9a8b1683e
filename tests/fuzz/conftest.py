"""Fixtures of the fuzz suite: the seed of a run, and real daemons started with the e2e machinery.

Every fuzz test draws its cases from one seed: ``FUZZ_SEED`` when set (to reproduce a run), else a fresh
random one. The seed is printed when the test starts, and a failing test's report names it
(``FUZZ_SEED=... pytest ...``) so the same cases can be replayed.
"""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "e2e"))

from e2e_support import Daemons, running_daemons


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Generator[None, Any, None]:
    """A failed fuzz test names its seed, and shows the log tail of every daemon it started."""
    outcome = yield
    rep = outcome.get_result()
    if not rep.failed:
        return
    seed = getattr(item, "fuzz_seed", None)
    if seed is not None:
        rep.sections.append(
            ("fuzz seed", f"reproduce with: FUZZ_SEED={seed} .venv/bin/pytest '{item.nodeid}'")
        )
    for value in getattr(item, "funcargs", {}).values():
        ds = value if isinstance(value, Daemons) else getattr(value, "daemons", None)
        if isinstance(ds, Daemons) and ds.started:
            text = "\n\n".join(f"--- {d.name} ({d.log_path})\n{d.tail(30)}" for d in ds.started)
            rep.sections.append((f"daemon logs ({rep.when})", text))


@pytest.fixture
def fuzz_seed(request: pytest.FixtureRequest) -> int:
    """The seed of this test's cases: $FUZZ_SEED, or a random one; printed, and named on failure."""
    text = os.environ.get("FUZZ_SEED", "")
    seed = int(text, 0) if text else random.SystemRandom().randrange(1 << 32)
    request.node.fuzz_seed = seed
    print(f"\n{request.node.nodeid}: FUZZ_SEED={seed}")
    return seed


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Daemons]:
    with running_daemons(tmp_path) as ds:
        yield ds
