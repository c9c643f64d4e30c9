"""Running kernels under test in a child process, so that a crash or a hang there cannot hurt us.

The child is a fork of this process taken before any GPU backend is initialised (and, for the CPU
variants, before any variant is registered with ggml), so it starts in milliseconds, shares the
already-imported Python modules, and loads just the backend under test. It reports its result as JSON
through a pipe; the parent reads how it ended from its exit status.

Windows has no fork(): there the child is a new process started by multiprocessing's spawn (the unpacked
runtime's executable run again; runtime/__main__.py hands it to multiprocessing), which takes a second more, and `work` must pickle (a functools.partial of a module-level function). A crash there ends the
process with an exception code rather than a signal: the same verdicts name the signal that code stands for.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from typing import Any

from runtime.devices.cpu import register_cpu_variant
from runtime.windows_crashes import EXCEPTIONS, NO_CRASH_DIALOGS

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


def available() -> bool:
    """Whether kernels can be tried in a child process here: fork() on POSIX, spawn on Windows."""
    return hasattr(os, "fork") or sys.platform == "win32"


def run_variant(variant: str, library: Path, work: Callable[[], dict[str, list[float]]], timeout: float) -> Outcome:
    """Register the CPU variant `library` in a child process, run `work` there, and say how it went."""
    return run(variant, partial(_registered_then, library, work), timeout)


def run_with_cpu(label: str, cpu_library: Path, work: Callable[[], Any], timeout: float) -> Outcome:
    """`run` in a child that has this process's CPU kernels (`cpu_library`, registered here): a forked child
    inherits them, a spawned one registers them first."""
    if hasattr(os, "fork"):
        return run(label, work, timeout)
    return run(label, partial(_registered_then, cpu_library, work), timeout)


def _registered_then(library: Path, work: Callable[[], Any]) -> Any:
    register_cpu_variant(library)
    return work()


def run(label: str, work: Callable[[], Any], timeout: float) -> Outcome:
    """Run `work` in a child process and say how it went; `label` names it for the fault hook."""
    if not hasattr(os, "fork"):
        return _run_spawned(label, work, timeout)
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
    return _outcome(report, f"exited with status {os.waitstatus_to_exitcode(status)}")


def _outcome(report: bytes, exited: str = "") -> Outcome:
    """What a child's report says; `exited` describes its exit status where it sent none."""
    try:
        answer = json.loads(report)
    except ValueError:
        answer = {"error": exited or "sent no report"}
    if "error" in answer:
        return Outcome(None, f"failed ({answer['error']})")
    return Outcome(answer["result"])


def _run_spawned(label: str, work: Callable[[], Any], timeout: float) -> Outcome:
    """`run` without fork(): multiprocessing's spawn, and the child's exit code for how it ended."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_spawned_child, args=(label, work, send), daemon=True)
    try:
        process.start()
    except OSError as exc:
        return Outcome(None, f"could not be started ({exc.strerror or exc})")
    finally:
        send.close()
    report, finished = b"", False
    try:
        if receive.poll(timeout):  # a report, or the pipe closed by the child's death
            finished = True
            report = receive.recv_bytes()
    except (EOFError, OSError):
        pass
    finally:
        receive.close()
        if not finished:
            process.kill()
        process.join()
    if not finished:
        return Outcome(None, f"hung for {timeout:.0f} s")
    code = (process.exitcode or 0) & 0xFFFFFFFF
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        code = json.loads(report).get("crashed", code)
    if code in EXCEPTIONS:
        signal_name, exception, _fault = EXCEPTIONS[code]
        return Outcome(None, f"died with {signal_name} ({exception})")
    return _outcome(report, f"exited with status {code:#x}" if code > 255 else f"exited with status {code}")


def _spawned_child(label: str, work: Callable[[], Any], out: Any) -> None:
    """The spawned child: no crash dialog (Windows Error Reporting would hold the process until someone clicks),
    quiet, then `work` and its report through the pipe."""
    import ctypes

    ctypes.windll.kernel32.SetErrorMode(NO_CRASH_DIALOGS)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    try:
        fault = _fault_for(label)
        if fault in ("SIGILL", "SIGSEGV"):
            code = next(c for c, (name, *_) in EXCEPTIONS.items() if name == fault)
            ctypes.windll.kernel32.RaiseException(code, 1, 0, None)  # EXCEPTION_NONCONTINUABLE, unhandled
        result = work()
        report = {"result": _negated(result) if fault == "wrong" else result}
    except OSError as exc:
        # ctypes turns a fault in the thread that called into llama.cpp into an OSError (a fault in one of its
        # worker threads ends the process with the code instead): either way the kernels crashed.
        code = (exc.winerror or 0) & 0xFFFFFFFF if hasattr(exc, "winerror") else 0
        report = {"crashed": code} if code in EXCEPTIONS else {"error": str(exc)}
    except BaseException as exc:  # whatever happens, the parent gets a report
        report = {"error": str(exc) or type(exc).__name__}
    out.send_bytes(json.dumps(report).encode())
    out.close()


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
