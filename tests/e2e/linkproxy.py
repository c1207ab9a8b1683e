"""A loopback TCP proxy that tests put between the primary and the standby to cut the link at will."""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import Protocol


class Peer(Protocol):
    """A standby as the proxy sees it: its gRPC address and its data channel's ("" for none)."""

    grpc: str
    data: str


class LinkProxy:
    """Forwards connections to a standby's gRPC address, and to its data channel when it has one,
    until `cut`; `restore` lets them in again. A primary started through the proxy
    (`Daemons.primary(proxy, ...)`) reaches both through it: `address` is the gRPC side, `data_address`
    the data channel's (``--standby-data``).

    While cut, every open connection is torn down and new ones are accepted and closed at once, as a
    broken link or a rebooting peer looks to a client. While stalled (`stall`), connections stay open
    but no byte moves, as a hung peer or a black-holed route looks. The targets may be changed (a
    restarted peer on new ports).
    """

    def __init__(self, target: str | Peer) -> None:
        grpc, data = _targets(target)
        self._up = True
        self._flowing = threading.Event()
        self._flowing.set()
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self.cuts = 0
        self.held = 0  # chunks of data a stall caught in transit (so far): the sign a stall hit traffic
        self._targets = {"grpc": grpc, "data": data}
        self._listeners: list[socket.socket] = []
        self.address = self._listen("grpc")
        self.data_address = self._listen("data")

    @property
    def target(self) -> str:
        return self._targets["grpc"]

    def _listen(self, route: str) -> str:
        listener = socket.create_server(("127.0.0.1", 0))
        self._listeners.append(listener)
        threading.Thread(
            target=self._accept, args=(listener, route), name=f"linkproxy-{route}", daemon=True
        ).start()
        return f"127.0.0.1:{listener.getsockname()[1]}"

    def _accept(self, listener: socket.socket, route: str) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            with self._lock:
                up, target = self._up, self._targets[route]
            if not up or not target:
                client.close()
                continue
            host, port = target.rsplit(":", 1)
            try:
                server = socket.create_connection((host, int(port)), timeout=5)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                if not self._flowing.is_set():
                    with self._lock:
                        self.held += 1
                self._flowing.wait()
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        with self._lock:
            self._up = False
            self.cuts += 1
            conns, self._conns = self._conns, []
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def stall(self) -> None:
        """Hold every byte in transit until `unstall`."""
        self._flowing.clear()

    def unstall(self) -> None:
        self._flowing.set()

    def restore(self, target: str | Peer | None = None) -> None:
        with self._lock:
            if target is not None:
                grpc, data = _targets(target)
                self._targets = {"grpc": grpc, "data": data or self._targets["data"]}
            self._up = True

    def close(self) -> None:
        self.unstall()
        self.cut()
        for listener in self._listeners:
            listener.close()


def _targets(target: str | Peer) -> tuple[str, str]:
    if isinstance(target, str):
        return target, ""
    return target.grpc, target.data
