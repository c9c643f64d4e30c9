"""The CPU kernels' self-test, its cache and fall-back, and the crash message, with the real llama.cpp build.

The faults are made with the runtime's test hook (LLAMABOX_TEST_SELFTEST_FAULT), which makes the
self-test's child process of one variant die with a signal or report wrong logits; everything
else (forking, loading the variant, the comparison, the cache, the messages) is the real thing.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.devices import cpu as backends
from runtime.devices import proof as kernel_proof
from runtime.devices.proof import cache

CHECKING = re.compile(r"checking the (\S+) CPU kernels")


def runtime(*args: str, cache_home: Path, fault: str = "") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "XDG_CACHE_HOME": str(cache_home), "LLAMABOX_TEST_SELFTEST_FAULT": fault}
    env.pop("LLAMABOX_CPU_VARIANT", None)
    env.pop("LLAMABOX_CACHE", None)  # it would take precedence over XDG_CACHE_HOME
    result = subprocess.run([sys.executable, "-m", "runtime", *args], capture_output=True, text=True, env=env, timeout=300)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def info_field(stdout: str, label: str) -> str:
    return next(line for line in stdout.splitlines() if line.startswith(label)).removeprefix(label).strip()


def ranked_here(at_least: int) -> list[str]:
    """This CPU's runnable variants, best first; the test is skipped if it runs fewer than `at_least`."""
    scores, _ = backends.variant_scores()
    names = [s.name for s in backends.ranked(scores)]
    if len(names) < at_least:
        pytest.skip(f"this CPU runs only {names}; the test needs {at_least} variants")
    return names


def test_best_variant_is_proven_once_then_cached(smollm2: Path, tmp_path: Path) -> None:
    ranked = ranked_here(2)
    first = runtime("-m", str(smollm2), "--info", cache_home=tmp_path)
    assert first.returncode == 0, first.stderr
    assert CHECKING.findall(first.stderr) == [ranked[0]]
    assert info_field(first.stdout, "CPU kernels self-test:") == f"{ranked[0]}: proven on this CPU"
    assert info_field(first.stdout, "CPU kernels loaded:").startswith(ranked[0] + " ")

    second = runtime("-m", str(smollm2), "--info", cache_home=tmp_path)
    assert second.returncode == 0, second.stderr
    assert not CHECKING.findall(second.stderr)  # no self-test ran
    assert info_field(second.stdout, "CPU kernels self-test:") == f"{ranked[0]}: proven on this CPU"


def test_variant_that_dies_falls_back_to_the_next_by_score(smollm2: Path, tmp_path: Path) -> None:
    ranked = ranked_here(2)
    best, second_best = ranked[:2]
    first = runtime("-m", str(smollm2), "--info", cache_home=tmp_path, fault=f"{best}=SIGILL")
    assert first.returncode == 0, first.stderr
    assert CHECKING.findall(first.stderr) == [best, second_best]
    expected = f"{best} died with SIGILL in the self-test; using {second_best}"
    assert [line for line in first.stderr.splitlines() if "self-test" in line] == [f"llamabox: warning: {expected}"]
    assert info_field(first.stdout, "CPU kernels self-test:") == expected
    assert info_field(first.stdout, "CPU kernels loaded:").startswith(second_best + " ")

    # The verdict is cached: the next start runs no self-test (the fault hook is gone, the verdict stays).
    second = runtime("-m", str(smollm2), "--info", cache_home=tmp_path)
    assert not CHECKING.findall(second.stderr)
    assert info_field(second.stdout, "CPU kernels self-test:") == expected


def test_wrong_results_and_crashes_walk_down_the_score_order(smollm2: Path, tmp_path: Path) -> None:
    ranked = ranked_here(3)
    best, second_best, third = ranked[:3]
    result = runtime("-m", str(smollm2), "--info", cache_home=tmp_path, fault=f"{best}=wrong,{second_best}=SIGSEGV")
    assert result.returncode == 0, result.stderr
    note = info_field(result.stdout, "CPU kernels self-test:")
    assert re.fullmatch(
        rf"{best} gave wrong results \(\S+ logits off by \d+%\); {second_best} died with SIGSEGV in the self-test; using {third}", note
    ), note
    assert info_field(result.stdout, "CPU kernels loaded:").startswith(third + " ")


def test_answers_the_same_after_a_fall_back(smollm2: Path, tmp_path: Path) -> None:
    ranked = ranked_here(2)
    prompt = ["-m", str(smollm2), "-p", "Write one sentence about cats.", "--temp", "0", "-n", "12"]
    normal = runtime(*prompt, cache_home=tmp_path / "a")
    fallen_back = runtime(*prompt, cache_home=tmp_path / "b", fault=f"{ranked[0]}=SIGILL")
    assert normal.returncode == 0 and fallen_back.returncode == 0, fallen_back.stderr
    assert "cat" in normal.stdout.lower() and fallen_back.stdout == normal.stdout


def test_a_kill_from_outside_is_not_cached(smollm2: Path, tmp_path: Path) -> None:
    ranked = ranked_here(2)
    """A self-test killed from outside (SIGKILL: out of memory, a user) says nothing about the kernels."""
    first = runtime("-m", str(smollm2), "--info", cache_home=tmp_path, fault=f"{ranked[0]}=SIGKILL")
    assert f"{ranked[0]} died with SIGKILL in the self-test; using {ranked[1]}" in first.stdout
    second = runtime("-m", str(smollm2), "--info", cache_home=tmp_path)
    assert CHECKING.findall(second.stderr) == [ranked[0]]  # proven again, this time for good
    assert info_field(second.stdout, "CPU kernels self-test:") == f"{ranked[0]}: proven on this CPU"


def test_forced_variant_skips_the_self_test(smollm2: Path, tmp_path: Path) -> None:
    ranked = ranked_here(2)
    result = runtime("-m", str(smollm2), "--info", "--cpu-variant", ranked[1], cache_home=tmp_path, fault=f"{ranked[1]}=SIGILL")
    assert result.returncode == 0, result.stderr
    assert not CHECKING.findall(result.stderr)
    assert info_field(result.stdout, "CPU kernels self-test:") == f"{ranked[1]}: forced with --cpu-variant, not proven"


def test_portable_kernels_failing_is_a_one_line_error(smollm2: Path, tmp_path: Path) -> None:
    ranked = ranked_here(2)
    portable = ranked[-1]
    result = runtime("-m", str(smollm2), "--info", cache_home=tmp_path, fault=f"{portable}=SIGILL")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"Error: even the portable {portable} CPU kernels died with SIGILL in their self-test; the runtime cannot run on "
        f"this machine (report it with the output of --info --cpu-variant {portable})"
    )


def test_damaged_cache_counts_as_empty(tmp_path: Path) -> None:
    path = tmp_path / "kernel-proofs.json"
    path.write_text("{not json")
    verdicts = cache.VerdictCache(path)
    assert verdicts.get("k") is None
    verdicts.put("k", cache.PROVEN)
    assert cache.VerdictCache(path).get("k") == cache.PROVEN


def test_relative_error() -> None:
    assert kernel_proof.relative_error([1.0, -2.0], [1.0, -2.0]) == 0
    assert kernel_proof.relative_error([1.0, -2.0], [1.0, -1.0]) == pytest.approx(0.5)
    assert kernel_proof.relative_error([1.0, -2.0], [1.0]) == float("inf")
    # Broken kernels often give NaN: it must not pass as "no difference".
    assert not kernel_proof.relative_error([1.0, -2.0], [float("nan"), -2.0]) <= kernel_proof.TOLERANCE
