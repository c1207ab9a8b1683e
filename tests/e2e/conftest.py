"""Fixtures of the end-to-end suite (the machinery is in e2e_support.py)."""

from __future__ import annotations

from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e_support import VOLUME_SIZE, Appliance, Daemons, Model, Writer, running_daemons


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
    standby = daemons.standby()
    vol = tmp_path / "primary" / "vol0.img"
    vol.parent.mkdir()
    primary = daemons.primary(standby, {"vol0": f"{vol},size=32MiB,block-size=4096"}, "--mode", "sync")
    model = Model(VOLUME_SIZE)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    return Appliance(standby, primary, model, Writer(primary.uri("vol0"), model, scratch), tmp_path, daemons)
