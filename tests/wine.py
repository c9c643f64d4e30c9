"""Running Windows programs under Wine for the tests: the prefix and environment scripts/windows_toolchain.sh uses,
and the toolchain's paths (asked of scripts/build_windows.sh, which owns them)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "build_windows.sh"


def cache_home() -> Path:
    return Path(os.environ.get("LLAMABOX_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llamabox")


def environment(**extra: str) -> dict[str, str]:
    """What every Wine call runs with (windows_env in scripts/windows_toolchain.sh): its prefix, no window, quiet."""
    env = {key: value for key, value in os.environ.items() if key not in ("DISPLAY", "WAYLAND_DISPLAY")}
    env.update(WINEPREFIX=str(cache_home() / "windows" / "prefix"), WINEDEBUG="-all", WINEDLLOVERRIDES="mscoree,mshtml=")
    env.update(extra)
    return env


def why_not_ready() -> str | None:
    """Why the Windows stub cannot be built or run here; None when it can."""
    if shutil.which("wine") is None:
        return "needs Wine (scripts/setup.sh installs wine64 as root on Linux x86-64)"
    if subprocess.run([str(SCRIPT), "ready"], cwd=ROOT).returncode != 0:
        return "the Windows toolchain is not prepared (scripts/setup.sh, or scripts/build_windows.sh prepare)"
    return None


def windows_python() -> Path:
    """The toolchain's Windows python.exe."""
    return Path(subprocess.run([str(SCRIPT), "python"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip())


def windows_path(path: Path) -> str:
    """A Linux path as Windows programs under Wine name it (drive Z: is /)."""
    return "Z:" + str(path.resolve()).replace("/", "\\")


def run(program: Path, *args: str, timeout: float = 300, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    """Run a Windows program under Wine and wait. Its output goes through pipes: Wine 8 cannot hand a Windows
    program a regular file as stdout or stderr."""
    return subprocess.run(
        ["wine", str(program), *args],
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        stdin=subprocess.DEVNULL,
        timeout=timeout,
        cwd=cwd,
        env=environment(**env),
    )


def start(program: Path, *args: str, **env: str) -> subprocess.Popen[str]:
    """Start a Windows program under Wine, its output on pipes."""
    return subprocess.Popen(
        ["wine", str(program), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        encoding="utf-8",
        errors="replace",
        env=environment(**env),
    )
