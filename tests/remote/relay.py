"""A TCP relay in front of a real model server, to make it slow or absent on demand.

`relay.down()` closes the listening socket (clients get "connection refused", as from a stopped
server), `relay.up()` listens again on the same port, and `relay.delay_s` holds every request that
long before passing it on (a server that is overloaded). The bytes are the real server's.
"""

from __future__ import annotations

import contextlib
import socket
import socketserver
import threading
import time


class _Handler(socketserver.BaseRequestHandler):
    server: _RelayServer

    def handle(self) -> None:
        relay = self.server.relay
        relay.track(self.request)
        if relay.delay_s:
            time.sleep(relay.delay_s)
        try:
            upstream = socket.create_connection(relay.target, timeout=30)
        except OSError:
            return
        with upstream:
            pump = threading.Thread(target=_pipe, args=(upstream, self.request), daemon=True)
            pump.start()
            _pipe(self.request, upstream)
            pump.join(timeout=30)


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while chunk := src.recv(65536):
            dst.sendall(chunk)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


class _RelayServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], relay: Relay) -> None:
        self.relay = relay
        super().__init__(address, _Handler)


class Relay:
    """`Relay(("127.0.0.1", port))` listens on a free loopback port: `relay.port`."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.delay_s = 0.0
        self.port = 0
        self._server: _RelayServer | None = None
        self._thread: threading.Thread | None = None
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.up()

    def track(self, conn: socket.socket) -> None:
        with self._lock:
            self._open.add(conn)

    def up(self) -> None:
        if self._server is not None:
            return
        self._server = _RelayServer(("127.0.0.1", self.port), self)
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def down(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._server = None
        with self._lock:  # pooled keep-alive connections die too, as with a stopped server
            for conn in self._open:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
            self._open.clear()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def close(self) -> None:
        self.down()
