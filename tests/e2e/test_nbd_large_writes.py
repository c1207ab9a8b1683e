"""One 64 MiB NBD WRITE (the largest the NBD servers accept) through the primary: applied locally,
mirrored as one op that travels alone (whatever the transport), and identical on the standby's replica;
then read back in one 64 MiB READ from the primary and from a snapshot on the standby.

The request is sent by libnbd (nbdsh, Debian package python3-libnbd), which sends a write of up to
64 MiB as one request; qemu and nbdcopy would split it.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest
from e2e_support import Daemons, Model, assert_image, sync_mode_pair

pytestmark = [pytest.mark.timeout(300), pytest.mark.both_transports]

MiB = 1 << 20
SIZE = 128 * MiB
BIG = 64 * MiB


def nbdsh(script: str) -> str:
    """Run `script` in nbdsh (the system's python3, where python3-libnbd lives); its output."""
    if shutil.which("nbdsh") is None:
        pytest.fail("nbdsh is missing: install the Debian package python3-libnbd", pytrace=False)
    env = dict(os.environ, PATH="/usr/bin:/bin:" + os.environ.get("PATH", ""))
    cp = subprocess.run(["nbdsh", "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert cp.returncode == 0, f"nbdsh failed ({cp.returncode}):\n{cp.stdout}\n{cp.stderr}"
    return cp.stdout.strip()


def test_a_64_mib_write_is_mirrored_and_read_back_whole(daemons: Daemons, tmp_path: Path) -> None:
    standby, primary = sync_mode_pair(daemons, tmp_path, size="128MiB")
    model = Model(SIZE)
    offset = 3 * MiB + 512  # not block-aligned: the mirrored op is the blocks it touches, 64 MiB + 4 KiB
    data = random.Random(64).randbytes(BIG)
    model.write(offset, data)
    digest = hashlib.sha256(data).hexdigest()
    script = f"""
import hashlib, random
h.connect_uri("{primary.uri("vol0")}")
assert h.get_block_size(nbd.SIZE_MAXIMUM) == {BIG}
data = random.Random(64).randbytes({BIG})
h.pwrite(data, {offset})
print(hashlib.sha256(h.pread({BIG}, {offset})).hexdigest())
h.shutdown()
"""
    assert nbdsh(script) == digest
    primary.wait_in_sync()
    assert_image(primary.volumes["vol0"], model.freeze(), "the primary's volume")
    assert_image(standby.replica(), model.freeze(), "the replica after one 64 MiB write")
    assert primary.metrics().get("standby_replication_connected", volume="vol0") == 1

    standby.snapshot("vol0", "big")
    read = f"""
import hashlib
h.connect_uri("{standby.uri("vol0@big")}")
print(hashlib.sha256(h.pread({BIG}, {offset})).hexdigest())
h.shutdown()
"""
    assert nbdsh(read) == digest
