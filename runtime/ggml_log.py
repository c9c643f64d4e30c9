"""Capturing ggml's log (which otherwise goes straight to stderr) while calling into ggml."""

from __future__ import annotations

import contextlib
import ctypes
import sys
from collections.abc import Callable, Iterator

LOG_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)


@contextlib.contextmanager
def captured_log(lib: ctypes.CDLL) -> Iterator[list[str]]:
    """Route ggml's log into the yielded list; `lib` is runtime.devices.ggml.ggml(), which declares ggml_log_set."""
    messages: list[str] = []

    def capture(_level: int, text: bytes, _user: int) -> None:
        messages.append(text.decode("utf-8", "replace"))

    callback = LOG_CALLBACK(capture)
    lib.ggml_log_set(callback, None)
    try:
        yield messages
    finally:
        lib.ggml_log_set(LOG_CALLBACK(), None)  # a NULL callback restores ggml's default


_kept: list[object] = []  # the callbacks ggml holds, kept alive


def filtered(lib: ctypes.CDLL, keep: Callable[[str], bool]) -> None:
    """From now on, ggml's log goes to stderr without what `keep` refuses (the RPC backend's lines a worker
    prints only with --verbose, and a head's transport errors, which its own one line replaces)."""

    def write(_level: int, text: bytes, _user: int) -> None:
        line = text.decode("utf-8", "replace")
        if keep(line):
            sys.stderr.write(line)
            sys.stderr.flush()

    callback = LOG_CALLBACK(write)
    _kept.append(callback)
    lib.ggml_log_set(callback, None)
