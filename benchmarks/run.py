"""llamabox against native llama-server (same llama.cpp source, same GGUF, same machine).

    python benchmarks/run.py                    # SmolLM2, 3 alternating A/B runs
    python benchmarks/run.py --model X.gguf --runs 5
    python benchmarks/run.py --quick --runs 1 --output /tmp/B.md  # a few tokens each: proves it runs (the tests do)

Measures, for both servers over their HTTP APIs: time from exec to the first successful /health
(first and repeated start), decode and prompt-processing tokens per second, peak resident memory
of the serving process tree, aggregate tokens per second with 4 and 8 concurrent streaming clients, and
the context one request may fill, both programs at their defaults (one cache of the model's own context
shared by 4 slots; native with -fa off, the bundle's default on the CPU, so both run the same kernels); for
llamabox alone: stub size, bundle overhead, `llamabox build` against `cp`, and every CPU variant
this machine can run. Prints the table and writes BENCHMARKS.md and benchmarks/ratios.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.native import CMAKE_FLAGS, llama_server  # noqa: E402
from benchmarks.provenance import stamp  # noqa: E402
from bundler.default_model import default_model_path  # noqa: E402
from bundler.stubs import default_stub_path  # noqa: E402
from runtime import __version__  # noqa: E402
from runtime.devices.cpu_features import cpu_info  # noqa: E402

DECODE_TOKENS = 256
PP_TOKENS = 1000
CONCURRENT_CLIENTS = 4
CONCURRENT_TOKENS = 128
CTX = 4096
FINDINGS_MARKER = "<!-- findings: kept when benchmarks/run.py rewrites this file -->"
VARIANT_DECODE_TOKENS = 128
VARIANT_PP_TOKENS = 300  # words; the slowest variants process ~25 tokens/s
BUILDS, STARTS = 3, 5  # `llamabox build` and repeated starts of the default stub timed


@dataclass
class Target:
    """A server to measure: how to start it, given a port and extra arguments."""

    name: str
    command: Callable[[int], list[str]]  # the server's command line, given a port
    samples: dict[str, list[float]] = field(default_factory=dict)

    def add(self, metric: str, value: float) -> None:
        self.samples.setdefault(metric, []).append(value)


class Running:
    def __init__(self, command: list[str]) -> None:
        self.port = int(command[command.index("--port") + 1])
        self.url = f"http://127.0.0.1:{self.port}"
        started = time.monotonic()
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"{command[0]} exited with {self.process.returncode}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.005)
        self.ready_after = time.monotonic() - started

    def peak_rss_mb(self) -> float:
        """Sum of the peak resident memory (VmHWM) of the process and its descendants."""
        return self.memory_mb("VmHWM")

    def memory_mb(self, field: str) -> float:
        """Sum of a /proc/PID/status memory field (VmHWM, VmRSS) over the process and its descendants."""
        total = 0
        for pid in [self.process.pid, *_descendants(self.process.pid)]:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith(f"{field}:"):
                    total += int(line.split()[1])
        return total / 1024

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def _descendants(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            found += [int(child), *_descendants(int(child))]
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stream_completion(url: str, prompt: str, max_tokens: int, eos: int) -> tuple[int, float, float]:
    """(chunks, seconds from request to first chunk, seconds from first to last chunk)."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, "logit_bias": {str(eos): -100}}
    chunks, first, last, sent = 0, 0.0, 0.0, time.monotonic()
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=300) as response:
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            text = json.loads(line[6:])["choices"][0]["text"]
            if text:
                now = time.monotonic()
                chunks += 1
                first = first or now
                last = now
    return chunks, first - sent, last - first


def decode_rate(url: str, eos: int) -> float:
    chunks, _, span = stream_completion(url, f"Once upon a time, in the year {random.randint(1000, 9999)},", DECODE_TOKENS, eos)
    return (chunks - 1) / span


def prompt_rate(url: str, filler: str) -> float:
    # A fresh prefix each time, so that neither server can reuse a cached prompt.
    prompt = f"Note {random.random()}: " + filler
    started = time.monotonic()
    response = httpx.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": 1, "temperature": 0}, timeout=300)
    elapsed = time.monotonic() - started
    return response.json()["usage"]["prompt_tokens"] / elapsed


def concurrent_rate(url: str, eos: int, clients: int = CONCURRENT_CLIENTS) -> float:
    """Aggregate tokens per second of `clients` streaming clients, each asking for CONCURRENT_TOKENS."""
    counts: list[int] = []

    def client(i: int) -> None:
        counts.append(stream_completion(url, f"Story number {i} of {time.time()}: once upon a time", CONCURRENT_TOKENS, eos)[0])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.monotonic() - started)


def filler_text(url: str) -> str:
    """About PP_TOKENS tokens of text, measured with the server's own tokenizer."""
    words = "the quick brown fox jumps over the lazy dog while a llama reads a book about maps".split()
    text = " ".join(words[i % len(words)] for i in range(PP_TOKENS))
    tokens = httpx.post(url + "/v1/completions", json={"prompt": text, "max_tokens": 1}, timeout=300).json()["usage"]["prompt_tokens"]
    return " ".join(text.split()[: int(PP_TOKENS * PP_TOKENS / tokens)])


def eos_token(model: Path) -> int:
    import gguf

    reader = gguf.GGUFReader(str(model))
    return int(reader.fields["tokenizer.ggml.eos_token_id"].contents())


def measure_ab(targets: list[Target], runs: int, eos: int) -> None:
    filler = ""
    for run in range(runs):
        for target in targets if run % 2 == 0 else reversed(targets):
            server = Running(target.command(free_port()))
            try:
                target.add("start_first" if run == 0 else "start_repeat", server.ready_after)
                filler = filler or filler_text(server.url)
                target.add("decode", decode_rate(server.url, eos))
                target.add("prompt", prompt_rate(server.url, filler))
                target.add("concurrent", concurrent_rate(server.url, eos, CONCURRENT_CLIENTS))
                target.add("concurrent8", concurrent_rate(server.url, eos, 2 * CONCURRENT_CLIENTS))
                target.add("rss", server.peak_rss_mb())
                target.add("context", one_request_context(server.url))
            finally:
                server.stop()
            print(f"  run {run + 1}/{runs} {target.name}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in target.samples.items()), file=sys.stderr)


def one_request_context(url: str) -> float:
    """The tokens of context one request may fill, as the server's /props says (llama-server's slot n_ctx)."""
    return float(httpx.get(url + "/props", timeout=30).json()["default_generation_settings"]["n_ctx"])


def measure_variants(bundle: Path, eos: int, runnable: list[str], rounds: int) -> dict[str, tuple[float, float]]:
    """Decode and prompt tok/s per CPU variant: every variant's server runs at once (idle ones cost
    no CPU) and the rounds go round-robin, so that slow phases of a shared machine hit all rows alike."""
    names = [*runnable, "auto"]
    servers = {}
    try:
        for name in names:
            extra = [] if name == "auto" else ["--cpu-variant", name]
            servers[name] = Running([str(bundle), "--nobrowser", "--port", str(free_port()), "-c", str(CTX), *extra])
        filler = " ".join(filler_text(servers["auto"].url).split()[: VARIANT_PP_TOKENS])
        samples: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
        for round_ in range(rounds):
            for name in names:
                url = servers[name].url
                chunks, _, span = stream_completion(url, f"Once upon a time, in the year {random.randint(1000, 9999)},", VARIANT_DECODE_TOKENS, eos)
                samples[name].append(((chunks - 1) / span, prompt_rate(url, filler)))
                print(f"  round {round_ + 1}/{rounds} variant {name}: decode {samples[name][-1][0]:.1f}, prompt {samples[name][-1][1]:.1f}", file=sys.stderr)
        auto = httpx.get(servers["auto"].url + "/props").json()["hardware"]["cpu_variant"]
    finally:
        for server in servers.values():
            server.stop()
    return {
        (f"auto ({auto})" if name == "auto" else name): (
            statistics.median(d for d, _ in samples[name]),
            statistics.median(p for _, p in samples[name]),
        )
        for name in names
    }


def start_times(command: list[str], runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        port = free_port()
        server = Running([*command, "--port", str(port)])
        times.append(server.ready_after)
        server.stop()
    return times


def build_bundle(model: Path, stub: Path, out: Path) -> Path:
    """`llamabox build MODEL -o OUT --stub STUB`, as a user runs it."""
    subprocess.run([sys.executable, "-c", "from bundler.cli import main; main()", "build", str(model), "-o", str(out), "--stub", str(stub)],
                   check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return out


def build_costs(model: Path, stub: Path, workdir: Path) -> dict[str, float]:
    def timed(command: list[str]) -> float:
        started = time.monotonic()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        return time.monotonic() - started

    llamabox = [sys.executable, "-c", "from bundler.cli import main; main()"]
    builds, copies = [], []
    for i in range(BUILDS):
        copies.append(timed(["cp", str(model), str(workdir / f"copy{i}.gguf")]))
        builds.append(timed([*llamabox, "build", str(model), "-o", str(workdir / f"b{i}.run"), "--stub", str(stub)]))
    bundle = workdir / "b0.run"
    return {
        "stub_mb": stub.stat().st_size / 1e6,
        "overhead_mb": (bundle.stat().st_size - model.stat().st_size) / 1e6,
        "build_s": statistics.median(builds),
        "cp_s": statistics.median(copies),
        "start": start_times([str(bundle), "--nobrowser"], STARTS),
    }


def summary(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.median(values):.2f} ({min(values):.2f}–{max(values):.2f})"


def metrics() -> list[tuple[str, str, bool]]:
    """(key, label, higher is better) of every A/B row, labelled with the workload of this run."""
    return [
        ("start_first", "first start to /health (s)", False),
        ("start_repeat", "repeated start to /health (s)", False),
        ("decode", f"decode tok/s ({DECODE_TOKENS} tokens)", True),
        ("prompt", f"prompt processing tok/s (~{PP_TOKENS} tokens)", True),
        ("rss", "peak RSS of the process tree (MB)", False),
        ("concurrent", f"aggregate tok/s, {CONCURRENT_CLIENTS} streaming clients", True),
        ("concurrent8", f"aggregate tok/s, {2 * CONCURRENT_CLIENTS} streaming clients (4 wait)", True),
        ("context", "context one request may fill at defaults (tokens)", True),
    ]


def report(ours: Target, native: Target, variants: dict[str, tuple[float, float]], costs: dict[str, float], meta: dict[str, str]) -> tuple[str, dict[str, float]]:
    ratios = {}
    on = f"measured on {meta['machine'].split(',')[0]}"
    lines = [f"| metric ({on}) | llamabox | native llama-server | ratio (ours / native) |", "|---|---|---|---|"]
    for key, label, _higher_is_better in metrics():
        if key not in ours.samples:
            continue  # start_repeat after a single run
        a, b = ours.samples[key], native.samples[key]
        ratios[key] = statistics.median(a) / statistics.median(b)
        lines.append(f"| {label} | {summary(a)} | {summary(b)} | {ratios[key]:.2f}× |")
    lines += [
        "",
        f"| llamabox only ({on}) | value |",
        "|---|---|",
        f"| runtime stub size | {costs['stub_mb']:.1f} MB |",
        f"| bundle size minus GGUF size | {costs['overhead_mb']:.1f} MB |",
        f"| `llamabox build` (median of {BUILDS}) | {costs['build_s']:.2f} s |",
        f"| `cp` of the same GGUF (median of {BUILDS}) | {costs['cp_s']:.2f} s |",
        f"| repeated start to /health, default stub ({STARTS} runs) | {summary(costs['start'])} s |",
        "",
        f"| CPU variant (llamabox, {on}) | decode tok/s | prompt tok/s |",
        "|---|---|---|",
        *[f"| {name} | {d:.1f} | {p:.1f} |" for name, (d, p) in variants.items()],
    ]
    header = [f"- {k}: {v}" for k, v in meta.items()]
    return "\n".join(header + [""] + lines), ratios


def chart(ratios: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(key, label) for key, label, _ in metrics() if key in ratios]
    labels = [label for _, label in rows]
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.barh(labels, [ratios[key] for key, _ in rows], color="#2563eb")
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_title("llamabox / native llama-server")
    ax.set_xlabel("ratio (seconds and MB: lower is better; tok/s: higher is better)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="GGUF to measure (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--runs", type=int, default=3, help="alternating A/B runs (default 3)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--stub", type=Path, help="the runtime stub to bundle with (default: build.py's, built if missing)")
    parser.add_argument("--quick", action="store_true", help="a few tokens per measurement and one round: proves the script runs, measures nothing")
    args = parser.parse_args()
    if args.quick:
        shrink_workload()

    model = (args.model or default_model_path()).resolve()
    stub = args.stub or default_stub_path()
    if not stub.exists():
        subprocess.run([sys.executable, str(ROOT / "build.py")], check=True)
    native_binary = llama_server()
    eos = eos_token(model)
    threads = ["--threads", str(args.threads)]

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        print("Build costs...", file=sys.stderr)
        costs = build_costs(model, stub, workdir)
        bundle = workdir / "b0.run"
        # Both at their defaults, which make the same cache: the model's own context (memory allowing) shared by
        # 4 slots. Native gets -fa off, the bundle's default on the CPU, so that both run the same kernels.
        ours = Target("llamabox", lambda port: [str(bundle), "--nobrowser", "--port", str(port), *threads])
        native = Target("llama-server", lambda port: [str(native_binary), "-m", str(model), "--port", str(port), *threads, "-fa", "off", "--no-webui"])
        print("A/B runs...", file=sys.stderr)
        measure_ab([ours, native], args.runs, eos)
        print("CPU variants...", file=sys.stderr)
        info = subprocess.run([str(bundle), "--info"], capture_output=True, text=True, check=True).stdout
        runnable = info.split("runnable here: ")[1].split(")")[0].split(", ")
        variants = measure_variants(bundle, eos, runnable, rounds=1 if args.quick else 3)

    cpu = cpu_info()
    meta = {
        **stamp(),
        "machine": f"{cpu.name}, {os.cpu_count()} logical CPUs, {_memory_gb():.0f} GiB RAM, {platform.platform()}",
        "CPU features": " ".join(cpu.features),
        "versions": f"llamabox {__version__}, llama-cpp-python {_version('llama-cpp-python')}, Python {platform.python_version()}, "
        f"PyInstaller {_version('pyinstaller')}",
        "model": f"{model.name} ({model.stat().st_size / 1e6:.1f} MB)",
        "llamabox command": f"`<bundle> --nobrowser --port P --threads {args.threads}`: its defaults (stub from build.py, bundle from `llamabox build`)",
        "native command": f"`llama-server -m {model.name} --port P --threads {args.threads} -fa off --no-webui`: its defaults but flash attention, off as the bundle's on the CPU; built with `cmake {' '.join(CMAKE_FLAGS)}` from the llama.cpp vendored in llama-cpp-python {_version('llama-cpp-python')}",
        "cache": "both make one cache of the model's own context shared by 4 slots (llama-server's -c 0 and -np auto; the bundle's defaults), so one request may fill it; the context row says how much",
        "method": f"{args.runs} alternating A/B runs; median (min–max); greedy sampling, EOS suppressed so every decode run produces {DECODE_TOKENS} tokens; decode rate from the first to the last streamed token; prompt rate = prompt tokens / request time with a fresh prompt each time",
        "reproduce": "`python benchmarks/run.py" + (f" --model {args.model}" if args.model else "") + f" --runs {args.runs}`",
    }
    text, ratios = report(ours, native, variants, costs, meta)
    print(text)
    png = args.output.parent / "benchmarks" / "ratios.png"
    png.parent.mkdir(parents=True, exist_ok=True)  # --output elsewhere than the checkout
    chart(ratios, png)
    # Hand-written findings below the marker survive a re-run.
    previous = args.output.read_text() if args.output.exists() else ""
    findings = previous[previous.index(FINDINGS_MARKER):] if FINDINGS_MARKER in previous else FINDINGS_MARKER + "\n"
    args.output.write_text(f"# Benchmarks\n\n{text}\n\n![ratios](benchmarks/ratios.png)\n\n{findings}")
    print(f"\nWrote {args.output} and {png}", file=sys.stderr)


def shrink_workload() -> None:
    """--quick: every measurement with a few tokens (module constants, as concurrency.py and gpu.py share them)."""
    global DECODE_TOKENS, PP_TOKENS, CONCURRENT_TOKENS, VARIANT_DECODE_TOKENS, VARIANT_PP_TOKENS, BUILDS, STARTS
    DECODE_TOKENS, PP_TOKENS, CONCURRENT_TOKENS, VARIANT_DECODE_TOKENS, VARIANT_PP_TOKENS, BUILDS, STARTS = 8, 32, 4, 4, 16, 1, 1


def _memory_gb() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def _version(dist: str) -> str:
    import importlib.metadata

    return importlib.metadata.version(dist)


if __name__ == "__main__":
    main()
