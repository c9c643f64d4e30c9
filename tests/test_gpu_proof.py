"""The GPU self-test's verdicts and what they are kept by (runtime/devices/proof/gpu.py, runtime/devices/gpu.py).

The self-test itself runs on a real Vulkan device in tests/test_gpu_vulkan.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.devices import gpu
from runtime.devices.proof.gpu import BackendVerdict


@pytest.mark.parametrize(
    ("failure", "lasting"),
    [
        (None, True),
        ("died with SIGSEGV", True),
        ("vulkan: no GPU found", True),
        ("vulkan: not usable here (libvulkan.so.1: cannot open shared object file); it needs ...", True),
        ("hung for 120 s", False),
        ("died with SIGKILL", False),
        ("could not be started (Cannot allocate memory)", False),
        ("failed (llama.cpp could not load proof-Q4_0.gguf)", False),
        ("died with SIGABRT", False),
        ("not tested: the CPU reference died with SIGKILL", False),
    ],
)
def test_only_lasting_verdicts_are_kept(failure: str | None, lasting: bool) -> None:
    assert BackendVerdict(failure=failure).lasting("vulkan") is lasting


def test_a_gpu_that_fails_for_the_moment_is_tried_again() -> None:
    assert BackendVerdict(gpus={"Vulkan0 X 1": "proven", "Vulkan1 Y 2": "gave wrong results (Q4_0 logits off by 90%)"}).lasting("vulkan")
    assert not BackendVerdict(gpus={"Vulkan0 X 1": "proven", "Vulkan1 Y 2": "failed (out of memory)"}).lasting("vulkan")


def test_verdicts_read_back_and_damaged_ones_count_as_none() -> None:
    verdict = BackendVerdict(gpus={"Vulkan0 llvmpipe 1024": "proven", "Vulkan1 X 2048": "gave wrong results (Q4_0 logits off by 90%)"})
    assert BackendVerdict.from_json(verdict.to_json()) == verdict
    assert BackendVerdict.from_json("proven") is None
    assert BackendVerdict.from_json('{"gpus": 3}') is None


def test_a_driver_change_changes_the_fingerprint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    icd = tmp_path / "driver.json"
    icd.write_text('{"ICD": {"library_path": "libvulkan_lvp.so", "api_version": "1.3.230"}}')
    monkeypatch.setenv("VK_ICD_FILENAMES", str(icd))
    before = gpu.driver_fingerprint("vulkan")
    assert gpu.driver_fingerprint("vulkan") == before
    icd.write_text('{"ICD": {"library_path": "libvulkan_lvp.so", "api_version": "1.3.255"}}')
    assert gpu.driver_fingerprint("vulkan") != before
    monkeypatch.setenv("GGML_VK_VISIBLE_DEVICES", "0")
    assert gpu.driver_fingerprint("vulkan") != before


def test_the_modules_a_runtime_carries_best_first(tmp_path: Path) -> None:
    for name in ("vulkan", "cuda", "cpu-haswell"):
        (tmp_path / f"libggml-{name}.so").write_bytes(b"")
    assert list(gpu.modules(tmp_path)) == ["cuda", "vulkan"]
