"""--rpc-worker: this machine's best device served to heads on other machines through ggml's RPC backend.

ggml's server trusts its peer: a malformed graph can trip an assertion in a kernel and abort the process. So the
server runs in a fork of this process (after the CPU kernels are proven, before any GPU backend is loaded, as the
supervisor forks for the model), and this process only watches it: where the server dies, one line says so and a
new fork serves again on the same port, with the same tensor cache. Ctrl+C ends both.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import click

from runtime import hardware, packaged, supervisor
from runtime.devices import cpu as cpu_module
from runtime.devices import ggml, rpc
from runtime.devices.cpu_features import CpuInfo
from runtime.errors import LlamaboxError

_RESTART_PAUSE = 0.5  # seconds between a server's death and the next one
_CRASH_LOOP_DEATHS, _CRASH_LOOP_SECONDS = 5, 10  # this many deaths in so many seconds: not a head's doing, stop
_STOPPING = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


@dataclass(frozen=True)
class WorkerSettings:
    host: str
    port: int
    allow_remote: bool
    cpu_variant: str | None
    gpu: str  # --gpu auto|on|off, as for serving a model
    threads: int  # 0: the CPU kernels' default
    options: rpc.WorkerOptions


def run(settings: WorkerSettings) -> None:
    """Serve until Ctrl+C; never returns."""
    if ":" in settings.host:
        raise LlamaboxError(f"--rpc-worker --host {settings.host}: ggml RPC listens on IPv4 addresses only; give one, e.g. 127.0.0.1")
    host = "127.0.0.1" if settings.host == "localhost" else settings.host  # ggml takes an address, not a name
    if host != "127.0.0.1" and not settings.allow_remote:
        raise LlamaboxError(
            f"--rpc-worker --host {host}: ggml RPC has no authentication, so anyone who reaches the port can "
            "run computations and read what is sent; add --rpc-allow-remote on a trusted network, or keep 127.0.0.1 "
            "and reach it through an SSH tunnel (README, Several machines)"
        )
    if not hasattr(os, "fork"):
        raise LlamaboxError("--rpc-worker runs on Linux and macOS; on Windows, run the Linux bundle in WSL")
    settings = dataclasses.replace(settings, host=host)
    _check_port(host, settings.port)
    if rpc.module() is None:
        raise LlamaboxError("this runtime carries no RPC backend (libggml-rpc); use a llamabox stub built with it")
    cpu_info, cpu_backend = hardware.choose_cpu_kernels(settings.cpu_variant, say=_say)
    if host != "127.0.0.1":
        _say(
            f"warning: this RPC worker listens on {host}: anyone who reaches port {settings.port} can run "
            "computations on this machine and read what is sent; use it only on a trusted network"
        )
    _watch(settings, cpu_info, cpu_backend)


def _watch(settings: WorkerSettings, cpu_info: CpuInfo, cpu_backend: cpu_module.CpuBackend) -> NoReturn:
    """Fork the server, and again where it dies; give up where it keeps dying at once (not a head's doing).

    As the supervisor does: a terminal's Ctrl+C reaches the whole process group, so this process ignores it and
    the server dies of it; SIGTERM and SIGHUP, which reach this process alone, are passed on. A server that died
    of one of these was stopped, not crashed."""
    deaths: list[float] = []
    watcher, current = os.getpid(), [0]
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for number in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(number, lambda n, _frame: current[0] and os.kill(current[0], n))
    while True:
        sys.stdout.flush()
        sys.stderr.flush()
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOPPING)  # none between fork() and the child's own handlers
        pid = current[0] = os.fork()
        if pid == 0:
            _serve_in_child(settings, cpu_info, cpu_backend, watcher, first=not deaths)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOPPING)
        status = os.waitpid(pid, 0)[1]
        if os.WIFEXITED(status):
            sys.exit(os.waitstatus_to_exitcode(status))  # the child said why (it could not listen, or had no device)
        number = os.WTERMSIG(status)
        if number in _STOPPING:
            _say("stopped")
            sys.exit(0)
        name = signal.Signals(number).name if number in signal.Signals._value2member_map_ else f"signal {number}"
        deaths = [t for t in deaths if t > time.monotonic() - _CRASH_LOOP_SECONDS] + [time.monotonic()]
        if len(deaths) >= _CRASH_LOOP_DEATHS:
            _say(f"the RPC server died of {name} {len(deaths)} times in {_CRASH_LOOP_SECONDS} s; stopping (try --gpu off, or --cpu-variant x64)")
            sys.exit(1)
        _say(f"the RPC server died of {name} (a malformed message from a head, or the device failed); serving again")
        time.sleep(_RESTART_PAUSE)


def _serve_in_child(settings: WorkerSettings, cpu_info: CpuInfo, cpu_backend: cpu_module.CpuBackend, watcher: int, first: bool) -> NoReturn:
    """The forked server: it dies at once of Ctrl+C and of its watcher's SIGTERM (ggml's loop never returns to
    Python, where the default handler would run). Whatever happens, it ends here, never in the caller's code."""
    code = 1
    try:
        for number in _STOPPING:
            signal.signal(number, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOPPING)
        supervisor.end_with_parent(watcher)  # a watcher killed outright takes its server along (Linux)
        machine = hardware.add_gpus(cpu_info, cpu_backend, settings.gpu, say=_say if first else _quiet)
        served = [g.index for g in machine.gpus] or [d.index for d in ggml.devices() if d.backend == "CPU"]
        endpoint = f"{settings.host}:{settings.port}"
        if first:
            _say(f"RPC worker on {endpoint}: {_describe(served, settings.options.max_bytes)}; stop it with Ctrl+C")
        threads = settings.threads or cpu_module.default_threads()
        rpc.quiet_worker_log(settings.options.verbose)
        rpc.serve(endpoint, _tensor_cache(first), threads, served, settings.options)
        _say(f"could not listen on {endpoint}; choose another --port or --host")
    except LlamaboxError as exc:
        _say(str(exc))
    except BaseException as exc:  # a bug of ours: its name, not a traceback in a forked copy of the CLI
        _say(f"the RPC server could not start ({type(exc).__name__}: {exc})")
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _tensor_cache(first: bool) -> Path | None:
    """Where ggml keeps the large tensors heads sent, by hash (it writes there only if the folder exists)."""
    folder = packaged.cache_dir() / "rpc"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if first:
            _say(f"warning: no tensor cache ({folder}: {exc.strerror}): a head that starts again sends every weight again; set LLAMABOX_CACHE to a writable folder")
        return None
    return folder


def _describe(indices: list[int], cap: int) -> str:
    """'CPU (AMD EPYC ...), 60 MiB offered (--rpc-mem) of 23,000 MiB free'."""
    parts = []
    for device in (d for d in ggml.devices() if d.index in indices):
        offered = f"{min(cap, device.free_bytes) >> 20:,} MiB offered (--rpc-mem) of {device.free_bytes >> 20:,} MiB free" if cap else (
            f"{device.free_bytes >> 20:,} MiB free of {device.total_bytes >> 20:,} MiB"
        )
        parts.append(f"{device.name} ({device.description}), {offered}")
    return "; ".join(parts)


def _check_port(host: str, port: int) -> None:
    """A one-line error now where the port is taken or the address is not this machine's (ggml would only print
    "Failed to create server socket" once the device is set up)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise LlamaboxError(f"port {port} on {host} is in use (another worker?); choose another with --port") from None
            raise LlamaboxError(f"cannot listen on {host}:{port} ({exc.strerror}); give one of this machine's addresses with --host") from None


def _say(line: str) -> None:
    click.echo(f"llamabox: {line}", err=True)


def _quiet(_line: str) -> None:
    pass
