"""Watching the process that runs the model, so that a crash in native code reaches the user as one line.

If llama.cpp's kernels hit an instruction this CPU refuses (SIGILL) or a bad memory access
(SIGSEGV, SIGBUS), the process dies before any Python code can run, and the shell prints one word
("Illegal instruction"). So the model runs in a fork of this process; this one only waits for it,
passes termination signals on, and when the child dies of such a signal, says which CPU kernels
(and GPU, where the child placed layers on one: `running_on`) were in use and how to pick others. The fork happens after the CPU kernels are chosen and before
any GPU backend or the model is loaded; both processes share every page until one writes.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import signal
import sys
from typing import NoReturn

import click

from runtime import runtime_cache

# Windows has neither fork() nor most of these signals: the names that exist here (supervise is a no-op there).
_CRASHES = {
    getattr(signal, name): what
    for name, what in (
        ("SIGILL", "an illegal instruction"),
        ("SIGSEGV", "a bad memory access"),
        ("SIGBUS", "a bad memory access"),
        ("SIGFPE", "an arithmetic fault"),
    )
    if hasattr(signal, name)
}
# A terminal sends Ctrl+C (SIGINT) and Ctrl+\\ (SIGQUIT) to the whole process group, the child
# included, so this process ignores them rather than deliver them twice (uvicorn reads a second
# SIGINT as "stop at once"). SIGTERM and SIGHUP usually reach this process alone: passed on.
_IGNORED = tuple(getattr(signal, name) for name in ("SIGINT", "SIGQUIT") if hasattr(signal, name))
_FORWARDED = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))
_PR_SET_PDEATHSIG = 1
# The model's process exits with this to be started again from the fork (an RPC worker was lost: start_again).
_START_AGAIN = 75
_restarts = 0  # how often the model's process was started again; read in a new child (restarts)
# A page both processes share (anonymous mappings made before fork() are shared): where the child says which GPU
# holds layers, for the watcher's message should the child die.
_GPU_NOTE = mmap.mmap(-1, 512)


def running_on(gpus: str) -> None:
    """Called in the model's process once layers are placed on GPUs (their names), or with "" for none."""
    data = gpus.encode()[: len(_GPU_NOTE) - 1]
    _GPU_NOTE[:] = data + bytes(len(_GPU_NOTE) - len(data))


def crash_line(what: str, name: str, variant: str) -> str:
    """The one line for a model's process that died of `what` (`name`: the signal, or Windows' exception code)."""
    gpus = bytes(_GPU_NOTE).rstrip(b"\0").decode(errors="replace")
    if gpus:
        return (
            f"llamabox: the model's process died of {what} ({name}) with layers on {gpus} and the {variant} "
            "CPU kernels; start again with -fa off, or --gpu off to leave the GPU out"
        )
    return (
        f"llamabox: the model's process died of {what} ({name}) in the {variant} CPU kernels; "
        "start again with --cpu-variant x64 (portable) or another variant listed by --info"
    )


def restarts() -> int:
    """How many times the model's process was started again before this one (0 in the first)."""
    return _restarts


def start_again() -> NoReturn:
    """End the model's process and have the watcher start a new one from the fork (the state before any GPU or RPC
    backend was loaded). Without a watcher (Windows), the process ends with the same code."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_START_AGAIN)


def supervise(variant: str) -> None:
    """Continue in a child process; this process waits for it and exits as it did, or forks again where it asks
    (start_again). Without fork() (Windows), this process reports its own crash instead (windows_crashes)."""
    global _restarts
    if not hasattr(os, "fork"):
        if sys.platform == "win32":
            from runtime import windows_crashes

            windows_crashes.report(lambda what, name: crash_line(what, name, variant))
        return
    sys.stdout.flush()
    sys.stderr.flush()
    watched = (*_IGNORED, *_FORWARDED)
    parent = os.getpid()
    while True:
        # Held back until the handlers are in place, so that no signal finds this process half-way.
        signal.pthread_sigmask(signal.SIG_BLOCK, watched)
        pid = os.fork()
        if pid == 0:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, watched)
            end_with_parent(parent)
            return
        previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in _IGNORED}
        previous.update({sig: signal.signal(sig, lambda number, _frame, child=pid: os.kill(child, number)) for sig in _FORWARDED})
        signal.pthread_sigmask(signal.SIG_UNBLOCK, watched)
        _, status = os.waitpid(pid, 0)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if os.WIFEXITED(status) and os.WEXITSTATUS(status) == _START_AGAIN:
            _restarts += 1
            continue
        break
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        name = signal.Signals(number).name
        if number in _CRASHES:
            click.echo(crash_line(_CRASHES[number], name, variant), err=True)
        elif number == signal.SIGKILL:
            click.echo("llamabox: the model's process was killed (SIGKILL); if nobody killed it, the machine ran out of memory", err=True)
        runtime_cache.remove_temporary()
        os._exit(128 + number)
    runtime_cache.remove_temporary()
    os._exit(os.waitstatus_to_exitcode(status))


def end_with_parent(parent: int) -> None:
    """In a forked child of `parent`, on Linux: have the kernel end it with SIGTERM if the watcher is killed outright
    (kill -9)."""
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the watcher died before the request took effect
            os.kill(os.getpid(), signal.SIGTERM)
