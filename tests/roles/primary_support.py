"""Support of the primary's role tests (no tests here): an in-process standby whose `apply` can be
wrapped before its server starts (so that no batch escapes the wrapper), metrics that record what the
mirror reports, and the mirrored device."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from standby_rig import StandbyRig

from primary.bitmap import WriteIntentBitmap
from primary.device import MirroredDevice
from primary.generations import Generations
from primary.mirror import Mirror, NullMirrorMetrics
from standby import services
from standby.node import StandbyNode
from standbylib.blockdev import open_file_device
from standbylib.runtime.rpc import create_server

MiB = 1 << 20
BS = 4096


def start_wrapped_rig(data_dir: str, wrap, port: int = 0) -> StandbyRig:
    """A standby whose `node.apply` is `wrap(node, original_apply)`, installed before it serves."""
    node = StandbyNode(data_dir, capacity="64MiB")
    node.apply = wrap(node, node.apply)  # type: ignore[method-assign]
    server, bound, _ = create_server(("127.0.0.1", port), lambda s: services.register(s, node, "127.0.0.1:1"))
    return StandbyRig(node, f"127.0.0.1:{bound[1]}", server)


@dataclass
class RecordingMetrics(NullMirrorMetrics):
    """What the mirror reported: its states in order, refusals by reason, state write failures."""

    states: list[str] = field(default_factory=list)
    up: bool = False
    refusals: dict[str, int] = field(default_factory=dict)
    write_failures: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def connected(self, volume, up):
        self.up = up

    def set_state(self, volume, state):
        with self.lock:
            if not self.states or self.states[-1] != state:
                self.states.append(state)

    def refused(self, volume, reason):
        with self.lock:
            self.refusals[reason] = self.refusals.get(reason, 0) + 1

    def state_write_failed(self, volume, state):
        with self.lock:
            self.write_failures[state] = self.write_failures.get(state, 0) + 1


def mirrored(tmp_path, target, size=4 * MiB, *, bitmap=None, metrics=None, generations=None, **kw):
    local = open_file_device(str(tmp_path / "primary.img"), size)
    bitmap = bitmap or WriteIntentBitmap.open(str(tmp_path / "primary.bitmap"), size)
    generations = generations or Generations(str(tmp_path / "primary.generation"))
    kw.setdefault("ack_timeout", 5)
    mirror = Mirror(target, "vol0", size, BS, bitmap, generations, metrics=metrics, **kw)
    dev = MirroredDevice("vol0", local, mirror)
    mirror.start()
    return dev


def close(dev: MirroredDevice) -> None:
    dev.mirror.stop()
    dev.close()
    dev.mirror.bitmap.close()


def wait_until(predicate, timeout=30.0, what="the condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def files_equal(a, b) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        return fa.read() == fb.read()


def settled(dev: MirroredDevice) -> bool:
    m = dev.mirror
    return m.connected and not m.resyncing and m.bitmap.dirty() == 0
