"""Keeping llama.cpp quiet while it loads and frees (its log and the C library's output), unless --verbose."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

from llama_cpp._utils import suppress_stdout_stderr


@contextlib.contextmanager
def quiet(verbose: bool) -> Iterator[None]:
    """llama-cpp-python's suppress_stdout_stderr on POSIX: file descriptors 1 and 2 to /dev/null for the while.

    Not on Windows: there os.dup2 closes the handle that descriptor held, and click, which writes to a console
    through the handle it took at its first write, would then fail ("Windows error: 6") on the next line it
    prints. There only Python's streams are swapped, which is where llama.cpp's log goes (llama-cpp-python's
    log callback writes to sys.stderr).
    """
    if verbose:
        yield
    elif sys.platform == "win32":
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
            yield
    else:
        with suppress_stdout_stderr(disable=False):
            yield
