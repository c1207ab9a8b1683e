"""Entry-point helpers: exit codes, one-line errors, waiting for a stop signal."""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

from standbylib.errors import StandbyError
from standbylib.runtime import config as cfg
from standbylib.runtime import logs
from standbylib.runtime.config import ConfigError

C = TypeVar("C")

#: Exit codes of every command (docs/ARCHITECTURE.md, The contracts).
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def run(prog: str, body: Callable[[], int], *, debug: bool = False) -> int:
    """Run `body`; a library error becomes one line on stderr and exit code 1 (2 for configuration).

    ``kill -USR1 PID`` makes any of the programs write every thread's stack to stderr (its log) and go
    on: what a process that hangs is waiting for."""
    with contextlib.suppress(OSError, ValueError):  # stderr without a file descriptor (in-process tests)
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        return body()
    except ConfigError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except StandbyError as e:
        if debug:
            traceback.print_exc()
        print(f"{prog}: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


class StopSignal:
    """SIGTERM and SIGINT handlers, installed at once, so a stop during start-up is a clean stop too."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signum = 0
        signal.signal(signal.SIGTERM, self._handler)
        signal.signal(signal.SIGINT, self._handler)

    def _handler(self, signum: int, frame: object) -> None:
        self.signum = signum
        self.event.set()

    def wait(self, timeout: float | None = None) -> bool:
        """True once a stop signal arrived (within `timeout` seconds when given)."""
        if timeout is not None:
            return self.event.wait(timeout)
        while not self.event.wait(1.0):
            pass
        return True


def gather(*steps: Callable[[], object]) -> list[str]:
    """Run each check of `steps`; the message of every one that raised a configuration, library or OS
    error (each check runs, whatever the others found)."""
    problems: list[str] = []
    for step in steps:
        try:
            step()
        except (StandbyError, OSError, ValueError) as e:
            if str(e) not in problems:  # (two checks may read the same file)
                problems.append(str(e))
    return problems


def daemon_parser(
    prog: str,
    description: str,
    config: type[Any],
    check: Callable[[Any], list[str]] | None = None,
) -> argparse.ArgumentParser:
    """The command line of a daemon: one option per setting of `config`, ``--config``,
    ``--show-config``, ``--check-config`` (with `check`), ``--debug``, ``--version``."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog="Stop it with SIGTERM or Ctrl-C. Exit codes: 0 ok, 1 failed, 2 usage or configuration error.",
    )
    cfg.add_options(parser, config)
    if check is not None:
        parser.add_argument(
            "--check-config",
            action="store_true",
            help="check the configuration on this host (files readable, certificates valid and matching "
            "their keys, directories usable, sizes possible), print every problem and exit: 0 when there "
            "is none, 1 otherwise",
        )
    parser.add_argument("--debug", action="store_true", help="print tracebacks with errors")
    add_version(parser)
    return parser


def daemon_main(
    prog: str,
    description: str,
    config: type[C],
    role: str,
    serve: Callable[[C], int],
    argv: list[str] | None = None,
    check: Callable[[C], list[str]] | None = None,
) -> int:
    """The entry point of a daemon: options from the `config` dataclass (plus ``--config``,
    ``--show-config``, ``--check-config``, ``--debug``), logging configured for `role`, then `serve` with
    the configuration. `check` lists what is wrong with a configuration on this host.

    `config` must have ``log_level`` and ``log_format`` settings.
    """
    parser = daemon_parser(prog, description, config, check)
    args = parser.parse_args(argv)

    def body() -> int:
        conf: Any = cfg.resolve(config, args)
        if args.show_config:
            sys.stdout.write(cfg.show(conf))
            return EXIT_OK
        if check is not None and args.check_config:
            problems = check(conf)
            for problem in problems:
                print(f"{prog}: {problem}")
            count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
            print(f"{prog}: {count} in the configuration" if problems else f"{prog}: configuration OK")
            return EXIT_FAILED if problems else EXIT_OK
        logs.configure(role, level=conf.log_level, fmt=conf.log_format)
        return serve(conf)

    return run(prog, body, debug=args.debug)


def package_version() -> str:
    """The installed version of the appliance ("unknown" when it runs from a tree not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("standby-appliance")
    except PackageNotFoundError:
        return "unknown"


def add_version(parser: argparse.ArgumentParser) -> None:
    """``--version``: print ``PROG VERSION`` and exit 0."""
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {package_version()}", help="print the version"
    )
