"""Running kernels under test in a child process, so that a crash or a hang there cannot hurt us.

The child is a fork of this process taken before any GPU backend is initialised (and, for the CPU
variants, before any variant is registered with ggml), so it starts in milliseconds, shares the
already-imported Python modules, and loads just the backend under test. It reports its result as JSON
through a pipe; the parent reads how it ended from its exit status.
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

from typing import Any

from runtime.devices.cpu import register_cpu_variant

# Test hook: LLAMABOX_TEST_SELFTEST_FAULT="zen4=SIGILL" makes the self-test of the zen4 kernels die
# with that signal; "zen4=wrong" makes it report wrong logits. GPU backends are named as their modules
# ("vulkan=wrong", "cuda=SIGSEGV").
FAULT_ENV = "LLAMABOX_TEST_SELFTEST_FAULT"
# Deaths that say the kernels cannot run here (as opposed to SIGKILL or SIGTERM from outside).
CRASH_SIGNALS = ("SIGILL", "SIGSEGV", "SIGBUS", "SIGFPE")


@dataclass(frozen=True)
class Outcome:
    """What the child's work returned (the self-test: logits per weight type), or how it failed ("died with SIGILL", ...)."""

    result: Any
    failure: str | None = None


def can_fork() -> bool:
    return hasattr(os, "fork")


def run_variant(variant: str, library: Path, work: Callable[[], dict[str, list[float]]], timeout: float) -> Outcome:
    """Register the CPU variant `library` in a fork of this process, run `work` there, and say how it went."""

    def registered_then_work() -> dict[str, list[float]]:
        register_cpu_variant(library)
        return work()

    return run(variant, registered_then_work, timeout)


def run(label: str, work: Callable[[], Any], timeout: float) -> Outcome:
    """Run `work` in a fork of this process and say how it went; `label` names it for the fault hook."""
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
        _child(label, work, write_end)
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


def _child(label: str, work: Callable[[], Any], out: int) -> None:
    status = 1
    try:
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.SIG_DFL)
            fault = _fault_for(label)
            if fault is not None and fault != "wrong":
                if fault != "SIGKILL":  # the one signal that has no handler to reset
                    signal.signal(signal.Signals[fault], signal.SIG_DFL)
                os.kill(os.getpid(), signal.Signals[fault])
            result = work()
            if fault == "wrong":
                result = _negated(result)
            report = {"result": result}
            status = 0
        except BaseException as exc:  # whatever happens, the parent gets a report
            report = {"error": str(exc) or type(exc).__name__}
        data = json.dumps(report).encode()
        while data:
            data = data[os.write(out, data):]
    finally:  # and this process ends here, never in its parent's code
        os._exit(status)


def _negated(result: Any) -> Any:
    """Every number in `result` negated: wrong logits for the fault hook."""
    if isinstance(result, dict):
        return {key: _negated(value) for key, value in result.items()}
    if isinstance(result, list):
        return [_negated(x) for x in result]
    return -result if isinstance(result, float) else result


def _fault_for(label: str) -> str | None:
    for item in os.environ.get(FAULT_ENV, "").split(","):
        name, _, fault = item.partition("=")
        if name.strip() == label:
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
