"""ggml's RPC backend: this machine's device served to a head on another machine (a worker), and other machines'
devices used as this one's (the head).

The backend is a module beside the CPU variants (libggml-rpc.so, built by scripts/gpu_backends.sh with the patch in
scripts/patches/rpc/), loaded like a GPU backend. Its entry points come through its registry's get_proc_address, as
llama.cpp's own tools reach them: ggml_backend_rpc_start_server (serves devices on an endpoint until the process
ends), ggml_backend_rpc_server_set_limits (the patch's: the memory offered, and quiet) and
ggml_backend_rpc_add_server (registers a worker's devices, which the model loader then places layers on). A worker's
devices are used as GPUs are: runtime.devices.offload places layers on them by their free memory.
"""

from __future__ import annotations

import ctypes
import re
import socket
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from runtime import ggml_log, packaged
from runtime.devices import ggml
from runtime.devices.gpu import GpuDevice
from runtime.errors import BackendError

PORT = 50052  # rpc-server's default
_START_SERVER = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p))
_SET_LIMITS = ctypes.CFUNCTYPE(None, ctypes.c_size_t, ctypes.c_bool)
_ADD_SERVER = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)
# What the client says before it aborts the process over a worker: its connection failed (the patched message), or
# the worker went away between the hello and the connection ggml makes for the model.
_LOST = re.compile(rb"(?:RPC worker (\S+): connection lost|Failed to connect to (\S+)|RPC handshake failed for (\S+))")


@dataclass(frozen=True)
class WorkerOptions:
    """What a worker serves and how: the device's memory it offers (0: all of it), and whether ggml prints its
    banner and each head's arrival and departure."""

    max_bytes: int = 0
    verbose: bool = False


def module(directory: Path | None = None) -> Path | None:
    """The RPC module this runtime carries, if it does."""
    path = (directory or packaged.backend_dir()) / ggml.module_file_name("rpc")
    return path if path.exists() else None


def _registry() -> int:
    """The RPC backend's registry, its module loaded first where it is not yet."""
    lib = ggml.ggml()
    reg = lib.ggml_backend_reg_by_name(b"RPC")
    if reg:
        return reg
    path = module()
    if path is None:
        raise BackendError("this runtime carries no RPC backend (libggml-rpc); rebuild the stub with scripts/setup.sh")
    warnings: list[str] = []
    if not ggml.load_module(path, warnings):
        raise BackendError(warnings[0])
    reg = lib.ggml_backend_reg_by_name(b"RPC")
    if not reg:
        raise BackendError(f"{path.name} registered no RPC backend; the runtime is damaged, download it again")
    return reg


def _entry(name: str, kind: type) -> ctypes._CFuncPtr:  # type: ignore[name-defined]
    address = ggml.ggml().ggml_backend_reg_get_proc_address(_registry(), name.encode())
    if not address:
        raise BackendError(f"the RPC backend lacks {name}; the runtime is damaged, download it again")
    return kind(address)


def serve(endpoint: str, cache_dir: Path | None, threads: int, device_indices: list[int], options: WorkerOptions) -> None:
    """Serve the devices `device_indices` on `endpoint` (host:port) until the process ends; ggml's tensor cache in
    `cache_dir`, so that a head that starts again does not send the weights again. Returns only where it could not
    listen."""
    devices = (ctypes.c_void_p * len(device_indices))(*(ggml.device_handle(i) for i in device_indices))
    _entry("ggml_backend_rpc_server_set_limits", _SET_LIMITS)(options.max_bytes, options.verbose)
    start = _entry("ggml_backend_rpc_start_server", _START_SERVER)
    start(endpoint.encode(), str(cache_dir).encode() if cache_dir else None, threads, len(device_indices), devices)


def parse_endpoints(text: str) -> list[str]:
    """--rpc's HOST:PORT,HOST:PORT... as a list; a one-line BackendError for one that is not an IPv4 HOST:PORT
    (ggml's client speaks IPv4 only) or that names a worker already named (ggml would open a second connection
    to a worker that serves one at a time, and wait for ever)."""
    found = [e.strip() for e in text.split(",") if e.strip()]
    if not found:
        raise BackendError(f"--rpc needs at least one worker's HOST:PORT, e.g. 192.168.1.20:{PORT}")
    seen: dict[tuple[str, int], str] = {}
    for endpoint in found:
        host, _, port = endpoint.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536 or ":" in host or "[" in host:
            raise BackendError(f"--rpc {endpoint!r} is not HOST:PORT with an IPv4 address or a name; give each worker's, e.g. 192.168.1.20:{PORT}")
        try:
            address = (socket.gethostbyname(host), int(port))
        except OSError:
            raise BackendError(f"--rpc {endpoint}: no IPv4 address is known for {host}; check the name") from None
        if address in seen:
            raise BackendError(f"--rpc names one worker twice ({seen[address]} and {endpoint}); name each once")
        seen[address] = endpoint
    return found


def add_workers(endpoints: list[str], say: Callable[[str], None] | None = None) -> list[GpuDevice]:
    """Ask each worker (ggml's client aborts the process on one it cannot reach), then register its devices; the
    devices found, as GPUs are described. Without `say`, a worker that cannot be reached is a BackendError; with
    it, the line goes to `say` and the worker is left out (a head starting again after losing one)."""
    found: list[GpuDevice] = []
    for endpoint in endpoints:
        try:
            probe(endpoint)
        except BackendError as exc:
            if say is None:
                raise
            say(f"{exc}; going on without it")
            continue
        found += [
            GpuDevice("rpc", d.index, d.name, d.description, d.free_bytes, d.total_bytes, endpoint=endpoint)
            for d in _add_worker(endpoint)
        ]
    return found


def _add_worker(endpoint: str) -> list[ggml.Device]:
    """Register the devices of the worker at `endpoint`; the new devices."""
    before = {d.index for d in ggml.devices()}
    reg = _entry("ggml_backend_rpc_add_server", _ADD_SERVER)(endpoint.encode())
    if reg:
        ggml.ggml().ggml_backend_register(reg)  # as llama.cpp's --rpc does: the model loader sees the registry's devices
    return [d for d in ggml.devices() if d.index not in before]


_abort_callback: object = None  # kept alive while ggml holds it


_TRANSPORT_ERRORS = ("recv failed", "send failed")  # transport.cpp's lines just before the client aborts


def quiet_worker_log(verbose: bool) -> None:
    """A worker's ggml log (each head's arrival and departure, what it refused) only with --verbose."""
    ggml_log.filtered(ggml.ggml(), lambda _line: verbose)


def quiet_head_log() -> None:
    """A head's ggml log without the transport errors that come just before a lost worker's one line."""
    ggml_log.filtered(ggml.ggml(), lambda line: not line.startswith(_TRANSPORT_ERRORS))


def on_connection_lost(handler: Callable[[str], None]) -> None:
    """Call `handler` with a worker's endpoint when ggml is about to abort the process because that worker's
    connection failed (mid-request: ggml has no way to report it otherwise). The handler must not return: where it
    does, ggml aborts as before. Other aborts are left to ggml."""
    global _abort_callback

    def called(message: bytes | None) -> None:
        lost = _LOST.search(message or b"")
        if lost:
            handler(next(g for g in lost.groups() if g).decode(errors="replace"))
        # ggml prints nothing itself once a callback is set: its reason, before it aborts
        sys.stderr.write(f"llamabox: llama.cpp stopped: {(message or b'').decode(errors='replace').strip()}\n")
        sys.stderr.flush()

    _abort_callback = ggml.ABORT_CALLBACK(called)
    ggml.ggml().ggml_set_abort_callback(_abort_callback)


PROTOCOL = (7, 0)  # ggml-rpc.h's RPC_PROTO_MAJOR_VERSION and _MINOR_VERSION in the vendored llama.cpp
_HELLO, _CAPS = 14, 24  # RPC_CMD_HELLO; RPC_CONN_CAPS_SIZE (transport.h)


def probe(endpoint: str, timeout: float = 5.0) -> None:
    """Say hello to the worker at `endpoint` as ggml's client does; a one-line BackendError where it cannot be
    reached or speaks another protocol version. ggml's own client aborts the whole process
    in both cases, so the head asks first (written here: ggml has no function that only asks)."""
    host, _, port = endpoint.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as sock:
            sock.sendall(struct.pack("<BQ", _HELLO, _CAPS) + bytes(_CAPS))
            head = _receive(sock, 8)
            (size,) = struct.unpack("<Q", head)
            if size != 4 + _CAPS:
                raise BackendError(f"{endpoint} answered, but not as a ggml RPC worker; check the address")
            major, minor, patch = _receive(sock, size)[:3]
    except ValueError:
        raise BackendError(f"{endpoint!r} is not HOST:PORT; give the worker's address, e.g. 192.168.1.20:{PORT}") from None
    except TimeoutError:
        raise BackendError(
            f"the RPC worker {endpoint} does not answer: a worker serves one head at a time, so another head may be "
            "using it; or check the address and the firewall"
        ) from None
    except OSError as exc:
        raise BackendError(
            f"the RPC worker {endpoint} cannot be reached ({exc.strerror or exc}); start it there with --rpc-worker, or check the address"
        ) from None
    if major != PROTOCOL[0] or minor > PROTOCOL[1]:
        raise BackendError(
            f"the RPC worker {endpoint} speaks ggml RPC {major}.{minor}.{patch}, this runtime {PROTOCOL[0]}.{PROTOCOL[1]}; run the "
            "same llamabox runtime on both machines"
        )


def _receive(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise OSError("the connection closed")
        data += chunk
    return data
