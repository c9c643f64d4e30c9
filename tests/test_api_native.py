"""llama.cpp's native server API (/completion, /tokenize, /detokenize, /embedding, /props, ...) over
HTTP with httpx, as llamafile and llama-server clients call it, against the bundled executable."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Server, free_port, start_server, stop_server

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 16}, "age": {"type": "integer", "minimum": 0, "maximum": 150}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
FINAL_KEYS = {
    "index", "content", "tokens", "id_slot", "stop", "model", "tokens_predicted", "tokens_evaluated",
    "generation_settings", "prompt", "has_new_line", "truncated", "stop_type", "stopping_word", "tokens_cached", "timings",
}
TIMING_KEYS = {
    "prompt_n", "prompt_ms", "prompt_per_token_ms", "prompt_per_second",
    "predicted_n", "predicted_ms", "predicted_per_token_ms", "predicted_per_second",
}


@pytest.fixture(scope="module")
def http(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=300) as client:
        yield client


def complete(http: httpx.Client, **body: Any) -> dict[str, Any]:
    response = http.post("/completion", json={"prompt": PROMPT, **body})
    assert response.status_code == 200, response.text
    return response.json()


def stream(http: httpx.Client, **body: Any) -> list[dict[str, Any]]:
    """The SSE events of a streamed /completion, each `data:` line parsed."""
    events = []
    with http.stream("POST", "/completion", json={"prompt": PROMPT, "stream": True, **body}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[len("data: "):]))
    return events


def assert_llama_error(response: httpx.Response, status: int, kind: str = "invalid_request_error") -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == status and error["type"] == kind
    assert isinstance(error["message"], str) and error["message"]
    return error["message"]


# --- /completion ---------------------------------------------------------------------------------


def test_completion_shape_and_counts(http: httpx.Client) -> None:
    answer = complete(http, n_predict=8, return_tokens=True)
    assert FINAL_KEYS <= answer.keys()
    assert answer["stop"] is True and answer["stop_type"] == "limit" and answer["stopping_word"] == ""
    assert answer["stopped_limit"] is True and answer["stopped_eos"] is False  # llamafile's fields
    assert answer["content"].strip() and answer["truncated"] is False
    assert answer["tokens_predicted"] == 8 == len(answer["tokens"])
    # The tokens are the content's: detokenized they give it back.
    assert http.post("/detokenize", json={"tokens": answer["tokens"]}).json()["content"] == answer["content"]
    prompt_tokens = http.post("/tokenize", json={"content": PROMPT, "add_special": True}).json()["tokens"]
    assert answer["tokens_evaluated"] == len(prompt_tokens)
    assert answer["tokens_cached"] == len(prompt_tokens) + 8
    timings = answer["timings"]
    assert TIMING_KEYS <= timings.keys()
    assert timings["predicted_n"] == 8 and timings["prompt_n"] + timings["cache_n"] == answer["tokens_evaluated"]
    assert timings["predicted_ms"] > 0 and timings["predicted_per_second"] > 0
    settings = answer["generation_settings"]
    assert settings["n_predict"] == 8 and settings["temperature"] == 0 and settings["seed"] == 4294967295
    assert answer["prompt"] == PROMPT and answer["has_new_line"] == ("\n" in answer["content"])
    # Greedy (the server runs with --temp 0): the same answer again, now from the cached prompt.
    again = complete(http, n_predict=8, return_tokens=True)
    assert again["content"] == answer["content"] and again["tokens"] == answer["tokens"]
    assert again["timings"]["cache_n"] > 0


def test_completions_alias_and_max_tokens(http: httpx.Client) -> None:
    answer = http.post("/completions", json={"prompt": PROMPT, "max_tokens": 3, "seed": 42}).json()
    assert answer["tokens_predicted"] == 3 and answer["stop_type"] == "limit"
    assert answer["generation_settings"]["seed"] == 42 and answer["generation_settings"]["n_predict"] == 3


def test_streaming_equals_whole(http: httpx.Client) -> None:
    whole = complete(http, n_predict=12, return_tokens=True)
    events = stream(http, n_predict=12)
    partials, final = events[:-1], events[-1]
    assert len(partials) > 3 and all(e["stop"] is False for e in partials)
    assert "".join(e["content"] for e in partials) == whole["content"]
    assert [t for e in partials for t in e["tokens"]] == whole["tokens"]
    assert partials[-1]["tokens_predicted"] == 12
    assert final["stop"] is True and final["content"] == "" and final["tokens"] == []
    assert final["tokens_predicted"] == whole["tokens_predicted"] and final["tokens_evaluated"] == whole["tokens_evaluated"]
    assert final["stop_type"] == "limit" and TIMING_KEYS <= final["timings"].keys()
    assert final["generation_settings"]["stream"] is True


def test_n_predict_limits_and_unlimited(http: httpx.Client) -> None:
    assert complete(http, n_predict=1)["tokens_predicted"] == 1
    five = complete(http, n_predict=5)
    assert five["tokens_predicted"] == 5
    assert complete(http, n_predict=10)["content"].startswith(five["content"])
    # -1 is no limit: a grammar that ends the text shows it ends by itself, not by a limit.
    answer = complete(http, n_predict=-1, grammar='root ::= "yes" | "no"')
    assert answer["content"] in ("yes", "no") and answer["stop_type"] == "eos" and answer["stopped_eos"] is True
    assert answer["generation_settings"]["n_predict"] == -1


def test_n_predict_zero_evaluates_the_prompt_only(http: httpx.Client) -> None:
    first = complete(http, n_predict=1)["content"]
    answer = complete(http, n_predict=0, n_probs=3)
    assert answer["content"] == "" and answer["tokens_predicted"] == 0 and answer["stop_type"] == "limit"
    # n_probs with n_predict 0: the distribution of the next token, as clients read it.
    [next_token] = answer["completion_probabilities"]
    assert next_token["token"] == first and len(next_token["top_logprobs"]) == 3


def test_bad_n_predict(http: httpx.Client) -> None:
    for bad in (-2, 1.5, "ten", True):
        message = assert_llama_error(http.post("/completion", json={"prompt": PROMPT, "n_predict": bad}), 400)
        assert "n_predict" in message


def test_stop_strings(http: httpx.Client) -> None:
    free = complete(http, n_predict=12)["content"]
    word = free.split()[1]  # a word from inside the greedy answer
    answer = complete(http, n_predict=12, stop=[word, "never appears"])
    assert answer["stop_type"] == "word" and answer["stopping_word"] == word and answer["stopped_word"] is True
    assert word not in answer["content"] and free.startswith(answer["content"] + word)
    events = stream(http, n_predict=12, stop=[word])
    assert "".join(e["content"] for e in events) == answer["content"]
    assert events[-1]["stop_type"] == "word" and events[-1]["stopping_word"] == word


def test_grammar(http: httpx.Client) -> None:
    answer = complete(http, n_predict=24, grammar='root ::= [0-9] [0-9] " " ("apples" | "pears")')
    number, fruit = answer["content"].split(" ")
    assert number.isdigit() and len(number) == 2 and fruit in ("apples", "pears")
    assert answer["generation_settings"]["grammar"].startswith("root ::=")


def test_json_schema(http: httpx.Client) -> None:
    answer = http.post("/completion", json={"prompt": "A person, as JSON:", "n_predict": 64, "json_schema": PERSON}).json()
    person = json.loads(answer["content"])
    assert set(person) == {"name", "age"}
    assert isinstance(person["name"], str) and len(person["name"]) <= 16
    assert isinstance(person["age"], int) and 0 <= person["age"] <= 150
    assert answer["stop_type"] == "eos"


def test_grammar_with_no_way_on(bundle: Path) -> None:
    """A grammar that allows no token is an error for that request (llama.cpp itself aborts the process
    when a grammar is handed a token it does not allow); the server lives on. On a server of its own."""
    own = start_server(bundle, "--temp", "0", "--port", str(free_port()))
    try:
        with httpx.Client(base_url=own.url, timeout=300) as client:
            nothing = client.post("/completion", json={"prompt": PROMPT, "n_predict": 4, "grammar": "root ::= [^\\x00-\\U0010FFFF]"})
            assert "grammar" in assert_llama_error(nothing, 400)
            events = stream(client, n_predict=4, grammar='root ::= "a" [^\\x00-\\U0010FFFF]')
            assert events[0]["content"] == "a" and "grammar" in events[-1]["error"]["message"]
            assert client.get("/health").json()["status"] == "ok"
            assert complete(client, n_predict=2)["tokens_predicted"] == 2
    finally:
        stop_server(own)


def test_bad_grammar_and_schema(http: httpx.Client) -> None:
    assert "grammar" in assert_llama_error(http.post("/completion", json={"prompt": PROMPT, "grammar": "root ::= (oops"}), 400)
    message = assert_llama_error(http.post("/completion", json={"prompt": PROMPT, "json_schema": {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}}), 400)
    assert "schema" in message.lower()


def test_n_probs(http: httpx.Client) -> None:
    answer = complete(http, n_predict=4, n_probs=3, return_tokens=True)
    probabilities = answer["completion_probabilities"]
    assert [p["id"] for p in probabilities] == answer["tokens"]
    assert "".join(p["token"] for p in probabilities) == answer["content"]
    for p in probabilities:
        top = p["top_logprobs"]
        assert len(top) == 3 and top[0]["id"] == p["id"]  # greedy: the chosen token is the likeliest
        assert [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
        assert p["logprob"] <= 0 and bytes(p["bytes"]).decode() == p["token"]
    events = stream(http, n_predict=4, n_probs=3)
    streamed = [p for e in events[:-1] for p in e["completion_probabilities"]]
    assert [p["id"] for p in streamed] == answer["tokens"]
    assert "completion_probabilities" not in events[-1]


def test_logit_bias_forms(http: httpx.Client) -> None:
    first = complete(http, n_predict=1, return_tokens=True)["tokens"][0]
    for bias in ([[first, False]], [[first, -100]], {str(first): -100}):
        answer = complete(http, n_predict=1, return_tokens=True, logit_bias=bias)
        assert answer["tokens"][0] != first, bias
    piece = http.post("/detokenize", json={"tokens": [first]}).json()["content"]
    assert complete(http, n_predict=1, return_tokens=True, logit_bias=[[piece, False]])["tokens"][0] != first
    echoed = complete(http, n_predict=1, logit_bias=[[first, False]])["generation_settings"]["logit_bias"]
    assert echoed == [{"bias": False, "token": first}]
    assert "vocabulary" in assert_llama_error(http.post("/completion", json={"prompt": PROMPT, "logit_bias": [[10**9, 1.0]]}), 400)


def test_prompt_forms(http: httpx.Client) -> None:
    text = complete(http, n_predict=4)["content"]
    tokens = http.post("/tokenize", json={"content": PROMPT, "add_special": True}).json()["tokens"]
    assert complete(http, prompt=tokens, n_predict=4)["content"] == text
    assert complete(http, prompt=[*tokens[:2], http.post("/detokenize", json={"tokens": tokens[2:]}).json()["content"]], n_predict=4)["content"] == text
    several = http.post("/completion", json={"prompt": [PROMPT, "Hello"], "n_predict": 4}).json()
    assert [a["index"] for a in several] == [0, 1] and several[0]["content"] == text
    assert several[1]["content"] == complete(http, prompt="Hello", n_predict=4)["content"]


def test_penalties(http: httpx.Client) -> None:
    prompt = "one one one one one one"
    plain = complete(http, prompt=prompt, n_predict=10)["content"]
    penalized = complete(http, prompt=prompt, n_predict=10, repeat_penalty=1.5)
    assert penalized["content"] != plain and penalized["generation_settings"]["repeat_penalty"] == 1.5
    assert complete(http, prompt=prompt, n_predict=10, frequency_penalty=1.5)["content"] != plain
    assert complete(http, prompt=prompt, n_predict=10, presence_penalty=1.5, repeat_last_n=0)["content"] == plain  # 0: off
    assert "repeat_last_n" in assert_llama_error(http.post("/completion", json={"prompt": prompt, "repeat_last_n": 5}), 400)


def test_server_n_predict_caps_requests(bundle: Path) -> None:
    """-n N on the command line caps every request, as llama-server's -n does."""
    capped = start_server(bundle, "--temp", "0", "-n", "4", "--port", str(free_port()))
    try:
        with httpx.Client(base_url=capped.url, timeout=300) as client:
            assert client.get("/props").json()["default_generation_settings"]["params"]["n_predict"] == 4
            for asked in (-1, 10):
                answer = complete(client, n_predict=asked)
                assert answer["tokens_predicted"] == 4 and answer["generation_settings"]["n_predict"] == 4
            assert complete(client, n_predict=2)["tokens_predicted"] == 2
    finally:
        stop_server(capped)


def test_response_fields(http: httpx.Client) -> None:
    answer = complete(http, n_predict=2, response_fields=["content", "generation_settings/n_predict", "nothing/here"])
    assert set(answer) == {"content", "generation_settings/n_predict"} and answer["generation_settings/n_predict"] == 2


def test_completion_errors(http: httpx.Client) -> None:
    assert "vocabulary" in assert_llama_error(http.post("/completion", json={"prompt": [1, 10**9]}), 400)
    assert "prompt" in assert_llama_error(http.post("/completion", json={"n_predict": 4}), 400)
    response = http.post("/completion", content=json.dumps({"prompt": PROMPT}), headers={"content-type": "text/plain"})
    assert_llama_error(response, 415)
    assert_llama_error(http.post("/completion", content=b"{not json", headers={"content-type": "application/json"}), 400)
    assert "mirostat" in assert_llama_error(http.post("/completion", json={"prompt": PROMPT, "mirostat": 2}), 400)
    assert complete(http, n_predict=1, mirostat=0, typical_p=1.0, samplers="edkypmxt", cache_prompt=False)["tokens_predicted"] == 1
    assert "samplers" in assert_llama_error(http.post("/completion", json={"prompt": PROMPT, "samplers": ["temperature", "top_k"]}), 400)
    props = http.get("/props").json()
    n_ctx = props["default_generation_settings"]["n_ctx"]
    response = http.post("/completion", json={"prompt": "word " * (n_ctx + 10)})
    assert_llama_error(response, 400, "exceed_context_size_error")
    error = response.json()["error"]
    assert error["n_ctx"] == n_ctx and error["n_prompt_tokens"] > n_ctx
    assert complete(http, n_predict=1)["tokens_predicted"] == 1  # still serving


# --- /infill ------------------------------------------------------------------------------------

# Tokens of SmolLM2's vocabulary that a copy of it declares as its fill-in-the-middle tokens (SmolLM2 has none):
# what the assembly puts where, with the real engine, whatever the model makes of it.
FIM_IDS = {"fim_pre": 11, "fim_suf": 12, "fim_mid": 13, "fim_sep": 5, "fim_rep": 3}


@pytest.fixture(scope="module")
def fim_server(bundle: Path, smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    import subprocess
    import sys

    copy = tmp_path_factory.mktemp("fim") / "smollm2-fim.gguf"
    ids = [arg for kind, token in FIM_IDS.items() for arg in ("--special-token-by-id", kind, str(token))]
    subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_new_metadata", str(smollm2), str(copy), *ids, "--force"],
                   check=True, capture_output=True, timeout=300)
    server = start_server(bundle, "-m", str(copy), "--temp", "0", "--port", str(free_port()))
    try:
        with httpx.Client(base_url=server.url, timeout=300) as client:
            yield client
    finally:
        stop_server(server)


def test_infill_puts_the_code_around_the_cursor_between_the_models_fim_tokens(fim_server: httpx.Client) -> None:
    prefix, suffix = "def add(a, b):\n    return ", "\n\nprint(add(1, 2))\n"
    body = {"input_prefix": prefix, "input_suffix": suffix, "input_extra": [{"filename": "util.py", "text": "X = 1\n"}], "prompt": "a", "n_predict": 4}

    def tokens(text: str) -> list[int]:
        return fim_server.post("/tokenize", json={"content": text, "add_special": False}).json()["tokens"]

    ids = FIM_IDS
    expected = [
        ids["fim_rep"], *tokens("myproject\n"), ids["fim_sep"], *tokens("util.py\n"), *tokens("X = 1\n"), ids["fim_sep"], *tokens("filename\n"),
        ids["fim_pre"], *tokens(prefix), *tokens("a"), ids["fim_suf"], *tokens(suffix), ids["fim_mid"],
    ]
    answer = fim_server.post("/infill", json=body).json()
    assert answer["tokens_evaluated"] == len(expected)
    assert answer["prompt"] == "myproject\nutil.py\nX = 1\nfilename\n" + prefix + "a" + suffix  # the prompt's text, as /completion shows it
    assert 0 < answer["tokens_predicted"] <= 4 and answer["stop"] is True and FINAL_KEYS <= answer.keys()
    with fim_server.stream("POST", "/infill", json={**body, "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    assert "".join(e["content"] for e in events) == answer["content"] and events[-1]["stop"] is True
    # Without other files nothing comes before PRE; token ids may stand for text, as in /completion.
    bare = fim_server.post("/infill", json={"input_prefix": [ids["fim_rep"], "x = "], "input_suffix": "", "n_predict": 1}).json()
    assert bare["tokens_evaluated"] == 4 + len(tokens("x = ")) and bare["prompt"] == "x = "


def test_infill_errors_in_llama_servers_shape(http: httpx.Client, fim_server: httpx.Client) -> None:
    message = assert_llama_error(http.post("/infill", json={"input_prefix": "a", "input_suffix": "b"}), 400)
    assert message.startswith("Infill is not supported by this model: prefix token is missing. suffix token is missing. middle token is missing.")
    assert "input_suffix" in assert_llama_error(fim_server.post("/infill", json={"input_prefix": "a"}), 400)
    assert "input_extra" in assert_llama_error(fim_server.post("/infill", json={"input_prefix": "a", "input_suffix": "", "input_extra": ["x"]}), 400)
    assert "text" in assert_llama_error(fim_server.post("/infill", json={"input_prefix": "a", "input_suffix": "", "input_extra": [{"filename": "f"}]}), 400)


# --- tokens --------------------------------------------------------------------------------------


def test_apply_template_continues_a_last_assistant_message_and_checks_template_kwargs(http: httpx.Client) -> None:
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, I am"}]
    prompt = http.post("/apply-template", json={"messages": messages, "chat_template_kwargs": {"unused": True}}).json()["prompt"]
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello, I am")
    refused = http.post("/apply-template", json={"messages": messages, "chat_template_kwargs": {"add_generation_prompt": False}})
    assert "chat_template_kwargs.add_generation_prompt" in assert_llama_error(refused, 400)


def test_apply_template_writes_the_prompt_that_chat_completions_reads(http: httpx.Client) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    prompt = http.post("/apply-template", json={"messages": messages}).json()["prompt"]
    # SmolLM2's template: ChatML, ending where the assistant's answer starts.
    assert prompt == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    chat = http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 1}).json()
    assert chat["usage"]["prompt_tokens"] == len(http.post("/tokenize", json={"content": prompt, "add_special": False}).json()["tokens"])
    assert_llama_error(http.post("/apply-template", json={"messages": []}), 400, "invalid_request_error")


def test_chat_completions_without_v1(http: httpx.Client) -> None:
    body = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4, "temperature": 0}
    plain, v1 = http.post("/chat/completions", json=body).json(), http.post("/v1/chat/completions", json=body).json()
    assert plain["object"] == "chat.completion"
    assert plain["choices"][0]["message"]["content"] == v1["choices"][0]["message"]["content"]


def test_tokenize_detokenize_round_trip(http: httpx.Client) -> None:
    text = "Hello world, ça va? 😀 123"
    tokens = http.post("/tokenize", json={"content": text}).json()["tokens"]
    assert tokens and all(isinstance(t, int) for t in tokens)
    assert http.post("/detokenize", json={"tokens": tokens}).json()["content"] == text
    with_special = http.post("/tokenize", json={"content": text, "add_special": True}).json()["tokens"]
    assert with_special[-len(tokens):] == tokens and len(with_special) - len(tokens) in (0, 1)
    mixed = http.post("/tokenize", json={"content": [tokens[0], "world"]}).json()["tokens"]
    assert mixed[0] == tokens[0] and len(mixed) > 1
    assert http.post("/tokenize", json={}).json() == {"tokens": []}
    assert http.post("/detokenize", json={}).json() == {"content": ""}
    assert "vocabulary" in assert_llama_error(http.post("/detokenize", json={"tokens": [10**9]}), 400)
    assert_llama_error(http.post("/detokenize", json={"tokens": ["a"]}), 400)


def test_tokenize_with_pieces(http: httpx.Client) -> None:
    text = "Hello world 😀"
    pieces = http.post("/tokenize", json={"content": text, "with_pieces": True}).json()["tokens"]
    ids = http.post("/tokenize", json={"content": text}).json()["tokens"]
    assert [p["id"] for p in pieces] == ids
    raw = b"".join(p["piece"].encode() if isinstance(p["piece"], str) else bytes(p["piece"]) for p in pieces)
    assert raw.decode() == text
    assert pieces[0]["piece"] == "Hello"


# --- embeddings ----------------------------------------------------------------------------------


def test_embedding(http: httpx.Client) -> None:
    [one] = http.post("/embedding", json={"content": "Cats purr."}).json()
    assert one["index"] == 0 and len(one["embedding"]) == 1
    vector = one["embedding"][0]
    assert len(vector) > 100 and math.isclose(math.sqrt(sum(x * x for x in vector)), 1.0, rel_tol=1e-4)
    two = http.post("/embeddings", json={"content": ["Cats purr.", "Stocks fell sharply today."]}).json()
    assert [e["index"] for e in two] == [0, 1]
    assert two[0]["embedding"][0] == pytest.approx(vector, abs=1e-5)
    assert two[1]["embedding"][0] != two[0]["embedding"][0]
    [scaled] = http.post("/embedding", json={"content": "Cats purr.", "embd_normalize": 0}).json()
    assert max(abs(x) for x in scaled["embedding"][0]) == pytest.approx(32760, rel=1e-6)
    assert_llama_error(http.post("/embedding", json={"content": "x", "embd_normalize": -1}), 400)
    assert_llama_error(http.post("/embedding", json={}), 400)


# --- server state --------------------------------------------------------------------------------


def test_health_props_slots(http: httpx.Client) -> None:
    assert http.get("/health").json()["status"] == "ok"
    props = http.get("/props").json()
    settings = props["default_generation_settings"]
    assert settings["n_ctx"] > 0 and settings["params"]["n_predict"] == -1 and settings["params"]["temperature"] == 0
    assert props["total_slots"] >= 1 and props["model_path"] and props["build_info"].startswith("llamabox")
    assert isinstance(props["chat_template"], str) and props["modalities"] == {"vision": False, "audio": False}
    slots = http.get("/slots").json()
    assert len(slots) == props["total_slots"]
    assert all(s["n_ctx"] == settings["n_ctx"] and s["is_processing"] is False for s in slots)
    assert_llama_error(http.post("/props", json={}), 501, "not_supported_error")


# --- metrics -------------------------------------------------------------------------------------


def read_metrics(text: str) -> dict[str, float]:
    """Prometheus's text format: every sample has HELP and TYPE lines before it."""
    samples = {}
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if not line.startswith("#"):
            name, value = line.split(" ")
            assert lines[i - 2].startswith(f"# HELP {name} ") and lines[i - 1] in (f"# TYPE {name} counter", f"# TYPE {name} gauge")
            samples[name.removeprefix("llamacpp:")] = float(value)
    return samples


def test_metrics_are_off_without_the_flag(http: httpx.Client) -> None:
    assert "--metrics" in assert_llama_error(http.get("/metrics"), 501, "not_supported_error")
    assert http.get("/props").json()["endpoint_metrics"] is False


def test_metrics_count_what_was_served(bundle: Path) -> None:
    server = start_server(bundle, "--temp", "0", "--port", str(free_port()), "--metrics")
    try:
        with httpx.Client(base_url=server.url, timeout=300) as http:
            assert http.get("/props").json()["endpoint_metrics"] is True
            first = complete(http, n_predict=16)
            response = http.get("/metrics")
            assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain; version=0.0.4")
            after_one = read_metrics(response.text)
            assert after_one["prompt_tokens_total"] == first["tokens_evaluated"]
            generated = first["tokens_predicted"]
            assert after_one["tokens_predicted_total"] == generated > 0
            assert after_one["n_decode_total"] >= generated  # one for the prompt, one per generated token but the last
            # The last token is decoded only when it did not end the answer at the limit.
            assert after_one["n_tokens_max"] == first["tokens_evaluated"] + generated - (first["stop_type"] == "limit")
            assert after_one["predicted_tokens_seconds"] > 0 and after_one["prompt_tokens_seconds"] > 0
            assert after_one["requests_processing"] == 0 and after_one["requests_deferred"] == 0
            assert after_one["n_busy_slots_per_decode"] == 1
            second = complete(http, n_predict=4)  # the same prompt: read from the cache, but its last token
            after_two = read_metrics(http.get("/metrics").text)
            assert after_two["prompt_tokens_cached_total"] == first["tokens_evaluated"] - 1
            assert after_two["prompt_tokens_total"] == after_one["prompt_tokens_total"] + 1
            assert after_two["tokens_predicted_total"] == generated + second["tokens_predicted"]
            assert read_metrics(http.get("/metrics").text)["predicted_tokens_seconds"] == 0  # nothing since the last scrape
    finally:
        stop_server(server)
