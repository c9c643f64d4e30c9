"""Build the llamabox runtime stub for this platform with PyInstaller.

    python build.py                 # -> dist/stubs/llamabox-runtime-<platform>
    python build.py --dist DIR      # somewhere else
    python build.py --host          # on Linux: with this machine's Python, not the portable build
    python build.py --gpu cuda      # -> dist/stubs/llamabox-runtime-<platform>-cuda (after setup.sh --gpu cuda)
    python build.py --platform windows-x86_64   # on Linux x86-64: the Windows stub, built under Wine

The stub is model-independent: rebuild it only when the runtime changes. It carries Python,
llama-cpp-python with every CPU variant library, the GPU backends every stub has (Vulkan on Linux), the
HTTP server and the chat page. A GPU stub (--gpu cuda) carries that backend too, with the libraries it needs
from the CUDA toolkit (runtime.devices.gpu.COMPANIONS), so that its receiver needs only the driver.

Every stub is the launcher layout (runtime/bundle_format.py): PyInstaller builds the runtime as one
folder, packed as .tar.gz behind a launcher that unpacks it once per runtime build into a cache and runs it
from there: on Linux and macOS a POSIX sh script (runtime/launcher.sh), on Windows a small C program
(runtime/windows_launcher.c, compiled by scripts/build_windows.sh). On Linux x86-64 the Windows stub is built by
scripts/build_windows.sh, which runs this file under Wine on a Windows CPython with llama.cpp
cross-compiled by MinGW-w64 (scripts/windows_toolchain.sh; setup.sh prepares both).

On Linux x86-64, once scripts/setup.sh (as root) has prepared it, the stub is built by
scripts/build_portable.sh inside a Debian 11 root, so that it needs glibc 2.31 at most; without
that preparation it is built here and needs this machine's glibc, which build.py says loudly.
Either way build.py measures the newest glibc any ELF file in the stub needs, records it in the
stub's description (`min_glibc`) and, with --max-glibc, refuses a stub that needs more.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.metadata
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import llama_cpp
import PyInstaller.__main__

from bundler import glibc
from runtime import __version__, bundle_format
from runtime.devices.cpu import CPU_VARIANT_GLOB
from runtime.devices.gpu import COMPANIONS
from runtime.devices.gpu import modules as gpu_modules
from runtime.devices.rpc import module as rpc_module
from runtime.bundle_format import FORMAT_VERSION
from runtime.devices.proof import model as proof_model
from runtime.packaged import (
    BACKENDS_DIR_NAME,
    FILE_LIST_NAME,
    PROBE_NAME,
    PROOF_MODEL_NAME,
    TEMPLATES_DIR_NAME,
    backend_dir,
)
from runtime.platform_tag import GPU_STUBS, STUB_INFO_NAME, current_platform, stub_file_name

ROOT = Path(__file__).resolve().parent
PORTABLE_SCRIPT = ROOT / "scripts" / "build_portable.sh"
WINDOWS_SCRIPT = ROOT / "scripts" / "build_windows.sh"
# Stubs this machine builds for another platform, and how.
CROSS_BUILDS = {("linux-x86_64", "windows-x86_64"): WINDOWS_SCRIPT}
EXCLUDED_MODULES = (
    "huggingface_hub", "hf_xet", "openai", "pydantic", "pydantic_core", "jiter", "yaml", "gguf", "httpx",
    "PyInstaller", "setuptools", "pkg_resources", "tkinter", "IPython", "matplotlib", "PIL", "pytest",
    "bundler", "llama_cpp.server", "llama_cpp.mtmd_cpp", "llama_cpp.llava_cpp",
)


def llama_cpp_libraries(gpu: str | None) -> tuple[list[Path], list[Path]]:
    """llama-cpp-python's own libraries, and the backend modules (CPU variants, GPUs) in its bin/ folder: the
    GPU backends every stub carries, and `gpu`'s with its companion libraries.

    PyInstaller cannot see either: llama-cpp-python and the runtime open them with ctypes.
    """
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    if sys.platform == "linux":
        # pip copies each library three times (libx.so, libx.so.0, libx.so.0.25.3). llama-cpp-python opens
        # libllama.so by name; it and the backends need libggml*.so.0 by soname. libmtmd is for
        # multimodal models, which the runtime does not serve.
        core = [lib_dir / "libllama.so", *sorted(lib_dir.glob("libggml*.so.[0-9]"))]
    else:
        core = sorted(p for p in lib_dir.iterdir() if p.is_file())
    variants = sorted(backend_dir().glob(CPU_VARIANT_GLOB))
    if not variants:
        sys.exit(
            f"build.py: no CPU variant libraries ({CPU_VARIANT_GLOB}) in {backend_dir()}; "
            "install llama-cpp-python with scripts/setup.sh (it builds every CPU variant)"
        )
    gpus = {name: path for name, path in gpu_modules(backend_dir()).items() if name not in GPU_STUBS or name == gpu}
    if gpu is not None and gpu not in gpus:
        sys.exit(f"build.py: no {gpu} backend in {backend_dir()}; build it with `scripts/setup.sh --gpu {gpu}` (hours on 2 cores, once)")
    companions = [backend_dir() / name for name in COMPANIONS.get(gpu or "", ())]
    if missing := [p.name for p in companions if not p.exists()]:
        sys.exit(f"build.py: the {gpu} backend's libraries are missing from {backend_dir()} ({', '.join(missing)}); rerun `scripts/setup.sh --gpu {gpu}`")
    rpc = rpc_module(backend_dir())  # ggml's RPC backend: --rpc-worker and --rpc (runtime/devices/rpc.py)
    return core, variants + list(gpus.values()) + companions + ([rpc] if rpc else [])


# A spec rather than command-line options: for the stripping hook, and the onedir/onefile split below.
SPEC = """\
import os
import shutil
import subprocess
import sys

from PyInstaller.utils.hooks import collect_submodules

from bundler.glibc import record_min_glibc

a = Analysis(
    [{entry!r}],
    pathex=[{root!r}],
    binaries={binaries!r},
    datas={datas!r},
    hiddenimports=collect_submodules("uvicorn"),
    excludes={excludes!r},
)
# Every file is collected now and packed below: measure their glibc needs into the description first.
record_min_glibc({info!r}, [src for _dest, src, kind in a.binaries + a.datas if kind != "SYMLINK"])


def debug_stripped(entry):
    # Python itself is built with debug information: libpython is 30 MB of which 6.5 MB is code, its extension
    # modules 14.7 MB of which 4.6 MB. Only those: wheels' libraries patched by auditwheel (NumPy's OpenBLAS)
    # break when stripped.
    dest, src, kind = entry
    ours = os.path.basename(dest).startswith("libpython") or (kind == "EXTENSION" and "lib-dynload" in src)
    if kind not in ("BINARY", "EXTENSION") or not ours or not sys.platform.startswith("linux"):
        return entry
    if shutil.which("strip") is None:
        return entry
    copy = os.path.join({work!r}, "stripped", dest)
    os.makedirs(os.path.dirname(copy), exist_ok=True)
    subprocess.run(["strip", "--strip-debug", "-o", copy, src], check=True)
    return (dest, copy, kind)


a.binaries = [debug_stripped(entry) for entry in a.binaries]
# A GPU backend's companion libraries (cuBLAS, the CUDA runtime) belong beside it, where the runtime loads them
# from; PyInstaller's dependency scan would add second copies (and links to them) elsewhere: 540 MB of cuBLASLt.
a.binaries = [entry for entry in a.binaries if os.path.basename(entry[0]) not in {companions!r} or os.path.dirname(entry[0]) == {backends!r}]
"""

# The one-folder runtime that the launcher stub carries.
ONEDIR_SPEC = """\
exe = EXE(PYZ(a.pure), a.scripts, [], exclude_binaries=True, name={name!r}, console=True, upx=False)
COLLECT(exe, a.binaries, a.datas, name={name!r}, upx=False)
"""


def portable_ready() -> bool:
    """Whether this machine builds the portable stub: Linux x86-64 and the cached Debian 11 root is there."""
    if current_platform() != "linux-x86_64" or not PORTABLE_SCRIPT.exists():
        return False
    return subprocess.run([str(PORTABLE_SCRIPT), "ready"], cwd=ROOT).returncode == 0


def check_glibc(stub: Path, limit: glibc.Version | None) -> None:
    """Measure the finished stub; refuse it over `limit`, else say loudly what it needs when that is over the target."""
    needs = glibc.stub_needs(stub)
    newest = glibc.highest(needs)
    if newest is None:
        return
    over = sorted((n for n in needs if n.glibc and n.glibc > (limit or glibc.TARGET)), key=lambda n: n.glibc)
    if not over:
        print(f"The stub needs glibc {glibc.format_version(newest)}: {glibc.runs_on(newest)}")
        return
    worst = ", ".join(f"{n.name} ({glibc.format_version(n.glibc)})" for n in over[-5:])
    if limit is not None:
        stub.unlink()
        sys.exit(f"build.py: refused: files in the stub need glibc over {glibc.format_version(limit)}: {worst}")
    bar = "!" * 100
    print(
        f"{bar}\n"
        f"This stub needs glibc {glibc.format_version(newest)} (this machine's): {glibc.runs_on(newest)}.\n"
        f"It will not start on older Linux (newest needs: {worst}).\n"
        f"For a stub that needs glibc {glibc.format_version(glibc.TARGET)} at most, run scripts/setup.sh as root "
        f"(it prepares scripts/build_portable.sh), then build.py again.\n{bar}",
        file=sys.stderr,
    )


LAUNCHER_TEMPLATE = ROOT / "runtime" / "launcher.sh"
# The Windows launcher, compiled by scripts/build_windows.sh from runtime/windows_launcher.c before it runs this.
WINDOWS_LAUNCHER = ROOT / "build" / "windows" / "launcher.exe"
# Where the launcher unpacks the runtime when LLAMABOX_CACHE is not set (runtime.packaged.cache_dir agrees).
CACHE_HOMES = {"macos": "$HOME/Library/Caches", "linux": "${XDG_CACHE_HOME:-$HOME/.cache}"}
PROBE_SCRIPT = "#!/bin/sh\n# Run by the launcher: it fails where this folder may not run programs (noexec).\n"


def pack_runtime(folder: Path, probe: bool = True) -> tuple[bytes, int]:
    """The one-folder runtime as .tar.gz (reproducible: sorted, fixed owners and times), and its unpacked size.

    Adds the file list the runtime checks itself against at start (FILE_LIST_NAME) and, for the sh launcher
    (`probe`), its noexec probe. The launcher itself marks an unpacking whole (COMPLETE_MARKER) once it has
    unpacked everything (the sh launcher: and the files Python needs have their sizes).
    """
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink())
    sizes = {p.relative_to(folder).as_posix(): p.stat().st_size for p in files}
    (folder / FILE_LIST_NAME).write_text(json.dumps(sizes, indent=0, sort_keys=True) + "\n")
    if probe:
        (folder / PROBE_NAME).write_text(PROBE_SCRIPT)
        (folder / PROBE_NAME).chmod(0o755)
    mtime = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", compresslevel=9, mtime=mtime) as zipped:
        with tarfile.open(fileobj=zipped, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for path in sorted(folder.rglob("*")):
                info = tar.gettarinfo(str(path), arcname=path.relative_to(folder).as_posix())
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                info.mtime = mtime
                info.mode = 0o755 if info.isdir() or info.mode & 0o111 else 0o644
                if info.isfile():
                    with open(path, "rb") as data:
                        tar.addfile(info, data)
                else:
                    tar.addfile(info)
    return buffer.getvalue(), sum(sizes.values())


def write_launcher_stub(folder: Path, stub: Path, description: dict[str, object], platform_name: str) -> None:
    """The launcher-layout stub: the launcher (runtime/launcher.sh filled in, or the Windows launcher and a line
    describing the stub), then the packed runtime."""
    windows = platform_name.startswith("windows-")
    payload, unpacked = pack_runtime(folder, probe=not windows)
    if windows:
        if not WINDOWS_LAUNCHER.exists():
            sys.exit(f"build.py: no Windows launcher at {WINDOWS_LAUNCHER}; build the Windows stub with scripts/build_windows.sh")
        described = {**description, "executable": folder.name, "unpacked_size": unpacked}
        header = bundle_format.exe_launcher_header(WINDOWS_LAUNCHER.read_bytes(), payload, described)
    else:
        header = _sh_launcher(folder, payload, unpacked, description, platform_name)
    partial = stub.with_name(stub.name + ".partial")
    with open(partial, "wb") as out:
        out.write(header)
        out.write(payload)
    partial.chmod(0o755)
    partial.replace(stub)


def _sh_launcher(folder: Path, payload: bytes, unpacked: int, description: dict[str, object], platform_name: str) -> bytes:
    """runtime/launcher.sh with its fields filled in for this runtime."""
    internal = folder / "_internal"
    needed = [folder / folder.name, *internal.glob("libpython*"), internal / "base_library.zip"]
    fields = {
        "EXECUTABLE": folder.name,
        "UNPACKED_MB": f"{unpacked / 1e6:.0f}",
        "NEEDED_FILES": " ".join(f"{p.relative_to(folder).as_posix()}:{p.stat().st_size}" for p in needed if p.is_file()),
        "CACHE_HOME": CACHE_HOMES[platform_name.split("-")[0]],
    }
    return bundle_format.launcher_header(LAUNCHER_TEMPLATE.read_text(), fields, payload, description)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dist", type=Path, default=ROOT / "dist" / "stubs", help="output directory")
    parser.add_argument(
        "--host",
        action="store_true",
        help="build with this machine's Python and libraries even where the portable build is prepared "
        "(the stub then needs this machine's glibc)",
    )
    parser.add_argument(
        "--max-glibc",
        type=glibc.parse_version,
        metavar="X.Y",
        help="refuse (delete) the stub if any ELF file in it needs a newer glibc (the portable build passes "
        f"{glibc.format_version(glibc.TARGET)})",
    )
    parser.add_argument(
        "--gpu",
        choices=GPU_STUBS,
        help="also carry this GPU backend and the libraries it needs (CUDA: the CUDA runtime and cuBLAS, hundreds "
        "of MB), as llamabox-runtime-<platform>-cuda; scripts/setup.sh --gpu cuda builds the backend first",
    )
    parser.add_argument(
        "--platform",
        default=current_platform(),
        choices=sorted({current_platform(), *(target for host, target in CROSS_BUILDS if host == current_platform())}),
        help="the platform the stub runs on: this one, or on Linux x86-64 also windows-x86_64 (built under Wine "
        "with what scripts/setup.sh prepared)",
    )
    args = parser.parse_args()

    if args.platform != current_platform():
        if args.gpu:
            parser.error(f"--gpu {args.gpu} is built for {current_platform()} only")
        command = [str(CROSS_BUILDS[current_platform(), args.platform]), "--dist", str(args.dist.resolve())]
        os.execv(command[0], command)
    if not args.host and portable_ready():
        command = [str(PORTABLE_SCRIPT), "--dist", str(args.dist.resolve()), *(["--gpu", args.gpu] if args.gpu else [])]
        os.execv(command[0], command)

    platform_name = current_platform()
    core, backend_modules = llama_cpp_libraries(args.gpu)
    work = ROOT / "build" / "pyinstaller"
    work.mkdir(parents=True, exist_ok=True)
    info = work / STUB_INFO_NAME
    description = {
        "platform": platform_name,
        "runtime_version": __version__,
        "llama_cpp_python": importlib.metadata.version("llama-cpp-python"),
        "cpu_variants": [p.name for p in backend_modules if "-cpu-" in p.name],
        "gpu_backends": [p.name for p in backend_modules if p.name.startswith(("libggml-", "ggml-")) and "-cpu-" not in p.name],
        "bundle_format": FORMAT_VERSION,
        "layout": "launcher",
    }
    info.write_text(json.dumps(description, indent=2))
    # The kernel self-test's model (runtime/devices/proof/model.py), so that the stub needs no GGUF writer.
    proof = work / PROOF_MODEL_NAME
    proof.unlink(missing_ok=True)
    proof_model.ensure(proof)
    name = stub_file_name(platform_name, args.gpu)
    spec = work / "llamabox-runtime.spec"
    spec.write_text(
        SPEC.format(
            entry=str(ROOT / "runtime" / "__main__.py"),
            root=str(ROOT),
            binaries=[(str(p), "llama_cpp/lib") for p in core] + [(str(p), BACKENDS_DIR_NAME) for p in backend_modules],
            info=str(info),
            companions=sorted(p.name for p in backend_modules if not p.name.startswith(("libggml-", "ggml-"))),
            backends=BACKENDS_DIR_NAME,
            datas=[(str(info), "."), (str(ROOT / TEMPLATES_DIR_NAME), TEMPLATES_DIR_NAME), (str(proof), ".")],
            # Found by PyInstaller in optional imports of llama-cpp-python and others; never used by the runtime.
            excludes=list(EXCLUDED_MODULES),
            work=str(work),
        )
        + ONEDIR_SPEC.format(name=name)
    )
    started = time.monotonic()
    pyinstaller_dist = work / "dist"
    PyInstaller.__main__.run(
        [str(spec), "--noconfirm", "--log-level=WARN", f"--distpath={pyinstaller_dist}", f"--workpath={work}"]
    )
    stub = args.dist / name
    args.dist.mkdir(parents=True, exist_ok=True)
    # record_min_glibc (in the spec) added min_glibc to the description: the launcher carries it too.
    write_launcher_stub(pyinstaller_dist / name, stub, json.loads(info.read_text()), platform_name)
    shutil.rmtree(pyinstaller_dist / name)
    print(f"Built {stub} ({stub.stat().st_size / 1e6:.1f} MB) in {time.monotonic() - started:.0f} s")
    if platform_name.startswith("linux-"):
        check_glibc(stub, args.max_glibc)


if __name__ == "__main__":
    main()
