"""Target platforms: which stub builds a bundle for which platform, output names, and layout limits.

Stubs live in a stub directory (--stub-dir, default dist/stubs, where build.py writes them), one per
platform, named llamabox-runtime-<platform> (with .exe for Windows), and one per platform and GPU stub
(`build.py --gpu cuda`: llamabox-runtime-<platform>-cuda). A stub's own description says
which platform it is for and, from format 3 on, the newest bundle format its runtime reads; a stub
for another platform than asked, or for another bundle format, is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bundler import stubs
from bundler.stubs import StubInfo
from runtime import bundle_format
from runtime.errors import LlamaboxError, StubError
from runtime.platform_tag import current_platform, stub_file_name

PLATFORMS = ("linux-x86_64", "linux-arm64", "macos-arm64", "windows-x86_64")
# Windows refuses to start an executable file of 4 GiB or more.
WINDOWS_EXE_LIMIT = 1 << 32
# What the stub description calls the newest bundle format the stub's runtime reads.
FORMAT_KEY = "bundle_format"
_EXECUTABLE_SUFFIXES = (".run", ".exe", ".com", ".bin")


@dataclass(frozen=True)
class ListedStub:
    """One file of a stub directory: its description, or why it is not a usable stub."""

    path: Path
    info: StubInfo | None
    description: dict[str, object]
    problem: str | None


def select_stub(platform: str | None, stub: Path | None, stub_dir: Path | None, gpu: str | None = None) -> Path:
    """The stub to build with: --stub, else the one for --platform (and --gpu) in the stub directory, else the
    default."""
    if stub is not None:
        if platform is not None or gpu is not None:
            check_stub(stub, platform, gpu)
        return stub
    if platform is None and gpu is None:
        return stubs.default_stub_path() if stub_dir is None else stub_dir / stub_file_name(current_platform())
    platform_name = platform or current_platform()
    directory = stub_dir or stubs.STUB_DIR
    path = directory / stub_file_name(platform_name, gpu)
    if not path.is_file() and gpu is not None:
        raise StubError(
            f"no {gpu.upper()} stub for {platform_name} in {directory} (looked for {path.name}); build it on that "
            f"platform with `scripts/setup.sh --gpu {gpu}` and `python build.py --gpu {gpu}`"
        )
    if not path.is_file():
        raise StubError(f"no stub for {platform_name} in {directory} (looked for {path.name}); {_available(directory)}")
    check_stub(path, platform, gpu)
    return path


def check_stub(path: Path, platform: str | None, gpu: str | None = None) -> StubInfo:
    """Read the stub and refuse it if it is for another platform, lacks the GPU backend asked for, or is for
    another bundle format.

    Stubs built before build.py recorded the format are taken: they read format 2, and a format 3
    (sidecar) bundle on one of them tells its user to update llamabox.
    """
    info = stubs.read_stub(path)
    if platform is not None and info.platform != platform:
        raise StubError(f"{path.name} is a stub for {info.platform}, not {platform}; give the {platform} stub")
    described = stubs.description(path) or {}
    if gpu is not None and gpu not in stub_gpu_backends(described):
        raise StubError(f"{path.name} carries no {gpu.upper()} backend; give a stub built with `python build.py --gpu {gpu}`")
    reads = described.get(FORMAT_KEY)
    if reads is not None and reads != bundle_format.FORMAT_VERSION:
        raise StubError(
            f"{path.name} is a runtime for bundle format {reads}, but this llamabox writes format "
            f"{bundle_format.FORMAT_VERSION}; use a stub built by the same llamabox version ({info.runtime_version} "
            "built it)"
        )
    return info


def stub_gpu_backends(described: dict[str, object]) -> list[str]:
    """The GPU backends a stub's description lists, by name: ["vulkan", "cuda"]."""
    modules = described.get("gpu_backends") or []
    if not isinstance(modules, list):
        return []
    return [str(m).removeprefix("lib").removeprefix("ggml-").split(".", 1)[0] for m in modules]


def list_stubs(directory: Path) -> list[ListedStub]:
    """Every file in `directory` named like a stub, with its description or the reason it is not one."""
    if not directory.is_dir():
        return []
    found = []
    for path in sorted(directory.iterdir()):
        if not path.is_file() or not path.name.startswith("llamabox-runtime-"):
            continue
        try:
            info = stubs.read_stub(path)
        except LlamaboxError as exc:
            found.append(ListedStub(path, None, {}, str(exc)))
            continue
        found.append(ListedStub(path, info, stubs.description(path) or {}, None))
    return found


def _available(directory: Path) -> str:
    listed = [s for s in list_stubs(directory) if s.info is not None]
    if not listed:
        return f"there are no stubs in {directory}: build one with `python build.py` on that platform and copy it there"
    names = ", ".join(f"{s.info.platform} ({s.path.name})" for s in listed if s.info)
    return f"stubs there: {names}; build the missing one with `python build.py` on that platform"


def output_name(output: Path, platform: str) -> Path:
    """The output path following the target's conventions: a Windows executable ends with .exe (for .run too)."""
    if not platform.startswith("windows-") or output.suffix.lower() == ".exe":
        return output
    if output.suffix.lower() == ".run":
        return output.with_suffix(".exe")
    return output.with_name(output.name + ".exe")


def sidecar_path(output: Path) -> Path:
    """Where the sidecar of `output` goes: NAME.gguf beside NAME.run, NAME.exe or NAME."""
    if output.suffix.lower() == ".gguf":
        raise LlamaboxError(f"{output.name} ends with .gguf, the sidecar's name; give the executable another name")
    stem = output.stem if output.suffix.lower() in _EXECUTABLE_SUFFIXES else output.name
    return output.with_name(stem + ".gguf")


def check_windows_size(platform: str, stub_size: int, model_size: int, sidecar: bool) -> None:
    """Refuse a Windows executable that Windows would not start (4 GB or more), suggesting --sidecar."""
    if not platform.startswith("windows-") or sidecar:
        return
    # the stub, the model, the archive's copy (smaller than the stub) and the manifest
    estimate = bundle_format.align_up(stub_size) + model_size + stub_size + (1 << 20)
    if estimate >= WINDOWS_EXE_LIMIT:
        raise LlamaboxError(
            f"the Windows executable would be about {estimate / 1e9:.1f} GB, and Windows will not start an "
            "executable of 4 GB or more; add --sidecar to keep the weights in a .gguf file beside a small .exe"
        )
