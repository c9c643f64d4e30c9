"""The Vulkan backend in the built executable, on Mesa's lavapipe: a Vulkan device that runs on the CPU.

ggml-vulkan passes over CPU-type devices unless GGML_VK_VISIBLE_DEVICES names them, so these tests name
lavapipe, and only it (VK_ICD_FILENAMES), as a receiver's real GPU would be found by default. Each test that
proves the GPU gets a cache of its own where it checks the self-test; the rest share one, so that the
self-test runs once.
"""

from __future__ import annotations

import concurrent.futures
import math
import os
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port, llamabox, start_server, stop_server

pytestmark = pytest.mark.slow

LAVAPIPE_ICD = Path("/usr/share/vulkan/icd.d/lvp_icd.x86_64.json")
QUESTION = "Write one sentence about cats."
LAYERS = 31  # SmolLM2-135M: 30 layers and the output layer, as llama.cpp counts them

if not LAVAPIPE_ICD.exists():
    pytest.skip("Mesa's lavapipe is not installed (scripts/setup.sh installs mesa-vulkan-drivers as root)", allow_module_level=True)


def lavapipe(cache: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "VK_ICD_FILENAMES": str(LAVAPIPE_ICD), "GGML_VK_VISIBLE_DEVICES": "0", "LLAMABOX_CACHE": str(cache), **extra}


def run(executable: Path, *args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(executable), *args], capture_output=True, text=True, env=env, timeout=timeout)
    assert "Traceback" not in result.stderr, result.stderr
    return result


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vulkan-cache")


def test_the_stub_carries_vulkan(stub: Path) -> None:
    listed = llamabox("stubs", "--stub-dir", stub.parent)
    assert listed.returncode == 0, listed.stderr
    assert "  backends:        CPU (" in listed.stdout and "), VULKAN" in listed.stdout
    assert "needs glibc:     2.31" in listed.stdout or "needs glibc:     2.3" in listed.stdout


def test_every_layer_on_lavapipe_gives_the_cpu_answer(bundle: Path, shared_cache: Path) -> None:
    info = run(bundle, "--info", env=lavapipe(shared_cache))
    assert info.returncode == 0, info.stderr
    assert "checking the vulkan GPU backend" in info.stderr
    assert "GPU found: Vulkan0 llvmpipe" in info.stdout
    assert "GPU: Vulkan0 llvmpipe" in info.stdout and f"{LAYERS}/{LAYERS} layers" in info.stdout
    on_gpu = run(bundle, "-p", QUESTION, "--temp", "0", "-n", "24", env=lavapipe(shared_cache))
    on_cpu = run(bundle, "-p", QUESTION, "--temp", "0", "-n", "24", "--gpu", "off", env=lavapipe(shared_cache))
    assert on_gpu.returncode == 0, on_gpu.stderr
    assert "checking the vulkan" not in on_gpu.stderr  # proven once, then taken from the cache
    assert on_gpu.stdout == on_cpu.stdout
    assert "cat" in on_gpu.stdout.lower()


def test_partial_offload(bundle: Path, shared_cache: Path) -> None:
    info = run(bundle, "--info", "--gpu-layers", "10", env=lavapipe(shared_cache))
    assert f"10/{LAYERS} layers (--gpu-layers)" in info.stdout
    answer = run(bundle, "-p", QUESTION, "--temp", "0", "-n", "24", "-ngl", "10", env=lavapipe(shared_cache))
    assert answer.returncode == 0 and "cat" in answer.stdout.lower(), answer.stderr


def test_gpu_off_and_gpu_device(bundle: Path, shared_cache: Path) -> None:
    off = run(bundle, "--info", "--gpu", "off", env=lavapipe(shared_cache))
    assert "GPU: GPU off (--gpu off): running on the CPU" in off.stdout and "GPU found" not in off.stdout
    picked = run(bundle, "--info", "--gpu-device", "Vulkan0", env=lavapipe(shared_cache))
    assert "Vulkan0 llvmpipe" in picked.stdout and f"{LAYERS}/{LAYERS} layers" in picked.stdout
    unknown = run(bundle, "--info", "--gpu-device", "CUDA3", env=lavapipe(shared_cache))
    assert unknown.returncode == 1
    assert unknown.stderr.strip().splitlines()[-1] == "Error: --gpu-device CUDA3: no such GPU here; choose one of: Vulkan0"
    bad = run(bundle, "--info", "--gpu-layers", "many", env=lavapipe(shared_cache))
    assert bad.returncode == 2 and "'many' is neither auto nor a number of layers" in bad.stderr


def test_software_devices_are_passed_over_unless_named(bundle: Path, tmp_path: Path) -> None:
    env = lavapipe(tmp_path)
    del env["GGML_VK_VISIBLE_DEVICES"]
    info = run(bundle, "--info", env=env)
    assert info.returncode == 0
    assert "GPU: vulkan: no GPU found (software devices such as llvmpipe are used only when GGML_VK_VISIBLE_DEVICES names them)" in info.stdout
    assert "GPU: no usable GPU: running on the CPU" in info.stdout


def test_no_vulkan_driver_falls_back_in_one_line(bundle: Path, tmp_path: Path) -> None:
    env = lavapipe(tmp_path, VK_ICD_FILENAMES=str(tmp_path / "no-such-driver.json"))
    answer = run(bundle, "-p", QUESTION, "--temp", "0", "-n", "8", env=env)
    assert answer.returncode == 0 and answer.stdout.strip(), answer.stderr
    info = run(bundle, "--info", env=env)
    vulkan_lines = [line for line in info.stdout.splitlines() if line.startswith("GPU: vulkan")]
    assert len(vulkan_lines) == 1, info.stdout
    assert "GPU: no usable GPU: running on the CPU" in info.stdout


def test_no_vulkan_loader_falls_back_in_one_line(bundle: Path, tmp_path: Path) -> None:
    loader = Path("/usr/lib/x86_64-linux-gnu/libvulkan.so.1")
    if os.geteuid() != 0 or shutil.which("unshare") is None or not loader.exists():
        pytest.skip("hiding the Vulkan loader needs root and unshare")
    # In a mount namespace of its own, the loader is an empty file: as on a machine without it.
    hidden = f"mount --bind /dev/null {loader} && exec {bundle} --info"
    info = subprocess.run(["unshare", "-m", "sh", "-c", hidden], capture_output=True, text=True, env=lavapipe(tmp_path), timeout=300)
    assert info.returncode == 0, info.stderr
    assert "Traceback" not in info.stderr
    line = next(line for line in info.stdout.splitlines() if line.startswith("GPU: vulkan"))
    assert line.startswith("GPU: vulkan: not usable here (") and line.endswith("it needs the Vulkan loader (libvulkan.so.1) and a Vulkan driver")


@pytest.mark.parametrize(("fault", "said"), [("wrong", "gave wrong results"), ("SIGSEGV", "died with SIGSEGV")])
def test_the_self_test_passes_over_a_faulty_gpu(bundle: Path, tmp_path: Path, fault: str, said: str) -> None:
    env = lavapipe(tmp_path, LLAMABOX_TEST_SELFTEST_FAULT=f"vulkan={fault}")
    info = run(bundle, "--info", env=env)
    assert info.returncode == 0, info.stderr
    assert said in info.stdout and "passed over" in info.stdout
    assert "GPU: no usable GPU: running on the CPU" in info.stdout
    answer = run(bundle, "-p", QUESTION, "--temp", "0", "-n", "8", env=env)
    assert answer.returncode == 0 and answer.stdout.strip()
    assert "checking the vulkan" not in answer.stderr  # the verdict is kept: a broken GPU is not retried at every start


def test_concurrent_requests_and_embeddings_on_the_gpu(bundle: Path, shared_cache: Path) -> None:
    server = start_server(bundle, "--temp", "0", "--port", str(free_port()), env=lavapipe(shared_cache), timeout=300)
    try:
        props = httpx.get(server.url + "props").json()
        assert props["hardware"]["gpu"]["name"] == "Vulkan0" and props["hardware"]["gpu_layers"] == LAYERS
        assert props["hardware"]["gpus"][0]["used"] is True and props["hardware"]["gpus"][0]["memory_total"] > 0

        def ask(_: int) -> str:
            body = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 16, "temperature": 0}
            return httpx.post(server.url + "v1/chat/completions", json=body, timeout=300).json()["choices"][0]["message"]["content"]

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(ask, range(4)))
        assert len(set(answers)) == 1 and answers[0]
        embedded = httpx.post(server.url + "v1/embeddings", json={"input": "cats"}, timeout=300).json()["data"][0]["embedding"]
        assert math.isclose(math.fsum(x * x for x in embedded), 1.0, rel_tol=1e-3)
        facts = _chat_page_facts(server.url)
        assert "GPU: llvmpipe (LLVM" in facts and f"(Vulkan0, {LAYERS}/{LAYERS} layers)" in facts
    finally:
        stop_server(server)
    assert "Vulkan0 llvmpipe" in server.process.stderr.read()


def test_a_crash_with_layers_on_the_gpu_names_it(bundle: Path, shared_cache: Path) -> None:
    """The model's process dying (here killed with SIGSEGV, as a fault in a GPU backend would) ends the executable
    with one line naming the GPU that held layers, and the ways out."""
    from tests.test_executable import _children

    running = start_server(bundle, "--port", str(free_port()), env=lavapipe(shared_cache), timeout=300)
    try:
        variant = httpx.get(running.url + "props").json()["hardware"]["cpu_variant"]
        subprocess.run(["kill", "-SEGV", str(_children(running.pid)[-1])], check=True)
        _, stderr = running.process.communicate(timeout=60)
    finally:
        stop_server(running)
    assert running.process.returncode == 139 and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == (
        f"llamabox: the model's process died of a bad memory access (SIGSEGV) with layers on Vulkan0 and the {variant} "
        "CPU kernels; start again with -fa off, or --gpu off to leave the GPU out"
    )


def _chat_page_facts(url: str) -> str:
    """The model's facts under the chat page's header, as headless Chromium shows them."""
    chromium = shutil.which("chromium")
    sync_api = pytest.importorskip("playwright.sync_api")
    if chromium is None:
        pytest.skip("needs Debian's chromium (scripts/setup.sh installs it as root)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--headless", "--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            page.goto(url)
            # A locator, not wait_for_function: the page's Content-Security-Policy forbids evaluating strings.
            facts = page.locator("#model-facts", has_text="GPU")
            facts.wait_for(timeout=60000)
            return facts.inner_text()
        finally:
            browser.close()
