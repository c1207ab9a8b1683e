"""Entry-point helpers: exit codes, one-line errors, waiting for a stop signal."""

from __future__ import annotations

import signal
import sys
import threading
import traceback
from collections.abc import Callable

from standbylib.errors import StandbyError
from standbylib.runtime.config import ConfigError

#: Exit codes of every command (ARCHITECTURE section 6).
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def run(prog: str, body: Callable[[], int], *, debug: bool = False) -> int:
    """Run `body`; a library error becomes one line on stderr and exit code 1 (2 for configuration)."""
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


def wait_for_signal() -> int:
    """Block until SIGTERM or SIGINT; return the signal number."""
    got: list[int] = []
    stop = threading.Event()

    def handler(signum: int, frame: object) -> None:
        got.append(signum)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    while not stop.wait(1.0):
        pass
    return got[0]
