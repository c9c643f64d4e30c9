"""Where a bundle's start-up time and size go, side by side with native llama.cpp (issue 12).

    python benchmarks/startup.py                  # SmolLM2, 5 interleaved runs, prints the table
    python benchmarks/startup.py --runs 9 --write # ... and writes its section of BENCHMARKS.md
    python benchmarks/startup.py --stub PATH      # measure another runtime stub (default: build.py's)
    python benchmarks/startup.py --before OLD     # ... and an older stub beside it: issue 12's "before" column

Two kinds of stub (runtime/bundle_format.py): the launcher layout (Linux, macOS: a sh launcher and a .tar.gz
of the one-folder runtime, unpacked once per runtime build into $LLAMABOX_CACHE/runtime/<id>), and the
PyInstaller onefile layout (Windows, and Linux before issue 12: everything unpacked into $TMPDIR at every
start). Either may be given to --stub or --before; `--before` is meant for a onefile stub built from an older
commit (`git worktree add /tmp/old COMMIT && cd /tmp/old && python build.py --dist /tmp/before-stub`).

Measures, in one run on this machine, with the same model, context and threads on every side:
  1. repeated start to the first `/health` answering 200: the bundle (and the --before bundle), the same
     runtime run from the checkout (`python -m runtime -m MODEL`, nothing unpacked), and native
     llama-server; interleaved, median (min–max). Every llamabox side gets one private $LLAMABOX_CACHE for
     the whole run (the user's cache is left alone) and one untimed warm-up start first, so a launcher
     bundle's runtime is already unpacked and the CPU-kernel verdicts are cached, as for a user's second
     start;
  2. a first start of each bundle: a fresh copy, a fresh $TMPDIR (where a onefile stub unpacks) and an
     empty $LLAMABOX_CACHE (where a launcher unpacks the runtime, and where the CPU-kernel self-test's
     verdict is kept, so the self-test runs again); the page cache is not dropped. Its `llamabox:` lines
     on stderr are kept, and what the launcher left in the cache is measured;
  3. `BUNDLE -p Hi -n 8 --temp 0` wall time against native `llama-completion -cnv -st --jinja` (one chat turn with the GGUF's own template,
     then exit) with the same flags, and the checkout;
  4. bundle size minus GGUF size, and the stub's size;
  5. where the bundle's start goes: `--version` of each bundle against the checkout's `--version` (and, for
     a launcher bundle, its cached runtime run directly, without the launcher); the runtime's phases from
     the checkout (imports, CPU-kernel choice, model load, server imports); `python -X importtime` top 10
     (cumulative); and what each stub unpacks, grouped: a launcher stub's payload (once per runtime build)
     from its tar listing, a onefile stub's archive (at every start) from PyInstaller's table of contents.
Native programs are built (once, cached) by benchmarks/native.py; llama-completion is built here if missing.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
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
from benchmarks.provenance import stamp  # noqa: E402
from benchmarks.run import build_bundle, free_port, summary  # noqa: E402
from bundler.default_model import default_model_path  # noqa: E402
from bundler.stubs import default_stub_path  # noqa: E402
from runtime.bundle_format import read_stub_header  # noqa: E402
from runtime.devices.cpu_features import cpu_info  # noqa: E402

SECTION_START = "<!-- startup: benchmarks/startup.py --write rewrites this section -->"
SECTION_END = "<!-- /startup -->"
DIRECT = "bundle's cached runtime, no launcher"
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


# The bundler refuses a stub whose runtime reads another bundle format than it writes (bundler.targets.check_stub):
# an older onefile stub says format 2 or 3. For it, the bundler writes the onefile layout (format 2, with the
# archive copy at the end), which such a runtime reads, so the --before bundle is built with that check left out.
BUILD_WITHOUT_FORMAT_CHECK = """
import bundler.assemble
from bundler import stubs
bundler.assemble.check_stub = lambda path, platform: stubs.read_stub(path)
from bundler.cli import main
main()
"""


def build_before_bundle(model: Path, stub: Path, out: Path) -> Path:
    """`llamabox build MODEL -o OUT --stub STUB` for an older stub (see BUILD_WITHOUT_FORMAT_CHECK)."""
    subprocess.run([PYTHON, "-c", BUILD_WITHOUT_FORMAT_CHECK, "build", str(model), "-o", str(out), "--stub", str(stub)],
                   check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return out


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

# Paths as a onefile stub's table of contents names them (`numpy/...`, `libpython3.11.so.1.0`) or as a launcher
# stub's payload does (the same under `_internal/`, the executable at the top).
GROUPS = [
    ("NumPy + OpenBLAS + libgfortran", re.compile(r"^(_internal/)?(numpy|libgfortran|libquadmath|libscipy_openblas)")),
    ("libpython", re.compile(r"^(_internal/)?libpython")),
    ("CPU variants (ggml-backends/)", re.compile(r"^(_internal/)?ggml-backends/")),
    ("libcrypto + libssl", re.compile(r"^(_internal/)?(libcrypto|libssl)")),
    ("PYZ (pure-Python archive)", re.compile(r"^PYZ")),
    ("llama.cpp (libllama, libggml)", re.compile(r"^(_internal/)?llama_cpp/lib/")),
    ("Python extension modules (lib-dynload)", re.compile(r"^(_internal/)?python3\.\d+/lib-dynload/")),
    ("templates + chat page", re.compile(r"(^|/)(templates|ui)/")),
    ("kernel self-test model", re.compile(r"^(_internal/)?kernel-proof")),
    ("other shared libraries (libstdc++, libsqlite3, libreadline, libgomp, ...)", re.compile(r"^(_internal/)?lib[^/]*\.so")),
]
EXECUTABLE_GROUP = "the executable (one-folder bootloader + PYZ, the pure-Python archive)"


def group_of(name: str) -> str:
    return next((label for label, pattern in GROUPS if pattern.search(name)), "other")


def unpacked_groups(stub: Path) -> dict[str, object]:
    """What `stub` unpacks, grouped: {"kind": "launcher" or "onefile", "rows": [(group, files, compressed bytes,
    unpacked bytes)] (largest first), "compressed", "unpacked", "files": totals, "links": symbolic links,
    "archive": the bytes the stub carries for it}.

    A launcher stub (runtime/bundle_format.py's read_stub_header): its payload, one .tar.gz unpacked once per
    runtime build into the cache; gzip compresses the tar as one stream, so a group's "compressed" is an
    estimate, each file compressed alone with zlib at level 9 (the payload's own size is "archive"). A onefile
    stub: PyInstaller's table of contents, what the bootloader writes to its temporary directory at every
    start ('b' binaries, 'x' data files, 'z' the PYZ archive), each entry compressed on its own (zlib 9).
    No columns for stripping any more: build.py strips libpython and lib-dynload of their debug information,
    `strip --strip-unneeded` takes 4.5 MB more off the 94 MB of the payload (half of it from NumPy's
    auditwheel-patched libraries, which break when stripped)."""
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    links = 0
    with open(stub, "rb") as f:
        header = read_stub_header(f)
        if header is not None:
            kind = "launcher"
            f.seek(header.payload_offset)
            payload = f.read(header.payload_size)
            archive = len(payload)
            with tarfile.open(fileobj=io.BytesIO(payload), mode="r:gz") as tar:
                for member in tar:
                    if member.issym() or member.islnk():
                        links += 1
                    if not member.isfile():
                        continue
                    extracted = tar.extractfile(member)
                    assert extracted is not None
                    data = extracted.read()
                    top_level_program = "/" not in member.name and not member.name.startswith(".") and member.mode & 0o111
                    group = EXECUTABLE_GROUP if top_level_program else group_of(member.name)
                    for i, value in enumerate((1, len(zlib.compress(data, 9)), len(data))):
                        groups[group][i] += value
    if header is None:
        from PyInstaller.archive.readers import CArchiveReader

        kind = "onefile"
        reader = CArchiveReader(str(stub))
        archive = 0
        for name, (_offset, length, unpacked, _compressed, entry_kind) in reader.toc.items():
            archive += length
            if entry_kind == "n":
                links += 1
            if entry_kind not in "bxzZ":  # 'm'/'s'/'o' entries run from memory, never written out
                continue
            for i, value in enumerate((1, length, unpacked)):
                groups[group_of(name)][i] += value
    rows = sorted(((g, *v) for g, v in groups.items()), key=lambda r: -r[3])
    return {"kind": kind, "rows": rows, "files": sum(r[1] for r in rows), "compressed": sum(r[2] for r in rows),
            "unpacked": sum(r[3] for r in rows), "links": links, "archive": archive}


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

def rotated(names: list[str], run: int) -> list[str]:
    """`names` in the order of interleaved run `run`: each side goes first in turn."""
    return names[run % len(names):] + names[: run % len(names)]


def folder_size(folder: Path) -> tuple[int, int]:
    """(bytes, files) of the regular files under `folder`, following no links."""
    files = [p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()]
    return sum(p.stat().st_size for p in files), len(files)


def cached_runtime(stub: Path, cache: Path) -> list[str] | None:
    """How the launcher of a launcher-layout `stub` runs its runtime from `cache` (for `--version` without the
    launcher): [program]; None for a onefile stub."""
    with open(stub, "rb") as f:
        header = read_stub_header(f)
        if header is None:
            return None
        f.seek(0)
        launcher = f.read(header.payload_offset).decode("utf-8", "replace")
    executable = re.search(r"^exe=(\S+)$", launcher, re.MULTILINE)
    assert executable is not None, "the launcher names no executable (exe=...)"
    return [str(cache / "runtime" / header.runtime_id / executable.group(1))]


def measure(args: argparse.Namespace) -> tuple[str, dict[str, object]]:
    model = (args.model or default_model_path()).resolve()
    stub = (args.stub or default_stub_path()).resolve()
    if not stub.exists():
        subprocess.run(["nice", PYTHON, str(ROOT / "build.py"), "--dist", str(stub.parent)], check=True)
    stubs = {"bundle": stub}
    if args.before:
        stubs["before"] = args.before.resolve()
        if not stubs["before"].is_file():
            raise SystemExit(f"--before {stubs['before']}: no such stub")
    server_bin, completion_bin = llama_server(), llama_completion()
    threads, ctx, runs = str(args.threads), str(args.ctx), args.runs
    uptime_before = Path("/proc/loadavg").read_text().split()[:3]
    results: dict[str, object] = {}

    with tempfile.TemporaryDirectory(prefix="llamabox-startup-") as tmp:
        work = Path(tmp)
        print("Building the bundle...", file=sys.stderr)
        # Copies of the stubs, so that a stub rebuilt while this runs cannot mix two builds into one table.
        for name, path in list(stubs.items()):
            (work / "stubs" / name).mkdir(parents=True)
            stubs[name] = Path(shutil.copy2(path, work / "stubs" / name / path.name))
        bundles = {"bundle": build_bundle(model, stubs["bundle"], work / "bundle.run")}
        if "before" in stubs:
            bundles["before"] = build_before_bundle(model, stubs["before"], work / "before.run")
        common = ["-c", ctx, "--threads", threads]
        # One cache for every timed llamabox start (never the user's): where a launcher bundle's runtime is
        # unpacked by the warm-up start below, and where the CPU-kernel verdicts are kept.
        warm_cache = work / "cache"
        warm = {**os.environ, "LLAMABOX_CACHE": str(warm_cache)}

        def serve_args(port: int) -> list[str]:
            return ["--nobrowser", "--port", str(port), "-np", "1", *common]

        servers = {name: (lambda port, b=b: [str(b), *serve_args(port)]) for name, b in bundles.items()}
        servers["checkout (python -m runtime)"] = lambda port: [PYTHON, "-m", "runtime", "-m", str(model), *serve_args(port)]
        servers["native llama-server"] = lambda port: [str(server_bin), "-m", str(model), "--port", str(port), "-c", ctx,
                                                       "--threads", threads, "-np", "1", "--no-webui"]
        # Each program as a receiver starts it, with no flags: both make one cache of the model's own context
        # (memory allowing) shared by 4 slots.
        servers["bundle, its defaults"] = lambda port: [str(bundles["bundle"]), "--nobrowser", "--port", str(port)]
        servers["native llama-server, its defaults"] = lambda port: [str(server_bin), "-m", str(model), "--port", str(port), "--no-webui"]

        # 2. First start: nothing of this bundle in $TMPDIR or in the llamabox cache (the launcher unpacks the
        # runtime, the kernel self-test runs); then the next start, which finds both.
        firsts: dict[str, dict[str, object]] = {}
        for name, bundle in bundles.items():
            print(f"First start ({name})...", file=sys.stderr)
            fresh = work / f"fresh-{name}"
            (fresh / "tmp").mkdir(parents=True)
            first_bundle = fresh / "first start.run"
            shutil.copyfile(bundle, first_bundle)
            first_bundle.chmod(0o755)
            env = {**os.environ, "TMPDIR": str(fresh / "tmp"), "LLAMABOX_CACHE": str(fresh / "cache")}
            port = free_port()
            first = Start([str(first_bundle), *serve_args(port)], port, env)
            cached = folder_size(fresh / "cache" / "runtime") if (fresh / "cache" / "runtime").is_dir() else (0, 0)
            port = free_port()
            second = Start([str(first_bundle), *serve_args(port)], port, env)
            ours = [(at, line.replace(str(fresh / "cache"), "$LLAMABOX_CACHE")) for at, line in first.lines if line.startswith("llamabox:")]
            # The launcher says so before it unpacks; the runtime's next line comes once it has started.
            preparing = next((i for i, (_, line) in enumerate(ours) if "preparing the runtime" in line), None)
            unpacking = ours[preparing + 1][0] - ours[preparing][0] if preparing is not None and preparing + 1 < len(ours) else None
            firsts[name] = {"first": first.ready_after, "next": second.ready_after, "cache_runtime": cached,
                            "lines": [line for _, line in ours], "preparing_to_next_line": unpacking}
        results["first"] = firsts

        # 1. Repeated start to /health, interleaved (order rotates every run), after one untimed start of each.
        print("Warm-up starts...", file=sys.stderr)
        names = list(servers)
        for name in names:
            port = free_port()
            Start(servers[name](port), port, warm)
        print("Repeated starts...", file=sys.stderr)
        starts: dict[str, list[float]] = defaultdict(list)
        loaded: dict[str, list[tuple[float, float]]] = defaultdict(list)
        health_after_loaded: dict[str, list[float]] = defaultdict(list)
        for run in range(runs):
            for name in rotated(names, run):
                port = free_port()
                start = Start(servers[name](port), port, warm)
                starts[name].append(start.ready_after)
                if name in bundles and (at := start.loaded()):
                    loaded[name].append(at)
                    health_after_loaded[name].append(start.ready_after - at[0])
            print(f"  run {run + 1}/{runs}: " + ", ".join(f"{n} {v[-1]:.2f}" for n, v in starts.items()), file=sys.stderr)
        results["starts"] = starts
        results["loaded"] = loaded
        results["health_after_loaded"] = health_after_loaded

        # 3. One prompt, then exit.
        print("-p Hi -n 8 ...", file=sys.stderr)
        prompt = ["-p", "Hi", "-n", "8", "--temp", "0"]
        one_shot = {name: [str(b), *prompt, *common] for name, b in bundles.items()}
        one_shot["checkout (python -m runtime)"] = [PYTHON, "-m", "runtime", "-m", str(model), *prompt, *common]
        # --jinja: the GGUF's own chat template, as llamabox applies it (like llama-server --jinja). Without it
        # llama-completion uses its built-in ChatML, which leaves out SmolLM2's default system message: 10 prompt
        # tokens instead of the template's 31, a different and smaller job.
        one_shot["native llama-completion"] = [str(completion_bin), "-m", str(model), *prompt, "-c", ctx, "-t", threads,
                                               "-cnv", "-st", "--jinja"]
        prompts: dict[str, list[float]] = defaultdict(list)
        for run in range(runs):
            for name in rotated(list(one_shot), run):
                prompts[name].append(timed(one_shot[name], warm))
        results["prompt"] = prompts

        # 5. --version: each stub's own cost (launcher + one-folder bootloader, or onefile unpacking) + Python's
        # start + the CLI's imports, against the checkout; a launcher bundle's runtime also run straight from the
        # cache with the environment the launcher gives it, which leaves the launcher's own cost.
        print("--version ...", file=sys.stderr)
        version = {name: ([str(b), "--version"], warm) for name, b in bundles.items()}
        direct = cached_runtime(stubs["bundle"], warm_cache)
        if direct is not None:
            launched = {"LLAMABOX_BUNDLE": str(bundles["bundle"]), "LLAMABOX_RUNTIME_DIR": str(Path(direct[0]).parent),
                        "LLAMABOX_RUNTIME_TEMPORARY": "0"}
            version[DIRECT] = ([*direct, "--version"], {**warm, **launched})
        version["checkout (python -m runtime)"] = ([PYTHON, "-m", "runtime", "--version"], warm)
        version["python -S -c pass (venv)"] = ([PYTHON, "-S", "-c", "pass"], warm)
        versions: dict[str, list[float]] = defaultdict(list)
        for run in range(runs):
            for name in rotated(list(version), run):
                versions[name].append(timed(*version[name]))
        results["version"] = versions
        results["sizes"] = {name: {"bundle": b.stat().st_size, "stub": stubs[name].stat().st_size} for name, b in bundles.items()}
        results["model_size"] = model.stat().st_size
        print("What the stubs unpack...", file=sys.stderr)
        unpacked = {name: unpacked_groups(path) for name, path in stubs.items()}
        results["unpacked"] = unpacked
        built = {name: datetime.datetime.fromtimestamp(path.stat().st_mtime, datetime.timezone.utc) for name, path in stubs.items()}

    print("Runtime phases and imports (checkout)...", file=sys.stderr)
    results["phases"] = checkout_phases(model, args.ctx, args.threads, runs)
    results["imports"] = import_times()
    uptime_after = Path("/proc/loadavg").read_text().split()[:3]
    cpu = cpu_info()

    def described(name: str) -> str:
        size = results["sizes"][name]["stub"] / 1e6  # type: ignore[index]
        return f"{stubs[name].name} ({size:.1f} MB, {unpacked[name]['kind']} layout, built {built[name]:%Y-%m-%d %H:%M} UTC)"

    meta = {
        **stamp(),
        "machine": f"{cpu.name}, {os.cpu_count()} logical CPUs",
        "load average (1, 5, 15 min)": f"{' '.join(uptime_before)} before, {' '.join(uptime_after)} after (a shared machine)",
        "model": f"{model.name} ({model.stat().st_size / 1e6:.1f} MB), `-c {ctx} --threads {threads} -np 1` everywhere but the row of each program's defaults",
        "stub": described("bundle") + ": the \"bundle\" column",
    }
    if "before" in stubs:
        meta["before"] = described("before") + ": the \"before\" column"
    meta |= {
        "native": "llama-server and llama-completion from benchmarks/native.py (same vendored llama.cpp, our patches, GGML_NATIVE=ON)",
        "method": f"{runs} interleaved runs (order rotated), median (min–max), after one untimed warm-up start of each side; "
                  "page cache warm and the runtime already unpacked except where said",
        "reproduce": f"`python benchmarks/startup.py --runs {runs}" + (" --stub STUB" if args.stub else "")
                     + (" --before OLD_STUB" if args.before else "") + "`"
                     + (" (OLD_STUB: `python build.py` in a worktree of the older commit, see the script's docstring)" if args.before else ""),
    }
    return report(results, meta), results


def ratio(a: list[float], b: list[float]) -> str:
    return f"{statistics.median(a) / statistics.median(b):.2f}×"


def table(header: list[str], rows: list[list[str]], keep: list[bool] | None = None) -> list[str]:
    """A Markdown table; `keep` drops columns (such as "before" when there is no --before)."""
    keep = keep or [True] * len(header)
    pick = [i for i, k in enumerate(keep) if k]
    return ["| " + " | ".join(header[i] for i in pick) + " |", "|" + "---|" * len(pick)] + [
        "| " + " | ".join(row[i] for i in pick) + " |" for row in rows
    ]


def unpacked_table(name: str, u: dict) -> list[str]:  # type: ignore[type-arg]
    mb = 1e6
    if u["kind"] == "launcher":
        title = (f"what the {name}'s runtime unpacks once (launcher payload: {u['archive'] / mb:.1f} MB .tar.gz; {u['unpacked'] / mb:.1f} MB "
                 f"in {u['files']} files and {u['links']} links, into `$LLAMABOX_CACHE/runtime/<id>` at its first start)")
        compressed = "compressed MB (zlib 9, each file alone: an estimate)"
    else:
        title = (f"what the {name} stub unpacks at every start (onefile, PyInstaller's table of contents; {u['compressed'] / mb:.1f} MB "
                 f"compressed, {u['unpacked'] / mb:.1f} MB written to `$TMPDIR`)")
        compressed = "compressed MB"
    rows = [[group, str(files), f"{length / mb:.1f}", f"{size / mb:.1f}"] for group, files, length, size in u["rows"]]
    rows.append(["all", str(u["files"]), f"{u['compressed'] / mb:.1f}", f"{u['unpacked'] / mb:.1f}"])
    return table([title, "files", compressed, "unpacked MB"], rows)


def report(r: dict, meta: dict[str, str]) -> str:  # type: ignore[type-arg]
    starts, prompts, versions, sizes, firsts = r["starts"], r["prompt"], r["version"], r["sizes"], r["first"]
    has_before = "before" in sizes
    native_start = starts["native llama-server"]
    native_prompt = prompts["native llama-completion"]
    checkout = "checkout (python -m runtime)"
    target_start = max(1.5 * statistics.median(native_start), statistics.median(native_start) + 0.2)

    def both(cell: object) -> list[str]:  # the bundle's and the before bundle's cells of one row
        return [cell("bundle"), cell("before") if has_before else ""]  # type: ignore[operator]

    def first_cell(name: str) -> str:
        return f"{firsts[name]['first']:.2f} (the next start: {firsts[name]['next']:.2f})"

    def overhead(name: str) -> str:
        return f"{(sizes[name]['bundle'] - r['model_size']) / 1e6:.1f}"

    lines = [f"- {k}: {v}" for k, v in meta.items()]
    lines += [""] + table(
        ["issue 12 metric", "bundle", "before", "checkout (nothing unpacked)", "native", "bundle / native", "before / native", "target"],
        [
            ["repeated start to `/health` (s)", *both(lambda n: summary(starts[n])), summary(starts[checkout]),
             f"{summary(native_start)} (llama-server)", *both(lambda n: ratio(starts[n], native_start)), f"≤ {target_start:.2f} s"],
            ["repeated start to `/health`, each program's defaults (s)", summary(starts["bundle, its defaults"]), "", "",
             f"{summary(starts['native llama-server, its defaults'])} (llama-server -m MODEL)",
             ratio(starts["bundle, its defaults"], starts["native llama-server, its defaults"]), "", "≤ 1.3× (issue 24)"],
            ["first start: fresh copy, fresh `$TMPDIR`, empty `$LLAMABOX_CACHE` (s)", *both(first_cell), "", "", "", "", "≤ 2.5 s"],
            ["`-p Hi -n 8 --temp 0` wall time (s)", *both(lambda n: summary(prompts[n])), summary(prompts[checkout]),
             f"{summary(native_prompt)} (llama-completion -cnv -st --jinja)", *both(lambda n: ratio(prompts[n], native_prompt)),
             f"≤ {1.5 * statistics.median(native_prompt):.2f} s"],
            ["bundle size minus GGUF size (MB)", *both(overhead), "", "", "", "", "≤ 50"],
            ["runtime stub size (MB)", *both(lambda n: f"{sizes[n]['stub'] / 1e6:.1f}"), "", "", "", "", "≤ 45"],
        ],
        [True, True, has_before, True, True, True, has_before, True],
    )
    lines.append("")
    for name, first in firsts.items():
        cached_bytes, cached_files = first["cache_runtime"]
        left = f" It left {cached_bytes / 1e6:.1f} MB in {cached_files} files in `$LLAMABOX_CACHE/runtime/`." if cached_files else ""
        if first["preparing_to_next_line"] is not None:
            left += (f" From the launcher's \"preparing\" line to the runtime's next line (unpacking, then the runtime's start): "
                     f"{first['preparing_to_next_line']:.2f} s.")
        lines.append(f"First start's own lines on stderr ({name}): {'; '.join(f'`{line}`' for line in first['lines']) or '(none)'}.{left}")
        lines.append("")

    def med(name: str) -> float:
        return statistics.median(versions[name])

    rows = [
        ["`--version`: bundle (the launcher finds the runtime in the cache and execs it; one-folder bootloader, Python starts, "
         "CLI imports; nothing unpacked)" if r["unpacked"]["bundle"]["kind"] == "launcher" else
         "`--version`: bundle (onefile: the bootloader unpacks everything, Python starts, CLI imports)", summary(versions["bundle"])],
    ]
    if DIRECT in versions:
        rows.append(["`--version`: the bundle's runtime run straight from the cache (no launcher; the environment the launcher sets)",
                     summary(versions[DIRECT])])
    if has_before:
        rows.append([f"`--version`: before ({r['unpacked']['before']['kind']}: the bootloader unpacks everything into `$TMPDIR`, Python starts, "
                     "CLI imports)", summary(versions["before"])])
    rows += [
        ["`--version`: checkout (Python starts, CLI imports; nothing unpacked)", summary(versions[checkout])],
        ["`python -S -c pass` (the venv's bare interpreter start)", summary(versions["python -S -c pass (venv)"])],
    ]
    if DIRECT in versions:
        rows.append(["⇒ the launcher's own cost (bundle − its runtime run straight from the cache, `--version` medians)",
                     f"{med('bundle') - med(DIRECT):.3f}"])
    what = {"launcher": "launcher + one-folder bootloader, nothing unpacked", "onefile": "unpacking at every start, the onefile bootloader's own cost"}
    for name in ("bundle", "before") if has_before else ("bundle",):
        rows.append([f"⇒ the {name} stub's own cost: {what[r['unpacked'][name]['kind']]} ({name} − checkout `--version`, medians)",
                     f"{med(name) - med(checkout):.3f}"])
    for name, loaded in r["loaded"].items():
        at = [a for a, _ in loaded]
        rows += [
            [f"{name} serving: exec → Python's `main()` (launcher or bootloader + interpreter + first imports; = loaded line − its own figure)",
             summary([a - x for a, x in loaded])],
            [f"{name} serving: `main()` → \"loaded in X s\" line (engine + server imports, kernel choice, fork, model load, bind)",
             summary([x for _, x in loaded])],
            [f"{name} serving: loaded line → first `/health` 200 (app, uvicorn start)", summary(r["health_after_loaded"][name])],
            [f"{name} serving: exec → loaded line", summary(at)],
        ]
    lines += table(["where the bundle's start goes", "seconds"], rows)
    lines += [""] + table(["runtime phases, from the checkout (in-process, fresh interpreter each run)", "seconds"],
                          [[name, summary(values)] for name, values in r["phases"].items()])
    imports, total = r["imports"]
    lines += [""] + table([f"`python -X importtime`, top 10 cumulative (all runtime imports for serving: {total:.2f} s)", "cumulative s", "self s"],
                          [[f"`{name}`", f"{cum:.3f}", f"{own:.3f}"] for name, cum, own in imports])
    for name, u in r["unpacked"].items():
        lines += [""] + unpacked_table(name, u)
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
    parser.add_argument("--before", type=Path, metavar="STUB",
                        help="an older runtime stub (such as a onefile one) measured beside --stub: the \"before\" column")
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
