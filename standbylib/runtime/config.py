"""Typed configuration from defaults, a TOML file and command-line flags, in that order of precedence.

Each role describes its settings once, as a dataclass whose fields carry their flag, help text and
parser in `setting(...)` metadata; settings several programs share (logs, TLS) are dataclasses the
roles' configurations inherit (`logs.LogSettings`, `tls.ClientTlsSettings`, `tls.NbdTlsSettings`).
`add_options` turns that into argparse options (so ``--help`` shows every default), and `resolve`
merges ``--config FILE`` and the flags into an instance, checking each value against the field's type
(``data_dir = 5`` in a file is a usage error, not a surprise later). TOML keys are the field names
(``data_dir = "/var/lib/standby"``); `show` renders the effective configuration as TOML, which
`--show-config` prints and `--config` accepts back.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import tomllib
import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar

from standbylib.errors import InvalidArgument, StandbyError

T = TypeVar("T")


class ConfigError(StandbyError):
    """The configuration is unusable: exit code 2 (a usage error)."""

    template = "{detail}"


def setting(
    default: Any,
    help: str,
    *,
    flag: str | None = None,
    parse: Callable[[str], Any] | None = None,
    metavar: str | None = None,
    choices: tuple[str, ...] | None = None,
    repeat: bool = False,
    env: str | None = None,
) -> Any:
    """A dataclass field that is also a command-line option (``--field-name`` unless `flag` is given).

    `repeat` makes a list setting whose flag may be given several times. `env` names an environment
    variable that sets it, for the programs that read the environment (`resolve`'s `environment`).
    """
    meta = {
        "help": help,
        "flag": flag,
        "parse": parse,
        "metavar": metavar,
        "choices": choices,
        "repeat": repeat,
        "env": env,
    }
    if repeat or isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _flag(f: dataclasses.Field[Any]) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def settings_of(cls: type[Any]) -> list[dataclasses.Field[Any]]:
    """The fields of the dataclass `cls`: its own first, then those of each base it inherits, nearest
    first (the order of ``--help`` and ``--show-config``)."""
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    ordered: dict[str, dataclasses.Field[Any]] = {}
    for klass in cls.__mro__:
        for name in inspect.get_annotations(klass):
            if name in by_name:
                ordered.setdefault(name, by_name[name])
    return list(ordered.values())


def add_options(
    parser: argparse.ArgumentParser,
    cls: type[Any],
    *,
    files: bool = True,
    title: str = "settings (also accepted as keys of the --config TOML file)",
    environment: bool = False,
) -> None:
    """Add one option per field of the dataclass `cls`, plus ``--config`` and ``--show-config`` unless
    `files` is False (a program that takes its settings from flags only). With `environment` the help
    names each setting's environment variable."""
    group = parser.add_argument_group(title)
    for f in settings_of(cls):
        meta = f.metadata
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        shown = "none" if default in (None, [], "") else default
        if isinstance(default, tuple):
            shown = format_address(default)
        env = f" or ${meta['env']}" if environment and meta.get("env") else ""
        kwargs: dict[str, Any] = {
            "dest": f.name,
            "default": None,
            "help": f"{meta['help']} (default: {shown}{env})".replace("%", "%%"),
        }
        if isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["metavar"] = meta.get("metavar") or (
                "|".join(meta["choices"]) if meta.get("choices") else f.name.upper()
            )
            if meta.get("choices"):
                kwargs["choices"] = meta["choices"]
            if meta.get("repeat"):
                kwargs["action"] = "append"
        group.add_argument(_flag(f), **kwargs)
    if not files:
        return
    parser.add_argument("--config", metavar="FILE", help="read settings from this TOML file; flags win")
    parser.add_argument(
        "--show-config", action="store_true", help="print the effective configuration as TOML and exit"
    )


def resolve(cls: type[T], args: argparse.Namespace, *, environment: bool = False) -> T:
    """The configuration: dataclass defaults, then the ``--config`` file, then (with `environment`) the
    settings' environment variables, then flags."""
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}  # where a value that is not a flag's came from, for error messages
    names = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    if getattr(args, "config", None):
        try:
            with open(args.config, "rb") as fh:
                data = tomllib.load(fh)
        except OSError as e:
            raise ConfigError(detail=f"cannot read --config {args.config}: {e.strerror}") from e
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(detail=f"--config {args.config} is not valid TOML: {e}") from e
        for key, value in data.items():
            name = key.replace("-", "_")
            if name not in names:
                known = ", ".join(sorted(names))
                raise ConfigError(detail=f"--config {args.config}: unknown setting {key!r} (known: {known})")
            values[name] = value
            origin[name] = f" (in --config {args.config})"
    if environment:
        for name, f in names.items():
            env = f.metadata.get("env")
            if env and os.environ.get(env):
                values[name] = os.environ[env]
                origin[name] = f" (from ${env})"
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            values[name] = value
            origin.pop(name, None)
    for name, value in list(values.items()):
        choices = names[name].metadata.get("choices")
        if choices and value not in choices:
            where = f"{_flag(names[name])}{origin.get(name, '')}"
            raise ConfigError(detail=f"{where}: {value!r} is not one of {', '.join(choices)}")
        parse = names[name].metadata.get("parse")
        if parse is None or value is None:
            continue
        try:
            values[name] = [parse(v) for v in value] if isinstance(value, list) else parse(value)
        except (StandbyError, ValueError) as e:
            raise ConfigError(detail=f"{_flag(names[name])}{origin.get(name, '')}: {e}") from e
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        if not _conforms(value, hints.get(name, Any)):
            source = origin.get(name, "")
            raise ConfigError(detail=f"{_flag(names[name])}: {value!r} is not {_kind(hints[name])}{source}")
    return cls(**values)


def _conforms(value: Any, hint: Any) -> bool:
    """Whether `value` (after its field's parser) is of the type `hint` of the field."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, a) for a in args)
    if hint is type(None):
        return value is None
    if origin is list:
        return isinstance(value, list) and all(_conforms(v, args[0]) for v in value)
    if origin is tuple:
        return (
            isinstance(value, tuple)
            and len(value) == len(args)
            and all(_conforms(v, a) for v, a in zip(value, args, strict=True))
        )
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _kind(hint: Any) -> str:
    """`hint` in words, for an error message."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_kind(a) for a in args if a is not type(None))
    if origin is list:
        return f"a list of {_kind(args[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin is tuple:
        return "an address HOST:PORT"
    words = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}
    return words.get(hint, f"a {getattr(hint, '__name__', hint)}")


def show(config: Any) -> str:
    """The configuration as TOML (strings, numbers, booleans and lists of them)."""
    lines = []
    for f in settings_of(type(config)):
        value = getattr(config, f.name)
        if value is None:
            lines.append(f"# {f.name} is not set")
            continue
        lines.append(f"{f.name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, tuple) and len(value) == 2:
        return json.dumps(format_address(value))
    if hasattr(value, "spec"):
        return json.dumps(str(value.spec))
    return json.dumps(str(value))


# -- parsers ---------------------------------------------------------------------------------------------


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6); port 0 picks a free port."""
    host, sep, port = str(text).rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise InvalidArgument(detail=f"address {text!r} must be HOST:PORT, e.g. 127.0.0.1:7700")
    return host, int(port)


def reachable(reported: str, via: str) -> str:
    """The listener address a daemon reported (``HOST:PORT``), as a client that reached the daemon at
    `via` (``HOST:PORT``) should connect to it: a wildcard host (``0.0.0.0``, ``::``, bound to every
    address) means the host the client already reaches."""
    host, port = parse_address(reported)
    if host not in ("0.0.0.0", "::"):
        return reported
    return format_address((parse_address(via)[0], port))


def format_address(address: tuple[str, int]) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def check_directory(path: str, flag: str) -> None:
    """`path` is a directory this process may write, or one it may create (`ConfigError` if not)."""
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise ConfigError(detail=f"{flag} {path} is not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError(detail=f"{flag} {path} is not writable by this user")
        return
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(
            detail=f"{flag} {path} does not exist and cannot be created ({parent} is not writable)"
        )
