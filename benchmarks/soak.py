"""Soak: many clients for a long time, some dropping mid-stream; nothing may fail, leak or stay busy.

    python benchmarks/soak.py [--minutes 10] [--clients 8] [--drop 0.2] [--parallel 4]

Starts a bundle of the default model (or --model) with -np PARALLEL and runs CLIENTS threads that
stream chat completions back to back; a DROP share of them close the connection after a few
pieces. Counts failed requests (an error status, a broken stream, a finished answer without
[DONE]), checks at the end that every slot is free and nothing waits, and compares the process
tree's resident memory after the first minute with the end. Prints a Markdown summary.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.run import Running, build_bundle, free_port  # noqa: E402
from bundler.default_model import default_model_path  # noqa: E402
from bundler.stubs import default_stub_path  # noqa: E402
from runtime.devices.cpu_features import cpu_info  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TOPICS = ["cats", "the sea", "a lighthouse", "bread", "winter", "a robot", "music", "mountains", "tea", "trains"]


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.finished = self.dropped = self.failed = 0
        self.failures: list[str] = []

    def add(self, outcome: str, detail: str = "") -> None:
        with self.lock:
            setattr(self, outcome, getattr(self, outcome) + 1)
            if outcome == "failed" and len(self.failures) < 5:
                self.failures.append(detail)


def client(url: str, deadline: float, drop: float, tally: Tally, seed: int) -> None:
    rng = random.Random(seed)
    while time.monotonic() < deadline:
        dropping = rng.random() < drop
        body = {
            "messages": [{"role": "user", "content": f"Write about {rng.choice(TOPICS)}."}],
            "max_tokens": rng.randint(16, 96), "temperature": rng.choice([0, 0.7]), "stream": True,
        }
        try:
            with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as response:
                if response.status_code != 200:
                    tally.add("failed", f"status {response.status_code}")
                    continue
                pieces, finish, done = 0, None, False
                for line in response.iter_lines():
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: "):
                        choices = json.loads(line[6:])["choices"]
                        finish = choices[0]["finish_reason"] if choices else finish
                        pieces += 1
                    if dropping and pieces >= 3:
                        break
                if dropping and pieces >= 3:
                    tally.add("dropped")
                elif done and finish in ("stop", "length"):
                    tally.add("finished")
                else:
                    tally.add("failed", f"stream ended without an answer (finish {finish}, [DONE] {done})")
        except httpx.HTTPError as exc:
            tally.add("failed", repr(exc))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--drop", type=float, default=0.2)
    parser.add_argument("--parallel", type=int, default=4)
    args = parser.parse_args()
    model = (args.model or default_model_path()).resolve()
    stub = default_stub_path()
    if not stub.exists():
        subprocess.run([sys.executable, str(ROOT / "build.py")], check=True)
    with tempfile.TemporaryDirectory() as tmp:
        bundle = build_bundle(model, stub, Path(tmp) / "model.run")
        server = Running([str(bundle), "--nobrowser", "--port", str(free_port()), "-np", str(args.parallel), "-c", str(1024 * args.parallel)])  # 1,024 tokens a slot, shared
        try:
            tally = Tally()
            deadline = time.monotonic() + args.minutes * 60
            threads = [threading.Thread(target=client, args=(server.url, deadline, args.drop, tally, i)) for i in range(args.clients)]
            for t in threads:
                t.start()
            time.sleep(min(60, args.minutes * 30))
            rss_early = server.memory_mb("VmRSS")
            for t in threads:
                t.join()
            time.sleep(1)
            health = httpx.get(server.url + "/health").json()
            rss_end = server.memory_mb("VmRSS")
        finally:
            server.stop()
    drift = (rss_end - rss_early) / rss_early
    print(f"Soak on {cpu_info().name}: {args.clients} clients for {args.minutes:g} min against -np {args.parallel}, "
          f"{args.drop:.0%} dropping mid-stream.\n")
    print("| finished whole | dropped on purpose | failed | slots busy at the end | waiting at the end | RSS after 1 min → end |")
    print("|---:|---:|---:|---:|---:|---|")
    print(f"| {tally.finished} | {tally.dropped} | {tally.failed} | {health['slots_processing']} | {health['requests_waiting']} | "
          f"{rss_early:.0f} → {rss_end:.0f} MB ({drift:+.1%}) |")
    for failure in tally.failures:
        print(f"- failure: {failure}")
    sys.exit(0 if tally.failed == 0 and health["slots_processing"] == 0 and abs(drift) < 0.05 else 1)


if __name__ == "__main__":
    main()
