"""Names for the platform a runtime stub is built for, shared by build.py, the bundler and the runtime."""

from __future__ import annotations

import platform
import sys

_MACHINES = {"amd64": "x86_64", "x64": "x86_64", "aarch64": "arm64"}
_SYSTEMS = {"win32": "windows", "darwin": "macos"}


def current_platform() -> str:
    """For example 'linux-x86_64', 'macos-arm64' or 'windows-x86_64'."""
    system = _SYSTEMS.get(sys.platform, sys.platform)
    machine = platform.machine().lower()
    return f"{system}-{_MACHINES.get(machine, machine)}"


# GPU backends that have stubs of their own (llamabox-runtime-linux-x86_64-cuda), besides those every stub
# carries (Vulkan): CUDA's runtime and cuBLAS add hundreds of megabytes that most receivers would not use.
GPU_STUBS = ("cuda",)


def stub_file_name(platform_name: str, gpu: str | None = None) -> str:
    """For example 'llamabox-runtime-linux-x86_64', or with gpu='cuda' 'llamabox-runtime-linux-x86_64-cuda'."""
    suffix = ".exe" if platform_name.startswith("windows-") else ""
    return f"llamabox-runtime-{platform_name}{'-' + gpu if gpu else ''}{suffix}"


# The data file build.py puts into every stub's archive; its presence marks a llamabox stub.
STUB_INFO_NAME = "llamabox_stub.json"
