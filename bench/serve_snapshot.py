"""The snapshot engine's NBD export without the rest of ``standby-daemon``, for ``bench/nbd_bench.py``
(which can also measure the daemon itself): the export's speed apart from the daemon's other work.

Opens a standby data directory as the daemon does (``DIR/preservation.store``, one replica per volume in
``DIR/replicas/VOLUME.img``, 4 KiB blocks) and exports every snapshot as ``VOLUME@SNAPSHOT`` with
`NbdServer`. Like the daemon it logs JSON lines to stderr; the event
``{"event": "listening", "service": "nbd", "address": "HOST:PORT"}`` tells the bound port. It serves
until SIGTERM or SIGINT, then closes the store::

    .venv/bin/python bench/serve_snapshot.py --data-dir DIR [--nbd-listen 127.0.0.1:0]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from collections.abc import Sequence

from standbylib.blockdev import BlockDevice, Device, open_file_device
from standbylib.errors import NotFound
from standbylib.nbd import NbdServer
from standbylib.snapshot import PreservationStore, Volume


def event(name: str, **fields: object) -> None:
    print(json.dumps({"event": name, **fields}), file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--nbd-listen", default="127.0.0.1:0", help="HOST:PORT (default: %(default)s)")
    args = parser.parse_args(argv)
    host, _, port = args.nbd_listen.rpartition(":")

    store = PreservationStore.open(os.path.join(args.data_dir, "preservation.store"))
    replicas = os.path.join(args.data_dir, "replicas")
    devices: list[Device] = []
    volumes: dict[str, Volume] = {}
    for entry in sorted(os.listdir(replicas)):
        if entry.endswith(".img"):
            device = open_file_device(os.path.join(replicas, entry))
            devices.append(device)
            volumes[entry[:-4]] = store.attach(entry[:-4], device, block_size=4096)

    def lookup(name: str) -> BlockDevice | None:
        volume, _, snapshot = name.partition("@")
        if volume not in volumes or not snapshot:
            return None
        try:
            return volumes[volume].snapshot(snapshot)
        except NotFound:
            return None

    def names() -> list[str]:
        return [f"{v}@{s.name}" for v, vol in volumes.items() for s in vol.snapshots()]

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server = NbdServer(lookup, (host, int(port)), list_exports=names)
    bound_host, bound_port = server.start()
    event("listening", service="nbd", address=f"{bound_host}:{bound_port}")
    try:
        stop.wait()
    finally:
        server.stop()
        store.close()
        for device in devices:
            device.close()
        event("stopped", service="nbd")
    return 0


if __name__ == "__main__":
    sys.exit(main())
