"""Speculative decoding with a draft model (-md), as llama-server's: the text is the model's own, token for token,
greedy or sampled with a seed, alone or beside other requests; only the number of decode calls changes.

The model here is SmolLM2 with a LoRA adapter (tests/test_lora.py's) at scale 0.3, and the draft is SmolLM2 without
it: the draft then guesses right often, and wrong often enough, so that both ways through the check are taken.

Each server runs in its own process on the portable x64 kernels (--cpu-variant x64): llama.cpp's AVX2 kernels compute a token's logits slightly differently
when it is decoded alone than in a batch of several (the sums of the attention come in another order once the
context passes 48 tokens), which a draft's batch would show as another greedy choice now and then; native
llama-server has the same property. The portable kernels give the same logits either way, so that what is
checked here is the scheduler's bookkeeping, exactly.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from runtime.devices import cpu as backends
from runtime.engine import Engine, EngineOptions
from runtime.errors import LlamaboxError
from runtime.model_source import ModelLocation
from tests.conftest import Server, free_port, start_server, stop_server
from tests.gguf_copy import other_vocabulary
from tests.test_lora import write_lora

PROMPTS = ["Write a short story about a cat.", "List five fruits and say why each is good.", "Explain what a compiler does."]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory, smollm2: Path) -> Path:
    return write_lora(tmp_path_factory.mktemp("lora") / "cats.gguf", smollm2)


@pytest.fixture(scope="module")
def servers(bundle: Path, smollm2: Path, adapter: Path) -> Iterator[tuple[Server, Server]]:
    """The model without a draft and with one, each in its own process (so with its own kernels: the portable ones)."""
    common = ["--ctx-per-slot", "-c", "1024", "-np", "3", "--lora-scaled", f"{adapter}:0.3", "--cpu-variant", "x64", "--metrics"]
    plain = start_server(bundle, "--port", str(free_port()), *common)
    try:
        drafted = start_server(bundle, "--port", str(free_port()), *common, "-md", str(smollm2), "--draft-max", "4")
    except BaseException:
        stop_server(plain)
        raise
    yield plain, drafted
    stop_server(drafted)
    stop_server(plain)


SETTINGS = {"greedy": {"temperature": 0}, "sampled": {"temperature": 0.9, "seed": 7}}


def chat(server: Server, question: str, max_tokens: int = 48, **settings: object) -> dict:
    body = {"messages": [{"role": "user", "content": question}], "max_tokens": max_tokens, **settings}
    return httpx.post(server.url + "v1/chat/completions", json=body, timeout=300).json()


def text(answer: dict) -> str:
    return answer["choices"][0]["message"]["content"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", SETTINGS)
def test_the_text_is_the_models_own_with_a_draft_that_guesses_right_and_wrong(servers: tuple[Server, Server], kind: str) -> None:
    plain, drafted = servers
    alone, guessed = chat(plain, PROMPTS[0], **SETTINGS[kind]), chat(drafted, PROMPTS[0], **SETTINGS[kind])
    assert text(guessed) == text(alone) and guessed["usage"]["completion_tokens"] == 48
    timings = guessed["timings"]
    assert timings["draft_n"] > timings["draft_n_accepted"] > 0, timings  # guesses were taken and refused
    assert "draft_n" not in alone["timings"]


@pytest.mark.slow
def test_requests_side_by_side_each_get_their_own_text(servers: tuple[Server, Server]) -> None:
    plain, drafted = servers
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        texts = list(pool.map(lambda q: text(chat(drafted, q, temperature=0)), PROMPTS))
    assert texts == [text(chat(plain, q, temperature=0)) for q in PROMPTS]


@pytest.mark.slow
def test_the_token_limit_holds_when_a_draft_runs_past_it(servers: tuple[Server, Server]) -> None:
    plain, drafted = servers
    short = chat(drafted, PROMPTS[0], max_tokens=6, temperature=0)
    assert short["usage"]["completion_tokens"] == 6 and text(chat(plain, PROMPTS[0], temperature=0)).startswith(text(short))


@pytest.mark.slow
def test_the_server_reports_drafting_as_llama_server(servers: tuple[Server, Server]) -> None:
    _, drafted = servers
    url = drafted.url
    assert all(slot["speculative"] for slot in httpx.get(url + "slots").json())
    done = httpx.post(url + "completion", json={"prompt": "The three primary colors are", "n_predict": 24, "temperature": 0}, timeout=120).json()
    assert done["tokens_predicted"] == 24 and done["timings"]["draft_n"] > 0
    slot = max(httpx.get(url + "slots").json(), key=lambda s: s["draft_n"])
    assert slot["draft_n"] > 0 and slot["draft_n_accepted"] <= slot["draft_n"]
    metrics = httpx.get(url + "metrics").text
    for name in ("spec_decode_num_drafts_total", "spec_decode_num_draft_tokens_total", "spec_decode_num_accepted_tokens_total"):
        value = float(next(line.split()[-1] for line in metrics.splitlines() if line.startswith(f"llamacpp:{name} ")))
        assert value > 0, name


def test_a_draft_with_another_tokenizer_is_refused_in_one_line(smollm2: Path, tmp_path: Path) -> None:
    scores, _ = backends.variant_scores()
    backends.register_cpu_variant(backends.ranked(scores)[0].path)
    other = other_vocabulary(smollm2, tmp_path / "other.gguf")
    with pytest.raises(LlamaboxError, match=r"^other.gguf cannot draft for this model: token 1000 is another word in it; give a draft"):
        Engine(ModelLocation(smollm2), EngineOptions(ctx_size=256, threads=2, draft=ModelLocation(other)))


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--spec-type", "draft-simple"], "--spec-type draft-simple needs a draft model: give one with -md DRAFT.gguf"),
        (["-md", "{model}", "--draft-min", "5", "--draft-max", "2"], "--draft-min 5 is above --draft-max 2: no draft would ever be checked"),
        (["-md", "missing.gguf"], "model file not found: missing.gguf"),
    ],
)
def test_draft_flags_a_user_gets_wrong_are_one_line(bundle: Path, smollm2: Path, flags: list[str], message: str) -> None:
    import subprocess

    args = [flag.replace("{model}", str(smollm2)) for flag in flags]
    result = subprocess.run([str(bundle), *args, "-p", "Hi", "-n", "2"], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"Error: {message}", result.stderr
