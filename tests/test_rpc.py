"""Several machines, on one: --rpc-worker processes on loopback (and one in a network namespace of its own, over a
veth pair, as another machine) and a head (--rpc) that spreads SmolLM2 over them.

Each worker offers 80 MiB (--rpc-mem), less than the model with its cache and compute buffers needs, so the head
splits the layers between both. The answers are compared with one process's with flash attention on in both
(-fa on): a worker computes on the default CPU buffers, where llama.cpp's own process may use repacked ones, and
the two kinds of attention differ in the last bits; with the same attention the greedy text is the same. Tests
that compare concurrent requests use the portable kernels everywhere (--cpu-variant x64), as test_speculative.py
says why.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from runtime.devices.rpc import probe
from runtime.errors import BackendError
from tests.conftest import Server, free_port, start_server, stop_server
from benchmarks.loopback_proxy import LoopbackProxy
from tests.rpc_fuzz import fuzz

PROMPT = "What is the capital of France?"
HEAD = ["-c", "512", "-ub", "64", "-fa", "on", "--temp", "0"]
ROOM_FOR_EMBEDDINGS = ["--rpc-mem", "256"]  # the embeddings' own context needs its cache and buffers on the workers too
pytestmark = pytest.mark.skipif(os.name != "posix", reason="--rpc-worker forks")


@dataclass
class Worker:
    process: subprocess.Popen[str]
    port: int
    log: Path  # its stderr
    line: str  # its first line: endpoint, device, memory

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def server_pid(self) -> int | None:
        """The forked process that runs ggml's server (None between two)."""
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()
        return int(children[0]) if children else None

    def rss_bytes(self) -> int:
        pid = self.server_pid()
        status = Path(f"/proc/{pid}/status").read_text() if pid else "VmRSS: 0 kB"
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024


def start_worker(executable: Path, *args: str, cache: Path | None = None, port: int | None = None) -> Worker:
    """A worker in a session of its own (so that Ctrl+C reaches its process group, as a terminal sends it), ready
    once it answers a hello."""
    port = port or free_port()
    env = {**os.environ, **({"LLAMABOX_CACHE": str(cache)} if cache else {})}
    log = Path(tempfile.mkstemp(prefix="rpc-worker-", suffix=".log")[1])
    with open(log, "w") as stderr:
        process = subprocess.Popen(
            [str(executable), "--rpc-worker", "--port", str(port), "--rpc-mem", "80", *args],
            stdout=subprocess.DEVNULL, stderr=stderr, text=True, env=env, start_new_session=True,
        )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        line = next((l for l in log.read_text().splitlines() if "RPC worker on" in l), None)
        if line:
            try:
                probe(f"127.0.0.1:{port}", timeout=5)
                return Worker(process, port, log, line.strip())
            except BackendError:
                pass
        time.sleep(0.1)
    process.kill()
    raise AssertionError(f"the worker did not start: {log.read_text()[-2000:]}")


def stop_worker(worker: Worker) -> str:
    """Ctrl+C, as a terminal sends it (to the process group); what the worker printed after its first line."""
    if worker.process.poll() is None:
        os.killpg(worker.process.pid, signal.SIGINT)
        try:
            worker.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            worker.process.kill()
            worker.process.wait()
    text = worker.log.read_text()
    worker.log.unlink()
    return text.split(worker.line, 1)[-1]


@pytest.fixture(scope="module")
def workers(stub: Path, bundle: Path) -> Iterator[tuple[Worker, Worker]]:
    """Two workers: the bare stub and a bundle (a worker needs no model; either file is one)."""
    first = start_worker(stub)
    try:
        second = start_worker(bundle)
    except BaseException:
        stop_worker(first)
        raise
    yield first, second
    stop_worker(second)
    stop_worker(first)


def rpc(*workers: Worker) -> list[str]:
    return ["--rpc", ",".join(w.endpoint for w in workers)]


def run(bundle: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(bundle), *args], capture_output=True, text=True, timeout=timeout)


def test_a_worker_says_where_it_listens_what_it_serves_and_how_much_it_offers(workers: tuple[Worker, Worker]) -> None:
    for worker in workers:
        assert re.fullmatch(rf"llamabox: RPC worker on {worker.endpoint}: CPU \(.+\), 80 MiB offered \(--rpc-mem\) of [\d,]+ MiB free; stop it with Ctrl\+C", worker.line), worker.line


def test_the_head_splits_the_model_over_two_workers_and_answers_as_one_process(bundle: Path, workers: tuple[Worker, Worker]) -> None:
    alone = run(bundle, *HEAD, "-p", PROMPT, "-n", "24")
    spread = run(bundle, *HEAD, *rpc(*workers), "-p", PROMPT, "-n", "24")
    assert alone.returncode == 0 and spread.returncode == 0, spread.stderr
    assert spread.stdout == alone.stdout and len(spread.stdout.split()) > 5
    info = run(bundle, *HEAD, *rpc(*workers), "--info")
    assert f"RPC worker: RPC0 at {workers[0].endpoint}, 80 MiB free of 80 MiB" in info.stdout, info.stdout
    placed = re.search(r"RPC0 \(127\.0\.0\.1:\d+\) (\d+) layers \+ RPC1 \(127\.0\.0\.1:\d+\) (\d+) layers: 31/31 layers", info.stdout)
    assert placed and min(map(int, placed.groups())) > 0, info.stdout  # both hold layers: neither alone has room


def test_props_lists_the_workers_with_their_endpoints(bundle: Path, workers: tuple[Worker, Worker]) -> None:
    server = start_server(bundle, *HEAD, *rpc(*workers), "--port", str(free_port()))
    try:
        devices = httpx.get(server.url + "props", timeout=30).json()["hardware"]["gpus"]
    finally:
        stop_server(server)
    remote = [(d["name"], d["endpoint"], d["used"]) for d in devices if d["endpoint"]]
    assert remote == [("RPC0", workers[0].endpoint, True), ("RPC1", workers[1].endpoint, True)]
    assert devices[0]["memory_total"] == 80 << 20


def test_four_clients_at_once_get_the_answers_of_one_process_and_embeddings_beside_them_too(bundle: Path, stub: Path) -> None:
    x64 = ["--cpu-variant", "x64"]
    pair = [start_worker(stub, *x64, *ROOM_FOR_EMBEDDINGS), start_worker(stub, *x64, *ROOM_FOR_EMBEDDINGS)]
    common = [*HEAD, *x64, "-np", "4", "--ctx-per-slot", "-c", "256"]
    servers: list[Server] = []
    try:
        servers = [start_server(bundle, *common, "--port", str(free_port())), start_server(bundle, *common, *rpc(*pair), "--port", str(free_port()))]
        questions = ["Name three colours.", "What is 2 + 2?", "Say hello in French.", "Why is the sky blue?"]

        def ask(server: Server, question: str) -> str:
            body = {"messages": [{"role": "user", "content": question}], "max_tokens": 24, "temperature": 0}
            return httpx.post(server.url + "v1/chat/completions", json=body, timeout=300).json()["choices"][0]["message"]["content"]

        def embed(server: Server) -> list[float]:
            body = {"input": "A cat sleeps in the sun."}
            answer = httpx.post(server.url + "v1/embeddings", json=body, timeout=300)
            assert answer.status_code == 200, answer.text
            return answer.json()["data"][0]["embedding"]

        answers, beside = [], []
        for server in servers:
            with concurrent.futures.ThreadPoolExecutor(5) as pool:
                asked = [pool.submit(ask, server, q) for q in questions]
                if server is servers[1]:  # embeddings, from a context of their own, on the same workers meanwhile
                    while not all(a.done() for a in asked) or not beside:
                        beside.append(embed(server))
                answers.append([a.result() for a in asked])
        assert answers[1] == answers[0] and all(answers[0])
        alone = embed(servers[1])
        assert len(beside) > 1 and all(max(abs(a - b) for a, b in zip(v, alone)) < 1e-5 for v in beside)
    finally:
        for server in servers:
            stop_server(server)
        for worker in pair:
            stop_worker(worker)


def test_an_embeddings_context_that_does_not_fit_the_workers_is_an_error_and_the_answer_goes_on(bundle: Path, stub: Path) -> None:
    """At 160 MiB a worker holds its layers and the slots' cache, but not also the embeddings' context of 512 tokens:
    llama.cpp allocates part of it, fails, and frees what it allocated. ggml's worker then drops the graph it stored
    for the answer being generated; without scripts/patches/rpc/0002 the head asked it to compute that graph again,
    the worker closed the connection, and the head dropped a healthy worker."""
    pair = [start_worker(stub, "--rpc-mem", "160"), start_worker(stub, "--rpc-mem", "160")]
    server = start_server(bundle, *HEAD, *rpc(*pair), "--port", str(free_port()))
    texts = [f"{i}. " + "The cat sat on the mat and watched the birds outside the window. " * 30 for i in range(5)]
    try:
        body = {"messages": [{"role": "user", "content": "Write a long story about a cat."}], "max_tokens": 120, "temperature": 0}
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            answer = pool.submit(httpx.post, server.url + "v1/chat/completions", json=body, timeout=120)
            refused = []
            while not answer.done():
                refused.append(httpx.post(server.url + "api/embed", json={"model": "m", "input": texts}, timeout=120))
            story = answer.result()
    finally:
        stop_server(server)
        for worker in pair:
            stop_worker(worker)
    assert story.status_code == 200 and story.json()["usage"]["completion_tokens"] == 120, story.text
    assert len(refused) > 1 and {r.status_code for r in refused} == {400}
    assert "could not make a context of 512 tokens for embeddings" in refused[0].json()["error"]  # Ollama's shape
    log = server.process.stderr.read() if server.process.stderr else ""
    assert "lost the RPC worker" not in log and "Traceback" not in log


def test_a_second_head_start_reuses_the_weights_the_workers_cached(bundle: Path, stub: Path, tmp_path: Path) -> None:
    """ggml's tensor cache: a tensor over 10 MiB is sent once, then named by its hash (SmolLM2's output matrix,
    29 MiB, is its one such tensor). Counted by a proxy in front of each worker: what the head sent."""
    pair = [start_worker(stub, cache=tmp_path / "cache"), start_worker(stub, cache=tmp_path / "cache")]
    proxies = [LoopbackProxy(w.port, record=True) for w in pair]
    try:
        sent = []
        for _ in range(2):
            result = run(bundle, *HEAD, "--rpc", ",".join(f"127.0.0.1:{p.port}" for p in proxies), "-p", PROMPT, "-n", "4")
            assert result.returncode == 0, result.stderr
            for proxy in proxies:
                proxy.wait_closed()
            sent.append(sum(len(s) for p in proxies for s in p.sessions) - sum(sent))
    finally:
        for proxy in proxies:
            proxy.close()
        for worker in pair:
            stop_worker(worker)
    assert [f.stat().st_size for f in (tmp_path / "cache" / "rpc").iterdir()] == [30_081_024]  # 49,152 x 576 at Q8_0
    assert sent[0] - sent[1] > 30_000_000 and sent[0] > 60_000_000, sent


def test_a_worker_lost_mid_answer_fails_the_request_with_503_and_the_head_serves_again(bundle: Path, stub: Path) -> None:
    pair = [start_worker(stub, *ROOM_FOR_EMBEDDINGS), start_worker(stub, *ROOM_FOR_EMBEDDINGS)]
    server = start_server(bundle, *HEAD, *rpc(*pair), "--port", str(free_port()))
    try:
        body = {"messages": [{"role": "user", "content": "Write a long story about a cat."}], "max_tokens": 2000, "temperature": 0}
        # Embeddings run beside the slots, in a thread of their own: 40 texts of ~400 tokens take a minute here.
        texts = [f"{i}. " + "The cat sat on the mat and watched the birds outside the window. " * 30 for i in range(40)]
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            answer = pool.submit(httpx.post, server.url + "v1/chat/completions", json=body, timeout=120)
            begun = time.monotonic() + 60
            while not _generating(server) and time.monotonic() < begun:  # the answer has begun
                time.sleep(0.1)
            embedding = pool.submit(httpx.post, server.url + "api/embed", json={"model": "m", "input": texts}, timeout=120)
            time.sleep(1.5)  # its first texts are being read
            os.killpg(pair[1].process.pid, signal.SIGKILL)  # the watcher and its server, as a machine that goes away
            failed, unembedded = answer.result(), embedding.result()
        assert failed.status_code == 503, failed.text
        assert f"the RPC worker {pair[1].endpoint} dropped out" in failed.json()["error"]["message"]
        assert unembedded.status_code == 503 and unembedded.headers["retry-after"] == "5", unembedded.text
        assert f"the RPC worker {pair[1].endpoint} dropped out" in unembedded.json()["error"]  # Ollama's shape
        deadline, again = time.monotonic() + 120, None
        while time.monotonic() < deadline:
            try:
                again = httpx.post(server.url + "v1/chat/completions", json={**body, "max_tokens": 8}, timeout=30)
                if again.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        assert again is not None and again.status_code == 200 and again.json()["choices"][0]["message"]["content"]
    finally:
        stop_server(server)
        for worker in pair:
            if worker.process.poll() is None:
                stop_worker(worker)
    log = server.process.stderr.read() if server.process.stderr else ""
    assert f"llamabox: lost the RPC worker {pair[1].endpoint} (its connection dropped); the requests in flight failed; starting again without it" in log
    assert f"the RPC worker {pair[1].endpoint} cannot be reached" in log and "Traceback" not in log
    assert re.search(rf"RPC0 \({re.escape(pair[0].endpoint)}\)[^\n]*/31 layers", log.split("starting again without it")[1]), log


def _generating(server: Server) -> bool:
    try:
        return any(slot["is_processing"] for slot in httpx.get(server.url + "slots", timeout=5).json())
    except (httpx.HTTPError, ValueError, TypeError):
        return False


def test_an_unreachable_worker_is_one_line_before_the_model_loads(bundle: Path) -> None:
    port = free_port()
    result = run(bundle, *HEAD, "--rpc", f"127.0.0.1:{port}", "-p", PROMPT, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"Error: the RPC worker 127.0.0.1:{port} cannot be reached (Connection refused); start it there with --rpc-worker, or check the address"
    ), result.stderr
    assert "Traceback" not in result.stderr and not result.stdout
    bad = run(bundle, "--rpc", "somewhere", "-p", PROMPT, timeout=60)
    assert bad.returncode == 1 and "--rpc 'somewhere' is not HOST:PORT" in bad.stderr and "Traceback" not in bad.stderr


def test_a_worker_listens_beyond_loopback_only_when_told_and_then_warns(stub: Path) -> None:
    refused = run(stub, "--rpc-worker", "--host", "0.0.0.0", "--port", str(free_port()), timeout=60)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "ggml RPC has no authentication" in refused.stderr and "--rpc-allow-remote" in refused.stderr
    worker = start_worker(stub, "--host", "0.0.0.0", "--rpc-allow-remote")
    warned = worker.log.read_text()
    stop_worker(worker)
    assert "llamabox: warning: this RPC worker listens on 0.0.0.0: anyone who reaches port" in warned, warned


def test_a_taken_port_is_one_line(stub: Path, workers: tuple[Worker, Worker]) -> None:
    result = run(stub, "--rpc-worker", "--port", str(workers[0].port), timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip() == f"Error: port {workers[0].port} on 127.0.0.1 is in use (another worker?); choose another with --port"


def test_ctrl_c_stops_a_worker_with_one_line(stub: Path) -> None:
    worker = start_worker(stub)
    assert stop_worker(worker).strip() == "llamabox: stopped" and worker.process.returncode == 0
    assert worker.server_pid() is None if worker.process.poll() is None else True


@pytest.mark.slow
def test_malformed_messages_neither_stop_the_worker_nor_take_its_memory(bundle: Path, stub: Path) -> None:
    """The worker's port fuzzed from loopback with what a real head sent, damaged (tests/rpc_fuzz.py): 30 rounds of
    at most 20 connections or 2 s, its server's memory read after each; heads that leave mid-transfer are among
    them. The worker refuses what is damaged (ggml's own lines, with --verbose), never holds more than the model's
    share and some, and afterwards serves a head as before."""
    worker = start_worker(stub, "--verbose")
    recorder = LoopbackProxy(worker.port, record=True)
    try:
        through = ["--rpc", f"127.0.0.1:{recorder.port}"]
        expected = run(bundle, *HEAD, *through, "-p", PROMPT, "-n", "12")
        assert expected.returncode == 0, expected.stderr
        recorder.wait_closed()
        assert recorder.sessions, "nothing was recorded"
        peak, sent = 0, 0
        for round_ in range(30):
            report = fuzz(worker.port, recorder.sessions, seconds=2, connections=20, seed=round_)
            peak, sent = max(peak, worker.rss_bytes()), sent + report.connections
            assert worker.process.poll() is None, "the worker stopped"
        after = run(bundle, *HEAD, "--rpc", worker.endpoint, "-p", PROMPT, "-n", "12")
        assert after.returncode == 0 and after.stdout == expected.stdout, after.stderr
    finally:
        recorder.close()
        log = stop_worker(worker)
    assert peak < 600 << 20, f"the worker's server held {peak >> 20} MiB"
    refusals = re.findall(r"Unknown command|buffer not found|error deserializing|out of buffer bounds|larger than any buffer|invalid tensor", log)
    assert len(refusals) > 10, log[-3000:]  # the worker refused damaged messages (ggml's own lines, --verbose) and went on
    assert "Traceback" not in log
    print(f"fuzzed: {sent} connections, {len(refusals)} refusals; server restarts: {log.count('the RPC server died')}; peak RSS {peak >> 20} MiB")


def test_a_head_that_lost_a_worker_exits_when_the_rest_would_not_fit_here() -> None:
    from runtime.devices.offload import ModelFacts, Offload
    from runtime.errors import LlamaboxError
    from runtime.modes import _check_fits_without_workers

    petabyte = ModelFacts(n_layer=80, weights_bytes=1 << 50, kv_bytes_per_token=1, n_vocab=1, n_embd=1, n_ctx_train=1)
    left = Offload(gpus=(), layers=40, total_layers=81, cache=None, note="")
    with pytest.raises(LlamaboxError, match=r"without the lost RPC worker the model does not fit: [\d,]+ MiB of it would be on this machine"):
        _check_fits_without_workers(left, petabyte)
    _check_fits_without_workers(Offload(gpus=(), layers=81, total_layers=81, cache=None, note=""), petabyte)  # all on devices: fine


def test_a_tensor_split_that_is_not_numbers_is_one_line(bundle: Path) -> None:
    result = run(bundle, "-ts", "3,x", "--rpc", "127.0.0.1:1", "-p", PROMPT, timeout=60)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "Error: --tensor-split '3,x': give numbers separated by commas, one per device, e.g. 3,1"


@pytest.fixture
def other_machine() -> Iterator[tuple[list[str], str]]:
    """A network namespace standing for another machine, joined to this one by a veth pair: (the command prefix
    that runs a program there, its address). Root only (unshare, ip, nsenter)."""
    if os.geteuid() != 0 or not all(shutil.which(tool) for tool in ("unshare", "nsenter", "ip")):
        pytest.skip("needs root and unshare, nsenter and ip to make a network namespace")
    keeper = subprocess.Popen(["unshare", "-n", "sleep", "600"])
    here, there = f"lbx{os.getpid() % 100000}a", f"lbx{os.getpid() % 100000}b"
    octet = 16 + os.getpid() % 200
    enter = ["nsenter", "-t", str(keeper.pid), "-n"]
    try:
        time.sleep(0.2)
        for command in (
            ["ip", "link", "add", here, "type", "veth", "peer", "name", there, "netns", str(keeper.pid)],
            ["ip", "addr", "add", f"10.231.{octet}.1/30", "dev", here],
            ["ip", "link", "set", here, "up"],
            [*enter, "ip", "addr", "add", f"10.231.{octet}.2/30", "dev", there],
            [*enter, "ip", "link", "set", there, "up"],
            [*enter, "ip", "link", "set", "lo", "up"],
        ):
            subprocess.run(command, check=True, capture_output=True)
        yield enter, f"10.231.{octet}.2"
    finally:
        subprocess.run(["ip", "link", "del", here], capture_output=True)
        keeper.kill()
        keeper.wait()


def test_a_worker_on_another_machine_serves_a_head_over_the_network(bundle: Path, stub: Path, other_machine: tuple[list[str], str]) -> None:
    """One worker in a network namespace of its own, listening on its veth address (--host, --rpc-allow-remote),
    the other on this machine's loopback: the head's answer is the single process's."""
    enter, address = other_machine
    port = free_port()
    log = Path(tempfile.mkstemp(prefix="rpc-remote-", suffix=".log")[1])
    with open(log, "w") as stderr:
        remote = subprocess.Popen(
            [*enter, str(stub), "--rpc-worker", "--host", address, "--rpc-allow-remote", "--port", str(port), "--rpc-mem", "80"],
            stderr=stderr, stdout=subprocess.DEVNULL, start_new_session=True,
        )
    local = start_worker(stub)
    try:
        deadline = time.monotonic() + 120
        while "RPC worker on" not in log.read_text() and time.monotonic() < deadline and remote.poll() is None:
            time.sleep(0.1)
        alone = run(bundle, *HEAD, "-p", PROMPT, "-n", "24")
        spread = run(bundle, *HEAD, "--rpc", f"{address}:{port},{local.endpoint}", "-p", PROMPT, "-n", "24")
        assert spread.returncode == 0, spread.stderr + log.read_text()
        assert spread.stdout == alone.stdout
        info = run(bundle, *HEAD, "--rpc", f"{address}:{port},{local.endpoint}", "--info")
        assert re.search(rf"RPC0 \({re.escape(address)}:{port}\) [1-9]\d* layers \+ RPC1 \([^)]+\) [1-9]\d* layers", info.stdout), info.stdout
        unreachable = run(bundle, *HEAD, "--rpc", f"127.0.0.1:{port}", "-p", PROMPT, timeout=60)  # not listening here
        assert unreachable.returncode == 1 and "cannot be reached" in unreachable.stderr
    finally:
        os.killpg(remote.pid, signal.SIGINT)
        remote.wait(timeout=20)
        stop_worker(local)
    assert "warning: this RPC worker listens on " + address in log.read_text()
    log.unlink()
