"""Serving Prometheus metrics: one registry per process, an HTTP endpoint bound like every listener."""

from __future__ import annotations

import platform
import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Gauge, start_http_server


def build_info(registry: CollectorRegistry, program: str, version: str) -> None:
    """``standby_build_info{program, version, python}`` = 1: which build runs where (dashboards join on
    it; an upgrade shows as a change of labels)."""
    Gauge(
        "standby_build_info",
        "Always 1; the labels say which program and version runs, on which Python.",
        ["program", "version", "python"],
        registry=registry,
    ).labels(program, version, platform.python_version()).set(1)


# Histogram buckets for write and apply latencies, in seconds: 50 us to 10 s.
LATENCY_BUCKETS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


class MetricsServer:
    """``/metrics`` of `registry` on `address` (port 0 picks one; `address` then holds the bound one)."""

    def __init__(self, registry: CollectorRegistry, address: tuple[str, int]) -> None:
        server, thread = start_http_server(address[1], addr=address[0], registry=registry)
        self._server: WSGIServer = server
        self._thread: threading.Thread = thread
        self.address = (address[0], server.server_port)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
