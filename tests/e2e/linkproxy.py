"""A loopback TCP proxy that tests put between the primary and the standby to cut the link at will."""

from __future__ import annotations

import contextlib
import socket
import threading


class LinkProxy:
    """Forwards connections from `address` to `target` (``H:P``) until `cut`; `restore` lets them in again.

    While cut, every open connection is torn down and new ones are accepted and closed at once, as a
    broken link or a rebooting peer looks to a client. While stalled (`stall`), connections stay open
    but no byte moves, as a hung peer or a black-holed route looks. `target` may be changed (a
    restarted peer on a new port).
    """

    def __init__(self, target: str) -> None:
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._up = True
        self._flowing = threading.Event()
        self._flowing.set()
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self.cuts = 0
        self._thread = threading.Thread(target=self._accept, name="linkproxy", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                up, target = self._up, self.target
            if not up:
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

    def restore(self, target: str | None = None) -> None:
        with self._lock:
            if target is not None:
                self.target = target
            self._up = True

    def close(self) -> None:
        self.unstall()
        self.cut()
        self._listener.close()
