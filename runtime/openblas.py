"""NumPy's OpenBLAS, which the runtime loads but never uses: keep it harmless and idle.

llama-cpp-python's package imports NumPy, and NumPy loads OpenBLAS, which picks its kernels and
starts a thread per core at load time. The runtime never multiplies a matrix with it (llama.cpp
has its own kernels), so it gets one thread, and a core type forced from outside
(OPENBLAS_CORETYPE, which some machines set for their own BLAS programs) is dropped: it can name
kernels this CPU lacks and kill the runtime with SIGILL before it prints a word. qemu-user
passes the environment through, so under emulation such a setting names the host's CPU, not the
emulated one (tests/test_cpu_dispatch.py). Must run before NumPy is imported.
"""

from __future__ import annotations

import os


def keep_idle() -> None:
    os.environ.pop("OPENBLAS_CORETYPE", None)
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
