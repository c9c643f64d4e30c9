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


def stub_file_name(platform_name: str) -> str:
    suffix = ".exe" if platform_name.startswith("windows-") else ""
    return f"llamabox-runtime-{platform_name}{suffix}"


# The data file build.py puts into every stub's archive; its presence marks a llamabox stub.
STUB_INFO_NAME = "llamabox_stub.json"
