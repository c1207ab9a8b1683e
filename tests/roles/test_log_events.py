"""Every log event the programs emit is documented in docs/LOGS.md (operators script against them)."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("standby", "primary", "backupnode", "standbylib")
LEVELS = {"debug", "info", "warning", "error", "exception"}


def log_calls() -> Iterator[tuple[ast.expr, Path]]:
    """The first argument (the event name) of every ``log.LEVEL(...)`` call in the programs, and its file."""
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
                ):
                    yield node.args[0], path


def emitted_events() -> dict[str, str]:
    """Event name -> a source file emitting it: every ``log.LEVEL("name", ...)`` call, and every event
    written as a JSON object without structlog (``{"event": "name", ...}``: the lines of native code)."""
    events: dict[str, str] = {}
    for name, path in log_calls():
        if isinstance(name, ast.Constant) and isinstance(name.value, str) and name.value.isidentifier():
            events.setdefault(name.value, str(path.relative_to(ROOT)))
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Dict):
                    for key, value in zip(node.keys, node.values, strict=True):
                        if (
                            isinstance(key, ast.Constant)
                            and key.value == "event"
                            and isinstance(value, ast.Constant)
                            and isinstance(value.value, str)
                        ):
                            events.setdefault(value.value, str(path.relative_to(ROOT)))
    return events


def test_every_emitted_event_is_documented():
    events = emitted_events()
    assert {"listening", "ready", "mirror_disconnected", "backup_done", "volume_promoted"} <= set(events)
    doc = (ROOT / "docs" / "LOGS.md").read_text()
    missing = sorted(f"{name} ({where})" for name, where in events.items() if f"`{name}`" not in doc)
    assert not missing, f"log events missing from docs/LOGS.md: {', '.join(missing)}"


def documented_events() -> dict[str, str]:
    """Event name -> the document naming it: the first column of docs/LOGS.md's tables, and the events
    (`name` (role)) docs/TROUBLESHOOTING.md tells operators to look for."""
    found: dict[str, str] = {}
    logs = (ROOT / "docs" / "LOGS.md").read_text()
    for line in logs.splitlines():
        if not line.startswith("| `"):
            continue
        first = line.split("|")[1]
        for name in re.findall(r"`([a-z_]+)`", first):
            found.setdefault(name, "docs/LOGS.md")
    trouble = (ROOT / "docs" / "TROUBLESHOOTING.md").read_text()
    for name in re.findall(r"^\| `([a-z]+_[a-z_]+)` \((?:standby|primary|backup)", trouble, re.M):
        found.setdefault(name, "docs/TROUBLESHOOTING.md")
    return found


def dynamic_suffixes() -> set[str]:
    """Constant endings of events named by an f-string (``log.info(f"{self.what}_progress", ...)``)."""
    return {
        str(name.values[-1].value)
        for name, _path in log_calls()
        if isinstance(name, ast.JoinedStr) and isinstance(name.values[-1], ast.Constant)
    }


def test_every_documented_event_is_emitted():
    documented = documented_events()
    assert {"listening", "snapshot_invalidated", "backup_done"} <= set(documented)
    events = emitted_events()
    suffixes = dynamic_suffixes()
    never = sorted(
        f"{name} ({where})"
        for name, where in documented.items()
        if name not in events and not any(name.endswith(s) for s in suffixes)
    )
    assert not never, f"documented log events that no code emits: {', '.join(never)}"
