"""The standby's disk fills up (a file-size limit on the standby process): replication degrades to
tracking on the primary, no client write fails, and everything is resynced once space returns."""

from __future__ import annotations

import resource

import pytest
from e2e_support import Appliance, MiB, run
from faults_support import sha, wait_for

pytestmark = pytest.mark.timeout(180)


def refusals(a: Appliance) -> float:
    """Attempts of the primary the standby refused for want of space."""
    m = a.primary.metrics()
    return m.find("standby_mirror_refusals_total", volume="vol0", reason="resource_exhausted") or 0.0


def test_a_full_standby_disk_degrades_to_tracking_and_recovers(appliance: Appliance) -> None:
    a = appliance
    a.writer.fill(0, MiB, 0x10)
    a.primary.wait_in_sync()
    pid = a.standby.daemon.proc.pid
    limit = 8 * MiB
    # the soft limit only: lowering the hard one could not be undone without CAP_SYS_RESOURCE
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))  # no file grows past 8 MiB
    try:
        # writes past the limit: the standby cannot apply them; the client's writes still succeed
        run("qemu-io", "-f", "raw", "-c", "write -P 0x21 20M 1M", "-c", "write -P 0x22 24M 64k",
            "-c", "flush", a.primary.uri("vol0"))  # fmt: skip
        refused = a.standby.daemon.wait_for("batch_refused", timeout=30)
        assert "File too large" in refused["error"], refused
        lost = a.primary.daemon.wait_for("mirror_disconnected", timeout=30)
        assert "RESOURCE_EXHAUSTED" in lost["error"], lost
        assert a.primary.metrics().get("standby_out_of_sync_bytes", volume="vol0") >= MiB
        assert a.standby.daemon.alive()
        # the primary's next attempt (its resync) meets the full disk too: it stays tracking, and the
        # next write is answered all the same
        wait_for(lambda: refusals(a) >= 2, "a retry refused while the disk is full")
        run("qemu-io", "-f", "raw", "-c", "write -P 0x23 28M 64k", "-c", "flush", a.primary.uri("vol0"))
    finally:
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    # space is back: the primary's next reconnect resyncs what it tracked
    a.primary.wait_in_sync(timeout=60)
    assert sha(a.standby.replica("vol0")) == sha(a.volume_path)
    assert a.standby.status()["volumes"][0]["state"] == "uptodate"
