"""The backup node's progress bar on a terminal: drawn whatever size the terminal reports, a pty nobody
sized (0 columns) included."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
import time

import pytest

SHOW = """
import time
from backupnode.progress import Progress
p = Progress("backup", enabled=True)
p.start(64 << 20)
for _ in range(64):
    p.advance(1 << 20)
    time.sleep(0.01)
p.close()
"""


def drawn_on_a_pty(rows: int, cols: int) -> str:
    """What the progress of a 64 MiB job writes to a pty of `rows` x `cols`."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    proc = subprocess.Popen([sys.executable, "-c", SHOW], stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    out = b""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the pty
            break
        if not chunk:
            break
        out += chunk
    proc.wait(30)
    os.close(master)
    return out.decode("utf-8", "replace")


@pytest.mark.parametrize(("rows", "cols"), [(24, 100), (0, 0)])
def test_the_bar_is_drawn_whatever_size_the_terminal_reports(rows: int, cols: int) -> None:
    text = drawn_on_a_pty(rows, cols)
    last = text.replace("\r", "\n").strip().splitlines()[-1]
    assert "backup: 100%|" in last and "64.0M/64.0M" in last, repr(text[-400:])
    assert "█" in last, f"no bar in {last!r}"
