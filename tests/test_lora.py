"""LoRA adapters as llama-server handles them (--lora, --lora-scaled, GET/POST /lora-adapters, a request's `lora`),
with an adapter written here for SmolLM2 (random low-rank weights on its last feed-forward layer: no real adapter
this small exists). What follows from its weights: at scale 0 it changes nothing, at scale 1 it changes the answer."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import gguf
import httpx
import numpy as np
import pytest

from runtime.devices import cpu as backends
from runtime.engine import Engine, EngineOptions, LoraError, LoraFile, Sampling
from runtime.errors import ModelFileError
from runtime.model_source import ModelLocation
from tests.conftest import Server, free_port, start_server, stop_server

QUESTION = "Write one sentence about cats."
TARGET = "blk.29.ffn_down.weight"  # SmolLM2-135M's last feed-forward projection


def write_lora(path: Path, base: Path, rank: int = 4, seed: int = 0) -> Path:
    """A LoRA GGUF for `base`: lora_a (ne: n_in x rank) and lora_b (rank x n_out) on TARGET, alpha = rank."""
    n_in, n_out = (int(n) for n in next(t for t in gguf.GGUFReader(base).tensors if t.name == TARGET).shape[:2])
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(rank))
    writer.add_string("adapter.lora.task_name", "test-task")
    rng = np.random.default_rng(seed)
    writer.add_tensor(f"{TARGET}.lora_a", (rng.standard_normal((rank, n_in)) * 0.5).astype(np.float32))
    writer.add_tensor(f"{TARGET}.lora_b", (rng.standard_normal((n_out, rank)) * 0.5).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module", autouse=True)
def cpu_kernels() -> None:
    scores, _ = backends.variant_scores()
    backends.register_cpu_variant(backends.ranked(scores)[0].path)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory, smollm2: Path) -> Path:
    return write_lora(tmp_path_factory.mktemp("lora") / "cats.gguf", smollm2)


def answer(engine: Engine, lora: dict[int, float] | None = None) -> str:
    prompt = engine.chat_prompt([{"role": "user", "content": QUESTION}])
    return engine.complete(prompt, Sampling(temperature=0, max_tokens=16, lora=lora)).text


@pytest.fixture(scope="module")
def base_answer(smollm2: Path) -> str:
    with Engine(ModelLocation(smollm2), EngineOptions(ctx_size=512, threads=2)) as plain:
        return answer(plain)


@pytest.fixture(scope="module")
def adapted(smollm2: Path, adapter: Path) -> Iterator[Engine]:
    """Two slots, each with its own cache, so that answers side by side are exactly the answers alone."""
    with Engine(ModelLocation(smollm2), EngineOptions(ctx_size=512, ctx_per_slot=True, parallel=2, threads=2, lora=(LoraFile(adapter),))) as engine:
        yield engine


def test_an_adapter_at_scale_0_changes_nothing_and_at_scale_1_changes_the_answer(adapted: Engine, base_answer: str) -> None:
    assert "cat" in base_answer.lower()
    changed = answer(adapted)
    assert changed != base_answer
    assert answer(adapted, {0: 0.0}) == base_answer
    assert answer(adapted, {}) == base_answer  # adapters a request leaves out get 0, as llama-server's
    assert answer(adapted) == changed  # and the cache made at scale 0 was not reused at scale 1


def test_requests_with_other_scales_side_by_side_answer_as_alone(adapted: Engine, base_answer: str) -> None:
    alone = answer(adapted, {0: 1.0})
    results: dict[str, str] = {}
    threads = [threading.Thread(target=lambda name=name, lora=lora: results.__setitem__(name, answer(adapted, lora)))
               for name, lora in (("on", {0: 1.0}), ("off", {0: 0.0}))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {"on": alone, "off": base_answer}


def test_the_scales_new_requests_get_and_what_is_listed(adapted: Engine, adapter: Path, base_answer: str) -> None:
    assert adapted.adapters.describe() == [{"id": 0, "path": str(adapter), "scale": 1.0, "task_name": "test-task", "prompt_prefix": ""}]
    adapted.adapters.set_scales({0: 0.0})
    try:
        assert answer(adapted) == base_answer and adapted.adapters.describe()[0]["scale"] == 0.0
    finally:
        adapted.adapters.set_scales({0: 1.0})
    with pytest.raises(LoraError, match="there is no LoRA adapter 3: this server has ids 0 to 0"):
        answer(adapted, {3: 1.0})


def test_a_file_that_is_not_an_adapter_for_this_model_is_one_line(smollm2: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match=r"--lora .*: llama.cpp cannot apply it to this model"):
        Engine(ModelLocation(smollm2), EngineOptions(ctx_size=256, threads=2, lora=(LoraFile(smollm2),)))


@pytest.fixture(scope="module")
def lora_server(bundle: Path, adapter: Path) -> Iterator[Server]:
    server = start_server(bundle, "--port", str(free_port()), "--temp", "0", "--ctx-per-slot", "-c", "512", "--lora", str(adapter))
    yield server
    stop_server(server)


@pytest.mark.slow
def test_the_server_lists_sets_and_takes_per_request_scales(lora_server: Server, adapter: Path, base_answer: str) -> None:
    url = lora_server.url
    listed = httpx.get(url + "lora-adapters").json()
    assert listed == [{"id": 0, "path": str(adapter), "scale": 1.0, "task_name": "test-task", "prompt_prefix": ""}]
    chat = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 16, "temperature": 0}

    def reply(**extra: object) -> str:
        return httpx.post(url + "v1/chat/completions", json={**chat, **extra}, timeout=120).json()["choices"][0]["message"]["content"]

    changed = reply()
    assert changed != base_answer and reply(lora=[{"id": 0, "scale": 0}]) == base_answer
    assert httpx.post(url + "lora-adapters", json=[{"id": 0, "scale": 0.0}]).json() == {"success": True}
    assert httpx.get(url + "lora-adapters").json()[0]["scale"] == 0.0 and reply() == base_answer
    assert reply(lora=[{"id": 0, "scale": 1.0}]) == changed
    refused = httpx.post(url + "completion", json={"prompt": "Hi", "lora": [{"id": 7, "scale": 1}]})
    assert refused.status_code == 400 and "there is no LoRA adapter 7" in refused.json()["error"]["message"]
    bad = httpx.post(url + "lora-adapters", json={"id": 0, "scale": 1})
    assert bad.status_code == 400 and "must be a list" in bad.json()["error"]["message"]


@pytest.mark.slow
def test_a_missing_adapter_file_is_one_line(bundle: Path, tmp_path: Path) -> None:
    import subprocess

    result = subprocess.run([str(bundle), "--lora", str(tmp_path / "nope.gguf"), "-p", "Hi"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "nope.gguf: no such file" in result.stderr and "Traceback" not in result.stderr
