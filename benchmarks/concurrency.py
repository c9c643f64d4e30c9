"""Several clients at once: llamabox against native llama-server at the same -np, side by side, one run.

    python benchmarks/concurrency.py [--model M.gguf] [--runs 3] [--threads N]

For 1, 2, 4 and 8 slots: aggregate tokens per second of as many streaming clients (every client asks
for CONCURRENT_TOKENS tokens with EOS suppressed), alternating llamabox and native runs. Also the
single-stream decode rate (as benchmarks/run.py measures it), the time to first token of the 10th turn of a chat whose history the server has cached, and the peak
RSS at -np 4. Both servers get the same cache, one of 1,024 tokens a slot shared by the slots, and
flash attention off (the bundle's default on the CPU). Prints a Markdown table naming the CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.native import llama_server  # noqa: E402
from benchmarks.run import CONCURRENT_TOKENS, Running, build_bundle, concurrent_rate, decode_rate, eos_token, free_port  # noqa: E402
from bundler.default_model import default_model_path  # noqa: E402
from bundler.stubs import default_stub_path  # noqa: E402
from runtime.devices.cpu_features import cpu_info  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LEVELS = (1, 2, 4, 8)
CTX_PER_SLOT = 1024
CHAT_TURNS = 10


def tenth_turn_first_token(url: str) -> float:
    """Seconds to the first streamed token of turn 10, after nine turns the server has seen."""
    messages: list[dict[str, str]] = []
    elapsed = 0.0
    for turn in range(CHAT_TURNS):
        messages.append({"role": "user", "content": f"Turn {turn}: tell me one fact about the number {turn * 7 + 3}."})
        body = {"messages": messages, "max_tokens": 32, "temperature": 0, "stream": True}
        sent, first, text = time.monotonic(), 0.0, []
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=300) as response:
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                choices = json.loads(line[6:])["choices"]
                piece = choices[0]["delta"].get("content") if choices else None
                if piece:
                    first = first or time.monotonic()
                    text.append(piece)
        elapsed = first - sent
        messages.append({"role": "assistant", "content": "".join(text)})
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    model = (args.model or default_model_path()).resolve()
    stub = default_stub_path()
    if not stub.exists():
        subprocess.run([sys.executable, str(ROOT / "build.py")], check=True)
    native_binary, eos = llama_server(), eos_token(model)
    threads = ["--threads", str(args.threads)]
    rows: dict[str, dict[str, list[float]]] = {}

    with tempfile.TemporaryDirectory() as tmp:
        bundle = build_bundle(model, stub, Path(tmp) / "model.run")

        def ours(n: int) -> list[str]:
            return [str(bundle), "--nobrowser", "--port", str(free_port()), "-np", str(n), "-c", str(CTX_PER_SLOT * n), *threads]

        def native(n: int) -> list[str]:
            return [str(native_binary), "-m", str(model), "--port", str(free_port()), "-np", str(n), "-c", str(CTX_PER_SLOT * n),
                    *threads, "-kvu", "-fa", "off", "--no-webui"]  # one shared cache (-kvu, which a given -np turns off) and flash attention off, as the bundle's defaults on the CPU

        for run in range(args.runs):
            for name, command in (("llamabox", ours), ("llama-server", native))[:: 1 if run % 2 == 0 else -1]:
                for n in LEVELS:
                    server = Running(command(n))
                    try:
                        rows.setdefault(f"aggregate tok/s, {n} client{'s' if n > 1 else ''}", {}).setdefault(name, []).append(
                            concurrent_rate(server.url, eos, clients=n))
                        if n == 1:  # the noisiest row: three samples per start
                            rows.setdefault("single-stream decode tok/s (first to last token)", {}).setdefault(name, []).extend(
                                decode_rate(server.url, eos) for _ in range(3))
                        if n == 4:
                            rows.setdefault("first token of the 10th chat turn (s)", {}).setdefault(name, []).append(tenth_turn_first_token(server.url))
                            rows.setdefault("peak RSS at -np 4 (MB)", {}).setdefault(name, []).append(server.peak_rss_mb())
                    finally:
                        server.stop()
                print(f"  run {run + 1}/{args.runs} {name} done", file=sys.stderr)

    cpu = cpu_info()
    print(f"Measured on {cpu.name} ({args.threads} threads), {model.name}, median of {args.runs} alternating runs; "
          f"{CONCURRENT_TOKENS} tokens per client, one cache of {CTX_PER_SLOT} tokens a slot shared by the slots on both sides.\n")
    print("| metric | llamabox | native llama-server | ratio (ours / native) |")
    print("|---|---:|---:|---:|")
    for metric, values in rows.items():
        a, b = statistics.median(values["llamabox"]), statistics.median(values["llama-server"])
        print(f"| {metric} | {a:.2f} | {b:.2f} | {a / b:.2f}× |")
    chart(rows, ROOT / "benchmarks" / "concurrency.png")


def chart(rows: dict[str, dict[str, list[float]]], path: Path) -> None:
    """Aggregate tok/s per number of clients, both servers side by side (needs `pip install -e ".[bench]"`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = [n for n in LEVELS if any(m.startswith(f"aggregate tok/s, {n} client") for m in rows)]
    values = {name: [statistics.median(next(v for m, v in rows.items() if m.startswith(f"aggregate tok/s, {n} client"))[name]) for n in levels]
              for name in ("llamabox", "llama-server")}
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.38
    for i, (name, heights) in enumerate(values.items()):
        ax.bar([x + (i - 0.5) * width for x in range(len(levels))], heights, width, label=name)
    ax.set_xticks(range(len(levels)), [str(n) for n in levels])
    ax.set_xlabel("concurrent streaming clients (= -np)")
    ax.set_ylabel("aggregate tokens/s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"\n![aggregate tokens per second](benchmarks/{path.name})")


if __name__ == "__main__":
    main()
