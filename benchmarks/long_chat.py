"""A chat that outgrows its context: 20 turns through a 1,024-token context, llamabox against native llama-server in
one run, both with --context-shift.

    python benchmarks/long_chat.py [--turns 20] [--ctx 1024] [--threads 2]

Each turn sends the whole chat so far and asks for 160 tokens (greedy), as a chat client does. llamabox runs
with --context-shift --truncate-prompt (a chat too long for the context loses its oldest turns, never its system
message, and the answer says how many); native llama-server with --context-shift (it shifts a reply that fills the
context, and refuses a prompt longer than the context). Prints, per server: turns answered, turns refused, the
median time per answered turn, and what llamabox reports it dropped.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.native import llama_server  # noqa: E402
from benchmarks.run import Running, build_bundle, free_port  # noqa: E402
from bundler.default_model import default_model_path  # noqa: E402
from bundler.stubs import default_stub_path  # noqa: E402
from runtime.devices.cpu_features import cpu_info  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SYSTEM = "You are a helpful assistant who answers in full paragraphs."


def chat(url: str, turns: int) -> dict[str, object]:
    messages = [{"role": "system", "content": SYSTEM}]
    answered, refused, seconds, dropped_messages, dropped_tokens, shifted = 0, [], {}, 0, 0, 0
    for turn in range(turns):
        messages.append({"role": "user", "content": f"Turn {turn + 1}: tell me about the history of the number {turn * 13 + 7}, at length."})
        started = time.monotonic()
        reply = httpx.post(url + "/v1/chat/completions", json={"messages": messages, "max_tokens": 160, "temperature": 0}, timeout=600)
        if reply.status_code != 200:
            refused.append(turn + 1)
            messages.pop()
            continue
        seconds[turn + 1] = time.monotonic() - started
        body = reply.json()
        answered += 1
        usage = body.get("usage", {})
        dropped_messages = max(dropped_messages, usage.get("prompt_messages_dropped", 0))
        dropped_tokens += usage.get("context_dropped_tokens", 0)
        shifted += bool(usage.get("context_dropped_tokens"))
        messages.append({"role": "assistant", "content": body["choices"][0]["message"]["content"]})
    return {"answered": answered, "refused": refused, "seconds": seconds,
            "dropped_messages": dropped_messages, "dropped_tokens": dropped_tokens, "shifted": shifted}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, default=20)
    parser.add_argument("--ctx", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    model = default_model_path().resolve()
    stub = default_stub_path()
    if not stub.exists():
        subprocess.run([sys.executable, str(ROOT / "build.py")], check=True)
    common = ["-c", str(args.ctx), "-np", "1", "--threads", str(args.threads), "-fa", "off", "--context-shift"]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        bundle = build_bundle(model, stub, Path(tmp) / "model.run")
        commands = {
            "llamabox (--context-shift --truncate-prompt)": [str(bundle), "--nobrowser", *common, "--truncate-prompt"],
            "llama-server (--context-shift)": [str(llama_server()), "-m", str(model), *common],
        }
        for name, command in commands.items():
            server = Running([*command, "--port", str(free_port())])
            try:
                results[name] = chat(server.url, args.turns)
            finally:
                server.stop()
    print(f"CPU: {cpu_info().name}; {args.threads} threads; {model.name}; {args.turns} turns, 160 tokens each, "
          f"a context of {args.ctx} tokens\n")
    both = set.intersection(*(set(r["seconds"]) for r in results.values()))  # type: ignore[arg-type]
    print(f"| server | turns answered | turns refused | median s per turn, turns both answered ({len(both)}) | median s per answered turn "
          "| messages left out (last turn) | replies shifted |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        refused = ", ".join(str(t) for t in r["refused"]) or "none"  # type: ignore[union-attr]
        seconds: dict[int, float] = r["seconds"]  # type: ignore[assignment]
        shared = statistics.median(seconds[t] for t in both) if both else 0.0
        print(f"| {name} | {r['answered']} | {refused} | {shared:.2f} | {statistics.median(seconds.values()):.2f} | "
              f"{r['dropped_messages'] or '-'} | {r['shifted'] or '-'} |")


if __name__ == "__main__":
    main()
