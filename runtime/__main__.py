"""Entry point of the runtime, both frozen by PyInstaller and as `python -m runtime`."""

import sys

# A child the kernel self-test spawned on Windows (runtime/devices/proof/child.py) runs its work here. The test is
# freeze_support's own, made first so that other starts do not pay for importing multiprocessing (0.3 s under Wine).
if sys.platform == "win32" and "--multiprocessing-fork" in sys.argv:
    import multiprocessing

    multiprocessing.freeze_support()

from runtime import packaged, runtime_cache  # noqa: E402

runtime_cache.prepare(packaged.launch())  # first: a damaged unpacked runtime must not go on loading

if packaged.is_frozen():  # before anything loads a C++ library: GPU drivers need the machine's newer libstdc++
    from runtime import system_libs

    system_libs.prefer_newer_cxx_runtime(packaged.unpacked_dir())

import os  # noqa: E402

from runtime import openblas  # noqa: E402

# ggml's abort runs gdb on the process for a backtrace: a screen of noise for users (and gdb's own errors under the
# runtime's library path). The supervisor says in one line what died and what to do.
os.environ.setdefault("GGML_NO_BACKTRACE", "1")

openblas.keep_idle()  # before anything imports NumPy

from runtime.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
