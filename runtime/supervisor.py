"""Watching the process that runs the model, so that a crash in native code reaches the user as one line.

If llama.cpp's kernels hit an instruction this CPU refuses (SIGILL) or a bad memory access
(SIGSEGV, SIGBUS), the process dies before any Python code can run, and the shell prints one word
("Illegal instruction"). So the model runs in a fork of this process; this one only waits for it,
passes signals on (Ctrl+C, kill), and when the child dies of such a signal, says which CPU
kernels were in use and how to pick others. The fork happens after the CPU kernels are chosen and
before any GPU backend or model is loaded; both processes share every page until one writes.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

import click

_CRASHES = {signal.SIGILL: "an illegal instruction", signal.SIGSEGV: "a bad memory access", signal.SIGBUS: "a bad memory access",
            signal.SIGFPE: "an arithmetic fault"}
_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
_PR_SET_PDEATHSIG = 1


def supervise(variant: str) -> None:
    """Continue in a child process; this process waits for it and exits as it did. No-op without fork()."""
    if not hasattr(os, "fork"):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        _die_with_parent()
        return
    for sig in _FORWARDED:
        signal.signal(sig, lambda number, _frame: os.kill(pid, number))
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        if number in _CRASHES:
            click.echo(
                f"llamabox: the model's process died of {_CRASHES[number]} ({signal.Signals(number).name}) in the "
                f"{variant} CPU kernels; start again with --cpu-variant x64 (portable) or another variant listed by --info",
                err=True,
            )
            os._exit(128 + number)
        # Killed by anything else (SIGTERM, SIGKILL): end the same way, so whoever sent it sees that.
        signal.signal(number, signal.SIG_DFL)
        os.kill(os.getpid(), number)
    os._exit(os.waitstatus_to_exitcode(status))


def _die_with_parent() -> None:
    """On Linux, end the child with SIGTERM if this watcher is killed outright (kill -9)."""
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
