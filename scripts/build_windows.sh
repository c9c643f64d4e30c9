#!/usr/bin/env bash
# The Windows x86-64 runtime stub, built on Linux: PyInstaller runs under Wine on a Windows CPython that holds
# llama.cpp cross-compiled with MinGW-w64 (scripts/windows_toolchain.sh says what each part is and why).
#
#   scripts/build_windows.sh [--dist DIR]   # dist/stubs/llamabox-runtime-windows-x86_64.exe (build.py --platform
#                                           # windows-x86_64 runs this)
#   scripts/build_windows.sh prepare        # only the cached parts: cross-compiled llama.cpp, the Windows CPython
#                                           # (setup.sh runs this on Linux x86-64)
#   scripts/build_windows.sh ready          # exit 0 when those are cached
#   scripts/build_windows.sh python         # the Windows python.exe (a Linux path), for running it under Wine
#
# Needs Wine, MinGW-w64 and osslsigncode (setup.sh installs them as root with apt), PyPI, Debian 13's Vulkan
# packages (as the Linux Vulkan backend), and 22 minutes on 2 cores the first time; cached, `prepare` takes a few seconds and the stub about a minute and a half.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/llama_wheel.sh
source scripts/gpu_backends.sh
source scripts/windows_toolchain.sh

PY=${PYTHON:-.venv/bin/python}
say() { echo "build_windows.sh: $*" >&2; }

check_tools() {
    local missing
    missing=$(windows_tools_missing)
    [ -z "$missing" ] || { say "needs $missing(apt-get install $missing; scripts/setup.sh does it as root)"; exit 1; }
}

ready() {
    [ -f "$(windows_llama_dir)/lib/libllama.dll" ] && [ -f "$(windows_vulkan_dir)/ggml-vulkan.dll" ] \
        && [ -f "$(windows_python_dir)/.llamabox-complete" ]
}

# install_llama PYTHON_DIR LLAMA_DIR VULKAN_DIR: llama-cpp-python's Python package with the cross-compiled
# libraries, laid out as pip lays out the Linux wheel: llama_cpp/lib for the libraries, <site-packages>/bin for
# the backends (the CPU variants and Vulkan).
install_llama() {
    local site=$1/Lib/site-packages dll
    rm -rf "$site/llama_cpp" "$site/bin"
    cp -r "$2/llama_cpp" "$site/llama_cpp"
    mkdir -p "$site/llama_cpp/lib" "$site/bin"
    # Without their debug information: Debian's libstdc++-6.dll is 23.7 MB with it, 4.3 MB without.
    for dll in "$2"/lib/*.dll; do x86_64-w64-mingw32-strip --strip-debug -o "$site/llama_cpp/lib/${dll##*/}" "$dll"; done
    for dll in "$2"/bin/*.dll "$3"/*.dll; do x86_64-w64-mingw32-strip --strip-debug -o "$site/bin/${dll##*/}" "$dll"; done
    # What pip would record, so that importlib.metadata knows the version (build.py writes it into the stub).
    rm -rf "$site"/llama_cpp_python-*.dist-info
    mkdir -p "$site/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.dist-info"
    printf 'Metadata-Version: 2.1\nName: llama_cpp_python\nVersion: %s\n' "$LLAMA_CPP_PYTHON_VERSION" \
        > "$site/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.dist-info/METADATA"
}

prepare() {
    check_tools
    local llama vulkan python
    llama=$(windows_llama_dir)
    vulkan=$(windows_vulkan_dir)
    python=$(windows_python_dir)
    build_windows_llama "$PY" "$llama"
    build_windows_vulkan "$PY" "$vulkan"
    prepare_windows_python "$PY" "$python"
    install_llama "$python" "$llama" "$vulkan"
}

case "${1:-}" in
    prepare) prepare; exit 0 ;;
    ready) ready; exit $? ;;
    python) echo "$(windows_python_dir)/python.exe"; exit 0 ;;
esac

dist=dist/stubs
while [ $# -gt 0 ]; do
    case "$1" in
        --dist) dist=$2; shift 2 ;;
        *) say "unknown option $1"; exit 2 ;;
    esac
done
ready || { say "the Windows toolchain is not prepared; run scripts/setup.sh (or scripts/build_windows.sh prepare)"; exit 1; }
check_tools
prepare  # cheap when cached; takes the checkout's llama_cpp package as it is now
mkdir -p "$dist"
build_windows_launcher build/windows/launcher.exe
windows_env
# Wine 8 cannot give a Windows program a regular file as its stdout or stderr: through a pipe. PyInstaller warns
# once per DLL that it cannot find Windows' own API sets (api-ms-win-*), which every Windows 10 and 11 has.
wine "$(windows_python_dir)/python.exe" build.py --dist "$(wine_path "$dist")" </dev/null 2>&1 | sed "/could not resolve 'api-ms-win-/d"
