"""Windows: one line when native code kills the model's process, as runtime/supervisor.py gives on POSIX.

Windows has no fork(), so nothing watches the model's process from outside. Instead the process asks Windows
to call it back when an exception reaches the top of a thread with no handler (SetUnhandledExceptionFilter):
the callback writes the line and has Windows end the process at once, with the exception's code as its exit
code. That covers llama.cpp's worker threads, where its kernels run; in a thread that called into
llama.cpp from Python, ctypes turns the same fault into an OSError instead (runtime/devices/proof/child.py reads
those). The crash dialog of Windows Error Reporting is turned off: a server has nobody to click it away.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable

# Windows' exception code -> (the POSIX signal that ends a process for the same fault, the code's name, the fault).
EXCEPTIONS = {
    0xC000001D: ("SIGILL", "EXCEPTION_ILLEGAL_INSTRUCTION", "an illegal instruction"),
    0xC0000096: ("SIGILL", "EXCEPTION_PRIV_INSTRUCTION", "an illegal instruction"),
    0xC0000005: ("SIGSEGV", "EXCEPTION_ACCESS_VIOLATION", "a bad memory access"),
    0xC00000FD: ("SIGSEGV", "EXCEPTION_STACK_OVERFLOW", "a bad memory access"),
    0x80000002: ("SIGBUS", "EXCEPTION_DATATYPE_MISALIGNMENT", "a bad memory access"),
    0xC0000094: ("SIGFPE", "EXCEPTION_INT_DIVIDE_BY_ZERO", "an arithmetic fault"),
}
NO_CRASH_DIALOGS = 0x0001 | 0x0002  # SEM_FAILCRITICALERRORS | SEM_NOGPFAULTERRORBOX
# Test hook: LLAMABOX_TEST_CRASH=SIGILL (or SIGSEGV) makes a native thread of this process fault that way as soon
# as the report is set up, as a kernel of llama.cpp would.
CRASH_TEST_ENV = "LLAMABOX_TEST_CRASH"
# ud2 (an illegal instruction), and a read from address 0.
_FAULTS = {"SIGILL": bytes.fromhex("0f0b"), "SIGSEGV": bytes.fromhex("488b042500000000")}

_FILTER = ctypes.WINFUNCTYPE(ctypes.c_long, ctypes.c_void_p) if hasattr(ctypes, "WINFUNCTYPE") else None
_installed: list[object] = []  # the callback, alive as long as the process


def report(line_for: Callable[[str, str], str]) -> None:
    """From now on, a fault no handler takes writes `line_for(fault, exception_name)` to stderr before the
    process ends."""
    kernel32 = ctypes.WinDLL("kernel32")
    kernel32.SetErrorMode(NO_CRASH_DIALOGS)

    def on_exception(pointers: int) -> int:
        try:
            record = ctypes.cast(pointers, ctypes.POINTER(ctypes.c_void_p))[0]  # EXCEPTION_POINTERS.ExceptionRecord
            code = ctypes.cast(record, ctypes.POINTER(ctypes.c_uint32))[0]  # EXCEPTION_RECORD.ExceptionCode
            if code in EXCEPTIONS:
                _signal, name, fault = EXCEPTIONS[code]
                os.write(2, (line_for(fault, name) + "\n").encode("utf-8", "replace"))
                # EXCEPTION_EXECUTE_HANDLER: the process ends now, with the code as its exit code (and Wine starts
                # no debugger, which it does for EXCEPTION_CONTINUE_SEARCH whatever the error mode says).
                return 1
        except BaseException:  # noqa: S110 - nothing may escape into Windows' exception dispatch
            pass
        return 0  # EXCEPTION_CONTINUE_SEARCH: what Windows would have done

    callback = _FILTER(on_exception)
    _installed.append(callback)
    kernel32.SetUnhandledExceptionFilter.argtypes = [_FILTER]
    kernel32.SetUnhandledExceptionFilter.restype = ctypes.c_void_p
    kernel32.SetUnhandledExceptionFilter(callback)
    fault = os.environ.get(CRASH_TEST_ENV)
    if fault in _FAULTS:
        _fault_in_a_native_thread(kernel32, _FAULTS[fault])


def _fault_in_a_native_thread(kernel32: ctypes.WinDLL, code: bytes) -> None:
    from runtime.devices.cpu_features import executable_copy

    kernel32.CreateThread.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_void_p]
    kernel32.CreateThread.restype = ctypes.c_void_p
    thread = kernel32.CreateThread(None, 0, executable_copy(code), None, 0, None)
    kernel32.WaitForSingleObject.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
    kernel32.WaitForSingleObject(thread, 0xFFFFFFFF)  # the process ends before this returns
