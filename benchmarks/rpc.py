"""Several machines' cost: a head and two RPC workers against one process, llamabox against native llama.cpp
(llama-server --rpc and two rpc-server, built from the same vendored source by benchmarks/native.py), in one run.

    python benchmarks/rpc.py [--runs 2] [--delays 0 0.5 2 10] [--threads 2]

Everything runs on this machine: the workers listen on loopback, and a network's latency is added by a proxy in
front of each worker that holds every chunk the head sends for DELAY ms before passing it on (so each round trip
takes DELAY ms more, as `tc qdisc add dev X root netem delay DELAY` on one side of a link would; netem itself needs
the kernel's sch_netem, which this machine's kernel lacks). Bandwidth is loopback's. The workers offer all their
memory, so each head splits SmolLM2's layers evenly between them, and every layer is on a worker (-ngl 99 for
native). Both heads get one slot per client, flash attention on, the same threads; the workers and heads share this
machine's cores (on one machine the workers take turns: a layer's worker computes while the other waits).

Measures, per configuration: decode tok/s of one streamed request, prompt tok/s of a ~PP_TOKENS-token prompt, and
the aggregate tok/s of CONCURRENT_CLIENTS streaming clients (benchmarks/run.py's measures).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.loopback_proxy import LoopbackProxy  # noqa: E402
from benchmarks.native import llama_server, native_tool  # noqa: E402
from benchmarks.run import (  # noqa: E402
    CONCURRENT_CLIENTS,
    Running,
    build_bundle,
    concurrent_rate,
    decode_rate,
    eos_token,
    filler_text,
    free_port,
    prompt_rate,
)
from bundler.default_model import default_model_path  # noqa: E402
from bundler.stubs import default_stub_path  # noqa: E402
from runtime.devices.cpu_features import cpu_info  # noqa: E402
from runtime.devices.rpc import probe  # noqa: E402
from runtime.errors import BackendError  # noqa: E402


@dataclass
class Result:
    samples: dict[str, list[float]] = field(default_factory=dict)

    def add(self, metric: str, value: float) -> None:
        self.samples.setdefault(metric, []).append(value)

    def median(self, metric: str) -> float:
        return statistics.median(self.samples[metric])


def start_workers(kind: str, bundle: Path, threads: int) -> list[subprocess.Popen[bytes]]:
    ports = [free_port(), free_port()]
    if kind == "llamabox":
        commands = [[str(bundle), "--rpc-worker", "--port", str(p), "-t", str(threads)] for p in ports]
    else:
        commands = [[str(native_tool("ggml-rpc-server")), "-H", "127.0.0.1", "-p", str(p), "-c", "-t", str(threads)] for p in ports]
    workers = [subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for c in commands]
    for port in ports:  # ready once it answers a hello (and the connection ends as a head's would)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                probe(f"127.0.0.1:{port}", timeout=5)
                break
            except BackendError:
                time.sleep(0.1)
    for worker, port in zip(workers, ports):
        worker.port = port  # type: ignore[attr-defined]
    return workers


def head_command(kind: str, bundle: Path, model: Path, threads: int, port: int, endpoints: list[str]) -> list[str]:
    """The head (or the single process): CONCURRENT_CLIENTS slots of 2,048 tokens each."""
    rpc = ["--rpc", ",".join(endpoints)] if endpoints else []
    common = ["--port", str(port), "-np", str(CONCURRENT_CLIENTS), "-fa", "on", "-t", str(threads), *rpc]
    if kind == "llamabox":
        return [str(bundle), "--nobrowser", "--ctx-per-slot", "-c", "2048", *common]
    return [str(llama_server()), "-m", str(model), "-c", str(2048 * CONCURRENT_CLIENTS), "--no-webui", *(["-ngl", "99"] if endpoints else []), *common]


def measure(kind: str, bundle: Path, model: Path, threads: int, delay: float | None, eos: int, filler: list[str]) -> dict[str, float]:
    """One configuration: one process (delay None), or a head over two workers with `delay` ms added."""
    workers: list[subprocess.Popen[bytes]] = []
    proxies: list[LoopbackProxy] = []
    try:
        if delay is not None:
            workers = start_workers(kind, bundle, threads)
            proxies = [LoopbackProxy(w.port, delay) for w in workers]  # type: ignore[attr-defined]
        server = Running(head_command(kind, bundle, model, threads, free_port(), [f"127.0.0.1:{p.port}" for p in proxies]))
        try:
            if not filler:
                filler.append(filler_text(server.url))
            decode_rate(server.url, eos)  # warm-up
            return {
                "decode": decode_rate(server.url, eos),
                "prompt": prompt_rate(server.url, filler[0]),
                "concurrent": concurrent_rate(server.url, eos, CONCURRENT_CLIENTS),
                "ready": server.ready_after,
            }
        finally:
            server.stop()
    finally:
        for proxy in proxies:
            proxy.close()
        for worker in workers:
            worker.terminate()
            worker.wait(timeout=20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--delays", type=float, nargs="*", default=[0, 0.5, 2, 10], help="ms added to each round trip")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    model = default_model_path()
    eos = eos_token(model)
    configurations: list[float | None] = [None, *args.delays]
    results = {(kind, c): Result() for kind in ("llamabox", "native") for c in configurations}
    filler: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        bundle = build_bundle(model, default_stub_path(), Path(tmp) / "smollm2.run")
        for run in range(args.runs):
            for configuration in configurations:
                kinds = ("llamabox", "native") if run % 2 == 0 else ("native", "llamabox")
                for kind in kinds:
                    figures = measure(kind, bundle, model, args.threads, configuration, eos, filler)
                    for metric, value in figures.items():
                        results[kind, configuration].add(metric, value)
                    where = "one process" if configuration is None else f"head + 2 workers, +{configuration:g} ms"
                    print(f"  run {run + 1}/{args.runs} {kind:8} {where}: " + ", ".join(f"{k} {v:.1f}" for k, v in figures.items()), file=sys.stderr)
    print(f"SmolLM2-135M-Instruct Q4_1, {cpu_info().name}, {args.threads} threads per process, {args.runs} runs (medians)\n")
    print("| configuration | decode tok/s ours | native | prompt tok/s ours | native | 4 clients tok/s ours | native |")
    print("|---|---|---|---|---|---|---|")
    for configuration in configurations:
        ours, native = results["llamabox", configuration], results["native", configuration]
        label = "one process" if configuration is None else f"head + 2 workers, +{configuration:g} ms a round trip"
        cells = [f"{r.median(m):.1f}" for m in ("decode", "prompt", "concurrent") for r in (ours, native)]
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
