"""Where a bundle's start-up time and size go, side by side with native llama.cpp (issue 12, first step).

    python benchmarks/startup.py                  # SmolLM2, 5 interleaved runs, prints the table
    python benchmarks/startup.py --runs 9 --write # ... and writes its section of BENCHMARKS.md
    python benchmarks/startup.py --stub PATH      # measure another runtime stub (default: build.py's)

Measures, in one run on this machine, with the same model, context and threads on every side:
  1. repeated start to the first `/health` answering 200: the bundle, the same runtime run from the
     checkout (`python -m runtime -m MODEL`, no PyInstaller unpacking), and native llama-server;
     interleaved, median (min–max);
  2. a first start: a fresh copy of the bundle, a fresh $TMPDIR (where PyInstaller unpacks) and a fresh
     $LLAMABOX_CACHE (so the CPU-kernel self-test runs again); the page cache is not dropped;
  3. `BUNDLE -p Hi -n 8 --temp 0` wall time against native `llama-completion -cnv -st` (one chat turn,
     then exit) with the same flags, and the checkout;
  4. bundle size minus GGUF size, and the stub's size;
  5. where the bundle's start goes: `--version` (bootloader unpacking + Python start + the CLI's imports)
     against the checkout's `--version`; the runtime's phases from the checkout (imports, CPU-kernel
     choice, model load, server imports); `python -X importtime` top 10 (cumulative); and what the
     PyInstaller stub unpacks at every start, grouped, from its own table of contents.
Native programs are built (once, cached) by benchmarks/native.py; llama-completion is built here if missing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import defaultdict
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.native import llama_server  # noqa: E402
from benchmarks.run import build_bundle, free_port, summary  # noqa: E402
from bundler.default_model import default_model_path  # noqa: E402
from bundler.stubs import default_stub_path  # noqa: E402
from runtime.cpu_features import cpu_info  # noqa: E402

SECTION_START = "<!-- startup: benchmarks/startup.py --write rewrites this section -->"
SECTION_END = "<!-- /startup -->"
PYTHON = sys.executable


class Start:
    """One server start: the time from exec to the first /health 200, and when each stderr line came."""

    def __init__(self, command: list[str], port: int, env: dict[str, str] | None = None) -> None:
        self.lines: list[tuple[float, str]] = []
        started = time.monotonic()
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                        errors="replace", env=env, cwd=ROOT)
        reader = threading.Thread(target=self._read, args=(started,), daemon=True)
        reader.start()
        url = f"http://127.0.0.1:{port}/health"
        while True:
            if self.process.poll() is not None:
                reader.join(2)
                raise RuntimeError(f"{command[0]} exited with {self.process.returncode}: " + " | ".join(t for _, t in self.lines[-5:]))
            try:
                if httpx.get(url, timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.005)
        self.ready_after = time.monotonic() - started
        self.process.terminate()
        self.process.wait(timeout=30)
        reader.join(5)

    def _read(self, started: float) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append((time.monotonic() - started, line.rstrip()))

    def loaded(self) -> tuple[float, float] | None:
        """(seconds from exec to the runtime's "loaded ... in X s" line, X), for llamabox starts."""
        for at, line in self.lines:
            found = re.search(r"llamabox: loaded .* in ([0-9.]+) s", line)
            if found:
                return at, float(found.group(1))
        return None


def timed(command: list[str], env: dict[str, str] | None = None) -> float:
    started = time.monotonic()
    subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, check=True, env=env, cwd=ROOT)
    return time.monotonic() - started


def llama_completion() -> Path:
    """Native llama-completion next to native.py's llama-server, built here if missing (a minute or two, once)."""
    server = llama_server()
    binary = server.parent / "llama-completion"
    if not binary.exists():
        print("Building native llama-completion (once)...", file=sys.stderr)
        subprocess.run(["nice", "cmake", "--build", str(server.parent.parent), "--target", "llama-completion", "-j", str(os.cpu_count() or 2)],
                       check=True, stdout=subprocess.DEVNULL)
    return binary


# -- 5. what the stub unpacks -------------------------------------------------------------------

GROUPS = [
    ("NumPy + OpenBLAS + libgfortran", re.compile(r"^numpy")),
    ("libpython", re.compile(r"^libpython")),
    ("CPU variants (ggml-backends/)", re.compile(r"^ggml-backends/")),
    ("libcrypto + libssl", re.compile(r"^(libcrypto|libssl)")),
    ("PYZ (pure-Python archive)", re.compile(r"^PYZ")),
    ("llama.cpp (libllama, libggml)", re.compile(r"^llama_cpp/lib/")),
    ("Python extension modules (lib-dynload)", re.compile(r"^python3\.\d+/lib-dynload/")),
    ("templates + chat page", re.compile(r"(^|/)(templates|ui)/")),
    ("kernel self-test model", re.compile(r"^kernel-proof")),
    ("other shared libraries (libstdc++, libsqlite3, libreadline, libgomp, ...)", re.compile(r"^lib[^/]*\.so")),
]


def unpacked_groups(stub: Path) -> tuple[list[tuple[str, int, int, int, int, int]], int, int]:
    """[(group, files, compressed bytes, unpacked bytes, both again after `strip --strip-unneeded`)], total
    compressed, total unpacked: what the bootloader writes to its temporary directory at every start ('b'
    binaries, 'x' data files, 'z' the PYZ archive). The stripped sizes (zlib level 9, as PyInstaller
    compresses) say what carrying the libraries without their symbol tables would buy."""
    from PyInstaller.archive.readers import CArchiveReader

    reader = CArchiveReader(str(stub))
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0, 0])
    with tempfile.TemporaryDirectory(prefix="llamabox-strip-") as tmp:
        for name, (_offset, length, unpacked, _compressed, kind) in reader.toc.items():
            if kind not in "bxzZ":  # 'm'/'s'/'o' entries run from memory, never written out
                continue
            group = next((label for label, pattern in GROUPS if pattern.search(name)), "other")
            stripped_length, stripped_size = length, unpacked
            if kind == "b":
                copy = Path(tmp) / "lib"
                copy.write_bytes(reader.extract(name))
                if subprocess.run(["strip", "--strip-unneeded", str(copy)], capture_output=True).returncode == 0:
                    data = copy.read_bytes()
                    stripped_length, stripped_size = min(length, len(zlib.compress(data, 9))), len(data)
            for i, value in enumerate((1, length, unpacked, stripped_length, stripped_size)):
                groups[group][i] += value
    rows = sorted(((g, *v) for g, v in groups.items()), key=lambda r: -r[3])
    return rows, sum(r[2] for r in rows), sum(r[3] for r in rows)  # type: ignore[misc]


# -- 5. the runtime's phases, from the checkout ------------------------------------------------

PHASES_SCRIPT = r"""
import json, sys, time
from pathlib import Path
t = [time.monotonic()]
from runtime import openblas; openblas.keep_idle()
import runtime.cli
t.append(time.monotonic())
from runtime import hardware, model_source
from runtime.engine import Engine, EngineOptions
t.append(time.monotonic())
source = model_source.resolve(Path(sys.argv[1]), model_source.own_bundle())
hardware.choose_cpu_kernels(None, say=lambda line: None)
t.append(time.monotonic())
engine = Engine(source.location, EngineOptions(ctx_size=int(sys.argv[2]), threads=int(sys.argv[3])))
t.append(time.monotonic())
import uvicorn
from runtime.serve import serve
from runtime.server.app import create_app
t.append(time.monotonic())
names = ["CLI imports (click, runtime.cli)", "engine imports (llama_cpp, NumPy, ...)", "CPU-kernel choice",
         "model load (Engine)", "server imports (uvicorn, Starlette, app)"]
print(json.dumps({n: b - a for n, a, b in zip(names, t, t[1:])}))
"""


def checkout_phases(model: Path, ctx: int, threads: int, runs: int) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = defaultdict(list)
    for _ in range(runs):
        out = subprocess.run([PYTHON, "-c", PHASES_SCRIPT, str(model), str(ctx), str(threads)], capture_output=True, text=True, check=True, cwd=ROOT)
        for name, value in json.loads(out.stdout.strip().splitlines()[-1]).items():
            samples[name].append(value)
    return samples


def import_times(top: int = 10) -> tuple[list[tuple[str, float, float]], float]:
    """`python -X importtime` of everything the runtime imports to serve: [(module, cumulative s, self s)], total s."""
    code = "from runtime import openblas; openblas.keep_idle(); import runtime.cli, runtime.modes, runtime.serve, runtime.server.app"
    err = subprocess.run([PYTHON, "-X", "importtime", "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stderr
    rows = []
    for line in err.splitlines():
        found = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)", line)
        if found:
            rows.append((found.group(4), int(found.group(2)) / 1e6, int(found.group(1)) / 1e6, len(found.group(3))))
    total = sum(cum for _, cum, _, depth in rows if depth == 1)
    return [(name, cum, own) for name, cum, own, _ in sorted(rows, key=lambda r: -r[1])[:top]], total


# -- the measurement ---------------------------------------------------------------------------

def measure(args: argparse.Namespace) -> tuple[str, dict[str, object]]:
    model = (args.model or default_model_path()).resolve()
    stub = (args.stub or default_stub_path()).resolve()
    if not stub.exists():
        subprocess.run(["nice", PYTHON, str(ROOT / "build.py"), "--dist", str(stub.parent)], check=True)
    server_bin, completion_bin = llama_server(), llama_completion()
    threads, ctx, runs = str(args.threads), str(args.ctx), args.runs
    uptime_before = Path("/proc/loadavg").read_text().split()[:3]
    results: dict[str, object] = {}

    with tempfile.TemporaryDirectory(prefix="llamabox-startup-") as tmp:
        work = Path(tmp)
        print("Building the bundle...", file=sys.stderr)
        bundle = build_bundle(model, stub, work / "bench.run")
        common = ["-c", ctx, "--threads", threads]

        def bundle_server(port: int) -> list[str]:
            return [str(bundle), "--nobrowser", "--port", str(port), "-np", "1", *common]

        def checkout_server(port: int) -> list[str]:
            return [PYTHON, "-m", "runtime", "-m", str(model), "--nobrowser", "--port", str(port), "-np", "1", *common]

        def native_server(port: int) -> list[str]:
            return [str(server_bin), "-m", str(model), "--port", str(port), "-c", ctx, "--threads", threads, "-np", "1", "--no-webui"]

        # 2. First start: nothing of this bundle in $TMPDIR or in the llamabox cache (the kernel self-test runs).
        print("First start...", file=sys.stderr)
        fresh = work / "fresh"
        (fresh / "tmp").mkdir(parents=True)
        first_bundle = fresh / "first start.run"
        shutil.copyfile(bundle, first_bundle)
        first_bundle.chmod(0o755)
        env = {**os.environ, "TMPDIR": str(fresh / "tmp"), "LLAMABOX_CACHE": str(fresh / "cache")}
        port = free_port()
        first = Start([str(first_bundle), "--nobrowser", "--port", str(port), "-np", "1", *common], port, env)
        port = free_port()
        second = Start([str(first_bundle), "--nobrowser", "--port", str(port), "-np", "1", *common], port, env)
        results["first"] = (first.ready_after, second.ready_after, [line for _, line in first.lines if line.startswith("llamabox:")])

        # 1. Repeated start to /health, interleaved (order rotates every run).
        print("Repeated starts...", file=sys.stderr)
        servers = {"bundle": bundle_server, "checkout (python -m runtime)": checkout_server, "native llama-server": native_server}
        starts: dict[str, list[float]] = defaultdict(list)
        bundle_loaded: list[tuple[float, float]] = []
        bundle_health_after_loaded: list[float] = []
        names = list(servers)
        for run in range(runs):
            for name in names[run % 3:] + names[: run % 3]:
                port = free_port()
                start = Start(servers[name](port), port)
                starts[name].append(start.ready_after)
                if name == "bundle" and (loaded := start.loaded()):
                    bundle_loaded.append(loaded)
                    bundle_health_after_loaded.append(start.ready_after - loaded[0])
            print(f"  run {run + 1}/{runs}: " + ", ".join(f"{n} {v[-1]:.2f}" for n, v in starts.items()), file=sys.stderr)
        results["starts"] = starts

        # 3. One prompt, then exit.
        print("-p Hi -n 8 ...", file=sys.stderr)
        one_shot = {
            "bundle": [str(bundle), "-p", "Hi", "-n", "8", "--temp", "0", *common],
            "checkout (python -m runtime)": [PYTHON, "-m", "runtime", "-m", str(model), "-p", "Hi", "-n", "8", "--temp", "0", *common],
            "native llama-completion": [str(completion_bin), "-m", str(model), "-p", "Hi", "-n", "8", "--temp", "0", "-c", ctx,
                                        "-t", threads, "-cnv", "-st"],
        }
        prompts: dict[str, list[float]] = defaultdict(list)
        names = list(one_shot)
        for run in range(runs):
            for name in names[run % 3:] + names[: run % 3]:
                prompts[name].append(timed(one_shot[name]))
        results["prompt"] = prompts

        # 5. --version: the bootloader's unpacking + Python's start + the CLI's imports, against the checkout.
        print("--version ...", file=sys.stderr)
        versions: dict[str, list[float]] = defaultdict(list)
        for _run in range(runs):
            versions["bundle"].append(timed([str(bundle), "--version"]))
            versions["checkout (python -m runtime)"].append(timed([PYTHON, "-m", "runtime", "--version"]))
            versions["python -c pass (venv)"].append(timed([PYTHON, "-S", "-c", "pass"]))
        results["version"] = versions
        results["bundle_loaded"] = bundle_loaded
        results["bundle_health_after_loaded"] = bundle_health_after_loaded
        results["sizes"] = (bundle.stat().st_size, model.stat().st_size, stub.stat().st_size)

    print("Runtime phases and imports (checkout)...", file=sys.stderr)
    results["phases"] = checkout_phases(model, args.ctx, args.threads, runs)
    results["imports"] = import_times()
    results["unpacked"] = unpacked_groups(stub)
    uptime_after = Path("/proc/loadavg").read_text().split()[:3]
    cpu = cpu_info()
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{cpu.name}, {os.cpu_count()} logical CPUs",
        "load average (1, 5, 15 min)": f"{' '.join(uptime_before)} before, {' '.join(uptime_after)} after (a shared machine)",
        "model": f"{model.name} ({model.stat().st_size / 1e6:.1f} MB), `-c {ctx} --threads {threads} -np 1` everywhere",
        "stub": f"{stub.name} ({stub.stat().st_size / 1e6:.1f} MB, built {datetime.datetime.fromtimestamp(stub.stat().st_mtime, datetime.timezone.utc):%Y-%m-%d %H:%M} UTC)",
        "native": "llama-server and llama-completion from benchmarks/native.py (same vendored llama.cpp, our patches, GGML_NATIVE=ON)",
        "method": f"{runs} interleaved runs (order rotated), median (min–max); page cache warm except where said",
        "reproduce": f"`python benchmarks/startup.py --runs {runs}" + (" --stub STUB" if args.stub else "") + "`",
    }
    return report(results, meta), results


def ratio(a: list[float], b: list[float]) -> str:
    return f"{statistics.median(a) / statistics.median(b):.2f}×"


def report(r: dict, meta: dict[str, str]) -> str:  # type: ignore[type-arg]
    starts, prompts, versions = r["starts"], r["prompt"], r["version"]
    native_start = starts["native llama-server"]
    native_prompt = prompts["native llama-completion"]
    bundle_size, model_size, stub_size = r["sizes"]
    first, second, first_lines = r["first"]
    target_start = max(1.5 * statistics.median(native_start), statistics.median(native_start) + 0.2)
    lines = [f"- {k}: {v}" for k, v in meta.items()]
    lines += [
        "",
        "| issue 12 metric | bundle | checkout (no unpacking) | native | bundle / native | target |",
        "|---|---|---|---|---|---|",
        f"| repeated start to `/health` (s) | {summary(starts['bundle'])} | {summary(starts['checkout (python -m runtime)'])} | "
        f"{summary(native_start)} (llama-server) | {ratio(starts['bundle'], native_start)} | ≤ {target_start:.2f} s |",
        f"| first start: fresh copy, fresh `$TMPDIR` and `$LLAMABOX_CACHE` (s) | {first:.2f} (the next start: {second:.2f}) | | | | ≤ 2.5 s |",
        f"| `-p Hi -n 8 --temp 0` wall time (s) | {summary(prompts['bundle'])} | {summary(prompts['checkout (python -m runtime)'])} | "
        f"{summary(native_prompt)} (llama-completion -cnv -st) | {ratio(prompts['bundle'], native_prompt)} | "
        f"≤ {1.5 * statistics.median(native_prompt):.2f} s |",
        f"| bundle size minus GGUF size (MB) | {(bundle_size - model_size) / 1e6:.1f} | | | | ≤ 50 |",
        f"| runtime stub size (MB) | {stub_size / 1e6:.1f} | | | | ≤ 45 |",
        "",
        f"First start's own lines on stderr: {'; '.join(f'`{line}`' for line in first_lines) or '(none)'}",
        "",
        "| where the bundle's start goes | seconds |",
        "|---|---|",
        f"| `--version`: bundle (bootloader unpacks everything, Python starts, CLI imports) | {summary(versions['bundle'])} |",
        f"| `--version`: checkout (Python starts, CLI imports; no unpacking) | {summary(versions['checkout (python -m runtime)'])} |",
        f"| `python -S -c pass` (the venv's bare interpreter start) | {summary(versions['python -c pass (venv)'])} |",
        f"| ⇒ unpacking, the bootloader's own cost (bundle − checkout `--version`, medians) | "
        f"{statistics.median(versions['bundle']) - statistics.median(versions['checkout (python -m runtime)']):.2f} |",
    ]
    if r["bundle_loaded"]:
        at = [a for a, _ in r["bundle_loaded"]]
        inside = [x for _, x in r["bundle_loaded"]]
        lines += [
            f"| bundle serving: exec → Python's `main()` (bootloader + interpreter + first imports; = loaded line − its own figure) | "
            f"{summary([a - x for a, x in r['bundle_loaded']])} |",
            f"| bundle serving: `main()` → \"loaded in X s\" line (engine + server imports, kernel choice, fork, model load, bind) | {summary(inside)} |",
            f"| bundle serving: loaded line → first `/health` 200 (app, uvicorn start) | {summary(r['bundle_health_after_loaded'])} |",
            f"| bundle serving: exec → loaded line | {summary(at)} |",
        ]
    lines += ["", "| runtime phases, from the checkout (in-process, fresh interpreter each run) | seconds |", "|---|---|"]
    lines += [f"| {name} | {summary(values)} |" for name, values in r["phases"].items()]
    imports, total = r["imports"]
    lines += ["", f"| `python -X importtime`, top 10 cumulative (all runtime imports for serving: {total:.2f} s) | cumulative s | self s |", "|---|---|---|"]
    lines += [f"| `{name}` | {cum:.3f} | {own:.3f} |" for name, cum, own in imports]
    rows, compressed, unpacked = r["unpacked"]
    lines += ["", f"| what the stub unpacks at every start (PyInstaller TOC; {compressed / 1e6:.1f} MB compressed, {unpacked / 1e6:.1f} MB written) "
              "| files | compressed MB | unpacked MB | stripped: compressed MB | stripped: unpacked MB |", "|---|---|---|---|---|---|"]
    lines += [f"| {group} | {files} | {length / 1e6:.1f} | {size / 1e6:.1f} | {s_length / 1e6:.1f} | {s_size / 1e6:.1f} |"
              for group, files, length, size, s_length, s_size in rows]
    lines.append(f"| all | {sum(r[1] for r in rows)} | {compressed / 1e6:.1f} | {unpacked / 1e6:.1f} | {sum(r[4] for r in rows) / 1e6:.1f} | "
                 f"{sum(r[5] for r in rows) / 1e6:.1f} |")
    return "\n".join(lines)


def write_section(path: Path, table: str) -> None:
    """Replace this script's section of BENCHMARKS.md (or append it); the rest of the file is left alone.
    The findings below the table are hand-written and kept."""
    text = path.read_text()
    findings_marker = "<!-- startup findings -->"
    if SECTION_START in text:
        before, rest = text.split(SECTION_START, 1)
        old, after = rest.split(SECTION_END, 1)
        findings = old[old.index(findings_marker):] if findings_marker in old else findings_marker + "\n"
    else:
        before, after, findings = text.rstrip("\n") + "\n\n", "\n", findings_marker + "\n"
    section = f"{SECTION_START}\n## Start-up and size (issue 12): where they go\n\n{table}\n\n{findings.rstrip()}\n"
    path.write_text(f"{before}{section}{SECTION_END}{after}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="GGUF to measure (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--stub", type=Path, help="runtime stub to bundle (default: build.py's, built if missing)")
    parser.add_argument("--runs", type=int, default=5, help="interleaved runs of each timed command (default 5)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="--threads for every side (default: all CPUs)")
    parser.add_argument("--ctx", type=int, default=4096, help="context size for every side (default 4096)")
    parser.add_argument("--write", action="store_true", help="also write the table into BENCHMARKS.md's start-up section")
    parser.add_argument("--json", type=Path, help="also dump the raw samples to this file")
    args = parser.parse_args()
    table, results = measure(args)
    print(table)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    if args.write:
        write_section(ROOT / "BENCHMARKS.md", table)
        print(f"\nWrote the start-up section of {ROOT / 'BENCHMARKS.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
