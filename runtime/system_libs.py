"""The machine's C++ runtime, where it is newer than the one the stub carries.

The portable stub carries Debian 11's libstdc++ (GCC 10), the newest its own libraries may need, and
PyInstaller points the dynamic loader at it. A GPU driver is the machine's, though, built against the
machine's libstdc++: Mesa's Vulkan drivers (RADV, ANV, llvmpipe) need GCC 12's or newer, and with the
stub's older copy loaded the driver does not load and the GPU is lost. libstdc++ is backward compatible,
so loading the newer of the two before anything else needs one serves both: every later library that
needs libstdc++.so.6 gets the one already loaded.
"""

from __future__ import annotations

import ctypes
import os
import re
import sys
from pathlib import Path

_SYSTEM_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/lib64", "/lib")
_NAME = "libstdc++.so.6"


def prefer_newer_cxx_runtime(carried_dir: Path) -> Path | None:
    """Load the machine's libstdc++ when it is newer than the one in `carried_dir`; the one loaded, or None."""
    if not sys.platform.startswith("linux"):
        return None
    carried = carried_dir / _NAME
    system = next((Path(d) / _NAME for d in _SYSTEM_DIRS if (Path(d) / _NAME).exists()), None)
    if not carried.exists() or system is None or cxx_abi_level(system) <= cxx_abi_level(carried):
        return None
    try:
        ctypes.CDLL(os.path.realpath(system), mode=ctypes.RTLD_GLOBAL)
    except OSError:  # not loadable here (another architecture's, damaged): the carried one serves
        return None
    return system


def cxx_abi_level(library: Path) -> tuple[int, ...]:
    """The newest GLIBCXX_ symbol version a libstdc++ defines, e.g. (3, 4, 30) for GCC 12's; () if unreadable."""
    try:
        data = library.read_bytes()
    except OSError:
        return ()
    versions = {tuple(int(x) for x in m.split(b".")) for m in re.findall(rb"GLIBCXX_(\d+\.\d+(?:\.\d+)?)\x00", data)}
    return max(versions, default=())
