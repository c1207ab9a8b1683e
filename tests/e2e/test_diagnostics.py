"""What an operator (or the test harness) gets from a daemon that seems to hang: `kill -USR1 PID` writes
every thread's stack to the daemon's log, and the daemon goes on serving."""

from __future__ import annotations

import signal
import time

from e2e_support import Appliance


def test_sigusr1_dumps_every_threads_stack_and_the_daemons_go_on(appliance: Appliance) -> None:
    a = appliance
    for daemon in (a.standby.daemon, a.primary.daemon):
        before = len(daemon.lines)
        daemon.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while not any('File "' in line for line in daemon.lines[before:]):
            assert time.monotonic() < deadline, f"{daemon.name} wrote no stack on SIGUSR1:\n{daemon.tail()}"
            time.sleep(0.05)
        dump = "\n".join(daemon.lines[before:])
        assert "Thread 0x" in dump and "(most recent call first)" in dump, dump[-2000:]
        assert daemon.alive(), f"{daemon.name} died on SIGUSR1"
    # Both still work: a mirrored write reaches the standby, a snapshot is taken.
    a.writer.write(0, b"after the dump".ljust(4096, b"."))
    a.primary.wait_in_sync()
    a.standby.snapshot("vol0", "after-dump")
