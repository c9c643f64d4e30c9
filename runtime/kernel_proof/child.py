"""Running a CPU variant's kernels in a child process, so that a crash or a hang there cannot hurt us.

The child is a fork of this process taken before any variant is registered with ggml (and before
any GPU backend is initialised), so it starts in milliseconds, shares the already-imported Python
modules, and registers just the one variant under test. It reports its logits as JSON through a
pipe; the parent reads how it ended from its exit status.
"""

from __future__ import annotations

import json
import os
import select
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from runtime import backends

# Test hook: LLAMABOX_TEST_SELFTEST_FAULT="zen4=SIGILL" makes the self-test of the zen4 kernels die
# with that signal after loading them; "zen4=wrong" makes it report wrong logits.
FAULT_ENV = "LLAMABOX_TEST_SELFTEST_FAULT"
# Deaths that say the kernels cannot run here (as opposed to SIGKILL or SIGTERM from outside).
CRASH_SIGNALS = ("SIGILL", "SIGSEGV", "SIGBUS", "SIGFPE")


@dataclass(frozen=True)
class Outcome:
    """What the child's work returned (the self-test: logits per weight type), or how it failed ("died with SIGILL", ...)."""

    result: dict[str, list[float]] | None
    failure: str | None = None


def can_fork() -> bool:
    return hasattr(os, "fork")


def run_variant(variant: str, library: Path, work: Callable[[], dict[str, list[float]]], timeout: float) -> Outcome:
    """Register `library` in a fork of this process, run `work` there, and say how it went."""
    sys.stdout.flush()
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    try:
        pid = os.fork()
    except OSError as exc:
        os.close(read_end)
        os.close(write_end)
        return Outcome(None, f"could not be started ({exc.strerror})")
    if pid == 0:  # the child: never returns
        os.close(read_end)
        _child(variant, library, work, write_end)
    os.close(write_end)
    finished = False
    try:
        report, finished = _read_all(read_end, timeout)
    finally:
        if not finished:
            os.kill(pid, signal.SIGKILL)
        os.close(read_end)
        _, status = os.waitpid(pid, 0)
    if not finished:
        return Outcome(None, f"hung for {timeout:.0f} s")
    if os.WIFSIGNALED(status):
        return Outcome(None, f"died with {signal.Signals(os.WTERMSIG(status)).name}")
    try:
        answer = json.loads(report)
    except ValueError:
        answer = {"error": f"exited with status {os.waitstatus_to_exitcode(status)}"}
    if "error" in answer:
        return Outcome(None, f"failed ({answer['error']})")
    return Outcome(answer["result"])


def _child(variant: str, library: Path, work: Callable[[], dict[str, list[float]]], out: int) -> None:
    status = 1
    try:
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.SIG_DFL)
            backends.register_cpu_variant(library)
            fault = _fault_for(variant)
            if fault is not None and fault != "wrong":
                if fault != "SIGKILL":  # the one signal that has no handler to reset
                    signal.signal(signal.Signals[fault], signal.SIG_DFL)
                os.kill(os.getpid(), signal.Signals[fault])
            result = work()
            if fault == "wrong":
                result = {name: [-x for x in values] for name, values in result.items()}
            report = {"result": result}
            status = 0
        except BaseException as exc:  # whatever happens, the parent gets a report
            report = {"error": str(exc) or type(exc).__name__}
        data = json.dumps(report).encode()
        while data:
            data = data[os.write(out, data):]
    finally:  # and this process ends here, never in its parent's code
        os._exit(status)


def _fault_for(variant: str) -> str | None:
    for item in os.environ.get(FAULT_ENV, "").split(","):
        name, _, fault = item.partition("=")
        if name.strip() == variant:
            return fault.strip()
    return None


def _read_all(fd: int, timeout: float) -> tuple[bytes, bool]:
    """Everything the child writes, until it closes the pipe or `timeout` passes (then False)."""
    chunks = []
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            return b"".join(chunks), False
        chunk = os.read(fd, 65536)
        if not chunk:
            return b"".join(chunks), True
        chunks.append(chunk)
