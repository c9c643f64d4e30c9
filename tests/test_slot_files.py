"""Saving a slot's cache to a file and restoring it (llama-server's POST /slots/{id}?action=save|restore|erase with
--slot-save-path): a restored prompt is not read again, and the answer is the same."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from runtime.devices import cpu as backends
from runtime.engine import Engine, EngineOptions, Sampling, SlotFileError
from runtime.model_source import ModelLocation
from tests.conftest import Server, free_port, start_server, stop_server

QUESTION = "Describe the water cycle in three sentences."


@pytest.fixture(scope="module", autouse=True)
def cpu_kernels() -> None:
    scores, _ = backends.variant_scores()
    backends.register_cpu_variant(backends.ranked(scores)[0].path)


@pytest.fixture(scope="module")
def engine(smollm2: Path) -> Iterator[Engine]:
    with Engine(ModelLocation(smollm2), EngineOptions(ctx_size=512, ctx_per_slot=True, parallel=2, threads=2)) as engine:
        yield engine


def test_a_saved_slot_restored_is_reused_and_answers_the_same(engine: Engine, tmp_path: Path) -> None:
    prompt = engine.chat_prompt([{"role": "user", "content": QUESTION}])
    sampling = Sampling(temperature=0, max_tokens=12)
    first = engine.complete(prompt, sampling)
    held = [s.cached_tokens for s in engine.slots()[0]]
    slot = held.index(max(held))
    saved = engine.save_slot(slot, tmp_path / "water.bin")
    assert saved.tokens == max(held) == len(prompt.tokens) + 12 - 1 and saved.bytes == (tmp_path / "water.bin").stat().st_size
    assert engine.erase_slot(slot) == saved.tokens and engine.slots()[0][slot].cached_tokens == 0
    restored = engine.restore_slot(slot, tmp_path / "water.bin")
    assert restored.tokens == saved.tokens and engine.slots()[0][slot].cached_tokens == saved.tokens
    again = engine.complete(prompt, sampling)
    assert again.text == first.text and again.cached_tokens == len(prompt.tokens) - 1  # only the last token read again


def test_a_file_that_is_not_a_saved_slot_and_a_missing_slot_are_errors(engine: Engine, tmp_path: Path) -> None:
    (tmp_path / "junk.bin").write_bytes(b"not a slot" * 10)
    with pytest.raises(SlotFileError, match="Unable to restore slot: no room in the cache, or not a slot saved by this model"):
        engine.restore_slot(0, tmp_path / "junk.bin")
    with pytest.raises(SlotFileError, match="Unable to restore slot: there is no saved slot nothing.bin"):
        engine.restore_slot(0, tmp_path / "nothing.bin")
    with pytest.raises(SlotFileError, match="Invalid slot ID"):
        engine.save_slot(5, tmp_path / "x.bin")


@pytest.fixture(scope="module")
def saving_server(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    folder = tmp_path_factory.mktemp("slots")
    server = start_server(bundle, "--port", str(free_port()), "--temp", "0", "-np", "1", "-c", "512", "--slot-save-path", str(folder))
    yield server, folder
    stop_server(server)


@pytest.mark.slow
def test_the_slot_routes_answer_as_llama_servers(saving_server: tuple[Server, Path]) -> None:
    server, folder = saving_server
    url = server.url
    done = httpx.post(url + "completion", json={"prompt": QUESTION, "n_predict": 8}, timeout=120).json()
    held = httpx.get(url + "slots").json()[0]["cached_tokens"]
    saved = httpx.post(url + "slots/0?action=save", json={"filename": "q.bin"}).json()
    assert saved["id_slot"] == 0 and saved["filename"] == "q.bin" and saved["n_saved"] == held >= done["tokens_evaluated"]
    assert saved["n_written"] == (folder / "q.bin").stat().st_size and "save_ms" in saved["timings"]
    assert httpx.post(url + "slots/0?action=erase").json() == {"id_slot": 0, "n_erased": saved["n_saved"]}
    restored = httpx.post(url + "slots/0?action=restore", json={"filename": "q.bin"}).json()
    assert restored["n_restored"] == saved["n_saved"] and restored["n_read"] == saved["n_written"] and "restore_ms" in restored["timings"]
    again = httpx.post(url + "completion", json={"prompt": QUESTION, "n_predict": 8}, timeout=120).json()
    assert again["content"] == done["content"] and again["timings"]["cache_n"] == done["tokens_evaluated"] - 1
    for path, body, message in [
        ("slots/0?action=save", {"filename": "../escape.bin"}, "'filename' is not a valid file name (a name, not a path)"),
        ("slots/0?action=copy", {}, "Invalid action"),
        ("slots/x?action=erase", {}, "Invalid slot ID"),
        ("slots/3?action=erase", {}, "Invalid slot ID"),
    ]:
        answer = httpx.post(url + path, json=body)
        assert answer.status_code == 400 and answer.json()["error"]["message"] == message, (path, answer.text)
    assert not (folder.parent / "escape.bin").exists()


@pytest.mark.slow
def test_without_a_save_path_the_slot_routes_answer_501(server: Server) -> None:
    answer = httpx.post(server.url + "slots/0?action=erase")
    assert answer.status_code == 501 and "Start it with `--slot-save-path`" in answer.json()["error"]["message"]
