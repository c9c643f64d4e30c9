"""Who may talk to the server: API key, Host check against DNS rebinding, JSON-only bodies, CORS, access log, IPv6.

The Guard's decisions are unit-tested in-process first; then the bundled executable is started with
the flags a user would give and probed over HTTP, with the official clients where they exist.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from runtime.server.guard import Guard, host_name
from runtime.server.settings import Access
from tests.conftest import Server, free_port, start_server, stop_server

slow = pytest.mark.slow
KEY = "llamabox-test-key-7f3a"
ORIGIN = "https://app.example"
SAY_OK = [{"role": "user", "content": "Say OK."}]

# (method, path, a valid body) for every API route of every family.
API_ROUTES: list[tuple[str, str, dict[str, Any] | None]] = [
    ("GET", "/v1/models", None),
    ("GET", "/v1/models/any-name", None),
    ("POST", "/v1/chat/completions", {"model": "any", "messages": SAY_OK, "max_tokens": 2}),
    ("POST", "/v1/completions", {"model": "any", "prompt": "Hello", "max_tokens": 2}),
    ("POST", "/v1/embeddings", {"model": "any", "input": "hello"}),
    ("POST", "/v1/responses", {"model": "any", "input": "Say OK.", "max_output_tokens": 16}),
    ("POST", "/v1/messages", {"model": "any", "max_tokens": 2, "messages": SAY_OK}),
    ("POST", "/v1/messages/count_tokens", {"model": "any", "messages": SAY_OK}),
    ("POST", "/completion", {"prompt": "Hello", "n_predict": 2}),
    ("POST", "/tokenize", {"content": "Hello"}),
    ("POST", "/detokenize", {"tokens": [1, 2]}),
    ("POST", "/embedding", {"content": "hello"}),
    ("GET", "/props", None),
    ("GET", "/slots", None),
    ("POST", "/api/generate", {"model": "any", "prompt": "Say OK.", "stream": False, "options": {"num_predict": 2}}),
    ("POST", "/api/chat", {"model": "any", "messages": SAY_OK, "stream": False, "options": {"num_predict": 2}}),
    ("POST", "/api/embed", {"model": "any", "input": "hello"}),
    ("POST", "/api/show", {"model": "any"}),
    ("GET", "/api/tags", None),
    ("GET", "/api/version", None),
    ("GET", "/api/ps", None),
]
ROUTE_IDS = [f"{method} {path}" for method, path, _ in API_ROUTES]


def refusal_message(path: str, body: Any) -> str:
    """The message of a 401/403 in the error shape the path's client family parses."""
    if path.startswith("/api/"):  # Ollama: {"error": "..."}
        assert isinstance(body["error"], str)
        return body["error"]
    if path.startswith("/v1/messages"):  # Anthropic
        assert body["type"] == "error" and body["error"]["type"] in ("authentication_error", "permission_error")
        return body["error"]["message"]
    assert body["error"]["type"] in ("authentication_error", "permission_error")  # OpenAI and llama.cpp
    return body["error"]["message"]


# --- the Guard in-process: pure decisions, no model ---------------------------------------------


@pytest.mark.parametrize(
    ("header", "name"),
    [
        ("localhost", "localhost"),
        ("LocalHost:8080", "localhost"),
        ("localhost.:8080", "localhost"),
        ("127.0.0.1:8080", "127.0.0.1"),
        ("[::1]:8080", "::1"),
        ("[::1]", "::1"),
        ("::1", "::1"),  # as --allowed-host may give an IPv6 address
        ("box.example:80", "box.example"),
        ("[::1", None),
        ("[::1]x", None),
        ("box.example:http", None),
        ("", None),
    ],
)
def test_host_name(header: str, name: str | None) -> None:
    assert host_name(header) == name


def _guarded(access: Access) -> TestClient:
    async def hello(_request: Any) -> PlainTextResponse:
        return PlainTextResponse("hello")

    paths = ["/", "/health", "/v1/health", "/ui/app.js", "/v1/models", "/api/tags", "/v1/messages", "/completion"]
    app = Guard(Starlette(routes=[Route(p, hello, methods=["GET", "POST"]) for p in paths]), access=access)
    return TestClient(app, base_url="http://localhost")


@pytest.mark.parametrize(
    ("host", "allowed", "status"),
    [
        ("localhost", (), 200),
        ("localhost:1234", (), 200),
        ("127.0.0.1:1234", (), 200),
        ("[::1]:1234", (), 200),
        ("192.0.2.7:1234", (), 200),  # an IP literal cannot be rebound
        ("[2001:db8::7]:1234", (), 200),
        ("attacker.example", (), 403),
        ("attacker.example:1234", (), 403),
        ("localhost.attacker.example", (), 403),
        ("box.example:1234", ("box.example",), 200),
        ("box.example", ("BOX.example:9000",), 200),
        ("other.example", ("box.example",), 403),
        ("anything.example", ("*",), 200),
        ("[::1", (), 403),
    ],
)
def test_host_check(host: str, allowed: tuple[str, ...], status: int) -> None:
    response = _guarded(Access(allowed_hosts=allowed)).get("/health", headers={"host": host})
    assert response.status_code == status
    if status == 403:
        assert "--allowed-host" in response.json()["error"]["message"]


def test_key_check_in_process() -> None:
    client = _guarded(Access(api_keys=("another-key", KEY)))
    for path in ("/", "/health", "/v1/health", "/ui/app.js"):
        assert client.get(path).status_code == 200, path
    for path in ("/v1/models", "/api/tags", "/v1/messages", "/completion"):
        refused = client.get(path)
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
        assert "Authorization: Bearer KEY" in refusal_message(path, refused.json())
        assert "wrong API key" in refusal_message(path, client.get(path, headers={"x-api-key": KEY + "x"}).json())
        assert client.get(path, headers={"authorization": f"bearer {KEY}"}).status_code == 200
        assert client.get(path, headers={"x-api-key": KEY}).status_code == 200
        assert client.get(path, headers={"authorization": f"Basic {KEY}"}).status_code == 401


# --- the bundled executable ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    """A server with a key, an extra host name, one CORS origin and the access log; and its stderr file."""
    log = tmp_path_factory.mktemp("keyed") / "stderr.txt"
    args = ["--temp", "0", "--port", str(free_port()), "--api-key", KEY, "--allowed-host", "box.example", "--cors", ORIGIN, "--verbose"]
    running = start_server(bundle, *args, log=log)
    yield running, log
    stop_server(running)


@slow
@pytest.mark.parametrize(("method", "path", "body"), API_ROUTES, ids=ROUTE_IDS)
def test_every_api_route_wants_the_key(keyed: tuple[Server, Path], method: str, path: str, body: dict[str, Any] | None) -> None:
    server, _ = keyed
    url = server.url.rstrip("/") + path

    def call(**headers: str) -> httpx.Response:
        return httpx.request(method, url, json=body, headers=headers, timeout=60)

    missing = call()
    assert missing.status_code == 401, missing.text
    assert "Authorization: Bearer KEY" in refusal_message(path, missing.json())
    for wrong in ({"authorization": "Bearer wrong"}, {"x-api-key": "wrong"}, {"authorization": KEY}):
        refused = call(**wrong)
        assert refused.status_code == 401, (wrong, refused.text)
        refusal_message(path, refused.json())
    for right in ({"authorization": f"Bearer {KEY}"}, {"x-api-key": KEY}):
        answered = call(**right)
        assert answered.status_code == 200, (right, answered.text)


@slow
def test_health_and_chat_page_stay_open(keyed: tuple[Server, Path]) -> None:
    server, _ = keyed
    assert httpx.get(server.url + "health").json()["status"] == "ok"
    page = httpx.get(server.url)
    assert page.status_code == 200 and "<html" in page.text.lower()


@slow
def test_official_clients_read_the_401(keyed: tuple[Server, Path]) -> None:
    import anthropic
    import ollama
    import openai

    server, _ = keyed
    with pytest.raises(openai.AuthenticationError, match="wrong API key"):
        openai.OpenAI(base_url=server.url + "v1", api_key="wrong", max_retries=0).models.list()
    assert openai.OpenAI(base_url=server.url + "v1", api_key=KEY, max_retries=0).models.list().data

    with pytest.raises(anthropic.AuthenticationError, match="wrong API key"):
        anthropic.Anthropic(base_url=server.url.rstrip("/"), api_key="wrong", max_retries=0).messages.create(
            model="any", max_tokens=2, messages=SAY_OK
        )
    reply = anthropic.Anthropic(base_url=server.url.rstrip("/"), api_key=KEY, max_retries=0).messages.create(
        model="any", max_tokens=2, messages=SAY_OK
    )
    assert reply.usage.output_tokens <= 2

    with pytest.raises(ollama.ResponseError, match="API key") as refused:
        ollama.Client(host=server.url).list()
    assert refused.value.status_code == 401
    assert ollama.Client(host=server.url, headers={"Authorization": f"Bearer {KEY}"}).list().models


@slow
def test_foreign_host_names_are_refused(server: Server) -> None:
    for method, path in (("GET", "v1/models"), ("GET", "health"), ("POST", "v1/chat/completions")):
        body = {"messages": SAY_OK, "max_tokens": 2}
        rebound = httpx.request(method, server.url + path, json=body, headers={"host": f"attacker.example:{server.port}"})
        assert rebound.status_code == 403, rebound.text
        assert "--allowed-host attacker.example" in refusal_message("/" + path, rebound.json())
    assert httpx.get(server.url + "v1/models", headers={"host": f"localhost:{server.port}"}).status_code == 200
    assert httpx.get(server.url + "v1/models", headers={"host": f"127.0.0.1:{server.port}"}).status_code == 200


@slow
def test_allowed_host_name_works(keyed: tuple[Server, Path]) -> None:
    server, _ = keyed
    headers = {"authorization": f"Bearer {KEY}"}
    assert httpx.get(server.url + "v1/models", headers={**headers, "host": f"box.example:{server.port}"}).status_code == 200
    assert httpx.get(server.url + "v1/models", headers={**headers, "host": "other.example"}).status_code == 403


@slow
def test_only_json_bodies(server: Server) -> None:
    """A page on any site may POST text/plain or a form to 127.0.0.1 without a preflight: refused."""
    url = server.url + "v1/chat/completions"
    as_text = httpx.post(url, content=b'{"messages": [{"role": "user", "content": "hi"}]}', headers={"content-type": "text/plain"})
    assert as_text.status_code == 415, as_text.text
    assert "Content-Type: application/json" in as_text.json()["error"]["message"]
    as_form = httpx.post(url, data={"messages": "hi"})
    assert as_form.status_code == 415, as_form.text
    untyped = httpx.post(url, content=b'{"messages": [{"role": "user", "content": "hi"}]}')
    assert untyped.status_code == 415, untyped.text


@slow
def test_by_default_cors_only_for_local_pages(server: Server) -> None:
    simple = httpx.get(server.url + "v1/models", headers={"origin": ORIGIN})
    assert simple.status_code == 200 and "access-control-allow-origin" not in simple.headers
    preflight = httpx.options(
        server.url + "v1/chat/completions",
        headers={"origin": ORIGIN, "access-control-request-method": "POST", "access-control-request-headers": "content-type"},
    )
    assert "access-control-allow-origin" not in preflight.headers
    # A front end in development on this machine, as llama-server allows.
    for local in ("http://localhost:5173", "http://127.0.0.1:3000", "http://[::1]:8080", "https://localhost"):
        preflight = httpx.options(
            server.url + "v1/chat/completions",
            headers={"origin": local, "access-control-request-method": "POST", "access-control-request-headers": "content-type"},
        )
        assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == local, local
        answered = httpx.get(server.url + "v1/models", headers={"origin": local})
        assert answered.headers["access-control-allow-origin"] == local
    for lookalike in ("http://localhost.evil.example", "http://127.0.0.1.evil.example:80", "http://evil.example/localhost"):
        assert "access-control-allow-origin" not in httpx.get(server.url + "v1/models", headers={"origin": lookalike}).headers, lookalike


@slow
def test_cors_for_the_given_origin(keyed: tuple[Server, Path]) -> None:
    server, _ = keyed
    preflight = httpx.options(
        server.url + "v1/chat/completions",
        headers={"origin": ORIGIN, "access-control-request-method": "POST", "access-control-request-headers": "authorization, content-type"},
    )
    assert preflight.status_code == 200  # answered without the key: browsers send none on a preflight
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    assert "POST" in preflight.headers["access-control-allow-methods"]
    answered = httpx.get(server.url + "v1/models", headers={"origin": ORIGIN, "authorization": f"Bearer {KEY}"})
    assert answered.status_code == 200 and answered.headers["access-control-allow-origin"] == ORIGIN
    refused = httpx.get(server.url + "v1/models", headers={"origin": ORIGIN})
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == ORIGIN  # the page can read why
    other = httpx.get(server.url + "v1/models", headers={"origin": "https://other.example", "authorization": f"Bearer {KEY}"})
    assert "access-control-allow-origin" not in other.headers


@slow
def test_access_log_with_verbose(keyed: tuple[Server, Path]) -> None:
    server, log = keyed
    headers = {"authorization": f"Bearer {KEY}"}
    httpx.get(server.url + "v1/models", headers=headers)
    chat = httpx.post(server.url + "v1/chat/completions", json={"messages": SAY_OK, "max_tokens": 3}, headers=headers, timeout=60)
    usage = chat.json()["usage"]
    streamed = {"messages": SAY_OK, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", server.url + "v1/chat/completions", json=streamed, headers=headers, timeout=60) as stream:
        stream.read()
    httpx.get(server.url + "v1/models")
    time.sleep(0.3)
    lines = [line for line in log.read_text().splitlines() if re.match(r"llamabox: [A-Z]+ /", line)]
    assert any(re.fullmatch(r"llamabox: GET /v1/models 200, \d+\.\d\d s", line) for line in lines), lines
    assert any(re.fullmatch(r"llamabox: GET /v1/models 401, \d+\.\d\d s", line) for line in lines), lines
    tokens = f"{usage['prompt_tokens']} prompt \\+ {usage['completion_tokens']} generated tokens"
    chats = [line for line in lines if re.fullmatch(rf"llamabox: POST /v1/chat/completions 200, {tokens}, \d+\.\d\d s", line)]
    assert len(chats) >= 2, lines  # the whole answer and the streamed one


def _has_ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@slow
def test_ipv6_loopback(bundle: Path, tmp_path: Path) -> None:
    if not _has_ipv6_loopback():
        pytest.skip("this machine has no IPv6 loopback (::1)")
    port = free_port()
    running = start_server(bundle, "--host", "::1", "--port", str(port), log=tmp_path / "stderr.txt", env={"LLAMABOX_API_KEY": KEY})
    try:
        assert running.url == f"http://[::1]:{port}/"
        assert httpx.get(running.url + "health").status_code == 200
        assert httpx.get(running.url + "v1/models").status_code == 401  # the key came from LLAMABOX_API_KEY
        models = httpx.get(running.url + "v1/models", headers={"authorization": f"Bearer {KEY}"})
        assert models.status_code == 200 and models.json()["data"]
    finally:
        stop_server(running)
    assert "without --api-key" not in (tmp_path / "stderr.txt").read_text()


@slow
def test_every_interface_without_key_warns(bundle: Path) -> None:
    running = start_server(bundle, "--host", "0.0.0.0", "--port", str(free_port()))
    try:
        url = f"http://127.0.0.1:{running.port}/"
        assert httpx.get(url + "v1/models").status_code == 200  # no key: open, as warned
        assert httpx.get(url + "v1/models", headers={"host": f"192.0.2.7:{running.port}"}).status_code == 200
        assert httpx.get(url + "v1/models", headers={"host": f"box.example:{running.port}"}).status_code == 403
    finally:
        stop_server(running)
    assert running.process.stderr is not None
    stderr = running.process.stderr.read()
    assert "warning: listening on 0.0.0.0 without --api-key" in stderr, stderr
    assert not re.search(r"llamabox: [A-Z]+ /", stderr)  # no access log without --verbose
