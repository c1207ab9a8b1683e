"""Every log event the programs emit is documented in docs/LOGS.md (operators script against them)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("standby", "primary", "backupnode", "standbylib")
LEVELS = {"debug", "info", "warning", "error", "exception"}


def emitted_events() -> dict[str, str]:
    """Event name -> a source file emitting it: every ``log.LEVEL("name", ...)`` call."""
    events: dict[str, str] = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if "rpc/v1" in str(path):
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr in LEVELS
                    and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "log"
                    and node.args
                    and isinstance(node.args[0], ast.Constant)
                    and isinstance(node.args[0].value, str)
                    and node.args[0].value.isidentifier()
                ):
                    events.setdefault(node.args[0].value, str(path.relative_to(ROOT)))
    return events


def test_every_emitted_event_is_documented():
    events = emitted_events()
    assert {"listening", "ready", "mirror_disconnected", "backup_done", "volume_promoted"} <= set(events)
    doc = (ROOT / "docs" / "LOGS.md").read_text()
    missing = sorted(f"{name} ({where})" for name, where in events.items() if f"`{name}`" not in doc)
    assert not missing, f"log events missing from docs/LOGS.md: {', '.join(missing)}"
