"""structlog set up once per process: JSON lines on stderr, or a console renderer on a terminal.

Events are names with fields: ``log.info("write_batch_applied", volume="vol0", seq=7, bytes=4096)``.
Standard-library logging (used by the library's modules) goes through the same renderer.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Any

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


def get(name: str) -> Any:
    """A structlog logger for module `name`."""
    return structlog.get_logger(name)
