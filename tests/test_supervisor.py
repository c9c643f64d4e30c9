"""The watcher process: a crash of the model's process becomes one line, Ctrl+C stops the server once.

The runtime runs from source here (the executable's own bootloader layer is tested in
test_executable.py); the model's process is the watcher's only child.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc to find the model's process")


@pytest.fixture
def serving(smollm2: Path, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """The runtime serving SmolLM2 from source, in a process group of its own (as in a terminal)."""
    port = free_port()
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    env.pop("LLAMABOX_CACHE", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "runtime", "-m", str(smollm2), "--nobrowser", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(url + "health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the runtime did not start: {process.stderr.read() if process.stderr else ''}")
        time.sleep(0.2)
    yield process, url
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def model_process(watcher: int) -> int:
    children = Path(f"/proc/{watcher}/task/{watcher}/children").read_text().split()
    assert len(children) == 1, children  # the model runs in one child; the watcher only waits
    return int(children[0])


@pytest.mark.parametrize(
    ("crash", "message"),
    [
        ("SIGILL", "died of an illegal instruction (SIGILL) in the {variant} CPU kernels; start again with --cpu-variant x64 (portable) or another variant listed by --info"),
        ("SIGSEGV", "died of a bad memory access (SIGSEGV) in the {variant} CPU kernels; start again with --cpu-variant x64 (portable) or another variant listed by --info"),
        ("SIGKILL", "was killed (SIGKILL); if nobody killed it, the machine ran out of memory"),
    ],
)
def test_death_of_the_model_process_is_one_line(serving: tuple[subprocess.Popen[str], str], crash: str, message: str) -> None:
    process, url = serving
    variant = httpx.get(url + "props").json()["hardware"]["cpu_variant"]
    os.kill(model_process(process.pid), signal.Signals[crash])
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.Signals[crash]
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == "llamabox: the model's process " + message.format(variant=variant)


def test_ctrl_c_stops_the_server_cleanly(serving: tuple[subprocess.Popen[str], str]) -> None:
    """Ctrl+C reaches every process of the terminal's group: the model's process must see it once
    (a second SIGINT makes uvicorn skip its graceful shutdown), and the watcher exits as it does."""
    process, _ = serving
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr and "Aborted" not in stderr
    assert stderr.strip().splitlines()[-1] == "llamabox: stopped"


def test_terminate_reaches_the_model_process(serving: tuple[subprocess.Popen[str], str]) -> None:
    process, _ = serving
    model = model_process(process.pid)
    process.terminate()  # SIGTERM to the watcher alone, as `kill` sends it
    _, stderr = process.communicate(timeout=60)
    # uvicorn shuts down, then ends by the same signal; the watcher exits as the shell would report it.
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr
    assert not Path(f"/proc/{model}").exists()
