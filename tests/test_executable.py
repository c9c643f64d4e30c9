"""The built executable, run as a user runs it, with the real SmolLM2 model inside."""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor
import subprocess
import time
from pathlib import Path

import httpx
import openai
import pytest

from runtime import bundle_format
from tests.conftest import Server, damaged_copy, free_port, start_server, stop_server

pytestmark = pytest.mark.slow

CATS = [{"role": "user", "content": "Write one sentence about cats."}]


def run(executable: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(executable), *args], capture_output=True, text=True, timeout=timeout)


def assert_user_error(result: subprocess.CompletedProcess[str], pattern: str) -> None:
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    assert pattern.lower() in result.stderr.lower(), result.stderr


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "v1", api_key="not-needed")


def test_prompt_mode_is_greedy_and_repeatable(bundle: Path) -> None:
    first = run(bundle, "-p", "Write one sentence about cats.", "--temp", "0", "-n", "24")
    second = run(bundle, "-p", "Write one sentence about cats.", "--temp", "0", "-n", "24")
    assert first.returncode == 0, first.stderr
    assert "cat" in first.stdout.lower()
    assert first.stdout == second.stdout


def test_info(bundle: Path) -> None:
    result = run(bundle, "--info")
    assert result.returncode == 0, result.stderr
    assert '"file_name": "SmolLM2-135M-Instruct.Q4_1.gguf"' in result.stdout
    assert "CPU features:" in result.stdout
    line = next(l for l in result.stdout.splitlines() if l.startswith("CPU kernels loaded:"))
    assert "libggml-cpu-" in line and "score" in line


def test_other_model_with_same_runtime(bundle: Path, smollm2: Path) -> None:
    from_bundle = run(bundle, "-p", "Write one sentence about cats.", "--temp", "0", "-n", "16")
    from_gguf = run(bundle, "-m", str(smollm2), "-p", "Write one sentence about cats.", "--temp", "0", "-n", "16")
    assert from_gguf.returncode == 0, from_gguf.stderr
    assert from_gguf.stdout == from_bundle.stdout


def test_models_and_health(server: Server, client: openai.OpenAI) -> None:
    health = httpx.get(server.url + "health").json()
    assert health["status"] == "ok" and health["slots_idle"] + health["slots_processing"] == 4  # the default --parallel
    slots = httpx.get(server.url + "slots").json()
    assert [slot["id"] for slot in slots] == [0, 1, 2, 3] and all(slot["n_ctx"] == 4096 for slot in slots)
    assert [m.id for m in client.models.list().data] == ["SmolLM2-135M-Instruct.Q4_1"]


def test_chat_page_is_served(server: Server) -> None:
    page = httpx.get(server.url)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert '<script type="module" src="/ui/app.js">' in page.text
    script = httpx.get(server.url + "ui/api.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert "/v1/chat/completions" in script.text












def test_weights_are_mapped_from_the_executable(server: Server, bundle: Path) -> None:
    """llama.cpp maps the model from the bundle itself: no extracted or cached copy exists."""
    pids = [server.pid, *_children(server.pid)]
    mapped = [line for pid in pids for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
              if line.endswith(str(bundle.resolve()))]
    assert mapped, "the bundle is not memory-mapped by the serving process"
    opened = bundle_format.open_bundle(bundle)
    model_start, model_end = opened.model_offset, opened.model_offset + opened.model_size
    # (file offset, length) of each mapping; llama.cpp unmaps the GGUF header, keeping the tensor data.
    regions = [(int(line.split()[2], 16), _length(line.split()[0])) for line in mapped]
    weights = [length for offset, length in regions if model_start <= offset < model_end]
    assert weights and max(weights) > 0.9 * opened.model_size
    open_files = [str(p.resolve()) for pid in pids for p in Path(f"/proc/{pid}/fd").iterdir() if p.exists()]
    assert not [f for f in open_files if f.endswith(".gguf")]


def _length(address_range: str) -> int:
    start, end = address_range.split("-")
    return int(end, 16) - int(start, 16)


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            found += [int(child), *_children(int(child))]
    return found


def test_at_its_defaults_one_cache_is_shared_and_one_request_may_fill_it(bundle: Path) -> None:
    """No flags, as a receiver starts it: SmolLM2's own 8,192 tokens shared by 4 slots; a prompt longer than a
    quarter of them is read, and four requests at once all finish."""
    info = run(bundle, "--info")
    assert "Context: 8192 tokens shared by 4 slots (one request may use all of them)" in info.stdout
    server = start_server(bundle, "--port", str(free_port()))
    try:
        with httpx.Client(base_url=server.url, timeout=300) as http:
            props = http.get("/props").json()
            assert props["n_ctx"] == props["n_ctx_slot"] == props["default_generation_settings"]["n_ctx"] == 8192
            long = http.post("/completion", json={"prompt": "word " * 5000, "n_predict": 2}).json()
            assert long["tokens_evaluated"] > 5000 and long["tokens_predicted"] == 2
            client = openai.OpenAI(base_url=server.url + "v1", api_key="x")
            with ThreadPoolExecutor(4) as pool:
                replies = list(pool.map(lambda i: client.completions.create(model="m", prompt=f"Story {i}:", max_tokens=16, temperature=0), range(4)))
            assert all(r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens > 0 for r in replies)
    finally:
        stop_server(server)


def test_port_in_use_falls_back_unless_explicit(bundle: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # Explicit --port: refused with a clear message.
        result = run(bundle, "--nobrowser", "--port", str(port))
        assert_user_error(result, f"cannot listen on 127.0.0.1:{port}")
    # The default port (8080): if it is taken, the next free one is used and announced.
    with socket.socket() as blocker:
        try:
            blocker.bind(("127.0.0.1", 8080))
            blocker.listen()
        except OSError:
            pass  # something else holds 8080 already, which serves the test as well
        server = start_server(bundle)
        try:
            assert server.port != 8080
            assert httpx.get(server.url + "health").status_code == 200
        finally:
            stop_server(server)


def test_truncated_download_is_refused(bundle: Path, tmp_path: Path) -> None:
    partial = tmp_path / "partial.run"
    with open(bundle, "rb") as src:
        partial.write_bytes(src.read(bundle.stat().st_size * 2 // 3))
    partial.chmod(0o755)
    result = run(partial, "--nobrowser")
    assert_user_error(result, "incomplete")
    assert "download" in result.stderr


def test_flipped_weight_byte_caught_by_verify_flag(bundle: Path, tmp_path: Path) -> None:
    damaged = damaged_copy(bundle, tmp_path, 40_000_000)
    assert_user_error(run(damaged, "--verify", "-p", "hi", "-n", "1"), "damaged")
    ok = run(bundle, "--verify", "-p", "hi", "-n", "1")
    assert ok.returncode == 0 and "SHA-256 OK" in ok.stderr


def test_bad_model_argument(bundle: Path, tmp_path: Path) -> None:
    assert_user_error(run(bundle, "-m", str(tmp_path / "missing.gguf"), "-p", "hi"), "not found")
    text = tmp_path / "x.gguf"
    text.write_text("hello")
    assert_user_error(run(bundle, "-m", str(text), "-p", "hi"), "neither a GGUF model nor a llamabox bundle")


def test_quantized_v_cache_without_flash_attention_is_refused(bundle: Path) -> None:
    assert_user_error(run(bundle, "-fa", "off", "-ctv", "q8_0", "-p", "hi"), "-ctv q8_0 needs flash attention")


def test_model_without_chat_template(bundle: Path, smollm2: Path, tmp_path: Path) -> None:
    """Renaming the template key hides it: completions work, chat falls back to ChatML."""
    plain = tmp_path / "no-template.gguf"
    data = bytearray(smollm2.read_bytes())
    at = data.index(b"tokenizer.chat_template")
    data[at : at + 23] = b"tokenizer.chat_templatX"
    plain.write_bytes(bytes(data))
    server = start_server(bundle, "-m", str(plain), "--temp", "0")
    try:
        client = openai.OpenAI(base_url=server.url + "v1", api_key="x")
        assert client.completions.create(model="m", prompt="Once upon a time", max_tokens=8).choices[0].text.strip()
        chat = client.chat.completions.create(model="m", messages=CATS, max_tokens=24)
        assert "cat" in chat.choices[0].message.content.lower()
    finally:
        stop_server(server)


def test_props_report_the_hardware(server: Server) -> None:
    props = httpx.get(server.url + "props").json()
    hw = props["hardware"]
    assert hw["cpu"]["name"] and isinstance(hw["cpu"]["features"], list)
    assert hw["cpu_variant"] == hw["cpu_variants_runnable"][-1]  # the best-scoring one, which passed its self-test
    portable = hw["cpu_variant"] == hw["cpu_variants_runnable"][0]  # only on a CPU older than SSE4.2
    proof = "the portable kernels, the self-test's reference" if portable else "proven on this CPU"
    assert hw["cpu_variant_proof"] == f"{hw['cpu_variant']}: {proof}"
    assert hw["gpu"] is None and hw["gpu_layers"] == 0 and "CPU" in hw["offload"]
    assert props["n_ctx"] == 4 * 4096 and props["n_ctx_slot"] == 4096 and props["chat_template"]


def test_cpu_variant_choice_from_the_executable(bundle: Path) -> None:
    forced = run(bundle, "--info", "--cpu-variant", "x64")
    assert forced.returncode == 0 and "CPU kernels loaded: x64" in forced.stdout
    assert "CPU kernels self-test: x64: forced with --cpu-variant, not proven" in forced.stdout
    from_env = subprocess.run([str(bundle), "--info"], capture_output=True, text=True, env={"LLAMABOX_CPU_VARIANT": "sse42"})
    assert from_env.returncode == 0 and "CPU kernels loaded: sse42" in from_env.stdout
    assert_user_error(run(bundle, "--info", "--cpu-variant", "pentium"), "unknown CPU variant 'pentium'; choose one of: ")
    answer = run(bundle, "--cpu-variant", "x64", "-p", "Write one sentence about cats.", "--temp", "0", "-n", "12")
    best = run(bundle, "-p", "Write one sentence about cats.", "--temp", "0", "-n", "12")
    assert answer.stdout == best.stdout


def test_gpu_off_and_banner(bundle: Path) -> None:
    server = start_server(bundle, "--gpu", "off", "--port", str(free_port()))
    try:
        assert "GPU off" in httpx.get(server.url + "props").json()["hardware"]["offload"]
    finally:
        stop_server(server)
    banner = server.process.stderr.read()
    assert "CPU kernels loaded:" in banner and "GPU: GPU off (--gpu off)" in banner




def test_crash_in_the_kernels_is_one_line_not_a_bare_signal(bundle: Path) -> None:
    """The bootloader starts the runtime, which runs the model in a child: killing that child with
    SIGILL (as a bad kernel would) ends the executable with one line naming the kernels and the way out."""
    running = start_server(bundle, "--port", str(free_port()))
    try:
        variant = httpx.get(running.url + "props").json()["hardware"]["cpu_variant"]
        model_process = _children(running.pid)[-1]
        subprocess.run(["kill", "-ILL", str(model_process)], check=True)
        _, stderr = running.process.communicate(timeout=60)
    finally:
        stop_server(running)
    assert running.process.returncode == 132  # 128 + SIGILL, as a shell reports it, without the bare message
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == (
        f"llamabox: the model's process died of an illegal instruction (SIGILL) in the {variant} CPU kernels; "
        "start again with --cpu-variant x64 (portable) or another variant listed by --info"
    )


def test_requests_decode_together(server: Server, client: openai.OpenAI) -> None:
    """Two long streams are both in a slot at once; both finish whole, and the slots are free after."""

    def story(topic: str) -> openai.Stream:
        return client.chat.completions.create(
            model="any", messages=[{"role": "user", "content": f"Tell me a long story about {topic}."}],
            temperature=0, max_tokens=300, stream=True, logit_bias={"0": -100},  # token 0 ends text: not yet
        )

    streams = [story("a dragon"), story("a lighthouse")]
    for stream in streams:
        assert any(chunk.choices[0].delta.content for chunk in stream)  # each has produced text (reads up to it)
    slots = httpx.get(server.url + "slots").json()
    assert sum(slot["is_processing"] for slot in slots) == 2
    for stream in streams:
        assert list(stream)[-1].choices[0].finish_reason == "length"
    assert httpx.get(server.url + "health").json()["slots_processing"] == 0


def test_full_waiting_line_answers_503(bundle: Path) -> None:
    running = start_server(bundle, "--port", str(free_port()), "-np", "1", "--queue", "1")
    body = {"messages": CATS, "max_tokens": 300, "temperature": 0, "stream": True, "logit_bias": {"0": -100}}
    try:
        with httpx.Client(base_url=running.url, timeout=60) as http:
            with http.stream("POST", "v1/chat/completions", json=body) as in_slot, http.stream("POST", "v1/chat/completions", json=body) as waiting:
                assert in_slot.status_code == waiting.status_code == 200
                refused = http.post("v1/chat/completions", json={**body, "stream": False})
                assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
                assert refused.json()["error"]["message"] == "all 1 slots are busy and 1 requests are waiting; try again shortly"
            # The two clients went away: the server notices, and nothing is left behind.
            deadline = time.monotonic() + 30
            while (health := http.get("health").json())["requests_waiting"] or health["slots_processing"]:
                assert time.monotonic() < deadline, health
                time.sleep(0.1)
    finally:
        stop_server(running)

