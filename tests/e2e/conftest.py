"""Fixtures of the end-to-end suite (the machinery is in e2e_support.py)."""

from __future__ import annotations

import sys
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

# The library tests' support of sparse files (`blockfiles`) serves these tests too, and the real S3
# server of tests/s3server.py (its `s3` fixture).
sys.path.append(str(Path(__file__).resolve().parent.parent / "standbylib"))
sys.path.append(str(Path(__file__).resolve().parent.parent))

from e2e_support import VOLUME_SIZE, Appliance, Daemons, Model, Writer, running_daemons, sync_mode_pair
from s3server import s3  # noqa: F401  (the fixture)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Generator[None, Any, None]:
    """A failed test shows the log tail of every daemon it started."""
    outcome = yield
    rep = outcome.get_result()
    ds = getattr(item, "funcargs", {}).get("daemons")
    if rep.failed and isinstance(ds, Daemons) and ds.started:
        text = "\n\n".join(f"--- {d.name} ({d.log_path})\n{d.tail(30)}" for d in ds.started)
        rep.sections.append((f"daemon logs ({rep.when})", text))


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tools that drop files in their working directory (fio's verify state) drop them in tmp_path."""
    monkeypatch.chdir(tmp_path)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests marked `both_transports` run once with the primaries' batches on the data channel and
    once on the gRPC stream (``both_transports(grpc_soak=True)``: the gRPC run under `make soak` only)."""
    marker = metafunc.definition.get_closest_marker("both_transports")
    if marker and "transport" in metafunc.fixturenames:
        grpc: Any = "grpc"
        if marker.kwargs.get("grpc_soak"):
            grpc = pytest.param("grpc", marks=pytest.mark.soak)
        metafunc.parametrize("transport", ["channel", grpc], indirect=True)


@pytest.fixture
def transport(request: pytest.FixtureRequest) -> str | None:
    """The primaries' --transport (None: their default, auto)."""
    return getattr(request, "param", None)


@pytest.fixture
def daemons(tmp_path: Path, transport: str | None) -> Iterator[Daemons]:
    with running_daemons(tmp_path, transport) as ds:
        yield ds


@pytest.fixture
def appliance(daemons: Daemons, tmp_path: Path) -> Appliance:
    standby, primary = sync_mode_pair(daemons, tmp_path)
    model = Model(VOLUME_SIZE)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    return Appliance(standby, primary, model, Writer(primary.uri("vol0"), model, scratch), tmp_path, daemons)
