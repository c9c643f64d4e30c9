"""Reranking as llama-server's /rerank: a reranker a bundle carries (`llamabox build --reranker`) or the model itself
(`--reranking`). The reranker is written here (tests/tiny_reranker.py: no real one is small enough to ship), so each
score is known from its weights."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from runtime.devices import cpu as backends
from runtime.engine import Engine, EngineOptions
from runtime.errors import ModelFileError
from runtime.model_source import ModelLocation
from tests.conftest import SOURCE_DATE_EPOCH, Server, free_port, llamabox, start_server, stop_server
from tests.tiny_reranker import expected_score, write_reranker

QUERY = "where do cats sleep"
DOCUMENTS = ["a bird flew away.", "the cat sat on the mat.", "the dog sleeps.", "cats sleep on the mat."]


@pytest.fixture(scope="module", autouse=True)
def cpu_kernels() -> None:
    scores, _ = backends.variant_scores()
    backends.register_cpu_variant(backends.ranked(scores)[0].path)


@pytest.fixture(scope="module")
def reranker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_reranker(tmp_path_factory.mktemp("reranker") / "tiny-reranker.gguf")


def test_each_score_is_what_the_rerankers_weights_give(smollm2: Path, reranker: Path) -> None:
    with Engine(ModelLocation(smollm2), EngineOptions(ctx_size=256, threads=2, reranker=ModelLocation(reranker))) as engine:
        scored = engine.rerank(QUERY, DOCUMENTS)
    assert [score for score, _ in scored] == pytest.approx([expected_score(QUERY, d) for d in DOCUMENTS], abs=2e-3)
    # [CLS], the query's 4 tokens, [SEP], the document's (each word and "." one token)
    assert [tokens for _, tokens in scored] == [6 + 5, 6 + 7, 6 + 4, 6 + 6]


def test_the_model_itself_ranks_with_reranking(reranker: Path) -> None:
    with Engine(ModelLocation(reranker), EngineOptions(ctx_size=64, threads=2, reranking=True)) as engine:
        assert engine.rerank(QUERY, DOCUMENTS[:1])[0][0] == pytest.approx(expected_score(QUERY, DOCUMENTS[0]), abs=2e-3)


def test_a_model_without_a_ranking_head_is_refused(smollm2: Path) -> None:
    with pytest.raises(ModelFileError, match=r"is not a reranker \(its pooling type is not rank"):
        Engine(ModelLocation(smollm2), EngineOptions(ctx_size=256, threads=2, reranking=True))


@pytest.fixture(scope="module")
def ranking(tmp_path_factory: pytest.TempPathFactory, smollm2: Path, stub: Path, reranker: Path) -> Iterator[Server]:
    out = tmp_path_factory.mktemp("ranking") / "ranking.run"
    built = llamabox("build", smollm2, "-o", out, "--stub", stub, "--reranker", reranker, SOURCE_DATE_EPOCH=SOURCE_DATE_EPOCH)
    assert built.returncode == 0, built.stderr
    assert f"Reranker model:   {reranker.name} (" in llamabox("inspect", out).stdout
    server = start_server(out, "--port", str(free_port()), "-c", "512")
    yield server
    stop_server(server)


@pytest.mark.slow
@pytest.mark.parametrize("path", ["rerank", "reranking", "v1/rerank", "v1/reranking"])
def test_rerank_answers_in_jinas_shape_best_first(ranking: Server, path: str) -> None:
    answer = httpx.post(ranking.url + path, json={"query": QUERY, "documents": DOCUMENTS, "top_n": 3}).json()
    expected = sorted(((expected_score(QUERY, d), i) for i, d in enumerate(DOCUMENTS)), reverse=True)[:3]
    assert [r["index"] for r in answer["results"]] == [i for _, i in expected]
    assert [r["relevance_score"] for r in answer["results"]] == pytest.approx([s for s, _ in expected], abs=2e-3)
    assert set(answer["results"][0]) == {"index", "relevance_score"} and answer["object"] == "list"
    assert answer["usage"] == {"prompt_tokens": 46, "total_tokens": 46}  # every pair read, as llama-server counts


@pytest.mark.slow
def test_texts_answer_in_teis_shape(ranking: Server) -> None:
    answer = httpx.post(ranking.url + "rerank", json={"query": QUERY, "texts": DOCUMENTS[:2], "return_text": True}).json()
    assert [(r["index"], r["text"]) for r in answer] == [(1, DOCUMENTS[1]), (0, DOCUMENTS[0])]
    assert answer[0]["score"] == pytest.approx(expected_score(QUERY, DOCUMENTS[1]), abs=2e-3)


@pytest.mark.slow
@pytest.mark.parametrize(
    "body, message",
    [
        ({"documents": ["a"]}, "'query' is required"),
        ({"query": 3, "documents": ["a"]}, "'query' must be a string"),
        ({"query": "q", "documents": []}, "'documents' must be a non-empty string array"),
        ({"query": "q", "documents": ["a", 2]}, "'documents' must be a non-empty string array"),
        ({"query": "q", "documents": ["a"], "top_n": -1}, "'top_n' must be at least 0"),
        ({"query": "cat " * 40, "documents": ["cat " * 40]}, "the query and a document are 82 tokens together, more than the reranker's 64; shorten them"),
    ],
)
def test_bad_rerank_requests_are_400_in_llama_servers_shape(ranking: Server, body: dict, message: str) -> None:
    answer = httpx.post(ranking.url + "rerank", json=body)
    assert answer.status_code == 400 and answer.json()["error"]["message"] == message and answer.json()["error"]["code"] == 400


@pytest.mark.slow
def test_a_bundle_without_a_reranker_answers_501(server: Server) -> None:
    answer = httpx.post(server.url + "v1/rerank", json={"query": "q", "documents": ["a"]})
    assert answer.status_code == 501 and answer.json()["error"]["type"] == "not_supported_error"
    assert answer.json()["error"]["message"].startswith("This server does not support reranking. Start it with `--reranking`")


@pytest.mark.slow
def test_a_reranker_that_is_not_one_is_refused_at_build(smollm2: Path, stub: Path, tmp_path: Path) -> None:
    result = llamabox("build", smollm2, "-o", tmp_path / "x.run", "--stub", stub, "--reranker", smollm2)
    assert result.returncode == 1 and not (tmp_path / "x.run").exists()
    assert "--reranker SmolLM2-135M-Instruct.Q4_1.gguf has no ranking head" in result.stderr


@pytest.mark.slow
def test_reranking_runs_from_the_command_line(bundle: Path, reranker: Path) -> None:
    """-m R.gguf --reranking, as llama-server is started for a reranker."""
    server = start_server(bundle, "--port", str(free_port()), "-m", str(reranker), "--reranking", "-c", "64", "--no-webui")
    try:
        answer = httpx.post(server.url + "rerank", json={"query": QUERY, "documents": DOCUMENTS[:1]}).json()
    finally:
        stop_server(server)
    assert answer["results"][0]["relevance_score"] == pytest.approx(expected_score(QUERY, DOCUMENTS[0]), abs=2e-3)
