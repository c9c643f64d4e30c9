"""The multi-sequence engine with the real SmolLM2: slots decoding together, per-request sampling,
prompt reuse, cancellation, the waiting line and context limits."""

from __future__ import annotations

import asyncio
import re
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from runtime.cache_plan import CachePlan
from runtime.devices import cpu as backends
from runtime.engine import (
    Engine,
    EngineOptions,
    Prompt,
    PromptError,
    PromptTooLongError,
    QueueFullError,
    Sampling,
    SamplingError,
)
from runtime.model_source import ModelLocation

GREEDY = Sampling(temperature=0, max_tokens=24)


@pytest.fixture(scope="module", autouse=True)
def cpu_kernels() -> None:
    """This test process runs llama.cpp itself: register the best CPU variant, as the runtime does."""
    scores, _ = backends.variant_scores()
    backends.register_cpu_variant(backends.ranked(scores)[0].path)


@pytest.fixture(scope="module")
def engine(smollm2: Path) -> Engine:
    """Four slots with 1,024 cells of cache each. Each sequence's cells then lie together, so greedy answers
    beside others are exactly the answers alone; in one shared cache (the default, tested below) they drift
    apart after a while, as llama-server's do."""
    return Engine(ModelLocation(smollm2), EngineOptions(ctx_size=1024, ctx_per_slot=True, parallel=4, max_waiting=2, threads=2))


def ask(engine: Engine, text: str) -> Prompt:
    return engine.chat_prompt([{"role": "user", "content": text}])


def run_together(engine: Engine, jobs: list[tuple[Prompt, Sampling]]) -> list[tuple[str, str | None]]:
    """Start every job at once (all submitted before any is read), then read them on threads."""
    streams = [engine.stream(prompt, sampling) for prompt, sampling in jobs]
    results: list[tuple[str, str | None]] = [("", None)] * len(jobs)

    def read(i: int) -> None:
        pieces = list(streams[i])
        results[i] = ("".join(p.text for p in pieces), pieces[-1].finish_reason)

    threads = [threading.Thread(target=read, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return results


def test_four_different_requests_at_once(engine: Engine) -> None:
    jobs = [
        (ask(engine, "Write one sentence about cats."), Sampling(temperature=0, max_tokens=24)),
        (ask(engine, "Count from one to ten in words."), Sampling(temperature=0, max_tokens=40, stop=["5."])),
        (ask(engine, "Name a color."), Sampling(temperature=0.9, seed=7, max_tokens=8)),
        (engine.text_prompt("The capital of France is"), Sampling(temperature=0, max_tokens=6)),
    ]
    alone = [engine.complete(prompt, sampling) for prompt, sampling in jobs]
    together = run_together(engine, jobs)
    # Greedy (and seeded) answers are the same beside three others as alone; stop strings and limits hold.
    assert [text for text, _ in together] == [done.text for done in alone]
    assert "cat" in together[0][0].lower()
    assert together[1][1] == "stop" and "5." not in together[1][0] and "4." in together[1][0]
    assert together[2][1] == "length" and alone[2].completion_tokens == 8
    assert together[3][1] == "length" and "Paris" in together[3][0]


def test_prompt_reuse_returns_what_a_cold_run_returns(engine: Engine, smollm2: Path) -> None:
    """The second turn reads only what the first did not; its answer is the one a fresh engine gives.

    (Where the cached part was *generated* one token at a time rather than read as a prompt, its
    keys and values come from other kernels and a near-tie can tip the other way, as in llama-server.)
    """
    history = [
        {"role": "user", "content": "Write one sentence about cats."},
        {"role": "assistant", "content": "Cats are curious animals that love to nap in the sun."},
        {"role": "user", "content": "And about dogs?"},
    ]
    first = engine.chat_prompt(history[:1])
    engine.complete(first, Sampling(temperature=0, max_tokens=1))
    warm = engine.complete(engine.chat_prompt(history), GREEDY)
    assert warm.cached_tokens == len(first.tokens)  # the first turn was not read again
    cold_engine = Engine(ModelLocation(smollm2), EngineOptions(ctx_size=1024, parallel=1, threads=2))
    cold = cold_engine.complete(engine.chat_prompt(history), GREEDY)
    assert cold.cached_tokens == 0
    assert warm.text == cold.text and "dog" in warm.text.lower()


def test_cancelled_stream_frees_its_slot_and_others_finish(engine: Engine) -> None:
    long = Sampling(temperature=0, max_tokens=200)
    dropped = engine.stream(ask(engine, "Tell me a long story about a dragon."), long)
    kept = engine.stream(ask(engine, "Write one sentence about cats."), GREEDY)
    next(dropped)
    dropped.close()  # the client went away
    pieces = list(kept)
    assert pieces[-1].finish_reason in ("stop", "length") and "cat" in "".join(p.text for p in pieces).lower()
    slots, waiting = engine.slots()
    assert not any(s.is_processing for s in slots) and waiting == 0


def test_waiting_line_is_bounded(engine: Engine) -> None:
    long = Sampling(temperature=0, max_tokens=400)
    streams = [engine.stream(engine.text_prompt(f"Story {i}:"), long) for i in range(6)]  # 4 slots + 2 waiting
    try:
        with pytest.raises(QueueFullError, match="all 4 slots are busy and 2 requests are waiting"):
            engine.stream(engine.text_prompt("One more"), long)
    finally:
        for stream in streams:
            stream.close()


def test_generation_stops_at_the_end_of_its_context(smollm2: Path) -> None:
    small = Engine(ModelLocation(smollm2), EngineOptions(ctx_size=64, parallel=2, threads=2))
    prompt = small.text_prompt("Once upon a time")
    done = small.complete(prompt, Sampling(temperature=0, max_tokens=1000, logit_bias={small.tokenize("<|endoftext|>", add_bos=False)[0]: -100}))
    assert done.finish_reason == "length" and len(prompt.tokens) + done.completion_tokens <= small.n_ctx
    with pytest.raises(PromptTooLongError, match=f"the context holds {small.n_ctx};"):
        small.stream(small.text_prompt("word " * (small.n_ctx + 10)), GREEDY)


def test_one_request_may_use_the_whole_shared_cache_and_a_part_per_slot_may_not(smollm2: Path) -> None:
    """The same 512 cells: shared, one request may fill them; split in two parts (--ctx-per-slot), it may not."""
    shared = Engine(ModelLocation(smollm2), EngineOptions(ctx_size=512, parallel=2, threads=2))
    assert shared.cache == CachePlan(512, 2, shared=True) and shared.n_ctx == 512
    long_prompt = shared.text_prompt("word " * 300)
    assert shared.complete(long_prompt, Sampling(temperature=0, max_tokens=8)).completion_tokens == 8
    shared.close()
    split = Engine(ModelLocation(smollm2), EngineOptions(ctx_size=256, ctx_per_slot=True, parallel=2, threads=2))
    assert split.cache == CachePlan(512, 2, shared=False) and split.n_ctx == 256
    with pytest.raises(PromptTooLongError, match="the context holds 256;"):
        split.stream(long_prompt, GREEDY)
    split.close()


def test_requests_that_fill_the_shared_cache_end_or_wait_and_never_corrupt_each_other(smollm2: Path) -> None:
    """Two endless requests share 256 cells: they grow together until the cache is full, then the one holding
    most ends with "length" and the other goes on in the cells it freed; a third, whose prompt does not fit beside them, waits for
    their cells and then answers as it does alone.

    (Beside another sequence in one cache, attention sums the same terms in another order, as in llama-server,
    so long greedy texts drift apart from the ones given alone after a few dozen tokens; they start alike.)"""
    shared = Engine(ModelLocation(smollm2), EngineOptions(ctx_size=256, parallel=3, threads=2))
    ends = [shared.tokenize(end, add_bos=False)[0] for end in ("<|endoftext|>", "<|im_end|>")]
    endless = Sampling(temperature=0, max_tokens=1000, logit_bias={token: -100 for token in ends})
    prompts = [shared.text_prompt("Once upon a time"), shared.text_prompt("The history of Rome")]
    late = (shared.text_prompt("word " * 180 + "The capital of France is"), Sampling(temperature=0, max_tokens=6))
    alone = [shared.complete(prompt, endless) for prompt in prompts] + [shared.complete(*late)]
    assert [done.finish_reason for done in alone] == ["length"] * 3
    assert all(len(prompt.tokens) + done.completion_tokens >= 250 for prompt, done in zip(prompts, alone))  # each filled it
    together = run_together(shared, [(prompt, endless) for prompt in prompts] + [late])
    assert [reason for _, reason in together] == ["length"] * 3
    assert [text[:30] for text, _ in together[:2]] == [done.text[:30] for done in alone[:2]]
    assert together[2][0][:3] == alone[2].text[:3]  # read once the others had ended: the same first token
    # They grew side by side until the 256 cells were full; the one ended then, the other had the cells it freed.
    shorter, longer = sorted(len(prompt.tokens) + len(shared.tokenize(text, add_bos=False)) for prompt, (text, _) in zip(prompts, together))
    assert shorter <= 128 + 4 and longer >= 250
    slots, waiting = shared.slots()
    assert not any(s.is_processing for s in slots) and waiting == 0
    shared.close()


def test_idle_prompts_wait_in_memory_and_come_back_for_the_next_turn(smollm2: Path) -> None:
    """In a shared cache, a new request moves the idle slots' prompts out of it (they would slow it down); the next
    turn of a parked chat gets its prompt back and reads only what is new."""
    shared = Engine(ModelLocation(smollm2), EngineOptions(ctx_size=2048, parallel=2, threads=2))
    history = [{"role": "user", "content": "Write one sentence about cats."}]
    first = shared.complete(shared.chat_prompt(history), GREEDY)
    shared.complete(ask(shared, "Name a color."), Sampling(temperature=0, max_tokens=4))
    held = sorted(s.cached_tokens for s in shared.slots()[0])
    assert held[0] == 0 and held[1] > 0  # only the last request's prompt stays in the cache
    history += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And about dogs?"}]
    turn = shared.chat_prompt(history)
    second = shared.complete(turn, GREEDY)
    assert second.cached_tokens >= len(shared.chat_prompt(history[:1]).tokens)  # the parked chat came back
    assert second.text
    shared.close()


def test_bad_settings_are_refused_before_any_output(engine: Engine) -> None:
    with pytest.raises(SamplingError, match="outside the model's vocabulary"):
        engine.stream(ask(engine, "Hi"), Sampling(logit_bias={10**9: 1.0}))
    with pytest.raises(SamplingError, match="grammar"):
        engine.stream(ask(engine, "Hi"), Sampling(grammar="root ::= ("))


def test_grammar_constrains_the_answer(engine: Engine) -> None:
    done = engine.complete(ask(engine, "Is the sky blue? Answer yes or no."), Sampling(temperature=0.8, seed=1, grammar='root ::= "yes" | "no"'))
    assert done.text in ("yes", "no")


def test_async_readers_get_the_same_answers_on_one_thread(engine: Engine) -> None:
    prompts = [ask(engine, "Write one sentence about cats."), ask(engine, "Name a fruit.")]
    expected = [engine.complete(prompt, GREEDY).text for prompt in prompts]

    async def read_all() -> list[str]:
        dropped = engine.astream(ask(engine, "Tell me a long story."), Sampling(temperature=0, max_tokens=200))
        await dropped.__anext__()  # type: ignore[attr-defined]
        dropped.close()  # type: ignore[attr-defined]

        async def one(prompt: Prompt) -> str:
            return "".join([piece.text async for piece in engine.astream(prompt, GREEDY)])

        return list(await asyncio.gather(*(one(prompt) for prompt in prompts)))

    threads_before = threading.active_count()
    assert asyncio.run(read_all()) == expected
    assert threading.active_count() == threads_before
    assert not any(slot.is_processing for slot in engine.slots()[0])


def test_embeddings_are_pooled_unit_vectors_and_leave_the_slots_alone(engine: Engine) -> None:
    prompt = ask(engine, "Write one sentence about cats.")
    alone = engine.complete(prompt, GREEDY).text
    stream = engine.stream(prompt, GREEDY)  # a chat decoding while embeddings are made
    cat, cat_again, mat, revenue = (
        engine.embed(text) for text in
        ["The cat sat on the mat.", "The cat sat on the mat.", "A cat was sitting on a mat.", "Quarterly revenue rose by four percent."]
    )
    assert "".join(piece.text for piece in stream) == alone
    assert cat == cat_again and len(cat) == 576  # SmolLM2's width
    assert all(abs(sum(x * x for x in v) - 1) < 1e-4 for v in (cat, mat, revenue))
    similarity = lambda a, b: sum(x * y for x, y in zip(a, b))  # noqa: E731
    assert similarity(cat, mat) > similarity(cat, revenue)


def test_bad_prompts_are_refused_and_others_go_on(engine: Engine) -> None:
    other = engine.stream(ask(engine, "Write one sentence about cats."), GREEDY)
    with pytest.raises(PromptError, match="empty"):
        engine.stream(Prompt(tokens=[]), GREEDY)
    with pytest.raises(PromptError, match="outside the model's vocabulary"):
        engine.stream(Prompt(tokens=[1, -1]), GREEDY)
    assert "cat" in "".join(piece.text for piece in other).lower()


def test_an_async_reader_abandoned_with_its_event_loop_does_not_stop_the_engine(engine: Engine) -> None:
    async def start_and_leave() -> None:
        stream = engine.astream(ask(engine, "Tell me a long story."), Sampling(temperature=0, max_tokens=100))
        await stream.__anext__()  # type: ignore[attr-defined]

    asyncio.run(start_and_leave())  # the loop closes with the request still generating
    assert "cat" in engine.complete(ask(engine, "Write one sentence about cats."), GREEDY).text.lower()
    assert not any(slot.is_processing for slot in engine.slots()[0])


def test_repetition_penalties_change_the_answer(engine: Engine) -> None:
    """Each penalty reaches llama.cpp's sampler (a wrong call signature once made every penalty a 500)."""
    prompt = ask(engine, "Repeat the word 'cat' ten times.")
    plain = engine.complete(prompt, replace(GREEDY, max_tokens=40)).text
    for penalty in ({"repeat_penalty": 1.5}, {"frequency_penalty": 2.0}, {"presence_penalty": 2.0}):
        penalised = engine.complete(prompt, replace(GREEDY, max_tokens=40, **penalty)).text
        assert penalised != plain, penalty


def test_closing_mid_stream_stops_the_engine_cleanly(smollm2: Path) -> None:
    """Freeing the model while a step runs crashed llama.cpp at exit; close() stops the engine first."""
    engine = Engine(ModelLocation(smollm2), EngineOptions(ctx_size=512, parallel=2))
    stream = engine.stream(ask(engine, "Tell me a long story."), Sampling(temperature=0, max_tokens=400))
    next(stream)
    engine.close()
    assert list(stream)[-1].finish_reason == "cancelled"
    engine.close()  # twice is harmless


def test_a_model_without_a_tokenizer_is_refused_not_aborted(tmp_path: Path) -> None:
    """llama.cpp loads a GGUF without a vocabulary, then aborts the process at the first tokenization."""
    from runtime.errors import ModelFileError
    from runtime.devices.proof import model as proof_model

    path = proof_model.ensure(tmp_path / "no-tokenizer.gguf")
    with pytest.raises(ModelFileError, match="holds no tokenizer"):
        Engine(ModelLocation(path=path), EngineOptions(ctx_size=256, parallel=1, threads=1))


def test_quantized_caches_take_what_memory_py_says_and_answer_alike(smollm2: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """-ctk/-ctv: llama.cpp's own account of the cache (its log) against the size the slot count is chosen by."""
    from runtime.engine import memory

    answers = {}
    for kind in ("f16", "q8_0", "q4_0"):
        capfd.readouterr()
        options = EngineOptions(ctx_size=512, parallel=1, threads=2, cache_type_k=kind, cache_type_v=kind, verbose=True)
        with Engine(ModelLocation(smollm2), options) as quantized:
            log = capfd.readouterr().err
            answers[kind] = quantized.complete(ask(quantized, "What is the capital of France?"), Sampling(temperature=0, max_tokens=6)).text
            predicted = memory.kv_bytes_per_token(quantized.metadata, kind, kind) * quantized.n_ctx / 2**20
        size = float(re.search(rf"llama_kv_cache: size = +([\d.]+) MiB .* K \({kind}\): .* V \({kind}\):", log).group(1))
        assert size == pytest.approx(predicted, abs=0.01), kind
    assert answers["q8_0"] == answers["f16"]  # 8 bits per value lose too little to change a short greedy answer
    assert answers["q4_0"]


@pytest.mark.parametrize(
    ("choice", "cache_type_v", "logged"),
    [("auto", "f16", "disabled"), ("on", "f16", "enabled"), ("auto", "q8_0", "enabled"), ("off", "f16", "disabled")],
)
def test_flash_attention_off_on_the_cpu_unless_asked_or_needed(
    smollm2: Path, capfd: pytest.CaptureFixture[str], choice: str, cache_type_v: str, logged: str
) -> None:
    """-fa: auto leaves it off with every layer on the CPU, and to llama.cpp (which turns it on) where a quantized V
    cache needs it; llama.cpp's log says what the context got."""
    capfd.readouterr()
    options = EngineOptions(ctx_size=256, parallel=1, threads=2, flash_attn=choice, cache_type_v=cache_type_v, verbose=True)
    with Engine(ModelLocation(smollm2), options) as engine:
        assert engine.complete(ask(engine, "Hi"), Sampling(temperature=0, max_tokens=2)).completion_tokens == 2
    assert re.search(rf"llama_context: flash_attn += {logged}\n", capfd.readouterr().err)
