"""The GPU: a bundle against native llama.cpp on the same GPU, same GGUF, in one run.

    python benchmarks/gpu.py                                   # CUDA: dist/stubs/llamabox-runtime-linux-x86_64-cuda
    python benchmarks/gpu.py --model qwen-7b-q4_k_m.gguf --runs 5
    python benchmarks/gpu.py --backend vulkan                  # the default stub's Vulkan backend

Both sides run the same GPU kernels: native llama-server and llama-bench are built from the llama.cpp source
the pinned llama-cpp-python vendors, with their backends as modules (benchmarks/native.py), and load the GPU
module that this checkout's scripts/setup.sh built and build.py put into the stub (`setup.sh --gpu cuda` for
CUDA). Every layer goes on the GPU on both sides: native with `-ngl 99`, the bundle by its own fit (`--gpu-layers
auto`), which this script checks. Measured over HTTP for both servers, in alternating A/B runs: repeated start
to /health, decode and prompt tokens per second, time to the first streamed token, peak memory of the process
tree and 4 concurrent streaming clients; llama-bench's pp512/tg128 on the same GPU are printed as the ceiling.
The table names the GPU, its driver and the CPU. A dry run on a machine without a GPU: Mesa's lavapipe,
with `VK_ICD_FILENAMES=/usr/share/vulkan/icd.d/lvp_icd.x86_64.json GGML_VK_VISIBLE_DEVICES=0`, --backend vulkan
and --quick (a few tokens per measurement: lavapipe reads a 1,000-token prompt in minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.native import DL_FLAGS, native_gpu_tool  # noqa: E402
from benchmarks.provenance import stamp  # noqa: E402
from benchmarks.run import Running, Target, build_bundle, eos_token, free_port, measure_ab, metrics, shrink_workload, stream_completion, summary  # noqa: E402
from bundler.default_model import default_model_path  # noqa: E402
from bundler.stubs import STUB_DIR  # noqa: E402
from runtime import __version__  # noqa: E402
from runtime.devices import ggml  # noqa: E402
from runtime.devices.cpu_features import cpu_info  # noqa: E402
from runtime.devices.gpu import COMPANIONS  # noqa: E402
from runtime.packaged import backend_dir  # noqa: E402
from runtime.platform_tag import current_platform, stub_file_name  # noqa: E402

CTX = 4096
SLOTS = 4  # both sides: one cache of CTX tokens shared by 4 slots (llama-server's default -np auto)
TTFT_PROMPT = "In one sentence, what is a llama?"


def gpu_files(backend: str) -> list[Path]:
    """The GPU module this checkout built (the one build.py puts into the stub) and the libraries it needs."""
    module = backend_dir() / ggml.module_file_name(backend)
    if not module.exists():
        how = "scripts/setup.sh --gpu cuda" if backend == "cuda" else "scripts/setup.sh"
        sys.exit(f"gpu.py: no {backend} backend in {backend_dir()}; build it with `{how}`")
    return [module, *(backend_dir() / name for name in COMPANIONS.get(backend, ()))]


def placed_layers(url: str) -> tuple[int, int]:
    hardware = httpx.get(url + "/props", timeout=30).json()["hardware"]
    return hardware.get("gpu_layers") or 0, hardware.get("layers_total") or 0


def time_to_first_token(target: Target, runs: int, eos: int) -> None:
    server = Running(target.command(free_port()))
    try:
        stream_completion(server.url, TTFT_PROMPT, 4, eos)  # warm-up: the GPU's first kernels
        for _ in range(runs):
            target.add("ttft", stream_completion(server.url, f"{TTFT_PROMPT} ({os.urandom(4).hex()})", 4, eos)[1])
    finally:
        server.stop()


def llama_bench(binary: Path, model: Path, env: dict[str, str], quick: bool) -> dict[str, float]:
    """llama-bench's prompt (pp512) and generation (tg128) tokens per second with every layer on the GPU."""
    sizes = ["-p", "32", "-n", "8", "-r", "1"] if quick else ["-p", "512", "-n", "128", "-r", "3"]
    out = subprocess.run([str(binary), "-m", str(model), "-ngl", "99", *sizes, "-o", "json"],
                         capture_output=True, text=True, check=True, env=env).stdout
    rows = json.loads(out)
    return {(f"pp{row['n_prompt']}" if row["n_prompt"] else f"tg{row['n_gen']}"): row["avg_ts"] for row in rows}


def gpu_names(bundle: Path) -> list[str]:
    """The GPU and its driver: nvidia-smi's words where it is installed, else the bundle's own --info lines."""
    if shutil.which("nvidia-smi"):
        query = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                               capture_output=True, text=True)
        if query.returncode == 0:
            return [f"{line.strip()} (nvidia-smi: name, driver, memory)" for line in query.stdout.splitlines() if line.strip()]
    info = subprocess.run([str(bundle), "--info"], capture_output=True, text=True).stdout
    return [line.split("GPU found: ", 1)[1] for line in info.splitlines() if line.startswith("GPU found: ")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=("cuda", "vulkan"), default="cuda", help="the GPU backend to measure (default cuda)")
    parser.add_argument("--stub", type=Path, help="the stub to bundle with (default: dist/stubs' CUDA stub, or the default stub for vulkan)")
    parser.add_argument("--model", type=Path, help="GGUF to measure (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--runs", type=int, default=3, help="alternating A/B runs (default 3)")
    parser.add_argument("--output", type=Path, help="also write the table to this Markdown file")
    parser.add_argument("--flash-attn", choices=("auto", "on", "off"), default="auto",
                        help="-fa for both sides (default auto: llama.cpp's choice, on where the GPU has it)")
    parser.add_argument("--quick", action="store_true", help="a few tokens per measurement: proves the script runs (lavapipe), measures nothing")
    args = parser.parse_args()
    if args.quick:
        shrink_workload()

    model = (args.model or default_model_path()).resolve()
    stub = args.stub or STUB_DIR / stub_file_name(current_platform(), "cuda" if args.backend == "cuda" else None)
    if not stub.exists():
        sys.exit(f"gpu.py: no stub at {stub}; build it with `python build.py{' --gpu cuda' if args.backend == 'cuda' else ''}`")
    files = gpu_files(args.backend)
    server_binary = native_gpu_tool("llama-server", files)
    bench_binary = native_gpu_tool("llama-bench", files)
    # Native programs find the GPU module's libraries (the CUDA runtime, cuBLAS) in their own folder.
    library_path = os.pathsep.join(filter(None, [str(server_binary.parent), os.environ.get("LD_LIBRARY_PATH")]))
    native_env = {**os.environ, "LD_LIBRARY_PATH": library_path}
    eos = eos_token(model)

    with tempfile.TemporaryDirectory() as tmp:
        bundle = build_bundle(model, stub, Path(tmp) / "gpu.run")
        print("The bundle's first start proves the GPU (once per GPU and driver)...", file=sys.stderr)
        subprocess.run([str(bundle), "--info"], check=True, capture_output=True, text=True)
        ours = Target(
            "llamabox",
            lambda port: [str(bundle), "--nobrowser", "--port", str(port), "-c", str(CTX), "-np", str(SLOTS), "-fa", args.flash_attn],
        )
        native = Target(
            "llama-server",
            lambda port: ["env", f"LD_LIBRARY_PATH={library_path}", str(server_binary), "-m", str(model), "--port", str(port), "-c", str(CTX), "-ngl", "99",
                                 "-np", str(SLOTS), "-kvu", "-fa", args.flash_attn, "--no-webui"],  # -kvu: shared, as with -np auto
        )
        check = Running(ours.command(free_port()))
        try:
            layers, total = placed_layers(check.url)
        finally:
            check.stop()
        if layers < total or total == 0:
            sys.exit(f"gpu.py: the bundle put {layers} of {total} layers on the GPU; this benchmark compares whole offloads")
        print("A/B runs...", file=sys.stderr)
        measure_ab([ours, native], args.runs, eos)
        for target in (ours, native):
            time_to_first_token(target, 2 if args.quick else 5, eos)
        print("llama-bench...", file=sys.stderr)
        ceiling = llama_bench(bench_binary, model, native_env, args.quick)
        gpus = gpu_names(bundle)

    cpu = cpu_info()
    rows = [*metrics(), ("ttft", "time to first streamed token, short prompt (s)", False)]
    lines = [
        *(f"- {key}: {value}" for key, value in stamp().items()),
        f"- GPU: {'; '.join(gpus) or 'none found'}",
        f"- machine: {cpu.name}, {os.cpu_count()} logical CPUs, {platform.platform()}",
        f"- backend: {args.backend} (the module in {stub.name}, loaded by both sides); model: {model.name} ({model.stat().st_size / 1e6:.1f} MB)",
        f"- versions: llamabox {__version__}; native built with `cmake {' '.join(DL_FLAGS)}`",
        f"- method: {args.runs} alternating A/B runs, median (min–max); native `llama-server -ngl 99 -c {CTX} -np {SLOTS} -kvu`, "
        f"the bundle `-c {CTX} -np {SLOTS}` with every layer on the GPU by its own fit (both: one cache shared by the slots; `-fa {args.flash_attn}`)",
        f"- reproduce: `python benchmarks/gpu.py --backend {args.backend}{f' --model {args.model}' if args.model else ''} --runs {args.runs} --flash-attn {args.flash_attn}{' --quick' if args.quick else ''}`",
        "",
        f"| metric ({args.backend}) | llamabox | native llama-server | ratio (ours / native) |",
        "|---|---|---|---|",
    ]
    for key, label, _ in rows:
        if key not in ours.samples:
            continue  # start_repeat after a single run
        a, b = ours.samples[key], native.samples[key]
        lines.append(f"| {label} | {summary(a)} | {summary(b)} | {statistics.median(a) / statistics.median(b):.2f}× |")
    lines += ["", "| native llama-bench, -ngl 99 (the ceiling) | tok/s |", "|---|---|",
              *(f"| {name} | {rate:.1f} |" for name, rate in ceiling.items())]
    text = "\n".join(lines)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")


if __name__ == "__main__":
    main()
