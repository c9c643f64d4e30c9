# Sourced by setup.sh and build_portable.sh: the pinned llama-cpp-python, built from its sdist with our
# patches and every CPU variant, once per version, flags and patches (a wheel directory in the cache).
#
# pip's own wheel cache ignores CMAKE_ARGS, so a wheel built with other flags could be reused
# silently: keep our own wheel directory, named after the version and a hash of the flags, of our
# patches to the vendored llama.cpp (scripts/patches/, each with a header saying what it fixes) and
# of the toolchain id the caller gives (the portable build's glibc sysroot).

LLAMA_CPP_PYTHON_VERSION=0.3.36
# Never code compiled for this machine's CPU: every CPU variant as a loadable module, chosen at run time.
CMAKE_ARGS="-DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON -DGGML_NATIVE=OFF"
case "$(uname -s)" in
    Darwin) CMAKE_ARGS="$CMAKE_ARGS -DGGML_METAL=ON -DGGML_METAL_EMBED_LIBRARY=ON" ;;
esac

hash_of() { if command -v sha256sum >/dev/null; then sha256sum; else shasum -a 256; fi; }

# llama_wheel_dir [TOOLCHAIN_ID]: where the wheel for these flags and patches lives (built or not).
llama_wheel_dir() {
    local cache=${LLAMABOX_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llamabox} flags_id
    flags_id=$( { printf '%s' "$CMAKE_ARGS"; cat scripts/patches/*.patch; printf '%s' "${1:-}"; } | hash_of | cut -c1-12)
    echo "$cache/wheels/llama-cpp-python-$LLAMA_CPP_PYTHON_VERSION-all-variants${1:+-$1}-$flags_id"
}

# build_llama_wheel PYTHON WHEEL_DIR: build the wheel into WHEEL_DIR unless it is there. CFLAGS,
# CXXFLAGS and LDFLAGS from the environment reach the compiler (the portable build's sysroot).
build_llama_wheel() {
    local python=$1 wheel_dir=$2 work src cores
    ls "$wheel_dir"/llama_cpp_python-*.whl >/dev/null 2>&1 && return 0
    cores=$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2)
    echo "Building llama-cpp-python $LLAMA_CPP_PYTHON_VERSION with every CPU variant (about 8 minutes on 2 cores, once)..."
    work="$wheel_dir.work"
    rm -rf "$work" "$wheel_dir.partial" && mkdir -p "$work" "$wheel_dir.partial"
    src=$(llama_source "$python" "$work") || return 1
    CMAKE_ARGS="$CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL=$cores "$python" -m pip wheel \
        --no-cache-dir --no-deps "$src" -w "$wheel_dir.partial"
    rm -rf "$wheel_dir" "$work" && mv "$wheel_dir.partial" "$wheel_dir"
}

# llama_source PYTHON WORK: the pinned sdist unpacked into WORK with our patches applied; prints its path.
llama_source() {
    local python=$1 work=$2 src p
    command -v patch >/dev/null || { echo "needs the 'patch' program (apt-get install patch)" >&2; return 1; }
    "$python" -m pip download --quiet --no-deps --no-binary llama-cpp-python \
        "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$work" >&2
    tar -xzf "$work"/llama_cpp_python-*.tar.gz -C "$work"
    src=$(echo "$work"/llama_cpp_python-"$LLAMA_CPP_PYTHON_VERSION")
    for p in scripts/patches/*.patch; do
        if ! patch -d "$src" -p1 --forward --batch --quiet < "$p"; then
            echo "$p no longer applies to llama-cpp-python $LLAMA_CPP_PYTHON_VERSION." >&2
            echo "Check whether upstream fixed what its header describes; then drop or refresh the patch." >&2
            return 1
        fi
    done
    echo "$src"
}
