"""Random and mutated ggml RPC messages for a worker's port (tests/test_rpc.py): loopback only, bounded in count and
time.

ggml's protocol, as its client speaks it: each message is | command (1 byte) | size (8 bytes, little-endian) |
payload |, and a connection starts with HELLO (command 14, a 24-byte payload). The mutations start from what a real
head sent (recorded by benchmarks/loopback_proxy.py): its messages with bits flipped, sizes changed, payloads cut short or
enlarged past reason, and messages of random bytes; each connection may also end in the middle of a message.
"""

from __future__ import annotations

import random
import socket
import struct
import threading
import time
from dataclasses import dataclass

HELLO = struct.pack("<BQ", 14, 24) + bytes(24)
COMMANDS = 19  # RPC_CMD_COUNT in the vendored ggml-rpc.cpp


@dataclass
class Message:
    command: int
    payload: bytes

    def encode(self, size: int | None = None) -> bytes:
        return struct.pack("<BQ", self.command, len(self.payload) if size is None else size) + self.payload


def parse(stream: bytes) -> list[Message]:
    """A client's stream as messages (the first is its HELLO)."""
    messages, at = [], 0
    while at + 9 <= len(stream):
        command, size = struct.unpack_from("<BQ", stream, at)
        messages.append(Message(command, stream[at + 9 : at + 9 + size]))
        at += 9 + size
    return messages


def _mutated(rng: random.Random, messages: list[Message]) -> bytes:
    """One connection's bytes: HELLO, a prefix of a real session, then one or a few damaged messages."""
    keep = rng.randrange(1, max(2, min(len(messages), 40)))
    out = bytearray(HELLO)
    for message in messages[1:keep]:
        if len(message.payload) < 1 << 16:  # the small setup messages, not the weights
            out += message.encode()
    for _ in range(rng.randrange(1, 4)):
        victim = rng.choice(messages[1:] or messages)
        payload = bytearray(victim.payload[: 1 << 14])
        kind = rng.randrange(7)
        if kind == 0 and payload:  # bits flipped
            for _ in range(rng.randrange(1, 16)):
                payload[rng.randrange(len(payload))] ^= 1 << rng.randrange(8)
            out += Message(victim.command, bytes(payload)).encode()
        elif kind == 1:  # a size that promises more than comes (up to 2^64 - 1)
            out += Message(victim.command, bytes(payload)).encode(size=rng.choice([len(payload) + 1, 1 << 32, 1 << 40, (1 << 64) - 1]))
        elif kind == 2:  # a size that promises less
            out += Message(victim.command, bytes(payload)).encode(size=max(0, len(payload) - rng.randrange(1, 64)))
        elif kind == 3:  # a command out of range, or another command's payload
            out += Message(rng.choice([rng.randrange(COMMANDS, 256), rng.randrange(COMMANDS)]), bytes(payload)).encode()
        elif kind == 4:  # random bytes
            out += bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 512)))
        elif kind == 5 and len(payload) >= 8:  # a 64-bit field somewhere set to an extreme
            at = rng.randrange(0, len(payload) - 7)
            payload[at : at + 8] = struct.pack("<Q", rng.choice([0, 1, (1 << 63) - 1, (1 << 64) - 1, 1 << 32]))
            out += Message(victim.command, bytes(payload)).encode()
        else:  # a valid message cut off in the middle (the client goes away mid-transfer)
            whole = victim.encode()
            out += whole[: rng.randrange(1, max(2, len(whole)))]
            break
    return bytes(out)


@dataclass
class FuzzReport:
    connections: int = 0
    refused: int = 0  # connections the worker could not be reached on (it was starting again)
    cut_short: int = 0  # connections the worker closed before all was sent (it refused a message)


def fuzz(port: int, sessions: list[bytes], seconds: float, connections: int, seed: int = 1) -> FuzzReport:
    """Send mutated connections to the worker on 127.0.0.1:`port` until `seconds` or `connections` run out."""
    rng = random.Random(seed)
    recorded = [parse(s) for s in sessions if s.startswith(HELLO[:1])]
    # The sessions that loaded and ran a model (not the head's hello-only probes), which reach the deepest.
    recorded = [m for m in recorded if len(m) > 20] or [m for m in recorded if len(m) > 1] or [[Message(14, bytes(24))]]
    report = FuzzReport()
    deadline = time.monotonic() + seconds
    while report.connections < connections and time.monotonic() < deadline:
        data = _mutated(rng, rng.choice(recorded))
        report.connections += 1
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=2)
        except OSError:
            report.refused += 1
            time.sleep(0.1)
            continue
        with sock:
            drain = threading.Thread(target=_drain, args=(sock,), daemon=True)
            drain.start()
            try:
                sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                report.cut_short += 1
            drain.join(2)
    return report


def _drain(sock: socket.socket) -> None:
    try:
        while sock.recv(1 << 16):
            pass
    except OSError:
        pass
