"""Benchmark of a FUA-heavy write trace through a writable snapshot export of the standby daemon, against
the same trace through a peer export, same client, same run.

The trace is like an integrity test of an NBD client (``nbd-tester-client -i``, libnbd's tests): about
50 MiB written as a mix of 4 KiB to 1 MiB writes, most of them small, at 4 KiB-aligned offsets that do
not overlap, in random order; about 1,200 of them are durable before they are acknowledged (a FUA write,
or a write followed by NBD_CMD_FLUSH), the rest are plain writes; one flush ends the trace. Several
requests are in flight: `--clients` connections (threads), each sending its next request once the
previous one is answered, take the requests in trace order.

Targets:

* ``ours``: the export ``vol0@bench`` of a real standby daemon, a snapshot created with ``standbyctl
  snapshot create vol0 bench --writable`` once the primary replicated vol0;
* peers: ``primary``, the primary's own export of a second volume (vol1, mirrored in sync mode to the
  same standby); ``file``, the same NBD server (`standbylib.nbd.NbdServer`, in a process of its own:
  this script with ``--serve-file``) exporting a plain file, i.e. the origin without the snapshot path;
  and ``nbdkit``, ``nbdkit file`` on a sparse file of the same size.

Every target first takes one untimed pass (so timed passes overwrite written blocks everywhere), then
passes alternate ours/peer (the order flipping every pair) and the medians are reported, with the
median of the pairwise time ratios ours / peer (target <= 2). The last pass on each target is read back
and checked.

Sync latency: a FUA write costs what a sync costs, and that depends on the disk far more than on the
software (here a write-cached virtual disk syncs in well under a millisecond; a disk that flushes its
cache takes tens of milliseconds). Each ``--sync-delays-ms`` value is one rig whose daemons, nbdkit
included, all run with a small ``LD_PRELOAD`` library (built with ``cc``) that makes every
``fdatasync`` and ``fsync`` take that much longer: 0 measures the disk as it is, 20 a disk whose cache
flush takes 20 ms. Every target pays the same per sync, so the ratio shows how many syncs each one
waits for in a row; concurrent syncs overlap completely, which favours a peer that syncs once per
request from several threads at once.

::

    .venv/bin/python bench/writable_bench.py --output bench/results/writable.json
    .venv/bin/python bench/writable_bench.py --quick      # 16 MiB trace, 3 pairs, file and nbdkit peers

The JSON document goes to stdout (and to ``--output``); progress goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import (
    BIN,
    Daemon,
    emit,
    free_port,
    header,
    log,
    machine,
    median,
    paired,
    start_nbdkit_file,
    start_primary,
    start_standby,
    tool_version,
)

from standbylib.blockdev import open_file_device
from standbylib.nbd import NbdServer
from standbylib.nbd import protocol as p
from standbylib.nbd.client import NbdClient

KiB = 1 << 10
MiB = 1 << 20
BLOCK = 4 * KiB

FUA = "fua"  # a write with NBD_CMD_FLAG_FUA
FLUSH = "flush"  # a write, then NBD_CMD_FLUSH once it is answered
PLAIN = "plain"


@dataclass(frozen=True)
class Request:
    offset: int
    length: int
    source: int  # where its data starts in the trace's pattern
    kind: str


@dataclass(frozen=True)
class Trace:
    requests: list[Request]
    pattern: bytes  # data of the writes: `pattern[source : source + length]`

    @property
    def bytes(self) -> int:
        return sum(r.length for r in self.requests)

    def count(self, kind: str) -> int:
        return sum(1 for r in self.requests if r.kind == kind)

    def describe(self) -> dict[str, Any]:
        sizes = sorted(r.length for r in self.requests)
        return {
            "requests": len(self.requests),
            "bytes": self.bytes,
            "fua_writes": self.count(FUA),
            "writes_then_flush": self.count(FLUSH),
            "plain_writes": self.count(PLAIN),
            "write_size_min": sizes[0],
            "write_size_median": sizes[len(sizes) // 2],
            "write_size_max": sizes[-1],
        }


def make_trace(seed: int, total: int, volume_size: int, durable_share: float = 0.8) -> Trace:
    """Writes of 4 KiB x 2^k (k = 0..8, weighted 0.6^k: most are small) until `total` bytes, placed
    without overlap at random 4 KiB-aligned offsets of the volume, in random order; `durable_share` of
    them FUA (three quarters) or followed by a flush (the rest)."""
    rng = random.Random(seed)
    weights = [0.6**k for k in range(9)]
    lengths: list[int] = []
    while sum(lengths) < total:
        lengths.append(BLOCK << rng.choices(range(9), weights)[0])
    # Non-overlapping: cut the volume into the writes plus gaps, then shuffle the order of the writes.
    spare = (volume_size - sum(lengths)) // BLOCK
    if spare < 0:
        raise ValueError(f"a trace of {sum(lengths)} bytes does not fit a volume of {volume_size}")
    cuts = sorted(rng.randrange(spare + 1) for _ in lengths)
    requests = []
    pos = prev = 0
    pattern_size = 4 * MiB
    for length, cut in zip(lengths, cuts, strict=True):
        pos += (cut - prev) * BLOCK
        prev = cut
        r = rng.random()
        kind = PLAIN if r >= durable_share else FUA if r < durable_share * 0.75 else FLUSH
        source = rng.randrange((pattern_size - length) // BLOCK + 1) * BLOCK
        requests.append(Request(pos, length, source, kind))
        pos += length
    rng.shuffle(requests)
    return Trace(requests, rng.randbytes(pattern_size))


# -- a minimal NBD writer -----------------------------------------------------------------------------------


class NbdWriter:
    """One connection: NBD_OPT_EXPORT_NAME, simple replies, one request at a time."""

    def __init__(self, host: str, port: int, export: str) -> None:
        self.sock = socket.create_connection((host, port), timeout=120)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _magic, opts_magic, flags = p.GREETING.unpack(self._recv(p.GREETING.size))
        if opts_magic != p.OPTS_MAGIC or not flags & p.FLAG_FIXED_NEWSTYLE:
            raise RuntimeError(f"{host}:{port} is not a fixed newstyle NBD server")
        client = p.FLAG_C_FIXED_NEWSTYLE | (p.FLAG_C_NO_ZEROES if flags & p.FLAG_NO_ZEROES else 0)
        name = export.encode()
        self.sock.sendall(
            p.CLIENT_FLAGS.pack(client)
            + p.OPTION_HEADER.pack(p.OPTS_MAGIC, p.OPT_EXPORT_NAME, len(name))
            + name
        )
        self.size, tflags = p.EXPORT_NAME_REPLY.unpack(self._recv(p.EXPORT_NAME_REPLY.size))
        if not client & p.FLAG_C_NO_ZEROES:
            self._recv(124)
        if tflags & p.FLAG_READ_ONLY or not tflags & p.FLAG_SEND_FUA or not tflags & p.FLAG_SEND_FLUSH:
            raise RuntimeError(f"export {export!r} is read-only or takes no FUA/flush (flags {tflags:#x})")
        self.cookie = 0

    def _recv(self, n: int) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = self.sock.recv_into(view[got:])
            if not k:
                raise ConnectionError("the NBD server closed the connection")
            got += k
        return bytes(buf)

    def write(self, offset: int, data: memoryview, *, fua: bool) -> None:
        self.cookie += 1
        flags = p.CMD_FLAG_FUA if fua else 0
        header = p.REQUEST.pack(p.REQUEST_MAGIC, flags, p.CMD_WRITE, self.cookie, offset, len(data))
        if len(data) <= 64 * KiB:
            self.sock.sendall(header + data)
        else:
            self.sock.sendall(header)
            self.sock.sendall(data)
        self._reply(p.CMD_WRITE, offset)

    def flush(self) -> None:
        self.cookie += 1
        self.sock.sendall(p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.CMD_FLUSH, self.cookie, 0, 0))
        self._reply(p.CMD_FLUSH, 0)

    def _reply(self, command: int, offset: int) -> None:
        magic, error, cookie = p.SIMPLE_REPLY.unpack(self._recv(p.SIMPLE_REPLY.size))
        if magic != p.SIMPLE_REPLY_MAGIC or cookie != self.cookie:
            raise RuntimeError(f"unexpected reply {magic:#x} cookie {cookie}")
        if error:
            raise RuntimeError(f"NBD command {command} at {offset} failed: errno {error}")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.CMD_DISC, 0, 0, 0))
        self.sock.close()


def replay(address: str, export: str, trace: Trace, clients: int) -> dict[str, Any]:
    """Replay `trace` on `clients` connections; the seconds from the first request to the last reply."""
    host, port = address.rsplit(":", 1)
    writers = [NbdWriter(host, int(port), export) for _ in range(clients)]
    pattern = memoryview(trace.pattern)
    requests = trace.requests
    lock = threading.Lock()
    next_request = [0]
    errors: list[BaseException] = []
    latencies: list[float] = []

    def work(w: NbdWriter) -> None:
        try:
            while True:
                with lock:
                    i = next_request[0]
                    next_request[0] += 1
                if i >= len(requests) or errors:
                    return
                r = requests[i]
                t0 = time.perf_counter()
                w.write(r.offset, pattern[r.source : r.source + r.length], fua=r.kind == FUA)
                if r.kind == FLUSH:
                    w.flush()
                if r.kind != PLAIN:
                    latencies.append(time.perf_counter() - t0)
        except BaseException as e:  # reported by the caller
            errors.append(e)

    threads = [threading.Thread(target=work, args=(w,)) for w in writers]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if not errors:
        writers[0].flush()
    seconds = time.perf_counter() - t0
    for w in writers:
        w.close()
    if errors:
        raise RuntimeError(f"replay on {address}/{export} failed: {errors[0]}") from errors[0]
    latencies.sort()
    return {
        "seconds": round(seconds, 3),
        "mb_per_s": round(trace.bytes / seconds / 1e6, 2),
        "durable_p50_ms": round(latencies[len(latencies) // 2] * 1e3, 2),
        "durable_p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1e3, 2),
    }


def verify(address: str, export: str, trace: Trace) -> bool:
    """Every write of the trace reads back from the export."""
    host, port = address.rsplit(":", 1)
    with NbdClient.connect(host, int(port), export) as client:
        for r in sorted(trace.requests, key=lambda r: r.offset):
            if client.read(r.offset, r.length) != trace.pattern[r.source : r.source + r.length]:
                log(f"{export}: [{r.offset}, +{r.length}) does not read back what was written")
                return False
    return True


# -- slow syncs ---------------------------------------------------------------------------------------------

SLOW_SYNC_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <time.h>

/* Every fdatasync and fsync of the process takes SYNC_DELAY_US microseconds longer. */
static void slow(void) {
    static long us = -1;
    if (us < 0) {
        const char *s = getenv("SYNC_DELAY_US");
        us = s ? atol(s) : 0;
    }
    if (us > 0) {
        struct timespec ts = {us / 1000000, (us % 1000000) * 1000};
        while (nanosleep(&ts, &ts) != 0) {
        }
    }
}

int fdatasync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    int r = real(fd);
    slow();
    return r;
}

int fsync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    int r = real(fd);
    slow();
    return r;
}
"""


def build_slow_sync(work: Path) -> Path:
    """The LD_PRELOAD library that delays syncs (see the module docstring)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        sys.exit("a sync delay needs a C compiler (cc) to build its LD_PRELOAD library")
    source, lib = work / "slowsync.c", work / "slowsync.so"
    source.write_text(SLOW_SYNC_C)
    subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(lib), str(source), "-ldl"], check=True)
    return lib


class SlowSyncs:
    """While active, processes started by this one sync `delay_ms` more slowly."""

    def __init__(self, lib: Path | None, delay_ms: float) -> None:
        self.env = {"LD_PRELOAD": str(lib), "SYNC_DELAY_US": str(round(delay_ms * 1000))} if delay_ms else {}
        self.saved: dict[str, str | None] = {}

    def __enter__(self) -> SlowSyncs:
        for key, value in self.env.items():
            self.saved[key] = os.environ.get(key)
            os.environ[key] = value
        return self

    def __exit__(self, *exc: object) -> None:
        for key, value in self.saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# -- the rig ------------------------------------------------------------------------------------------------


def scrape(daemon: Daemon, name: str, volume: str) -> float:
    text = urllib.request.urlopen(f"http://{daemon.addresses['metrics']}/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(name + "{") and f'volume="{volume}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return -1.0


def wait_in_sync(primary: Daemon, volumes: list[str], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    for volume in volumes:
        while not (
            scrape(primary, "standby_replication_connected", volume) == 1
            and scrape(primary, "standby_resync_remaining_bytes", volume) == 0
            and scrape(primary, "standby_out_of_sync_bytes", volume) == 0
        ):
            if time.monotonic() > deadline:
                states = {n: scrape(primary, n, volume) for n in ("standby_replication_connected",
                          "standby_resync_remaining_bytes", "standby_out_of_sync_bytes")}  # fmt: skip
                raise RuntimeError(f"the primary did not get {volume} in sync: {states}")
            time.sleep(0.05)


def serve_file(path: str) -> int:
    """``--serve-file PATH``: export PATH read-write as "" with `NbdServer` until SIGTERM, logging the
    JSON events `Daemon` waits for."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    device = open_file_device(path)
    server = NbdServer({"": device})
    host, port = server.start()
    for event in ({"event": "listening", "service": "nbd", "address": f"{host}:{port}"}, {"event": "ready"}):
        print(json.dumps(event), file=sys.stderr, flush=True)
    try:
        stop.wait()
    finally:
        server.stop()
        device.close()
    return 0


class Rig:
    """A standby and a primary with two volumes (vol0, whose writable snapshot is measured, and vol1,
    the primary's peer export), our NBD server on a plain file, and nbdkit file on a file of the same
    size."""

    def __init__(self, work: Path, size: int, peers: list[str]) -> None:
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        self.standby = start_standby(work / "standby", "--preservation-capacity", "4GiB")
        self.primary: Daemon | None = None
        self.file: Daemon | None = None
        self.nbdkit: subprocess.Popen[bytes] | None = None
        try:
            volumes = [f"vol0={work / 'vol0.img'},size={size}", f"vol1={work / 'vol1.img'},size={size}"]
            self.primary = start_primary(volumes, self.standby.addresses["grpc"], work / "primary.log")
            wait_in_sync(self.primary, ["vol0", "vol1"])
            subprocess.run(
                [str(BIN / "standbyctl"), "--standby", self.standby.addresses["grpc"], "snapshot", "create",
                 "vol0", "bench", "--writable"],
                check=True, capture_output=True,
            )  # fmt: skip
            self.ours = (self.standby.addresses["nbd"], "vol0@bench")
            self.targets = {"ours": self.ours}
            if "primary" in peers:
                self.targets["primary"] = (self.primary.addresses["nbd"], "vol1")
            if "file" in peers:
                file_path = work / "file.img"
                with open(file_path, "wb") as f:
                    f.truncate(size)
                argv = [sys.executable, str(Path(__file__).resolve()), "--serve-file", str(file_path)]
                self.file = Daemon("file export", argv, work / "file.log")
                self.targets["file"] = (self.file.addresses["nbd"], "")
            if "nbdkit" in peers:
                peer_path = work / "nbdkit.img"
                with open(peer_path, "wb") as f:
                    f.truncate(size)
                port = free_port()
                self.nbdkit = start_nbdkit_file(peer_path, port)
                self.targets["nbdkit"] = (f"127.0.0.1:{port}", "")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.nbdkit is not None:
            self.nbdkit.terminate()
            self.nbdkit.wait()
        if self.file is not None:
            self.file.stop()
        if self.primary is not None:
            self.primary.stop()
        self.standby.stop()


def measure(rig: Rig, trace: Trace, peers: list[str], pairs: int, clients: int, delay_ms: float) -> list[Any]:
    """The figures of one rig: ours against each peer."""
    for name, (address, export) in rig.targets.items():
        log(f"sync delay {delay_ms} ms: untimed first pass on {name}")
        replay(address, export, trace, clients)
    ours_address, ours_export = rig.ours
    figures = []
    for peer in peers:
        address, export = rig.targets[peer]
        fig = paired(
            f"sync delay {delay_ms} ms: writable snapshot vs {peer}", pairs,
            lambda: replay(ours_address, ours_export, trace, clients),
            lambda address=address, export=export: replay(address, export, trace, clients),
            "seconds", True, peer_name=peer,
        )  # fmt: skip
        fig.update(
            id=f"fua_trace_writable_snapshot_vs_{peer}_sync_delay_{delay_ms:g}ms",
            what=f"{trace.bytes // MiB} MiB trace, {len(trace.requests)} writes ({trace.count(FUA)} FUA, "
            f"{trace.count(FLUSH)} followed by a flush), {clients} connections, every sync delayed by "
            f"{delay_ms:g} ms: seconds through the writable snapshot export vs {peer}",
            sync_delay_ms=delay_ms,
            ratio_is="ours seconds / peer seconds (median of the pairwise ratios)",
            target="<= 2",
            ours_durable_p50_ms=median([r["ours"]["durable_p50_ms"] for r in fig["pairs"]]),
            peer_durable_p50_ms=median([r[peer]["durable_p50_ms"] for r in fig["pairs"]]),
            ours_reads_back=verify(ours_address, ours_export, trace),
            peer_reads_back=verify(address, export, trace),
        )
        fig["pass"] = fig["ratio"] <= 2 and fig["ours_reads_back"] and fig["peer_reads_back"]
        figures.append(fig)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", help="also write the JSON document to this file")
    parser.add_argument("--quick", action="store_true", help="16 MiB trace, 3 pairs, file and nbdkit peers")
    parser.add_argument("--pairs", type=int, help="timed pairs per peer (default 5, quick 3)")
    parser.add_argument("--mib", type=int, help="MiB written by the trace (default 50, quick 16)")
    parser.add_argument("--clients", type=int, default=8, help="connections, one request in flight each")
    parser.add_argument(
        "--peers", help="comma-separated: primary, file, nbdkit (default all; quick: file, nbdkit)"
    )
    parser.add_argument(
        "--sync-delays-ms", default="0,20", help="comma-separated; one rig each (default 0,20; see above)"
    )
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--dir", help="work directory (default: under /var/tmp)")
    parser.add_argument("--serve-file", metavar="PATH", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_file:
        return serve_file(args.serve_file)
    total = (args.mib or (16 if args.quick else 50)) * MiB
    pairs = args.pairs or (3 if args.quick else 5)
    default_peers = ["file", "nbdkit"] if args.quick else ["primary", "file", "nbdkit"]
    peers = args.peers.split(",") if args.peers else default_peers
    delays = [float(d) for d in args.sync_delays_ms.split(",")]
    if "nbdkit" in peers and shutil.which("nbdkit") is None:
        sys.exit("nbdkit is missing: run scripts/install-debian-tools.sh (make test does)")
    size = max(256 * MiB, -(-4 * total // (64 * MiB)) * 64 * MiB)
    trace = make_trace(args.seed, total, size)
    log(f"trace: {trace.describe()}")
    work = Path(tempfile.mkdtemp(prefix="writable-bench-", dir=args.dir or "/var/tmp"))
    figures: list[dict[str, Any]] = []
    try:
        lib = build_slow_sync(work) if any(delays) else None
        for delay in delays:
            with SlowSyncs(lib, delay):
                rig = Rig(work / f"delay-{delay:g}", size, peers)
            try:
                figures += measure(rig, trace, peers, pairs, args.clients, delay)
            finally:
                rig.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    doc = {
        **header("writable_snapshot_fua", work),
        "machine": machine(nbdkit=tool_version(["nbdkit", "--version"])),
        "trace": {**trace.describe(), "seed": args.seed, "volume_bytes": size, "clients": args.clients},
        "figures": figures,
    }
    emit(doc, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
