"""Speculative decoding with a draft model (-md), as llama-server's: the text is the model's own, token for token,
greedy or sampled with a seed, alone or beside other requests; only the number of decode calls changes.

The model here is SmolLM2 with a LoRA adapter (tests/test_lora.py's) at scale 0.3, and the draft is SmolLM2 without
it: the draft then guesses right often, and wrong often enough, so that both ways through the check are taken.

The kernels are the portable x64 ones: llama.cpp's AVX2 kernels compute a token's logits slightly differently
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
from runtime.engine import DraftOptions, Engine, EngineOptions, LoraFile, Sampling
from runtime.errors import LlamaboxError
from runtime.model_source import ModelLocation
from tests.conftest import Server, free_port, start_server, stop_server
from tests.gguf_copy import other_vocabulary
from tests.test_lora import write_lora

PROMPTS = ["Write a short story about a cat.", "List five fruits and say why each is good.", "Explain what a compiler does."]


@pytest.fixture(scope="module", autouse=True)
def cpu_kernels() -> None:
    scores, _ = backends.variant_scores()
    backends.register_cpu_variant(next(v for v in backends.ranked(scores) if v.name == "x64").path)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory, smollm2: Path) -> Path:
    return write_lora(tmp_path_factory.mktemp("lora") / "cats.gguf", smollm2)


def options(adapter: Path, draft: Path | None, **more: object) -> EngineOptions:
    return EngineOptions(
        ctx_size=1024, ctx_per_slot=True, threads=2, lora=(LoraFile(adapter, 0.3),),
        draft=ModelLocation(draft) if draft else None, draft_options=DraftOptions(n_max=4), **more,  # type: ignore[arg-type]
    )


def answer(engine: Engine, question: str, sampling: Sampling) -> tuple[str, int, int, int]:
    done = engine.complete(engine.chat_prompt([{"role": "user", "content": question}]), sampling)
    return done.text, done.completion_tokens, done.timings.draft_n, done.timings.draft_n_accepted


SETTINGS = {"greedy": Sampling(temperature=0, max_tokens=48), "sampled": Sampling(temperature=0.9, seed=7, max_tokens=48)}


@pytest.fixture(scope="module")
def alone(smollm2: Path, adapter: Path) -> dict[tuple[str, str], str]:
    """Each prompt's answer without a draft, greedy and sampled."""
    with Engine(ModelLocation(smollm2), options(adapter, None)) as engine:
        return {(kind, q): answer(engine, q, sampling)[0] for kind, sampling in SETTINGS.items() for q in PROMPTS}


@pytest.fixture(scope="module")
def drafted(smollm2: Path, adapter: Path) -> Iterator[Engine]:
    with Engine(ModelLocation(smollm2), options(adapter, smollm2, parallel=3)) as engine:
        yield engine


@pytest.mark.parametrize("kind", SETTINGS)
def test_the_text_is_the_models_own_with_a_draft_that_guesses_right_and_wrong(drafted: Engine, alone: dict, kind: str) -> None:
    text, tokens, draft_n, accepted = answer(drafted, PROMPTS[0], SETTINGS[kind])
    assert text == alone[kind, PROMPTS[0]] and tokens == 48
    assert draft_n > accepted > 0, (draft_n, accepted)  # guesses were taken and refused


def test_requests_side_by_side_each_get_their_own_text(drafted: Engine, alone: dict) -> None:
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        texts = list(pool.map(lambda q: answer(drafted, q, SETTINGS["greedy"])[0], PROMPTS))
    assert texts == [alone["greedy", q] for q in PROMPTS]
    assert drafted.metrics().draft_tokens_accepted > 0


def test_the_token_limit_holds_when_a_draft_runs_past_it(drafted: Engine, alone: dict) -> None:
    text, tokens, _, _ = answer(drafted, PROMPTS[0], Sampling(temperature=0, max_tokens=6))
    assert tokens == 6 and alone["greedy", PROMPTS[0]].startswith(text)


def test_a_draft_with_another_tokenizer_is_refused_in_one_line(smollm2: Path, tmp_path: Path) -> None:
    other = other_vocabulary(smollm2, tmp_path / "other.gguf")
    with pytest.raises(LlamaboxError, match=r"^other.gguf cannot draft for this model: token 1000 is another word in it; give a draft"):
        Engine(ModelLocation(smollm2), EngineOptions(ctx_size=256, threads=2, draft=ModelLocation(other)))


@pytest.fixture(scope="module")
def draft_server(bundle: Path, smollm2: Path) -> Iterator[Server]:
    server = start_server(
        bundle, "--port", str(free_port()), "--temp", "0", "--ctx-per-slot", "-c", "1024", "-md", str(smollm2), "--draft-max", "4",
        "--metrics", "--cpu-variant", "x64",
    )
    yield server
    stop_server(server)


@pytest.mark.slow
def test_the_server_reports_drafting_as_llama_server(draft_server: Server, bundle: Path) -> None:
    url = draft_server.url
    assert all(slot["speculative"] for slot in httpx.get(url + "slots").json())
    done = httpx.post(url + "completion", json={"prompt": "The three primary colors are", "n_predict": 24}, timeout=120).json()
    assert done["tokens_predicted"] == 24
    timings = done["timings"]
    # The draft is the model itself: its guesses are all taken but where a stop ends the text first.
    assert timings["draft_n"] > 0 and timings["draft_n_accepted"] > 0, timings
    metrics = httpx.get(url + "metrics").text
    for name in ("spec_decode_num_drafts_total", "spec_decode_num_draft_tokens_total", "spec_decode_num_accepted_tokens_total"):
        value = float(next(line.split()[-1] for line in metrics.splitlines() if line.startswith(f"llamacpp:{name} ")))
        assert value > 0, name
    plain = start_server(bundle, "--port", str(free_port()), "--temp", "0", "--ctx-per-slot", "-c", "1024", "--cpu-variant", "x64")
    try:
        without = httpx.post(plain.url + "completion", json={"prompt": "The three primary colors are", "n_predict": 24}, timeout=120).json()
    finally:
        stop_server(plain)
    assert without["content"] == done["content"] and "draft_n" not in without["timings"]


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
