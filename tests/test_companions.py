"""Several models in one file: `llamabox build MODEL --draft D --lora A[:SCALE] --embedding E` carries each GGUF after
the model, mapped or read in place from the bundle, listed by `inspect` with its SHA-256 and licence, checked by
`verify`, and used by the runtime (speculative decoding, the adapter at its scale, /v1/embeddings).

The models: SmolLM2 as the draft (its own draft: every guess right), tests/test_lora.py's adapter, and as the
embedding model a copy of SmolLM2 whose output norm has every other weight negated, so that its embeddings are
SmolLM2's with every other component negated (mean pooling and unit length commute with that)."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from runtime import bundle_format
from tests.conftest import SOURCE_DATE_EPOCH, Server, free_port, llamabox, start_server, stop_server
from tests.gguf_copy import copy_gguf, other_vocabulary
from tests.test_lora import write_lora

pytestmark = pytest.mark.slow



def alternating(n: int) -> np.ndarray:
    return np.where(np.arange(n) % 2 == 0, 1.0, -1.0).astype(np.float32)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory, smollm2: Path) -> Path:
    return write_lora(tmp_path_factory.mktemp("lora") / "cats.gguf", smollm2)


@pytest.fixture(scope="module")
def embedder(tmp_path_factory: pytest.TempPathFactory, smollm2: Path) -> Path:
    def flipped(name: str, data: np.ndarray) -> np.ndarray:
        return data * alternating(data.shape[-1]) if name == "output_norm.weight" else data

    return copy_gguf(smollm2, tmp_path_factory.mktemp("embedder") / "signed.gguf", tensor=flipped)


@pytest.fixture(scope="module")
def carrying(tmp_path_factory: pytest.TempPathFactory, smollm2: Path, stub: Path, adapter: Path, embedder: Path) -> Path:
    out = tmp_path_factory.mktemp("carrying") / "carrying.run"
    result = llamabox(
        "build", smollm2, "-o", out, "--stub", stub, "--draft", smollm2, "--lora", f"{adapter}:0.3", "--embedding", embedder,
        SOURCE_DATE_EPOCH=SOURCE_DATE_EPOCH,
    )
    assert result.returncode == 0, result.stderr
    return out


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_inspect_lists_each_model_with_its_hash_and_verify_checks_them(carrying: Path, smollm2: Path, adapter: Path, embedder: Path, tmp_path: Path) -> None:
    shown = llamabox("inspect", carrying).stdout
    assert f"Draft model:      {smollm2.name} (" in shown and f"sha256 {sha256(smollm2)}, licence apache-2.0" in shown
    assert f"LoRA adapter:     {adapter.name} at scale 0.3 (" in shown and f"sha256 {sha256(adapter)}" in shown
    assert f"Embedding model:  {embedder.name} (" in shown and f"sha256 {sha256(embedder)}" in shown
    checked = llamabox("verify", carrying)
    assert checked.returncode == 0 and f"OK: {carrying.name}: lora {adapter.name}, sha256 {sha256(adapter)}" in checked.stdout
    # One byte of the adapter flipped: verify and --verify name it, and a repack refuses to copy it.
    damaged = tmp_path / "damaged.run"
    shutil.copy(carrying, damaged)
    lora = next(c for c in bundle_format.open_bundle(damaged).manifest.companions if c.role == "lora")
    with open(damaged, "r+b") as f:
        f.seek(lora.offset + lora.size - 10)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 1]))
    refused = llamabox("verify", damaged)
    assert refused.returncode == 1 and f"the lora model {adapter.name} inside it is damaged" in refused.stderr
    started = subprocess.run([str(damaged), "--verify", "-p", "Hi", "-n", "2"], capture_output=True, text=True, timeout=120)
    assert started.returncode == 1 and f"the lora model {adapter.name} inside it is damaged" in started.stderr
    assert "Traceback" not in started.stderr


@pytest.fixture(scope="module")
def carried_server(carrying: Path) -> Iterator[Server]:
    # The portable kernels: with them a draft changes no greedy token (see tests/test_speculative.py).
    server = start_server(carrying, "--port", str(free_port()), "--temp", "0", "--ctx-per-slot", "-c", "1024", "--cpu-variant", "x64")
    yield server
    stop_server(server)


def test_the_runtime_uses_what_the_bundle_carries(carried_server: Server, bundle: Path, adapter: Path) -> None:
    url = carried_server.url
    assert all(slot["speculative"] for slot in httpx.get(url + "slots").json())
    assert [(a["path"], a["scale"]) for a in httpx.get(url + "lora-adapters").json()] == [(adapter.name, 0.3)]
    body = {"prompt": "The three primary colors are", "n_predict": 16}
    done = httpx.post(url + "completion", json=body, timeout=120).json()
    assert done["timings"]["draft_n_accepted"] > 0
    # The same text as the plain bundle given the adapter at 0.3 on its command line.
    plain = start_server(
        bundle, "--port", str(free_port()), "--temp", "0", "--ctx-per-slot", "-c", "1024", "--lora-scaled", f"{adapter}:0.3", "--cpu-variant", "x64")
    try:
        assert httpx.post(plain.url + "completion", json=body, timeout=120).json()["content"] == done["content"]
        ours = np.array(httpx.post(url + "v1/embeddings", json={"input": "Cats sleep a lot."}).json()["data"][0]["embedding"])
        theirs = np.array(httpx.post(plain.url + "v1/embeddings", json={"input": "Cats sleep a lot."}).json()["data"][0]["embedding"])
    finally:
        stop_server(plain)
    assert np.allclose(ours, theirs * alternating(len(theirs)), atol=1e-4)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--lora", "{model}"], "--lora SmolLM2-135M-Instruct.Q4_1.gguf is a model, not a LoRA adapter; give it with --draft, --embedding or --reranker"),
        (["--draft", "{adapter}"], "--draft cats.gguf is a LoRA adapter, not a model; give it with --lora"),
        (["--draft", "{other}"], "other.gguf cannot draft for this model: token 1000 is another word in it; give a draft model of the same family (the same tokenizer)"),
        (["--draft", "{model}", "--sidecar"], "--sidecar keeps one model beside the executable; leave it out to bundle --draft, --lora, --embedding or --reranker"),
    ],
)
def test_companions_a_user_gets_wrong_are_one_line_and_nothing_is_written(
    smollm2: Path, stub: Path, adapter: Path, tmp_path: Path, extra: list[str], message: str
) -> None:
    other = other_vocabulary(smollm2, tmp_path / "other.gguf") if "{other}" in extra else None
    args = [a.replace("{model}", str(smollm2)).replace("{adapter}", str(adapter)).replace("{other}", str(other)) for a in extra]
    out = tmp_path / "out.run"
    result = llamabox("build", smollm2, "-o", out, "--stub", stub, *args)
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1] == f"Error: {message}", result.stderr
    assert not out.exists() and list(tmp_path.glob("out*")) == []
