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
