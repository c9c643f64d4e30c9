"""The Windows stub's Vulkan backend (ggml-vulkan.dll) under Wine, on Mesa's lavapipe: Wine's vulkan-1.dll hands
Vulkan to this machine's driver, but only through Wine's X11 driver, so these tests give Wine an X display (Xvfb)
and a wineserver of their own that starts with it. A module apart from tests/test_windows.py, whose server may be
running while its tests run: the wineserver is restarted here, before and after.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import wine

PROMPT = "Name three colours."

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or wine.why_not_ready() is not None, reason=f"Windows stub: {wine.why_not_ready()}"
)

LAVAPIPE_ICD = Path("/usr/share/vulkan/icd.d/lvp_icd.x86_64.json")


@pytest.fixture(scope="module")
def x_display() -> Iterator[str]:
    """An X display for Wine, whose Vulkan reaches this machine's driver only through its X11 driver."""
    if shutil.which("Xvfb") is None:
        pytest.skip("needs Xvfb: Wine's Vulkan goes through its X11 driver (scripts/setup.sh installs xvfb as root)")
    read_end, write_end = os.pipe()
    server = subprocess.Popen(["Xvfb", "-displayfd", str(write_end), "-nolisten", "tcp"], pass_fds=(write_end,),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(write_end)
    try:
        ready, _, _ = select.select([read_end], [], [], 30)
        number = os.read(read_end, 64).decode().strip() if ready else ""
        assert number, "Xvfb did not start"
        # A wineserver started without a display gave its desktop no graphics driver, and every Wine program it
        # runs then has no Vulkan: a new one, started by the first program that runs with DISPLAY set.
        _restart_wineserver()
        yield f":{number}"
    finally:
        _restart_wineserver()
        os.close(read_end)
        server.terminate()
        server.wait(timeout=30)


def _restart_wineserver() -> None:
    subprocess.run(["wineserver", "-k"], env=wine.environment())
    subprocess.run(["wineserver", "-w"], env=wine.environment())


def test_every_layer_on_a_vulkan_gpu_gives_the_cpu_answer(windows_bundle: Path, tmp_path: Path, x_display: str) -> None:
    """The stub's ggml-vulkan.dll on the Vulkan device Wine hands on from this machine's driver: Mesa's lavapipe,
    named as tests/test_gpu_vulkan.py names it. Proven in a spawned child, then every layer on it, same answer."""
    if not LAVAPIPE_ICD.exists():
        pytest.skip("Mesa's lavapipe is not installed (scripts/setup.sh installs mesa-vulkan-drivers as root)")
    env = {"LLAMABOX_CACHE": wine.windows_path(tmp_path), "VK_ICD_FILENAMES": str(LAVAPIPE_ICD), "GGML_VK_VISIBLE_DEVICES": "0",
           "DISPLAY": x_display}
    proved = wine.run(windows_bundle, "--info", timeout=600, **env)
    assert proved.returncode == 0 and "checking the vulkan GPU backend" in proved.stderr, proved.stderr
    assert "GPU found: Vulkan0 llvmpipe" in proved.stdout, proved.stdout
    assert re.search(r"^GPU: Vulkan0 llvmpipe.*: 31/31 layers", proved.stdout, re.M), proved.stdout
    args = ("-p", PROMPT, "--temp", "0", "-n", "16")
    on_gpu, on_cpu = wine.run(windows_bundle, *args, **env), wine.run(windows_bundle, *args, "--gpu", "off", **env)
    assert on_gpu.returncode == 0 and "checking the vulkan" not in on_gpu.stderr, on_gpu.stderr
    assert on_gpu.stdout.strip() and on_gpu.stdout == on_cpu.stdout
