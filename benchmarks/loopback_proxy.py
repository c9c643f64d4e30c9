"""A TCP proxy on 127.0.0.1 in front of another port: what the client sends may be held back for a while (a network's
latency, for benchmarks/rpc.py) and kept per connection (a head's RPC session, for tests/test_rpc.py to count and to
fuzz with)."""

from __future__ import annotations

import queue
import socket
import threading
import time


class LoopbackProxy:
    """127.0.0.1:`port` -> 127.0.0.1:`target`. With `delay_ms`, each chunk the client sends reaches the target that
    much later (each round trip takes that much longer); with `record`, `sessions` gets the bytes each client sent
    once its connection has ended."""

    def __init__(self, target: int, delay_ms: float = 0.0, record: bool = False) -> None:
        self.target, self.delay, self.record = target, delay_ms / 1000, record
        self.sessions: list[bytes] = []
        self.accepted = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def wait_closed(self, timeout: float = 30) -> None:
        """Until every connection so far has ended (and so is in `sessions`, when recording)."""
        deadline = time.monotonic() + timeout
        while len(self.sessions) < self.accepted and time.monotonic() < deadline:
            time.sleep(0.05)

    def close(self) -> None:
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self.accepted += 1
            upstream = socket.create_connection(("127.0.0.1", self.target))
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            held: queue.Queue[tuple[float, bytes]] = queue.Queue()
            threading.Thread(target=self._read, args=(client, held), daemon=True).start()
            threading.Thread(target=self._send_when_due, args=(held, upstream), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client), daemon=True).start()

    def _read(self, source: socket.socket, held: queue.Queue[tuple[float, bytes]]) -> None:
        kept = bytearray()
        while True:
            try:
                data = source.recv(1 << 20)
            except OSError:
                data = b""
            held.put((time.monotonic() + self.delay, data))
            if not data:
                self.sessions.append(bytes(kept))
                return
            if self.record:
                kept += data

    @staticmethod
    def _send_when_due(held: queue.Queue[tuple[float, bytes]], sink: socket.socket) -> None:
        while True:
            due, data = held.get()
            time.sleep(max(0.0, due - time.monotonic()))
            if not data:
                _end(sink)
                return
            try:
                sink.sendall(data)
            except OSError:
                return

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        while True:
            try:
                data = source.recv(1 << 20)
                if not data:
                    break
                sink.sendall(data)
            except OSError:
                break
        _end(sink)


def _end(sock: socket.socket) -> None:
    """Shutdown, not only close: it wakes a thread blocked reading the socket (close alone leaves it waiting, and the
    connection open)."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
