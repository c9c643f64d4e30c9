"""Every benchmark script starts from the README's set-up: its imports resolve and its --help answers.

A missing import (matplotlib, once) should fail here, not fifteen minutes into a newcomer's measurement.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT

SCRIPTS = sorted(p for p in (ROOT / "benchmarks").glob("*.py") if "argparse.ArgumentParser" in p.read_text())


def test_every_benchmark_script_is_listed() -> None:
    assert {p.stem for p in SCRIPTS} >= {"run", "startup", "concurrency", "cpu_variants", "soak"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_help_answers(script) -> None:
    result = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage:")


def test_the_smallest_real_run_of_run_py_goes_to_the_end(stub, tmp_path) -> None:
    """One round of every measurement with a few tokens, against native llama-server (built once, cached): what
    a newcomer's `python benchmarks/run.py` does, so that it cannot die in its last step again."""
    output = tmp_path / "BENCHMARKS.md"
    result = subprocess.run([sys.executable, "benchmarks/run.py", "--quick", "--runs", "1", "--stub", str(stub), "--output", str(output)],
                            capture_output=True, text=True, cwd=ROOT, timeout=3600)
    assert result.returncode == 0, result.stderr[-3000:]
    text = output.read_text()
    assert "| context one request may fill at defaults (tokens) | 8192.00 | 8192.00 | 1.00× |" in text
    assert "| aggregate tok/s, 8 streaming clients (4 wait) |" in text
    assert (tmp_path / "benchmarks" / "ratios.png").stat().st_size > 0


def test_the_chart_library_is_installed() -> None:
    # benchmarks/run.py and concurrency.py draw their charts with it (pyproject's "bench" extra, which setup.sh installs).
    import matplotlib

    assert matplotlib.__version__
