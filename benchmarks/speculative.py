"""Speculative decoding: decode speed with and without a draft model, llamabox against native llama-server on the
same target/draft pair in one run, with acceptance rates.

    python benchmarks/speculative.py [--target-type F16|Q8_0] [--runs 3] [--threads 2] [--draft-max 3 8] [--tokens 128]

The pair shares SmolLM2-135M-Instruct's vocabulary: the target is its F16 (or Q8_0) GGUF, made once with native
llama-quantize from the Q4_1 the default-model package ships (so the two hold the same weights at two precisions:
the draft guesses right more often than a smaller model of the family would); the draft is that Q4_1. Both servers
get one slot of 1,024 tokens, flash attention off, the same threads and draft settings (ours: -md, --draft-max;
native: -md, --spec-type draft-simple, --spec-draft-n-max), and answer the same greedy chat requests; the runs
alternate. tokens/s is the `timings.predicted_per_second` each server reports, a median over prompts and runs.
Also says, for each server, whether the text with a draft was the text without one.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.native import llama_server, native_tool  # noqa: E402
from benchmarks.run import Running, build_bundle, free_port  # noqa: E402
from bundler.default_model import default_model_path  # noqa: E402
from bundler.stubs import default_stub_path  # noqa: E402
from runtime import packaged  # noqa: E402
from runtime.devices.cpu_features import cpu_info  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [
    "Write a short story about a cat who learns to read.",
    "Explain how a bicycle works, step by step.",
    "List ten countries in Europe and one fact about each.",
]


def target_model(draft: Path, kind: str) -> Path:
    """SmolLM2 at F16 or Q8_0, made once from the Q4_1 with native llama-quantize."""
    target = packaged.cache_dir() / "bench" / f"SmolLM2-135M-Instruct.{kind}-from-Q4_1.gguf"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        subprocess.run([str(native_tool("llama-quantize")), "--allow-requantize", str(draft), str(partial), kind],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        partial.rename(target)
    return target


def answers(url: str, tokens: int) -> list[tuple[str, float, int, int]]:
    """(text, tokens/s, drafted, accepted) for each prompt, greedy, EOS ignored so that every answer is as long."""
    out = []
    for prompt in PROMPTS:
        body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": tokens, "temperature": 0}
        reply = httpx.post(url + "/v1/chat/completions", json=body, timeout=600).json()
        timings = reply["timings"]
        out.append((reply["choices"][0]["message"]["content"], timings["predicted_per_second"], timings.get("draft_n", 0),
                    timings.get("draft_n_accepted", 0)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target-type", choices=["F16", "Q8_0"], default="F16")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--draft-max", type=int, nargs="+", default=[3, 8])
    args = parser.parse_args()
    draft = default_model_path().resolve()
    target = target_model(draft, args.target_type)
    stub = default_stub_path()
    if not stub.exists():
        subprocess.run([sys.executable, str(ROOT / "build.py")], check=True)
    native = llama_server()
    common = ["-c", "1024", "-np", "1", "--threads", str(args.threads), "-fa", "off"]
    results: dict[tuple[str, int], list[tuple[str, float, int, int]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        bundle = build_bundle(target, stub, Path(tmp) / "target.run")
        commands = {}
        for n in [0, *args.draft_max]:
            ours = [str(bundle), "--nobrowser", *common]
            theirs = [str(native), "-m", str(target), *common]
            if n:
                ours += ["-md", str(draft), "--draft-max", str(n)]
                theirs += ["-md", str(draft), "--spec-type", "draft-simple", "--spec-draft-n-max", str(n)]
            commands["llamabox", n], commands["llama-server", n] = ours, theirs
        for run in range(args.runs):
            for key, command in list(commands.items())[:: 1 if run % 2 == 0 else -1]:
                server = Running([*command, "--port", str(free_port())])
                try:
                    results.setdefault(key, []).extend(answers(server.url, args.tokens))
                finally:
                    server.stop()
    print(f"CPU: {cpu_info().name}; {args.threads} threads; target {target.name}, draft {draft.name}; "
          f"{args.tokens} tokens x {len(PROMPTS)} prompts x {args.runs} runs\n")
    print("| server | draft-max | decode tok/s (median) | speed-up | drafted | accepted | same text as without a draft |")
    print("|---|---|---|---|---|---|---|")
    for name in ("llamabox", "llama-server"):
        base = statistics.median(r[1] for r in results[name, 0])
        plain_texts = [r[0] for r in results[name, 0]]
        for n in [0, *args.draft_max]:
            rows = results[name, n]
            rate = statistics.median(r[1] for r in rows)
            drafted, accepted = sum(r[2] for r in rows), sum(r[3] for r in rows)
            same = sum(a[0] == b for a, b in zip(rows, plain_texts * args.runs))
            acceptance = f"{accepted} ({accepted / drafted:.0%})" if drafted else "-"
            print(f"| {name} | {n or 'no draft'} | {rate:.1f} | {rate / base:.2f}x | {drafted or '-'} | {acceptance} | "
                  f"{same}/{len(rows)} |")


if __name__ == "__main__":
    main()
