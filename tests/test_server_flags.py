"""llama-server's command line on a bundle: the flags a launcher or script written for llama-server or a llamafile
passes are taken with llama-server's meaning, or refused in one line that names the flag and says why."""

from __future__ import annotations

import re
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import Server, free_port, start_server, stop_server

pytestmark = pytest.mark.slow

PROMPT = "Write one sentence about cats."


def run(bundle: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(bundle), *args], capture_output=True, text=True, timeout=timeout)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def test_help_groups_the_flags_as_llama_server_does(bundle: Path) -> None:
    text = run(bundle, "--help").stdout
    sections = ["Common options (as llama.cpp's):", "Sampling options", "Server options (as llama-server's):", "llamabox options:"]
    positions = [text.index(title) for title in sections]
    assert positions == sorted(positions)
    common, sampling, server, own = (text[a:b] for a, b in zip(positions, [*positions[1:], len(text)], strict=True))
    for flag in ("-tb, --threads-batch", "-b, --batch-size", "-ub, --ubatch-size", "--mlock", "--no-mmap", "-lm, --load-mode", "--numa", "--offline"):
        assert flag in common, flag
    assert "--temp" in sampling and "--top-k" in sampling
    for flag in ("-a, --alias", "-cb, --cont-batching", "--api-key-file", "--ssl-key-file", "--ssl-cert-file", "--slots / --no-slots",
                 "--props", "--webui, --ui / --no-webui, --no-ui", "--metrics"):
        assert flag in server, flag
    assert "--cpu-variant" in own and "--chat" in own


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["-to", "600"], "-to/--timeout: llamabox's server has no read or write timeout to set"),
        (["--timeout", "30"], "-to/--timeout: "),
        (["-nocb"], "-nocb/--no-cont-batching: llamabox always batches requests continuously"),
        (["-lm", "none", "--mlock"], "-lm/--load-mode replaces --mlock and --no-mmap"),
        (["-lm", "dio"], "-lm dio: llama.cpp reads with direct I/O only from a path"),
        (["-b", "2", "-np", "4"], "-b 2 tokens per decode call cannot hold a token of each of the 4 requests"),
        (["--ssl-cert-file", __file__], "HTTPS needs both --ssl-key-file and --ssl-cert-file"),
    ],
)
def test_flags_llamabox_cannot_honour_are_refused_in_one_line(bundle: Path, args: list[str], said: str) -> None:
    result = run(bundle, *args, "--nobrowser", "--port", str(free_port()))
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert said in last, result.stderr


@pytest.mark.parametrize(
    ("baked", "given", "merged"),
    [
        (["--api-key", "old", "--temp", "0"], ["--api-key", "new"], ["--temp", "0", "--api-key", "new"]),
        (["--api-key=old", "--lora", "a.gguf"], ["--api-key", "new"], ["--lora", "a.gguf", "--api-key", "new"]),
        (["--cors", "http://a", "--cors", "http://b"], ["--cors=http://c"], ["--cors=http://c"]),
        (["--temp", "0"], ["--temp", "1"], ["--temp", "0", "--temp", "1"]),  # one value: click keeps the last
    ],
)
def test_the_users_repeatable_options_replace_the_baked_ones(baked: list[str], given: list[str], merged: list[str]) -> None:
    """A key rotated at run time (or other adapters, origins) must not leave the bundle's baked one in force."""
    from runtime.cli import merged_args

    assert merged_args(baked, given) == merged


def test_flags_accepted_with_their_meaning_reach_llama_cpp(bundle: Path) -> None:
    """-b, -ub and --no-mmap as llama.cpp itself logs them; -tb, -cb, --offline and --numa accepted; the same answer."""
    plain = run(bundle, "-p", PROMPT, "--temp", "0", "-n", "12")
    flagged = run(bundle, "-p", PROMPT, "--temp", "0", "-n", "12", "-b", "64", "-ub", "16", "-tb", "1", "--no-mmap", "-cb",
                  "--offline", "--numa", "distribute", "--verbose")
    assert plain.returncode == 0 and flagged.returncode == 0, flagged.stderr
    assert re.search(r"n_batch\s+= 64\b", flagged.stderr) and re.search(r"n_ubatch\s+= 16\b", flagged.stderr)
    assert "CPU model buffer size" in flagged.stderr and "CPU_Mapped" not in flagged.stderr  # read, not mapped
    assert flagged.stdout == plain.stdout and "cat" in plain.stdout.lower()


def test_mlock_locks_the_weights_in_memory(bundle: Path) -> None:
    server = start_server(bundle, "--port", str(free_port()), "--mlock")
    try:
        locked = max(_locked_kib(pid) for pid in _process_tree(server.process.pid))
    finally:
        stop_server(server)
    assert locked * 1024 > 80 * 2**20  # SmolLM2's weights (92 MiB), in the model's process


def _process_tree(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [pid, *(p for child in children for p in _process_tree(int(child)))]


def _locked_kib(pid: int) -> int:
    match = re.search(r"^VmLck:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    return int(match.group(1)) if match else 0


@pytest.fixture(scope="module")
def flagged(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text("# the team's keys\nkey-from-file\n\n")
    server = start_server(
        bundle, "--port", str(free_port()), "--temp", "0", "-a", "smol,tiny", "--no-slots", "--props", "--no-webui",
        "--api-key", "key-one,key-two", "--api-key-file", str(keys),
    )
    yield server
    stop_server(server)


def test_alias_names_the_model_everywhere(flagged: Server) -> None:
    client = openai.OpenAI(base_url=flagged.url + "v1", api_key="key-two", max_retries=0)
    listed = httpx.get(flagged.url + "v1/models", headers={"authorization": "Bearer key-one"}).json()
    assert listed["data"][0]["id"] == "smol" and listed["data"][0]["aliases"] == ["smol", "tiny"]
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=4)
    assert reply.model == "smol"
    props = httpx.get(flagged.url + "props", headers={"x-api-key": "key-from-file"}).json()
    assert props["model_alias"] == "smol"


def test_every_key_from_the_flag_and_the_file_opens_the_api(flagged: Server) -> None:
    for key in ("key-one", "key-two", "key-from-file"):
        assert httpx.get(flagged.url + "v1/models", headers={"authorization": f"Bearer {key}"}).status_code == 200, key
    for wrong in ("# the team's keys", "key-one,key-two", "key"):
        assert httpx.get(flagged.url + "v1/models", headers={"authorization": f"Bearer {wrong}"}).status_code == 401, wrong


def test_slots_props_and_webui_as_llama_server_sets_them(flagged: Server) -> None:
    key = {"x-api-key": "key-one"}
    slots = httpx.get(flagged.url + "slots", headers=key)
    assert slots.status_code == 501
    assert slots.json()["error"] == {
        "code": 501, "message": "This server does not support slots endpoint. Start it with `--slots`", "type": "not_supported_error"}
    props = httpx.get(flagged.url + "props", headers=key).json()
    assert (props["endpoint_slots"], props["endpoint_props"], props["webui"]) == (False, True, False)
    changed = httpx.post(flagged.url + "props", headers=key, json={})
    assert changed.status_code == 200 and changed.json() == {"success": True}
    assert httpx.get(flagged.url).status_code == 404  # no chat page
    assert httpx.get(flagged.url + "health").status_code == 200


def test_post_props_is_refused_without_the_flag(server: Server) -> None:
    refused = httpx.post(server.url + "props", json={})
    assert refused.status_code == 501
    assert refused.json()["error"]["message"] == "This server does not support changing global properties. Start it with `--props`"


def test_https_with_a_certificate_and_its_key(bundle: Path, tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("needs openssl to make a certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-keyout", key, "-out", cert,
         "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    wrong = run(bundle, "--nobrowser", "--port", str(free_port()), "--ssl-key-file", str(cert), "--ssl-cert-file", str(key))
    assert wrong.returncode == 1 and "do not load as a PEM certificate and its key" in wrong.stderr.strip().splitlines()[-1]
    server = start_server(bundle, "--port", str(free_port()), "--temp", "0", "--ssl-key-file", str(key), "--ssl-cert-file", str(cert))
    try:
        assert server.url.startswith("https://127.0.0.1:")
        client = openai.OpenAI(base_url=server.url + "v1", api_key="none", max_retries=0, http_client=httpx.Client(verify=ssl.create_default_context(cafile=str(cert))))
        reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": PROMPT}], max_tokens=8, temperature=0)
        assert reply.choices[0].message.content
        with pytest.raises(httpx.HTTPError):
            httpx.get(server.url.replace("https://", "http://") + "health", timeout=5)
    finally:
        stop_server(server)
