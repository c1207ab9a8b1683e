"""structlog set up once per process: JSON lines on stderr, or a console renderer on a terminal.

Events are names with fields: ``log.info("write_batch_applied", volume="vol0", seq=7, bytes=4096)``.
Standard-library logging (used by the library's modules) goes through the same renderer.

With JSON logs, what native code writes to file descriptor 2 (gRPC's core logs its own errors there,
``E1207 19:09:58.915 ... ssl_transport_security.cc:3238] No match found for server name``) is read from
a pipe and logged as ``native_log`` events, so every line of the log parses (`route_native_stderr`).
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, TextIO

import structlog

from standbylib.runtime import config as cfg

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("auto", "json", "console")


@dataclass
class LogSettings:
    """The log settings of every daemon (their configurations inherit them)."""

    log_level: str = cfg.setting("info", "log level", choices=LEVELS)
    log_format: str = cfg.setting(
        "auto", "log format (auto: console on a terminal, else JSON lines)", choices=FORMATS
    )


def configure(role: str, *, level: str = "info", fmt: str = "auto") -> None:
    """Configure structlog and stdlib logging for the process `role` (added to every event as ``role``).

    `fmt` is ``json``, ``console`` or ``auto`` (console on a terminal, JSON otherwise).
    """
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    if fmt == "json":
        route_native_stderr(role)
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=False)
        if fmt == "console"
        else structlog.processors.JSONRenderer()
    )

    def add_role(logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
        event.setdefault("role", role)
        return event

    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        add_role,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.format_exc_info,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # grpc's own logger is chatty at INFO about connectivity; our events say what matters.
    logging.getLogger("grpc").setLevel(logging.WARNING)


#: The prefix of an absl/glog line (gRPC's core): severity letter, date, time, thread, file:line.
_NATIVE = re.compile(r"^([IWEF])\d{4} [\d:.]+ +\d+ ([^\]]+)\] ?(.*)$")
_NATIVE_LEVELS = {"I": "info", "W": "warning", "E": "error", "F": "critical"}
_routed: TextIO | None = None


def route_native_stderr(role: str) -> None:
    """Make file descriptor 2 a pipe whose lines a thread logs as JSON ``native_log`` events (fields
    `text`, and `source` for gRPC's core lines); Python's own stderr (structlog, error messages) is a
    copy of the original descriptor and is written directly. Once per process; nothing when stderr is
    not descriptor 2 (in-process tests). The SIGUSR1 thread dump is written directly too: it must come
    out even when no Python thread can run."""
    global _routed
    if _routed is not None:
        return
    try:
        if sys.stderr.fileno() != 2:
            return
    except (AttributeError, OSError, ValueError):
        return
    sys.stderr.flush()
    direct = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    sys.stderr = _routed = direct
    with contextlib.suppress(OSError, ValueError):
        faulthandler.register(signal.SIGUSR1, file=direct, all_threads=True)
    threading.Thread(
        target=_forward_native, args=(read_fd, direct, role), name="native-stderr", daemon=True
    ).start()


def _forward_native(read_fd: int, out: TextIO, role: str) -> None:
    with os.fdopen(read_fd, "rb") as pipe:
        for raw in pipe:
            text = raw.decode("utf-8", "replace").rstrip()
            if not text:
                continue
            event: dict[str, Any] = {"event": "native_log", "text": text, "role": role, "level": "warning"}
            m = _NATIVE.match(text)
            if m:
                event.update(level=_NATIVE_LEVELS[m.group(1)], source=m.group(2), text=m.group(3))
            event["timestamp"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            out.write(json.dumps(event) + "\n")


def get(name: str) -> Any:
    """A structlog logger for module `name`."""
    return structlog.get_logger(name)
